# Preset `default`: the reference's settings for any model, used when MODEL is set without
# PIPELINE (docs/MATH.md, "Optimizer and clipping"). MODEL and DATA are required.

# Model: a local HF folder or a hub id (downloaded into the HF cache when online).
MODEL ?=
# Data: .parquet (column `text`), .jsonl, .jsonl.zst or .txt.
DATA ?=
# Held-out text for evaluation (empty: the N_HELDOUT sequences of DATA after the N_SEQS
# training ones, which no stage trains on).
HELDOUT ?=
# Tokens per sequence (reference: 128).
CTX ?= 128
# Sequences to cache for training (1M tokens at CTX 128).
N_SEQS ?= 8192
# Held-out sequences to evaluate on.
N_HELDOUT ?= 512
# The reference's finetuning scripts pass prepend_bos=False.
BOS ?= 0
# Skip documents shorter than CTX (0, the reference's buffer) or concatenate them with EOS (1).
PACK ?= 0
# Sequences per step (reference: 256 x 128 tokens).
BATCH ?= 256
# Reference suite sizes: expansion 4, k 64.
EXPANSION ?= 4
K ?= 64
# Pretraining steps and base lr (the reference's pretraining: lr 2e-4 / sqrt(F/2^14)).
SUITE_STEPS ?= 1000
SUITE_LR ?= 2e-4
# Tokens without a non-zero value after which a feature counts as dead (reference: 1e7).
DEAD_THRESHOLD ?= 10000000
# Finetuning: loss, steps (the reference: 100M tokens at 256 x 128 = 3051 steps), base lr 1e-3
# (scaled by 1/sqrt(F/2^14)), decay from 0.8 (run_finetuning.py sets 0.7 but never passes it).
LOSS ?= mse
STEPS ?= 3051
LR ?= 1e-3
DECAY ?= 0.8
# AuxK weight in finetuning (reference: 0).
AUXK ?= 0
# Checkpoint every N steps; an interrupted run resumes automatically on the next make.
CKPT_EVERY ?= 100
# Also finetune the random-connections control (1) or not (0).
CONTROL ?= 0
# Also write the feature browser (1) or not (0).
VIEW ?= 0
ifeq ($(filter help clean,$(MAKECMDGOALS)),)
ifeq ($(MODEL),)
$(error PIPELINE=default: MODEL is required (a local HF folder or a hub id); hint: make all MODEL=... DATA=...)
endif
ifeq ($(DATA),)
$(error PIPELINE=default: DATA is required (.parquet, .jsonl, .jsonl.zst or .txt); hint: make all MODEL=$(MODEL) DATA=...)
endif
endif
