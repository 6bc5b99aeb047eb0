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
# level, and the kernels and autograd ops against their references. opt-level 1 for the
# test crates only (dependencies keep the workspace's 2): the tests are small, the build
# is what costs CI minutes. The rest of the workspace builds for aarch64 too (a full
# `cargo build --workspace --target aarch64-unknown-linux-gnu`), left out here for time.
CARGO_PROFILE_TEST_OPT_LEVEL=1 \
    cargo test -p resnext-core --target "$target" --lib --test portable --test ops
