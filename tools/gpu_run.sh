#!/usr/bin/env bash
# Runs on a GPU machine (no cargo needed) what tools/gpu_check.sh built: the GPU parity
# tests, eval of the embedded-digits model on the GPU against the CPU, and eval throughput
# side by side with PyTorch. Writes OUT/report.md (OUT: the first argument, default .).
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
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
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
    echo "## Embedded digits: trained on the CPU, evaluated on the CPU and the GPU"
    echo '```'
    run="$out/digits-run"
    rm -rf "$run"
    timeout 900 "$bin/resnext-train" train --out-dir "$run" 2>&1 | tail -3
    for d in cpu cuda; do
        echo "--device $d:"
        "$bin/resnext-train" eval --weights "$run/model.safetensors" --device "$d" 2>&1 | tail -1
    done
    echo '```'
    echo
    echo "## Eval throughput, resnext50_32x4d, 224x224, fp32 (img/s, median of 10)"
    echo
    echo "| batch | resnext-rs | PyTorch (cudnn.benchmark, TF32 off) | PyTorch channels_last |"
    echo "|---|---|---|---|"
    for b in 64 256; do
        ours=$("$bin/throughput" --device cuda --mode eval --batch "$b" --iters 10 2>&1 | awk '/^img\/s:/ {print $2}')
        theirs=$($py - "$b" <<'PY' 2>&1 | tail -1
import sys, time, torch, torchvision
b = int(sys.argv[1])
torch.backends.cudnn.benchmark = True
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
res = []
for cl in (False, True):
    m = torchvision.models.resnext50_32x4d().cuda().eval()
    x = torch.randn(b, 3, 224, 224, device="cuda")
    if cl:
        m = m.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    ts = []
    with torch.no_grad():
        for i in range(13):
            torch.cuda.synchronize(); t = time.time()
            m(x).cpu()
            torch.cuda.synchronize(); ts.append(time.time() - t)
    ts = sorted(ts[3:])
    res.append(f"{b / ts[len(ts) // 2]:.1f}")
print(" | ".join(res))
PY
)
        echo "| $b | ${ours:-failed} | $theirs |"
    done
} > "$report" 2>&1
cat "$report"
