use super::*;
use crate::bus::BusError;
use crate::pci::COMMAND_MEMORY_SPACE;

const WINDOW: Range<u64> = 0xc000_0000..0xfc00_0000;
const PORT: u64 = PCI_CONFIG_PORT as u64;

/// A device with a 4 KiB 32-bit BAR 0 and a 16 KiB 64-bit BAR 2 that records what reaches it.
struct TestDevice {
    config: PciConfiguration,
    /// Byte every BAR read returns, plus the BAR index.
    fill: u8,
    writes: Vec<(usize, u64, Vec<u8>)>,
    moves: Vec<(usize, Option<u64>, Option<u64>)>,
}

impl TestDevice {
    fn new(fill: u8) -> Arc<Mutex<TestDevice>> {
        let mut config = PciConfiguration::new(PciIds {
            vendor: 0x1af4,
            device: 0x1041,
            class: 0x02,
            ..PciIds::default()
        });
        config.add_bar(0, 0x1000, BarKind::Mem32).unwrap();
        config
            .add_bar(
                2,
                0x4000,
                BarKind::Mem64 {
                    prefetchable: false,
                },
            )
            .unwrap();
        Arc::new(Mutex::new(TestDevice {
            config,
            fill,
            writes: Vec::new(),
            moves: Vec::new(),
        }))
    }
}

impl PciDevice for TestDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        data.fill(self.fill + index as u8);
        if let Some(first) = data.first_mut() {
            *first = offset as u8;
        }
    }
    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]) {
        self.writes.push((index, offset, data.to_vec()));
    }
    fn bar_moved(&mut self, index: usize, old: Option<u64>, new: Option<u64>) {
        self.moves.push((index, old, new));
    }
}

/// A device without BARs, to fill slots.
struct Plain(PciConfiguration);

