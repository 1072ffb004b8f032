#!/usr/bin/env bash
# Install the Debian packages Ferrovisor's build, tests, guest fixtures and benchmarks need.
#
#   scripts/install-deps.sh [--no-optional]
#
# Idempotent and non-interactive: packages already installed are skipped (checked with
# dpkg-query), `apt-get update` runs at most once and only when something must be installed.
# A second run with everything present takes well under a second.
#
# Required:
#   gcc binutils make      freestanding test guests (crates/test-guests)
#   libc6-dev              static C programs for the guest fixtures (vsock-test in rootfs.ext4)
#   cpio gzip xz-utils zstd lz4 e2fsprogs
#                          scripts/fetch-guest-fixtures.sh (initramfs, kernel payload,
#                          rootfs.ext4: mkfs.ext4, debugfs, e2fsck)
#   python3                fixture and benchmark helpers
#   qemu-system-x86        benchmark peer, fixture smoke tests
#   time                   /usr/bin/time for ad-hoc RSS measurements
# Optional (a failure to install them is reported but not fatal):
#   hyperfine
#   valgrind               bench/emu-cost.sh (cachegrind's counts of the emulator's work)
# Not installed: busybox-static (scripts/fetch-guest-fixtures.sh downloads it with
# `apt-get download` and only unpacks it into the initramfs and rootfs.ext4).
set -euo pipefail

REQUIRED=(gcc binutils make libc6-dev cpio gzip xz-utils zstd lz4 e2fsprogs python3 qemu-system-x86 time)
OPTIONAL=(hyperfine valgrind)

want_optional=1
for arg in "$@"; do
    case "$arg" in
        --no-optional) want_optional=0 ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install-deps.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

export DEBIAN_FRONTEND=noninteractive

is_installed() {
    # "install ok installed" only; half-installed or removed-with-config packages count as missing.
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing() {
    local p out=()
    for p in "$@"; do is_installed "$p" || out+=("$p"); done
    echo "${out[@]+"${out[@]}"}"
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -E); else
        echo "install-deps.sh: must run as root (or with sudo available)" >&2; exit 1
    fi
fi

updated=0
apt_update_once() {
    [ "$updated" = 1 ] && return 0
    echo "install-deps.sh: apt-get update" >&2
    if ! "${SUDO[@]}" apt-get -qq update >/dev/null; then
        echo "install-deps.sh: apt-get update failed (is the Debian archive reachable?)" >&2
        return 1
    fi
    updated=1
}

apt_install() {
    # Try without update first when the package lists are present: cheap, and works offline.
    local log rc
    log=$(mktemp)
    if ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 &&
        "${SUDO[@]}" apt-get -qq -y --no-install-recommends install "$@" >"$log" 2>&1; then
        rm -f "$log"; return 0
    fi
    apt_update_once || { rm -f "$log"; return 1; }
    if "${SUDO[@]}" apt-get -qq -y --no-install-recommends install "$@" >"$log" 2>&1; then
        rc=0
    else
        rc=$?; cat "$log" >&2
    fi
    rm -f "$log"
    return $rc
}

req=$(missing "${REQUIRED[@]}")
if [ -n "$req" ]; then
    echo "install-deps.sh: installing $req" >&2
    # shellcheck disable=SC2086
    if ! apt_install $req; then
        echo "install-deps.sh: ERROR: could not install: $req" >&2
        exit 1
    fi
fi

if [ "$want_optional" = 1 ]; then
    opt=$(missing "${OPTIONAL[@]}")
    if [ -n "$opt" ]; then
        echo "install-deps.sh: installing optional $opt" >&2
        # shellcheck disable=SC2086
        apt_install $opt || echo "install-deps.sh: warning: optional packages not installed: $opt" >&2
    fi
fi

still=$(missing "${REQUIRED[@]}")
if [ -n "$still" ]; then
    echo "install-deps.sh: ERROR: still missing after install: $still" >&2
    exit 1
fi
echo "install-deps.sh: all dependencies present" >&2
