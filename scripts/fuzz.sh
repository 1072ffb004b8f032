#!/usr/bin/env bash
# Build the fuzz targets (fuzz/) with libFuzzer on the stable toolchain and run each for a
# bounded time.
#
#   scripts/fuzz.sh [-t SECONDS] [-j JOBS] [--build-only] [TARGET[=SECONDS]...]
#
#   -t SECONDS    time per emulator target (default 60); each virtio, vsock and parser
#                 (api_http, snapshot_state) target runs half as long (at least 1 s), so CI's
#                 `-t 60` takes 2 x 60 + 8 x 30 s
#   -j JOBS       parallel libFuzzer jobs per target (default 1)
#   --build-only  build, run nothing
#   TARGET        emu_exec, emu_decode_block, virtio_blk_request, virtio_blk_queue,
#                 virtio_pci_transport, virtio_net, virtio_balloon, vsock_packet, api_http,
#                 snapshot_state
#                 (default: all); TARGET=SECONDS runs it that long
#
# No nightly and no cargo-fuzz: the targets are built with plain `cargo build --release` and
# the SanitizerCoverage flags cargo-fuzz passes (without a sanitizer, which needs nightly),
# into fuzz/target so the main target/ is untouched. The corpus of each target lives in
# fuzz/corpus/<target> (only the seed-* files are in git), crashes in fuzz/artifacts/<target>.
# Exits 1 if any target found a crash, panic, mismatch, timeout or out-of-memory, after
# printing the path of each crashing input and how to reproduce it.
# Environment: EMU_FUZZ_SKIP=smc makes emu_exec skip inputs whose mismatch involves
# self-modifying code (see fuzz/README.md); unset, every mismatch fails. VIRTIO_FUZZ_HOSTILE=1
# lets the virtio targets make the ring states that hang virtio-blk today (fuzz/README.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
FUZZ="$ROOT/fuzz"
ALL_TARGETS=(emu_exec emu_decode_block virtio_blk_request virtio_blk_queue virtio_pci_transport
             virtio_net virtio_balloon vsock_packet api_http snapshot_state)

secs=60
jobs=1
build_only=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        -t) secs=${2:?-t needs a number of seconds}; shift 2 ;;
        -j) jobs=${2:?-j needs a number}; shift 2 ;;
        --build-only) build_only=1; shift ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz.sh: unknown option: $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
case "$secs" in ''|*[!0-9]*) echo "fuzz.sh: -t wants whole seconds" >&2; exit 2 ;; esac
# Seconds per target: TARGET=SECONDS, else -t for the emulator targets and half of it for the
# virtio, vsock and parser ones.
declare -A time_of=()
names=()
for arg in "${targets[@]}"; do
    t=${arg%%=*}
    if [ "$t" != "$arg" ]; then
        time_of[$t]=${arg#*=}
        case "${time_of[$t]}" in ''|*[!0-9]*) echo "fuzz.sh: $arg: whole seconds" >&2; exit 2 ;; esac
    else
        case "$t" in
            virtio_*|vsock_*|api_*|snapshot_*) time_of[$t]=$(( secs / 2 > 0 ? secs / 2 : 1 )) ;;
            *) time_of[$t]=$secs ;;
        esac
    fi
    [ -f "$FUZZ/fuzz_targets/$t.rs" ] || { echo "fuzz.sh: no target $t" >&2; exit 2; }
    names+=("$t")
done
targets=("${names[@]}")

# libFuzzer itself is C++, built by libfuzzer-sys with the cc crate.
if ! command -v c++ >/dev/null 2>&1; then
    SUDO=()
    [ "$(id -u)" -eq 0 ] || SUDO=(sudo -E)
    echo "fuzz.sh: installing g++ (libFuzzer is C++)"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq g++ >/dev/null
fi

HOST=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$FUZZ/target"
# What `cargo fuzz build --sanitizer none` passes (cargo-fuzz src/project.rs), minus nothing
# that needs nightly. `--target` keeps these flags off build scripts.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-sanitizer-coverage-stack-depth \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
-Clink-dead-code \
--cfg fuzzing"
unset CARGO_BUILD_RUSTFLAGS CARGO_ENCODED_RUSTFLAGS

bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
echo "fuzz.sh: building ${targets[*]} ($HOST, release + debug assertions, SanitizerCoverage)"
cargo build --manifest-path "$FUZZ/Cargo.toml" --release --target "$HOST" "${bins[@]}"
BIN="$CARGO_TARGET_DIR/$HOST/release"
[ "$build_only" -eq 0 ] || exit 0

# The emulator's own instruction tracing would change how it runs (every instruction
# single-stepped); never inherit it.
unset FERROVISOR_EMU_TRACE

failed=()
for t in "${targets[@]}"; do
    corpus="$FUZZ/corpus/$t"
    artifacts="$FUZZ/artifacts/$t"
    logdir="$FUZZ/target/logs/$t"
    mkdir -p "$corpus" "$artifacts" "$logdir"
    before=$(find "$artifacts" -maxdepth 1 -type f | sort)
    echo "fuzz.sh: running $t for ${time_of[$t]}s (corpus $corpus)"
    # A real one-vCPU snapshot state file is about 7 KiB; everything else fits in 4 KiB.
    max_len=4096
    [ "$t" != snapshot_state ] || max_len=16384
    args=(
        -max_total_time="${time_of[$t]}"
        -timeout=20
        -rss_limit_mb=4096
        -max_len="$max_len"
        -print_final_stats=1
        -artifact_prefix="$artifacts/"
    )
    rc=0
    if [ "$jobs" -gt 1 ]; then
        # -fork keeps going after a crash; -ignore_crashes=0 makes it stop and fail.
        args+=(-fork="$jobs" -ignore_crashes=0 -ignore_timeouts=0 -ignore_ooms=0)
    fi
    # Seeds first so a fresh checkout starts from them; new inputs go to the first directory.
    "$BIN/$t" "${args[@]}" "$corpus" >"$logdir/fuzz.log" 2>&1 || rc=$?
    # Last progress line (executions, coverage, exec/s) and the final stats.
    grep -E '^#[0-9]+' "$logdir/fuzz.log" | tail -n 1 || true
    grep -E '^(stat::|Done [0-9]+ runs)' "$logdir/fuzz.log" | tail -n 6 || true
    after=$(find "$artifacts" -maxdepth 1 -type f | sort)
    new=$(comm -13 <(echo "$before") <(echo "$after") | sed '/^$/d')
    if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
        echo "fuzz.sh: $t FAILED (libFuzzer exit $rc); log: $logdir/fuzz.log"
        # The report: the panic message or signal, and libFuzzer's summary.
        grep -E -A40 "panicked at|==[0-9]+== ERROR|deadly signal|SUMMARY" "$logdir/fuzz.log" \
            | head -n 120 || tail -n 60 "$logdir/fuzz.log"
        for f in $new; do
            echo "fuzz.sh: crashing input: $f"
            echo "fuzz.sh:   reproduce: $BIN/$t $f"
            echo "fuzz.sh:   hex: $(od -An -v -tx1 "$f" | tr -d ' \n' | head -c 8192)"
        done
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]}"
    echo "fuzz: $(( ${#targets[@]} - ${#failed[@]} )) passed, ${#failed[@]} failed"
    exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
