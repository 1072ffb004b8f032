//! The PCI root bus: configuration mechanism #1, the host bridge, BAR placement and mapping.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    BarKind, PciConfiguration, PciConfigurationState, PciDevice, PciError, PciIds, PciStateError,
    CLASS_BRIDGE, NUM_BARS, SUBCLASS_HOST_BRIDGE,
};
use crate::bus::Bus;
use crate::BusDevice;

#[cfg(test)]
mod tests;

/// First I/O port of configuration mechanism #1: the address register at `0xCF8`, the data
/// window at `0xCFC`–`0xCFF`.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Number of ports [`PciRoot`] covers from [`PCI_CONFIG_PORT`].
pub const PCI_CONFIG_PORT_LEN: u64 = 8;

/// Vendor ID of the host bridge in slot 0: Intel's, with [`HOST_BRIDGE_DEVICE_ID`] — the pair
/// Cloud Hypervisor and Firecracker give their virtual host bridges. No Linux driver or quirk
/// matches it, so Linux treats the function as a plain host bridge by its class code, and
/// guests already tested on those VMMs see a familiar device.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Device ID of the host bridge in slot 0; see [`HOST_BRIDGE_VENDOR_ID`].
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;

/// Number of device slots on the bus; slot 0 is the host bridge.
const NUM_SLOTS: usize = 32;

/// Configuration address register (`0xCF8`): bit 31 enables the data window, bits 23–16 are
/// the bus, 15–11 the device (slot), 10–8 the function, 7–2 the register. Bits 30–24 and 1–0
/// are reserved and read 0.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
/// Offset of the data window within the eight ports.
const CONFIG_DATA_OFFSET: u64 = 4;

/// The host bridge: the function Linux looks for at 00:00.0 (any host bridge or VGA device on
/// bus 0 passes its configuration mechanism #1 sanity check). It has no BARs and no
/// capabilities.
struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(PciIds {
                vendor: HOST_BRIDGE_VENDOR_ID,
                device: HOST_BRIDGE_DEVICE_ID,
                class: CLASS_BRIDGE,
                subclass: SUBCLASS_HOST_BRIDGE,
                ..PciIds::default()
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn bar_read(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
}

/// The root bus as saved for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciRootState {
    /// The configuration address register (`0xCF8`) the guest last wrote.
    pub config_address: u32,
    /// By slot number: the function there, if any (slot 0 is the host bridge).
    pub slots: Vec<Option<PciSlotState>>,
}

/// One slot of a [`PciRootState`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciSlotState {
    pub config: PciConfigurationState,
    /// The BARs that were mapped on the MMIO bus, and where.
    pub mapped_bars: Vec<MappedBar>,
}

/// A BAR mapped on the MMIO bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MappedBar {
    pub index: usize,
    pub addr: u64,
}

/// One BAR of a device, as the MMIO bus sees it: forwards accesses to the device with the BAR
/// index.
struct BarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    index: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).bar_read(self.index, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).bar_write(self.index, offset, data);
    }
}

/// A memory BAR and where it is mapped.
struct BarMapping {
    index: usize,
    size: u64,
    region: Arc<Mutex<BarRegion>>,
    /// Where the guest last asked for the BAR to be decoded (`None`: nowhere). A mapping is
    /// only attempted when this changes, so a refused one is not retried on every access.
    wanted: Option<u64>,
    /// Where it is mapped on the MMIO bus.
    mapped: Option<u64>,
}

struct Slot {
    device: Arc<Mutex<dyn PciDevice>>,
    bars: Vec<BarMapping>,
}

