#!/usr/bin/env bash
# Every stage at a real model shape, without Python: a randomly initialised model of a real
# model's exact config and vocabulary size (examples/random_model: SHAPE=tinystories-33m,
# pythia-70m or gpt2-small), driven by the toy corpus and its word-level tokenizer (all its ids
# lie inside the real vocabulary, so the unembedding has its real cost); a cache of its
# activations, a suite, edge scores, finetuning at C and evaluation — each timed with its peak
# RSS — and the dense-product floor of one finetuning step measured in the same run
# (examples/gemm_floor), with evaluate's cost per further batch and collect-acts' time against
# their own floors (the pruned forward's products + one unembedding; the model's products + two
# unembeddings). A cost per further batch is measured inside the process (SCAE_PROFILE's batch
# lines, the batches after the first), the difference of a whole run and a one-batch run
# printed beside it. (Those runs print a few profile lines per batch; their cost is nil beside
# a batch's.) SHAPE=toy uses `toy-lm --steps 0` at D HEADS LAYERS instead (GPT-Neo,
# the toy corpus's ~100-word vocabulary).
#
#   bench/real-shapes.sh [OUT]   (env: SHAPE EXPANSION K CS SEQS THREADS TRAIN_STEPS FT_STEPS
#                                  SCORE_SEQS EVAL_SEQS LEARN_STEPS LEARN_SEQS BROWSE; D HEADS LAYERS
#                                  for SHAPE=toy)
#
# Prints a markdown table; needs `cargo build --release --workspace --bins --examples` (with
# `--examples` alone cargo builds no tools). After `cargo build --release --example gemm_floor
# --features scae/openblas` (libopenblas-dev) the floors are also timed with OpenBLAS, side by
# side, and each ratio is taken against the faster of the two kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/scae-real-shapes}
SHAPE=${SHAPE:-tinystories-33m}
case $SHAPE in
    tinystories-33m) D=768 HEADS=16 LAYERS=4 V=50257 ;;
    pythia-70m) D=512 HEADS=8 LAYERS=6 V=50304 ;;
    gpt2-small) D=768 HEADS=12 LAYERS=12 V=50257 ;;
    toy) D=${D:-768} HEADS=${HEADS:-16} LAYERS=${LAYERS:-4} V=0 ;;
    *) echo "real-shapes.sh: SHAPE=$SHAPE: expected tinystories-33m, pythia-70m, gpt2-small or toy" >&2; exit 2 ;;
