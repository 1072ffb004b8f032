#!/usr/bin/env bash
# Boot-time benchmark: Ferrovisor against QEMU, same guest, same marker.
#
#   bench/boot-time.sh [options]
#
# For each runner, N times (interleaved): wall time from process start to MARKER on the guest's
# serial console (stdout), wall time to process exit, and the VMM's peak RSS. Prints a Markdown
# table (min / median / max, ratio of medians vs the baseline) and appends a dated section to
# bench/results/boot-time.md (gitignored). The harness is bench/lib/measure.py.
#
# Profiles (-p):
#   ftg    (default) the freestanding test guest from crates/test-guests, cmdline
#          "console=ttyS0 ftg.quick=1", marker "ftg: hello". Runners:
#            ferrovisor    $FERROVISOR run --kernel GUEST --cmdline CMDLINE --memory 128M
#            qemu-microvm  qemu -M microvm -accel kvm -cpu host,-arch-capabilities -m 128 ...
#          baseline qemu-microvm.
#   linux  Debian's cloud kernel + busybox initramfs (scripts/fetch-guest-fixtures.sh), cmdline
#          "console=ttyS0 panic=-1", marker FERROVISOR-GUEST-READY. Runners:
#            ferrovisor    $FERROVISOR run --kernel vmlinuz --initrd initramfs.cpio.gz ... --memory 256M
#            qemu-tcg      qemu -accel tcg -M pc -m 256 ...
#          baseline qemu-tcg.
#
# Options:
#   -n N                runs per runner (default 20)       -w N   warm-up runs (default 1)
#   -p, --profile P     ftg | linux
#   --guest PATH        ftg guest image (default $FTG_GUEST, else the newest ftg-bzImage under
#                       target/ built by crates/test-guests)
#   --kernel PATH       linux profile kernel (default fixtures/vmlinuz)
#   --initrd PATH       linux profile initrd (default fixtures/initramfs.cpio.gz)
#   --ferrovisor PATH   VMM binary (default $FERROVISOR, else target/release/ferrovisor);
#                       the ferrovisor runner is skipped with a message when it is missing
#   --ferrovisor-args S extra arguments for `ferrovisor run` (default $FERROVISOR_ARGS)
#   --qemu PATH         (default $QEMU, else qemu-system-x86_64)
#   --marker S          override the marker      --cmdline S   override the guest cmdline
#   --runners A,B       only these runners (names as above, or ones added with --runner)
#   --runner 'NAME::COMMAND'
#                       add a runner (COMMAND split like a shell would); an existing NAME is
#                       replaced. Also $FERROVISOR_CMD / $QEMU_MICROVM_CMD / $QEMU_TCG_CMD
#                       replace the built-in command lines.
#   --baseline NAME     compare against NAME
#   --timeout S         seconds per run before it is killed (default 30; linux 120)
#   --build             cargo build --release -p ferrovisor -p test-guests first
#   --no-save           do not append to bench/results/boot-time.md
#   --json FILE         also write all samples as JSON
#   -q                  no per-run progress
#
# Examples:
#   bench/boot-time.sh -n 20
#   bench/boot-time.sh -p linux -n 10
#   bench/boot-time.sh -p linux --runner 'qemu-tcg-microvm::qemu-system-x86_64 -accel tcg \
#       -M microvm -m 256 -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
#       -kernel fixtures/vmlinux -initrd fixtures/initramfs.cpio.gz \
#       -append "console=ttyS0 panic=-1 tsc_early_khz=2000000"'
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
measure="$here/lib/measure.py"

die() { echo "boot-time: $*" >&2; exit 2; }
note() { echo "boot-time: $*" >&2; }
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

runs=20 warmup=1 profile=ftg guest=${FTG_GUEST:-} kernel= initrd= marker= cmdline= cmdline_set=0
ferrovisor=${FERROVISOR:-$repo/target/release/ferrovisor} fargs=${FERROVISOR_ARGS:-}
qemu=${QEMU:-qemu-system-x86_64} only= baseline= timeout= build=0 save=1 json= quiet=()
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        -n) runs=${2:?}; shift ;;
        -w) warmup=${2:?}; shift ;;
        -p|--profile) profile=${2:?}; shift ;;
        --guest) guest=${2:?}; shift ;;
        --kernel) kernel=${2:?}; shift ;;
        --initrd) initrd=${2:?}; shift ;;
        --ferrovisor) ferrovisor=${2:?}; shift ;;
        --ferrovisor-args) fargs=${2?}; shift ;;
        --qemu) qemu=${2:?}; shift ;;
        --marker) marker=${2:?}; shift ;;
        --cmdline) cmdline=${2?}; cmdline_set=1; shift ;;
        --runners) only=${2:?}; shift ;;
        --runner) extra+=("${2:?}"); shift ;;
        --baseline) baseline=${2:?}; shift ;;
        --timeout) timeout=${2:?}; shift ;;
        --build) build=1 ;;
        --no-save) save=0 ;;
        --json) json=${2:?}; shift ;;
        -q) quiet=(-q) ;;
        -h|--help) sed -n '2,52p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number"
command -v python3 >/dev/null || die "python3 not found (scripts/install-deps.sh)"

if [ "$build" = 1 ]; then
    (cd "$repo" && cargo build --release -p ferrovisor -p test-guests) || die "cargo build failed"
fi

q() { printf '%q' "$1"; }  # quote one word for the runner command strings

