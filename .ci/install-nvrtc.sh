#!/usr/bin/env bash
# Installs NVRTC (NVIDIA's runtime compiler, `nvidia-cuda-nvrtc` from PyPI: no GPU, no CUDA
# toolkit) into a virtual environment, so the tests of the `cuda` feature compile the GPU
# kernels. Prints the folder holding libnvrtc.so.13: put it on LD_LIBRARY_PATH.
# Nothing to do when it is there already.
set -euo pipefail
venv=${RESNEXT_NVRTC_VENV:-/opt/resnext-nvrtc}
find_lib() {
    find "$venv" -name 'libnvrtc.so.13' -printf '%h\n' 2>/dev/null | head -1
}
dir=$(find_lib || true)
if [ -z "$dir" ]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check 'nvidia-cuda-nvrtc==13.0.*' >&2
    dir=$(find_lib)
fi
[ -n "$dir" ] || { echo "libnvrtc.so.13 not found under $venv" >&2; exit 1; }
echo "$dir"
