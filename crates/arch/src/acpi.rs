//! ACPI 6 tables for a hardware-reduced x86-64 guest.
//!
//! `docs/platform.md` (section "ACPI") is the specification. The tables are written into the
//! BIOS area [`layout::ACPI_TABLES_START`]..[`layout::ACPI_TABLES_END`] in this order, each
//! 16-byte aligned:
//!
//! 1. the RSDP (revision 2) at [`layout::RSDP_START`], pointing at the XSDT;
//! 2. the DSDT: `\_S5_`, the COM1 and CMOS RTC devices, the i8042's keyboard port (when
//!    there is one), the PCI root bridge (when there is a PCI MMIO window) and one processor
//!    device per vCPU;
//! 3. the FADT: hardware-reduced, with the sleep control/status and reset registers as 8-bit
//!    System I/O generic addresses, `X_DSDT` pointing at the DSDT;
//! 4. the MADT: local APIC address, one Processor Local APIC per vCPU, one I/O APIC and the
//!    ISA IRQ 0 → GSI 2 interrupt source override;
//! 5. the XSDT, listing the FADT and the MADT.
//!
//! The RTC is declared (`PNP0B00`) so that Linux binds its `rtc_cmos` driver to the ports through
//! ACPI rather than guessing; its `_CRS` names ISA IRQ 8 as real PCs and QEMU do, although the
//! VMM's RTC raises no interrupts (no alarms or periodic ticks; reading and setting the time need
//! none).
//!
//! The keyboard `\_SB_.PS2K` (`PNP0303`) names the i8042's two ports and ISA IRQ 1. Linux's
//! i8042 driver looks for it: without it, it probes the ports directly and asks for IRQ 1 as a
//! legacy IRQ number, which does not exist on a hardware-reduced platform (no 8259), so the
//! driver fails. With it, the IRQ is mapped through ACPI like COM1's, and since no PS/2 mouse
//! (`PNP0F13`) is declared, the driver does not probe the AUX port either.
//!
//! The PCI root bridge `\_SB_.PCI0` (`PNP0A08`, compatible with `PNP0A03`) is bus 0 of segment
//! 0, reached through configuration mechanism #1 at ports `0xCF8`–`0xCFF` (there is no MCFG
//! table, so no ECAM). Its `_CRS` gives Linux the bus range, the configuration ports it consumes,
//! the rest of the 16-bit I/O space and the 32-bit MMIO window as windows it may assign BARs
//! from. There is no `_PRT`: devices on the bus interrupt through MSI/MSI-X, not INTx.
//!
//! The tables are assembled with the `acpi_tables` crate; the few structures it does not model
//! (the MADT interrupt source override, the AML `IRQNoFlags` resource descriptor) are encoded
//! here.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use hypervisor::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout;

#[cfg(test)]
mod tests;

/// OEM ID written into the RSDP and every table header.
pub const OEM_ID: [u8; 6] = *b"FRVSOR";
/// OEM table ID written into every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"FRVSRVM ";
/// OEM revision written into every table header.
pub const OEM_REVISION: u32 = 1;
/// Largest supported vCPU count: APIC IDs are 8 bits, the I/O APIC takes ID `vcpus`, and
/// `0xff` is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;

/// `IAPC_BOOT_ARCH` bit 1: the motherboard contains an 8042 keyboard controller.
pub const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// `IAPC_BOOT_ARCH` bit 2: VGA is not present.
pub const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// Alignment of every table in the ACPI area (the RSDP needs 16, the other tables 8).
const TABLE_ALIGN: u64 = 16;