names=() cmds=()
add_runner() {  # NAME COMMAND: replaces an existing NAME
    local i
    for i in "${!names[@]}"; do
        if [ "${names[$i]}" = "$1" ]; then cmds[i]=$2; return; fi
    done
    names+=("$1"); cmds+=("$2")
}

ferrovisor_ok=1
if [ ! -x "$ferrovisor" ] && [ -z "${FERROVISOR_CMD:-}" ]; then
    ferrovisor_ok=0
fi

case "$profile" in
ftg)
    marker=${marker:-"ftg: hello"}
    [ "$cmdline_set" = 1 ] || cmdline="console=ttyS0 ftg.quick=1"
    timeout=${timeout:-30}
    baseline=${baseline:-qemu-microvm}
    if [ -z "$guest" ]; then
        # Newest image the test-guests build script left in an OUT_DIR (release or debug).
        guest=$(find "$repo/target" -path '*/build/test-guests-*/out/*' -type f \
                    \( -name 'ftg-bzImage' -o -name 'ftg.bzImage' -o -name 'ftg*bzImage' \) \
                    -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n1 | cut -d' ' -f2-)
        [ -n "$guest" ] || die "no test guest found under target/ (cargo build -p test-guests, or --guest PATH / FTG_GUEST)"
    fi
    [ -f "$guest" ] || die "guest image not found: $guest"
    note "guest: $guest"
    add_runner ferrovisor "${FERROVISOR_CMD:-$(q "$ferrovisor") run --kernel $(q "$guest") --cmdline $(q "$cmdline") --memory 128M $fargs}"
    add_runner qemu-microvm "${QEMU_MICROVM_CMD:-$(q "$qemu") -M microvm -accel kvm -cpu host,-arch-capabilities -m 128 -nodefaults -no-user-config -nographic -serial stdio -no-reboot -kernel $(q "$guest") -append $(q "$cmdline")}"
    ;;
linux)
    marker=${marker:-FERROVISOR-GUEST-READY}
    [ "$cmdline_set" = 1 ] || cmdline="console=ttyS0 panic=-1"
    timeout=${timeout:-120}
    baseline=${baseline:-qemu-tcg}
    kernel=${kernel:-$repo/fixtures/vmlinuz}
    initrd=${initrd:-$repo/fixtures/initramfs.cpio.gz}
    for f in "$kernel" "$initrd"; do
        [ -f "$f" ] || die "$f not found (scripts/fetch-guest-fixtures.sh)"
    done
    add_runner ferrovisor "${FERROVISOR_CMD:-$(q "$ferrovisor") run --kernel $(q "$kernel") --initrd $(q "$initrd") --cmdline $(q "$cmdline") --memory 256M $fargs}"
    add_runner qemu-tcg "${QEMU_TCG_CMD:-$(q "$qemu") -accel tcg -M pc -m 256 -nodefaults -no-user-config -nographic -serial stdio -no-reboot -kernel $(q "$kernel") -initrd $(q "$initrd") -append $(q "$cmdline")}"
    ;;
*) die "unknown profile: $profile (ftg or linux)" ;;
esac

for spec in "${extra[@]+"${extra[@]}"}"; do
    [[ "$spec" == *::* ]] || die "--runner wants NAME::COMMAND, got: $spec"
    add_runner "${spec%%::*}" "${spec#*::}"
done

args=() skipped=
for i in "${!names[@]}"; do
    n=${names[$i]}
    if [ -n "$only" ] && [[ ",$only," != *",$n,"* ]]; then continue; fi
    if [ "$n" = ferrovisor ] && [ "$ferrovisor_ok" = 0 ]; then
        note "SKIPPING runner ferrovisor: $ferrovisor not built (cargo build --release -p ferrovisor, or --ferrovisor PATH)"
        skipped="ferrovisor ($ferrovisor not built)"
        continue
    fi
    args+=(--runner "$n::${cmds[$i]}")
done
[ "${#args[@]}" -gt 0 ] || die "no runners left to measure"
if ! printf '%s\n' "${args[@]}" | grep -q "^$baseline::"; then
    note "baseline $baseline is not among the runners; ratios are against the last runner"
    baseline=
fi

results="$here/results"
mkdir -p "$results"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/boot-time.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

set +e
python3 "$measure" --marker "$marker" --runs "$runs" --warmup "$warmup" --timeout "$timeout" \
    ${baseline:+--baseline "$baseline"} --log-dir "$tmp/logs" ${json:+--json "$json"} \
    "${quiet[@]+"${quiet[@]}"}" "${args[@]}" >"$tmp/table.md"
rc=$?
set -e
cat "$tmp/table.md"
keep_failed_logs "$rc" "$tmp/logs" "$results" boot

if [ "$save" = 1 ]; then
    host_facts "$repo" "$qemu"
    {
        echo
        echo "## $(date -u '+%Y-%m-%d %H:%M UTC') — boot time, profile \`$profile\`"
        echo
        echo "- host: Linux $(uname -r), $cpu, $(nproc) CPUs, /dev/kvm by \`$kvm\`"
        echo "- ferrovisor: $rev; ${qv:-qemu: not found}"
        echo "- runs: $runs per runner after $warmup warm-up, interleaved; timeout ${timeout} s"
        [ -z "$skipped" ] || echo "- skipped: $skipped"
        echo
        for i in "${!names[@]}"; do
            printf '%s\n' "${args[@]}" | grep -q "^${names[$i]}::" || continue
            echo "- \`${names[$i]}\`: \`${cmds[$i]}\`"
        done
        echo
        cat "$tmp/table.md"
    } >>"$results/boot-time.md"
    note "appended to $results/boot-time.md"
fi
exit "$rc"
