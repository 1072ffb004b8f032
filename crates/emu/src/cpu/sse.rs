//! SSE/SSE2, MMX and x87 instructions (the subset CPUID advertises: FPU, MMX, FXSR, SSE,
//! SSE2, CMOV for FCMOVcc/FCOMI), FXSAVE/FXRSTOR, LDMXCSR/STMXCSR.
//!
//! Instructions of later extensions that share a mnemonic with an SSE2 one (SSE4.1 PEXTRW
//! m16, SSE3 FISTTP, anything VEX-encoded) are refused by their CPUID feature list and end in
//! #UD, as on a CPU without the feature.
//!
//! Submodules: [`data`] (moves, MOVMSK, LDMXCSR), [`int`] (packed integer and bitwise),
//! [`float`] (scalar/packed float arithmetic, compares and conversions), [`x87`],
//! [`fxsave`].

mod data;
mod float;
mod fxsave;
mod int;
mod x87;

#[cfg(test)]
mod tests;

use iced_x86::{CpuidFeature, Instruction, Mnemonic, OpKind, Register};

use super::mmu::Access;
use super::state::{cr0, cr4};
use super::{gp, ud, vector, Cpu, Exec, Fault};

/// An XMM value (or an MMX value in its low 8 bytes), little-endian.
pub(super) type V = [u8; 16];

/// MXCSR exception flag bits (also the x87 FSW exception bits 0..5).
pub(super) mod mx {
    pub const IE: u32 = 1 << 0;
    pub const DE: u32 = 1 << 1;
    pub const ZE: u32 = 1 << 2;
    pub const OE: u32 = 1 << 3;
    pub const UE: u32 = 1 << 4;
    pub const PE: u32 = 1 << 5;
    pub const DAZ: u32 = 1 << 6;
    pub const FTZ: u32 = 1 << 15;
    /// Writable MXCSR bits (MXCSR_MASK as FXSAVE reports it).
    pub const MASK: u32 = 0xffff;
}

/// Which execution unit an instruction belongs to, for the CR0/CR4 checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Unit {
    /// SSE/SSE2 (any XMM operand, MXCSR): #UD if CR0.EM or !CR4.OSFXSR, #NM if CR0.TS.
    Sse,
    /// MMX-only: #UD if CR0.EM, #NM if CR0.TS.
    Mmx,
    /// x87 and FXSAVE/FXRSTOR: #NM if CR0.EM or CR0.TS.
    X87,
}

pub(super) fn nm() -> Fault {
    Fault::Exception {
        vector: vector::NM,
        error_code: None,
    }
}

/// Whether every CPUID feature the instruction needs is one the emulator advertises.
fn features_ok(insn: &Instruction) -> bool {
    insn.cpuid_features().iter().all(|f| {
        matches!(
            f,
            CpuidFeature::INTEL8086
                | CpuidFeature::INTEL186
                | CpuidFeature::INTEL286
                | CpuidFeature::INTEL386
                | CpuidFeature::INTEL486
                | CpuidFeature::FPU
                | CpuidFeature::FPU287
                | CpuidFeature::FPU387
                | CpuidFeature::CMOV
                | CpuidFeature::MMX
                | CpuidFeature::SSE
                | CpuidFeature::SSE2
                | CpuidFeature::FXSR
                | CpuidFeature::X64
        )
    })
}

/// `None` if `insn` is not an SSE/MMX/x87 instruction this module implements.
pub(crate) fn execute(cpu: &mut Cpu, insn: &Instruction) -> Option<Exec> {
    if !features_ok(insn) {
        return None;
    }
    let m = insn.mnemonic();
    match m {
        Mnemonic::Fxsave | Mnemonic::Fxsave64 | Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => {
            return Some(
                cpu.sse_check(Unit::X87)
                    .and_then(|()| fxsave::execute(cpu, insn)),
            );
        }
        Mnemonic::Emms => {
            return Some(cpu.sse_check(Unit::Mmx).map(|()| cpu.s.fpu.ftw = 0));
        }
        // A plain GPR store with a non-temporal hint: no FPU state involved.
        Mnemonic::Movnti => {
            return Some(cpu.read_op(insn, 1).and_then(|v| cpu.write_op(insn, 0, v)));
        }
        _ => {}
    }
    if x87::handles(m) {
        return Some(
            cpu.sse_check(Unit::X87)
                .and_then(|()| x87::execute(cpu, insn)),
        );
    }
    type Handler = fn(&mut Cpu, &Instruction) -> Option<Exec>;
    let handler: Handler = if data::handles(m) {
        data::execute
    } else if int::handles(m) {
        int::execute
    } else if float::handles(m) {
        float::execute
    } else {
        return None;
    };
    if let Err(e) = cpu.sse_check(unit_of(insn)) {
        return Some(Err(e));
    }
    handler(cpu, insn)
}

