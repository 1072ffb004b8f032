#!/usr/bin/env bash
# Block-device benchmark: Ferrovisor's virtio-blk (emulator back end) against QEMU's
# virtio-blk-pci on QEMU TCG, same guest kernel, same images, same cache mode, plus the same
# image file read and written natively on the host.
#
#   bench/blk.sh [options]
#
# A raw test image (--size, default 256M, filled from /dev/urandom) is the guest's second disk,
# /dev/vdb. The root disk /dev/vda is a copy of fixtures/rootfs.ext4 with bench/lib/blkbench.c
# (compiled here with `gcc -O2 -static`) added as /usr/bin/blkbench; the fixture initramfs
# switches to it (ferrovisor.root=/dev/vda) and its init gives a shell on the serial console
# (ferrovisor.shell=1). The harness (bench/lib/blk.py) waits for FERROVISOR-ROOT-READY, types
# one blkbench command per test, parses the result lines and types `exit`. Tests, in order:
#   seqread   1 MiB requests, O_DIRECT, from the start for --secs (wrapping round at the end)
#   randread  4 KiB requests at random aligned offsets, O_DIRECT, queue depth 1, --rand-secs
#   seqwrite  1 MiB requests, O_DIRECT, like seqread (no flush: see blkbench.c)
# Runners:
#   ferrovisor   $FERROVISOR run --backend emu ... --memory 512M --disk path=ROOT --disk path=IMG
#   qemu-tcg     qemu -accel tcg -M pc -m 512 ... virtio-blk-pci, cache=writeback, aio=threads
#                (-name blk,debug-threads=on: named threads, for the CPU-per-thread note)
#   host-direct  blkbench on the host against the image file, O_DIRECT (the host's disk)
#   host-cached  the same without O_DIRECT, image in the page cache (where both VMMs do their
#                I/O: Ferrovisor preadv/pwritev, QEMU cache=writeback; the ceiling for them)
# Rounds are interleaved and the runner order rotates. Prints one Markdown table per metric
# (min / median / max, ratio of medians vs qemu-tcg) and appends a dated section to
# bench/results/blk.md (gitignored).
#
# Options:
#   -n N                rounds (default 3)
#   --size SIZE         test image size (default 256M; K/M/G suffixes)
#   --secs S            length of each sequential test (default 3)
#   --rand-secs S       length of the random-read test (default 3)
#   --warmup S          each test first runs S seconds unmeasured (default 0.5): warm guest
#                       code paths, Ferrovisor's block cache, QEMU's translation cache
#   --runners A,B       only these runners (default ferrovisor,qemu-tcg,host-direct,host-cached)
#   --ferrovisor PATH   VMM binary (default $FERROVISOR, else target/release/ferrovisor)
#   --ferrovisor-args S extra arguments for `ferrovisor run` (default $FERROVISOR_ARGS)
#   --qemu PATH         (default $QEMU, else qemu-system-x86_64)
#   --kernel PATH       (default fixtures/vmlinuz)     --initrd PATH (default fixtures/initramfs.cpio.gz)
#   --rootfs PATH       root image to add blkbench to (default fixtures/rootfs.ext4)
#   --dir DIR           where the test image and root copy go (default a new directory under
#                       $TMPDIR or /tmp; must be a file system that takes O_DIRECT for host-direct)
#   --build             cargo build --release -p ferrovisor first
#   --no-save           do not append to bench/results/blk.md
#   --json FILE         also write all samples as JSON
#   -q                  no per-run progress
#
# Example: bench/blk.sh -n 3
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
harness="$here/lib/blk.py"

die() { echo "blk: $*" >&2; exit 2; }
note() { echo "blk: $*" >&2; }
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

