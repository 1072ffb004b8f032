use super::*;

fn ids() -> PciIds {
    PciIds {
        vendor: 0x1af4,
        device: 0x1041,
        revision: 0x01,
        class: 0x02,
        subclass: 0x00,
        prog_if: 0x00,
        subsystem_vendor: 0x1af4,
        subsystem_id: 0x1100,
    }
}

fn config() -> PciConfiguration {
    PciConfiguration::new(ids())
}

fn write32(config: &mut PciConfiguration, reg: usize, value: u32) {
    config.write_reg(reg, 0, &value.to_le_bytes());
}

#[test]
fn header_holds_the_ids_and_nothing_else() {
    let c = config();
    assert_eq!(c.read_reg(0), 0x1041_1af4);
    assert_eq!(c.read_reg(1), 0, "command and status");
    assert_eq!(
        c.read_reg(2),
        0x0200_0001,
        "class, subclass, prog IF, revision"
    );
    assert_eq!(c.read_reg(3), 0, "header type 0, single function");
    assert_eq!(c.read_reg(11), 0x1100_1af4, "subsystem");
    for reg in (4..=10).chain(12..64) {
        assert_eq!(c.read_reg(reg), 0, "reg {reg}");
    }
}

#[test]
fn reads_past_the_end_return_zero() {
    let c = config();
    for reg in [64, 65, 1000, usize::MAX] {
        assert_eq!(c.read_reg(reg), 0);
    }
}

#[test]
fn ids_class_and_header_type_are_read_only() {
    let mut c = config();
    for reg in [0, 2, 3, 11, 12, 13, 63] {
        let before = c.read_reg(reg);
        write32(&mut c, reg, 0xffff_ffff);
        write32(&mut c, reg, 0);
        assert_eq!(c.read_reg(reg), before, "reg {reg}");
    }
}

#[test]
fn command_has_only_the_documented_writable_bits() {
    let mut c = config();
    c.write_reg(1, 0, &[0xff, 0xff]);
    assert_eq!(c.command(), 0x0407);
    assert!(c.memory_enabled() && c.io_enabled() && c.bus_master());
    c.write_reg(1, 0, &[COMMAND_MEMORY_SPACE as u8]);
    assert_eq!(c.command(), 0x0402, "a byte write leaves the high byte");
    assert!(c.memory_enabled() && !c.io_enabled() && !c.bus_master());
    c.write_reg(1, 1, &[0]);
    assert_eq!(c.command(), 0x0002);
}

#[test]
fn status_error_bits_are_write_1_to_clear() {
    let mut c = config();
    // Pretend the device signalled a target abort and a master abort.
    c.write_bytes(STATUS_OFFSET, &0x3000u16.to_le_bytes());
    assert_eq!(c.read_reg(1) >> 16, 0x3000);
    // Writing 0s (as a command update does) changes nothing; a 1 clears just that bit.
    write32(&mut c, 1, COMMAND_MEMORY_SPACE.into());
    assert_eq!(c.read_reg(1), 0x3000_0002);
    c.write_reg(1, 2, &0x1000u16.to_le_bytes());
    assert_eq!(c.read_reg(1), 0x2000_0002);
    // Read-only status bits (capabilities list) are not cleared.
    c.write_bytes(STATUS_OFFSET, &0x0010u16.to_le_bytes());
    write32(&mut c, 1, 0xffff_0000);
    assert_eq!(c.read_reg(1) >> 16, 0x0010);
}

#[test]
fn interrupt_line_is_writable_and_pin_is_zero() {
    let mut c = config();
    write32(&mut c, 15, 0xffff_ffff);
    assert_eq!(c.read_reg(15), 0x0000_00ff);
    c.write_reg(15, 0, &[10]);
    assert_eq!(c.read_reg(15), 10);
}

#[test]
fn mem32_bar_sizing_and_programming() {
    let mut c = config();
    c.add_bar(0, 0x1000, BarKind::Mem32).unwrap();
    assert_eq!(c.read_reg(4), 0, "unplaced");
    write32(&mut c, 4, 0xffff_ffff);
    assert_eq!(c.read_reg(4), 0xffff_f000, "size mask, type 32-bit memory");
    assert_eq!(c.bar_addr(0), Some(0xffff_f000));
    write32(&mut c, 4, 0xc000_1234);
    assert_eq!(c.read_reg(4), 0xc000_1000, "low bits masked");
    assert_eq!(c.bar_addr(0), Some(0xc000_1000));
    assert_eq!(c.bar_size(0), Some(0x1000));
    assert_eq!(c.bar_kind(0), Some(BarKind::Mem32));
    // A byte write to the top byte moves just that byte.
    c.write_reg(4, 3, &[0xd0]);
    assert_eq!(c.bar_addr(0), Some(0xd000_1000));
}

