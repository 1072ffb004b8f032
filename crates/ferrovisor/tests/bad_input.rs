//! Every mistake a user can make on the command line gets one line on stderr naming the
//! problem, exit code 2, and no panic or backtrace.

mod common;

use std::time::Duration;

use common::*;

/// Runs `ferrovisor` with `args` and checks the usage-error contract; returns stderr.
fn usage_error(args: &[&str]) -> String {
    let r = run(args, b"", Duration::from_secs(30));
    assert_eq!(r.code, Some(2), "{args:?}: {r}");
    let stderr = r.stderr.trim_end();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{r}"
    );
    assert!(r.stdout.is_empty(), "nothing may boot: {r}");
    stderr.to_string()
}

/// A usage error from `ferrovisor` itself (not clap) is exactly one line.
fn one_line_error(args: &[&str]) -> String {
    let stderr = usage_error(args);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("ferrovisor: "), "{stderr}");
    stderr
}

fn kernel() -> String {
    test_guest_bzimage().to_str().unwrap().to_string()
}

#[test]
fn missing_kernel_file() {
    let e = one_line_error(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert!(
        e.contains("kernel") && e.contains("/nonexistent/vmlinuz"),
        "{e}"
    );
    assert!(e.contains("No such file"), "{e}");
}

#[test]
fn kernel_that_is_a_directory() {
    let e = one_line_error(&["run", "--kernel", "/tmp"]);
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn no_kernel_at_all() {
    let e = one_line_error(&["run"]);
    assert!(e.contains("--kernel"), "{e}");
}

#[test]
fn file_that_is_not_a_kernel() {
    if skip_without_kvm("file_that_is_not_a_kernel") {
        return;
    }
    let tmp = TempDir::new("notakernel");
    for (name, contents) in [
        (
            "text",
            b"#!/bin/sh\necho this is a shell script\n".repeat(100),
        ),
        ("empty", Vec::new()),
        ("zeros", vec![0u8; 8192]),
    ] {
        let path = tmp.file(name, &contents);
        let e = one_line_error(&["run", "--kernel", path.to_str().unwrap()]);
        assert!(e.contains("not a kernel"), "{name}: {e}");
    }
}

#[test]
fn truncated_elf_is_refused() {
    if skip_without_kvm("truncated_elf_is_refused") {
        return;
    }
    let tmp = TempDir::new("truncelf");
    let elf = std::fs::read(test_guest_pvh()).unwrap();
    let path = tmp.file("short.elf", &elf[..100]);
    let e = one_line_error(&["run", "--kernel", path.to_str().unwrap()]);
    assert!(e.contains("not a kernel"), "{e}");
}

#[test]
fn missing_initrd_file() {
    let e = one_line_error(&[
        "run",
        "--kernel",
        &kernel(),
        "--initrd",
        "/nonexistent/initrd.img",
    ]);
    assert!(e.contains("initrd") && e.contains("No such file"), "{e}");
}

#[test]
fn initrd_larger_than_guest_memory() {
    if skip_without_kvm("initrd_larger_than_guest_memory") {
        return;
    }
    let tmp = TempDir::new("bigintrd");
    let path = tmp.0.join("huge.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let e = one_line_error(&[
        "run",
        "--kernel",
        &kernel(),
        "--memory",
        "32M",
        "--initrd",
        path.to_str().unwrap(),
    ]);
    assert!(e.contains("initrd") && e.contains("more memory"), "{e}");
}

#[test]
fn cmdline_too_long() {
    let long = "x".repeat(5000);
    let e = one_line_error(&["run", "--kernel", &kernel(), "--cmdline", &long]);
    assert!(e.contains("command line is 5000 bytes"), "{e}");
}

#[test]
fn memory_too_small() {
    let e = one_line_error(&["run", "--kernel", &kernel(), "--memory", "8M"]);
    assert!(e.contains("--memory 8M is too small"), "{e}");
}

#[test]
fn memory_beyond_the_host() {
    let e = one_line_error(&["run", "--kernel", &kernel(), "--memory", "64T"]);
    assert!(e.contains("exceeds what this host can back"), "{e}");
}

#[test]
fn memory_size_that_does_not_parse() {
    let e = usage_error(&["run", "--kernel", &kernel(), "--memory", "lots"]);
    assert!(e.contains("'lots' is not a memory size"), "{e}");
}

#[test]
fn zero_cpus() {
    let e = one_line_error(&["run", "--kernel", &kernel(), "--cpus", "0"]);
    assert!(e.contains("--cpus must be at least 1"), "{e}");
}

#[test]
fn too_many_cpus() {
    let e = one_line_error(&["run", "--kernel", &kernel(), "--cpus", "300"]);
    assert!(e.contains("--cpus 300 exceeds the limit"), "{e}");
}

#[test]
fn bad_on_reboot_action() {
    let e = usage_error(&["run", "--kernel", &kernel(), "--on-reboot", "explode"]);
    assert!(e.contains("not a reboot action"), "{e}");
}

#[test]
fn unknown_flag() {
    let e = usage_error(&["run", "--kernel", &kernel(), "--frobnicate"]);
    assert!(e.contains("--frobnicate"), "{e}");
}

#[test]
fn config_file_missing_or_invalid() {
    let e = one_line_error(&["run", "--config", "/nonexistent/vm.toml"]);
    assert!(e.contains("cannot read the config file"), "{e}");

    let tmp = TempDir::new("badconfig");
    let typo = tmp.file("typo.toml", b"kernel = \"/k\"\ncpu = 2\n");
    let e = one_line_error(&["run", "--config", typo.to_str().unwrap()]);
    assert!(
        e.contains("invalid config file") && e.contains("cpu"),
        "{e}"
    );

    let syntax = tmp.file("broken.json", b"{\"kernel\": ");
    let e = one_line_error(&["run", "--config", syntax.to_str().unwrap()]);
    assert!(e.contains("invalid config file"), "{e}");
}

/// Without /dev/kvm the error says so and what to do. Runs the VMM in a private mount
/// namespace whose /dev is empty (needs root and unshare).
#[test]
fn missing_dev_kvm() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || which("unshare").is_none() {
        eprintln!("SKIPPED missing_dev_kvm: needs root and unshare(1) to hide /dev/kvm");
        return;
    }
    let script = format!(
        "mount -t tmpfs none /dev && exec {BIN} run --backend kvm --kernel {}",
        kernel()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
    assert!(stderr.contains("KVM is not available"), "{stderr}");
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}
