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
# Sequences per forward pass / training step.
BATCH ?= 16
# Concatenate documents with EOS (1) instead of skipping those shorter than CTX (0).
PACK ?= 0
# CPU threads (empty: all cores).
THREADS ?=
# Features per module = EXPANSION x d_model (train-suite).
EXPANSION ?= 4
# Active features per token (train-suite).
K ?= 32
# Pretraining steps (train-suite).
SUITE_STEPS ?= 1000
# Pretraining base learning rate.
SUITE_LR ?= 2e-4
# Start from this suite instead of pretraining one: a scae suite folder or bare .safetensors,
# or the reference's (a folder with config.json + checkpoint.pt, or its hub id).
SUITE ?=
# Use this connections file (.parquet, .safetensors, the reference's .pkl or .pt) instead of
# scoring edges and selecting C per feature.
CONNECTIONS ?=
# Connections kept per downstream feature.
C ?= 16
# Finetuning loss: mse, ce or mse+ce.
LOSS ?= mse
# Finetuning steps.
STEPS ?= 200
# Finetuning base learning rate.
LR ?= 1e-3
# Proportion of finetuning steps after which the lr decays linearly to 0.
DECAY ?= 0.8
# Edges kept per downstream feature in edges.parquet (select-edges can pick any C up to this).
KEEP ?= 64
# Sparse connections from the token embedding: each feature also keeps its top EMBED_C tokens
# (empty: every feature reads the whole embedding, as the reference; `make all` then also
# runs the dense-embedding pipeline at the same C and reports both).
EMBED_C ?=
# Sparse connections into the unembedding: each output token reads only its top UNEMBED_C
# features in the spliced CE (empty: every feature, as the reference).
UNEMBED_C ?=
# Also finetune and evaluate the random-connections control at C in `make all` (1) or not (0).
CONTROL ?= 0
# Seed of the random connections.
RANDOM_SEED ?= 0
# Also write the feature browser of the finetuned suite in `make all` (1) or not (0).
VIEW ?= 0
# Sequences the feature browser reads (empty: the whole cache).
VIEW_SEQS ?=
# Command that turns edges.parquet into connections.parquet; called as
# `$(SELECT) --edges E --c C [--embed-c EMBED_C] [--unembed-c UNEMBED_C] --out F` (e.g.
# SELECT="python3 pipelines/select_random.py").
SELECT ?= $(BIN)/select-edges