#[test]
fn mem64_bar_takes_two_slots() {
    let mut c = config();
    c.add_bar(2, 0x4000, BarKind::Mem64 { prefetchable: true })
        .unwrap();
    assert_eq!(c.read_reg(6), 0b1100, "64-bit, prefetchable");
    assert_eq!(c.read_reg(7), 0);
    write32(&mut c, 6, 0xffff_ffff);
    write32(&mut c, 7, 0xffff_ffff);
    assert_eq!(c.read_reg(6), 0xffff_c00c);
    assert_eq!(c.read_reg(7), 0xffff_ffff);
    write32(&mut c, 6, 0xe000_0000);
    write32(&mut c, 7, 0x1);
    assert_eq!(c.bar_addr(2), Some(0x1_e000_0000));
    assert_eq!(c.read_reg(6), 0xe000_000c);
    // The upper half is not a BAR of its own.
    assert_eq!(c.bar_addr(3), None);
    assert_eq!(c.bar_size(3), None);
    assert_eq!(
        c.add_bar(3, 0x1000, BarKind::Mem32),
        Err(PciError::BarInUse(3))
    );
    assert_eq!(c.set_bar_addr(3, 0), Err(PciError::NoBar(3)));

    c.set_bar_addr(2, 0x40_0000_4000).unwrap();
    assert_eq!((c.read_reg(6), c.read_reg(7)), (0x0000_400c, 0x40));
}

#[test]
fn huge_mem64_bar_masks_the_upper_half() {
    let mut c = config();
    c.add_bar(
        0,
        1 << 36,
        BarKind::Mem64 {
            prefetchable: false,
        },
    )
    .unwrap();
    write32(&mut c, 4, 0xffff_ffff);
    write32(&mut c, 5, 0xffff_ffff);
    assert_eq!(c.read_reg(4), 0x0000_0004);
    assert_eq!(c.read_reg(5), 0xffff_fff0);
}

#[test]
fn io_bar_sizing() {
    let mut c = config();
    c.add_bar(5, 0x20, BarKind::Io).unwrap();
    assert_eq!(c.read_reg(9), 1);
    write32(&mut c, 9, 0xffff_ffff);
    assert_eq!(c.read_reg(9), 0xffff_ffe1);
    c.set_bar_addr(5, 0xc040).unwrap();
    assert_eq!(c.read_reg(9), 0xc041);
    assert_eq!(c.bar_addr(5), Some(0xc040));
}

#[test]
fn add_bar_rejects_bad_requests() {
    let mut c = config();
    let size_err = |size, kind| Err(PciError::BarSize { size, kind });
    assert_eq!(
        c.add_bar(6, 0x1000, BarKind::Mem32),
        Err(PciError::BarIndex(6))
    );
    assert_eq!(
        c.add_bar(
            5,
            0x1000,
            BarKind::Mem64 {
                prefetchable: false
            }
        ),
        Err(PciError::BarIndex(5))
    );
    assert_eq!(
        c.add_bar(
            usize::MAX,
            0x1000,
            BarKind::Mem64 {
                prefetchable: false
            }
        ),
        Err(PciError::BarIndex(usize::MAX))
    );
    for (size, kind) in [
        (0, BarKind::Mem32),
        (8, BarKind::Mem32),
        (0x1800, BarKind::Mem32),
        (1 << 32, BarKind::Mem32),
        (
            8,
            BarKind::Mem64 {
                prefetchable: false,
            },
        ),
        (2, BarKind::Io),
        (512, BarKind::Io),
    ] {
        assert_eq!(c.add_bar(0, size, kind), size_err(size, kind));
    }
    c.add_bar(0, 1 << 31, BarKind::Mem32).unwrap();
    assert_eq!(c.add_bar(0, 16, BarKind::Mem32), Err(PciError::BarInUse(0)));
    c.add_bar(2, 16, BarKind::Mem32).unwrap();
    assert_eq!(
        c.add_bar(
            1,
            16,
            BarKind::Mem64 {
                prefetchable: false
            }
        ),
        Err(PciError::BarInUse(2))
    );
    // Failed requests left the unused slots unused.
    assert_eq!(c.read_reg(5), 0);
    write32(&mut c, 5, 0xffff_ffff);
    assert_eq!(c.read_reg(5), 0);
}

