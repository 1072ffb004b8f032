//! The type-0 configuration header of a PCI function.

use super::{
    BarKind, PciError, PciIds, PciStateError, CAPABILITY_POINTER_OFFSET, COMMAND_BUS_MASTER,
    COMMAND_INTX_DISABLE, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, CONFIG_SPACE_LEN, NUM_BARS,
    NUM_CONFIG_REGS, STATUS_CAPABILITIES_LIST,
};

#[cfg(test)]
mod tests;

const VENDOR_ID_OFFSET: usize = 0x00;
const DEVICE_ID_OFFSET: usize = 0x02;
const COMMAND_OFFSET: usize = 0x04;
const STATUS_OFFSET: usize = 0x06;
const REVISION_OFFSET: usize = 0x08;
const PROG_IF_OFFSET: usize = 0x09;
const SUBCLASS_OFFSET: usize = 0x0a;
const CLASS_OFFSET: usize = 0x0b;
const BAR0_OFFSET: usize = 0x10;
const SUBSYSTEM_VENDOR_OFFSET: usize = 0x2c;
const SUBSYSTEM_ID_OFFSET: usize = 0x2e;
const INTERRUPT_LINE_OFFSET: usize = 0x3c;
/// Capabilities go after the standard header.
const FIRST_CAPABILITY_OFFSET: usize = 0x40;

/// Command bits the guest may change; the rest read 0.
const COMMAND_WRITABLE: u16 =
    COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
/// Status bits that a write of 1 clears: master data parity error (8), signaled and received
/// target abort (11, 12), received master abort (13), signaled system error (14), detected
/// parity error (15). No device model sets them yet; the semantics are there for when one does.
const STATUS_WRITE_1_TO_CLEAR: u16 = 0xf900;

/// BAR register bits 0–3 of a memory BAR: bit 0 = 0 (memory), bits 1–2 the type (00: 32-bit,
/// 10: 64-bit), bit 3 prefetchable.
const BAR_MEM_TYPE_64: u32 = 0b10 << 1;
const BAR_MEM_PREFETCHABLE: u32 = 1 << 3;
const BAR_MEM_FLAGS_MASK: u32 = 0xf;
/// Bit 0 of an I/O BAR is 1; bit 1 is reserved.
const BAR_IO_SPACE: u32 = 1;
const BAR_IO_FLAGS_MASK: u32 = 0x3;

/// Smallest memory BAR (the four flag bits leave 16-byte granularity).
const MIN_MEM_BAR_SIZE: u64 = 16;
/// Largest 32-bit memory BAR: bit 31 must stay an address bit.
const MAX_MEM32_BAR_SIZE: u64 = 1 << 31;
/// Smallest and largest I/O BARs.
const MIN_IO_BAR_SIZE: u64 = 4;
const MAX_IO_BAR_SIZE: u64 = 256;

/// What a BAR register slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Empty,
    Bar {
        size: u64,
        kind: BarKind,
    },
    /// The upper 32 bits of the 64-bit BAR in the previous slot.
    Upper,
}

/// A configuration header as saved for a snapshot: its 256 bytes as the guest sees them.
///
/// Restoring takes from it only the bits the guest can change (command, BAR addresses,
/// interrupt line, capability bodies, write-1-to-clear status bits); every other bit must
/// match the header it is restored into, which is how a different function or layout is
/// recognised.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciConfigurationState {
    pub bytes: Vec<u8>,
}

/// A type-0 (endpoint) PCI configuration header: 256 bytes, accessed by the guest as 64
/// dword registers.
///
/// What the guest can change, byte by byte:
/// - vendor, device, revision, class code, header type (0, single function), subsystem IDs:
///   read-only;
/// - command: I/O space, memory space, bus master and INTx disable are writable, other bits
///   read 0;
/// - status: read-only except the error bits, which are write-1-to-clear;
/// - BARs: the address bits above the BAR's size are writable, the rest (size and type bits)
///   read-only, so writing all ones and reading back yields the size mask with the type bits;
///   unused slots read 0. The upper half of a 64-bit BAR is fully writable for BARs under
///   4 GiB;
/// - interrupt line: writable; interrupt pin: 0 (no INTx);
/// - capabilities: the ID and next-pointer bytes are read-only, the bodies writable as plain
///   bytes (devices whose capabilities have side effects intercept writes in
///   [`PciDevice::config_write`](super::PciDevice::config_write) first);
/// - everything else (cache line size, latency timer, BIST, expansion ROM, unused space) reads 0.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    bytes: [u8; CONFIG_SPACE_LEN],
    /// Bits the guest may set or clear with a write.
    writable: [u8; CONFIG_SPACE_LEN],
    /// Bits a guest write of 1 clears.
    write_1_to_clear: [u8; CONFIG_SPACE_LEN],
    bars: [BarSlot; NUM_BARS],
    /// Offset of the last capability in the list, whose next pointer links a new one.
    last_capability: Option<u8>,
    /// Where the next capability goes (dword-aligned).
    next_capability: usize,
}