/// Standard SDT header length.
const SDT_HEADER_LEN: u32 = 36;
/// MADT: local interrupt controller address and flags follow the standard header.
const MADT_LAPIC_ADDR_OFFSET: usize = 36;
const MADT_FLAGS_OFFSET: usize = 40;
const MADT_HEADER_LEN: u32 = 44;
/// MADT revision 5 (ACPI 6.3 and later). The entries used here have kept their layout since
/// revision 1.
const MADT_REVISION: u8 = 5;
/// MADT flags. Bit 0 (`PCAT_COMPAT`) stays clear: the FADT declares a hardware-reduced platform,
/// for which Linux replaces the 8259 driver with its null legacy PIC and never programs the
/// PICs, so the flag would buy nothing with KVM's in-kernel PIC; and leaving it clear promises
/// no dual-8259 set-up to guests on back ends that might not model one. The PIT still reaches
/// the I/O APIC through the IRQ 0 → GSI 2 override.
const MADT_FLAGS: u32 = 0;
/// MADT entry type 2: interrupt source override.
const MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;

/// A range of guest physical addresses that the PCI root bridge forwards to its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciMmioWindow {
    /// First address of the window.
    pub start: GuestAddress,
    /// Length of the window; the window must end at or below 4 GiB.
    pub len_bytes: u64,
}

impl PciMmioWindow {
    /// The 32-bit window of `docs/platform.md`: [`layout::PCI_MMIO_START`] to
    /// [`layout::PCI_MMIO_END`].
    pub fn platform() -> Self {
        PciMmioWindow {
            start: layout::PCI_MMIO_START,
            len_bytes: layout::PCI_MMIO_END.0 - layout::PCI_MMIO_START.0,
        }
    }
}

/// The i8042 keyboard controller's keyboard port, as the DSDT declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ps2Keyboard {
    /// The data port (one byte).
    pub data_port: u16,
    /// The status/command port (one byte).
    pub command_port: u16,
    /// ISA IRQ of the keyboard port, `0..=15`.
    pub irq: u8,
}

impl Ps2Keyboard {
    /// The PC's: ports `0x60` and `0x64`, IRQ 1.
    pub fn platform() -> Self {
        Ps2Keyboard {
            data_port: 0x60,
            command_port: 0x64,
            irq: 1,
        }
    }
}

/// The platform's ACPI-visible configuration: vCPU count, fixed-hardware ports, COM1, the RTC,
/// the keyboard and the PCI root bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs, `1..=`[`MAX_VCPUS`]. vCPU `i` has APIC ID and ACPI processor UID `i`.
    pub vcpus: u8,
    /// I/O port of the 8-bit sleep control register (`SLP_TYP` in bits 2–4, `SLP_EN` bit 5).
    pub sleep_control_port: u16,
    /// I/O port of the 8-bit sleep status register.
    pub sleep_status_port: u16,
    /// I/O port of the 8-bit reset register.
    pub reset_port: u16,
    /// Value the guest writes to the reset register to reset the machine.
    pub reset_value: u8,
    /// `SLP_TYP` for S5 (soft off), `0..=7`; published as `\_S5_`.
    pub s5_sleep_type: u8,
    /// First I/O port of COM1 (8 ports).
    pub com1_port: u16,
    /// ISA IRQ of COM1, `0..=15`.
    pub com1_irq: u8,
    /// First I/O port of the CMOS RTC (index, then data: 2 ports).
    pub rtc_port: u16,
    /// ISA IRQ the RTC is described with, `0..=15`.
    pub rtc_irq: u8,
    /// The i8042's keyboard port, `\_SB_.PS2K`; `None`: no keyboard in the DSDT.
    pub ps2_keyboard: Option<Ps2Keyboard>,
    /// The MMIO window of the PCI root bridge `\_SB_.PCI0`; `None`: no PCI bus, and no
    /// `PCI0` device in the DSDT.
    pub pci_mmio: Option<PciMmioWindow>,
}

impl AcpiConfig {
    /// The configuration `docs/platform.md` describes, for `vcpus` vCPUs.
    pub fn new(vcpus: u8) -> Self {
        AcpiConfig {
            vcpus,
            sleep_control_port: 0x600,
            sleep_status_port: 0x601,
            reset_port: 0x602,
            reset_value: 0x01,
            s5_sleep_type: 5,
            com1_port: 0x3f8,
            com1_irq: 4,
            rtc_port: 0x70,
            rtc_irq: 8,
            ps2_keyboard: Some(Ps2Keyboard::platform()),
            pci_mmio: Some(PciMmioWindow::platform()),
        }
    }
}

