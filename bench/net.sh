#!/usr/bin/env bash
# Network benchmark: host <-> guest TCP throughput over a tap (no vhost), Ferrovisor's
# virtio-net (emulator back end) against QEMU's virtio-net-pci on QEMU TCG, same guest kernel,
# initramfs and root file system. Needs root: every boot gets a fresh network namespace with a
# tap (10.0.2.1/24 on the host side; the guest takes 10.0.2.15/24).
#
#   sudo bench/net.sh [options]
#
# The guest's root disk /dev/vda is a copy of fixtures/rootfs.ext4 (which has /usr/bin/tcp-xfer,
# scripts/lib/tcp-xfer.c); its second disk /dev/vdb, read-only, is a data image of --size bytes
# from /dev/urandom. The harness (bench/lib/net.py) starts a Python peer in the namespace, boots
# the VMM in it, and types one line per step on the serial console: warm-up transfers (16 MiB
# each way, unmeasured), a read of vdb into the guest's page cache, then
#   g2h-disk  guest -> host, tcp-xfer send </dev/vdb           (page-cache source)
#   g2h-zero  guest -> host, dd if=/dev/zero bs=256k | tcp-xfer send   (pipe source)
#   h2g       host -> guest, tcp-xfer recv >/dev/null
# The score is the host peer's view (bytes over accept() to the last byte); the guest's own
# clock around tcp-xfer gives a second figure. Runners:
#   ferrovisor   $FERROVISOR run --backend emu ... --memory 512M --disk ROOT --disk DATA,ro=on
#                --net tap=fvnbtap0       (FERROVISOR_EMU_STATS=1: the emulator's MIPS at exit)
#   qemu-tcg     qemu -accel tcg -M pc -m 512 ... virtio-blk-pci x2, -netdev tap,...,vhost=off
#                -device virtio-net-pci   (-name net,debug-threads=on: named threads)
# Rounds are interleaved and the runner order rotates. Prints one Markdown table per step
# (min / median / max, ratio of medians vs qemu-tcg) and appends a dated section to
# bench/results/net.md (gitignored).
#
# Options:
#   -n N                rounds (default 3)
#   --size SIZE         bytes per measured transfer, and the data image's size (default 256M;
#                       K/M/G suffixes; a whole number of MiB)
#   --runners A,B       only these runners (default ferrovisor,qemu-tcg)
#   --ferrovisor PATH   VMM binary (default $FERROVISOR, else target/release/ferrovisor)
#   --ferrovisor-args S extra arguments for `ferrovisor run` (default $FERROVISOR_ARGS)
#   --qemu PATH         (default $QEMU, else qemu-system-x86_64)
#   --kernel PATH       (default fixtures/vmlinuz)     --initrd PATH (default fixtures/initramfs.cpio.gz)
#   --rootfs PATH       root image, with /usr/bin/tcp-xfer (default fixtures/rootfs.ext4)
#   --dir DIR           where the data image and root copy go (default a new directory under
#                       $TMPDIR or /tmp)
#   --build             cargo build --release -p ferrovisor first
#   --no-save           do not append to bench/results/net.md
#   --json FILE         also write all samples as JSON
#   -q                  no per-run progress
#
# Example: sudo bench/net.sh -n 3
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
harness="$here/lib/net.py"

die() { echo "net: $*" >&2; exit 2; }
note() { echo "net: $*" >&2; }
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

rounds=3 size=256M only= build=0 save=1 json= quiet=() dir=
ferrovisor=${FERROVISOR:-$repo/target/release/ferrovisor} fargs=${FERROVISOR_ARGS:-}
qemu=${QEMU:-qemu-system-x86_64}
kernel=$repo/fixtures/vmlinuz initrd=$repo/fixtures/initramfs.cpio.gz rootfs=$repo/fixtures/rootfs.ext4
while [ $# -gt 0 ]; do
    case "$1" in
        -n) rounds=${2:?}; shift ;;
        --size) size=${2:?}; shift ;;
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
        -h|--help) sed -n '2,44p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number"
bytes=$(numfmt --from=iec "$size" 2>/dev/null) || die "--size: cannot parse $size (e.g. 256M)"
[ "$bytes" -ge 16777216 ] && [ $((bytes % 1048576)) -eq 0 ] ||
    die "--size wants a whole number of MiB, at least 16M"

all=ferrovisor,qemu-tcg
only=${only:-$all}
IFS=, read -ra picked <<<"$only"
for r in "${picked[@]}"; do [[ ",$all," == *",$r,"* ]] || die "unknown runner $r (runners: $all)"; done
want() { [[ ",$only," == *",$1,"* ]]; }

# ---------------------------------------------------------------- prerequisites
[ "$(id -u)" -eq 0 ] ||
    die "needs root: every boot gets its own network namespace with a tap (run with sudo)"
