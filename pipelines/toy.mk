# Preset: the built-in toy setup; runs offline in seconds.
# Model: a tiny random GPT-Neo fixture (replaced by a trained toy LM with the toy-lm stage).
MODEL ?= tests/fixtures/models/tiny-neo
# Data: 400 one-line toy stories shipped with the repo.
DATA ?= pipelines/data/stories.txt
# Tokens per sequence (the fixture model's n_ctx is 32).
CTX ?= 16
# Sequences to cache.
N_SEQS ?= 256
# Prepend BOS to each sequence (1) or not (0).
BOS ?= 1
# Suite to score and evaluate (train-suite is not implemented yet): the fixture suite of the
# tiny GPT-Neo (random weights, so its numbers only show that the pipeline runs).
SUITE ?= tests/fixtures/suites/tiny-neo/suite.safetensors
