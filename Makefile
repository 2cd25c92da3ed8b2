# scae pipeline. `make help` lists the targets and every variable with its comment and value.
# Every stage also runs by hand: see README.md.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := all

# Preset to load from pipelines/<PIPELINE>.mk: toy (the default without MODEL), default (the
# reference's settings for any MODEL; chosen when MODEL is set without PIPELINE),
# tinystories-33m, pythia-70m. Every preset sets every training setting, so none leaks in from
# another.
ifeq ($(origin PIPELINE),undefined)
PIPELINE := $(if $(MODEL),default,toy)
endif
ifeq ($(wildcard pipelines/$(PIPELINE).mk),)
$(error PIPELINE=$(PIPELINE): no pipelines/$(PIPELINE).mk; presets: $(basename $(notdir $(wildcard pipelines/*.mk))))
endif
include pipelines/$(PIPELINE).mk

# Where outputs go.
OUT ?= out
# Activation cache storage type (f32, bf16, f16).
DTYPE ?= f32
# CPU threads (empty: all cores). Results do not depend on it.
THREADS ?=
# Seed of the suite's initialisation (train-suite), of finetuning and of the random control.
SEED ?= 0
# Start from this suite instead of pretraining one: a scae suite folder or bare .safetensors,
# or the reference's (a folder with config.json + checkpoint.pt, or its hub id).
SUITE ?=
# Use this connections file (.parquet, .safetensors, the reference's .pkl or .pt) instead of
# scoring edges and selecting C per feature.
CONNECTIONS ?=
# Connections kept per downstream feature.
C ?= 16
# Edges kept per downstream feature in edges.parquet (select-edges can pick any C up to this).
KEEP ?= 64
# Sparse connections from the token embedding: each feature also keeps its top EMBED_C tokens
# (empty: every feature reads the whole embedding, as the reference; `make all` then also
# runs the dense-embedding pipeline at the same C and reports both).
EMBED_C ?=
# Sparse connections into the unembedding: each output token reads only its top UNEMBED_C
# features in the spliced CE (empty: every feature, as the reference).
UNEMBED_C ?=
# Also finetune the all-connections suite the same way (1), the control the method is judged
# against in the report, or not (0).
DENSE_CONTROL ?= 1
# Also finetune and evaluate the random-connections control at C (1) or not (0).
CONTROL ?= 0
# Seed of the random connections.
RANDOM_SEED ?= $(SEED)
# Also write the feature browser of the finetuned suite in `make all` (1) or not (0).
VIEW ?= 0
# Sequences the feature browser reads (empty: the whole held-out cache).
VIEW_SEQS ?=
# The text `make circuit` attributes through the finetuned suite (the toy preset sets one).
PROMPT ?=
# Command that turns edges.parquet into connections.parquet; called as
# `$(SELECT) --edges E --c C [--embed-c EMBED_C] [--unembed-c UNEMBED_C] --out F` (e.g.
# SELECT="python3 pipelines/select_random.py"); or `learned`: learn-connections learns C of
# the KEEP candidates with hard-concrete gates for the suite (frozen), LEARN_STEPS steps.
SELECT ?= $(BIN)/select-edges
# learn-connections (SELECT=learned): steps, the weight of its expected-L0 penalty, and its
# loss (with UNEMBED_C, mse+ce: the CE learns the unembed candidates; the FVU does not read them).
LEARN_STEPS ?= $(STEPS)
LAMBDA ?= 0.01
LEARN_LOSS ?= $(if $(UNEMBED_C),mse+ce,mse)
# C values of `make sweep`.
CS ?= 0 4 16 64
# Seed of the toy corpus and toy model (toy preset).
TOY_SEED ?= 0
# Build the tools before running stages (1), or use the binaries in target/release as they are
# (0; the tests do).
BUILD ?= 1
# Build the tools with the MPI collectives (1; needs an MPI library and libclang), or without (0).
MPI ?= 0
# Ranks of every heavy stage (collect-acts, train-suite, score-edges, finetune, evaluate,
# view-features): above 1 they run under $(LAUNCH) (needs MPI=1).
# The result equals one process's up to the order of floating-point sums (README, "Beyond one
# machine"); NP enters the output's key.
NP ?= 1
# How a stage is started on NP ranks (e.g. LAUNCH="srun -n 8" under Slurm, or mpirun with
# --hostfile for several machines).
LAUNCH ?= mpirun --bind-to none -n $(NP)

# Where the tools are (another folder of the same tools, e.g. wrappers that run them under an
# emulated CPU: scripts/toy-seeds.sh).
BIN ?= target/release
BUILD_DEP := $(if $(filter 1,$(BUILD)),build,)
MODEL_NAME := $(notdir $(patsubst %/,%,$(MODEL)))
THREADS_FLAG := $(if $(THREADS),--threads $(THREADS),)
RANKS := $(if $(filter-out 1,$(NP)),$(LAUNCH) ,)
# NP in the keys of the stages whose results depend on the order of sums (not collect-acts and
# view-features, which write one process's bytes on any NP).
NP_KEY := $(if $(filter-out 1,$(NP)), np=$(NP))
BOS_FLAG := $(if $(filter 1,$(BOS)),--prepend-bos,--no-prepend-bos)
PACK_FLAG := $(if $(filter 1,$(PACK)),--pack,)
CKPT_FLAG := $(if $(CKPT_EVERY),--checkpoint-every $(CKPT_EVERY),)
comma := ,

# ---- Output keys. Every output path is keyed on everything that determines it: the inputs by
# identity (scripts/identity.sh: resolved path, and every file's size and modification time;
# a hub id by its name; the toy's files by the toy's settings, since they do not exist before
# the toy is made) and every setting of the stage and of the stages before it. The path starts
# with readable settings and ends with a hash of all of them.
TOY := $(OUT)/toy$(if $(filter 0,$(TOY_SEED)),,-seed$(TOY_SEED))
TOY_ID := toy-seed$(TOY_SEED)-v2
# Single quotes inside a value are escaped for the shell; an empty identity (a failed shell
# command) stops make rather than keying two inputs alike.
squote = '$(subst ','\'',$(1))'
ident_of = $(if $(filter $(TOY)/%,$(1)),$(TOY_ID):$(notdir $(1)),$(shell scripts/identity.sh $(call squote,$(1))))
ident = $(or $(call ident_of,$(1)),$(error cannot compute the identity of '$(1)' (scripts/identity.sh)))
key = $(or $(shell printf '%s' $(call squote,$(strip $(1))) | md5sum | cut -c1-10),$(error cannot compute a key (md5sum)))

MODEL_ID := $(call ident,$(MODEL))
DATA_ID := $(call ident,$(DATA))
SEQ_ARGS := model=$(MODEL_ID) ctx=$(CTX) bos=$(BOS) pack=$(PACK) dtype=$(DTYPE)
ACTS_ARGS := $(SEQ_ARGS) data=$(DATA_ID) n=$(N_SEQS)
ACTS := $(OUT)/acts/$(MODEL_NAME)-n$(N_SEQS)-$(call key,$(ACTS_ARGS))
# Held-out tokens: HELDOUT's text, or the sequences of DATA after the training ones.
HELD_ARGS := $(SEQ_ARGS) n=$(N_HELDOUT) $(if $(HELDOUT),data=$(call ident,$(HELDOUT)),data=$(DATA_ID) skip=$(N_SEQS))
HACTS := $(OUT)/acts/$(MODEL_NAME)-heldout-n$(N_HELDOUT)-$(call key,$(HELD_ARGS))
HELD_DATA := $(if $(HELDOUT),--data $(HELDOUT),--data $(DATA) --skip-seqs $(N_SEQS))
TRAIN_ARGS := $(ACTS_ARGS) x=$(EXPANSION) k=$(K) steps=$(SUITE_STEPS) lr=$(SUITE_LR) batch=$(BATCH) seed=$(SEED) dead=$(DEAD_THRESHOLD)$(NP_KEY)
TRAINED := $(OUT)/suite/$(MODEL_NAME)-x$(EXPANSION)-k$(K)-s$(SUITE_STEPS)-$(call key,$(TRAIN_ARGS))
SUITE_PATH := $(if $(SUITE),$(SUITE),$(TRAINED))
SUITE_DEP := $(if $(SUITE),,$(TRAINED)/.done)
SUITE_ARGS := $(if $(SUITE),suite=$(call ident,$(SUITE)),$(TRAIN_ARGS))
# Edge scores: with embed ($(1) non-empty) and unembed ($(2) non-empty) candidates, or without
# (the dense-ends runs beside sparse ones score their own).
edges_args = $(SUITE_ARGS) acts=$(ACTS_ARGS) keep=$(KEEP) embed=$(if $(1),1,0) unembed=$(if $(2),1,0)$(NP_KEY)
edges_dir = $(OUT)/edges/$(MODEL_NAME)-keep$(KEEP)$(if $(1),-embed,)$(if $(2),-unembed,)-$(call key,$(call edges_args,$(1),$(2)))
EDGES := $(call edges_dir,$(EMBED_C),$(UNEMBED_C))
# A selection script's own file counts by identity (not the tools in BIN: a rebuild reruns nothing).
LEARNED := $(filter learned,$(SELECT))
SELECT_ID := select=$(SELECT)$(foreach w,$(filter-out $(BIN)/% learned,$(SELECT)),$(if $(wildcard $(w)),:$(call ident,$(w))))
# What learned connections depend on besides the edges: the suite, its cache and the run.
LEARN_ID := acts=$(ACTS_ARGS) suite=$(SUITE_ARGS) steps=$(LEARN_STEPS) lambda=$(LAMBDA) batch=$(BATCH) seed=$(SEED)$(if $(filter-out mse,$(LEARN_LOSS)), loss=$(LEARN_LOSS),)
FT_ARGS := acts=$(ACTS_ARGS) loss=$(LOSS) steps=$(STEPS) lr=$(LR) decay=$(DECAY) batch=$(BATCH) seed=$(SEED) auxk=$(AUXK) dead=$(DEAD_THRESHOLD)$(NP_KEY)
FT_NAME := $(LOSS)-s$(STEPS)-lr$(LR)
CONN_IDENT := $(if $(CONNECTIONS),conns=$(call ident,$(CONNECTIONS)),)
ifeq ($(CONNECTIONS),all)
$(error CONNECTIONS=all: expected a connections file; the all-connections suite is always evaluated, and DENSE_CONTROL=1 finetunes it)
endif

# One configuration of connections: $(1) C, $(2) EMBED_C, $(3) UNEMBED_C; $(4) `top` or
# `random`. Defines CONN_<tag>, FT_<tag> and the rules that make them.
ends_tag = $(if $(2),-e$(2),)$(if $(3),-u$(3),)
tag = $(4)$(1)$(call ends_tag,$(1),$(2),$(3))
define CONN_RULES
CONN_ARGS_$(call tag,$(1),$(2),$(3),$(4)) := $(call edges_args,$(2),$(3)) c=$(1) embed_c=$(2) unembed_c=$(3) $(if $(filter random,$(4)),random=$(RANDOM_SEED),$(if $(filter learned,$(4)),learned $(LEARN_ID),$(SELECT_ID)))
CONN_$(call tag,$(1),$(2),$(3),$(4)) := $(if $(CONNECTIONS),$(CONNECTIONS),$(OUT)/conns/$(MODEL_NAME)-$(call tag,$(1),$(2),$(3),$(4))-$$(call key,$$(CONN_ARGS_$(call tag,$(1),$(2),$(3),$(4)))).parquet)
FT_$(call tag,$(1),$(2),$(3),$(4)) := $(OUT)/finetune/$(MODEL_NAME)-$(call tag,$(1),$(2),$(3),$(4))-$(FT_NAME)-$$(call key,$$(CONN_ARGS_$(call tag,$(1),$(2),$(3),$(4))) $(if $(CONNECTIONS),conns=$(call ident,$(CONNECTIONS)),) $(FT_ARGS))
ifeq ($(CONNECTIONS),)
$$(CONN_$(call tag,$(1),$(2),$(3),$(4))): $(call edges_dir,$(2),$(3))/.done $(if $(filter learned,$(4)),$(ACTS)/.done $(SUITE_DEP),) | $(BUILD_DEP)
	@mkdir -p $$(@D)
	rm -rf $$@.tmp.parquet $$@.learn
	$(if $(filter learned,$(4)),$(call learn,$(call edges_dir,$(2),$(3))/edges.parquet,$(1),$$@,$(3)),$(if $(filter random,$(4)),$(BIN)/select-edges,$(SELECT)) --edges $(call edges_dir,$(2),$(3))/edges.parquet --c $(1) $(if $(2),--embed-c $(2),) $(if $(3),--unembed-c $(3),) $(if $(filter random,$(4)),--random $(RANDOM_SEED),) --out $$@.tmp.parquet)
	mv $$@.tmp.parquet $$@
endif
$$(FT_$(call tag,$(1),$(2),$(3),$(4)))/.done: $$(CONN_$(call tag,$(1),$(2),$(3),$(4))) $(ACTS)/.done $(SUITE_DEP) | $(BUILD_DEP)
	$$(call finetune,$$(@D),$$(CONN_$(call tag,$(1),$(2),$(3),$(4))))
	touch $$@
endef

# Learn C=$(2) connections (and UNEMBED_C=$(4) per output token) among the candidates of edges
# file $(1) for the suite (frozen) into $(3).tmp.parquet (the run's folder $(3).learn is kept
# beside it for its metrics).
define learn
$(BIN)/learn-connections --acts $(ACTS) --suite $(SUITE_PATH) --edges $(1) --c $(2) --freeze-suite \
    $(if $(4),--unembed-c $(4),) --loss $(LEARN_LOSS) \
    --steps $(LEARN_STEPS) --lambda $(LAMBDA) --batch-size $(BATCH) --seed $(SEED) $(THREADS_FLAG) \
    --out $(3).learn > /dev/null && cp $(3).learn/connections.parquet $(3).tmp.parquet
endef

# Finetune the suite into $(1) with connections $(2) (a file, or `all`), the run's settings;
# with CKPT_EVERY, a run whose checkpoint is there resumes instead of starting over.
define finetune
@mkdir -p $(dir $(1))
$(RANKS)$(BIN)/finetune --acts $(ACTS) --suite $(SUITE_PATH) --connections $(2) --loss $(LOSS) \
    --steps $(STEPS) --lr $(LR) --decay-start $(DECAY) --batch-size $(BATCH) --seed $(SEED) \
    --auxk-alpha $(AUXK) --dead-threshold $(DEAD_THRESHOLD) $(THREADS_FLAG) $(CKPT_FLAG) \
    --out $(1) $$(test -f $(1)/checkpoint/state.json -o -f $(1)/checkpoint.tmp/state.json && echo --resume || echo --overwrite)
endef

# Evaluate: $(1) name, $(2) suite, $(3) its prerequisite, $(4) --connections, $(5) its
# prerequisite. Defines EV_<name>_heldout and EV_<name>_train (held-out and training tokens).
define EVAL_RULES
EV_$(1)_heldout := $(OUT)/eval/$(MODEL_NAME)-$(1)-heldout-$$(call key,$(2) $(4) $(HELD_ARGS) $(SUITE_ARGS) $(CONN_IDENT)$(NP_KEY))
EV_$(1)_train := $(OUT)/eval/$(MODEL_NAME)-$(1)-train-$$(call key,$(2) $(4) $(ACTS_ARGS) $(SUITE_ARGS) $(CONN_IDENT)$(NP_KEY))
$$(EV_$(1)_heldout)/.done: $(3) $(5) $(HACTS)/.done | $(BUILD_DEP)
	$$(call evaluate,$$(@D),$(HACTS),$(2),$(4))
$$(EV_$(1)_train)/.done: $(3) $(5) $(ACTS)/.done | $(BUILD_DEP)
	$$(call evaluate,$$(@D),$(ACTS),$(2),$(4))
endef

define evaluate
@mkdir -p $(dir $(1))
$(RANKS)$(BIN)/evaluate --acts $(2) --suite $(3) $(if $(4),--connections $(4),) $(THREADS_FLAG) --out $(1) --overwrite > $(1).md.tmp
mv $(1).md.tmp $(1)/table.md
touch $(1)/.done
endef

# The configurations `make all` and `make sweep` need: C with its ends, the same C with dense
# ends when EMBED_C/UNEMBED_C are set, every C of CS, and the random control.
WITH_DENSE := $(if $(EMBED_C)$(UNEMBED_C),$(if $(CONNECTIONS),,1),)
WITH_CONTROL := $(and $(filter 1,$(CONTROL)),$(if $(CONNECTIONS),,1))
# The main connections' kind: the top C by score, or learned (SELECT=learned).
KIND := $(if $(LEARNED),learned,top)
CONFIGS := $(sort $(KIND):$(C):$(EMBED_C):$(UNEMBED_C) $(if $(WITH_DENSE),$(KIND):$(C)::) \
    $(if $(CONNECTIONS),,$(foreach c,$(CS),$(KIND):$(c):$(EMBED_C):$(UNEMBED_C))) \
    $(if $(WITH_CONTROL),random:$(C):$(EMBED_C):$(UNEMBED_C)))
cfg = $(word $(2),$(subst :, ,$(subst ::,:-:,$(subst ::,:-:,$(1)))))
cfg_arg = $(patsubst -,,$(call cfg,$(1),$(2)))
tag_of = $(call tag,$(call cfg_arg,$(1),2),$(call cfg_arg,$(1),3),$(call cfg_arg,$(1),4),$(call cfg_arg,$(1),1))
$(foreach x,$(CONFIGS),$(eval $(call CONN_RULES,$(call cfg_arg,$(x),2),$(call cfg_arg,$(x),3),$(call cfg_arg,$(x),4),$(call cfg_arg,$(x),1))))

MAIN := $(call tag,$(C),$(EMBED_C),$(UNEMBED_C),$(KIND))
DENSE := $(call tag,$(C),,,$(KIND))
RAND := $(call tag,$(C),$(EMBED_C),$(UNEMBED_C),random)
FT := $(FT_$(MAIN))
CONN := $(CONN_$(MAIN))

# The all-connections suite finetuned the same way (the control of the report).
FT_ALL := $(OUT)/finetune/$(MODEL_NAME)-all-$(FT_NAME)-$(call key,$(SUITE_ARGS) $(FT_ARGS))
$(FT_ALL)/.done: $(ACTS)/.done $(SUITE_DEP) | $(BUILD_DEP)
	$(call finetune,$(@D),all)
	touch $@

$(eval $(call EVAL_RULES,all-before,$(SUITE_PATH),$(SUITE_DEP),all,))
$(eval $(call EVAL_RULES,all-finetuned,$(FT_ALL),$(FT_ALL)/.done,,))
# A finetuned suite is evaluated with the connections it stores (those it was trained with).
$(foreach x,$(CONFIGS),$(eval $(call EVAL_RULES,$(call tag_of,$(x))-finetuned,$(FT_$(call tag_of,$(x))),$(FT_$(call tag_of,$(x)))/.done,,$(CONN_$(call tag_of,$(x))))))
$(eval $(call EVAL_RULES,$(MAIN)-before,$(SUITE_PATH),$(SUITE_DEP),$(CONN),$(CONN)))

both = $(EV_$(1)_heldout) $(EV_$(1)_train)
EVAL := $(EV_$(MAIN)-finetuned_heldout)
EVAL0 := $(EV_$(MAIN)-before_heldout)
REPORT_EVALS := $(call both,all-before) $(call both,$(MAIN)-before) $(call both,$(MAIN)-finetuned) \
    $(if $(filter 1,$(DENSE_CONTROL)),$(call both,all-finetuned)) \
    $(if $(WITH_DENSE),$(call both,$(DENSE)-finetuned)) $(if $(WITH_CONTROL),$(call both,$(RAND)-finetuned))
REPORT := $(OUT)/report/$(MODEL_NAME)-$(MAIN)-$(FT_NAME)-$(call key,$(REPORT_EVALS))
SWEEP_EVALS := $(call both,all-before) $(call both,$(MAIN)-before) \
    $(if $(filter 1,$(DENSE_CONTROL)),$(call both,all-finetuned)) \
    $(foreach c,$(CS),$(call both,$(call tag,$(c),$(EMBED_C),$(UNEMBED_C),$(KIND))-finetuned))
SWEEP := $(OUT)/sweep/$(MODEL_NAME)-$(FT_NAME)-$(call key,$(SWEEP_EVALS))
# The feature browser of the finetuned suite, on held-out tokens.
VIEW_DIR := $(OUT)/view/$(MODEL_NAME)-$(MAIN)-$(FT_NAME)$(if $(VIEW_SEQS),-n$(VIEW_SEQS),)-$(call key,$(FT) $(HELD_ARGS) $(EDGES) $(CONN_IDENT))
# The attribution graph of PROMPT through the finetuned suite, and a feature browser that draws it.
CIRCUIT := $(OUT)/circuit/$(MODEL_NAME)-$(MAIN)-$(FT_NAME)$(if $(VIEW_SEQS),-n$(VIEW_SEQS),)-$(call key,$(FT) $(HELD_ARGS) $(EDGES) $(CONN_IDENT) prompt=$(PROMPT))

.PHONY: all settings build test-mpi toy acts heldout suite edges connections finetune eval view circuit sweep test clean help \
    paths print-report-evals print-sweep-evals

## all: activations -> suite -> edge scores -> connections (C) -> finetune -> evaluation on
## held-out and training tokens, then a report beside the all-connections suite finetuned the
## same way (and, with CONTROL=1, random connections).
all: settings $(REPORT)/.done $(if $(filter 1,$(VIEW)),$(VIEW_DIR)/.done,)
	@echo "## before finetuning ($(if $(CONNECTIONS),$(CONNECTIONS),C=$(C)$(if $(EMBED_C),$(comma) EMBED_C=$(EMBED_C),)$(if $(UNEMBED_C),$(comma) UNEMBED_C=$(UNEMBED_C),)), held-out tokens)" && cat $(EVAL0)/table.md
	@echo "## after finetuning ($(LOSS), $(STEPS) steps, held-out tokens)" && cat $(EVAL)/table.md
	@echo "## report" && cat $(REPORT)/compare.md
	@echo "report: $(REPORT)/compare.md (plot: compare.png)"
	@$(if $(filter 1,$(VIEW)),echo "feature browser: $(VIEW_DIR)/index.html",echo "feature browser: make view")

$(REPORT)/.done: $(addsuffix /.done,$(REPORT_EVALS)) | $(BUILD_DEP)
	$(BIN)/evaluate --compare $(REPORT_EVALS) --out $(@D) > /dev/null
	touch $@

## settings: print the preset and the settings every stage runs with (`make all` starts so).
HELP_VARS := PIPELINE MODEL DATA HELDOUT CTX N_SEQS N_HELDOUT BOS PACK DTYPE BATCH THREADS SEED \
    EXPANSION K SUITE_STEPS SUITE_LR DEAD_THRESHOLD SUITE CONNECTIONS C KEEP EMBED_C UNEMBED_C SELECT \
    LOSS STEPS LR DECAY AUXK CKPT_EVERY DENSE_CONTROL CONTROL RANDOM_SEED LEARN_STEPS LAMBDA LEARN_LOSS VIEW VIEW_SEQS PROMPT CS TOY_SEED OUT BIN BUILD MPI NP LAUNCH
settings:
	@echo "make: preset $(PIPELINE) (pipelines/$(PIPELINE).mk)$(if $(filter command line environment,$(origin MODEL)),$(comma) MODEL from the $(origin MODEL),)"
	@echo "  data: MODEL=$(MODEL) DATA=$(DATA) HELDOUT=$(if $(HELDOUT),$(HELDOUT),<DATA after $(N_SEQS) sequences>) CTX=$(CTX) N_SEQS=$(N_SEQS) N_HELDOUT=$(N_HELDOUT) BOS=$(BOS) PACK=$(PACK) DTYPE=$(DTYPE)"
	@echo "  suite: $(if $(SUITE),SUITE=$(SUITE),EXPANSION=$(EXPANSION) K=$(K) SUITE_STEPS=$(SUITE_STEPS) SUITE_LR=$(SUITE_LR)) BATCH=$(BATCH) SEED=$(SEED) DEAD_THRESHOLD=$(DEAD_THRESHOLD)"
	@echo "  connections: $(if $(CONNECTIONS),CONNECTIONS=$(CONNECTIONS),C=$(C) KEEP=$(KEEP) EMBED_C=$(EMBED_C) UNEMBED_C=$(UNEMBED_C) SELECT=$(SELECT))"
	@echo "  finetune: LOSS=$(LOSS) STEPS=$(STEPS) LR=$(LR) DECAY=$(DECAY) AUXK=$(AUXK) CKPT_EVERY=$(CKPT_EVERY); controls: DENSE_CONTROL=$(DENSE_CONTROL) CONTROL=$(CONTROL)$(if $(filter-out 1,$(NP)),; on NP=$(NP) ranks: $(LAUNCH))"

## build: compile the tools (release); MPI=1 with the MPI collectives (needs an MPI library and libclang).
build:
	cargo build --release --workspace $(if $(filter 1,$(MPI)),--features scae/mpi,)

## test-mpi: the MPI collectives on two ranks (needs mpirun, an MPI library and libclang).
test-mpi:
	cargo test --release -p scae --features mpi --test collective_mpi

# The toy model and corpus (the toy preset's MODEL, DATA and HELDOUT).
$(TOY)/.done: | $(BUILD_DEP)
	$(BIN)/toy-lm $(THREADS_FLAG) --seed $(TOY_SEED) --out $(TOY) --overwrite
	touch $@
$(TOY)/model $(TOY)/corpus.txt $(TOY)/heldout.txt: $(TOY)/.done
TOY_DEP := $(if $(filter $(TOY)/%,$(MODEL) $(DATA) $(HELDOUT)),$(TOY)/.done,)

## toy: write the toy corpus and held-out stories and train the toy language model.
toy: $(TOY)/.done

## acts: cache activations of MODEL on DATA (training tokens).
acts: $(ACTS)/.done
$(ACTS)/.done: $(TOY_DEP) | $(BUILD_DEP)
	$(RANKS)$(BIN)/collect-acts --model $(MODEL) --data $(DATA) --ctx-len $(CTX) $(BOS_FLAG) $(PACK_FLAG) \
	    --n-seqs $(N_SEQS) --batch-size $(BATCH) --dtype $(DTYPE) $(THREADS_FLAG) \
	    --out $(@D) --overwrite
	touch $@

## heldout: cache activations of MODEL on held-out text (HELDOUT, or DATA after N_SEQS).
heldout: $(HACTS)/.done
$(HACTS)/.done: $(TOY_DEP) | $(BUILD_DEP)
	$(RANKS)$(BIN)/collect-acts --model $(MODEL) $(HELD_DATA) --ctx-len $(CTX) $(BOS_FLAG) $(PACK_FLAG) \
	    --n-seqs $(N_HELDOUT) --batch-size $(BATCH) --dtype $(DTYPE) $(THREADS_FLAG) \
	    --out $(@D) --overwrite
	touch $@

## suite: pretrain a TopK suite on the cache (skipped when SUITE is set).
suite: $(SUITE_DEP)
$(TRAINED)/.done: $(ACTS)/.done | $(BUILD_DEP)
	$(RANKS)$(BIN)/train-suite --acts $(ACTS) --expansion $(EXPANSION) --k $(K) --steps $(SUITE_STEPS) \
	    --lr $(SUITE_LR) --batch-size $(BATCH) --seed $(SEED) --dead-threshold $(DEAD_THRESHOLD) \
	    $(THREADS_FLAG) $(CKPT_FLAG) --out $(@D) \
	    $$(test -f $(@D)/checkpoint/state.json -o -f $(@D)/checkpoint.tmp/state.json && echo --resume || echo --overwrite)
	touch $@

## edges: score every edge of the suite on the cache.
edges: $(EDGES)/.done
# $(1): embed candidates, $(2): unembed candidates (non-empty: scored).
define EDGES_RULE
$(call edges_dir,$(1),$(2))/.done: $(ACTS)/.done $(SUITE_DEP) | $(BUILD_DEP)
	$(RANKS)$(BIN)/score-edges --acts $(ACTS) --suite $(SUITE_PATH) --keep $(KEEP) $(if $(1),--embed,) $(if $(2),--unembed,) \
	    $(THREADS_FLAG) --out $$(@D) --overwrite
	touch $$@
endef
$(eval $(call EDGES_RULE,$(EMBED_C),$(UNEMBED_C)))
$(if $(WITH_DENSE),$(eval $(call EDGES_RULE,,)))

## connections: pick C connections per feature with SELECT (or use CONNECTIONS).
connections: $(CONN)
ifneq ($(CONNECTIONS),)
$(CONNECTIONS):
	@test -f '$@' || { echo "make: CONNECTIONS=$@: no such file" >&2; exit 1; }
endif

## finetune: finetune the suite through the pruned pass with the connections.
finetune: $(FT)/.done

## eval: evaluate the finetuned suite on held-out and training tokens.
eval: $(EVAL)/.done $(EV_$(MAIN)-finetuned_train)/.done
	@cat $(EVAL)/table.md

## view: write the feature browser of the finetuned suite on held-out tokens (open its index.html).
view: $(VIEW_DIR)/.done
	@echo "feature browser: $(VIEW_DIR)/index.html"
$(VIEW_DIR)/.done: $(FT)/.done $(HACTS)/.done | $(BUILD_DEP)
	$(RANKS)$(BIN)/view-features --acts $(HACTS) --suite $(FT) \
	    $(if $(CONNECTIONS),,--edges $(EDGES)/edges.parquet) $(if $(VIEW_SEQS),--n-seqs $(VIEW_SEQS),) \
	    $(THREADS_FLAG) --out $(@D) --overwrite
	touch $@

## circuit: the exact attribution graph of PROMPT through the finetuned suite (attribute,
## pruned as circuit-tracer prunes), drawn in a feature browser of held-out tokens (open the
## printed graph.html).
circuit: $(CIRCUIT)/.done
	@echo "graph: $(CIRCUIT)/graphs/circuit.json"
	@echo "graph view: $(CIRCUIT)/view/graph.html#circuit"
$(CIRCUIT)/.done: $(FT)/.done $(HACTS)/.done | $(BUILD_DEP)
	$(if $(PROMPT),,$(error make circuit: set PROMPT, e.g. make circuit PROMPT="Once upon a time"))
	$(BIN)/attribute --suite $(FT) --prompt $(call squote,$(PROMPT)) $(if $(filter 1,$(BOS)),,--no-prepend-bos) \
	    --slug circuit $(THREADS_FLAG) --out $(@D)/graphs
	$(RANKS)$(BIN)/view-features --acts $(HACTS) --suite $(FT) --graphs $(@D)/graphs \
	    $(if $(CONNECTIONS),,--edges $(EDGES)/edges.parquet) $(if $(VIEW_SEQS),--n-seqs $(VIEW_SEQS),) \
	    $(THREADS_FLAG) --out $(@D)/view --overwrite
	touch $@

## sweep: finetune and evaluate for every C in CS, then compare (table + plot).
sweep: settings $(SWEEP)/.done
	@cat $(SWEEP)/compare.md
	@echo "sweep plot: $(SWEEP)/compare.png"
$(SWEEP)/.done: $(addsuffix /.done,$(SWEEP_EVALS)) | $(BUILD_DEP)
	$(BIN)/evaluate --compare $(SWEEP_EVALS) --out $(@D) > /dev/null
	touch $@

## paths: print where each stage of this configuration writes.
paths:
	@printf '%s\n' "acts: $(ACTS)" "heldout: $(HACTS)" "suite: $(SUITE_PATH)" "edges: $(EDGES)" \
	    "connections: $(CONN)" "finetune: $(FT)" "finetune, all connections: $(FT_ALL)" \
	    "eval: $(EVAL)" "report: $(REPORT)"

# The evaluation folders the report and the sweep read (scripts/toy-seeds.sh).
print-report-evals:
	@echo $(REPORT_EVALS)
print-sweep-evals:
	@echo $(SWEEP_EVALS)

## test: check formatting, build, then run every test in release mode (the CI command; MPI=1 also tests the MPI collectives on two ranks).
test: build
	cargo fmt --all --check
	cargo test --release --workspace $(if $(filter 1,$(MPI)),--features scae/mpi,)

## clean: remove pipeline outputs (not the build).
clean:
	rm -rf $(OUT)

## help: list the targets, then every variable with its current value and comment.
help:
	@grep -E '^## ' $(firstword $(MAKEFILE_LIST)) | sed 's/^## /  /'
	@echo
	@echo "Variables (preset $(PIPELINE): pipelines/$(PIPELINE).mk; set any on the command line, e.g. make all C=8):"
	@awk -v vars="$(HELP_VARS)" -v values_file=/dev/stdin -f scripts/make-help.awk $(firstword $(MAKEFILE_LIST)) \
	    $(filter pipelines/default.mk,$(MAKEFILE_LIST)) $(filter-out pipelines/default.mk,$(filter pipelines/%,$(MAKEFILE_LIST))) \
	    < <(printf '%s\n' $(foreach v,$(HELP_VARS),'$(v)=$($(v))'))