/// PCI bus 0, reached through configuration mechanism #1: a [`BusDevice`] for the eight ports
/// at [`PCI_CONFIG_PORT`].
///
/// - `0xCF8`: the configuration address register, accessed as a dword only (narrower accesses
///   there read all ones and are otherwise ignored, as on Intel chipsets);
/// - `0xCFC`–`0xCFF`: the data window onto the register the address selects; byte, word and
///   dword accesses reach the matching bytes. With the enable bit clear, or for another bus, a
///   function other than 0, or an empty slot, reads return all ones and writes are dropped.
///
/// Slot 0 holds a host bridge (class 06/00/00, [`HOST_BRIDGE_VENDOR_ID`]:
/// [`HOST_BRIDGE_DEVICE_ID`]); [`add_device`](PciRoot::add_device) fills slots 1–31.
///
/// # BARs
///
/// Memory BARs are placed in the MMIO window given to [`new`](PciRoot::new), each naturally
/// aligned, in the order devices and BARs are added (a bump allocator: nothing is freed). A BAR
/// is mapped on the MMIO bus, forwarding to [`PciDevice::bar_read`]/[`PciDevice::bar_write`],
/// while the device's memory space decoding (command bit 1) is on and the BAR lies wholly inside
/// the window. So a BAR being sized (all ones) or programmed outside the window is not mapped,
/// and neither is one whose range would overlap something already on the bus (the guest moved
/// it onto another BAR, say): that is logged once and the BAR stays unmapped until the guest
/// programs it again. After every configuration write the root brings the mappings in step and
/// calls [`PciDevice::bar_moved`] for each BAR whose mapping changed. The root does not enable
/// decoding itself: the guest's driver does, as with firmware-assigned BARs on a PC.
///
/// # Locks
///
/// Lock order: the root, then a device; a BAR region, then its device. The root changes the
/// MMIO bus (whose lock is never held with any other) while it holds its own lock but no
/// device's. A device must not lock the root.
pub struct PciRoot {
    config_address: u32,
    /// Indexed by slot number.
    slots: Vec<Option<Slot>>,
    mmio_bus: Arc<Bus>,
    window: Range<u64>,
    /// Next free address in the window.
    next_mmio: u64,
    /// Whether a refused BAR mapping has been logged already.
    warned_overlap: bool,
}