rounds=3 size=256M secs=3 rand_secs=3 warmup=0.5 only= build=0 save=1 json= quiet=() dir=
ferrovisor=${FERROVISOR:-$repo/target/release/ferrovisor} fargs=${FERROVISOR_ARGS:-}
qemu=${QEMU:-qemu-system-x86_64}
kernel=$repo/fixtures/vmlinuz initrd=$repo/fixtures/initramfs.cpio.gz rootfs=$repo/fixtures/rootfs.ext4
while [ $# -gt 0 ]; do
    case "$1" in
        -n) rounds=${2:?}; shift ;;
        --size) size=${2:?}; shift ;;
        --secs) secs=${2:?}; shift ;;
        --rand-secs) rand_secs=${2:?}; shift ;;
        --warmup) warmup=${2:?}; shift ;;
        --runners) only=${2:?}; shift ;;
        --ferrovisor) ferrovisor=${2:?}; shift ;;
        --ferrovisor-args) fargs=${2?}; shift ;;
        --qemu) qemu=${2:?}; shift ;;
        --kernel) kernel=${2:?}; shift ;;
        --initrd) initrd=${2:?}; shift ;;
        --rootfs) rootfs=${2:?}; shift ;;
        --dir) dir=${2:?}; shift ;;
        --build) build=1 ;;
        --no-save) save=0 ;;
        --json) json=${2:?}; shift ;;
        -q) quiet=(-q) ;;
        -h|--help) sed -n '2,48p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number"
for v in "$secs" "$rand_secs" "$warmup"; do
    [[ "$v" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--secs, --rand-secs and --warmup want a number of seconds"
done
bytes=$(numfmt --from=iec "$size" 2>/dev/null) || die "--size: cannot parse $size (e.g. 256M)"
[ "$bytes" -ge 16777216 ] && [ $((bytes % 1048576)) -eq 0 ] ||
    die "--size wants a whole number of MiB, at least 16M"

all=ferrovisor,qemu-tcg,host-direct,host-cached
only=${only:-$all}
want() { [[ ",$only," == *",$1,"* ]]; }
IFS=, read -ra picked <<<"$only"
for r in "${picked[@]}"; do [[ ",$all," == *",$r,"* ]] || die "unknown runner $r (runners: $all)"; done

# ---------------------------------------------------------------- prerequisites
PATH=$PATH:/usr/sbin:/sbin   # debugfs
for cmd in python3 gcc debugfs numfmt; do
    command -v "$cmd" >/dev/null || die "$cmd not found (scripts/install-deps.sh)"
done
if want ferrovisor || want qemu-tcg; then
    for f in "$kernel" "$initrd" "$rootfs"; do
        [ -f "$f" ] || die "$f not found (scripts/fetch-guest-fixtures.sh)"
    done
fi
if [ "$build" = 1 ]; then
    (cd "$repo" && cargo build --release -p ferrovisor) || die "cargo build failed"
fi
if want ferrovisor; then
    [ -x "$ferrovisor" ] ||
        die "$ferrovisor not built (cargo build --release, --build, or --ferrovisor PATH)"
fi
if want qemu-tcg; then
    command -v "$qemu" >/dev/null || die "$qemu not found (scripts/install-deps.sh: qemu-system-x86)"
fi

if [ -n "$dir" ]; then
    mkdir -p "$dir" || die "cannot create $dir"
    tmp=$(mktemp -d "$dir/blk.XXXXXX")
else
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/blk.XXXXXX")
fi
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------- blkbench, images
build_blkbench "$here/lib/blkbench.c" "$tmp/blkbench"
img=$tmp/test.img
head -c "$bytes" /dev/urandom >"$img" || die "cannot write the test image $img"
if want host-direct && ! "$tmp/blkbench" seqread "$img" -s 1M -t 1 >/dev/null 2>&1; then
    die "the file system of $img refuses O_DIRECT reads (host-direct); use --dir on another one, or --runners without host-direct"
fi
if want ferrovisor || want qemu-tcg; then
    root_with_blkbench "$rootfs" "$tmp/blkbench" "$tmp/root-template.ext4"
fi
root=$tmp/root.ext4

# ---------------------------------------------------------------- runners
q() { printf '%q' "$1"; }
cmdline="console=ttyS0 panic=-1 quiet ferrovisor.root=/dev/vda ferrovisor.shell=1"
fcmd="$(q "$ferrovisor") run --backend emu --kernel $(q "$kernel") --initrd $(q "$initrd") --memory 512M --cmdline $(q "$cmdline") --disk path=$(q "$root") --disk path=$(q "$img") $fargs"
qcmd="$(q "$qemu") -name blk,debug-threads=on -accel tcg -M pc -m 512 -nodefaults -no-user-config -nographic -serial stdio -no-reboot -kernel $(q "$kernel") -initrd $(q "$initrd") -append $(q "$cmdline") -drive file=$(q "$root"),if=none,id=d0,format=raw,cache=writeback -device virtio-blk-pci,drive=d0 -drive file=$(q "$img"),if=none,id=d1,format=raw,cache=writeback,aio=threads -device virtio-blk-pci,drive=d1"
args=()
for r in "${picked[@]}"; do
    case "$r" in
        ferrovisor) args+=(--vm "ferrovisor::$fcmd") ;;
        qemu-tcg) args+=(--vm "qemu-tcg::$qcmd") ;;
        host-direct) args+=(--host host-direct::direct) ;;
        host-cached) args+=(--host host-cached::cached) ;;
    esac
