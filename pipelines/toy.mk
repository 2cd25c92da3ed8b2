# Preset: the built-in toy setup, offline. `toy-lm` writes a synthetic story corpus and trains
# a tiny GPT-Neo on it (about two minutes on 2 cores, once); every later stage takes seconds.
# Model: the trained toy GPT-Neo (d_model 64, 2 layers, word-level vocabulary).
MODEL ?= $(OUT)/toy/model
# Data: the toy corpus (one story per line).
DATA ?= $(OUT)/toy/corpus.txt
# Tokens per sequence (the toy model's n_ctx is 128).
CTX ?= 64
# Sequences to cache.
N_SEQS ?= 512
# Prepend BOS to each sequence (1) or not (0).
BOS ?= 1
# Stories are shorter than CTX: concatenate them with EOS.
PACK ?= 1
# Suite sizes and training for the toy run.
EXPANSION ?= 4
K ?= 8
SUITE_STEPS ?= 400
SUITE_LR ?= 1e-2
STEPS ?= 200
# Finetuning lr (scaled by 1/sqrt(F/2^14), x8 at F 256). At 2e-3 finetuning overshoots: dead
# features rise to 86% and CE diff lands anywhere in 0.15-0.26 depending on summation order;
# at 1e-4 it is 0.063 and stable (README, "The toy run").
LR ?= 1e-4
# Also finetune the random-connections control (the reference's fake connections).
CONTROL ?= 1
# And write the feature browser (under a second on the toy).
VIEW ?= 1