BIN := target/release
MODEL_NAME := $(notdir $(MODEL))
THREADS_FLAG := $(if $(THREADS),--threads $(THREADS),)
BOS_FLAG := $(if $(filter 1,$(BOS)),--prepend-bos,--no-prepend-bos)
PACK_FLAG := $(if $(filter 1,$(PACK)),--pack,)
# Output paths are keyed on every parameter of their stage and the stages before it.
ACTS := $(OUT)/acts/$(MODEL_NAME)-ctx$(CTX)-n$(N_SEQS)-bos$(BOS)-pack$(PACK)-$(DTYPE)
# The suite: pretrained here unless SUITE names one.
TRAINED := $(ACTS:$(OUT)/acts/%=$(OUT)/suite/%)-x$(EXPANSION)-k$(K)-s$(SUITE_STEPS)-lr$(SUITE_LR)
SUITE_PATH := $(if $(SUITE),$(SUITE),$(TRAINED))
SUITE_DEP := $(if $(SUITE),,$(TRAINED)/.done)
SUITE_KEY := $(shell printf '%s' '$(SUITE_PATH)' | cksum | cut -d' ' -f1)
EMBED_KEY := $(if $(EMBED_C),-embed,)$(if $(UNEMBED_C),-unembed,)
ENDS_KEY := $(if $(EMBED_C),-e$(EMBED_C),)$(if $(UNEMBED_C),-u$(UNEMBED_C),)
EDGES := $(ACTS:$(OUT)/acts/%=$(OUT)/edges/%)-suite$(SUITE_KEY)-keep$(KEEP)$(EMBED_KEY)
EMBED_FLAG := $(if $(EMBED_C),--embed-c $(EMBED_C),)$(if $(UNEMBED_C), --unembed-c $(UNEMBED_C),)
SELECT_KEY := $(shell printf '%s' '$(SELECT)' | cksum | cut -d' ' -f1)
# The connections: selected from the edge scores, unless CONNECTIONS names a file.
ifeq ($(CONNECTIONS),all)
$(error CONNECTIONS=all: expected a connections file; for the full pass evaluate with --connections all by hand)
endif
CONN_FILE_KEY := $(shell printf '%s' '$(CONNECTIONS)' | cksum | cut -d' ' -f1)
CONN_KEY := $(if $(CONNECTIONS),conn$(CONN_FILE_KEY),c$(C)$(ENDS_KEY)-sel$(SELECT_KEY))
CONN := $(if $(CONNECTIONS),$(CONNECTIONS),$(EDGES)-c$(C)$(ENDS_KEY)-sel$(SELECT_KEY).parquet)
FT := $(EDGES:$(OUT)/edges/%=$(OUT)/finetune/%)-$(CONN_KEY)-$(LOSS)-s$(STEPS)-lr$(LR)-d$(DECAY)
EVAL0 := $(EDGES:$(OUT)/edges/%=$(OUT)/eval/%)-$(CONN_KEY)-before
EVAL := $(FT:$(OUT)/finetune/%=$(OUT)/eval/%)
# The random-connections control: the same per-module counts at C, random upstream features.
RAND_CONN := $(EDGES)-c$(C)$(ENDS_KEY)-random$(RANDOM_SEED).parquet
FT_RAND := $(EDGES:$(OUT)/edges/%=$(OUT)/finetune/%)-c$(C)$(ENDS_KEY)-random$(RANDOM_SEED)-$(LOSS)-s$(STEPS)-lr$(LR)-d$(DECAY)
EVAL_RAND := $(FT_RAND:$(OUT)/finetune/%=$(OUT)/eval/%)
# The control runs only when the pipeline selects connections itself.
WITH_CONTROL := $(and $(filter 1,$(CONTROL)),$(if $(CONNECTIONS),,1))
# The feature browser of the finetuned suite.
VIEW_DIR := $(FT:$(OUT)/finetune/%=$(OUT)/view/%)$(if $(VIEW_SEQS),-n$(VIEW_SEQS),)
# The report of `make all`: the runs side by side and what they say.
REPORT := $(EVAL:$(OUT)/eval/%=$(OUT)/report/%)$(if $(WITH_CONTROL),-control$(RANDOM_SEED),)
# With EMBED_C or UNEMBED_C, the report also shows the same C with dense ends.
WITH_DENSE := $(if $(EMBED_C)$(UNEMBED_C),$(if $(CONNECTIONS),,1),)
comma := ,

# C values of `make sweep`.
CS ?= 0 4 16 64
SWEEP := $(EDGES:$(OUT)/edges/%=$(OUT)/sweep/%)-$(LOSS)-s$(STEPS)-lr$(LR)-d$(DECAY)
EVAL_ALL := $(EDGES:$(OUT)/edges/%=$(OUT)/eval/%)-all-before

.PHONY: all build toy acts suite edges connections finetune eval view sweep print-eval test clean help

## all: activations -> suite -> edge scores -> connections (C) -> finetune -> evaluation,
## then a report beside the all-connections suite (and, with CONTROL=1, random connections).
all: eval $(EVAL0)/.done $(EVAL_ALL)/.done $(if $(WITH_CONTROL),$(EVAL_RAND)/.done,) $(if $(filter 1,$(VIEW)),$(VIEW_DIR)/.done,)
	@$(if $(WITH_DENSE),$(MAKE) --no-print-directory eval EMBED_C= UNEMBED_C=,true)
	@echo "## before finetuning ($(if $(CONNECTIONS),$(CONNECTIONS),C=$(C)$(if $(EMBED_C),$(comma) EMBED_C=$(EMBED_C),)$(if $(UNEMBED_C),$(comma) UNEMBED_C=$(UNEMBED_C),)))" && cat $(EVAL0)/table.md
	@echo "## after finetuning ($(LOSS), $(STEPS) steps)" && cat $(EVAL)/table.md
	@echo "## report"
	@$(BIN)/evaluate --compare $(EVAL_ALL) $(EVAL0) $(if $(WITH_DENSE),$$($(MAKE) --no-print-directory -s print-eval EMBED_C= UNEMBED_C=),) \
	    $(EVAL) $(if $(WITH_CONTROL),$(EVAL_RAND),) --out $(REPORT)
	@echo "report: $(REPORT)/compare.md"
	@$(if $(wildcard $(SWEEP)/compare.png),echo "sweep plot: $(SWEEP)/compare.png",true)
	@$(if $(filter 1,$(VIEW)),echo "feature browser: $(VIEW_DIR)/index.html",echo "feature browser: make view")


