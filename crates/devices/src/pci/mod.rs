//! A conventional PCI bus: one root bus reached through configuration mechanism #1 (ports
//! `0xCF8`–`0xCFF`), with memory BARs mapped on the MMIO [`Bus`](crate::bus::Bus).
//!
//! - [`PciConfiguration`] is a type-0 configuration header with the standard register
//!   semantics (read-only IDs, command and status bits, BAR sizing, a capability list);
//! - [`PciDevice`] is what a PCI function implements: its configuration space and its BARs;
//! - [`PciRoot`] is bus 0 with a host bridge in slot 0. It answers the configuration ports,
//!   places each device's BARs in the MMIO window and keeps their bus mappings in step with what
//!   the guest programs.
//!
//! For snapshots, [`PciRoot::save_state`] returns a [`PciRootState`] (the address latch and
//! every function's configuration space) and [`PciRoot::restore_state`] puts it back into a
//! bus built the same way, mapping the BARs where the guest had put them.
//!
//! `docs/platform.md` (section "PCI") describes what a guest sees.

mod config;
mod root;

pub use config::{PciConfiguration, PciConfigurationState};
pub use root::{
    MappedBar, PciRoot, PciRootState, PciSlotState, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID,
    PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN,
};

/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;
/// Size of a conventional PCI configuration space, in bytes.
pub const CONFIG_SPACE_LEN: usize = 256;
/// Number of 32-bit registers in a conventional configuration space.
pub const NUM_CONFIG_REGS: usize = CONFIG_SPACE_LEN / 4;

/// Command register: I/O space decoding.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA, MSI writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx assertion disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the function has a capability list at [`CAPABILITY_POINTER_OFFSET`].
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Configuration-space offset of the capability pointer.
pub const CAPABILITY_POINTER_OFFSET: usize = 0x34;

/// Class code of a host bridge (base class "bridge device").
pub const CLASS_BRIDGE: u8 = 0x06;
/// Subclass of a host bridge within [`CLASS_BRIDGE`].
pub const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

/// The identity of a PCI function, written into its configuration header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class code (byte `0x0b`).
    pub class: u8,
    /// Subclass code (byte `0x0a`).
    pub subclass: u8,
    /// Programming interface (byte `0x09`).
    pub prog_if: u8,
    pub subsystem_vendor: u16,
    pub subsystem_id: u16,
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Memory below 4 GiB; one BAR slot.
    Mem32,
    /// Memory anywhere in the 64-bit space; takes two BAR slots (the named one and the next).
    Mem64 {
        /// Reads have no side effects, so the guest may map the BAR write-combining.
        prefetchable: bool,
    },
    /// I/O ports; one BAR slot. [`PciRoot`] does not place I/O BARs.
    Io,
}

/// A failed PCI set-up operation. Guest accesses never fail: bad values are ignored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    /// The BAR index is not `0..6`, or a 64-bit BAR would need slot 6.
    #[error("BAR index {0} out of range")]
    BarIndex(usize),
    /// The BAR slot (or, for a 64-bit BAR, its upper half) is already taken.
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    /// A BAR size is not a power of two, is below the minimum for its kind (16 bytes of memory,
    /// 4 ports), or is too large for it (4 GiB for 32-bit memory BARs, 256 ports).
    #[error("invalid size {size:#x} for a {kind:?} BAR")]
    BarSize {
        /// The requested size.
        size: u64,
        /// The requested kind.
        kind: BarKind,
    },
    /// [`PciConfiguration::set_bar_addr`] was asked for an index without a BAR.
    #[error("no BAR at index {0}")]
    NoBar(usize),
    /// A BAR address is not aligned to the BAR's size, or does not fit the BAR's width.
    #[error("address {addr:#x} is invalid for BAR {index} of size {size:#x}")]
    BarAddress {
        /// The BAR index.
        index: usize,
        /// The rejected address.
        addr: u64,
        /// The BAR's size.
        size: u64,
    },
    /// A capability does not fit in the rest of the configuration space.
    #[error("no room for a capability with a {len}-byte body")]
    CapabilitySpace {
        /// Length of the rejected body.
        len: usize,
    },
    /// All 31 device slots of the root bus are taken.
    #[error("no free slot on the PCI root bus")]
    NoFreeSlot,
    /// The MMIO window has no room left for a BAR.
    #[error("no room for BAR {index} of size {size:#x} in the PCI MMIO window")]
    WindowFull {
        /// The BAR index.
        index: usize,
        /// The BAR's size.
        size: u64,
    },
    /// The device has an I/O BAR, which the root does not place.
    #[error("I/O BAR {0} is not supported")]
    IoBar(usize),
}

