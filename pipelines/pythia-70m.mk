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
# Suite to score and evaluate (a folder or bare .safetensors); required until train-suite lands.
SUITE ?=