## build: compile the tools (release).
build:
	cargo build --release --workspace

# The toy model and corpus (the toy preset's MODEL and DATA).
TOY := $(OUT)/toy
$(TOY)/.done: | build
	$(BIN)/toy-lm $(THREADS_FLAG) --out $(TOY) --overwrite
	touch $@
$(TOY)/model $(TOY)/corpus.txt: $(TOY)/.done
TOY_DEP := $(if $(filter $(TOY)/%,$(MODEL) $(DATA)),$(TOY)/.done,)

## toy: write the toy corpus and train the toy language model.
toy: $(TOY)/.done

## acts: cache activations of MODEL on DATA.
acts: $(ACTS)/.done
$(ACTS)/.done: $(TOY_DEP) | build
	$(BIN)/collect-acts --model $(MODEL) --data $(DATA) --ctx-len $(CTX) $(BOS_FLAG) $(PACK_FLAG) \
	    --n-seqs $(N_SEQS) --batch-size $(BATCH) --dtype $(DTYPE) $(THREADS_FLAG) \
	    --out $(ACTS) --overwrite
	touch $@

## suite: pretrain a TopK suite on the cache (skipped when SUITE is set).
suite: $(SUITE_DEP)
$(TRAINED)/.done: $(ACTS)/.done | build
	$(BIN)/train-suite --acts $(ACTS) --expansion $(EXPANSION) --k $(K) --steps $(SUITE_STEPS) \
	    --lr $(SUITE_LR) --batch-size $(BATCH) $(THREADS_FLAG) --out $(TRAINED) --overwrite
	touch $@

## edges: score every edge of the suite on the cache.
edges: $(EDGES)/.done
$(EDGES)/.done: $(ACTS)/.done $(SUITE_DEP) | build
	$(BIN)/score-edges --acts $(ACTS) --suite $(SUITE_PATH) --keep $(KEEP) $(if $(EMBED_C),--embed,) $(if $(UNEMBED_C),--unembed,) \
	    $(THREADS_FLAG) --out $(EDGES) --overwrite
	touch $@

## connections: pick C connections per feature with SELECT (or use CONNECTIONS).
connections: $(CONN)
ifeq ($(CONNECTIONS),)
$(CONN): $(EDGES)/.done | build
	$(SELECT) --edges $(EDGES)/edges.parquet --c $(C) $(EMBED_FLAG) --out $@
else
$(CONN):
	@test -f '$@' || { echo "make: CONNECTIONS=$@: no such file" >&2; exit 1; }
endif

ifneq ($(WITH_CONTROL),)
$(RAND_CONN): $(EDGES)/.done | build
	$(BIN)/select-edges --edges $(EDGES)/edges.parquet --c $(C) $(EMBED_FLAG) --random $(RANDOM_SEED) --out $@
endif

$(FT_RAND)/.done: $(RAND_CONN) $(ACTS)/.done $(SUITE_DEP) | build
	$(BIN)/finetune --acts $(ACTS) --suite $(SUITE_PATH) --connections $(RAND_CONN) --loss $(LOSS) \
	    --steps $(STEPS) --lr $(LR) --decay-start $(DECAY) --batch-size $(BATCH) $(THREADS_FLAG) \
	    --out $(FT_RAND) --overwrite
	touch $@

$(EVAL_RAND)/.done: $(FT_RAND)/.done | build
	mkdir -p $(dir $(EVAL_RAND))
	$(BIN)/evaluate --acts $(ACTS) --suite $(FT_RAND) --connections $(RAND_CONN) $(THREADS_FLAG) \
	    --out $(EVAL_RAND) --overwrite > $(EVAL_RAND).md.tmp
	mv $(EVAL_RAND).md.tmp $(EVAL_RAND)/table.md
	touch $@

