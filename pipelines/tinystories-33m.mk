# Preset: TinyStories-33M with the reference's finetuning settings (SPEC §6).
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
# Reference settings: expansion 4, k 64, finetuning lr 1e-3 (decay from 0.8 of the steps).
EXPANSION ?= 4
K ?= 64
LR ?= 1e-3
