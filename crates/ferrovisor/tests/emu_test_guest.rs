//! The project's test guest on the emulator back end: the same boot paths, SMP start-up, timer,
//! kvm-clock and exit paths as on KVM, so the two back ends are interchangeable for the guest.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn run_emu(kernel: &Path, extra: &[&str], options: &str) -> RunResult {
    let cmdline = format!("console=ttyS0 {options}");
    let mut args = vec![
        "run",
        "--backend",
        "emu",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    run(&args, b"", Duration::from_secs(120))
}

fn reports_everything(kernel: &Path, entry: &str, cpus: u32) {
    let tmp = TempDir::new(entry);
    let initrd_bytes: Vec<u8> = (0..65_537u32).map(|i| (i * 13 + 7) as u8).collect();
    let initrd = tmp.file("initrd", &initrd_bytes);
    let cpus_s = cpus.to_string();
    let r = run_emu(
        kernel,
        &[
            "--memory",
            "128M",
            "--cpus",
            &cpus_s,
            "--initrd",
            initrd.to_str().unwrap(),
        ],
        "ftg.smp=1",
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.has_line(&format!("hello entry={entry}")), "{r}");
    assert_eq!(
        r.field("initrd", "fnv1a64"),
        Some(format!("{:#018x}", fnv1a64(&initrd_bytes))),
        "{r}"
    );
    assert_eq!(r.field("acpi", "madt_cpus"), Some(cpus_s.clone()), "{r}");
    for id in 1..cpus {
        assert!(
            r.has_line(&format!("cpu apic_id={id} online")),
            "AP {id}: {r}"
        );
    }
    assert!(r.has_line(&format!("cpus online={cpus}")), "{r}");
    let delta: u64 = r
        .field("kvmclock", "delta_ns")
        .unwrap_or_else(|| panic!("kvm-clock must tick: {r}"))
        .parse()
        .unwrap();
    assert!(delta > 0, "{r}");
    let timer = r
        .guest_lines()
        .into_iter()
        .find(|l| l.starts_with("timer "))
        .unwrap_or_default()
        .to_string();
    assert!(timer.ends_with(" ok"), "timer interrupts must arrive: {r}");
    assert!(r.has_line("action=poweroff"), "{r}");
}

#[test]
fn emu_bzimage_entry_one_vcpu() {
    reports_everything(&test_guest_bzimage(), "bzimage", 1);
}

#[test]
fn emu_pvh_entry_four_vcpus() {
    reports_everything(&test_guest_pvh(), "pvh", 4);
}

#[test]
fn emu_bzimage_entry_two_vcpus() {
    reports_everything(&test_guest_bzimage(), "bzimage", 2);
}

#[test]
fn emu_exit_paths_match_kvm() {
    let kernel = test_guest_bzimage();
    for (action, code, needle) in [
        ("poweroff", 0, ""),
        ("i8042-reset", 3, "reset request"),
        ("acpi-reset", 3, "reset request"),
        ("triple-fault", 3, "triple fault"),
        ("mmio-exec", 4, "emulation failure"),
    ] {
        let r = run_emu(
            &kernel,
            &["--memory", "64M"],
            &format!("ftg.quick=1 ftg.action={action}"),
        );
        assert_eq!(r.code, Some(code), "{action}: {r}");
        assert!(r.stderr.contains(needle), "{action}: {r}");
    }
}

#[test]
fn emu_serial_input_reaches_the_guest() {
    let kernel = test_guest_bzimage();
    let r = run(
        &[
            "run",
            "--backend",
            "emu",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 ftg.smp=0 ftg.echo=1",
        ],
        b"hello emulator\n",
        Duration::from_secs(120),
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.has_line("echo hello emulator"), "{r}");
}

#[test]
fn emu_deterministic_mode_gives_identical_output_across_runs() {
    deterministic_runs_match("1", "console=ttyS0 ftg.smp=0 ftg.count=5");
}

#[test]
fn emu_deterministic_smp_gives_identical_output_across_runs() {
    // The second vCPU starts and counts too; the vCPUs take turns in a fixed order.
    deterministic_runs_match("2", "console=ttyS0 ftg.smp=1 ftg.count=5");
}

/// Runs the test guest three times in deterministic mode with `cpus` vCPUs and `cmdline`;
/// the consoles must be identical, time-dependent lines included.
fn deterministic_runs_match(cpus: &str, cmdline: &str) {
    let kernel = test_guest_bzimage();
    let outputs: Vec<RunResult> = (0..3)
        .map(|_| {
            run(
                &[
                    "run",
                    "--backend",
                    "emu",
                    "--deterministic",
                    "--cpus",
                    cpus,
                    "--kernel",
                    kernel.to_str().unwrap(),
                    "--cmdline",
                    cmdline,
                ],
                b"",
                Duration::from_secs(120),
            )
        })
        .collect();
    for r in &outputs {
        assert_eq!(r.code, Some(0), "{r}");
        assert!(r.has_line("count 5"), "{r}");
        if cpus != "1" {
            assert!(r.has_line(&format!("cpus online={cpus}")), "{r}");
        }
        // Time-dependent lines are part of the output: with the host clock they differ.
        assert!(r.field("kvmclock", "delta_ns").is_some(), "{r}");
    }
    assert_eq!(outputs[0].stdout, outputs[1].stdout, "run 1 vs 2");
    assert_eq!(outputs[0].stdout, outputs[2].stdout, "run 1 vs 3");
}

#[test]
fn deterministic_mode_refuses_kvm() {
    let kernel = test_guest_bzimage();
    let args = [
        "run",
        "--deterministic",
        "--kernel",
        kernel.to_str().unwrap(),
        "--backend",
        "kvm",
    ];
    let r = run(&args, b"", Duration::from_secs(30));
    assert_eq!(r.code, Some(2), "{r}");
    assert!(
        r.stderr.contains("--deterministic needs the emulator"),
        "{r}"
    );
}