impl PciDevice for Plain {
    fn config(&self) -> &PciConfiguration {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.0
    }
    fn bar_read(&mut self, _index: usize, _offset: u64, _data: &mut [u8]) {}
    fn bar_write(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
}

fn plain() -> Arc<Mutex<dyn PciDevice>> {
    Arc::new(Mutex::new(Plain(PciConfiguration::new(PciIds::default()))))
}

/// A root on a port-I/O bus, as the VMM wires it.
struct Machine {
    pio: Bus,
    mmio: Arc<Bus>,
    root: Arc<Mutex<PciRoot>>,
}

impl Machine {
    fn new() -> Machine {
        let mmio = Arc::new(Bus::new());
        let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), WINDOW)));
        let pio = Bus::new();
        pio.insert(root.clone(), PORT, PCI_CONFIG_PORT_LEN).unwrap();
        Machine { pio, mmio, root }
    }

    fn add(&self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        self.root.lock().unwrap().add_device(dev)
    }

    fn select(&self, slot: u8, reg: usize) {
        let address = 0x8000_0000 | (u32::from(slot) << 11) | ((reg as u32) << 2);
        self.pio.write(PORT, &address.to_le_bytes()).unwrap();
    }

    fn read(&self, slot: u8, reg: usize) -> u32 {
        self.select(slot, reg);
        let mut data = [0u8; 4];
        self.pio.read(PORT + 4, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    fn write(&self, slot: u8, reg: usize, value: u32) {
        self.select(slot, reg);
        self.pio.write(PORT + 4, &value.to_le_bytes()).unwrap();
    }

    fn mmio_read(&self, addr: u64) -> Result<u8, BusError> {
        let mut data = [0u8; 2];
        self.mmio.read(addr, &mut data)?;
        Ok(data[1])
    }
}

#[test]
fn host_bridge_answers_in_slot_0() {
    let m = Machine::new();
    assert_eq!(m.read(0, 0), 0x0d57_8086);
    assert_eq!(m.read(0, 2), 0x0600_0000, "class 06/00/00, revision 0");
    assert_eq!(m.read(0, 3), 0, "header type 0");
    for reg in 4..10 {
        assert_eq!(m.read(0, reg), 0, "no BAR {}", reg - 4);
        m.write(0, reg, 0xffff_ffff);
        assert_eq!(m.read(0, reg), 0, "no BAR {}", reg - 4);
    }
    assert_eq!(format!("{:?}", m.mmio), "[]");
}

#[test]
fn data_window_serves_bytes_and_words_at_their_offsets() {
    let m = Machine::new();
    m.select(0, 0);
    let mut byte = [0u8; 1];
    let bytes: Vec<u8> = (0..4)
        .map(|i| {
            m.pio.read(PORT + 4 + i, &mut byte).unwrap();
            byte[0]
        })
        .collect();
    assert_eq!(bytes, [0x86, 0x80, 0x57, 0x0d]);
    let mut word = [0u8; 2];
    m.pio.read(PORT + 6, &mut word).unwrap();
    assert_eq!(u16::from_le_bytes(word), 0x0d57);
    // An unaligned word inside the dword.
    m.pio.read(PORT + 5, &mut word).unwrap();
    assert_eq!(word, [0x80, 0x57]);

    // Byte and word writes reach the right bytes: the interrupt line, then the command.
    m.select(0, 15);
    m.pio.write(PORT + 4, &[0x0b]).unwrap();
    assert_eq!(m.read(0, 15), 0x0b);
    m.select(0, 1);
    m.pio.write(PORT + 4, &0x0006u16.to_le_bytes()).unwrap();
    assert_eq!(m.read(0, 1), 0x0006);
    m.select(0, 1);
    m.pio.write(PORT + 5, &[0x04]).unwrap();
    assert_eq!(m.read(0, 1), 0x0406);
}

#[test]
fn address_register_holds_only_its_defined_bits() {
    let m = Machine::new();
    let mut data = [0u8; 4];
    m.pio.read(PORT, &mut data).unwrap();
    assert_eq!(u32::from_le_bytes(data), 0);
    // Linux's type-1 probe: write the enable bit alone and read it back.
    m.pio.write(PORT, &0x8000_0000u32.to_le_bytes()).unwrap();
    m.pio.read(PORT, &mut data).unwrap();
    assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
    m.pio.write(PORT, &[0xff; 4]).unwrap();
    m.pio.read(PORT, &mut data).unwrap();
    assert_eq!(u32::from_le_bytes(data), 0x80ff_fffc);

    // Narrow accesses to the address ports neither change nor show it.
    m.pio.write(PORT + 3, &[0x01]).unwrap();
    m.pio.write(PORT, &[0, 0]).unwrap();
    m.pio.write(PORT + 2, &[0]).unwrap();
    let mut byte = [0u8; 1];
    m.pio.read(PORT, &mut byte).unwrap();
    assert_eq!(byte, [0xff]);
    let mut word = [0u8; 2];
    m.pio.read(PORT + 2, &mut word).unwrap();
    assert_eq!(word, [0xff; 2]);
    m.pio.read(PORT, &mut data).unwrap();
    assert_eq!(u32::from_le_bytes(data), 0x80ff_fffc);
    // A dword at 0xCF9..0xCFC straddles both registers: all ones.
    m.pio.read(PORT + 1, &mut data).unwrap();
    assert_eq!(data, [0xff; 4]);
}

#[test]
fn absent_functions_read_all_ones_and_ignore_writes() {
    let m = Machine::new();
    let dev = TestDevice::new(0);
    assert_eq!(m.add(dev.clone()).unwrap(), 1);
    let mut data = [0u8; 4];
    let read_at = |address: u32, data: &mut [u8; 4]| {
        m.pio.write(PORT, &address.to_le_bytes()).unwrap();
        m.pio.read(PORT + 4, data).unwrap();
        u32::from_le_bytes(*data)
    };
    // Empty slot 2, function 1 of slot 0, bus 1, enable bit clear.
    for address in [
        0x8000_1000,
        0x8000_0100,
        0x8001_0000,
        0x0000_0000,
        0x0000_0800,
    ] {
        assert_eq!(read_at(address, &mut data), 0xffff_ffff, "{address:#x}");
        m.pio.write(PORT + 4, &[0; 4]).unwrap();
    }
    // Slot 1 was not written through any of those aliases.
    assert_eq!(m.read(1, 0), 0x1041_1af4);
    assert_eq!(dev.lock().unwrap().config.command(), 0);
}

#[test]
fn add_device_places_bars_naturally_aligned_in_the_window() {
    let m = Machine::new();
    let a = TestDevice::new(0);
    let b = TestDevice::new(0);
    assert_eq!(m.add(a.clone()).unwrap(), 1);
    assert_eq!(m.add(b.clone()).unwrap(), 2);
    let a = a.lock().unwrap();
    let b = b.lock().unwrap();
    assert_eq!(a.config.bar_addr(0), Some(0xc000_0000));
    // The 16 KiB BAR goes to the next 16 KiB boundary.
    assert_eq!(a.config.bar_addr(2), Some(0xc000_4000));
    assert_eq!(b.config.bar_addr(0), Some(0xc000_8000));
    assert_eq!(b.config.bar_addr(2), Some(0xc000_c000));
    drop((a, b));
    assert_eq!(m.read(1, 4), 0xc000_0000);
    assert_eq!(m.read(1, 6), 0xc000_4004, "64-bit memory BAR");
    assert_eq!(m.read(1, 7), 0);
    // Decoding is off until the guest turns it on: nothing mapped yet.
    assert_eq!(format!("{:?}", m.mmio), "[]");
}

#[test]
fn add_device_fails_cleanly() {
    // A window with room for one device.
    let mmio = Arc::new(Bus::new());
    let mut root = PciRoot::new(mmio, 0xc000_0000..0xc000_8000);
    root.add_device(TestDevice::new(0)).unwrap();
    let second = TestDevice::new(0);
    assert_eq!(
        root.add_device(second.clone()),
        Err(PciError::WindowFull {
            index: 0,
            size: 0x1000
        })
    );
    assert_eq!(second.lock().unwrap().config.bar_addr(0), Some(0));

    // An I/O BAR is refused, and so is a device once the 31 slots are full.
    let mut config = PciConfiguration::new(PciIds::default());
    config.add_bar(1, 0x10, BarKind::Io).unwrap();
    let io = Arc::new(Mutex::new(Plain(config)));
    assert_eq!(root.add_device(io), Err(PciError::IoBar(1)));
    for slot in 2..32 {
        assert_eq!(root.add_device(plain()).unwrap(), slot);
    }
    assert_eq!(root.add_device(plain()), Err(PciError::NoFreeSlot));

    // A window above 4 GiB takes 64-bit BARs only.
    let mut root = PciRoot::new(Arc::new(Bus::new()), 0xffff_8000..0x1_0001_0000);
    let dev = TestDevice::new(0);
    dev.lock()
        .unwrap()
        .config
        .add_bar(4, 0x1000, BarKind::Mem32)
        .unwrap();
    // BAR 0 fits at 0xffff8000, BAR 2 at 0xffffc000; BAR 4 (32-bit) would start at 4 GiB.
    assert_eq!(
        root.add_device(dev.clone()),
        Err(PciError::WindowFull {
            index: 4,
            size: 0x1000
        })
    );
    assert_eq!(dev.lock().unwrap().config.bar_addr(0), Some(0));

    // An empty window places nothing but still takes devices without BARs.
    let mut root = PciRoot::new(Arc::new(Bus::new()), 0..0);
    assert!(matches!(
        root.add_device(TestDevice::new(0)),
        Err(PciError::WindowFull { .. })
    ));
    assert_eq!(root.add_device(plain()).unwrap(), 1);
}

#[test]
fn bars_map_while_memory_decoding_is_on() {
    let m = Machine::new();
    let dev = TestDevice::new(0x10);
    m.add(dev.clone()).unwrap();
    m.write(1, 1, COMMAND_MEMORY_SPACE.into());
    assert_eq!(m.mmio_read(0xc000_0000).unwrap(), 0x10);
    assert_eq!(m.mmio_read(0xc000_0ffe).unwrap(), 0x10);
    assert_eq!(m.mmio_read(0xc000_4000).unwrap(), 0x12, "BAR 2");
    m.mmio.write(0xc000_4010, &[1, 2, 3, 4]).unwrap();
    // The region is exactly the BAR: the gap after BAR 0 is empty.
    assert!(m.mmio_read(0xc000_1000).is_err());
    {
        let mut data = [0u8; 1];
        m.mmio.read(0xc000_0abc, &mut data).unwrap();
        assert_eq!(data, [0xbc], "offset within the BAR");
    }
    m.write(1, 1, 0);
    assert!(m.mmio_read(0xc000_0000).is_err());
    assert!(m.mmio_read(0xc000_4000).is_err());

    let dev = dev.lock().unwrap();
    assert_eq!(dev.writes, vec![(2, 0x10, vec![1, 2, 3, 4])]);
    assert_eq!(
        dev.moves,
        vec![
            (0, None, Some(0xc000_0000)),
            (2, None, Some(0xc000_4000)),
            (0, Some(0xc000_0000), None),
            (2, Some(0xc000_4000), None),
        ]
    );
}

#[test]
fn sizing_with_decoding_on_never_maps_the_size_mask() {
    let m = Machine::new();
    let dev = TestDevice::new(0);
    m.add(dev.clone()).unwrap();
    m.write(1, 1, COMMAND_MEMORY_SPACE.into());
    dev.lock().unwrap().moves.clear();

    // Linux leaves decoding on for host bridges while it sizes their BARs.
    m.write(1, 4, 0xffff_ffff);
    assert_eq!(m.read(1, 4), 0xffff_f000);
    m.write(1, 6, 0xffff_ffff);
    m.write(1, 7, 0xffff_ffff);
    assert_eq!((m.read(1, 6), m.read(1, 7)), (0xffff_c004, 0xffff_ffff));
    assert_eq!(format!("{:?}", m.mmio), "[]");
    m.write(1, 4, 0xc000_0000);
    m.write(1, 6, 0xc000_4000);
    // Low half back, high half still all ones: outside the window, not mapped.
    assert!(m.mmio_read(0xc000_4000).is_err());
    m.write(1, 7, 0);
    assert_eq!(m.mmio_read(0xc000_0000).unwrap(), 0);
    assert_eq!(m.mmio_read(0xc000_4000).unwrap(), 2);
    assert_eq!(
        dev.lock().unwrap().moves,
        vec![
            (0, Some(0xc000_0000), None),
            (2, Some(0xc000_4000), None),
            (0, None, Some(0xc000_0000)),
            (2, None, Some(0xc000_4000)),
        ]
    );
}

#[test]
fn guest_relocates_bars() {
    let m = Machine::new();
    let dev = TestDevice::new(0x20);
    m.add(dev.clone()).unwrap();
    m.write(1, 1, COMMAND_MEMORY_SPACE.into());
    dev.lock().unwrap().moves.clear();

    m.write(1, 4, 0xd000_0000);
    assert!(m.mmio_read(0xc000_0000).is_err());
    assert_eq!(m.mmio_read(0xd000_0000).unwrap(), 0x20);
    // A 64-bit BAR moved within the window, one half at a time.
    m.write(1, 6, 0xe000_0000);
    assert_eq!(m.mmio_read(0xe000_0000).unwrap(), 0x22);
    // Writing the upper half unchanged moves nothing.
    m.write(1, 7, 0);
    // Out of the window (above 4 GiB here): unmapped.
    m.write(1, 7, 1);
    assert!(m.mmio_read(0xe000_0000).is_err());
    assert_eq!(
        dev.lock().unwrap().moves,
        vec![
            (0, Some(0xc000_0000), Some(0xd000_0000)),
            (2, Some(0xc000_4000), Some(0xe000_0000)),
            (2, Some(0xe000_0000), None),
        ]
    );
    // The last bytes of the window are usable; the first ones past it, or below it, are not.
    m.write(1, 7, 0);
    m.write(1, 4, 0xfbff_f000);
    m.write(1, 6, 0xfbff_8000);
    assert_eq!(m.mmio_read(0xfbff_f000).unwrap(), 0x20);
    assert_eq!(m.mmio_read(0xfbff_8000).unwrap(), 0x22);
    m.write(1, 6, 0xfc00_0000);
    assert!(m.mmio_read(0xfc00_0000).is_err());
    m.write(1, 4, 0xbfff_f000);
    assert!(m.mmio_read(0xbfff_f000).is_err());
    assert_eq!(format!("{:?}", m.mmio), "[]");
}

#[test]
fn bar_moved_onto_another_device_is_left_unmapped() {
    let m = Machine::new();
    let a = TestDevice::new(0xa0);
    let b = TestDevice::new(0xb0);
    m.add(a.clone()).unwrap();
    m.add(b.clone()).unwrap();
    m.write(1, 1, COMMAND_MEMORY_SPACE.into());
    m.write(2, 1, COMMAND_MEMORY_SPACE.into());
    b.lock().unwrap().moves.clear();

    // B's BAR 0 onto A's BAR 0: refused, A keeps working.
    m.write(2, 4, 0xc000_0000);
    assert_eq!(m.read(2, 4), 0xc000_0000, "the register takes the value");
    assert_eq!(m.mmio_read(0xc000_0000).unwrap(), 0xa0);
    assert!(m.mmio_read(0xc000_8000).is_err(), "old range released");
    // Refused again after more writes, without retrying on each.
    m.write(2, 1, COMMAND_MEMORY_SPACE.into());
    assert_eq!(m.mmio_read(0xc000_0000).unwrap(), 0xa0);
    // Moved somewhere free, it maps again.
    m.write(2, 4, 0xc010_0000);
    assert_eq!(m.mmio_read(0xc010_0000).unwrap(), 0xb0);
    assert_eq!(
        b.lock().unwrap().moves,
        vec![(0, Some(0xc000_8000), None), (0, None, Some(0xc010_0000)),]
    );
}

#[test]
fn hostile_guest_cannot_panic_the_root() {
    let m = Machine::new();
    m.add(TestDevice::new(0)).unwrap();
    m.add(TestDevice::new(0)).unwrap();
    // A small xorshift generator: deterministic, no dependency.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..100_000 {
        let r = next();
        let port = PORT + (r & 7);
        let len = [1usize, 2, 4][((r >> 3) % 3) as usize];
        // Mostly addresses on bus 0 slots 0-3, so accesses reach real registers.
        let address = if r & (1 << 5) != 0 {
            0x8000_0000 | (((r >> 8) as u32) & 0x18fc)
        } else {
            (r >> 32) as u32
        };
        if r & (1 << 6) != 0 {
            let _ = m.pio.write(PORT, &address.to_le_bytes());
        }
        let value = (r >> 16).to_le_bytes();
        if r & (1 << 7) != 0 {
            let _ = m.pio.write(port, &value[..len]);
        } else {
            let _ = m.pio.read(port, &mut [0u8; 4][..len]);
        }
        let _ = m
            .mmio
            .read(0xc000_0000 + ((r >> 40) & 0xffff), &mut [0u8; 4]);
    }
    // Still serving configuration reads.
    assert_eq!(m.read(0, 0), 0x0d57_8086);
    assert_eq!(m.read(1, 0), 0x1041_1af4);
}