done

results="$here/results"
mkdir -p "$results"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
set +e
python3 "$harness" --image "$img" --blkbench "$tmp/blkbench" \
    --root-template "$tmp/root-template.ext4" --root "$root" \
    --rounds "$rounds" --secs "$secs" --rand-secs "$rand_secs" --warmup "$warmup" --baseline qemu-tcg \
    --log-dir "$tmp/logs" ${json:+--json "$json"} "${quiet[@]+"${quiet[@]}"}" "${args[@]}" \
    >"$tmp/table.md"
rc=$?
set -e
load1=$(cut -d' ' -f1-3 /proc/loadavg)
cat "$tmp/table.md"
keep_failed_logs "$rc" "$tmp/logs" "$results" blk

if [ "$save" = 1 ]; then
    host_facts "$repo" "$qemu"
    fs=$(df -T "$tmp" 2>/dev/null | awk 'NR == 2 { print $2 " on " $1 }')
    {
        echo
        echo "## $(date -u '+%Y-%m-%d %H:%M UTC') — virtio-blk"
        echo
        echo "- host: Linux $(uname -r), $cpu, $(nproc) CPUs; images on $fs;" \
             "load average $load0 before, $load1 after"
        fbuilt=$(date -u -r "$ferrovisor" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo "?")
        echo "- ferrovisor: repository at $rev, binary $ferrovisor built $fbuilt; ${qv:-qemu: not found}"
        echo "- $rounds rounds, interleaved, runner order rotating; test image $size" \
             "(random data); sequential tests ${secs} s each, random reads ${rand_secs} s, each after ${warmup} s unmeasured"
        echo "- command: \`bench/blk.sh -n $rounds --size $size --secs $secs --rand-secs $rand_secs --warmup $warmup --runners $only\`"
        echo
        for r in "${picked[@]}"; do
            case "$r" in
                ferrovisor) echo "- \`ferrovisor\`: \`$fcmd\`" ;;
                qemu-tcg) echo "- \`qemu-tcg\`: \`$qcmd\`" ;;
                host-direct) echo "- \`host-direct\`: \`blkbench MODE IMG ...\` (O_DIRECT)" ;;
                host-cached) echo "- \`host-cached\`: \`blkbench MODE IMG ... -B\` (page cache)" ;;
            esac
        done
        echo
        cat "$tmp/table.md"
    } >>"$results/blk.md"
    note "appended to $results/blk.md"
fi
exit "$rc"
