//! Operand access: registers by iced-x86 `Register`, effective addresses, and reading and
//! writing an instruction's operands with their sizes.

use std::sync::OnceLock;

use iced_x86::{Instruction, OpKind, Register};

use super::mmu::Access;
use super::state::{CS, DS, ES, FS, GS, SS};
use super::{Cpu, Exec};

/// Where a register lives.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RegInfo {
    /// 0 = not a GPR, 1 = GPR, 2 = segment register.
    pub kind: u8,
    pub index: u8,
    /// Size in bytes.
    pub size: u8,
    /// AH/CH/DH/BH: bits 8..15.
    pub high: bool,
}

fn reg_table() -> &'static [RegInfo; 256] {
    static TABLE: OnceLock<[RegInfo; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [RegInfo::default(); 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let Some(reg) = Register::values().nth(i) else {
                break;
            };
            if reg.is_gpr() {
                let full = reg.full_register();
                let index = (full as usize - Register::RAX as usize) as u8;
                let high = matches!(
                    reg,
                    Register::AH | Register::CH | Register::DH | Register::BH
                );
                *slot = RegInfo {
                    kind: 1,
                    index,
                    size: reg.size() as u8,
                    high,
                };
            } else if reg.is_segment_register() {
                let index = match reg {
                    Register::ES => ES,
                    Register::CS => CS,
                    Register::SS => SS,
                    Register::DS => DS,
                    Register::FS => FS,
                    _ => GS,
                } as u8;
                *slot = RegInfo {
                    kind: 2,
                    index,
                    size: 2,
                    high: false,
                };
            }
        }
        t
    })
}

#[inline(always)]
pub(crate) fn reg_info(reg: Register) -> RegInfo {
    reg_table()[reg as usize]
}

#[inline(always)]
pub(crate) fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Sign-extends the low `size` bytes of `v`.
#[inline(always)]
pub(crate) fn sext(v: u64, size: usize) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

/// Segment index of an iced segment register.
#[inline(always)]
pub(crate) fn seg_index(reg: Register) -> usize {
    match reg {
        Register::ES => ES,
        Register::CS => CS,
        Register::SS => SS,
        Register::FS => FS,
        Register::GS => GS,
        _ => DS,
    }
}

impl Cpu {
    /// Value of a general-purpose register (any width) or segment selector.
    #[inline(always)]
    pub(crate) fn reg(&self, reg: Register) -> u64 {
        let info = reg_info(reg);
        match info.kind {
            1 => {
                let v = self.s.gpr[info.index as usize];
                if info.high {
                    (v >> 8) & 0xff
                } else {
                    v & mask(info.size as usize)
                }
            }
            2 => u64::from(self.s.seg[info.index as usize].selector),
            _ => match reg {
                Register::RIP => self.s.rip,
                Register::EIP => self.s.rip & 0xffff_ffff,
                _ => 0,
            },
        }
    }

    /// Writes a general-purpose register with x86 semantics: 32-bit writes zero the upper
    /// half, 8- and 16-bit writes keep the rest.
    #[inline(always)]
    pub(crate) fn set_reg(&mut self, reg: Register, v: u64) {
        let info = reg_info(reg);
        debug_assert_eq!(info.kind, 1, "set_reg on {reg:?}");
        let r = &mut self.s.gpr[info.index as usize];
        match (info.size, info.high) {
            (1, true) => *r = (*r & !0xff00) | ((v & 0xff) << 8),
            (1, false) => *r = (*r & !0xff) | (v & 0xff),
            (2, _) => *r = (*r & !0xffff) | (v & 0xffff),
            (4, _) => *r = v & 0xffff_ffff,
            _ => *r = v,
        }
    }

    /// Effective address (offset within the segment) of the memory operand.
    #[inline]
    pub(crate) fn effective_address(&self, insn: &Instruction) -> u64 {
        if insn.is_ip_rel_memory_operand() {
            return insn.ip_rel_memory_address();
        }
        let base = insn.memory_base();
        let index = insn.memory_index();
        let mut ea = insn.memory_displacement64();
        let mut addr_size = 8;
        if base != Register::None {
            ea = ea.wrapping_add(self.reg(base));
            addr_size = base.size();
        }
        if index != Register::None {
            ea = ea.wrapping_add(
                self.reg(index)
                    .wrapping_mul(u64::from(insn.memory_index_scale())),
            );
            addr_size = index.size();
        }
        if base == Register::None && index == Register::None {
            addr_size = match insn.memory_displ_size() {
                2 => 2,
                4 => 4,
                _ => {
                    if self.s.bitness() == 64 {
                        8
                    } else {
                        4
                    }
                }
            };
        }
        ea & mask(addr_size)
    }

