//! Debian's cloud kernel with the busybox initramfs on the emulator back end: boots to init on
//! 1 and 2 vCPUs, runs commands typed on the serial console (reading and setting the CMOS RTC
//! among them), powers off and reboots. The fixtures come from `scripts/fetch-guest-fixtures.sh`;
//! these tests need no /dev/kvm.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

const MARKER: &str = "FERROVISOR-GUEST-READY";
/// Generous: an interpreted boot takes about a minute on the development machines.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

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
    let host_before = unix_now();
    let r = shell_session(
        "echo LS-BEGIN; ls /; echo LS-END\n\
         grep -m1 'model name' /proc/cpuinfo\n\
         echo SPECTRE-V2=$(cat /sys/devices/system/cpu/vulnerabilities/spectre_v2)\n\
         dd if=/dev/zero bs=1M count=64 2>/dev/null | md5sum\n\
         a=$(date +%s); sleep 2; b=$(date +%s); echo DATE-DELTA=$((b - a))\n\
         echo RTC-NAME=$(cat /sys/class/rtc/rtc0/name)\n\
         echo RTC-EPOCH=$(cat /sys/class/rtc/rtc0/since_epoch)\n\
         date -u -s '2030-01-02 03:04:05' >/dev/null; hwclock -u -w\n\
         echo RTC-SET=$(cat /sys/class/rtc/rtc0/since_epoch)\n\
         cd /sys/bus/pci/devices/0000:00:00.0; echo PCI-HOST=$(cat vendor device class); cd /\n\
         poweroff -f\n",
    );
    let host_after = unix_now();
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
    // The emulated CPU reports enhanced IBRS: the kernel calls indirectly, no retpolines.
    let spectre = lines
        .iter()
        .find_map(|l| l.strip_prefix("SPECTRE-V2="))
        .unwrap_or_else(|| panic!("no spectre_v2 line: {r}"));
    assert!(
        spectre.contains("Enhanced / Automatic IBRS"),
        "{spectre}: {r}"
    );
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

    // The CMOS RTC: found through ACPI, read at boot, showing the host's time, settable.
    assert!(
        r.stdout.contains("rtc_cmos 00:01: registered as rtc0"),
        "{r}"
    );
    let value = |key: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}: {r}"))
            .trim()
    };
    assert!(value("RTC-NAME=").starts_with("rtc_cmos"), "{r}");
    let rtc: u64 = value("RTC-EPOCH=").parse().expect("RTC-EPOCH is a number");
    // A minute of slack either side for clock steps on the host.
    assert!(
        (host_before - 60..=host_after + 60).contains(&rtc),
        "RTC time {rtc} outside the test's {host_before}..={host_after}: {r}"
    );
    // 2030-01-02T03:04:05Z, written by hwclock and read back a moment later.
    let set: u64 = value("RTC-SET=").parse().expect("RTC-SET is a number");
    assert!(
        (1_893_553_445..=1_893_553_447).contains(&set),
        "RTC set by hwclock reads {set}: {r}"
    );

    // The PCI root bridge: found through ACPI, with the MMIO window of docs/platform.md and the
    // host bridge at 00:00.0.
    for line in [
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00])",
        "pci_bus 0000:00: root bus resource [mem 0xc0000000-0xfbffffff window]",
    ] {
        assert!(r.stdout.contains(line), "no {line:?}: {r}");
    }
    assert_eq!(value("PCI-HOST="), "0x8086 0x0d57 0x060000", "{r}");
}

/// The host's Unix time in seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
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

#[test]
fn deterministic_smp_boots_print_identical_consoles() {
    // Two vCPUs take turns in a fixed order, so even the interleaving of their console output
    // and the kernel's SMP bring-up repeat exactly.
    let run_once = || boot_with(&["--deterministic"], "2", "");
    let (a, b) = (run_once(), run_once());
    assert!(a.stdout.contains(MARKER), "{a}");
    assert!(
        a.stdout.contains("Brought up 1 node, 2 CPUs"),
        "the second vCPU must come online: {a}"
    );
    assert_eq!(a.code, Some(0), "{a}");
    assert_eq!(b.code, Some(0), "{b}");
    assert_eq!(a.stdout, b.stdout, "the two deterministic SMP boots differ");
}
