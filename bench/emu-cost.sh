#!/usr/bin/env bash
# What one guest block request costs the emulator back end, counted under Valgrind's cachegrind
# instead of timed: guest instructions, blocks entered, host instructions and first-level
# cache misses per 4 KiB random read and per 1 MiB sequential read (O_DIRECT, queue depth 1).
# Counts do not move with the host's load, so two builds compare exactly where wall-time
# benchmarks (bench/blk.sh) cannot see less than ~20 %. Use it to judge changes to the
# interpreter; bench/blk.sh remains the benchmark against QEMU.
#
#   bench/emu-cost.sh [options]
#
# The guest is Debian's kernel with the fixture initramfs switching to a copy of
# fixtures/rootfs.ext4 holding bench/lib/blkbench.c as /usr/bin/blkbench, booted once on `emu`
# in deterministic mode and snapshotted at its shell; each binary restores that snapshot
# twice per test (--small and --large requests) and the difference is divided by the
# difference in requests (bench/lib/emu_cost.py says more). Needs valgrind
# (scripts/install-deps.sh installs it). About 1–3 minutes per binary.
#
# Options:
#   --ferrovisor PATH   VMM binary; repeat to compare builds, the first is the reference and
#                       makes the snapshot: put the oldest first (an older build cannot read
#                       a newer one's snapshot; each binary compiles its own blocks)
#                       (default $FERROVISOR, else target/release/ferrovisor)
#   --tests LIST        randread,seqread (default both)
#   --small N --large N requests in the two runs (default 256 and 1024; seqread runs 1/32)
#   --kernel PATH       (default fixtures/vmlinuz)     --initrd PATH (default fixtures/initramfs.cpio.gz)
#   --rootfs PATH       root image to add blkbench to (default fixtures/rootfs.ext4)
#   --keep DIR          keep the snapshot, console inputs and logs in DIR
#
# Example: bench/emu-cost.sh --ferrovisor /tmp/before --ferrovisor target/release/ferrovisor
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
die() { echo "emu-cost: $*" >&2; exit 2; }
note() { echo "emu-cost: $*" >&2; }
. "$here/lib/common.sh"

bins=() tests=randread,seqread small=256 large=1024 keep=
kernel=$repo/fixtures/vmlinuz initrd=$repo/fixtures/initramfs.cpio.gz rootfs=$repo/fixtures/rootfs.ext4
while [ $# -gt 0 ]; do
    case "$1" in
        --ferrovisor) bins+=("${2:?}"); shift ;;
        --tests) tests=${2:?}; shift ;;
        --small) small=${2:?}; shift ;;
        --large) large=${2:?}; shift ;;
        --kernel) kernel=${2:?}; shift ;;
        --initrd) initrd=${2:?}; shift ;;
        --rootfs) rootfs=${2:?}; shift ;;
        --keep) keep=${2:?}; shift ;;
        -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[ ${#bins[@]} -gt 0 ] || bins=("${FERROVISOR:-$repo/target/release/ferrovisor}")
for b in "${bins[@]}"; do
    [ -x "$b" ] || die "$b is not an executable VMM binary (cargo build --release, or --ferrovisor PATH)"
done
for v in "$small" "$large"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "--small and --large want a positive number of requests"
done
PATH=$PATH:/usr/sbin:/sbin   # debugfs
for cmd in python3 gcc debugfs valgrind; do
    command -v "$cmd" >/dev/null || die "$cmd not found (scripts/install-deps.sh)"
done
for f in "$kernel" "$initrd" "$rootfs"; do
    [ -f "$f" ] || die "$f not found (scripts/fetch-guest-fixtures.sh)"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/emu-cost.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
build_blkbench "$here/lib/blkbench.c" "$tmp/blkbench"
root_with_blkbench "$rootfs" "$tmp/blkbench" "$tmp/root.ext4"
# Random data, so that no layer can short-cut zeros.
head -c 256M /dev/urandom >"$tmp/test.img"
work=$tmp/work
[ -z "$keep" ] || { mkdir -p "$keep" && work=$keep; }
mkdir -p "$work"

args=()
for b in "${bins[@]}"; do args+=(--ferrovisor "$b"); done
python3 "$here/lib/emu_cost.py" "${args[@]}" --kernel "$kernel" --initrd "$initrd" \
    --root "$tmp/root.ext4" --image "$tmp/test.img" --tests "$tests" \
    --small "$small" --large "$large" --work "$work"
