# scae pipeline. `make help` lists the variables and their current values.
# Every stage also runs by hand: see README.md.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := all

# Preset to load from pipelines/<PIPELINE>.mk (toy, tinystories-33m, pythia-70m).
PIPELINE ?= toy
include pipelines/$(PIPELINE).mk

# Where outputs go.
OUT ?= out
# Activation cache storage type (f32, bf16, f16).
DTYPE ?= f32
# Sequences per forward pass.
BATCH ?= 16
# CPU threads (empty: all cores).
THREADS ?=

BIN := target/release
MODEL_NAME := $(notdir $(MODEL))
THREADS_FLAG := $(if $(THREADS),--threads $(THREADS),)
BOS_FLAG := $(if $(filter 1,$(BOS)),--prepend-bos,--no-prepend-bos)
# Output paths are keyed on every parameter of their stage and the stages before it.
ACTS := $(OUT)/acts/$(MODEL_NAME)-ctx$(CTX)-n$(N_SEQS)-bos$(BOS)-$(DTYPE)

.PHONY: all build acts test clean help

## all: run every stage that exists so far (activations).
all: acts
	@echo "cache: $(ACTS)"

## build: compile the tools (release).
build:
	cargo build --release --workspace

## acts: cache activations of MODEL on DATA.
acts: $(ACTS)/.done
$(ACTS)/.done: | build
	$(BIN)/collect-acts --model $(MODEL) --data $(DATA) --ctx-len $(CTX) $(BOS_FLAG) \
	    --n-seqs $(N_SEQS) --batch-size $(BATCH) --dtype $(DTYPE) $(THREADS_FLAG) \
	    --out $(ACTS) --overwrite
	touch $@

## test: build, then run every test in release mode (the CI command).
test: build
	cargo test --release --workspace

## clean: remove pipeline outputs (not the build).
clean:
	rm -rf $(OUT)

## help: list targets and variables with their current values.
help:
	@grep -E '^## ' $(firstword $(MAKEFILE_LIST)) | sed 's/^## /  /'
	@echo
	@echo "Variables (PIPELINE=$(PIPELINE)):"
	@$(foreach v,MODEL DATA CTX N_SEQS BOS DTYPE BATCH THREADS OUT,echo "  $(v) = $($(v))";)
