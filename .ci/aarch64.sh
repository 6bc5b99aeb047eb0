#!/usr/bin/env bash
# Builds the workspace for 64-bit ARM and runs the kernel and op tests there under
# qemu-user, so that a NEON kernel computing wrong numbers fails CI. Installs what it
# needs: Debian's cross linker, C library and qemu-user, and the Rust target.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
# resnext-core holds the only architecture-specific code (the kernels); the unit tests
# (the lane operations at every level ARM has), the direct convolution at NEON and plain
# level, and the kernels and autograd ops against their references. Everything at
# opt-level 1 (gemm-f16 needs at least 1 on aarch64): the tests are small, the build is
# what costs CI minutes. The rest of the workspace builds for aarch64 too (a full
# `cargo build --workspace --target aarch64-unknown-linux-gnu`), left out here for time.
cargo test -p resnext-core --target "$target" \
    --config 'profile.test.opt-level=1' --config 'profile.dev.package."*".opt-level=1' \
    --lib --test portable --test ops