/// SSE if the instruction has an XMM operand or touches MXCSR, MMX if only MM registers.
fn unit_of(insn: &Instruction) -> Unit {
    let mut mmx = false;
    for n in 0..insn.op_count() {
        if insn.op_kind(n) == OpKind::Register {
            let r = insn.op_register(n);
            if r.is_xmm() {
                return Unit::Sse;
            }
            mmx |= r.is_mm();
        }
    }
    if mmx {
        Unit::Mmx
    } else {
        Unit::Sse
    }
}

#[inline]
pub(super) fn xmm_index(r: Register) -> usize {
    r as usize - Register::XMM0 as usize
}

#[inline]
pub(super) fn mm_index(r: Register) -> usize {
    r as usize - Register::MM0 as usize
}

/// Whether a 16-byte memory operand of this instruction may be misaligned.
fn unaligned_ok(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Movdqu | Mnemonic::Maskmovdqu
    )
}

pub(super) fn lo64(v: &V) -> u64 {
    u64::from_le_bytes(v[..8].try_into().unwrap())
}

pub(super) fn hi64(v: &V) -> u64 {
    u64::from_le_bytes(v[8..].try_into().unwrap())
}

pub(super) fn from64(lo: u64, hi: u64) -> V {
    let mut v = [0; 16];
    v[..8].copy_from_slice(&lo.to_le_bytes());
    v[8..].copy_from_slice(&hi.to_le_bytes());
    v
}

impl Cpu {
    /// The CR0/CR4 checks of an SSE, MMX or x87 instruction.
    pub(super) fn sse_check(&self, unit: Unit) -> Exec {
        let c0 = self.s.cr0;
        match unit {
            Unit::Sse => {
                if c0 & cr0::EM != 0 || self.s.cr4 & cr4::OSFXSR == 0 {
                    return Err(ud());
                }
            }
            Unit::Mmx => {
                if c0 & cr0::EM != 0 {
                    return Err(ud());
                }
            }
            Unit::X87 => {
                if c0 & cr0::EM != 0 {
                    return Err(nm());
                }
            }
        }
        if c0 & cr0::TS != 0 {
            return Err(nm());
        }
        Ok(())
    }

    /// Switches the x87 unit to MMX mode: TOP = 0 and every register tagged valid. The
    /// registers keep their physical slots (`st[i]` is ST(i), so the array rotates).
    pub(super) fn mmx_enter(&mut self) {
        let f = &mut self.s.fpu;
        let top = usize::from((f.fsw >> 11) & 7);
        f.st.rotate_right(top);
        f.fsw &= !(7 << 11);
        f.ftw = 0xff;
    }

    pub(super) fn mm(&mut self, i: usize) -> u64 {
        self.mmx_enter();
        u64::from_le_bytes(self.s.fpu.st[i][..8].try_into().unwrap())
    }

    pub(super) fn set_mm(&mut self, i: usize, v: u64) {
        self.mmx_enter();
        let r = &mut self.s.fpu.st[i];
        r[..8].copy_from_slice(&v.to_le_bytes());
        r[8] = 0xff;
        r[9] = 0xff;
    }

    /// An XMM or MM register (MM zero-extended).
    pub(super) fn vreg(&mut self, r: Register) -> V {
        if r.is_xmm() {
            self.s.fpu.xmm[xmm_index(r)]
        } else {
            let v = self.mm(mm_index(r));
            from64(v, 0)
        }
    }

