//! Debian's cloud kernel with the busybox initramfs on the emulator back end: boots to init on
//! 1 and 2 vCPUs, runs commands typed on the serial console, powers off and reboots. The
//! fixtures come from `scripts/fetch-guest-fixtures.sh`; these tests need no /dev/kvm.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use common::*;

const MARKER: &str = "FERROVISOR-GUEST-READY";
/// Generous: an interpreted boot takes about a minute on the development machines.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("FERROVISOR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"));
    let p = dir.join(name);
    // The emulator runs everywhere, so a missing fixture is a broken setup, not a skip.
    assert!(
        p.is_file(),
        "{p:?} missing: run scripts/fetch-guest-fixtures.sh"
    );
    p
}

fn args<'a>(kernel: &'a str, initrd: &'a str, cpus: &'a str, cmdline: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--backend",
        "emu",
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--cpus",
        cpus,
        "--memory",
        "512M",
        "--cmdline",
        cmdline,
    ]
}

fn boot(cpus: &str, extra_cmdline: &str) -> RunResult {
    boot_with(&[], cpus, extra_cmdline)
}

fn boot_with(flags: &[&str], cpus: &str, extra_cmdline: &str) -> RunResult {
    let kernel = fixture("vmlinuz");
    let initrd = fixture("initramfs.cpio.gz");
    let cmdline = format!("console=ttyS0 panic=-1 {extra_cmdline}");
    let mut a = args(
        kernel.to_str().unwrap(),
        initrd.to_str().unwrap(),
        cpus,
        &cmdline,
    );
    a.extend_from_slice(flags);
    run(&a, b"", BOOT_TIMEOUT)
}

#[test]
fn debian_kernel_boots_to_init_on_one_vcpu_and_powers_off() {
    let r = boot("1", "");
    assert!(r.stdout.contains(MARKER), "{r}");
    assert!(r.stdout.contains("reboot: Power down"), "{r}");
    assert_eq!(r.code, Some(0), "{r}");
}

#[test]
fn debian_kernel_brings_up_two_vcpus_on_emu() {
    let r = boot("2", "");
    assert!(r.stdout.contains(MARKER), "{r}");
    assert!(
        r.stdout.contains("Brought up 1 node, 2 CPUs"),
        "the second vCPU must come online: {r}"
    );
    assert_eq!(r.code, Some(0), "{r}");
}

/// Boots with a shell on the console, waits for the marker, types `script`, and returns
/// everything the guest printed.
fn shell_session(script: &str) -> RunResult {
    let kernel = fixture("vmlinuz");
    let initrd = fixture("initramfs.cpio.gz");
    let cmdline = "console=ttyS0 panic=-1 ferrovisor.shell=1";
    let mut child = spawn(&args(
        kernel.to_str().unwrap(),
        initrd.to_str().unwrap(),
        "1",
        cmdline,
    ));
    let rx = stream_stdout(&mut child);
    let mut seen = String::new();
    wait_for_output(&rx, &mut seen, MARKER, BOOT_TIMEOUT);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).unwrap();
    drop(stdin);
    let mut r = finish(child, BOOT_TIMEOUT);
    // The streamer ends at end of output; collect everything it still has.
    seen.extend(rx.iter());
    r.stdout = seen;
    r
}

#[test]
fn commands_typed_on_the_serial_console_run_on_emu() {
    let r = shell_session(
        "echo LS-BEGIN; ls /; echo LS-END\n\
         grep -m1 'model name' /proc/cpuinfo\n\
         dd if=/dev/zero bs=1M count=64 2>/dev/null | md5sum\n\
         a=$(date +%s); sleep 2; b=$(date +%s); echo DATE-DELTA=$((b - a))\n\
         poweroff -f\n",
    );
    assert_eq!(r.code, Some(0), "{r}");
    // The terminal echoes typed lines (twice: the tty, then the shell's line editor), so
    // look for output lines that stand alone.
    let lines: Vec<&str> = r.stdout.lines().map(|l| l.trim_end_matches('\r')).collect();
    let begin = lines.iter().position(|l| *l == "LS-BEGIN");
    let end = lines.iter().position(|l| *l == "LS-END");
    let ls = match (begin, end) {
        (Some(b), Some(e)) if b < e => lines[b + 1..e].join(" "),
        _ => panic!("no ls output: {r}"),
    };
    for entry in ["bin", "dev", "proc", "sys", "init"] {
        assert!(
            ls.split_whitespace().any(|w| w == entry),
            "ls / lists {entry}: {r}"
        );
    }
    assert!(r.stdout.contains("Ferrovisor emulated x86-64 CPU"), "{r}");
    // MD5 of 64 MiB of zeros.
    assert!(r.stdout.contains("7f614da9329cd3aebf59b91aadc30bf0"), "{r}");
    let delta: u64 = lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("DATE-DELTA=")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no DATE-DELTA: {r}"));
    assert!(
        (2..=4).contains(&delta),
        "date must advance with sleep 2, got {delta}: {r}"
    );
}

#[test]
fn reboot_from_the_guest_exits_with_3_on_emu() {
    let r = shell_session("reboot -f\n");
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("the guest rebooted"), "{r}");
}

#[test]
fn deterministic_boots_print_identical_consoles() {
    let run_once = || boot_with(&["--deterministic"], "1", "");
    let (a, b) = (run_once(), run_once());
    assert!(a.stdout.contains(MARKER), "{a}");
    assert_eq!(a.code, Some(0), "{a}");
    assert_eq!(b.code, Some(0), "{b}");
    // Kernel log timestamps included: guest time comes from the instruction count.
    assert_eq!(a.stdout, b.stdout, "the two deterministic boots differ");
}