#[test]
fn set_bar_addr_checks_alignment_and_width() {
    let mut c = config();
    c.add_bar(0, 0x1000, BarKind::Mem32).unwrap();
    c.add_bar(1, 0x100, BarKind::Io).unwrap();
    c.add_bar(
        2,
        0x1000,
        BarKind::Mem64 {
            prefetchable: false,
        },
    )
    .unwrap();
    let bad = |index, addr, size| Err(PciError::BarAddress { index, addr, size });
    assert_eq!(c.set_bar_addr(0, 0xc000_0800), bad(0, 0xc000_0800, 0x1000));
    assert_eq!(
        c.set_bar_addr(0, 0x1_0000_0000),
        bad(0, 0x1_0000_0000, 0x1000)
    );
    c.set_bar_addr(0, 0xffff_f000).unwrap();
    assert_eq!(c.set_bar_addr(1, 0x1_0000), bad(1, 0x1_0000, 0x100));
    c.set_bar_addr(1, 0xff00).unwrap();
    assert_eq!(
        c.set_bar_addr(2, 0xffff_ffff_ffff_f001),
        bad(2, 0xffff_ffff_ffff_f001, 0x1000)
    );
    c.set_bar_addr(2, 0xffff_ffff_ffff_f000).unwrap();
    assert_eq!(c.bar_addr(2), Some(0xffff_ffff_ffff_f000));
    assert_eq!(c.set_bar_addr(4, 0), Err(PciError::NoBar(4)));
    assert_eq!(c.set_bar_addr(100, 0), Err(PciError::NoBar(100)));
}

#[test]
fn capabilities_form_a_list() {
    let mut c = config();
    assert_eq!(c.read_reg(13), 0);
    let first = c.add_capability(0x09, &[0xaa, 0xbb, 0xcc]).unwrap();
    assert_eq!(first, 0x40);
    assert_eq!(c.read_reg(13), 0x40, "capability pointer");
    assert_ne!(
        c.read_reg(1) & (u32::from(STATUS_CAPABILITIES_LIST) << 16),
        0
    );
    assert_eq!(c.read_reg(0x10), 0xbbaa_0009, "id, next = 0, body");
    assert_eq!(c.read_reg(0x11), 0xcc);

    // Five bytes rounded up: the next capability is dword-aligned at 0x48.
    let second = c.add_capability(0x11, &[1; 10]).unwrap();
    assert_eq!(second, 0x48);
    assert_eq!(
        c.read_reg(0x10),
        0xbbaa_4809,
        "first now links to the second"
    );
    let third = c.add_capability(0x05, &[]).unwrap();
    assert_eq!(third, 0x54);

    // Walk the list as a guest does.
    let mut chain = Vec::new();
    let mut next = (c.read_reg(13) & 0xfc) as usize;
    while next != 0 {
        let header = c.read_reg(next / 4);
        chain.push((next, header as u8));
        next = ((header >> 8) & 0xfc) as usize;
    }
    assert_eq!(chain, vec![(0x40, 0x09), (0x48, 0x11), (0x54, 0x05)]);
}

#[test]
fn capability_headers_are_read_only_and_bodies_writable() {
    let mut c = config();
    let at = c.add_capability(0x11, &[0; 6]).unwrap();
    let reg = usize::from(at) / 4;
    write32(&mut c, reg, 0xffff_ffff);
    assert_eq!(c.read_reg(reg), 0xffff_0011);
    write32(&mut c, reg + 1, 0x1234_5678);
    assert_eq!(c.read_reg(reg + 1), 0x1234_5678);
    let mut body = [0u8; 6];
    c.read_bytes(usize::from(at) + 2, &mut body);
    assert_eq!(body, [0xff, 0xff, 0x78, 0x56, 0x34, 0x12]);
    // The padding after the body, and the space past the last capability, are read-only.
    c.write_reg(reg + 2, 0, &[0xff; 4]);
    assert_eq!(c.read_reg(reg + 2), 0);
    // The capability pointer is read-only too.
    write32(&mut c, 13, 0x80);
    assert_eq!(c.read_reg(13), u32::from(at));
}

#[test]
fn capabilities_must_fit_in_config_space() {
    let mut c = config();
    // 0x40 + 2 + 190 = 256: exactly full.
    assert_eq!(c.add_capability(0x09, &[0; 190]).unwrap(), 0x40);
    assert_eq!(
        c.add_capability(0x09, &[]),
        Err(PciError::CapabilitySpace { len: 0 })
    );
    let mut c = config();
    assert_eq!(
        c.add_capability(0x09, &[0; 191]),
        Err(PciError::CapabilitySpace { len: 191 })
    );
    assert_eq!(c.read_reg(13), 0, "nothing linked");
    assert_eq!(c.read_reg(1), 0, "no capabilities-list status bit");
}

#[test]
fn raw_byte_access_bypasses_the_rules_and_clips_at_the_end() {
    let mut c = config();
    c.write_bytes(0, &[0x34, 0x12]);
    assert_eq!(c.read_reg(0) & 0xffff, 0x1234);
    c.write_bytes(254, &[1, 2, 3, 4]);
    assert_eq!(c.read_reg(63), 0x0201_0000);
    let mut data = [0xaa; 4];
    c.read_bytes(254, &mut data);
    assert_eq!(data, [1, 2, 0, 0]);
    c.read_bytes(usize::MAX, &mut data);
    assert_eq!(data, [0; 4]);
    c.write_bytes(usize::MAX, &[1]);
}

