# Preset: TinyStories-33M with the reference's settings (docs/MATH.md, "Optimizer and clipping").
# Model: hub id (downloaded into the HF cache when online) or a local folder.
MODEL ?= roneneldan/TinyStories-33M
# Data: a local TinyStories parquet/jsonl file (text column `text`).
DATA ?= data/tinystories-train.parquet
# Tokens per sequence (reference: 128).
CTX ?= 128
# Sequences to cache.
N_SEQS ?= 8192
# The reference's finetuning scripts pass prepend_bos=False.
BOS ?= 0
# Reference suite sizes: expansion 4, k 64.
EXPANSION ?= 4
K ?= 64
# Finetuning: lr 1e-3 (scaled by 1/sqrt(F/2^14)).
LR ?= 1e-3
# run_finetuning.py sets 0.7 but never passes it, so the reference decays from 0.8.
DECAY ?= 0.8
# Finetuning steps (the reference: 100M tokens at batch 256 x 128 = 3051 steps).
STEPS ?= 3051
BATCH ?= 256
