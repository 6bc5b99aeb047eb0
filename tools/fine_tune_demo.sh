#!/usr/bin/env bash
# The fine-tuning demonstration of the README: a backbone trained on the digits 0-4,
# fine-tuned on 5-9 from 3 training images per class, against the same budget from
# scratch and a linear probe; mean test top-1 over 5 seeds (178 test images of 5-9).
# Usage: tools/fine_tune_demo.sh [run folder root, default a fresh temporary one]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p resnext-train
bin=target/release/resnext-train
root=${1:-$(mktemp -d)}
mkdir -p "$root"
"$bin" train --class-subset 0-4 --epochs 3 --threads 1 --out-dir "$root/pre" --overwrite | tail -1
init=(--init-weights "$root/pre/model.safetensors" --reset-head)
few=(--class-subset 5-9 --train-per-class 3 --batch-size 15 --threads 1 --overwrite)
echo "| epochs | from scratch | fine-tuned | linear probe (frozen backbone) |"
echo "|---|---|---|---|"
for epochs in 15 30; do
    row="| $epochs |"
    for mode in scratch tuned probe; do
        case $mode in
            scratch) extra=() ;;
            tuned) extra=("${init[@]}") ;;
            probe) extra=("${init[@]}" --freeze-backbone) ;;
        esac
        mean=$(for seed in 1 2 3 4 5; do
            "$bin" train "${few[@]}" --epochs "$epochs" --seed "$seed" \
                --out-dir "$root/$mode-$epochs-$seed" ${extra[@]+"${extra[@]}"} | tail -1
        done | awk '{ s += $3 } END { printf "%.3f", s / NR }')
        row="$row $mean |"
    done
    echo "$row"
done