impl PciConfiguration {
    /// A header with `ids`, command 0, no BARs and no capabilities.
    pub fn new(ids: PciIds) -> Self {
        let mut config = PciConfiguration {
            bytes: [0; CONFIG_SPACE_LEN],
            writable: [0; CONFIG_SPACE_LEN],
            write_1_to_clear: [0; CONFIG_SPACE_LEN],
            bars: [BarSlot::Empty; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY_OFFSET,
        };
        config.put_u16(VENDOR_ID_OFFSET, ids.vendor);
        config.put_u16(DEVICE_ID_OFFSET, ids.device);
        config.bytes[REVISION_OFFSET] = ids.revision;
        config.bytes[PROG_IF_OFFSET] = ids.prog_if;
        config.bytes[SUBCLASS_OFFSET] = ids.subclass;
        config.bytes[CLASS_OFFSET] = ids.class;
        config.put_u16(SUBSYSTEM_VENDOR_OFFSET, ids.subsystem_vendor);
        config.put_u16(SUBSYSTEM_ID_OFFSET, ids.subsystem_id);

        put_u16_in(&mut config.writable, COMMAND_OFFSET, COMMAND_WRITABLE);
        put_u16_in(
            &mut config.write_1_to_clear,
            STATUS_OFFSET,
            STATUS_WRITE_1_TO_CLEAR,
        );
        config.writable[INTERRUPT_LINE_OFFSET] = 0xff;
        config
    }

    /// Declares BAR `index` (`0..6`) of `size` bytes, at address 0 until the root places it.
    ///
    /// `size` must be a power of two: 16 bytes to 2 GiB for [`BarKind::Mem32`], at least
    /// 16 bytes for [`BarKind::Mem64`] (which also takes slot `index + 1`), 4 to 256 ports for
    /// [`BarKind::Io`].
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), PciError> {
        let slots = if matches!(kind, BarKind::Mem64 { .. }) {
            2
        } else {
            1
        };
        if index.checked_add(slots).is_none_or(|end| end > NUM_BARS) {
            return Err(PciError::BarIndex(index));
        }
        if let Some(taken) = (index..index + slots).find(|&i| self.bars[i] != BarSlot::Empty) {
            return Err(PciError::BarInUse(taken));
        }
        let (min, max) = match kind {
            BarKind::Mem32 => (MIN_MEM_BAR_SIZE, MAX_MEM32_BAR_SIZE),
            BarKind::Mem64 { .. } => (MIN_MEM_BAR_SIZE, 1 << 63),
            BarKind::Io => (MIN_IO_BAR_SIZE, MAX_IO_BAR_SIZE),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::BarSize { size, kind });
        }

