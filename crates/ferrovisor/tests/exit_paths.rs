//! Every way a guest run ends, and the exit code `ferrovisor run` gives for it.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn run_action(action: &str) -> RunResult {
    run_test_guest(
        &test_guest_bzimage(),
        &["--memory", "64M"],
        &format!("ftg.quick=1 ftg.action={action}"),
    )
}

#[test]
fn poweroff_exits_0() {
    if skip_without_kvm("poweroff_exits_0") {
        return;
    }
    let r = run_action("poweroff");
    assert_eq!(r.code, Some(0), "{r}");
    assert!(
        r.stderr.trim().is_empty(),
        "a clean power-off prints nothing: {r}"
    );
}

#[test]
fn i8042_reset_exits_3() {
    if skip_without_kvm("i8042_reset_exits_3") {
        return;
    }
    let r = run_action("i8042-reset");
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("rebooted (reset request)"), "{r}");
}

#[test]
fn acpi_reset_exits_3() {
    if skip_without_kvm("acpi_reset_exits_3") {
        return;
    }
    let r = run_action("acpi-reset");
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("rebooted (reset request)"), "{r}");
}

#[test]
fn triple_fault_exits_3() {
    if skip_without_kvm("triple_fault_exits_3") {
        return;
    }
    let r = run_action("triple-fault");
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("triple fault"), "{r}");
}

#[test]
fn vcpu_failure_exits_4_with_reason_and_registers() {
    if skip_without_kvm("vcpu_failure_exits_4_with_reason_and_registers") {
        return;
    }
    let r = run_action("mmio-exec");
    assert_eq!(r.code, Some(4), "{r}");
    assert!(
        r.stderr
            .contains("vCPU 0 failed: internal error 1 (emulation failure)"),
        "{r}"
    );
    assert!(
        r.stderr.contains("rip=0x00000000d0000000"),
        "the dump shows where: {r}"
    );
    assert!(r.stderr.contains("cr3="), "{r}");
}

/// Starts a guest that halts forever, waits for its hello, sends `signal`.
fn stop_with_signal(signal: i32) -> RunResult {
    let kernel = test_guest_bzimage();
    let child = spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 ftg.quick=1 ftg.action=halt",
    ]);
    let pid = child.id() as i32;
    // Give the guest time to boot; the signal must stop it wherever it is.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid, signal) };
    finish(child, Duration::from_secs(20))
}

#[test]
fn sigterm_stops_cleanly_with_143() {
    if skip_without_kvm("sigterm_stops_cleanly_with_143") {
        return;
    }
    let r = stop_with_signal(libc::SIGTERM);
    assert_eq!(r.code, Some(143), "{r}");
    assert!(r.has_line("hello entry=bzimage"), "{r}");
    assert!(r.stderr.contains("stopped by SIGTERM"), "{r}");
}

#[test]
fn sigint_stops_cleanly_with_130() {
    if skip_without_kvm("sigint_stops_cleanly_with_130") {
        return;
    }
    let r = stop_with_signal(libc::SIGINT);
    assert_eq!(r.code, Some(130), "{r}");
}

#[test]
fn on_reboot_restart_boots_the_guest_again() {
    if skip_without_kvm("on_reboot_restart_boots_the_guest_again") {
        return;
    }
    let kernel = test_guest_bzimage();
    let mut child = spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--on-reboot",
        "restart",
        "--cmdline",
        "console=ttyS0 ftg.quick=1 ftg.action=i8042-reset",
    ]);
    // Read stdout until the guest has booted three times, then stop it.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        let start = Instant::now();
        while seen.matches("ftg: hello").count() < 3 && start.elapsed() < Duration::from_secs(30) {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    });
    let seen = reader.join().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = finish(child, Duration::from_secs(20));
    assert!(
        seen.matches("ftg: hello").count() >= 3,
        "guest booted again after reset: {seen}\n{r}"
    );
    assert_eq!(r.code, Some(143), "{r}");
}