esac
EXPANSION=${EXPANSION:-4}
K=${K:-64}
CS=${CS:-16 64}
# Sequences of 128 tokens per training step.
SEQS=${SEQS:-8}
THREADS=${THREADS:-2}
TRAIN_STEPS=${TRAIN_STEPS:-40}
FT_STEPS=${FT_STEPS:-6}
# Sequences scored by score-edges (0: random connections instead) and evaluated by evaluate.
SCORE_SEQS=${SCORE_SEQS:-16}
EVAL_SEQS=${EVAL_SEQS:-16}
# BROWSE=0: no attribute or view-features runs (at GPT-2 small F 24,576 the logit lens alone is
# ~11 T multiply-adds).
BROWSE=${BROWSE:-1}
BIN=target/release
F=$((EXPANSION * D))
export RAYON_NUM_THREADS=$THREADS
mkdir -p "$OUT"
rows=()
# run NAME TOKENS CMD...: time CMD; record seconds, tokens/s and peak RSS.
run() {
    local name=$1 tokens=$2
    shift 2
    /usr/bin/time -f "%e %M" -o "$OUT/time" "$@" > "$OUT/$name.log" 2> "$OUT/$name.err"
    read -r secs kb < "$OUT/time"
    rows+=("| $name | $tokens | $secs | $(awk "BEGIN {printf \"%.0f\", $tokens / $secs}") | $((kb / 1024)) |")
}
# steady_step ERR [WHAT]: the median of a run's steps after the first, in ms, from its
# SCAE_PROFILE step lines ("scae profile WHAT (ms): ..."; finetune's are "step"; the first step
# also pays first touches of the Adam state).
steady_step() {
    awk -v what="^scae profile ${2:-step} [(]" '$0 ~ what { s = 0; n = split($0, a, /[ ,]+/); for (i = 1; i <= n; i++) if (a[i] ~ /^[0-9.]+$/) s += a[i]; print s }' "$1" |
        tail -n +2 | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else printf "%.0f ms", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
steps=()
per_batch=()
per_batch_diff=()
# row_secs NAME: the seconds of a timed row.
row_secs() {
    printf '%s\n' "${rows[@]}" | awk -F' [|] ' -v n="$1" '$1 == "| " n { print $3 }'
}
# further NAME SEQS_IN_NAME: ms per further batch, from the rows NAME and "NAME, one batch".
further() {
    awk -v a="$(row_secs "$1")" -v b="$(row_secs "$1, one batch")" -v n=$(($2 / SEQS)) \
        'BEGIN { if (n > 1) printf "%.0f", (a - b) * 1000 / (n - 1); else print "n/a" }'
}
# batch_mean ERR: a run's cost per further batch in ms, measured inside the process: the mean
# of its SCAE_PROFILE batch lines ("scae profile batch (ms): shard, batch, pass"; a shard's
# reading is charged to its first batch) after the first, which also pays first touches. Free
# of the fixed costs (startup, reading the suite, the logit lens) whose noise the difference of
# two whole runs (`further`, printed beside it) carries.
batch_mean() {
    awk '/^scae profile batch [(]/ { s = 0; n = split($0, a, /[ ,]+/); for (i = 1; i <= n; i++) if (a[i] ~ /^[0-9.]+$/) s += a[i]; if (++k > 1) { t += s; m++ } }
        END { if (m == 0) print "n/a"; else printf "%.0f", t / m }' "$1"
}
# phase ERR WHAT PHASE: the ms of PHASE in a run's "scae profile WHAT (ms): ..." line (0 if none).
phase() {
    { grep -E "^scae profile $2 [(]" "$1" || true; } | tail -n 1 | { grep -oE "$3 [0-9.]+" || echo "x 0"; } | grep -oE '[0-9.]+$'
}
# The toy corpus and tokenizer (and, for SHAPE=toy, the model).
TD=$D TH=$HEADS TL=$LAYERS
[ "$SHAPE" = toy ] || TD=64 TH=4 TL=2
T=$OUT/toy-d$TD-h$TH-l$TL
[ -f "$T/.done" ] || { $BIN/toy-lm --out "$T" --d-model "$TD" --n-heads "$TH" --n-layers "$TL" \
    --ctx-len 128 --steps 0 --n-stories 3000 --overwrite > /dev/null 2>&1 && touch "$T/.done"; }
M=$T/model
if [ "$SHAPE" != toy ]; then
    M=$OUT/$SHAPE
    [ -f "$M/.done" ] || { $BIN/examples/random_model "$SHAPE" "$T/model" "$M" && touch "$M/.done"; }
fi
# The dense-product floor (JSON), measured before the stages and again after them: this shared
# machine's speed moves by up to ~20% within a run, so every ratio below takes the faster of
# the two measurements of each product (the machine's best in this run, never a slower floor).
gemm_floor() {
    OPENBLAS_NUM_THREADS=$THREADS $BIN/examples/gemm_floor "$D" "$F" "$HEADS" "$LAYERS" "$SEQS" 128 "$V"
}
floor0=$(gemm_floor)
SCAE_PROFILE=1 run collect-acts $((64 * 128)) $BIN/collect-acts --model "$M" --data "$T/corpus.txt" --ctx-len 128 --pack \
    --n-seqs 64 --batch-size "$SEQS" --out "$OUT/acts" --overwrite
SCAE_PROFILE=1 run "train-suite F=$F" $((TRAIN_STEPS * SEQS * 128)) $BIN/train-suite --acts "$OUT/acts" --expansion "$EXPANSION" \
    --k "$K" --steps "$TRAIN_STEPS" --batch-size "$SEQS" --lr 1e-3 --out "$OUT/suite" --overwrite
# SCORE_SEQS=0: random connections (examples/random_connections) instead of scored ones, where
# score-edges' F×F pair products would dominate the run.
if [ "$SCORE_SEQS" != 0 ]; then
    SCAE_PROFILE=1 run "score-edges F=$F" $((SCORE_SEQS * 128)) $BIN/score-edges --acts "$OUT/acts" --suite "$OUT/suite" \
        --n-seqs "$SCORE_SEQS" --batch-size "$SEQS" --keep 64 --out "$OUT/edges" --overwrite
    # One batch alone: the cost per further batch is the difference over the batches.
    SCAE_PROFILE=1 run "score-edges F=$F, one batch" $((SEQS * 128)) $BIN/score-edges --acts "$OUT/acts" --suite "$OUT/suite" \
        --n-seqs "$SEQS" --batch-size "$SEQS" --keep 64 --out "$OUT/edges-1" --overwrite
fi
for c in $CS; do
    if [ "$SCORE_SEQS" != 0 ]; then
        $BIN/select-edges --edges "$OUT/edges/edges.parquet" --c "$c" --out "$OUT/c$c.parquet" --overwrite > /dev/null
    else
        $BIN/examples/random_connections "$OUT/suite/suite.safetensors" "$c" 1 "$OUT/c$c.parquet" \
            $([ "$SHAPE" = pythia-70m ] && echo parallel) 2> /dev/null
    fi
    SCAE_PROFILE=1 run "finetune F=$F C=$c" $((FT_STEPS * SEQS * 128)) $BIN/finetune --acts "$OUT/acts" \
        --suite "$OUT/suite" --connections "$OUT/c$c.parquet" --steps "$FT_STEPS" --batch-size "$SEQS" \
        --out "$OUT/ft$c" --overwrite
    steps+=("C $c: $(steady_step "$OUT/finetune F=$F C=$c.err")")
    SCAE_PROFILE=1 run "evaluate F=$F C=$c" $((EVAL_SEQS * 128)) $BIN/evaluate --acts "$OUT/acts" --suite "$OUT/ft$c" \
        --connections "$OUT/c$c.parquet" --n-seqs "$EVAL_SEQS" --batch-size "$SEQS" --out "$OUT/eval$c" --overwrite
    # One batch alone: evaluate's cost per further batch is the difference over the batches.
    SCAE_PROFILE=1 run "evaluate F=$F C=$c, one batch" $((SEQS * 128)) $BIN/evaluate --acts "$OUT/acts" --suite "$OUT/ft$c" \
        --connections "$OUT/c$c.parquet" --n-seqs "$SEQS" --batch-size "$SEQS" --out "$OUT/eval$c-1" --overwrite
    per_batch+=("$(batch_mean "$OUT/evaluate F=$F C=$c.err")")
    per_batch_diff+=("$(further "evaluate F=$F C=$c" "$EVAL_SEQS")")
done
# With LEARN_STEPS: learn-connections at the last C over score-edges' candidates (keep 64), the
# suite frozen, LEARN_SEQS (default SEQS) sequences per step (needs SCORE_SEQS > 0 for the
# candidates), on the CPU engine; beside it, its floor: finetune through all 64 candidates (the
# same edge terms, forward and backward) for as many steps.
if [ -n "${LEARN_STEPS:-}" ] && [ "$SCORE_SEQS" != 0 ]; then
    LS=${LEARN_SEQS:-$SEQS}
    run "learn-connections F=$F C=$c keep 64" $((LEARN_STEPS * LS * 128)) \
        $BIN/learn-connections --acts "$OUT/acts" --suite "$OUT/suite" --edges "$OUT/edges/edges.parquet" \
        --c "$c" --freeze-suite --steps "$LEARN_STEPS" --batch-size "$LS" --out "$OUT/learn$c" --overwrite
    $BIN/select-edges --edges "$OUT/edges/edges.parquet" --c 64 --out "$OUT/keep64.parquet" --overwrite > /dev/null
    run "finetune F=$F C=64 (learn's floor)" $((LEARN_STEPS * LS * 128)) $BIN/finetune --acts "$OUT/acts" \
        --suite "$OUT/suite" --connections "$OUT/keep64.parquet" --steps "$LEARN_STEPS" --batch-size "$LS" \
        --out "$OUT/ft-keep64" --overwrite
fi
# The exact attribution graph of one 128-token sequence through the last C's finetuned suite
# (pruned as circuit-tracer prunes, and not), and the feature browser with its why-it-fired pass.
if [ "$BROWSE" != 0 ]; then
    run "attribute C=$c, pruned" 128 $BIN/attribute --acts "$OUT/acts" --seq 0 --suite "$OUT/ft$c" \
        --connections "$OUT/c$c.parquet" --slug pruned --out "$OUT/graphs"
    run "attribute C=$c, --no-prune" 128 $BIN/attribute --acts "$OUT/acts" --seq 0 --suite "$OUT/ft$c" \
        --connections "$OUT/c$c.parquet" --no-prune --slug all --out "$OUT/graphs"
    SCAE_PROFILE=1 run "view-features C=$c" $((EVAL_SEQS * 128)) $BIN/view-features --acts "$OUT/acts" --suite "$OUT/ft$c" \
        --connections "$OUT/c$c.parquet" --n-seqs "$EVAL_SEQS" --batch-size "$SEQS" --graphs "$OUT/graphs" \
        --out "$OUT/view$c" --overwrite
    # (--graphs in both runs: reading them is a fixed cost, not one per batch.)
    SCAE_PROFILE=1 run "view-features C=$c, one batch" $((SEQS * 128)) $BIN/view-features --acts "$OUT/acts" --suite "$OUT/ft$c" \
        --connections "$OUT/c$c.parquet" --n-seqs "$SEQS" --batch-size "$SEQS" --graphs "$OUT/graphs" \
        --out "$OUT/view$c-1" --overwrite
fi
floor1=$(gemm_floor)
echo "shape: $SHAPE, d_model $D, $HEADS heads, $LAYERS layers, F $F, k $K, $SEQS x 128 tokens per step, $THREADS threads"
echo
echo "| stage | tokens | seconds | tokens/s | peak RSS MB |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "steady finetuning step (median after the first): ${steps[*]}"
echo "dense-product floor of one finetuning step ($((SEQS * 128)) tokens), before the stages: $floor0"
echo "the same, after them: $floor1"
# ms KEY: the library GEMM's figure (the lower of the two measurements); best KEY: the faster
# of it and OpenBLAS's, where measured.
ms() {
    for fl in "$floor0" "$floor1"; do echo "${fl%%, \"openblas\"*}" | grep -oE "\"$1\": [0-9.]+" | grep -oE '[0-9.]+$'; done | sort -g | head -n 1
}
best() {
    local ob
    ob=$(for fl in "$floor0" "$floor1"; do echo "$fl" | grep -oE "\"openblas\": [{][^}]*" | grep -oE "\"$1\": [0-9.]+" | grep -oE '[0-9.]+$' || true; done | sort -g | head -n 1)
    awk -v a="$(ms "$1")" -v b="${ob:-}" 'BEGIN { printf "%.1f", (b != "" && b + 0 < a + 0) ? b : a }'
}
ts_step=$(steady_step "$OUT/train-suite F=$F.err" train-suite.step | grep -oE '^[0-9]+' || echo 0)
echo "train-suite, steady step: $ts_step ms; its floor (the encoder products, faster kernel): $(best encoder_ms) ms ($(awk -v a="$ts_step" -v b="$(best encoder_ms)" 'BEGIN { printf "%.2f", a / b }')x)"
if [ "$V" != 0 ]; then
    unembed=$(best unembed_ms)
    # The pruned forward's products, the encoder's from the faster kernel.
    fwd=$(awk -v a="$(ms forward_ms)" -v e="$(ms encoder_ms)" -v b="$(best encoder_ms)" 'BEGIN { printf "%.0f", a - e + b }')
    ev_floor=$(awk -v a="$fwd" -v b="$unembed" 'BEGIN { printf "%.0f", a + b }')
    i=0
    for c in $CS; do
        echo "evaluate C $c, per further batch of $((SEQS * 128)) tokens: ${per_batch[$i]} ms (whole runs' difference: ${per_batch_diff[$i]} ms); its floor (the pruned forward's products + one unembedding): $ev_floor ms ($(awk -v a="${per_batch[$i]}" -v b="$ev_floor" 'BEGIN { printf "%.2f", a / b }')x)"
        i=$((i + 1))
    done
    if [ "$SCORE_SEQS" != 0 ]; then
        sc=$(batch_mean "$OUT/score-edges F=$F.err")
        echo "score-edges, per further batch: $sc ms (whole runs' difference: $(further "score-edges F=$F" "$SCORE_SEQS") ms); the pruned forward's products: $fwd ms ($(awk -v a="$sc" -v b="$fwd" 'BEGIN { printf "%.2f", a / b }')x)"
    fi
    if [ "$BROWSE" != 0 ]; then
        # Its batches' mean, plus the growth per batch of what runs after them over the sequences
        # holding top contexts (why-it-fired) and of writing the pages.
        e32="$OUT/view-features C=$c.err" e8="$OUT/view-features C=$c, one batch.err"
        vf=$(awk -v b="$(batch_mean "$e32")" -v w="$(phase "$e32" view-features "why it fired")" \
            -v w1="$(phase "$e8" view-features "why it fired")" -v p="$(phase "$e32" view-features pages)" \
            -v p1="$(phase "$e8" view-features pages)" -v n=$((EVAL_SEQS / SEQS)) \
            'BEGIN { if (n > 1) printf "%.0f (batches %.0f + why-it-fired %.0f + pages %.0f)", b + (w - w1 + p - p1) / (n - 1), b, (w - w1) / (n - 1), (p - p1) / (n - 1); else print "n/a" }')
        echo "view-features C $c, per further batch: $vf ms (whole runs' difference: $(further "view-features C=$c" "$EVAL_SEQS") ms); the pruned forward's products: $fwd ms ($(awk -v a="${vf%% *}" -v b="$fwd" 'BEGIN { if (a == "n/a") print "n/a"; else printf "%.2f", a / b }')x)"
    fi
    co_floor=$(awk -v a="$(ms model_ms)" -v u="$(ms unembed_ms)" -v b="$unembed" -v n=$((64 / SEQS)) \
        'BEGIN { printf "%.1f", (a - 2 * u + 2 * b) * n / 1000 }')
    echo "collect-acts: $(row_secs collect-acts) s; its floor (the model's products + two unembeddings, $((64 / SEQS)) batches): $co_floor s ($(awk -v a="$(row_secs collect-acts)" -v b="$co_floor" 'BEGIN { printf "%.2f", a / b }')x)"
    # Per further batch inside the process (startup, reading the model and the corpus, and the
    # last shard's write left out; the other shards are written in the background meanwhile).
    co_batch=$(batch_mean "$OUT/collect-acts.err")
    co_bfloor=$(awk -v c="$co_floor" -v n=$((64 / SEQS)) 'BEGIN { printf "%.0f", c * 1000 / n }')
    echo "collect-acts, per further batch: $co_batch ms; its floor: $co_bfloor ms ($(awk -v a="$co_batch" -v b="$co_bfloor" 'BEGIN { printf "%.2f", a / b }')x)"
fi
