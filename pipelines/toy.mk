# Preset `toy`: the built-in offline default (`make all` without MODEL). `toy-lm` writes a
# synthetic story corpus, held-out stories, and trains a tiny GPT-Neo on the corpus (about two
# minutes on 2 cores, once); every later stage takes seconds.

# Model: the trained toy GPT-Neo (d_model 64, 2 layers, word-level vocabulary).
MODEL ?= $(TOY)/model
# Data: the toy corpus (one story per line; TOY is out/toy, or out/toy-seedN for TOY_SEED=N).
DATA ?= $(TOY)/corpus.txt
# Held-out text for evaluation: stories neither the toy model nor the suites were trained on.
HELDOUT ?= $(TOY)/heldout.txt
# Tokens per sequence (the toy model's n_ctx is 128).
CTX ?= 64
# Sequences to cache for training.
N_SEQS ?= 512
# Held-out sequences to evaluate on.
N_HELDOUT ?= 512
# Prepend BOS to each sequence (1) or not (0).
BOS ?= 1
# Stories are shorter than CTX: concatenate them with EOS (1).
PACK ?= 1
# Sequences per training step.
BATCH ?= 16
# Suite sizes: F = 4 x 64 = 256 features per module, 8 active per token.
EXPANSION ?= 4
K ?= 8
# Pretraining: steps and base lr (x8 by the 1/sqrt(F/2^14) scaling at F 256). Lower rates
# leave fewer features dead (README, "The toy run").
SUITE_STEPS ?= 400
SUITE_LR ?= 3e-4
# Tokens without a non-zero value after which a feature counts as dead (and AuxK, when on,
# trains it): 4 steps of 16 x 64 tokens.
DEAD_THRESHOLD ?= 4096
# Finetuning loss (mse, ce or mse+ce), steps and base lr (x8 at F 256).
LOSS ?= mse
STEPS ?= 200
LR ?= 1e-4
# Proportion of finetuning steps after which the lr decays linearly to 0.
DECAY ?= 0.8
# AuxK weight in finetuning: 1/32, the usual TopK weight (the reference's finetuning has none;
# with it, finetuning through the pruned pass leaves fewer features dead: README, "The toy run").
AUXK ?= 0.03125
# Checkpoint every N steps and resume interrupted runs automatically (empty: none; toy runs
# take seconds).
CKPT_EVERY ?=
# Also finetune the random-connections control (the reference's fake connections).
CONTROL ?= 1
# And write the feature browser (under a second on the toy).
VIEW ?= 1
# The toy's stories name their characters: which features predict a name?
PROMPT ?= Once upon a time there was a little girl named
