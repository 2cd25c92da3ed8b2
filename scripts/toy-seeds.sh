#!/usr/bin/env bash
# The figures of README's toy section: `make all C=16` and `make sweep` on the toy default for
# several seeds (SEED: the suite's initialisation, finetuning and the random control; the toy
# model and its data stay fixed), then one report over all seeds (`evaluate --compare`: each row
# as mean and range, the sentences from the means, how many seeds each comparison holds in).
#
#   scripts/toy-seeds.sh [SEED ...]      default: 0 1 2; outputs under OUT (default: out)
#   CPU=Nehalem scripts/toy-seeds.sh 0   the same under an emulated CPU (qemu-user's
#                                        qemu-x86_64 -cpu Nehalem: SSE4.2, no AVX), to measure
#                                        how far the figures move with the CPU's vector unit
#   SWEEP=0 ...                          without `make sweep`
#   MAKE_ARGS="EMBED_C=16" ...           with these make variables too
#
# Prints the CPU, the report over the seeds and the sweep over the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then seeds=("$@"); else seeds=(0 1 2); fi
OUT=${OUT:-out}
read -r -a extra <<< "${MAKE_ARGS:-}"
make_args=(--no-print-directory -s OUT="$OUT" VIEW=0 "${extra[@]}")
sweep_too=${SWEEP:-1}
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx512f|avx2|fma' | sort -u | tr '\n' ' ')
if [ -n "${CPU:-}" ]; then
    # The toy model comes from the native build (the same model for both), then every stage
    # runs under the emulated CPU.
    make "${make_args[@]}" toy > /dev/null
    bin="$OUT/bin-$CPU"
    mkdir -p "$bin"
    for t in target/release/*; do
        [ -f "$t" ] && [ -x "$t" ] || continue
        printf '#!/bin/sh\nexec qemu-x86_64 -cpu %s %s "$@"\n' "$CPU" "$(realpath "$t")" > "$bin/$(basename "$t")"
        chmod +x "$bin/$(basename "$t")"
    done
    OUT_CPU="$OUT/cpu-$CPU"
    mkdir -p "$OUT_CPU"
    [ -e "$OUT_CPU/toy/.done" ] || cp -r "$OUT/toy" "$OUT_CPU/"
    make_args=(--no-print-directory -s OUT="$OUT_CPU" VIEW=0 BIN="$bin" BUILD=0 "${extra[@]}")
    OUT=$OUT_CPU
    cpu="$cpu, emulated as $CPU (qemu-x86_64 -cpu $CPU)"
    flags="emulated $CPU"
fi
report=() sweep=()
for s in "${seeds[@]}"; do
    echo "toy-seeds: seed $s" >&2
    make "${make_args[@]}" all SEED="$s" > /dev/null
    read -r -a r <<< "$(make "${make_args[@]}" print-report-evals SEED="$s")"
    report+=("${r[@]}")
    if [ "$sweep_too" = 1 ]; then
        make "${make_args[@]}" sweep SEED="$s" > /dev/null
        read -r -a w <<< "$(make "${make_args[@]}" print-sweep-evals SEED="$s")"
        sweep+=("${w[@]}")
    fi
done
tag=$(IFS=-; echo "${seeds[*]}")$(printf '%s' "${MAKE_ARGS:-}" | tr ' =' '-_' | sed 's/^./-&/')
echo "CPU: $cpu [$flags], $(nproc) threads; seeds ${seeds[*]}${MAKE_ARGS:+; $MAKE_ARGS}"
echo
echo "## make all C=16${MAKE_ARGS:+ $MAKE_ARGS}, over seeds"
target/release/evaluate --compare "${report[@]}" --out "$OUT/seeds-$tag/report" | sed '/^Runs:/,/^$/d'
if [ "$sweep_too" = 1 ]; then
    echo
    echo "## make sweep, over seeds"
    target/release/evaluate --compare "${sweep[@]}" --out "$OUT/seeds-$tag/sweep" | sed '/^Runs:/,/^$/d'
fi
