#!/usr/bin/env bash
# GPU check: run on a machine with an NVIDIA GPU, from the repository root, with the CUDA
# binaries of scripts/build-cuda.sh carried along (target/cuda/carry/*.xz, or
# target/cuda/release/).
#
#   bash scripts/gpu-check.sh [OUT_DIR]
#
# Compares CUDA against CPU on the tiny fixtures (tests/fixtures): collect-acts hooks, and
# evaluate with all connections and with the reference's top-C connections (features through
# eval.json's CE/FVU, within 1e-3 relative in f32). Prints timings of both devices.
# Not yet covered: finetune/train-suite on CUDA (their fast engine is CPU-only).
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
# GPU=cpu runs the whole check on the CPU twice (to test this script without a GPU).
GPU="${GPU:-cuda}"
for name in tiny-neo tiny-pythia tiny-gpt2; do
    for pair in cpu:cpu "$GPU:gpu"; do
        dev=${pair%%:*}; tag=${pair##*:}
        s=$(date +%s.%N)
        "$BIN/collect-acts" --model "$F/models/$name" --tokens "$F/golden/suite-$name.safetensors" --ctx-len 12 \
            --no-prepend-bos --device "$dev" --out "$OUT/$name-acts-$tag" > /dev/null
        "$BIN/evaluate" --acts "$OUT/$name-acts-$tag" --suite "$F/suites/$name/suite.safetensors" --device "$dev" \
            --out "$OUT/$name-eval-all-$tag" > /dev/null
        "$BIN/evaluate" --acts "$OUT/$name-acts-$tag" --suite "$F/suites/$name/suite.safetensors" --device "$dev" \
            --connections "$F/suites/$name/connections-ref.safetensors" --out "$OUT/$name-eval-c-$tag" > /dev/null 2>&1
        e=$(date +%s.%N)
        echo "$name $dev: $(python3 -c "print(round($e - $s, 2))") s"
    done
    python3 - "$OUT" "$name" <<'PY' || status=1
import json, sys
from safetensors.numpy import load_file
out, name = sys.argv[1], sys.argv[2]
a = load_file(f"{out}/{name}-acts-cpu/shard-00000.safetensors")
b = load_file(f"{out}/{name}-acts-gpu/shard-00000.safetensors")
worst = max(float(abs(a[k].astype("f8") - b[k].astype("f8")).max()) for k in a if k != "tokens")
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
exit $status
