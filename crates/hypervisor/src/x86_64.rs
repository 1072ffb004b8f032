//! x86-64 CPU state as plain data, shared by every back end.
//!
//! These mirror what KVM's `kvm_regs`/`kvm_sregs` carry, but belong to Ferrovisor: code above
//! the seam (boot setup, snapshots, failure reports) never names a KVM type.

use std::fmt;

/// General-purpose registers, `rip` and `rflags`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (D/B bit).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity: limit in 4 KiB units.
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

impl Segment {
    /// Decodes a GDT entry (the 8-byte legacy format) into a segment loaded with `selector`.
    pub fn from_gdt_entry(entry: u64, selector: u16) -> Self {
        let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
        let limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
        let flags = entry >> 40;
        let g = (flags >> 15) & 1 == 1;
        Segment {
            base,
            // With G set the limit counts 4 KiB pages; the cache holds the byte limit.
            limit: if g {
                ((limit as u32) << 12) | 0xfff
            } else {
                limit as u32
            },
            selector,
            type_: (flags & 0xf) as u8,
            s: (flags >> 4) & 1 == 1,
            dpl: ((flags >> 5) & 3) as u8,
            present: (flags >> 7) & 1 == 1,
            avl: (flags >> 12) & 1 == 1,
            l: (flags >> 13) & 1 == 1,
            db: (flags >> 14) & 1 == 1,
            g,
            unusable: (flags >> 7) & 1 == 0,
        }
    }
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// The floating-point control state a vCPU starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fpu {
    pub fcw: u16,
    pub mxcsr: u32,
}

impl Default for Fpu {
    /// The x87 and SSE reset values (all exceptions masked).
    fn default() -> Self {
        Fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
        }
    }
}

/// One CPUID leaf/subleaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Back-end flags (KVM: `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` and friends).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// One model-specific register value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// Control registers and flags bits used when setting up boot state.
pub mod bits {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    /// The always-one bit of RFLAGS.
    pub const RFLAGS_RESERVED: u64 = 1 << 1;
}

impl fmt::Display for Regs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rip={:#018x} rflags={:#010x} rsp={:#018x} rbp={:#018x}",
            self.rip, self.rflags, self.rsp, self.rbp
        )?;
        writeln!(
            f,
            "rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
            self.rax, self.rbx, self.rcx, self.rdx
        )?;
        writeln!(
            f,
            "rsi={:#018x} rdi={:#018x} r8 ={:#018x} r9 ={:#018x}",
            self.rsi, self.rdi, self.r8, self.r9
        )?;
        writeln!(
            f,
            "r10={:#018x} r11={:#018x} r12={:#018x} r13={:#018x}",
            self.r10, self.r11, self.r12, self.r13
        )?;
        write!(f, "r14={:#018x} r15={:#018x}", self.r14, self.r15)
    }
}

impl fmt::Display for Sregs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} apic_base={:#x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.efer, self.apic_base
        )?;
        for (name, s) in [
            ("cs", &self.cs),
            ("ss", &self.ss),
            ("ds", &self.ds),
            ("tr", &self.tr),
        ] {
            writeln!(
                f,
                "{name}: sel={:#06x} base={:#x} limit={:#x} type={} l={} db={} p={}",
                s.selector, s.base, s.limit, s.type_, s.l as u8, s.db as u8, s.present as u8
            )?;
        }
        write!(
            f,
            "gdt={:#x}/{:#x} idt={:#x}/{:#x}",
            self.gdt.base, self.gdt.limit, self.idt.base, self.idt.limit
        )
    }
}

/// `CpuidEntry::flags`: the leaf's value depends on the subleaf (`index`). Same value as KVM's
/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`, which the kvm back end passes through.
pub const CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_64bit_code_descriptor_decodes() {
        // Access 0x9b (present, code, exec/read, accessed), flags 0xa (G, L).
        let seg = Segment::from_gdt_entry(0x00af_9b00_0000_ffff, 0x10);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert!(seg.present && seg.s && seg.l && seg.g && !seg.db);
        assert_eq!(seg.selector, 0x10);
    }

    #[test]
    fn flat_32bit_data_descriptor_decodes() {
        let seg = Segment::from_gdt_entry(0x00cf_9300_0000_ffff, 0x18);
        assert_eq!(seg.type_, 0x3);
        assert!(seg.db && !seg.l && seg.g && seg.present && !seg.unusable);
    }
}
