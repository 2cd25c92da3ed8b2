# Preset: Pythia-70M with the reference's finetuning settings (SPEC §6).
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
# Reference settings: expansion 4, k 64, finetuning lr 1e-3 (decay from 0.8 of the steps).
EXPANSION ?= 4
K ?= 64
LR ?= 1e-3
