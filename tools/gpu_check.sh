#!/usr/bin/env bash
# Builds here, with no GPU and no CUDA toolkit, everything a run on a GPU machine needs,
# into gpu-check/ (ignored by git, well under 64 MiB): the release binaries with the `cuda`
# feature, the CUDA backend's test binary (its GPU tests run where a GPU is), gzipped, and the script
# that runs them there, tools/gpu_run.sh. On the GPU machine: `bash gpu-check/gpu_run.sh
# OUT_DIR` writes OUT_DIR/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-check
rm -rf "$out"
mkdir -p "$out/bin"
features=resnext-train/cuda,resnext-bench/cuda
cargo build --release -p resnext-train -p resnext-bench --features "$features" \
    --bin resnext-train --bin throughput
cp target/release/resnext-train target/release/throughput "$out/bin/"
# the CUDA backend's tests (resnext-core/tests/cuda.rs: GPU parity included), built as a
# release binary
exe=$(cargo test --release -p resnext-core --features cuda --test cuda --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
[ -n "$exe" ] || { echo "no test binary found" >&2; exit 1; }
cp "$exe" "$out/bin/resnext_core_tests"
strip "$out"/bin/*
# stripped they are still about 20 MiB each (cudarc's bindings, gemm's kernels): gzip
# makes the folder a quarter of that; gpu_run.sh unpacks them
gzip -9 "$out"/bin/*
cp tools/gpu_run.sh tools/gpu_torch_throughput.py "$out/"
du -sh "$out"