impl Default for AcpiConfig {
    /// The platform configuration with one vCPU.
    fn default() -> Self {
        AcpiConfig::new(1)
    }
}

/// Why the ACPI tables could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is 0 or above [`MAX_VCPUS`].
    #[error("invalid vCPU count {0} for ACPI: must be 1..={MAX_VCPUS}")]
    InvalidVcpuCount(u8),
    /// The S5 sleep type does not fit the 3-bit `SLP_TYP` field.
    #[error("invalid S5 sleep type {0}: SLP_TYP is 3 bits (0..=7)")]
    InvalidSleepType(u8),
    /// A device's IRQ is not an ISA IRQ.
    #[error("invalid {device} IRQ {irq}: must be an ISA IRQ (0..=15)")]
    InvalidIrq {
        /// The device, as the DSDT names it.
        device: &'static str,
        /// The configured IRQ.
        irq: u8,
    },
    /// The PCI MMIO window is empty or does not end at or below 4 GiB.
    #[error("invalid PCI MMIO window at {start:#x} of length {len_bytes:#x}: must be non-empty and below 4 GiB")]
    InvalidPciWindow {
        /// First address of the window.
        start: u64,
        /// Length of the window.
        len_bytes: u64,
    },
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables end at {end:#x}, past the end of the ACPI area at {limit:#x}")]
    TablesTooLarge {
        /// First guest address past the last table.
        end: u64,
        /// First guest address past the ACPI area.
        limit: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("cannot write ACPI tables to guest memory")]
    GuestMemory(#[source] GuestMemoryError),
}

/// Builds the RSDP, DSDT, FADT, MADT and XSDT for `cfg` and writes them into the ACPI area of
/// `mem`. Returns the guest address of the RSDP ([`layout::RSDP_START`]), to be passed to the
/// guest in `boot_params.acpi_rsdp_addr` or `hvm_start_info.rsdp_paddr`.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    validate(cfg)?;

    // The FADT and the XSDT have fixed sizes, so every address is known once the DSDT and MADT
    // are built.
    let dsdt = build_dsdt(cfg);
    let madt = build_madt(cfg);
    let fadt_len = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .finalize()
        .to_bytes()
        .len();
    let xsdt_len = SDT_HEADER_LEN as usize + 2 * std::mem::size_of::<u64>();

    let [rsdp_addr, dsdt_addr, fadt_addr, madt_addr, xsdt_addr] = place(
        [Rsdp::len(), dsdt.len(), fadt_len, madt.len(), xsdt_len],
        layout::ACPI_TABLES_START.0,
        layout::ACPI_TABLES_END.0,
    )?;

    let fadt = build_fadt(cfg, dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let tables: [(u64, Vec<u8>); 5] = [
        (rsdp_addr, rsdp.to_bytes()),
        (dsdt_addr, dsdt.as_slice().to_vec()),
        (fadt_addr, fadt),
        (madt_addr, madt.as_slice().to_vec()),
        (xsdt_addr, xsdt.to_bytes()),
    ];
    for (addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::GuestMemory)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

/// Rejects configurations the tables cannot describe.
fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(AcpiError::InvalidVcpuCount(cfg.vcpus));
    }
    if cfg.s5_sleep_type > 7 {
        return Err(AcpiError::InvalidSleepType(cfg.s5_sleep_type));
    }
    let keyboard_irq = cfg.ps2_keyboard.map(|k| ("PS2K", k.irq));
    for (device, irq) in [("COM1", cfg.com1_irq), ("RTC", cfg.rtc_irq)]
        .into_iter()
        .chain(keyboard_irq)
    {
        if irq > 15 {
            return Err(AcpiError::InvalidIrq { device, irq });
        }
    }
    if let Some(window) = cfg.pci_mmio {
        let start = window.start.0;
        let fits = window.len_bytes > 0
            && start
                .checked_add(window.len_bytes)
                .is_some_and(|end| end <= 1 << 32);
        if !fits {
            return Err(AcpiError::InvalidPciWindow {
                start,
                len_bytes: window.len_bytes,
            });
        }
    }
    Ok(())
}

