#!/usr/bin/env bash
# Snapshot, restore and clone benchmark: Ferrovisor's control-API snapshots on both back ends,
# against QEMU save/restore to a file with the same guest, memory and accelerator class.
#
#   bench/snapshot.sh [options]
#
# Back ends and guests (each prints "count N" lines on the serial console without pause):
#   emu   Debian's kernel + the fixture initramfs, cmdline
#         "console=ttyS0 panic=-1 quiet ferrovisor.count=0"; peer qemu-tcg (-accel tcg -M pc)
#   kvm   the freestanding test guest, "console=ttyS0 ftg.count=forever ftg.count_ms=0";
#         peer qemu-microvm (-M microvm -accel kvm). (Linux does not run on PVM's /dev/kvm.)
# For each back end and each memory size (--sizes, default 256M,1G,4G), one boot, then N times
# (-n, default 5) pause + snapshot into a new directory + resume over the API socket, each timed
# request → reply; the memory file's size and the space it takes (it is sparse). Then N times
# each, alternating, from the last snapshot: `ferrovisor run --restore DIR`, process start to the
# guest's first console byte; `run --restore DIR --paused --api-sock S`, start until the API
# says paused, then `resume` sent → first byte. A restore counts only if the guest goes on with
# the count line after the last one printed before the snapshot. The peer: QMP `stop`,
# `migrate "exec:cat > FILE"` (to the MIGRATION completed event; also with the file fsynced, as
# Ferrovisor fsyncs its memory file), `cont`; restore `-incoming "exec:cat FILE"`, `cont` as soon
# as query-status leaves inmigrate.
# Clones (--clones, default 1,10,50): one snapshot of a guest at --clone-memory (256M) printing a
# count line every 100 ms; K `ferrovisor run --restore DIR` processes started at once; time from
# the first start until every clone printed a whole count line; total RSS (anon part) and PSS
# (/proc/PID/smaps_rollup) of the K processes then and --settle seconds later.
# Prints Markdown tables (min / median / max, ratios of medians vs the peer) and appends a dated
# section to bench/results/snapshot.md (gitignored). The harness is bench/lib/snapshot.py.
#
# Options:
#   -n N                runs per measurement (default 5)
#   --sizes LIST        guest memory sizes (default 256M,1G,4G)
#   --backends LIST     emu,kvm (default both; kvm is skipped with a note without /dev/kvm)
#   --clones LIST       clone counts (default 1,10,50; "" for none)
#   --clone-memory SIZE (default 256M)          --settle S  (default 5)
#   --no-peers          no QEMU runs
#   --ferrovisor PATH   VMM binary (default $FERROVISOR, else target/release/ferrovisor)
#   --qemu PATH         (default $QEMU, else qemu-system-x86_64)
#   --kernel PATH       (default fixtures/vmlinuz)   --initrd PATH (default fixtures/initramfs.cpio.gz)
#   --guest PATH        test guest (default $FTG_GUEST, else the newest ftg-bzImage under target/)
#   --dir DIR           where snapshots go (default a new directory under $TMPDIR or /tmp)
#   --build             cargo build --release -p ferrovisor -p test-guests first
#   --no-save           do not append to bench/results/snapshot.md
#   --json FILE         also write all samples as JSON
#   -q                  no per-run progress
#
# Example: bench/snapshot.sh                 (about 4 minutes on a 2-CPU host)
#          bench/snapshot.sh -n 3 --sizes 256M --backends kvm --clones 50
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
harness="$here/lib/snapshot.py"

die() { echo "snapshot: $*" >&2; exit 2; }
note() { echo "snapshot: $*" >&2; }
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

runs=5 sizes=256M,1G,4G backends=emu,kvm clones=1,10,50 clone_mem=256M settle=5 peers=1
build=0 save=1 json= quiet=() dir=
ferrovisor=${FERROVISOR:-$repo/target/release/ferrovisor} qemu=${QEMU:-qemu-system-x86_64}
kernel=$repo/fixtures/vmlinuz initrd=$repo/fixtures/initramfs.cpio.gz guest=${FTG_GUEST:-}
while [ $# -gt 0 ]; do
    case "$1" in
        -n) runs=${2:?}; shift ;;
        --sizes) sizes=${2:?}; shift ;;
        --backends) backends=${2:?}; shift ;;
        --clones) clones=${2?}; shift ;;
        --clone-memory) clone_mem=${2:?}; shift ;;
        --settle) settle=${2:?}; shift ;;
        --no-peers) peers=0 ;;
        --ferrovisor) ferrovisor=${2:?}; shift ;;
        --qemu) qemu=${2:?}; shift ;;
        --kernel) kernel=${2:?}; shift ;;
        --initrd) initrd=${2:?}; shift ;;
        --guest) guest=${2:?}; shift ;;
        --dir) dir=${2:?}; shift ;;
        --build) build=1 ;;
        --no-save) save=0 ;;
        --json) json=${2:?}; shift ;;
        -q) quiet=(-q) ;;
        -h|--help) sed -n '2,47p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number"