/// Why a saved PCI state cannot be restored (into a bus or function not built the same way,
/// or a damaged state). Nothing is changed when restoring fails, except for
/// [`BarNotMapped`](PciStateError::BarNotMapped).
#[derive(Debug, thiserror::Error)]
pub enum PciStateError {
    /// The saved configuration space is not [`CONFIG_SPACE_LEN`] bytes long.
    #[error("the saved configuration space has {0} bytes instead of 256")]
    ConfigLength(usize),
    /// The saved function has other vendor and device IDs.
    #[error(
        "the saved function is {saved_vendor:04x}:{saved_device:04x}, \
         this one is {vendor:04x}:{device:04x}"
    )]
    Identity {
        saved_vendor: u16,
        saved_device: u16,
        vendor: u16,
        device: u16,
    },
    /// A bit the guest cannot change differs: another kind of function, or another layout of
    /// BARs or capabilities.
    #[error(
        "byte {offset:#04x} of the saved configuration space is {saved:#04x} where this \
         function has {here:#04x} in bits the guest cannot change"
    )]
    ReadOnly { offset: usize, saved: u8, here: u8 },
    /// The saved bus has another number of slots.
    #[error("the saved bus has {saved} slots, this one {here}")]
    SlotCount { saved: usize, here: usize },
    /// A slot held a function when saved and is empty on this bus.
    #[error("slot {0} held a function when saved and is empty on this bus")]
    SlotEmptyHere(usize),
    /// A slot was empty when saved and holds a function on this bus.
    #[error("slot {0} was empty when saved and holds a function on this bus")]
    SlotEmptyWhenSaved(usize),
    /// The function in `slot` does not take its saved state.
    #[error("slot {slot}")]
    Slot {
        slot: usize,
        #[source]
        source: Box<PciStateError>,
    },
    /// A BAR that was mapped cannot be mapped at the same address again (something else is
    /// there, or the window differs). The configuration spaces are restored by then.
    #[error("BAR {index} of slot {slot} cannot be mapped back at {addr:#x}")]
    BarNotMapped {
        slot: usize,
        index: usize,
        addr: u64,
    },
}

/// A PCI function on a [`PciRoot`].
///
/// Every call comes from a vCPU thread (configuration accesses, BAR accesses) with the rules of
/// [`BusDevice`](crate::BusDevice): no long blocking, no panics on guest-controlled values.
/// The root holds its own lock while it calls a device's configuration methods and
/// [`bar_moved`](PciDevice::bar_moved), so a device must never lock the root.
pub trait PciDevice: Send {
    /// The device's configuration header.
    fn config(&self) -> &PciConfiguration;
    /// The device's configuration header, mutably.
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// The guest reads 32-bit configuration register `reg` (`0..64`; larger reads return 0).
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    /// The guest writes `data` at byte `offset` (`0..4`) of configuration register `reg`.
    ///
    /// Override to intercept registers of the device's own capabilities (an MSI-X message
    /// control word, say), then delegate to the configuration for the rest.
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config_mut().write_reg(reg, offset, data);
    }

    /// The guest reads `data.len()` bytes at `offset` in BAR `index`.
    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` in BAR `index`.
    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]);

    /// The root has moved BAR `index` on the MMIO bus from `old` to `new` (`None`: not mapped),
    /// because the guest reprogrammed it or toggled memory decoding. Devices with state tied to
    /// guest addresses (ioeventfds, say) follow it here.
    fn bar_moved(&mut self, index: usize, old: Option<u64>, new: Option<u64>) {
        let _ = (index, old, new);
    }
}