/// Lays out tables of the given sizes one after the other from `start`, each aligned to
/// [`TABLE_ALIGN`], and returns their addresses; fails if the last one ends past `limit`.
fn place<const N: usize>(sizes: [usize; N], start: u64, limit: u64) -> Result<[u64; N], AcpiError> {
    let too_large = |end| AcpiError::TablesTooLarge { end, limit };
    let mut addrs = [0u64; N];
    let mut next = start;
    for (addr, size) in addrs.iter_mut().zip(sizes) {
        *addr = next
            .checked_next_multiple_of(TABLE_ALIGN)
            .ok_or(too_large(u64::MAX))?;
        next = u64::try_from(size)
            .ok()
            .and_then(|size| addr.checked_add(size))
            .ok_or(too_large(u64::MAX))?;
    }
    if next > limit {
        return Err(too_large(next));
    }
    Ok(addrs)
}

/// Serializes anything the `acpi_tables` crate can emit.
trait ToBytes {
    fn to_bytes(&self) -> Vec<u8>;
}

impl<T: Aml + ?Sized> ToBytes for T {
    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.to_aml_bytes(&mut bytes);
        bytes
    }
}

/// An 8-bit System I/O register at `port`.
fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT: hardware-reduced ACPI, with the sleep and reset registers in I/O space.
fn build_fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-hardware power or sleep button (there are none on a hardware-reduced
        // platform).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // The builder has no setters for these; its fields are public and sit at the offsets the
    // ACPI specification gives (IAPC_BOOT_ARCH 109, RESET_REG 116, RESET_VALUE 128,
    // SLEEP_CONTROL_REG 244, SLEEP_STATUS_REG 256). `finalize` computes the checksum.
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT).into();
    fadt.reset_reg = io_port_gas(cfg.reset_port);
    fadt.reset_value = cfg.reset_value;
    fadt.sleep_control_reg = io_port_gas(cfg.sleep_control_port);
    fadt.sleep_status_reg = io_port_gas(cfg.sleep_status_port);
    fadt.finalize().to_bytes()
}

/// The MADT. The crate's `MADT` type cannot set the flags field nor hold an interrupt source
/// override, so the table is assembled as a generic SDT from the crate's entry types.
fn build_madt(cfg: &AcpiConfig) -> Sdt {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    // The local APIC base is below 4 GiB, so it fits the 32-bit field.
    madt.write_u32(MADT_LAPIC_ADDR_OFFSET, layout::APIC_START.0 as u32);
    madt.write_u32(MADT_FLAGS_OFFSET, MADT_FLAGS);
    for id in 0..cfg.vcpus {
        madt.append_slice(&ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_bytes());
    }
    madt.append_slice(&IoApic::new(cfg.vcpus, layout::IOAPIC_START.0 as u32, 0).to_bytes());
    madt.append_slice(&interrupt_source_override(0, 2, 0));
    madt
}

/// A MADT Interrupt Source Override entry (type 2) for ISA `irq` → `gsi`, with MPS INTI
/// `flags` (0: conforms to the bus, i.e. ISA edge-triggered active-high).
fn interrupt_source_override(irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut entry = [0u8; 10];
    entry[0] = MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE;
    entry[1] = 10; // length
    entry[2] = 0; // bus: ISA
    entry[3] = irq;
    entry[4..8].copy_from_slice(&gsi.to_le_bytes());
    entry[8..10].copy_from_slice(&flags.to_le_bytes());
    entry
}

/// AML `IRQNoFlags () { irq }`: a small IRQ resource descriptor without the information byte
/// (ISA edge-triggered, active-high, exclusive), which the `aml` module does not provide.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Small resource: item name 0x04 (IRQ) in bits 3-6, length 2 in bits 0-2.
        sink.byte((0x04 << 3) | 2);
        sink.word(1u16 << self.0);
    }
}

