//! The project's test guest on KVM, through both boot paths: what it finds (boot info, e820,
//! cmdline, initrd, ACPI CPUs, vCPUs, kvm-clock, timer interrupts) matches what was asked for.

mod common;

use std::path::Path;

use common::*;

/// The e820 map docs/platform.md promises for a guest of `mib` MiB (below 3 GiB).
fn expected_e820(mib: u64) -> Vec<String> {
    vec![
        "e820 start=0x0 size=0x9fc00 type=1".into(),
        "e820 start=0x9fc00 size=0x400 type=2".into(),
        "e820 start=0xe0000 size=0x20000 type=2".into(),
        format!(
            "e820 start=0x100000 size={:#x} type=1",
            (mib << 20) - 0x10_0000
        ),
    ]
}

fn e820_lines(r: &RunResult) -> Vec<String> {
    r.guest_lines()
        .into_iter()
        .filter(|l| l.starts_with("e820 "))
        .map(str::to_string)
        .collect()
}

/// Boots `kernel` with 1 vCPU, 128 MiB and an initrd; checks every report of the guest.
fn boots_and_reports_boot_info(kernel: &Path, entry: &str) {
    let tmp = TempDir::new(entry);
    let initrd_bytes: Vec<u8> = (0..100_003u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let initrd = tmp.file("initrd.img", &initrd_bytes);
    let options = "ftg.smp=1 some.param=with-value";
    let r = run_test_guest(
        kernel,
        &[
            "--memory",
            "128M",
            "--cpus",
            "1",
            "--initrd",
            initrd.to_str().unwrap(),
        ],
        options,
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.has_line(&format!("hello entry={entry}")), "{r}");
    assert!(
        r.has_line(&format!("cmdline=console=ttyS0 {options}")),
        "{r}"
    );
    assert_eq!(e820_lines(&r), expected_e820(128), "{r}");
    assert_eq!(
        r.field("ram_total_kib", "ram_total_kib"),
        Some((((128u64 << 20) - 0x60400) / 1024).to_string()),
        "{r}"
    );
    assert_eq!(r.field("initrd", "size").as_deref(), Some("100003"), "{r}");
    assert_eq!(
        r.field("initrd", "fnv1a64"),
        Some(format!("{:#018x}", fnv1a64(&initrd_bytes))),
        "{r}"
    );
    let initrd_addr = u64::from_str_radix(
        r.field("initrd", "addr")
            .expect("initrd addr")
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert_eq!(initrd_addr % 4096, 0, "initrd page-aligned");
    assert!(initrd_addr + 100_003 <= 128 << 20, "initrd inside RAM");
    assert_eq!(r.field("acpi", "rsdp").as_deref(), Some("0xe0000"), "{r}");
    assert_eq!(r.field("acpi", "madt_cpus").as_deref(), Some("1"), "{r}");
    assert_eq!(r.field("acpi", "hw_reduced").as_deref(), Some("1"), "{r}");
    assert!(!r.stdout.contains("bad checksum"), "{r}");
    assert!(r.has_line("cpu apic_id=0 bsp"), "{r}");
    assert!(r.has_line("cpus online=1"), "{r}");
    let line = |start: &str| {
        r.guest_lines()
            .into_iter()
            .find(|l| l.starts_with(start))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("kvmclock ").starts_with("kvmclock ok delta_ns="),
        "kvm-clock must tick: {r}"
    );
    let delta: u64 = r.field("kvmclock", "delta_ns").unwrap().parse().unwrap();
    assert!(delta > 0, "{r}");
    assert!(
        line("timer ").ends_with(" ok"),
        "timer interrupts must arrive: {r}"
    );
    assert!(r.has_line("action=poweroff"), "{r}");
}

#[test]
fn bzimage_entry_gets_boot_params_e820_cmdline_and_initrd() {
    if skip_without_kvm("bzimage_entry_gets_boot_params_e820_cmdline_and_initrd") {
        return;
    }
    boots_and_reports_boot_info(&test_guest_bzimage(), "bzimage");
}

#[test]
fn pvh_entry_gets_start_info_e820_cmdline_and_initrd() {
    if skip_without_kvm("pvh_entry_gets_start_info_e820_cmdline_and_initrd") {
        return;
    }
    boots_and_reports_boot_info(&test_guest_pvh(), "pvh");
}

fn four_vcpus_come_online(kernel: &Path) {
    let r = run_test_guest(kernel, &["--cpus", "4", "--memory", "128M"], "ftg.smp=1");
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(r.field("acpi", "madt_cpus").as_deref(), Some("4"), "{r}");
    assert!(r.has_line("cpu apic_id=0 bsp"), "{r}");
    for id in 1..4 {
        assert!(
            r.has_line(&format!("cpu apic_id={id} online")),
            "AP {id}: {r}"
        );
    }
    assert!(r.has_line("cpus online=4"), "{r}");
}

#[test]
fn four_vcpus_start_through_init_sipi_bzimage() {
    if skip_without_kvm("four_vcpus_start_through_init_sipi_bzimage") {
        return;
    }
    four_vcpus_come_online(&test_guest_bzimage());
}

#[test]
fn four_vcpus_start_through_init_sipi_pvh() {
    if skip_without_kvm("four_vcpus_start_through_init_sipi_pvh") {
        return;
    }
    four_vcpus_come_online(&test_guest_pvh());
}

#[test]
fn three_gib_guest_sees_all_its_memory_below_the_hole() {
    if skip_without_kvm("three_gib_guest_sees_all_its_memory_below_the_hole") {
        return;
    }
    let r = run_test_guest(&test_guest_bzimage(), &["--memory", "3G"], "ftg.smp=0");
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(e820_lines(&r), expected_e820(3072), "{r}");
    let kib = ((3u64 << 30) - 0x60400) / 1024;
    assert_eq!(
        r.field("ram_total_kib", "ram_total_kib"),
        Some(kib.to_string()),
        "{r}"
    );
}

#[test]
fn five_gib_guest_has_ram_above_4_gib() {
    if skip_without_kvm("five_gib_guest_has_ram_above_4_gib") {
        return;
    }
    let r = run_test_guest(&test_guest_pvh(), &["--memory", "5G"], "ftg.smp=0");
    assert_eq!(r.code, Some(0), "{r}");
    let lines = e820_lines(&r);
    assert!(
        lines.contains(&"e820 start=0x100000 size=0xbff00000 type=1".to_string()),
        "{r}"
    );
    assert!(
        lines.contains(&"e820 start=0x100000000 size=0x80000000 type=1".to_string()),
        "{r}"
    );
}

#[test]
fn serial_input_reaches_the_guest_and_output_comes_back() {
    if skip_without_kvm("serial_input_reaches_the_guest_and_output_comes_back") {
        return;
    }
    let kernel = test_guest_bzimage();
    let r = run(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 ftg.smp=0 ftg.echo=1",
        ],
        b"typed on the console 0123456789\n",
        std::time::Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.has_line("ready for input"), "{r}");
    assert!(r.has_line("echo typed on the console 0123456789"), "{r}");
}

#[test]
fn config_file_gives_the_same_settings_as_flags() {
    if skip_without_kvm("config_file_gives_the_same_settings_as_flags") {
        return;
    }
    let tmp = TempDir::new("config");
    let kernel = test_guest_pvh();
    let toml = tmp.file(
        "vm.toml",
        format!(
            "kernel = {:?}\ncmdline = \"console=ttyS0 ftg.smp=1 from=toml\"\ncpus = 2\nmemory = \"192M\"\n",
            kernel
        )
        .as_bytes(),
    );
    let json = tmp.file(
        "vm.json",
        format!(
            r#"{{"kernel": {:?}, "cmdline": "console=ttyS0 ftg.smp=1 from=json", "cpus": 2, "memory": 192}}"#,
            kernel
        )
        .as_bytes(),
    );
    for (file, tag) in [(toml, "toml"), (json, "json")] {
        let r = run(
            &["run", "--config", file.to_str().unwrap()],
            b"",
            std::time::Duration::from_secs(60),
        );
        assert_eq!(r.code, Some(0), "{r}");
        assert!(
            r.has_line(&format!("cmdline=console=ttyS0 ftg.smp=1 from={tag}")),
            "{r}"
        );
        assert!(r.has_line("cpus online=2"), "{r}");
        assert_eq!(
            r.field("ram_total_kib", "ram_total_kib"),
            Some((((192u64 << 20) - 0x60400) / 1024).to_string()),
            "{r}"
        );
    }
}