        let offset = bar_offset(index);
        // Address bits at and above the size are writable; those below read 0.
        let address_mask = !(size - 1);
        let (flags, flags_mask) = bar_flags(kind);
        self.put_u32(offset, flags);
        put_u32_in(
            &mut self.writable,
            offset,
            address_mask as u32 & !flags_mask,
        );
        self.bars[index] = BarSlot::Bar { size, kind };
        if slots == 2 {
            let upper = offset + 4;
            self.put_u32(upper, 0);
            put_u32_in(&mut self.writable, upper, (address_mask >> 32) as u32);
            self.bars[index + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// Appends a capability with ID `id` and `body` (the bytes after the ID and next pointer)
    /// to the capability list, and returns its offset in configuration space.
    ///
    /// Capabilities are laid out from `0x40` on, each dword-aligned.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u8, PciError> {
        let start = self.next_capability;
        let end = body
            .len()
            .checked_add(2)
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= CONFIG_SPACE_LEN)
            .ok_or(PciError::CapabilitySpace { len: body.len() })?;
        // `start < 256` because `end <= 256`; the conversion cannot fail.
        let pointer =
            u8::try_from(start).map_err(|_| PciError::CapabilitySpace { len: body.len() })?;

        self.bytes[start] = id;
        self.bytes[start + 1] = 0;
        self.bytes[start + 2..end].copy_from_slice(body);
        self.writable[start + 2..end].fill(0xff);
        match self.last_capability {
            Some(last) => self.bytes[usize::from(last) + 1] = pointer,
            None => {
                self.bytes[CAPABILITY_POINTER_OFFSET] = pointer;
                let status = self.get_u16(STATUS_OFFSET) | STATUS_CAPABILITIES_LIST;
                self.put_u16(STATUS_OFFSET, status);
            }
        }
        self.last_capability = Some(pointer);
        self.next_capability = end.next_multiple_of(4);
        Ok(pointer)
    }

    /// Configuration register `reg` (`0..64`); 0 past the end.
    pub fn read_reg(&self, reg: usize) -> u32 {
        if reg >= NUM_CONFIG_REGS {
            return 0;
        }
        self.get_u32(reg * 4)
    }