impl PciRoot {
    /// Bus 0 with the host bridge in slot 0, placing BARs in `window` and mapping them on
    /// `mmio_bus`. An empty or reversed window places no BARs.
    pub fn new(mmio_bus: Arc<Bus>, window: Range<u64>) -> Self {
        let mut slots: Vec<Option<Slot>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(HostBridge::new())),
            bars: Vec::new(),
        });
        PciRoot {
            config_address: 0,
            slots,
            mmio_bus,
            next_mmio: window.start,
            window,
            warned_overlap: false,
        }
    }

    /// The MMIO window BARs are placed in.
    pub fn window(&self) -> Range<u64> {
        self.window.clone()
    }

    /// Plugs `device` into the first free slot and returns the slot number.
    ///
    /// Places each of the device's memory BARs in the window, naturally aligned (32-bit BARs
    /// below 4 GiB), and programs it with [`PciConfiguration::set_bar_addr`]. Fails, changing
    /// nothing, if no slot is free, the device has an I/O BAR, or the window has no room left.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoFreeSlot)?;

        let mut dev = lock(&device);
        let mut placed = Vec::new();
        let mut next = self.next_mmio;
        for index in 0..NUM_BARS {
            let (Some(size), Some(kind)) =
                (dev.config().bar_size(index), dev.config().bar_kind(index))
            else {
                continue;
            };
            if kind == BarKind::Io {
                return Err(PciError::IoBar(index));
            }
            // A 32-bit BAR must also end at or below 4 GiB, so that programming it below
            // cannot fail (and leave the device half-programmed).
            let limit = match kind {
                BarKind::Mem32 => self.window.end.min(1 << 32),
                _ => self.window.end,
            };
            let addr = next
                .checked_next_multiple_of(size)
                .filter(|addr| addr.checked_add(size).is_some_and(|end| end <= limit))
                .ok_or(PciError::WindowFull { index, size })?;
            next = addr + size;
            placed.push((index, size, addr));
        }
        for &(index, _, addr) in &placed {
            dev.config_mut().set_bar_addr(index, addr)?;
        }
        drop(dev);

        self.next_mmio = next;
        let bars = placed
            .into_iter()
            .map(|(index, size, _)| BarMapping {
                index,
                size,
                region: Arc::new(Mutex::new(BarRegion {
                    device: Arc::clone(&device),
                    index,
                })),
                wanted: None,
                mapped: None,
            })
            .collect();
        self.slots[slot] = Some(Slot { device, bars });
        self.sync_bars(slot);
        // `slot < NUM_SLOTS = 32`.
        Ok(slot as u8)
    }

    /// The bus's state for a snapshot: the address latch, and each function's configuration
    /// space and mapped BARs. Call with no vCPU running.
    pub fn save_state(&self) -> PciRootState {
        let slots = self
            .slots
            .iter()
            .map(|slot| {
                slot.as_ref().map(|Slot { device, bars }| PciSlotState {
                    config: lock(device).config().save_state(),
                    mapped_bars: bars
                        .iter()
                        .filter_map(|b| {
                            b.mapped.map(|addr| MappedBar {
                                index: b.index,
                                addr,
                            })
                        })
                        .collect(),
                })
            })
            .collect();
        PciRootState {
            config_address: self.config_address,
            slots,
        }
    }

    /// Puts back what [`save_state`](Self::save_state) returned, on a bus whose functions were
    /// added in the same slots and built the same way (checked: IDs, BARs and capability
    /// layout must match, else nothing changes). Each function's configuration space gets the
    /// saved command, BAR addresses, interrupt line and capability bodies, and its BARs are
    /// mapped again where they were, with [`PciDevice::bar_moved`] called as when the guest
    /// programs them (a virtio-pci function registers its queue notifications there).
    ///
    /// A device that mirrors configuration bits in its own state (the MSI-X enable bit, say)
    /// restores that with its own state; the order of the two does not matter.
    pub fn restore_state(&mut self, state: &PciRootState) -> Result<(), PciStateError> {
        if state.slots.len() != self.slots.len() {
            return Err(PciStateError::SlotCount {
                saved: state.slots.len(),
                here: self.slots.len(),
            });
        }
        for (slot, (saved, here)) in state.slots.iter().zip(&self.slots).enumerate() {
            match (saved, here) {
                (Some(saved), Some(here)) => lock(&here.device)
                    .config()
                    .check_state(&saved.config)
                    .map_err(|e| PciStateError::Slot {
                        slot,
                        source: Box::new(e),
                    })?,
                (Some(_), None) => return Err(PciStateError::SlotEmptyHere(slot)),
                (None, Some(_)) => return Err(PciStateError::SlotEmptyWhenSaved(slot)),
                (None, None) => {}
            }
        }
        self.config_address = state.config_address & CONFIG_ADDRESS_MASK;
        for (slot, saved) in state.slots.iter().enumerate() {
            let (Some(saved), Some(here)) = (saved, &self.slots[slot]) else {
                continue;
            };
            lock(&here.device)
                .config_mut()
                .restore_state(&saved.config)
                .map_err(|e| PciStateError::Slot {
                    slot,
                    source: Box::new(e),
                })?;
            self.sync_bars(slot);
            let bars = self.slots[slot].as_ref().map_or(&[][..], |s| &s.bars[..]);
            for want in &saved.mapped_bars {
                if !bars
                    .iter()
                    .any(|b| b.index == want.index && b.mapped == Some(want.addr))
                {
                    return Err(PciStateError::BarNotMapped {
                        slot,
                        index: want.index,
                        addr: want.addr,
                    });
                }
            }
        }
        Ok(())
    }

    /// The slot number, slot and register the address register selects, if it selects a
    /// present function.
    fn target(&self) -> Option<(usize, &Slot, usize)> {
        let address = self.config_address;
        let bus = (address >> 16) & 0xff;
        let slot = ((address >> 11) & 0x1f) as usize;
        let function = (address >> 8) & 0x7;
        let reg = ((address >> 2) & 0x3f) as usize;
        if address & CONFIG_ADDRESS_ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        Some((slot, self.slots.get(slot)?.as_ref()?, reg))
    }

    /// A read of `data.len()` bytes at byte `offset` of the data window.
    fn read_data(&self, offset: usize, data: &mut [u8]) {
        match self.target() {
            Some((_, Slot { device, .. }, reg)) if offset + data.len() <= 4 => {
                let value = lock(device).config_read(reg).to_le_bytes();
                data.copy_from_slice(&value[offset..offset + data.len()]);
            }
            _ => data.fill(0xff),
        }
    }

    /// A write of `data` at byte `offset` of the data window.
    fn write_data(&mut self, offset: usize, data: &[u8]) {
        match self.target() {
            Some((slot, Slot { device, .. }, reg)) if offset + data.len() <= 4 => {
                lock(device).config_write(reg, offset as u64, data);
                self.sync_bars(slot);
            }
            _ => {}
        }
    }

    /// Brings the MMIO mappings of the BARs in `slot` in step with the device's configuration,
    /// then tells the device about every BAR that moved.
    fn sync_bars(&mut self, slot: usize) {
        let Some(Slot { device, bars }) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if bars.is_empty() {
            return;
        }
        let mut wanted = [None; NUM_BARS];
        {
            let dev = lock(device);
            let config = dev.config();
            let decoding = config.memory_enabled();
            for bar in bars.iter() {
                wanted[bar.index] = config
                    .bar_addr(bar.index)
                    .filter(|&addr| decoding && in_window(&self.window, addr, bar.size));
            }
        }

        let mut moved = [None; NUM_BARS];
        for bar in bars.iter_mut() {
            let want = wanted[bar.index];
            if want == bar.wanted {
                continue;
            }
            bar.wanted = want;
            let old = bar.mapped.take();
            if let Some(base) = old {
                if let Err(e) = self.mmio_bus.remove(base) {
                    tracing::debug!(slot, bar = bar.index, "PCI: unmapping BAR: {e}");
                }
            }
            if let Some(base) = want {
                let region: Arc<Mutex<dyn BusDevice>> = bar.region.clone();
                match self.mmio_bus.insert(region, base, bar.size) {
                    Ok(()) => bar.mapped = Some(base),
                    Err(e) => {
                        if !self.warned_overlap {
                            self.warned_overlap = true;
                            tracing::warn!(
                                slot,
                                bar = bar.index,
                                "PCI: guest placed a BAR where it cannot be mapped, leaving it \
                                 unmapped (logged once): {e}"
                            );
                        }
                    }
                }
            }
            if old != bar.mapped {
                moved[bar.index] = Some((old, bar.mapped));
            }
        }

        if moved.iter().any(Option::is_some) {
            let mut dev = lock(device);
            for (index, change) in moved.into_iter().enumerate() {
                if let Some((old, new)) = change {
                    dev.bar_moved(index, old, new);
                }
            }
        }
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.config_address.to_le_bytes()),
            CONFIG_DATA_OFFSET..PCI_CONFIG_PORT_LEN => {
                self.read_data((offset - CONFIG_DATA_OFFSET) as usize, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(value) = <[u8; 4]>::try_from(data) {
                    self.config_address = u32::from_le_bytes(value) & CONFIG_ADDRESS_MASK;
                }
            }
            CONFIG_DATA_OFFSET..PCI_CONFIG_PORT_LEN => {
                self.write_data((offset - CONFIG_DATA_OFFSET) as usize, data)
            }
            _ => {}
        }
    }
}

/// Whether `[addr, addr + size)` lies inside `window`.
fn in_window(window: &Range<u64>, addr: u64, size: u64) -> bool {
    addr >= window.start && addr.checked_add(size).is_some_and(|end| end <= window.end)
}

/// Locks a device. A device that panicked during an access has untrustworthy state; as on the
/// bus, that ends the VM rather than running on.
fn lock<T: ?Sized>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device
        .lock()
        .expect("a PCI device panicked during an access: its state is not trustworthy")
}
