#!/usr/bin/env bash
# Build Ferrovisor and boot a demo guest, on a fresh Debian machine.
#
#   scripts/demo.sh
#
# Boots Debian's cloud kernel with a busybox shell on the console (leave with `poweroff -f`, or
# Ctrl-A x): on KVM where /dev/kvm has hardware virtualization, on Ferrovisor's emulator
# elsewhere (PVM, see DESIGN.md; the interpreted boot takes about a minute).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo >/dev/null 2>&1 ||
    { echo "demo.sh: cargo not found; install Rust with rustup (https://rustup.rs)" >&2; exit 1; }

scripts/install-deps.sh --no-optional
cargo build --release -p ferrovisor -p test-guests
bin=target/release/ferrovisor

scripts/fetch-guest-fixtures.sh
echo "demo: booting Debian's cloud kernel with a busybox shell (Ctrl-A x quits)" >&2
exec "$bin" run --backend auto --kernel fixtures/vmlinuz --initrd fixtures/initramfs.cpio.gz \
    --cpus 2 --memory 512M --cmdline "console=ttyS0 panic=-1 ferrovisor.shell=1"