#[test]
fn malformed_writes_are_ignored() {
    let mut c = config();
    c.add_bar(0, 0x1000, BarKind::Mem32).unwrap();
    c.add_capability(0x11, &[0, 0, 0, 0, 0, 0]).unwrap();
    let before: Vec<u32> = (0..64).map(|r| c.read_reg(r)).collect();
    // Past the register, past the space, absurd offsets: nothing changes.
    c.write_reg(4, 1, &[0xff; 4]);
    c.write_reg(4, 4, &[0xff]);
    c.write_reg(4, u64::MAX, &[0xff]);
    c.write_reg(64, 0, &[0xff; 4]);
    c.write_reg(usize::MAX, 0, &[0xff; 4]);
    c.write_reg(1, 0, &[0xff; 8]);
    c.write_reg(1, 0, &[]);
    let after: Vec<u32> = (0..64).map(|r| c.read_reg(r)).collect();
    assert_eq!(before, after);
}

#[test]
fn every_write_of_every_shape_is_safe() {
    let mut c = config();
    c.add_bar(0, 0x1000, BarKind::Mem32).unwrap();
    c.add_bar(
        2,
        0x4000,
        BarKind::Mem64 {
            prefetchable: false,
        },
    )
    .unwrap();
    c.add_bar(4, 0x10, BarKind::Io).unwrap();
    c.add_capability(0x11, &[0; 10]).unwrap();
    for reg in 0..70 {
        for offset in 0..6 {
            for len in [1, 2, 3, 4] {
                for value in [0x00, 0xff, 0x5a] {
                    c.write_reg(reg, offset, &vec![value; len]);
                    let _ = c.read_reg(reg);
                }
            }
        }
    }
    // The IDs survived.
    assert_eq!(c.read_reg(0), 0x1041_1af4);
    assert_eq!(c.read_reg(2), 0x0200_0001);
}

/// A header with a 64-bit BAR and a capability, programmed by a guest.
fn programmed() -> PciConfiguration {
    let mut c = config();
    c.add_bar(0, 0x1000, BarKind::Mem64 { prefetchable: true })
        .unwrap();
    c.add_capability(0x11, &[0, 0, 0, 0, 0, 0]).unwrap();
    write32(&mut c, 4, 0xfebf_1000);
    write32(&mut c, 5, 0x2);
    write32(
        &mut c,
        1,
        u32::from(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER),
    );
    write32(&mut c, 15, 0x0b);
    write32(&mut c, 0x40 / 4, 0x8001_0000 | 0x0011);
    c
}

fn fresh() -> PciConfiguration {
    let mut c = config();
    c.add_bar(0, 0x1000, BarKind::Mem64 { prefetchable: true })
        .unwrap();
    c.add_capability(0x11, &[0, 0, 0, 0, 0, 0]).unwrap();
    c
}

#[test]
fn a_saved_header_restores_what_the_guest_programmed() {
    let saved = programmed();
    let state: PciConfigurationState =
        serde_json::from_str(&serde_json::to_string(&saved.save_state()).unwrap()).unwrap();
    let mut c = fresh();
    c.restore_state(&state).unwrap();
    for reg in 0..NUM_CONFIG_REGS {
        assert_eq!(c.read_reg(reg), saved.read_reg(reg), "reg {reg}");
    }
    assert_eq!(c.bar_addr(0), Some(0x2_febf_1000));
    assert!(c.memory_enabled() && c.bus_master());
}

#[test]
fn a_header_of_another_function_or_layout_is_refused_unchanged() {
    let state = programmed().save_state();
    let mut other = PciConfiguration::new(PciIds {
        device: 0x1042,
        ..ids()
    });
    assert!(matches!(
        other.restore_state(&state),
        Err(PciStateError::Identity {
            saved_device: 0x1041,
            device: 0x1042,
            ..
        })
    ));
    // Same IDs, a 32-bit BAR instead: the BAR type bits differ.
    let mut c = config();
    c.add_bar(0, 0x1000, BarKind::Mem32).unwrap();
    c.add_capability(0x11, &[0, 0, 0, 0, 0, 0]).unwrap();
    let before = c.save_state();
    let err = c.restore_state(&state).unwrap_err();
    assert!(
        matches!(err, PciStateError::ReadOnly { offset: 0x10, .. }),
        "{err}"
    );
    assert_eq!(c.save_state(), before);

    let short = PciConfigurationState {
        bytes: vec![0; 100],
    };
    assert!(matches!(
        fresh().restore_state(&short),
        Err(PciStateError::ConfigLength(100))
    ));
}