    /// Linear address of the memory operand.
    #[inline]
    pub(crate) fn mem_linear(&self, insn: &Instruction) -> u64 {
        let seg = seg_index(insn.memory_segment());
        self.linear(seg, self.effective_address(insn))
    }

    /// Size in bytes of operand `n`.
    #[inline]
    pub(crate) fn op_size(&self, insn: &Instruction, n: u32) -> usize {
        match insn.op_kind(n) {
            OpKind::Register => insn.op_register(n).size(),
            OpKind::Memory => insn.memory_size().size(),
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            _ => 8,
        }
    }

    /// Reads operand `n` (register, memory or immediate), zero-extended.
    #[inline]
    pub(crate) fn read_op(&mut self, insn: &Instruction, n: u32) -> Exec<u64> {
        match insn.op_kind(n) {
            OpKind::Register => Ok(self.reg(insn.op_register(n))),
            OpKind::Memory => {
                let size = insn.memory_size().size();
                let lin = self.mem_linear(insn);
                self.read_lin(lin, size, Access::Read)
            }
            OpKind::Immediate8 => Ok(u64::from(insn.immediate8())),
            OpKind::Immediate8_2nd => Ok(u64::from(insn.immediate8_2nd())),
            OpKind::Immediate16 => Ok(u64::from(insn.immediate16())),
            OpKind::Immediate32 => Ok(u64::from(insn.immediate32())),
            OpKind::Immediate64 => Ok(insn.immediate64()),
            OpKind::Immediate8to16 => Ok(insn.immediate8to16() as u16 as u64),
            OpKind::Immediate8to32 => Ok(insn.immediate8to32() as u32 as u64),
            OpKind::Immediate8to64 => Ok(insn.immediate8to64() as u64),
            OpKind::Immediate32to64 => Ok(insn.immediate32to64() as u64),
            _ => Ok(0),
        }
    }

    /// Writes operand `n` (register or memory) with its size.
    #[inline]
    pub(crate) fn write_op(&mut self, insn: &Instruction, n: u32, v: u64) -> Exec {
        match insn.op_kind(n) {
            OpKind::Register => {
                self.set_reg(insn.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => {
                let size = insn.memory_size().size();
                let lin = self.mem_linear(insn);
                self.write_lin(lin, size, v)
            }
            _ => Ok(()),
        }
    }

    /// Pushes `size` bytes on the stack.
    pub(crate) fn push(&mut self, v: u64, size: usize) -> Exec {
        let ss = self.s.stack_size() as usize;
        let sp = self.s.gpr[super::state::RSP].wrapping_sub(size as u64) & mask(ss);
        let lin = self.linear(SS, sp);
        self.write_lin(lin, size, v)?;
        let r = &mut self.s.gpr[super::state::RSP];
        *r = (*r & !mask(ss)) | sp;
        Ok(())
    }

    /// Pops `size` bytes from the stack.
    pub(crate) fn pop(&mut self, size: usize) -> Exec<u64> {
        let ss = self.s.stack_size() as usize;
        let sp = self.s.gpr[super::state::RSP] & mask(ss);
        let lin = self.linear(SS, sp);
        let v = self.read_lin(lin, size, Access::Read)?;
        let new = sp.wrapping_add(size as u64) & mask(ss);
        let r = &mut self.s.gpr[super::state::RSP];
        *r = (*r & !mask(ss)) | new;
        Ok(v)
    }

    /// Reads `size` bytes at the stack offset `sp + delta` without popping.
    pub(crate) fn peek_stack(&mut self, delta: u64, size: usize) -> Exec<u64> {
        let ss = self.s.stack_size() as usize;
        let sp = self.s.gpr[super::state::RSP].wrapping_add(delta) & mask(ss);
        let lin = self.linear(SS, sp);
        self.read_lin(lin, size, Access::Read)
    }
}