[[ "$clones" =~ ^([1-9][0-9]*(,[1-9][0-9]*)*)?$ ]] || die "--clones wants a list like 1,10,50"
[[ "$settle" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--settle wants a number of seconds"
IFS=, read -ra size_list <<<"$sizes"
for s in "${size_list[@]}" "$clone_mem"; do
    [[ "$s" =~ ^[1-9][0-9]*[MG]$ ]] || die "memory sizes look like 256M or 4G, got $s"
done
IFS=, read -ra be_list <<<"$backends"
for b in "${be_list[@]}"; do [[ "$b" == emu || "$b" == kvm ]] || die "unknown back end $b (emu, kvm)"; done
want() { [[ ",$backends," == *",$1,"* ]]; }

# ---------------------------------------------------------------- prerequisites
command -v python3 >/dev/null || die "python3 not found (scripts/install-deps.sh)"
if [ "$build" = 1 ]; then
    (cd "$repo" && cargo build --release -p ferrovisor -p test-guests) || die "cargo build failed"
fi
[ -x "$ferrovisor" ] || die "$ferrovisor not built (cargo build --release, --build, or --ferrovisor PATH)"
if want emu; then
    for f in "$kernel" "$initrd"; do
        [ -f "$f" ] || die "$f not found (scripts/fetch-guest-fixtures.sh)"
    done
fi
skipped=
if want kvm && ! [ -w /dev/kvm ]; then
    note "SKIPPING back end kvm: /dev/kvm is missing or not writable"
    skipped="kvm (no usable /dev/kvm)"
    backends=$(echo ",$backends," | sed 's/,kvm,/,/; s/^,//; s/,$//')
fi
if want kvm && [ -z "$guest" ]; then
    # Newest image the test-guests build script left in an OUT_DIR (release or debug).
    guest=$(find "$repo/target" -path '*/build/test-guests-*/out/*' -type f -name 'ftg-bzImage' \
                -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n1 | cut -d' ' -f2-)
    [ -n "$guest" ] || die "no test guest under target/ (cargo build --release -p test-guests, or --guest PATH)"
fi
[ -n "$backends" ] || die "no back end left to measure"
if [ "$peers" = 1 ] && ! command -v "$qemu" >/dev/null; then
    note "SKIPPING the QEMU peers: $qemu not found (scripts/install-deps.sh: qemu-system-x86)"
    skipped="${skipped:+$skipped; }QEMU peers ($qemu not found)"
    peers=0
fi

if [ -n "$dir" ]; then
    mkdir -p "$dir" || die "cannot create $dir"
    tmp=$(mktemp -d "$dir/snap.XXXXXX")
else
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/snap.XXXXXX")
fi
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------- guests and peers
q() { printf '%q' "$1"; }
lcmd="console=ttyS0 panic=-1 quiet ferrovisor.count"
fcmd="console=ttyS0 ftg.count=forever ftg.count_ms"
qcommon="-nodefaults -no-user-config -nographic -serial stdio -no-reboot"
args=()
if want emu; then
    args+=(--vm "emu::--backend emu --kernel $(q "$kernel") --initrd $(q "$initrd")::$lcmd=0"
           --clone-cmdline "emu::$lcmd=100")
    [ "$peers" = 0 ] ||
        args+=(--peer "emu::qemu-tcg::$(q "$qemu") -accel tcg -M pc $qcommon -kernel $(q "$kernel") -initrd $(q "$initrd")")
fi
if want kvm; then
    args+=(--vm "kvm::--backend kvm --kernel $(q "$guest")::$fcmd=0"
           --clone-cmdline "kvm::$fcmd=100")
    [ "$peers" = 0 ] ||
        args+=(--peer "kvm::qemu-microvm::$(q "$qemu") -M microvm -accel kvm -cpu host,-arch-capabilities $qcommon -kernel $(q "$guest")")
fi

results="$here/results"
mkdir -p "$results"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$(date +%s)
set +e
python3 "$harness" --ferrovisor "$ferrovisor" --sizes "$sizes" --runs "$runs" \
    --clones "$clones" --clone-memory "$clone_mem" --clone-count-ms 100 --settle "$settle" \
    --work "$tmp/work" --log-dir "$tmp/logs" ${json:+--json "$json"} \
    "${quiet[@]+"${quiet[@]}"}" "${args[@]}" >"$tmp/table.md"
rc=$?
set -e
secs=$(( $(date +%s) - t0 ))
load1=$(cut -d' ' -f1-3 /proc/loadavg)
cat "$tmp/table.md"
keep_failed_logs "$rc" "$tmp/logs" "$results" snapshot

if [ "$save" = 1 ]; then
    host_facts "$repo" "$qemu"
    fs=$(df -T "$tmp" 2>/dev/null | awk 'NR == 2 { print $2 " on " $1 }')
    fbuilt=$(date -u -r "$ferrovisor" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo "?")
    {
        echo
        echo "## $(date -u '+%Y-%m-%d %H:%M UTC') — snapshots, restore and clones"
        echo
        echo "- host: Linux $(uname -r), $cpu, $(nproc) CPUs, /dev/kvm by \`$kvm\`;" \
             "snapshots on $fs; load average $load0 before, $load1 after; took $secs s"
        echo "- ferrovisor: repository at $rev, binary $ferrovisor built $fbuilt; ${qv:-qemu: not found}"
        echo "- command: \`bench/snapshot.sh -n $runs --sizes $sizes --backends $backends" \
             "--clones '$clones' --clone-memory $clone_mem --settle $settle\`"
        [ -z "$skipped" ] || echo "- skipped: $skipped"
        for ((i = 0; i + 1 < ${#args[@]}; i += 2)); do
            spec=${args[i + 1]}
            case "${args[i]}" in
                --vm) echo "- ${spec%%::*}: \`ferrovisor run $(echo "$spec" | awk -F'::' '{ print $2 }')\`, cmdline \`${spec##*::}\`" ;;
                --clone-cmdline) echo "- ${spec%%::*} clones: cmdline \`${spec#*::}\`" ;;
                --peer) rest=${spec#*::}; echo "- ${spec%%::*} peer ${rest%%::*}: \`${rest#*::} -m SIZE -append CMDLINE -qmp ...\`" ;;
            esac
        done
        echo
        cat "$tmp/table.md"
    } >>"$results/snapshot.md"
    note "appended to $results/snapshot.md"
fi
exit "$rc"