PATH=$PATH:/usr/sbin:/sbin
for cmd in python3 ip numfmt; do
    command -v "$cmd" >/dev/null || die "$cmd not found (scripts/install-deps.sh)"
done
[ -c /dev/net/tun ] || die "/dev/net/tun missing (modprobe tun)"
for f in "$kernel" "$initrd" "$rootfs"; do
    [ -f "$f" ] || die "$f not found (scripts/fetch-guest-fixtures.sh)"
done
if command -v debugfs >/dev/null; then
    debugfs -R "stat /usr/bin/tcp-xfer" "$rootfs" 2>/dev/null | grep -q "Mode:  0755" ||
        die "$rootfs has no /usr/bin/tcp-xfer (scripts/fetch-guest-fixtures.sh builds it in)"
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
    tmp=$(mktemp -d "$dir/net.XXXXXX")
else
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/net.XXXXXX")
fi
# The harness deletes each namespace after its boot; this catches what an interrupted run
# leaves behind (a namespace left in place keeps its tap, and the VMM would find it busy).
ns_prefix="fvnb$$-"
cleanup() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{ print $1 }'); do
        case "$ns" in "$ns_prefix"*) ip netns del "$ns" 2>/dev/null || true ;; esac
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

data=$tmp/data.img
head -c "$bytes" /dev/urandom >"$data" || die "cannot write the data image $data"
cp "$rootfs" "$tmp/root-template.ext4"
root=$tmp/root.ext4

# ---------------------------------------------------------------- runners
q() { printf '%q' "$1"; }
cmdline="console=ttyS0 panic=-1 quiet ferrovisor.root=/dev/vda ferrovisor.shell=1"
fcmd="env FERROVISOR_EMU_STATS=1 $(q "$ferrovisor") run --backend emu --kernel $(q "$kernel") --initrd $(q "$initrd") --memory 512M --cmdline $(q "$cmdline") --disk path=$(q "$root") --disk path=$(q "$data"),ro=on --net tap=fvnbtap0 $fargs"
qcmd="$(q "$qemu") -name net,debug-threads=on -accel tcg -M pc -m 512 -nodefaults -no-user-config -nographic -serial stdio -no-reboot -kernel $(q "$kernel") -initrd $(q "$initrd") -append $(q "$cmdline") -drive file=$(q "$root"),if=none,id=d0,format=raw,cache=writeback -device virtio-blk-pci,drive=d0 -drive file=$(q "$data"),if=none,id=d1,format=raw,cache=writeback,readonly=on -device virtio-blk-pci,drive=d1 -netdev tap,id=n0,ifname=fvnbtap0,script=no,downscript=no,vhost=off -device virtio-net-pci,netdev=n0"
args=()
for r in "${picked[@]}"; do
    case "$r" in
        ferrovisor) args+=(--vm "ferrovisor::$fcmd") ;;
        qemu-tcg) args+=(--vm "qemu-tcg::$qcmd") ;;
    esac
done

results="$here/results"
mkdir -p "$results"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
set +e
python3 "$harness" --root-template "$tmp/root-template.ext4" --root "$root" --data "$data" \
    --ns-prefix "$ns_prefix" --rounds "$rounds" --baseline qemu-tcg --log-dir "$tmp/logs" \
    ${json:+--json "$json"} "${quiet[@]+"${quiet[@]}"}" "${args[@]}" >"$tmp/table.md"
rc=$?
set -e
load1=$(cut -d' ' -f1-3 /proc/loadavg)
cat "$tmp/table.md"
keep_failed_logs "$rc" "$tmp/logs" "$results" net

if [ "$save" = 1 ]; then
    host_facts "$repo" "$qemu"
    fbuilt=$(date -u -r "$ferrovisor" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo "?")
    {
        echo
        echo "## $(date -u '+%Y-%m-%d %H:%M UTC') — virtio-net"
        echo
        echo "- host: Linux $(uname -r), $cpu, $(nproc) CPUs; load average $load0 before, $load1 after"
        echo "- ferrovisor: repository at $rev, binary $ferrovisor built $fbuilt; ${qv:-qemu: not found}"
        echo "- $rounds rounds, interleaved, runner order rotating; $size per measured transfer" \
             "(data image of random bytes), after 16 MiB each way unmeasured"
        echo "- command: \`bench/net.sh -n $rounds --size $size --runners $only\`"
        echo
        for r in "${picked[@]}"; do
            case "$r" in
                ferrovisor) echo "- \`ferrovisor\`: \`$fcmd\`" ;;
                qemu-tcg) echo "- \`qemu-tcg\`: \`$qcmd\`" ;;
            esac
        done
        echo
        cat "$tmp/table.md"
    } >>"$results/net.md"
    note "appended to $results/net.md"
fi
exit "$rc"
