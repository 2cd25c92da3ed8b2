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
# Suite sizes and training for the toy run (seconds on 2 cores).
EXPANSION ?= 4
K ?= 8
SUITE_STEPS ?= 300
SUITE_LR ?= 1e-2
STEPS ?= 100
LR ?= 2e-3
