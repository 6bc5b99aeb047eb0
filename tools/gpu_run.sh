#!/usr/bin/env bash
# Runs on a GPU machine (no cargo needed) what tools/gpu_check.sh built: the GPU parity
# tests (ops, eval, training steps), the embedded-digits main job trained on the GPU and
# evaluated on both devices, and eval and training throughput side by side with PyTorch.
# Writes OUT/report.md (OUT: the first argument, default .).
# Needs the NVIDIA driver and cuDNN, cuBLAS and NVRTC (PyTorch's wheels carry them: their
# lib folders are put on LD_LIBRARY_PATH here).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-.}
mkdir -p "$out"
report="$out/report.md"
py=${PYTHON:-python3}
libs=$($py - <<'PY' 2>/dev/null
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += glob.glob(os.path.join(sp, "nvidia", "*", "lib"))
print(":".join(sorted(set(dirs))))
PY
)
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
# the NCCL wheel has libnccl.so.2, a name cudarc does not look for: link it as libnccl.so
nccl=$(IFS=:; for d in $libs; do ls "$d"/libnccl.so.2 2>/dev/null; done | head -1)
[ -n "$nccl" ] && ln -s "$nccl" "$bin/libnccl.so"
export LD_LIBRARY_PATH="${libs}:$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for f in "$here"/bin/*.gz; do
    gunzip -c "$f" > "$bin/$(basename "$f" .gz)"
    chmod +x "$bin/$(basename "$f" .gz)"
done
{
    echo "# GPU check"
    echo
    echo "- date: $(date -u +%F)"
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
    echo
    echo "## Parity (GPU against CPU, fp32, TF32 off)"
    echo '```'
    RESNEXT_REQUIRE_GPU=1 RESNEXT_REQUIRE_NVRTC=1 "$bin/resnext_core_tests" --test-threads 1 2>&1 | tail -40
    echo "exit: $?"
    echo '```'
    echo
    echo "## Embedded digits: trained on the GPU (the main job), evaluated on the CPU and the GPU"
    echo '```'
    run="$out/digits-run"
    rm -rf "$run"
    timeout 300 "$bin/resnext-train" train --device cuda --out-dir "$run" 2>&1 | tail -4
    echo "exit: $?"
    for d in cpu cuda; do
        echo "--device $d:"
        "$bin/resnext-train" eval --weights "$run/model.safetensors" --device "$d" 2>&1 | tail -1
    done
    echo "mixed precision (--precision bf16), trained and evaluated on the GPU, evaluated on the CPU:"
    rm -rf "$run-bf16"
    timeout 200 "$bin/resnext-train" train --device cuda --precision bf16 --out-dir "$run-bf16" 2>&1 | tail -2
    echo "exit: $?"
    "$bin/resnext-train" eval --weights "$run-bf16/model.safetensors" --device cpu 2>&1 | tail -1
    echo '```'
    echo
    echo "## Throughput, resnext50_32x4d, 224x224 (img/s, median of 10)"
    echo
    echo "Training step: forward, backward, SGD with momentum. fp32: TF32 off on both sides;"
    echo "bf16: ours --precision bf16, PyTorch's autocast to bfloat16."
    echo
    echo "| precision | mode | batch | resnext-rs | PyTorch (cudnn.benchmark) | PyTorch channels_last |"
    echo "|---|---|---|---|---|---|"
    for case in "fp32 eval 64" "fp32 eval 256" "fp32 train 64" "fp32 train 256" "bf16 eval 256" "bf16 train 256"; do
        read -r prec mode b <<< "$case"
        ours=$(timeout 150 "$bin/throughput" --device cuda --precision "$prec" --mode "$mode" --batch "$b" --iters 10 2>&1 | awk '/^img\/s:/ {print $2} /rror/ {print}' | tail -1)
        theirs=$(timeout 150 $py "$here/gpu_torch_throughput.py" "$mode" "$b" "$prec" 2>&1 | tail -1)
        echo "| $prec | $mode | $b | ${ours:-failed} | $theirs |"
    done
} > "$report" 2>&1
cat "$report"
