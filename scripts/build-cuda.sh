#!/usr/bin/env bash
# Build scae's tools with CUDA on a machine without a GPU (recipe: shared/GPU-BUILD.md).
#
#   scripts/build-cuda.sh            # binaries in target/cuda/release/
#
# The CUDA 13.0 toolchain comes from package-registry wheels (nvcc, nvvm, crt, runtime, cccl,
# cublas, curand, nvrtc), unpacked into target/cuda-sdk/. 13.0 because newer nvcc emits PTX
# that driver 580 (the lent H100/H200 machines) rejects. libcuda comes from the GPU driver at
# run time; for linking, a stub exporting the driver symbols the build needs is generated.
# Environment: CUDA_COMPUTE_CAP (default 90 = H100/H200), PYTHON (default python3).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SDK="$ROOT/target/cuda-sdk"
CAP="${CUDA_COMPUTE_CAP:-90}"
PY="${PYTHON:-python3}"

mkdir -p "$SDK/wheels" "$SDK/unpacked"
echo "build-cuda: downloading CUDA 13.0 wheels into $SDK/wheels" >&2
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$SDK/wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" \
    "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*"
for w in "$SDK"/wheels/*.whl; do
    "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$SDK/unpacked"
done
# The wheels put everything under nvidia/cu13/{bin,include,lib,nvvm}.
CU=$(find "$SDK/unpacked/nvidia" -maxdepth 2 -type d -name 'cu13' | head -n 1)
[ -n "$CU" ] || { echo "build-cuda: no nvidia/cu13 folder in the wheels" >&2; exit 1; }
chmod +x "$CU"/bin/* "$CU"/nvvm/bin/* 2>/dev/null || true
# Unversioned .so names for the linker.
for f in "$CU"/lib/lib*.so.*; do
    base="${f%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$f")" "$base"
done
export PATH="$CU/bin:$PATH"
export CUDA_PATH="$CU" CUDA_ROOT="$CU" CUDA_TOOLKIT_ROOT_DIR="$CU"
export CUDA_COMPUTE_CAP="$CAP"
export LIBRARY_PATH="$CU/lib:$SDK/stub${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$CU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$SDK/stub"
nvcc --version | tail -n 2 >&2

# A stub libcuda.so (soname libcuda.so.1) with every cu* symbol the link needs. The list is
# grown from the linker's "undefined reference" errors; the real driver replaces it at run time.
touch "$SDK/stub/symbols.txt"
make_stub() {
    sort -u "$SDK/stub/symbols.txt" | awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$SDK/stub/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$SDK/stub/libcuda.so" "$SDK/stub/stub.c"
    ln -sf libcuda.so "$SDK/stub/libcuda.so.1"
}
make_stub
export CARGO_TARGET_DIR="$ROOT/target/cuda"
for attempt in 1 2 3 4; do
    if cargo build --release --workspace --features cuda 2> "$SDK/build.log"; then
        # ~60 MB each (CUDA kernels inside): xz copies to carry to a GPU machine (~9 MB each).
        mkdir -p "$CARGO_TARGET_DIR/carry"
        for tool in collect-acts evaluate score-edges train-suite finetune; do
            xz -T0 -6 -c "$CARGO_TARGET_DIR/release/$tool" > "$CARGO_TARGET_DIR/carry/$tool.xz"
        done
        echo "build-cuda: binaries in $CARGO_TARGET_DIR/release/; compressed copies to carry in $CARGO_TARGET_DIR/carry/ ($(du -sh "$CARGO_TARGET_DIR/carry" | cut -f1))" >&2
        echo "build-cuda: on the GPU machine, scripts/gpu-check.sh unpacks them and points LD_LIBRARY_PATH at PyTorch's nvidia/cu13/lib" >&2
        exit 0
    fi
    # Driver symbols the compiled crates reference (cudarc links libcuda directly), plus any
    # the linker reported.
    missing=$( { for lib in "$CARGO_TARGET_DIR"/release/deps/lib{cudarc,candle_core,candle_nn}-*.rlib; do
                     [ -e "$lib" ] || continue
                     nm -u "$lib" 2>/dev/null | awk '$2 ~ /^cu[A-Z]/ { print $2 }' || true
                 done
                 { grep -oE "undefined (symbol: |reference to .)cu[A-Za-z0-9_]+" "$SDK/build.log" || true; } | grep -oE "cu[A-Za-z0-9_]+$" || true
               } | sort -u | comm -23 - <(sort -u "$SDK/stub/symbols.txt") || true )
    if [ -z "$missing" ]; then
        tail -n 40 "$SDK/build.log" >&2
        echo "build-cuda: build failed (log: $SDK/build.log)" >&2
        exit 1
    fi
    echo "build-cuda: adding $(echo "$missing" | wc -l) driver symbols to the link stub" >&2
    echo "$missing" >> "$SDK/stub/symbols.txt"
    make_stub
done
echo "build-cuda: link still failing after 4 attempts (log: $SDK/build.log)" >&2
exit 1
