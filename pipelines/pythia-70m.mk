# Preset: Pythia-70M with the reference's settings (docs/MATH.md, "Optimizer and clipping").
# Model: hub id (downloaded into the HF cache when online) or a local folder.
MODEL ?= EleutherAI/pythia-70m
# Data: a local Pile shard (.jsonl.zst, text field `text`).
DATA ?= data/pile-00.jsonl.zst
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
# Finetuning steps (the reference: 50M tokens at batch 256 x 128 = 1525 steps).
STEPS ?= 1525
BATCH ?= 256