/// The DSDT: `\_S5_`, `\_SB_.COM1`, `\_SB_.RTC_`, `\_SB_.PS2K` if there is a keyboard,
/// `\_SB_.PCI0` if there is a PCI window, and one ACPI 6 processor device per vCPU.
fn build_dsdt(cfg: &AcpiConfig) -> Sdt {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );

    // \_S5_: Package { SLP_TYPa, SLP_TYPb, reserved, reserved }.
    let s5 = aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&cfg.s5_sleep_type, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );
    dsdt.append_slice(&s5.to_bytes());

    let mut sb = com1_device(cfg);
    sb.extend_from_slice(&rtc_device(cfg));
    if let Some(keyboard) = cfg.ps2_keyboard {
        sb.extend_from_slice(&keyboard_device(keyboard));
    }
    if let Some(window) = cfg.pci_mmio {
        sb.extend_from_slice(&pci_root_device(window));
    }
    for index in 0..cfg.vcpus {
        sb.extend_from_slice(&processor_device(index));
    }
    dsdt.append_slice(&aml::Scope::raw("\\_SB_".into(), sb));
    dsdt
}

/// `Device (COM1)`: a 16550A at `com1_port` (8 ports) on ISA IRQ `com1_irq`.
fn com1_device(cfg: &AcpiConfig) -> Vec<u8> {
    let io = aml::IO::new(cfg.com1_port, cfg.com1_port, 1, 8);
    let irq = IrqNoFlags(cfg.com1_irq);
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq])),
        ],
    )
    .to_bytes()
}

/// `Device (RTC_)`: an MC146818-compatible CMOS RTC at `rtc_port` (2 ports) on ISA IRQ
/// `rtc_irq`, which it never raises.
fn rtc_device(cfg: &AcpiConfig) -> Vec<u8> {
    let io = aml::IO::new(cfg.rtc_port, cfg.rtc_port, 1, 2);
    let irq = IrqNoFlags(cfg.rtc_irq);
    aml::Device::new(
        "RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq])),
        ],
    )
    .to_bytes()
}

/// `Device (PS2K)`: the i8042's keyboard port, a PC/AT enhanced keyboard (`PNP0303`): the data
/// and command ports (one byte each, in that order, as Linux's i8042 driver expects) and ISA IRQ
/// `irq`.
fn keyboard_device(keyboard: Ps2Keyboard) -> Vec<u8> {
    let data = aml::IO::new(keyboard.data_port, keyboard.data_port, 1, 1);
    let command = aml::IO::new(keyboard.command_port, keyboard.command_port, 1, 1);
    let irq = IrqNoFlags(keyboard.irq);
    aml::Device::new(
        "PS2K".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&data, &command, &irq]),
            ),
        ],
    )
    .to_bytes()
}

/// Configuration mechanism #1 ports, consumed by the root bridge itself.
const PCI_CONFIG_PORT: u16 = 0xcf8;
const PCI_CONFIG_PORT_LEN: u8 = 8;

/// `Device (PCI0)`: the PCI root bridge, bus 0 of segment 0, with MMIO window `window` (which
/// [`validate`] checked lies below 4 GiB).
fn pci_root_device(window: PciMmioWindow) -> Vec<u8> {
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORT_LEN);
    // Every other I/O port is forwarded to the bus: those below the configuration ports and
    // those above them. Legacy devices inside these windows are not PCI's business; Linux only
    // assigns I/O BARs from what is free.
    let io_low = aml::AddressSpace::<u16>::new_io(0, PCI_CONFIG_PORT - 1, None);
    let io_high = aml::AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        window.start.0 as u32,
        (window.start.0 + window.len_bytes - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &config_ports, &io_low, &io_high, &mmio]);
    aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_bytes()
}

/// `Device (Cxxx)` with `_HID "ACPI0007"` and `_UID index`: the ACPI 6 processor declaration
/// (the `Processor` operator is deprecated). The UID matches the MADT processor UID.
fn processor_device(index: u8) -> Vec<u8> {
    let name = format!("C{index:03X}");
    aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0007"),
            &aml::Name::new("_UID".into(), &index),
        ],
    )
    .to_bytes()
}