    /// Writes an XMM register (all 16 bytes) or an MM register (the low 8).
    pub(super) fn set_vreg(&mut self, r: Register, v: V) {
        if r.is_xmm() {
            self.s.fpu.xmm[xmm_index(r)] = v;
        } else {
            self.set_mm(mm_index(r), lo64(&v));
        }
    }

    /// Reads `len` bytes of memory at `lin` into a vector, zero-extended.
    pub(super) fn read_vec(&mut self, lin: u64, len: usize) -> Exec<V> {
        let mut v = [0u8; 16];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(8);
            let x = self.read_lin(lin.wrapping_add(off as u64), n, Access::Read)?;
            v[off..off + n].copy_from_slice(&x.to_le_bytes()[..n]);
            off += n;
        }
        Ok(v)
    }

    /// Writes the low `len` bytes of `v` at `lin`, checking every page first so a fault
    /// leaves memory untouched.
    pub(super) fn write_vec(&mut self, lin: u64, v: &V, len: usize) -> Exec {
        if len > 8 {
            self.translate(lin, Access::Write)?;
            self.translate(lin.wrapping_add(len as u64 - 1), Access::Write)?;
        }
        let mut off = 0;
        while off < len {
            let n = (len - off).min(8);
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&v[off..off + n]);
            self.write_lin(lin.wrapping_add(off as u64), n, u64::from_le_bytes(b))?;
            off += n;
        }
        Ok(())
    }

    /// Linear address of the memory operand, with the 16-byte alignment check of legacy SSE
    /// 128-bit accesses.
    pub(super) fn vec_mem_linear(&self, insn: &Instruction) -> Exec<u64> {
        let lin = self.mem_linear(insn);
        let size = insn.memory_size().size();
        if size == 16 && lin & 15 != 0 && !unaligned_ok(insn.mnemonic()) {
            return Err(gp(0));
        }
        Ok(lin)
    }

    /// Operand `n` as a vector: XMM (16 bytes), MM (8), a GPR (its width) or memory (its
    /// size), zero-extended to 16 bytes; immediates as their value.
    pub(super) fn vread(&mut self, insn: &Instruction, n: u32) -> Exec<V> {
        match insn.op_kind(n) {
            OpKind::Register => {
                let r = insn.op_register(n);
                if r.is_xmm() || r.is_mm() {
                    Ok(self.vreg(r))
                } else {
                    Ok(from64(self.reg(r), 0))
                }
            }
            OpKind::Memory => {
                let lin = self.vec_mem_linear(insn)?;
                self.read_vec(lin, insn.memory_size().size())
            }
            _ => Ok(from64(self.read_op(insn, n)?, 0)),
        }
    }

    /// Writes operand `n`: a whole XMM register, an MM register (low 8 bytes), a GPR (low 8
    /// bytes, with the register's width) or memory (the operand's size).
    pub(super) fn vwrite(&mut self, insn: &Instruction, n: u32, v: &V) -> Exec {
        match insn.op_kind(n) {
            OpKind::Register => {
                let r = insn.op_register(n);
                if r.is_xmm() || r.is_mm() {
                    self.set_vreg(r, *v);
                } else {
                    self.set_reg(r, lo64(v));
                }
                Ok(())
            }
            OpKind::Memory => {
                let lin = self.vec_mem_linear(insn)?;
                self.write_vec(lin, v, insn.memory_size().size())
            }
            _ => Ok(()),
        }
    }

    /// Records SSE floating-point exception flags (MXCSR bits 0..5): #XM (or #UD without
    /// CR4.OSXMMEXCPT) if one is unmasked, in which case the caller must not write a result.
    pub(super) fn mxcsr_raise(&mut self, flags: u32) -> Exec {
        let flags = flags & 0x3f;
        let mxcsr = &mut self.s.fpu.mxcsr;
        *mxcsr |= flags;
        if flags & !(*mxcsr >> 7) & 0x3f != 0 {
            return Err(if self.s.cr4 & cr4::OSXMMEXCPT != 0 {
                Fault::Exception {
                    vector: vector::XM,
                    error_code: None,
                }
            } else {
                ud()
            });
        }
        Ok(())
    }
}
