#!/usr/bin/env bash
# README's "Learned connections" figures: on the toy default, for each seed and each C, the top
# C by score (`make all`, with its random-connections control and the all-connections suite
# finetuned the same way) and connections learned by learn-connections (`make all
# SELECT=learned`), each finetuned the same way; then one report over everything
# (`evaluate --compare`: each row the mean and range over the seeds, on held-out tokens).
#
# The learned runs also train their gates for LEARN_STEPS (= STEPS) steps before finetuning, so
# the top C is also finetuned for twice the steps, the compute-matched control (second table).
#
#   scripts/learned-vs-top.sh [SEED ...]   default: 0 1 2; CS (default "4 16"); outputs under OUT
#                                          (default: out)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then seeds=("$@"); else seeds=(0 1 2); fi
OUT=${OUT:-out}
read -r -a cs <<< "${CS:-4 16}"
make_args=(--no-print-directory -s OUT="$OUT" VIEW=0)
evals=()
for s in "${seeds[@]}"; do
    for c in "${cs[@]}"; do
        for select in top learned; do
            args=(C="$c" SEED="$s")
            [ "$select" = learned ] && args+=(SELECT=learned)
            echo "learned-vs-top: seed $s, C $c, $select" >&2
            make "${make_args[@]}" all "${args[@]}" > /dev/null
            read -r -a r <<< "$(make "${make_args[@]}" print-report-evals "${args[@]}")"
            evals+=("${r[@]}")
        done
    done
done
# Each all-connections run appears once per C and selection: keep one of each folder.
mapfile -t evals < <(printf '%s\n' "${evals[@]}" | sort -u)
# The top C finetuned for twice the steps (the toy preset's STEPS is 200).
steps=$(make "${make_args[@]}" settings | grep -oE '(^| )STEPS=[0-9]+' | head -1 | cut -d= -f2)
long=()
for s in "${seeds[@]}"; do
    for c in "${cs[@]}"; do
        echo "learned-vs-top: seed $s, C $c, top, $((2 * steps)) steps" >&2
        make "${make_args[@]}" eval C="$c" SEED="$s" STEPS=$((2 * steps)) > /dev/null
        read -r -a r <<< "$(make "${make_args[@]}" print-report-evals C="$c" SEED="$s" STEPS=$((2 * steps)))"
        for e in "${r[@]}"; do
            case "$e" in *-top"$c"-finetuned-*) long+=("$e") ;; esac
        done
    done
done
tag=$(IFS=-; echo "${seeds[*]}")-c$(IFS=-; echo "${cs[*]}")
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) threads; seeds ${seeds[*]}; C ${cs[*]}"
echo
target/release/evaluate --compare "${evals[@]}" --out "$OUT/learned-vs-top-$tag" | sed '/^Runs:/,/^$/d'
echo
echo "## The top C finetuned for $((2 * steps)) steps (as many as learned connections' gates + finetuning)"
echo
target/release/evaluate --compare "${long[@]}" --out "$OUT/learned-vs-top-$tag-long" | sed '/^Runs:/,$d'
