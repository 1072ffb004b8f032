//! Debian's cloud kernel with the project's busybox initramfs (from
//! `scripts/fetch-guest-fixtures.sh`) boots to its marker on KVM, through both entry paths.
//! Needs hardware virtualization: on hosts whose /dev/kvm cannot run an unmodified kernel
//! (PVM, DESIGN.md) it prints SKIPPED; the emulator back end boots the same guest there.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

const MARKER: &str = "FERROVISOR-GUEST-READY";

fn fixtures_dir() -> PathBuf {
    std::env::var_os("FERROVISOR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// The fixture paths, or why this test cannot run here.
fn linux_guest(test: &str) -> Option<(PathBuf, PathBuf, PathBuf)> {
    if let Some(reason) = linux_on_kvm_unavailable() {
        eprintln!("SKIPPED {test}: {reason}");
        return None;
    }
    let dir = fixtures_dir();
    let files = (
        dir.join("vmlinuz"),
        dir.join("vmlinux"),
        dir.join("initramfs.cpio.gz"),
    );
    // With hardware virtualization present the fixtures are required: a missing fixture is a
    // broken setup, not a reason to skip.
    for f in [&files.0, &files.1, &files.2] {
        assert!(
            f.is_file(),
            "{f:?} missing: run scripts/fetch-guest-fixtures.sh"
        );
    }
    Some(files)
}

fn boot(kernel: &std::path::Path, initramfs: &std::path::Path, cpus: &str) -> RunResult {
    run(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initramfs.to_str().unwrap(),
            "--cpus",
            cpus,
            "--memory",
            "512M",
            "--cmdline",
            "console=ttyS0 panic=-1",
        ],
        b"",
        Duration::from_secs(120),
    )
}

#[test]
fn debian_bzimage_boots_to_init_and_powers_off() {
    let Some((vmlinuz, _, initramfs)) = linux_guest("debian_bzimage_boots_to_init_and_powers_off")
    else {
        return;
    };
    for cpus in ["1", "4"] {
        let r = boot(&vmlinuz, &initramfs, cpus);
        assert!(r.stdout.contains(MARKER), "{r}");
        assert_eq!(r.code, Some(0), "{r}");
    }
}

#[test]
fn debian_vmlinux_boots_through_pvh() {
    let Some((_, vmlinux, initramfs)) = linux_guest("debian_vmlinux_boots_through_pvh") else {
        return;
    };
    let r = boot(&vmlinux, &initramfs, "2");
    assert!(r.stdout.contains(MARKER), "{r}");
    assert_eq!(r.code, Some(0), "{r}");
}
