//! The guest physical memory map. `docs/platform.md` describes the same layout for guest
//! authors; change both together.

use vm_memory::GuestAddress;

/// Boot GDT for the 64-bit entry.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Boot IDT (empty; interrupts stay off until the kernel loads its own).
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// Linux `boot_params` (the zero page).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer for the boot vCPU (grows down, below the zero page).
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x6ff0);
/// Boot page tables: PML4, then PDPT, then four page directories.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Largest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: usable low RAM ends here.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
/// ACPI tables live in the BIOS area, where a guest may also scan for the RSDP.
pub const ACPI_TABLES_START: GuestAddress = GuestAddress(0xe0000);
/// Where the RSDP is written (first thing in the ACPI area).
pub const RSDP_START: GuestAddress = ACPI_TABLES_START;
/// End (exclusive) of the ACPI area: the last 16 bytes below 1 MiB are the reset vector.
pub const ACPI_TABLES_END: GuestAddress = RESET_VECTOR;
/// Where real-mode code lands after a jump to F000:FFF0, as Linux's last-resort "BIOS reboot"
/// does: the VMM puts a stub there that resets the machine through the i8042.
pub const RESET_VECTOR: GuestAddress = GuestAddress(0xffff0);
/// First byte above the legacy 1 MiB area; the kernel is loaded here.
pub const HIMEM_START: GuestAddress = GuestAddress(0x100000);
/// The 32-bit MMIO hole: no RAM between these addresses.
pub const MMIO_HOLE_START: GuestAddress = GuestAddress(0xc000_0000);
pub const MMIO_HOLE_END: GuestAddress = GuestAddress(0x1_0000_0000);
/// The PCI root bridge's MMIO window, inside the 32-bit hole and below the I/O APIC: BARs are
/// placed here, and the DSDT declares it in `\_SB_.PCI0._CRS`.
pub const PCI_MMIO_START: GuestAddress = MMIO_HOLE_START;
/// End (exclusive) of the PCI MMIO window; the 44 MiB above it, up to the I/O APIC, stay free
/// for platform devices.
pub const PCI_MMIO_END: GuestAddress = GuestAddress(0xfc00_0000);
/// I/O APIC and local APIC MMIO bases.
pub const IOAPIC_START: GuestAddress = GuestAddress(0xfec0_0000);
pub const APIC_START: GuestAddress = GuestAddress(0xfee0_0000);
