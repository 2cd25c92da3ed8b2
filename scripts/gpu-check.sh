#!/usr/bin/env bash
# GPU check: run on a machine with an NVIDIA GPU, from the repository root, with the CUDA
# binaries of scripts/build-cuda.sh carried along (target/cuda/carry/*.xz, or
# target/cuda/release/).
#
#   bash scripts/gpu-check.sh [OUT_DIR]
#
# 1. Compares CUDA against CPU on the tiny fixtures (tests/fixtures): collect-acts hooks;
#    evaluate with all connections and with the reference's top-C connections (CE/FVU within
#    1e-3 relative in f32); finetune (3 SGD steps, mse+ce: CPU engine vs CUDA autograd, final
#    parameters and losses within 1e-3 relative) and train-suite (losses within 1e-3).
# 2. Times finetune at a TinyStories-33M-like size (d_model 768, 16 heads, 4 layers, F 3072,
#    k 64, C 16, batch 64x128; a toy vocabulary) in f32 and bf16: tokens/s and peak GPU memory.
#
# Environment: GPU=cpu runs everything on the CPU (a self-test of this script without a GPU;
# use it with BIG_BATCH=2 BIG_STEPS=1). BIG_BATCH, BIG_STEPS: size of the timing runs
# (default 64 sequences, 10 steps); MICRO: sequences per autograd graph (default 16, about
# 25 GB in f32). CPU_BASELINE=1 also times the CPU engine at that size.
set -euo pipefail
OUT="${1:-${OUT:-/tmp/scae-gpu-check}}"
BIN="${BIN:-target/cuda/release}"
rm -rf "$OUT"; mkdir -p "$OUT"
# Carried as target/cuda/carry/*.xz (the carry limit is 64 MiB): unpack.
if [ ! -x "$BIN/evaluate" ] && [ -d target/cuda/carry ]; then
    BIN="$OUT/bin"; mkdir -p "$BIN"
    for f in target/cuda/carry/*.xz; do xz -dc "$f" > "$BIN/$(basename "$f" .xz)"; chmod +x "$BIN/$(basename "$f" .xz)"; done
fi
# cublas/curand/nvrtc from the machine's PyTorch CUDA 13 wheels; libcuda from the driver.
LIBS=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
for base in site.getsitepackages():
    for d in glob.glob(os.path.join(base, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(base, "nvidia", "*", "lib")):
        print(d)
PY
)
export LD_LIBRARY_PATH="$(echo "$LIBS" | paste -sd: -)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
F=tests/fixtures
status=0
# Run a tool; on failure print its last line, record it and go on.
run() {
    if ! "$@" > "$OUT/last.log" 2>&1; then
        echo "FAILED: $(basename "$1") ${*:2}" >&2
        tail -n 3 "$OUT/last.log" >&2
        status=1
    fi
}
# Reading safetensors without the `safetensors` package or numpy.
cat > "$OUT/st.py" <<'PY'
"""safetensors as flat lists of numbers, in plain Python (no numpy, no safetensors)."""
import array, json, struct

def load_file(path):
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        data = fh.read()
    codes = {"F32": "f", "F64": "d", "I64": "q", "U32": "I", "F16": "e"}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        lo, hi = t["data_offsets"]
        raw = data[lo:hi]
        if t["dtype"] == "BF16":
            bits = array.array("H", raw)
            out[name] = [struct.unpack("<f", struct.pack("<I", b << 16))[0] for b in bits]
        elif t["dtype"] == "F16":
            out[name] = [v[0] for v in struct.iter_unpack("<e", raw)]
        else:
            out[name] = array.array(codes[t["dtype"]], raw).tolist()
    return out

def max_abs_diff(a, b):
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)

def max_abs(a):
    return max((abs(x) for x in a), default=0.0)
PY
export PYTHONPATH="$OUT${PYTHONPATH:+:$PYTHONPATH}"
# GPU=cpu runs the whole check on the CPU twice (to test this script without a GPU).
GPU="${GPU:-cuda}"
for name in tiny-neo tiny-pythia tiny-gpt2; do
    for pair in cpu:cpu "$GPU:gpu"; do
        dev=${pair%%:*}; tag=${pair##*:}
        s=$(date +%s.%N)
        run "$BIN/collect-acts" --model "$F/models/$name" --tokens "$F/golden/suite-$name.safetensors" --ctx-len 12 \
            --no-prepend-bos --device "$dev" --out "$OUT/$name-acts-$tag"
        run "$BIN/evaluate" --acts "$OUT/$name-acts-$tag" --suite "$F/suites/$name/suite.safetensors" --device "$dev" \
            --out "$OUT/$name-eval-all-$tag"
        run "$BIN/evaluate" --acts "$OUT/$name-acts-$tag" --suite "$F/suites/$name/suite.safetensors" --device "$dev" \
            --connections "$F/suites/$name/connections-ref.safetensors" --out "$OUT/$name-eval-c-$tag"
        e=$(date +%s.%N)
        echo "$name $dev: $(python3 -c "print(round($e - $s, 2))") s"
    done
    python3 - "$OUT" "$name" <<'PY' || status=1
import json, sys
from st import load_file, max_abs_diff
out, name = sys.argv[1], sys.argv[2]
a = load_file(f"{out}/{name}-acts-cpu/shard-00000.safetensors")
b = load_file(f"{out}/{name}-acts-gpu/shard-00000.safetensors")
worst = max(max_abs_diff(a[k], b[k]) for k in a if k != "tokens")
ok = worst <= 1e-3
for kind in ("all", "c"):
    x = json.load(open(f"{out}/{name}-eval-{kind}-cpu/eval.json"))
    y = json.load(open(f"{out}/{name}-eval-{kind}-gpu/eval.json"))
    for key in ("ce", "clean_ce", "mean_fvu"):
        rel = abs(x[key] - y[key]) / max(abs(x[key]), 1e-8)
        ok &= rel <= 1e-3
        print(f"{name} eval {kind} {key}: cpu {x[key]:.6f} cuda {y[key]:.6f} rel {rel:.1e}")
print(f"{name} hooks max abs diff cpu vs cuda {worst:.2e}: {'OK' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
done

# finetune and train-suite: CPU (engine) vs GPU (autograd) on the fixtures' caches.
for name in tiny-neo tiny-pythia tiny-gpt2; do
    S="$F/suites/$name/suite.safetensors"
    for pair in cpu:cpu:engine "$GPU:gpu:autograd"; do
        IFS=: read -r dev tag be <<< "$pair"
        run "$BIN/finetune" --acts "$OUT/$name-acts-cpu" --suite "$S" --connections "$F/suites/$name/connections-ref.safetensors" \
            --loss mse+ce --optimizer sgd --lr 1e-2 --no-scale-lr --clip-grad none --steps 3 --batch-size 3 \
            --device "$dev" --backend "$be" --out "$OUT/$name-ft-$tag"
        run "$BIN/train-suite" --acts "$OUT/$name-acts-cpu" --expansion 2 --k 4 --steps 5 --batch-size 3 --lr 1e-2 \
            --device "$dev" --backend "$be" --out "$OUT/$name-ts-$tag"
    done
    python3 - "$OUT" "$name" <<'PY' || status=1
import json, sys
from st import load_file, max_abs, max_abs_diff
out, name = sys.argv[1], sys.argv[2]
ok = True
a, b = load_file(f"{out}/{name}-ft-cpu/suite.safetensors"), load_file(f"{out}/{name}-ft-gpu/suite.safetensors")
worst = max(max_abs_diff(a[k], b[k]) / max(max_abs(a[k]), 1e-8) for k in a)
ok &= worst <= 1e-3
print(f"{name} finetune parameters cpu vs cuda: max relative diff {worst:.1e}")
for tool in ("ft", "ts"):
    la = [json.loads(l)["loss"] for l in open(f"{out}/{name}-{tool}-cpu/metrics.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(f"{out}/{name}-{tool}-gpu/metrics.jsonl")]
    rel = max(abs(x - y) / max(abs(x), 1e-8) for x, y in zip(la, lb))
    ok &= rel <= 1e-3 and len(la) == len(lb)
    print(f"{name} {'finetune' if tool == 'ft' else 'train-suite'} losses cpu vs cuda: max relative diff {rel:.1e}")
print(f"{name} training cpu vs cuda: {'OK' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
done

# Timing at a TinyStories-33M-like size.
BIG="$OUT/big"; BATCH="${BIG_BATCH:-64}"; STEPS="${BIG_STEPS:-10}"
# (Setup failures stop the script: nothing to time without them.)
"$BIN/toy-lm" --out "$BIG/toy" --d-model 768 --n-heads 16 --n-layers 4 --ctx-len 64 --steps 1 --batch-size 4 \
    --n-stories 600 --n-heldout 10 > /dev/null 2>&1
"$BIN/collect-acts" --model "$BIG/toy/model" --data "$BIG/toy/corpus.txt" --ctx-len 128 --pack --n-seqs "$BATCH" \
    --device "$GPU" --out "$BIG/acts" > /dev/null
"$BIN/train-suite" --acts "$BIG/acts" --expansion 4 --k 64 --steps 2 --batch-size "$BATCH" --device "$GPU" --out "$BIG/suite" > /dev/null
"$BIN/score-edges" --acts "$BIG/acts" --suite "$BIG/suite" --n-seqs 8 --top-c 16 --keep 16 --device "$GPU" --out "$BIG/edges" > /dev/null
time_ft() { # dev dtype backend extra-flags
    local tag="$1-$2-$3" mem="$BIG/mem-$1-$2-$3.txt" pid=""
    if [ "$1" != cpu ] && command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$mem" & pid=$!
    fi
    local line rc=0
    # shellcheck disable=SC2086  # $4: extra flags, word-split on purpose
    line=$("$BIN/finetune" --acts "$BIG/acts" --suite "$BIG/suite" --connections "$BIG/edges/connections.parquet" \
        --steps "$STEPS" --batch-size "$BATCH" --device "$1" --dtype "$2" --backend "$3" $4 --out "$BIG/ft-$tag" 2>&1 | tail -1) || rc=$?
    if [ -n "$pid" ]; then kill "$pid"; wait "$pid" 2> /dev/null || true; fi
    if [ "$rc" != 0 ]; then
        echo "FAILED: finetune $tag: $line"
        return 1
    fi
    local peak="n/a"
    [ -s "$mem" ] && peak="$(sort -n "$mem" | tail -1) MiB (whole GPU)"
    local rate="${line##*(}"
    echo "finetune d768 F3072 k64 C16 batch ${BATCH}x128 $tag: ${rate%)}, peak GPU memory $peak"
}
MICRO="--micro-batch ${MICRO:-16}"
time_ft "$GPU" f32 autograd "$MICRO" || status=1
time_ft "$GPU" bf16 autograd "$MICRO" || status=1
if [ "${CPU_BASELINE:-0}" = 1 ]; then time_ft cpu f32 engine "" || status=1; fi
exit $status
