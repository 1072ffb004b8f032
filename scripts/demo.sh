#!/usr/bin/env bash
# Build Ferrovisor and boot a demo guest, on a fresh Debian machine.
#
#   scripts/demo.sh
#
# With hardware virtualization behind /dev/kvm it boots Debian's cloud kernel with a busybox
# shell on the console (leave with `poweroff -f`, or Ctrl-A x). Where /dev/kvm cannot run an
# unmodified kernel (PVM, see DESIGN.md) it boots the project's test guest, which checks and
# prints what the VMM gave it, on 2 vCPUs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo >/dev/null 2>&1 ||
    { echo "demo.sh: cargo not found; install Rust with rustup (https://rustup.rs)" >&2; exit 1; }

scripts/install-deps.sh --no-optional
cargo build --release -p ferrovisor -p test-guests
bin=target/release/ferrovisor

if [ -e /sys/module/kvm_intel ] || [ -e /sys/module/kvm_amd ]; then
    scripts/fetch-guest-fixtures.sh
    echo "demo: booting Debian's cloud kernel with a busybox shell (Ctrl-A x quits)" >&2
    exec "$bin" run --kernel fixtures/vmlinuz --initrd fixtures/initramfs.cpio.gz \
        --cpus 2 --memory 512M --cmdline "console=ttyS0 panic=-1 ferrovisor.shell=1"
fi

guest=$(ls -t target/release/build/test-guests-*/out/ftg-bzImage | head -n 1)
echo "demo: /dev/kvm here has no hardware virtualization (e.g. PVM); booting the test guest" >&2
exec "$bin" run --kernel "$guest" --cpus 2 --memory 256M --cmdline "console=ttyS0 ftg.smp=1"
