# Preset `tinystories-33m`: TinyStories-33M with the reference's settings (pipelines/default.mk,
# docs/MATH.md "Optimizer and clipping").

# Model: hub id (downloaded into the HF cache when online) or a local folder.
MODEL ?= roneneldan/TinyStories-33M
# Data: a local TinyStories parquet/jsonl file (text column `text`).
DATA ?= data/tinystories-train.parquet
# Finetuning steps (the reference: 100M tokens at 256 x 128 = 3051 steps).
STEPS ?= 3051
include pipelines/default.mk
