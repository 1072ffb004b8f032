//! Architectural state of one emulated x86-64 CPU, as plain data (serializable: snapshots
//! store it as it is).

use serde::{Deserialize, Serialize};

/// RFLAGS bits.
pub mod flags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED1: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The arithmetic status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software can change with POPF at CPL 0.
    pub const WRITABLE: u64 = STATUS | TF | IF | DF | IOPL | NT | RF | AC | ID;
}

pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const AM: u64 = 1 << 18;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
}

pub mod cr4 {
    pub const VME: u64 = 1 << 0;
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const PGE: u64 = 1 << 7;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const UMIP: u64 = 1 << 11;
    pub const LA57: u64 = 1 << 12;
    pub const FSGSBASE: u64 = 1 << 16;
    pub const PCIDE: u64 = 1 << 17;
    pub const OSXSAVE: u64 = 1 << 18;
    pub const SMEP: u64 = 1 << 20;
    pub const SMAP: u64 = 1 << 21;
}

pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
}

/// Segment register indexes, in the encoding order.
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;

/// GPR indexes, in the encoding order.
pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RSP: usize = 4;
pub const RBP: usize = 5;
pub const RSI: usize = 6;
pub const RDI: usize = 7;

/// A segment register with its descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seg {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Descriptor access byte and flags as in bits 40..55 of a descriptor: type (4), S, DPL
    /// (2), P, then (bits 12..15) AVL, L, D/B, G.
    pub attr: u16,
}

impl Seg {
    pub fn present(&self) -> bool {
        self.attr & 0x80 != 0
    }
    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }
    pub fn long(&self) -> bool {
        self.attr & 0x2000 != 0
    }
    pub fn db(&self) -> bool {
        self.attr & 0x4000 != 0
    }
    pub fn typ(&self) -> u8 {
        (self.attr & 0xf) as u8
    }

    /// A real-mode segment: base = selector << 4, 64 KiB limit.
    pub fn real_mode(selector: u16) -> Seg {
        Seg {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xffff,
            attr: 0x93,
        }
    }

    /// Loads from an 8-byte descriptor.
    pub fn from_descriptor(selector: u16, desc: u64) -> Seg {
        let base = ((desc >> 16) & 0xff_ffff) | ((desc >> 32) & 0xff00_0000);
        let mut limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
        let attr = ((desc >> 40) & 0xf0ff) as u16;
        if attr & 0x8000 != 0 {
            limit = (limit << 12) | 0xfff;
        }
        Seg {
            selector,
            base,
            limit,
            attr,
        }
    }
}

/// GDTR/IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dtr {
    pub base: u64,
    pub limit: u16,
}

/// Model-specific registers the emulator keeps (the LAPIC's and kvm-clock's live elsewhere).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub tsc_aux: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub mtrr_def_type: u64,
    pub mtrr_fixed: [u64; 11],
    pub mtrr_var: [u64; 16],
    pub tsc_offset: i64,
    pub spec_ctrl: u64,
}

/// SSE and x87 state (FXSAVE layout, kept as the raw 512-byte image plus the live registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word (FXSAVE format).
    pub ftw: u8,
    /// x87 registers ST0..ST7 as 80-bit values (physical order R0..R7 rotated by TOP).
    pub st: [[u8; 10]; 8],
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub xcr0: u64,
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState {
            xmm: [[0; 16]; 16],
            mxcsr: 0x1f80,
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            st: [[0; 10]; 8],
            fop: 0,
            fip: 0,
            fdp: 0,
            xcr0: 1,
        }
    }
}

/// Everything architectural about one CPU except memory and the local APIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub seg: [Seg; 6],
    pub ldtr: Seg,
    pub tr: Seg,
    pub gdtr: Dtr,
    pub idtr: Dtr,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub dr: [u64; 8],
    pub msr: Msrs,
    pub fpu: FpuState,
}

impl Default for CpuState {
    /// The state after RESET/INIT (SDM vol. 3, 9.1.1), minus the BIOS reset vector: real
    /// mode, CS:IP = F000:FFF0.
    fn default() -> Self {
        let mut seg = [Seg::real_mode(0); 6];
        seg[CS] = Seg {
            selector: 0xf000,
            base: 0xffff_0000,
            limit: 0xffff,
            attr: 0x9b,
        };
        CpuState {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: flags::FIXED1,
            seg,
            ldtr: Seg {
                attr: 0x82,
                limit: 0xffff,
                ..Default::default()
            },
            tr: Seg {
                attr: 0x8b,
                limit: 0xffff,
                ..Default::default()
            },
            gdtr: Dtr {
                base: 0,
                limit: 0xffff,
            },
            idtr: Dtr {
                base: 0,
                limit: 0xffff,
            },
            cr0: cr0::ET | cr0::NW | cr0::CD,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            msr: Msrs {
                pat: 0x0007_0406_0007_0406,
                ..Default::default()
            },
            fpu: FpuState::default(),
        }
    }
}

impl CpuState {
    /// Whether the CPU runs 64-bit code now (long mode and CS.L).
    #[inline]
    pub fn long_mode(&self) -> bool {
        self.efer & efer::LMA != 0
    }

    /// Code size in bits: 16, 32 or 64.
    #[inline]
    pub fn bitness(&self) -> u32 {
        // 64-bit code first, the common case: long mode implies protected mode.
        if self.long_mode() && self.seg[CS].long() {
            64
        } else if self.cr0 & cr0::PE == 0 {
            16
        } else if self.seg[CS].db() {
            32
        } else {
            16
        }
    }

    /// Current privilege level.
    #[inline]
    pub fn cpl(&self) -> u8 {
        // Long mode (the common case) implies protected mode.
        if self.long_mode() || self.cr0 & cr0::PE != 0 {
            (self.seg[CS].selector & 3) as u8
        } else {
            0
        }
    }

    /// Stack address size in bytes.
    #[inline]
    pub fn stack_size(&self) -> u32 {
        if self.bitness() == 64 {
            8
        } else if self.seg[SS].db() {
            4
        } else {
            2
        }
    }
}
