//! Builds the tables into guest memory and parses them back from there.

use super::*;

const MEM_SIZE: usize = 16 << 20;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
}

/// A table read back from guest memory.
#[derive(Debug)]
struct Table {
    addr: u64,
    bytes: Vec<u8>,
}

/// Reads the SDT at `addr`, checking its signature, length and checksum.
fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Table {
    let header = read(mem, addr, 36);
    assert_eq!(&header[0..4], signature, "signature at {addr:#x}");
    let len = u32_at(&header, 4) as usize;
    assert!(
        len >= 36,
        "{} length {len}",
        String::from_utf8_lossy(signature)
    );
    let bytes = read(mem, addr, len);
    assert_eq!(
        sum(&bytes),
        0,
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    assert_eq!(&bytes[10..16], b"FRVSOR");
    assert_eq!(&bytes[16..24], b"FRVSRVM ");
    Table { addr, bytes }
}

/// Every table reachable from the RSDP.
struct Tables {
    rsdp: Table,
    xsdt: Table,
    fadt: Table,
    madt: Table,
    dsdt: Table,
}

fn parse(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Tables {
    let rsdp_addr = rsdp_addr.0;
    let rsdp = read(mem, rsdp_addr, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum");
    assert_eq!(&rsdp[9..15], b"FRVSOR");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
    assert_eq!(sum(&rsdp[0..36]), 0, "RSDP extended checksum");
    let xsdt_addr = u64_at(&rsdp, 24);

    let xsdt = read_table(mem, xsdt_addr, b"XSDT");
    assert_eq!((xsdt.bytes.len() - 36) % 8, 0);
    let entries: Vec<u64> = (36..xsdt.bytes.len())
        .step_by(8)
        .map(|off| u64_at(&xsdt.bytes, off))
        .collect();
    let mut fadt = None;
    let mut madt = None;
    for &entry in &entries {
        match &read(mem, entry, 4)[..] {
            b"FACP" => fadt = Some(read_table(mem, entry, b"FACP")),
            b"APIC" => madt = Some(read_table(mem, entry, b"APIC")),
            other => panic!("unexpected XSDT entry {other:?} at {entry:#x}"),
        }
    }
    assert_eq!(entries.len(), 2, "XSDT entries {entries:x?}");
    let fadt = fadt.expect("no FADT in the XSDT");
    let madt = madt.expect("no MADT in the XSDT");

    assert_eq!(u32_at(&fadt.bytes, 40), 0, "32-bit DSDT pointer unused");
    let dsdt = read_table(mem, u64_at(&fadt.bytes, 140), b"DSDT");

    Tables {
        rsdp: Table {
            addr: rsdp_addr,
            bytes: rsdp,
        },
        xsdt,
        fadt,
        madt,
        dsdt,
    }
}

fn build(vcpus: u8) -> (GuestMemoryMmap, Tables) {
    let mem = guest_memory();
    let rsdp = create_acpi_tables(&mem, &AcpiConfig::new(vcpus)).unwrap();
    assert_eq!(rsdp, layout::RSDP_START);
    assert_eq!(rsdp, GuestAddress(0xe0000));
    let tables = parse(&mem, rsdp);
    (mem, tables)
}

/// A GAS at `off`: (address space, bit width, bit offset, access size, address).
fn gas_at(b: &[u8], off: usize) -> (u8, u8, u8, u8, u64) {
    (
        b[off],
        b[off + 1],
        b[off + 2],
        b[off + 3],
        u64_at(b, off + 4),
    )
}

#[test]
fn tables_fit_in_the_acpi_area_and_do_not_overlap() {
    for vcpus in [1, 4, MAX_VCPUS] {
        let (_mem, t) = build(vcpus);
        let mut spans: Vec<(u64, u64)> = [&t.rsdp, &t.dsdt, &t.fadt, &t.madt, &t.xsdt]
            .iter()
            .map(|t| (t.addr, t.addr + t.bytes.len() as u64))
            .collect();
        assert_eq!(spans[0].0, 0xe0000, "RSDP first");
        for (start, end) in &spans {
            assert_eq!(start % 8, 0, "table at {start:#x} not aligned");
            assert!(
                *start >= 0xe0000 && *end <= 0x100000,
                "{start:#x}..{end:#x}"
            );
        }
        // Order: RSDP, DSDT, FADT, MADT, XSDT.
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:x?}");
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:x?}");
    }
}

#[test]
fn fadt_is_hardware_reduced_with_io_port_registers() {
    let (_mem, t) = build(1);
    let f = &t.fadt.bytes;
    assert_eq!(f.len(), 276, "ACPI 6.x FADT length");
    assert_eq!(f[8], 6, "FADT major revision");
    let flags = u32_at(f, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    let boot_arch = u16_at(f, 109);
    assert_ne!(boot_arch & (1 << 1), 0, "8042 present");
    assert_ne!(boot_arch & (1 << 2), 0, "VGA not present");
    assert_eq!(gas_at(f, 116), (1, 8, 0, 1, 0x602), "reset register");
    assert_eq!(f[128], 0x01, "reset value");
    assert_eq!(
        gas_at(f, 244),
        (1, 8, 0, 1, 0x600),
        "sleep control register"
    );
    assert_eq!(gas_at(f, 256), (1, 8, 0, 1, 0x601), "sleep status register");
    assert_eq!(u64_at(f, 140), t.dsdt.addr, "X_DSDT");
}

#[test]
fn fadt_uses_the_configured_ports() {
    let mem = guest_memory();
    let cfg = AcpiConfig {
        sleep_control_port: 0x700,
        sleep_status_port: 0x704,
        reset_port: 0xcf9,
        reset_value: 0x06,
        ..AcpiConfig::new(2)
    };
    let t = parse(&mem, create_acpi_tables(&mem, &cfg).unwrap());
    let f = &t.fadt.bytes;
    assert_eq!(gas_at(f, 116), (1, 8, 0, 1, 0xcf9));
    assert_eq!(f[128], 0x06);
    assert_eq!(gas_at(f, 244), (1, 8, 0, 1, 0x700));
    assert_eq!(gas_at(f, 256), (1, 8, 0, 1, 0x704));
}

#[test]
fn madt_lists_every_vcpu_and_the_io_apic() {
    for vcpus in [1u8, 4, MAX_VCPUS] {
        let (_mem, t) = build(vcpus);
        let m = &t.madt.bytes;
        assert_eq!(u32_at(m, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(m, 40), 0, "MADT flags");

        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut overrides = Vec::new();
        let mut off = 44;
        while off < m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            assert!(len >= 2 && off + len <= m.len(), "entry at {off}");
            let e = &m[off..off + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    // (UID, APIC ID, flags)
                    lapics.push((e[2], e[3], u32_at(e, 4)));
                }
                1 => {
                    assert_eq!(len, 12);
                    ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
                }
                2 => {
                    assert_eq!(len, 10);
                    overrides.push((e[2], e[3], u32_at(e, 4), u16_at(e, 8)));
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, m.len());

        let enabled = lapics.iter().filter(|l| l.2 & 1 != 0).count();
        assert_eq!(enabled, vcpus as usize);
        assert_eq!(lapics.len(), vcpus as usize);
        for (i, lapic) in lapics.iter().enumerate() {
            assert_eq!(*lapic, (i as u8, i as u8, 1));
        }
        assert_eq!(ioapics, vec![(vcpus, 0xfec0_0000, 0)]);
        // ISA bus 0, IRQ 0 -> GSI 2, flags 0.
        assert_eq!(overrides, vec![(0, 0, 2, 0)]);
    }
}

/// Decodes an AML PkgLength at `b[0..]`: (value, bytes used).
fn pkg_length(b: &[u8]) -> (usize, usize) {
    let follow = (b[0] >> 6) as usize;
    if follow == 0 {
        return ((b[0] & 0x3f) as usize, 1);
    }
    let mut len = (b[0] & 0x0f) as usize;
    for i in 0..follow {
        len |= (b[1 + i] as usize) << (4 + 8 * i);
    }
    (len, 1 + follow)
}

/// Decodes an AML integer constant at `b[0..]`.
fn aml_integer(b: &[u8]) -> u64 {
    match b[0] {
        0x00 => 0,
        0x01 => 1,
        0xff => u64::MAX,
        0x0a => b[1].into(),
        0x0b => u16_at(b, 1).into(),
        0x0c => u32_at(b, 1).into(),
        0x0e => u64_at(b, 1),
        op => panic!("not an integer constant: {op:#x}"),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[test]
fn dsdt_has_s5_com1_rtc_keyboard_and_processors() {
    for vcpus in [1u8, 4, MAX_VCPUS] {
        let (_mem, t) = build(vcpus);
        let d = &t.dsdt.bytes;
        assert_eq!(d[8], 2, "DSDT revision (64-bit integers)");
        let aml = &d[36..];

        // The DSDT body is two terms: Name (\_S5_, Package (4) { 5, 0, 0, 0 }), then
        // Scope (\_SB_) { ... } running to the end of the table.
        assert_eq!(&aml[0..6], b"\x08\\_S5_", "NameOp \\_S5_");
        assert_eq!(aml[6], 0x12, "_S5_ is not a package");
        let (len, used) = pkg_length(&aml[7..]);
        let elements = &aml[7 + used..];
        assert_eq!(elements[0], 4, "_S5_ element count");
        assert_eq!(aml_integer(&elements[1..]), 5, "SLP_TYP for S5");
        let scope = 7 + len;
        assert_eq!(aml[scope], 0x10, "ScopeOp");
        let (len, used) = pkg_length(&aml[scope + 1..]);
        assert_eq!(&aml[scope + 1 + used..scope + 6 + used], b"\\_SB_");
        assert_eq!(scope + 1 + len, aml.len(), "\\_SB_ scope length");

        // COM1: Device (COM1) { _HID EISAID ("PNP0501"), _UID 0, _CRS { IO, IRQNoFlags } }
        let com1 = find(aml, b"COM1").expect("no COM1");
        assert_eq!(&aml[com1 - 3..com1 - 1], &[0x5b, 0x82], "DeviceOp");
        let hid = find(aml, b"_HID\x0c").expect("no COM1 _HID");
        // EISAID("PNP0501") = 0x0105d041.
        assert_eq!(u32_at(aml, hid + 5), 0x0105_d041);
        assert!(find(aml, b"_UID\x00").is_some());
        let io_irq = [
            0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01,
            0x08, // IO (Decode16, 0x3f8, 0x3f8, 1, 8)
            0x22, 0x10, 0x00, // IRQNoFlags () { 4 }
            0x79, 0x00, // EndTag
        ];
        assert!(find(aml, &io_irq).is_some(), "COM1 _CRS");

        // RTC: Device (RTC_) { _HID EISAID ("PNP0B00"), _CRS { IO, IRQNoFlags } }
        let rtc = find(aml, b"RTC_").expect("no RTC_");
        assert_eq!(&aml[rtc - 3..rtc - 1], &[0x5b, 0x82], "DeviceOp");
        let (len, _) = pkg_length(&aml[rtc - 1..]);
        let rtc_body = &aml[rtc..rtc - 1 + len];
        let hid = find(rtc_body, b"_HID\x0c").expect("no RTC _HID");
        // EISAID("PNP0B00") = 0x000bd041.
        assert_eq!(u32_at(rtc_body, hid + 5), 0x000b_d041);
        let io_irq = [
            0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02, // IO (Decode16, 0x70, 0x70, 1, 2)
            0x22, 0x00, 0x01, // IRQNoFlags () { 8 }
            0x79, 0x00, // EndTag
        ];
        assert!(find(rtc_body, &io_irq).is_some(), "RTC _CRS");

        // Keyboard: Device (PS2K) { _HID EISAID ("PNP0303"), _CRS { IO, IO, IRQNoFlags } }
        let kbd = device_body(aml, b"PS2K").expect("no PS2K");
        let hid = find(kbd, b"_HID\x0c").expect("no PS2K _HID");
        // EISAID("PNP0303") = 0x0303d041.
        assert_eq!(u32_at(kbd, hid + 5), 0x0303_d041);
        let io_io_irq = [
            0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01, // IO (Decode16, 0x60, 0x60, 1, 1)
            0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01, // IO (Decode16, 0x64, 0x64, 1, 1)
            0x22, 0x02, 0x00, // IRQNoFlags () { 1 }
            0x79, 0x00, // EndTag
        ];
        assert!(find(kbd, &io_io_irq).is_some(), "PS2K _CRS");

        // One Device (Cxxx) { Name (_HID, "ACPI0007"), Name (_UID, i) } per vCPU.
        assert_eq!(count(aml, b"ACPI0007\0"), vcpus as usize);
        for i in 0..vcpus {
            let name = format!("C{i:03X}");
            let at = find(aml, name.as_bytes()).unwrap_or_else(|| panic!("no {name}"));
            assert_eq!(aml[at - 3..at - 1], [0x5b, 0x82], "{name} DeviceOp");
            let uid = at + find(&aml[at..], b"_UID").unwrap() + 4;
            assert_eq!(aml_integer(&aml[uid..]), u64::from(i), "{name} _UID");
        }
    }
}

/// The body of `Device (name)` in `aml`: from its name to the end of its package.
fn device_body<'a>(aml: &'a [u8], name: &[u8; 4]) -> Option<&'a [u8]> {
    let at = find(aml, name)?;
    // DeviceOp, then a PkgLength of 1 to 4 bytes (which counts itself), then the name.
    let (len, used) = (1..=4)
        .filter(|&n| at >= n + 2 && aml[at - n - 2..at - n] == [0x5b, 0x82])
        .map(|n| (n, pkg_length(&aml[at - n..])))
        .find(|&(n, (_, used))| n == used)
        .map(|(_, decoded)| decoded)
        .unwrap_or_else(|| panic!("no DeviceOp before {}", String::from_utf8_lossy(name)));
    Some(&aml[at..at - used + len])
}

/// The integer named `name` in `body` (`Name (name, integer)`).
fn named_integer(body: &[u8], name: &[u8; 4]) -> u64 {
    let at = find(body, name).unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(name)));
    assert_eq!(body[at - 1], 0x08, "NameOp");
    aml_integer(&body[at + 4..])
}

#[test]
fn dsdt_has_the_pci_root_bridge() {
    let (_mem, t) = build(2);
    let aml = &t.dsdt.bytes[36..];
    let pci = device_body(aml, b"PCI0").expect("no PCI0");
    // EISAID ("PNP0A08") = 0x080ad041, EISAID ("PNP0A03") = 0x030ad041.
    assert_eq!(named_integer(pci, b"_HID"), 0x080a_d041);
    assert_eq!(named_integer(pci, b"_CID"), 0x030a_d041);
    for name in [b"_ADR", b"_SEG", b"_UID", b"_BBN"] {
        assert_eq!(
            named_integer(pci, name),
            0,
            "{}",
            String::from_utf8_lossy(name)
        );
    }
    #[rustfmt::skip]
    let crs: &[u8] = &[
        // WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0, 0, 1)
        0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
        // IO (Decode16, 0xcf8, 0xcf8, 1, 8)
        0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08,
        // WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
        //         0, 0x0000, 0x0cf7, 0, 0x0cf8)
        0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03,
        0x00, 0x00, 0x00, 0x00, 0xf7, 0x0c, 0x00, 0x00, 0xf8, 0x0c,
        // WordIO (..., 0, 0x0d00, 0xffff, 0, 0xf300)
        0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03,
        0x00, 0x00, 0x00, 0x0d, 0xff, 0xff, 0x00, 0x00, 0x00, 0xf3,
        // DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
        //              ReadWrite, 0, 0xc0000000, 0xfbffffff, 0, 0x3c000000)
        0x87, 0x17, 0x00, 0x00, 0x0c, 0x01,
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0xc0,
        0xff, 0xff, 0xff, 0xfb,
        0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x3c,
        // EndTag
        0x79, 0x00,
    ];
    let at = find(pci, b"_CRS").expect("no _CRS");
    // Name (_CRS, Buffer (PkgLength) { BufferSize, bytes })
    assert_eq!(pci[at + 4], 0x11, "BufferOp");
    let (_, used) = pkg_length(&pci[at + 5..]);
    let size_at = at + 5 + used;
    assert_eq!(
        aml_integer(&pci[size_at..]),
        crs.len() as u64,
        "buffer size"
    );
    assert!(pci.ends_with(crs), "PCI0 _CRS {:02x?}", &pci[size_at..]);
}

#[test]
fn dsdt_has_no_pci_root_bridge_without_a_window() {
    let mem = guest_memory();
    let cfg = AcpiConfig {
        pci_mmio: None,
        ..AcpiConfig::new(2)
    };
    let t = parse(&mem, create_acpi_tables(&mem, &cfg).unwrap());
    let aml = &t.dsdt.bytes[36..];
    assert!(find(aml, b"PCI0").is_none());
    assert!(find(aml, b"COM1").is_some() && find(aml, b"C001").is_some());
}

#[test]
fn dsdt_has_no_keyboard_without_one() {
    let mem = guest_memory();
    let cfg = AcpiConfig {
        ps2_keyboard: None,
        ..AcpiConfig::default()
    };
    let t = parse(&mem, create_acpi_tables(&mem, &cfg).unwrap());
    let aml = &t.dsdt.bytes[36..];
    assert!(find(aml, b"PS2K").is_none());
    assert!(find(aml, b"COM1").is_some() && find(aml, b"PCI0").is_some());
}

#[test]
fn pci_window_may_end_at_4_gib() {
    let mem = guest_memory();
    let cfg = AcpiConfig {
        pci_mmio: Some(PciMmioWindow {
            start: GuestAddress(0xe000_0000),
            len_bytes: 0x2000_0000,
        }),
        ..AcpiConfig::default()
    };
    let t = parse(&mem, create_acpi_tables(&mem, &cfg).unwrap());
    let pci = device_body(&t.dsdt.bytes[36..], b"PCI0").unwrap();
    // Min 0xe0000000, max 0xffffffff, translation 0, length 0x20000000.
    let window = [
        0x00, 0x00, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0x00, 0x00, 0x00, 0x20,
    ];
    assert!(find(pci, &window).is_some());
}

#[test]
fn rejects_bad_configs() {
    let mem = guest_memory();
    for vcpus in [0, 255] {
        let err = create_acpi_tables(&mem, &AcpiConfig::new(vcpus)).unwrap_err();
        assert!(
            matches!(err, AcpiError::InvalidVcpuCount(v) if v == vcpus),
            "{err}"
        );
    }
    let cfg = AcpiConfig {
        s5_sleep_type: 8,
        ..AcpiConfig::default()
    };
    assert!(matches!(
        create_acpi_tables(&mem, &cfg),
        Err(AcpiError::InvalidSleepType(8))
    ));
    let cfg = AcpiConfig {
        com1_irq: 16,
        ..AcpiConfig::default()
    };
    assert!(matches!(
        create_acpi_tables(&mem, &cfg),
        Err(AcpiError::InvalidIrq {
            device: "COM1",
            irq: 16
        })
    ));
    let cfg = AcpiConfig {
        rtc_irq: 255,
        ..AcpiConfig::default()
    };
    let err = create_acpi_tables(&mem, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            AcpiError::InvalidIrq {
                device: "RTC",
                irq: 255
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "invalid RTC IRQ 255: must be an ISA IRQ (0..=15)"
    );
    let cfg = AcpiConfig {
        ps2_keyboard: Some(Ps2Keyboard {
            irq: 16,
            ..Ps2Keyboard::platform()
        }),
        ..AcpiConfig::default()
    };
    assert!(matches!(
        create_acpi_tables(&mem, &cfg),
        Err(AcpiError::InvalidIrq {
            device: "PS2K",
            irq: 16
        })
    ));
    for (start, len_bytes) in [(0xc000_0000, 0), (0xc000_0000, 0x4000_0001), (u64::MAX, 2)] {
        let cfg = AcpiConfig {
            pci_mmio: Some(PciMmioWindow {
                start: GuestAddress(start),
                len_bytes,
            }),
            ..AcpiConfig::default()
        };
        let err = create_acpi_tables(&mem, &cfg).unwrap_err();
        assert!(
            matches!(err, AcpiError::InvalidPciWindow { start: s, len_bytes: l } if s == start && l == len_bytes),
            "{err}"
        );
    }
    // Nothing was written.
    assert!(read(&mem, 0xe0000, 0x20000).iter().all(|b| *b == 0));
}

#[test]
fn missing_guest_memory_is_an_error() {
    // 512 KiB of RAM: the ACPI area is not backed.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 512 << 10)]).unwrap();
    let err = create_acpi_tables(&mem, &AcpiConfig::default()).unwrap_err();
    assert!(matches!(err, AcpiError::GuestMemory(_)), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn placement_aligns_and_bounds_tables() {
    assert_eq!(
        place([36, 100, 276], 0xe0000, 0x100000).unwrap(),
        [0xe0000, 0xe0030, 0xe00a0]
    );
    // Exactly filling the area is fine, one byte more is not.
    assert_eq!(place([16, 16], 0x1000, 0x1020).unwrap(), [0x1000, 0x1010]);
    let err = place([16, 17], 0x1000, 0x1020).unwrap_err();
    assert!(
        matches!(
            err,
            AcpiError::TablesTooLarge {
                end: 0x1021,
                limit: 0x1020
            }
        ),
        "{err}"
    );
    assert!(matches!(
        place([usize::MAX], u64::MAX - 8, u64::MAX),
        Err(AcpiError::TablesTooLarge { .. })
    ));
}

#[test]
fn default_config_matches_the_platform() {
    let cfg = AcpiConfig::default();
    assert_eq!(cfg.vcpus, 1);
    assert_eq!(
        (
            cfg.sleep_control_port,
            cfg.sleep_status_port,
            cfg.reset_port
        ),
        (0x600, 0x601, 0x602)
    );
    assert_eq!((cfg.reset_value, cfg.s5_sleep_type), (1, 5));
    assert_eq!((cfg.com1_port, cfg.com1_irq), (0x3f8, 4));
    assert_eq!((cfg.rtc_port, cfg.rtc_irq), (0x70, 8));
    assert_eq!(
        cfg.ps2_keyboard,
        Some(Ps2Keyboard {
            data_port: 0x60,
            command_port: 0x64,
            irq: 1
        })
    );
    assert_eq!(
        cfg.pci_mmio,
        Some(PciMmioWindow {
            start: GuestAddress(0xc000_0000),
            len_bytes: 0x3c00_0000
        })
    );
}
