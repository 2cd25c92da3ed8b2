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
# Connections kept per downstream feature.
C ?= 16
# Edges kept per downstream feature in edges.parquet (select-edges can pick any C up to this).
KEEP ?= 64
# Command that turns edges.parquet into connections.parquet; called as
# `$(SELECT) --edges E --c C --out F` (e.g. SELECT="python3 pipelines/select_random.py").
SELECT ?= $(BIN)/select-edges

BIN := target/release
MODEL_NAME := $(notdir $(MODEL))
THREADS_FLAG := $(if $(THREADS),--threads $(THREADS),)
BOS_FLAG := $(if $(filter 1,$(BOS)),--prepend-bos,--no-prepend-bos)
# Output paths are keyed on every parameter of their stage and the stages before it.
ACTS := $(OUT)/acts/$(MODEL_NAME)-ctx$(CTX)-n$(N_SEQS)-bos$(BOS)-$(DTYPE)
SUITE_KEY := $(shell printf '%s' '$(SUITE)' | cksum | cut -d' ' -f1)
EDGES := $(ACTS:$(OUT)/acts/%=$(OUT)/edges/%)-suite$(SUITE_KEY)-keep$(KEEP)
SELECT_KEY := $(shell printf '%s' '$(SELECT)' | cksum | cut -d' ' -f1)
CONN := $(EDGES)-c$(C)-sel$(SELECT_KEY).parquet
EVAL := $(EDGES:$(OUT)/edges/%=$(OUT)/eval/%)-c$(C)-sel$(SELECT_KEY)

.PHONY: all build acts edges connections eval test clean help

## all: activations -> edge scores -> connections (C) -> evaluation of SUITE with them.
all: eval
	@cat $(EVAL)/table.md

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

## edges: score every edge of SUITE on the cache.
edges: $(EDGES)/.done
$(EDGES)/.done: $(ACTS)/.done | build
	$(BIN)/score-edges --acts $(ACTS) --suite $(SUITE) --keep $(KEEP) $(THREADS_FLAG) \
	    --out $(EDGES) --overwrite
	touch $@

## connections: pick C connections per feature with SELECT.
connections: $(CONN)
$(CONN): $(EDGES)/.done | build
	$(SELECT) --edges $(EDGES)/edges.parquet --c $(C) --out $@

## eval: evaluate SUITE with the connections (CE, FVU, L0, dead features).
eval: $(EVAL)/.done
$(EVAL)/.done: $(CONN) | build
	mkdir -p $(dir $(EVAL))
	$(BIN)/evaluate --acts $(ACTS) --suite $(SUITE) --connections $(CONN) $(THREADS_FLAG) \
	    --out $(EVAL) --overwrite > $(EVAL).md.tmp
	mv $(EVAL).md.tmp $(EVAL)/table.md
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
	@$(foreach v,MODEL DATA CTX N_SEQS BOS DTYPE BATCH THREADS SUITE C KEEP SELECT OUT,echo "  $(v) = $($(v))";)
