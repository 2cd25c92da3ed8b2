# Preset `pythia-70m`: Pythia-70M with the reference's settings (pipelines/default.mk,
# docs/MATH.md "Optimizer and clipping").

# Model: hub id (downloaded into the HF cache when online) or a local folder.
MODEL ?= EleutherAI/pythia-70m
# Data: a local Pile shard (.jsonl.zst, text field `text`).
DATA ?= data/pile-00.jsonl.zst
# Finetuning steps (the reference: 50M tokens at 256 x 128 = 1525 steps).
STEPS ?= 1525
include pipelines/default.mk
