//! The CPU state a kernel is entered with: the boot GDT, the identity-mapped page tables of the
//! 64-bit entry, and the register values of the Linux 64-bit and PVH 32-bit entry protocols.

use hypervisor::x86_64::bits::{
    CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_RESERVED,
};
use hypervisor::GuestMemoryMmap;
use hypervisor::{DescriptorTable, Regs, Segment, Sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    APIC_START, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START,
};

/// Boot GDT: null, flat 32-bit code (PVH), flat 64-bit code, flat data, TSS.
const GDT: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
pub const BOOT_CS32: u16 = 0x08;
/// `__BOOT_CS` of the Linux boot protocol.
pub const BOOT_CS64: u16 = 0x10;
/// `__BOOT_DS` of the Linux boot protocol.
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

/// IA32_APIC_BASE: this is the bootstrap processor; the local APIC is globally enabled.
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_ENABLE: u64 = 1 << 11;

/// Present + writable (+ page size for 2 MiB pages).
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_PAGE_SIZE: u64 = 0x80;
/// The boot page tables map this many GiB (one page directory each).
const IDENTITY_MAPPED_GIB: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot write the boot {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryProtocol {
    /// Linux boot protocol, 64-bit entry point (bzImage).
    Linux64,
    /// Xen PVH: 32-bit protected mode, paging off (ELF with a PVH note).
    Pvh,
}

/// Register state for the boot vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootCpuState {
    pub regs: Regs,
    pub sregs: Sregs,
}

/// The reset-vector stub: `mov al, 0xfe; out 0x64, al; hlt; jmp $-1` — pulse the i8042 reset
/// line. Linux on a hardware-reduced ACPI platform without EFI falls back to a "BIOS reboot",
/// a real-mode jump to F000:FFF0; there is no BIOS, so this is what resets the machine.
const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Writes the boot GDT, an empty IDT, the identity-mapped page tables and the reset-vector
/// stub.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, BOOT_GDT_START.unchecked_add_usize(i * 8))
            .map_err(|e| BootError::Write("GDT", e))?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)
        .map_err(|e| BootError::Write("IDT", e))?;
    mem.write_slice(&RESET_STUB, crate::layout::RESET_VECTOR)
        .map_err(|e| BootError::Write("reset vector", e))?;

    mem.write_obj(PDPTE_START.0 | PTE_PRESENT_RW, PML4_START)
        .map_err(|e| BootError::Write("page tables", e))?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START.0 + gib * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, PDPTE_START.unchecked_add(gib * 8))
            .map_err(|e| BootError::Write("page tables", e))?;
        let mut entries = [0u8; 4096];
        for (j, chunk) in entries.chunks_exact_mut(8).enumerate() {
            let phys = ((gib << 9) + j as u64) << 21;
            chunk.copy_from_slice(&(phys | PTE_PRESENT_RW | PTE_PAGE_SIZE).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))
            .map_err(|e| BootError::Write("page tables", e))?;
    }
    Ok(())
}

trait GuestAddressExt {
    fn unchecked_add(self, offset: u64) -> GuestAddress;
    fn unchecked_add_usize(self, offset: usize) -> GuestAddress;
}

impl GuestAddressExt for GuestAddress {
    fn unchecked_add(self, offset: u64) -> GuestAddress {
        GuestAddress(self.0 + offset)
    }
    fn unchecked_add_usize(self, offset: usize) -> GuestAddress {
        GuestAddress(self.0 + offset as u64)
    }
}

fn segment(selector: u16) -> Segment {
    Segment::from_gdt_entry(GDT[usize::from(selector >> 3)], selector)
}

/// Entry state for `protocol`: `entry` is the kernel entry point, `info` the boot_params or
/// hvm_start_info address the protocol passes in rsi or ebx.
pub fn entry_state(
    protocol: EntryProtocol,
    entry: GuestAddress,
    info: GuestAddress,
) -> BootCpuState {
    let data = segment(BOOT_DS);
    let mut sregs = Sregs {
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: segment(BOOT_TSS),
        gdt: DescriptorTable {
            base: BOOT_GDT_START.0,
            limit: (GDT.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable {
            base: BOOT_IDT_START.0,
            limit: 7,
        },
        // Firmware hands over with the local APIC enabled at its default base; a zero here
        // would disable it and with it timer interrupts and IPIs.
        apic_base: APIC_START.0 | APIC_BASE_ENABLE | APIC_BASE_BSP,
        ..Default::default()
    };
    let mut regs = Regs {
        rip: entry.0,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match protocol {
        EntryProtocol::Linux64 => {
            sregs.cs = segment(BOOT_CS64);
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_START.0;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsi = info.0;
            regs.rsp = BOOT_STACK_POINTER.0;
            regs.rbp = BOOT_STACK_POINTER.0;
        }
        EntryProtocol::Pvh => {
            sregs.cs = segment(BOOT_CS32);
            sregs.cr0 = CR0_PE | CR0_ET;
            regs.rbx = info.0;
        }
    }
    BootCpuState { regs, sregs }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// Walks the boot page tables like the MMU would for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, virt: u64) -> u64 {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(PML4_START.0 + ((virt >> 39) & 511) * 8))
            .unwrap();
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((virt >> 30) & 511) * 8))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((virt >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde & 0x83, 0x83, "2 MiB page present and writable");
        (pde & !0x1f_ffff & !(1 << 63)) | (virt & 0x1f_ffff)
    }

    #[test]
    fn page_tables_identity_map_the_first_4_gib() {
        let mem = mem();
        write_boot_tables(&mem).unwrap();
        for addr in [0, 0x10_0000, 0x1234_5678, 0xfee0_0000, 0xffff_ffff] {
            assert_eq!(translate(&mem, addr), addr);
        }
    }

    #[test]
    fn reset_vector_pulses_the_i8042_reset_line() {
        let mem = mem();
        write_boot_tables(&mem).unwrap();
        let mut code = [0u8; 7];
        mem.read_slice(&mut code, crate::layout::RESET_VECTOR)
            .unwrap();
        // mov al, 0xfe; out 0x64, al
        assert_eq!(&code[..4], &[0xb0, 0xfe, 0xe6, 0x64]);
    }

    #[test]
    fn linux64_entry_follows_the_boot_protocol() {
        let s = entry_state(
            EntryProtocol::Linux64,
            GuestAddress(0x100200),
            GuestAddress(0x7000),
        );
        assert_eq!(s.regs.rsi, 0x7000);
        assert_eq!(s.regs.rip, 0x100200);
        assert_eq!(s.sregs.cs.selector, 0x10);
        assert!(s.sregs.cs.l && !s.sregs.cs.db);
        assert_eq!(s.sregs.ds.selector, 0x18);
        assert_eq!(s.sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.regs.rflags & (1 << 9), 0, "interrupts off");
        assert_eq!(s.sregs.apic_base, 0xfee0_0900, "LAPIC enabled, BSP");
    }

    #[test]
    fn pvh_entry_is_32bit_protected_mode_without_paging() {
        let s = entry_state(
            EntryProtocol::Pvh,
            GuestAddress(0x100000),
            GuestAddress(0x6000),
        );
        assert_eq!(s.regs.rbx, 0x6000);
        assert!(s.sregs.cs.db && !s.sregs.cs.l);
        assert_eq!(s.sregs.cr0 & CR0_PG, 0);
        assert_eq!(s.sregs.efer, 0);
        assert_eq!(s.sregs.cs.limit, 0xffff_ffff);
    }
}
