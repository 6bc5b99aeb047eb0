#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) from the seeds in fuzz/seeds, with
# cargo-fuzz (`cargo install cargo-fuzz`) on stable Rust: without a sanitizer cargo-fuzz
# needs no nightly flags, and on nightly dfdx 0.13 turns on code that no longer compiles. New corpus entries go to a
# scratch folder (the repository keeps only the seeds); a crashing input lands in
# fuzz/artifacts/<target>/ and stops the script.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
for t in npy idx gzip cifar image safetensors config; do
    scratch=$(mktemp -d)
    echo "== $t ($secs s)"
    cargo +stable fuzz run --sanitizer none -O "$t" "$scratch" "seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 2>&1 | grep -E "^(#[0-9]+ +DONE|Done|==[0-9]+== ERROR|SUMMARY)" || true
    rm -rf "$scratch"
done