## finetune: finetune the suite through the pruned pass with the connections.
finetune: $(FT)/.done
$(FT)/.done: $(CONN) $(ACTS)/.done $(SUITE_DEP) | build
	$(BIN)/finetune --acts $(ACTS) --suite $(SUITE_PATH) --connections $(CONN) --loss $(LOSS) \
	    --steps $(STEPS) --lr $(LR) --decay-start $(DECAY) --batch-size $(BATCH) $(THREADS_FLAG) \
	    --out $(FT) --overwrite
	touch $@

## eval: evaluate the finetuned suite with the connections (CE, FVU, L0, dead features).
eval: $(EVAL)/.done
$(EVAL)/.done: $(FT)/.done | build
	mkdir -p $(dir $(EVAL))
	$(BIN)/evaluate --acts $(ACTS) --suite $(FT) --connections $(CONN) $(THREADS_FLAG) \
	    --out $(EVAL) --overwrite > $(EVAL).md.tmp
	mv $(EVAL).md.tmp $(EVAL)/table.md
	touch $@

$(EVAL0)/.done: $(CONN) $(ACTS)/.done $(SUITE_DEP) | build
	mkdir -p $(dir $(EVAL0))
	$(BIN)/evaluate --acts $(ACTS) --suite $(SUITE_PATH) --connections $(CONN) $(THREADS_FLAG) \
	    --out $(EVAL0) --overwrite > $(EVAL0).md.tmp
	mv $(EVAL0).md.tmp $(EVAL0)/table.md
	touch $@

## view: write the feature browser of the finetuned suite (open its index.html).
view: $(VIEW_DIR)/.done
	@echo "feature browser: $(VIEW_DIR)/index.html"
$(VIEW_DIR)/.done: $(FT)/.done | build
	$(BIN)/view-features --acts $(ACTS) --suite $(FT) --connections $(CONN) \
	    $(if $(CONNECTIONS),,--edges $(EDGES)/edges.parquet) $(if $(VIEW_SEQS),--n-seqs $(VIEW_SEQS),) \
	    $(THREADS_FLAG) --out $(VIEW_DIR) --overwrite
	touch $@

## sweep: finetune and evaluate for every C in CS, then compare (table + plot).
sweep: $(EVAL_ALL)/.done $(EVAL0)/.done
	@for c in $(CS); do $(MAKE) --no-print-directory eval C=$$c; done
	$(BIN)/evaluate --compare $(EVAL_ALL) $(EVAL0) \
	    $(foreach c,$(CS),$$($(MAKE) --no-print-directory -s print-eval C=$(c))) --out $(SWEEP)

# The evaluation folder of the current C (used by sweep).
print-eval:
	@echo $(EVAL)

$(EVAL_ALL)/.done: $(ACTS)/.done $(SUITE_DEP) | build
	mkdir -p $(dir $(EVAL_ALL))
	$(BIN)/evaluate --acts $(ACTS) --suite $(SUITE_PATH) --connections all $(THREADS_FLAG) \
	    --out $(EVAL_ALL) --overwrite > $(EVAL_ALL).md.tmp
	mv $(EVAL_ALL).md.tmp $(EVAL_ALL)/table.md
	touch $@

## test: check formatting, build, then run every test in release mode (the CI command).
test: build
	cargo fmt --all --check
	cargo test --release --workspace

## clean: remove pipeline outputs (not the build).
clean:
	rm -rf $(OUT)

## help: list targets and variables with their current values.
help:
	@grep -E '^## ' $(firstword $(MAKEFILE_LIST)) | sed 's/^## /  /'
	@echo
	@echo "Variables (PIPELINE=$(PIPELINE)):"
	@$(foreach v,PIPELINE MODEL DATA CTX N_SEQS BOS PACK DTYPE BATCH THREADS EXPANSION K SUITE_STEPS SUITE_LR SUITE CONNECTIONS C EMBED_C UNEMBED_C KEEP SELECT CONTROL RANDOM_SEED VIEW VIEW_SEQS LOSS STEPS LR DECAY CS OUT,echo "  $(v) = $($(v))";)