    /// A guest write of `data` at byte `offset` of register `reg`, with the semantics listed on
    /// the type. Writes that run past the register, or past the configuration space, are
    /// ignored.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        if reg >= NUM_CONFIG_REGS || offset.checked_add(data.len()).is_none_or(|end| end > 4) {
            tracing::trace!(reg, offset, len = data.len(), "PCI: config write ignored");
            return;
        }
        let base = reg * 4 + offset;
        for (at, &value) in (base..).zip(data) {
            let writable = self.writable[at];
            let mut byte = (self.bytes[at] & !writable) | (value & writable);
            byte &= !(value & self.write_1_to_clear[at]);
            self.bytes[at] = byte;
        }
    }

    /// Copies configuration bytes from `offset` into `data`, with no access rules; bytes past
    /// the end of the configuration space read 0. For a device's own use.
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        data.fill(0);
        if let Some(src) = self.bytes.get(offset..) {
            let len = src.len().min(data.len());
            data[..len].copy_from_slice(&src[..len]);
        }
    }

    /// Writes `data` at `offset`, with no access rules (a device updating its own capability,
    /// say); bytes past the end of the configuration space are dropped.
    pub fn write_bytes(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..) {
            let len = dst.len().min(data.len());
            dst[..len].copy_from_slice(&data[..len]);
        }
    }

    /// The size of BAR `index`, if it has one (not for the upper half of a 64-bit BAR).
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        match self.bars.get(index) {
            Some(BarSlot::Bar { size, .. }) => Some(*size),
            _ => None,
        }
    }

    /// The kind of BAR `index`, if it has one.
    pub fn bar_kind(&self, index: usize) -> Option<BarKind> {
        match self.bars.get(index) {
            Some(BarSlot::Bar { kind, .. }) => Some(*kind),
            _ => None,
        }
    }

    /// The address BAR `index` holds now (type bits masked off), if it has one. While the guest
    /// sizes a BAR this is the size mask, not an address.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let BarSlot::Bar { kind, .. } = *self.bars.get(index)? else {
            return None;
        };
        let offset = bar_offset(index);
        let (_, flags_mask) = bar_flags(kind);
        let low = u64::from(self.get_u32(offset) & !flags_mask);
        Some(match kind {
            BarKind::Mem64 { .. } => low | (u64::from(self.get_u32(offset + 4)) << 32),
            BarKind::Mem32 | BarKind::Io => low,
        })
    }

    /// Programs BAR `index` with `addr`, which must be aligned to the BAR's size and fit its
    /// width (32 bits for [`BarKind::Mem32`], 16 for [`BarKind::Io`]).
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let Some(BarSlot::Bar { size, kind }) = self.bars.get(index).copied() else {
            return Err(PciError::NoBar(index));
        };
        // First address past what the BAR can hold; `None`: the whole 64-bit space.
        let limit: Option<u64> = match kind {
            BarKind::Mem32 => Some(1 << 32),
            BarKind::Io => Some(1 << 16),
            BarKind::Mem64 { .. } => None,
        };
        let fits = addr
            .checked_add(size - 1)
            .is_some_and(|last| limit.is_none_or(|limit| last < limit));
        // `size` is a power of two.
        if addr & (size - 1) != 0 || !fits {
            return Err(PciError::BarAddress { index, addr, size });
        }
        let offset = bar_offset(index);
        let (flags, _) = bar_flags(kind);
        self.put_u32(offset, addr as u32 | flags);
        if let BarKind::Mem64 { .. } = kind {
            self.put_u32(offset + 4, (addr >> 32) as u32);
        }
        Ok(())
    }

    /// The header's state for a snapshot.
    pub fn save_state(&self) -> PciConfigurationState {
        PciConfigurationState {
            bytes: self.bytes.to_vec(),
        }
    }

    /// Checks that `state` was saved from a header built like this one (same IDs, BARs and
    /// capability layout), without changing anything.
    pub fn check_state(&self, state: &PciConfigurationState) -> Result<(), PciStateError> {
        let saved = state.bytes.as_slice();
        if saved.len() != CONFIG_SPACE_LEN {
            return Err(PciStateError::ConfigLength(saved.len()));
        }
        let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let ids = |b: &[u8]| (u16_at(b, VENDOR_ID_OFFSET), u16_at(b, DEVICE_ID_OFFSET));
        let ((saved_vendor, saved_device), (vendor, device)) = (ids(saved), ids(&self.bytes));
        if (saved_vendor, saved_device) != (vendor, device) {
            return Err(PciStateError::Identity {
                saved_vendor,
                saved_device,
                vendor,
                device,
            });
        }
        for (offset, (&saved, &here)) in saved.iter().zip(&self.bytes).enumerate() {
            let fixed = !(self.writable[offset] | self.write_1_to_clear[offset]);
            if (saved ^ here) & fixed != 0 {
                return Err(PciStateError::ReadOnly {
                    offset,
                    saved,
                    here,
                });
            }
        }
        Ok(())
    }

    /// Puts back the guest-changeable bits of a header saved with
    /// [`save_state`](Self::save_state), after [`check_state`](Self::check_state). BAR
    /// addresses change with no mapping following them: restore through
    /// [`PciRoot::restore_state`](super::PciRoot::restore_state), which maps the BARs.
    pub fn restore_state(&mut self, state: &PciConfigurationState) -> Result<(), PciStateError> {
        self.check_state(state)?;
        for (offset, &saved) in state.bytes.iter().enumerate() {
            let take = self.writable[offset] | self.write_1_to_clear[offset];
            self.bytes[offset] = (self.bytes[offset] & !take) | (saved & take);
        }
        Ok(())
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get_u16(COMMAND_OFFSET)
    }

    /// Whether the guest enabled memory space decoding.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }

    /// Whether the guest enabled I/O space decoding.
    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO_SPACE != 0
    }

    /// Whether the guest allowed the function to master the bus (DMA, MSI writes).
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    fn get_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    fn get_u32(&self, offset: usize) -> u32 {
        let mut le = [0u8; 4];
        le.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(le)
    }

    fn put_u16(&mut self, offset: usize, value: u16) {
        put_u16_in(&mut self.bytes, offset, value);
    }

    fn put_u32(&mut self, offset: usize, value: u32) {
        put_u32_in(&mut self.bytes, offset, value);
    }
}

/// Configuration-space offset of BAR register `index` (`< NUM_BARS`).
fn bar_offset(index: usize) -> usize {
    BAR0_OFFSET + 4 * index
}

/// The read-only low bits of a BAR of `kind`, and the mask of those bits.
fn bar_flags(kind: BarKind) -> (u32, u32) {
    match kind {
        BarKind::Mem32 => (0, BAR_MEM_FLAGS_MASK),
        BarKind::Mem64 { prefetchable } => {
            let prefetch = if prefetchable {
                BAR_MEM_PREFETCHABLE
            } else {
                0
            };
            (BAR_MEM_TYPE_64 | prefetch, BAR_MEM_FLAGS_MASK)
        }
        BarKind::Io => (BAR_IO_SPACE, BAR_IO_FLAGS_MASK),
    }
}

fn put_u16_in(bytes: &mut [u8; CONFIG_SPACE_LEN], offset: usize, value: u16) {
    bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

fn put_u32_in(bytes: &mut [u8; CONFIG_SPACE_LEN], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}
