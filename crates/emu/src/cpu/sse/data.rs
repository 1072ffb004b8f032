//! Data movement: MOVD/MOVQ, full and partial XMM moves, MOVSS/MOVSD, non-temporal stores,
//! MOVMSK*, PMOVMSKB, PEXTRW/PINSRW, MASKMOV*, LDMXCSR/STMXCSR.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::super::mmu::Access;
use super::super::operand::{mask, seg_index};
use super::super::{gp, Cpu, Exec};
use super::{from64, hi64, lo64, mx};

pub(super) fn handles(m: M) -> bool {
    matches!(
        m,
        M::Movd
            | M::Movq
            | M::Movq2dq
            | M::Movdq2q
            | M::Movdqa
            | M::Movdqu
            | M::Movaps
            | M::Movups
            | M::Movapd
            | M::Movupd
            | M::Movntdq
            | M::Movntps
            | M::Movntpd
            | M::Movntq
            | M::Movss
            | M::Movsd
            | M::Movlps
            | M::Movlpd
            | M::Movhps
            | M::Movhpd
            | M::Movhlps
            | M::Movlhps
            | M::Movmskps
            | M::Movmskpd
            | M::Pmovmskb
            | M::Pextrw
            | M::Pinsrw
            | M::Maskmovdqu
            | M::Maskmovq
            | M::Ldmxcsr
            | M::Stmxcsr
    )
}

fn is_vreg(insn: &Instruction, n: u32) -> bool {
    insn.op_kind(n) == OpKind::Register && {
        let r = insn.op_register(n);
        r.is_xmm() || r.is_mm()
    }
}

/// Number of bytes of the vector register operand `n` (16 for XMM, 8 for MM).
fn reg_width(insn: &Instruction, n: u32) -> usize {
    if insn.op_kind(n) == OpKind::Register && insn.op_register(n).is_mm() {
        8
    } else {
        16
    }
}

pub(super) fn execute(cpu: &mut Cpu, insn: &Instruction) -> Option<Exec> {
    Some(exec(cpu, insn))
}

fn exec(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let m = insn.mnemonic();
    match m {
        // Move the low 4 or 8 bytes, zero-extending into a register destination.
        M::Movd | M::Movq | M::Movq2dq | M::Movdq2q => {
            let n = if m == M::Movd { 4 } else { 8 };
            let mut v = cpu.vread(insn, 1)?;
            v[n..].fill(0);
            cpu.vwrite(insn, 0, &v)
        }
        M::Movdqa
        | M::Movdqu
        | M::Movaps
        | M::Movups
        | M::Movapd
        | M::Movupd
        | M::Movntdq
        | M::Movntps
        | M::Movntpd
        | M::Movntq => {
            let v = cpu.vread(insn, 1)?;
            cpu.vwrite(insn, 0, &v)
        }
        M::Movss | M::Movsd => {
            // The string MOVSD never gets here (exec.rs takes it); refuse anything odd.
            if !is_vreg(insn, 0) && !is_vreg(insn, 1) {
                return Err(cpu.unimplemented(insn));
            }
            let n = if m == M::Movss { 4 } else { 8 };
            let mut v = cpu.vread(insn, 1)?;
            if is_vreg(insn, 0) && is_vreg(insn, 1) {
                let mut d = cpu.vreg(insn.op0_register());
                d[..n].copy_from_slice(&v[..n]);
                v = d;
            } else {
                v[n..].fill(0);
            }
            cpu.vwrite(insn, 0, &v)
        }
        M::Movlps | M::Movlpd | M::Movhps | M::Movhpd => {
            let high = matches!(m, M::Movhps | M::Movhpd);
            if insn.op0_kind() == OpKind::Memory {
                let s = cpu.vreg(insn.op1_register());
                let v = from64(if high { hi64(&s) } else { lo64(&s) }, 0);
                cpu.vwrite(insn, 0, &v)
            } else {
                let src = lo64(&cpu.vread(insn, 1)?);
                let r = insn.op0_register();
                let d = cpu.vreg(r);
                let v = if high {
                    from64(lo64(&d), src)
                } else {
                    from64(src, hi64(&d))
                };
                cpu.set_vreg(r, v);
                Ok(())
            }
        }
        M::Movhlps | M::Movlhps => {
            let r = insn.op0_register();
            let d = cpu.vreg(r);
            let s = cpu.vreg(insn.op1_register());
            let v = if m == M::Movhlps {
                from64(hi64(&s), hi64(&d))
            } else {
                from64(lo64(&d), lo64(&s))
            };
            cpu.set_vreg(r, v);
            Ok(())
        }
        M::Movmskps | M::Movmskpd | M::Pmovmskb => {
            let v = cpu.vread(insn, 1)?;
            let (lane, count) = match m {
                M::Movmskps => (4, 4),
                M::Movmskpd => (8, 2),
                _ => (1, reg_width(insn, 1)),
            };
            let mut r = 0u64;
            for i in 0..count {
                r |= u64::from(v[i * lane + lane - 1] >> 7) << i;
            }
            cpu.set_reg(insn.op0_register(), r);
            Ok(())
        }
        M::Pextrw => {
            let v = cpu.vread(insn, 1)?;
            let lanes = reg_width(insn, 1) / 2;
            let i = usize::from(insn.immediate8()) & (lanes - 1);
            let w = u16::from_le_bytes([v[2 * i], v[2 * i + 1]]);
            cpu.set_reg(insn.op0_register(), u64::from(w));
            Ok(())
        }
        M::Pinsrw => {
            let w = cpu.read_op(insn, 1)? as u16;
            let r = insn.op0_register();
            let lanes = reg_width(insn, 0) / 2;
            let i = usize::from(insn.immediate8()) & (lanes - 1);
            let mut v = cpu.vreg(r);
            v[2 * i..2 * i + 2].copy_from_slice(&w.to_le_bytes());
            cpu.set_vreg(r, v);
            Ok(())
        }
        M::Maskmovdqu | M::Maskmovq => {
            let data = cpu.vreg(insn.op1_register());
            let sel = cpu.vreg(insn.op2_register());
            let asz = match insn.op0_kind() {
                OpKind::MemorySegDI => 2,
                OpKind::MemorySegEDI => 4,
                _ => 8,
            };
            let ea = cpu.s.gpr[super::super::state::RDI] & mask(asz);
            let lin = cpu.linear(seg_index(insn.memory_segment()), ea);
            let width = reg_width(insn, 1);
            // Check the pages first so a fault leaves memory untouched.
            if sel[..width].iter().any(|b| b & 0x80 != 0) {
                cpu.translate(lin, Access::Write)?;
                cpu.translate(lin.wrapping_add(width as u64 - 1), Access::Write)?;
            }
            for i in 0..width {
                if sel[i] & 0x80 != 0 {
                    cpu.write_lin(lin.wrapping_add(i as u64), 1, u64::from(data[i]))?;
                }
            }
            Ok(())
        }
        M::Ldmxcsr => {
            let v = cpu.read_op(insn, 0)? as u32;
            if v & !mx::MASK != 0 {
                return Err(gp(0));
            }
            cpu.s.fpu.mxcsr = v;
            Ok(())
        }
        M::Stmxcsr => {
            let v = u64::from(cpu.s.fpu.mxcsr);
            cpu.write_op(insn, 0, v)
        }
        _ => Err(cpu.unimplemented(insn)),
    }
}
