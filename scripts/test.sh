#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian machine: install what the tests need (Debian
# packages, the Linux guest fixtures), build everything, run every test.
#
#   scripts/test.sh [extra arguments for cargo nextest run]
#
# Tests that cannot run on this host (no /dev/kvm; KVM without hardware virtualization for a
# Linux guest) print "SKIPPED <test>: <reason>"; those lines are listed after the run, then a
# last line "tests: N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo >/dev/null 2>&1 ||
    { echo "test.sh: cargo not found; install Rust with rustup (https://rustup.rs)" >&2; exit 1; }

scripts/install-deps.sh --no-optional
scripts/fetch-guest-fixtures.sh

if cargo nextest --version >/dev/null 2>&1; then
    status=0
    cargo nextest run --workspace --no-fail-fast "$@" || status=$?
    report=target/nextest/default/junit.xml
    if [ -f "$report" ]; then
        python3 scripts/lib/test_report.py "$report" || status=1
    fi
    exit "$status"
else
    echo "test.sh: cargo-nextest not found, using cargo test" >&2
    cargo test --workspace --no-fail-fast "$@" -- --nocapture
fi