/// A machine with the test device in slot 1 and a plain one in slot 2, BARs programmed and
/// decoding on.
fn programmed_machine() -> (Machine, Arc<Mutex<TestDevice>>) {
    let m = Machine::new();
    let dev = TestDevice::new(0x10);
    m.add(dev.clone()).unwrap();
    m.add(plain()).unwrap();
    m.write(1, 4, 0xd000_0000);
    m.write(1, 6, 0xd010_0000);
    m.write(1, 1, u32::from(COMMAND_MEMORY_SPACE));
    m.write(0, 15, 0x0a);
    m.select(2, 0);
    (m, dev)
}

#[test]
fn a_restored_bus_maps_the_bars_where_the_guest_put_them() {
    let (m, _) = programmed_machine();
    let state = m.root.lock().unwrap().save_state();
    let state: PciRootState =
        serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

    // A new VM built the same way: BARs where add_device placed them, decoding off.
    let m2 = Machine::new();
    let dev2 = TestDevice::new(0x10);
    m2.add(dev2.clone()).unwrap();
    m2.add(plain()).unwrap();
    assert!(m2.mmio_read(0xd000_0000).is_err());
    m2.root.lock().unwrap().restore_state(&state).unwrap();
    assert_eq!(m2.root.lock().unwrap().save_state(), state);

    // The address latch: a data read goes to slot 2, register 0.
    let mut data = [0u8; 4];
    m2.pio.read(PORT, &mut data).unwrap();
    assert_eq!(u32::from_le_bytes(data), 0x8000_1000);
    assert_eq!(m2.read(0, 15), 0x0a, "host bridge interrupt line");
    assert_eq!(m2.read(1, 4), 0xd000_0000);
    assert_eq!(m2.mmio_read(0xd000_0000), Ok(0x10));
    assert_eq!(m2.mmio_read(0xd010_0000), Ok(0x12));
    let moves = dev2.lock().unwrap().moves.clone();
    assert!(moves.contains(&(0, None, Some(0xd000_0000))), "{moves:?}");
    assert!(moves.contains(&(2, None, Some(0xd010_0000))), "{moves:?}");
}

#[test]
fn a_bus_with_other_slots_refuses_the_state_unchanged() {
    let (m, _) = programmed_machine();
    let state = m.root.lock().unwrap().save_state();

    let fewer = Machine::new();
    fewer.add(TestDevice::new(0x10)).unwrap();
    let before = fewer.root.lock().unwrap().save_state();
    let err = fewer
        .root
        .lock()
        .unwrap()
        .restore_state(&state)
        .unwrap_err();
    assert!(matches!(err, PciStateError::SlotEmptyHere(2)), "{err}");
    assert_eq!(fewer.root.lock().unwrap().save_state(), before);

    let swapped = Machine::new();
    swapped.add(plain()).unwrap();
    swapped.add(TestDevice::new(0x10)).unwrap();
    let err = swapped
        .root
        .lock()
        .unwrap()
        .restore_state(&state)
        .unwrap_err();
    assert!(matches!(err, PciStateError::Slot { slot: 1, .. }), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}
