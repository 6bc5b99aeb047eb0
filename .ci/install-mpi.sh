#!/usr/bin/env bash
# Installs what the `mpi` feature needs from Debian's packages: Open MPI (mpirun and the
# library) and libclang (the mpi crate's bindgen). Nothing when they are there already.
set -euo pipefail
have_clang=$(ls /usr/lib/llvm-*/lib/libclang*.so* 2>/dev/null | head -1 || true)
if command -v mpirun >/dev/null && [ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h -o -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] && [ -n "$have_clang" ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev libclang-dev >/dev/null
