//! Instruction dispatch and the general-purpose integer instructions.

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind, Register};

use super::alu::{szp, AluOp};
use super::mmu::Access;
use super::operand::{mask, sext};
use super::state::flags::{AF, CF, DF, OF, PF, SF, ZF};
use super::state::{RAX, RBP, RCX, RDX, RSP};
use super::{sse, string, system, ud, vector, Cpu, Exec, Fault, StepEnd};
use crate::memory;

fn de() -> Fault {
    Fault::Exception {
        vector: vector::DE,
        error_code: None,
    }
}

impl Cpu {
    /// Whether condition `cc` holds for the current flags.
    #[inline(always)]
    pub(crate) fn condition(&self, cc: ConditionCode) -> bool {
        let f = self.s.rflags;
        let cf = f & CF != 0;
        let zf = f & ZF != 0;
        let sf = f & SF != 0;
        let of = f & OF != 0;
        let pf = f & PF != 0;
        match cc {
            ConditionCode::o => of,
            ConditionCode::no => !of,
            ConditionCode::b => cf,
            ConditionCode::ae => !cf,
            ConditionCode::e => zf,
            ConditionCode::ne => !zf,
            ConditionCode::be => cf || zf,
            ConditionCode::a => !cf && !zf,
            ConditionCode::s => sf,
            ConditionCode::ns => !sf,
            ConditionCode::p => pf,
            ConditionCode::np => !pf,
            ConditionCode::l => sf != of,
            ConditionCode::ge => sf == of,
            ConditionCode::le => zf || sf != of,
            ConditionCode::g => !zf && sf == of,
            ConditionCode::None => true,
        }
    }

    /// Jumps to `target`, truncated to the operand size of the branch.
    #[inline(always)]
    pub(crate) fn jump(&mut self, target: u64, size: usize) {
        self.s.rip = target & mask(size);
    }

    /// Read-modify-write of operand 0: atomically when it is memory and the instruction is
    /// LOCK-prefixed (or implicitly locked, `locked`); returns the old value. `f` returns the
    /// new value, or `None` to leave memory unchanged (CMPXCHG failure).
    pub(crate) fn rmw(
        &mut self,
        insn: &Instruction,
        locked: bool,
        mut f: impl FnMut(&mut Cpu, u64) -> Option<u64>,
    ) -> Exec<u64> {
        if insn.op0_kind() == OpKind::Memory && (locked || insn.has_lock_prefix()) {
            let size = insn.memory_size().size();
            let lin = self.mem_linear(insn);
            if (lin & 0xfff) as usize + size <= 0x1000 {
                if let Ok(p) = self.translate_host(lin, Access::Write) {
                    // The closure may run more than once under contention; it only computes
                    // flags and the new value, so the last run's flags are the right ones.
                    // SAFETY: translate_host returned a mapped RAM page and the access does
                    // not cross it.
                    let old = unsafe { memory::atomic_rmw(p, size, |old| f(self, old)) };
                    self.note_store(p, size);
                    return Ok(old);
                }
            }
        }
        let old = self.read_op(insn, 0)?;
        if let Some(new) = f(self, old) {
            self.write_op(insn, 0, new)?;
        }
        Ok(old)
    }
}

/// Executes one decoded instruction. RIP already points at the next instruction.
pub(crate) fn execute(cpu: &mut Cpu, insn: &Instruction) -> Result<(), StepEnd> {
    use Mnemonic as M;
    let m = insn.mnemonic();
    match m {
        M::Mov => {
            let k0 = insn.op0_kind();
            if k0 == OpKind::Register && !insn.op0_register().is_gpr() {
                return system::mov_special(cpu, insn).map_err(Into::into);
            }
            if insn.op1_kind() == OpKind::Register && !insn.op1_register().is_gpr() {
                return system::mov_special(cpu, insn).map_err(Into::into);
            }
            let v = cpu.read_op(insn, 1)?;
            cpu.write_op(insn, 0, v)?;
        }
        M::Movzx => {
            let v = cpu.read_op(insn, 1)?;
            cpu.write_op(insn, 0, v)?;
        }
        M::Movsx | M::Movsxd => {
            let size = cpu.op_size(insn, 1);
            let v = sext(cpu.read_op(insn, 1)?, size);
            cpu.write_op(insn, 0, v)?;
        }
        M::Lea => {
            let ea = cpu.effective_address(insn);
            cpu.write_op(insn, 0, ea)?;
        }
        M::Add | M::Adc | M::Sub | M::Sbb | M::And | M::Or | M::Xor => {
            let op = match m {
                M::Add => AluOp::Add,
                M::Adc => AluOp::Adc,
                M::Sub => AluOp::Sub,
                M::Sbb => AluOp::Sbb,
                M::And => AluOp::And,
                M::Or => AluOp::Or,
                _ => AluOp::Xor,
            };
            let size = cpu.op_size(insn, 0);
            let b = cpu.read_op(insn, 1)?;
            let b = if cpu.op_size(insn, 1) < size {
                sext(b, cpu.op_size(insn, 1))
            } else {
                b
            };
            let saved = cpu.s.rflags;
            cpu.rmw(insn, false, |c, a| {
                c.s.rflags = saved;
                Some(c.alu(op, a, b, size))
            })?;
        }
        M::Cmp | M::Test => {
            let size = cpu.op_size(insn, 0);
            let a = cpu.read_op(insn, 0)?;
            let b = cpu.read_op(insn, 1)?;
            let b = if cpu.op_size(insn, 1) < size {
                sext(b, cpu.op_size(insn, 1))
            } else {
                b
            };
            cpu.alu(
                if m == M::Cmp { AluOp::Sub } else { AluOp::And },
                a,
                b,
                size,
            );
        }
        M::Inc | M::Dec => {
            let size = cpu.op_size(insn, 0);
            let saved = cpu.s.rflags;
            cpu.rmw(insn, false, |c, a| {
                c.s.rflags = saved;
                Some(c.incdec(a, size, m == M::Inc))
            })?;
        }
        M::Neg => {
            let size = cpu.op_size(insn, 0);
            let saved = cpu.s.rflags;
            cpu.rmw(insn, false, |c, a| {
                c.s.rflags = saved;
                Some(c.neg(a, size))
            })?;
        }
        M::Not => {
            let size = cpu.op_size(insn, 0);
            cpu.rmw(insn, false, |_, a| Some(!a & mask(size)))?;
        }
        M::Push => {
            let size = cpu.op_size(insn, 0);
            let size = if insn.op0_kind() == OpKind::Register || insn.op0_kind() == OpKind::Memory {
                size
            } else {
                // Immediates are pushed at the operand size of the instruction.
                push_size(cpu, insn)
            };
            let v = cpu.read_op(insn, 0)?;
            let v = if insn.op0_kind() != OpKind::Register && insn.op0_kind() != OpKind::Memory {
                sext(v, cpu.op_size(insn, 0))
            } else {
                v
            };
            if insn.op0_kind() == OpKind::Register && insn.op0_register().is_segment_register() {
                let size = push_size(cpu, insn);
                cpu.push(v, size)?;
            } else {
                cpu.push(v, size)?;
            }
        }
        M::Pop => {
            if insn.op0_kind() == OpKind::Register && insn.op0_register().is_segment_register() {
                let size = push_size(cpu, insn);
                return system::pop_segment(cpu, insn, size).map_err(Into::into);
            }
            let size = cpu.op_size(insn, 0);
            let saved_rsp = cpu.s.gpr[RSP];
            let v = cpu.pop(size)?;
            if let Err(e) = cpu.write_op(insn, 0, v) {
                cpu.s.gpr[RSP] = saved_rsp;
                return Err(e.into());
            }
        }
        M::Call => match insn.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                let size = branch_size(insn);
                cpu.push(cpu.s.rip, size)?;
                cpu.jump(insn.near_branch_target(), size);
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                return system::far_call(cpu, insn).map_err(Into::into);
            }
            _ => {
                if insn.op0_kind() == OpKind::Memory && is_far_mem(insn) {
                    return system::far_call(cpu, insn).map_err(Into::into);
                }
                let size = cpu.op_size(insn, 0);
                let target = cpu.read_op(insn, 0)?;
                cpu.push(cpu.s.rip, size)?;
                cpu.jump(target, size);
            }
        },
        M::Ret => {
            let size = stack_op_size(cpu, insn);
            let target = cpu.pop(size)?;
            if insn.op_count() == 1 {
                let n = u64::from(insn.immediate16());
                let ss = cpu.s.stack_size() as usize;
                let sp = cpu.s.gpr[RSP].wrapping_add(n) & mask(ss);
                cpu.s.gpr[RSP] = (cpu.s.gpr[RSP] & !mask(ss)) | sp;
            }
            cpu.jump(target, size);
        }
        M::Retf => return system::far_return(cpu, insn).map_err(Into::into),
        M::Jmp => match insn.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                cpu.jump(insn.near_branch_target(), branch_size(insn));
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                return system::far_jump(cpu, insn).map_err(Into::into);
            }
            _ => {
                if insn.op0_kind() == OpKind::Memory && is_far_mem(insn) {
                    return system::far_jump(cpu, insn).map_err(Into::into);
                }
                let size = cpu.op_size(insn, 0);
                let target = cpu.read_op(insn, 0)?;
                cpu.jump(target, size);
            }
        },
        M::Ja
        | M::Jae
        | M::Jb
        | M::Jbe
        | M::Je
        | M::Jg
        | M::Jge
        | M::Jl
        | M::Jle
        | M::Jne
        | M::Jno
        | M::Jnp
        | M::Jns
        | M::Jo
        | M::Jp
        | M::Js => {
            if cpu.condition(insn.condition_code()) {
                cpu.jump(insn.near_branch_target(), branch_size(insn));
            }
        }
        M::Jcxz | M::Jecxz | M::Jrcxz | M::Loop | M::Loope | M::Loopne => {
            // The counter register is part of the instruction's code (…_CX/_ECX/_RCX).
            let asz = match m {
                M::Jcxz => 2,
                M::Jecxz => 4,
                M::Jrcxz => 8,
                _ => {
                    let name = format!("{:?}", insn.code());
                    if name.ends_with("_RCX") {
                        8
                    } else if name.ends_with("_ECX") {
                        4
                    } else {
                        2
                    }
                }
            };
            let taken = if matches!(m, M::Jcxz | M::Jecxz | M::Jrcxz) {
                cpu.s.gpr[RCX] & mask(asz) == 0
            } else {
                let c = cpu.s.gpr[RCX].wrapping_sub(1) & mask(asz);
                // ECX as the counter is a 32-bit register write: it zero-extends.
                cpu.s.gpr[RCX] = if asz == 4 {
                    c
                } else {
                    (cpu.s.gpr[RCX] & !mask(asz)) | c
                };
                c != 0
                    && match m {
                        M::Loope => cpu.s.rflags & ZF != 0,
                        M::Loopne => cpu.s.rflags & ZF == 0,
                        _ => true,
                    }
            };
            if taken {
                cpu.jump(insn.near_branch_target(), branch_size(insn));
            }
        }
        M::Seta
        | M::Setae
        | M::Setb
        | M::Setbe
        | M::Sete
        | M::Setg
        | M::Setge
        | M::Setl
        | M::Setle
        | M::Setne
        | M::Setno
        | M::Setnp
        | M::Setns
        | M::Seto
        | M::Setp
        | M::Sets => {
            let v = cpu.condition(insn.condition_code()) as u64;
            cpu.write_op(insn, 0, v)?;
        }
        M::Cmova
        | M::Cmovae
        | M::Cmovb
        | M::Cmovbe
        | M::Cmove
        | M::Cmovg
        | M::Cmovge
        | M::Cmovl
        | M::Cmovle
        | M::Cmovne
        | M::Cmovno
        | M::Cmovnp
        | M::Cmovns
        | M::Cmovo
        | M::Cmovp
        | M::Cmovs => {
            let v = cpu.read_op(insn, 1)?;
            if cpu.condition(insn.condition_code()) {
                cpu.write_op(insn, 0, v)?;
            } else if insn.op0_register().size() == 4 {
                // A 32-bit CMOV zero-extends its destination even when not taken.
                let r = insn.op0_register();
                let cur = cpu.reg(r);
                cpu.set_reg(r, cur);
            }
        }
        M::Xchg => {
            if insn.op0_kind() == OpKind::Memory || insn.op1_kind() == OpKind::Memory {
                let (mem_op, reg_op) = if insn.op0_kind() == OpKind::Memory {
                    (0, 1)
                } else {
                    (1, 0)
                };
                let r = insn.op_register(reg_op);
                let v = cpu.reg(r);
                let old = if mem_op == 0 {
                    cpu.rmw(insn, true, |_, _| Some(v))?
                } else {
                    let old = cpu.read_op(insn, 1)?;
                    cpu.write_op(insn, 1, v)?;
                    old
                };
                cpu.set_reg(r, old);
            } else {
                let a = cpu.read_op(insn, 0)?;
                let b = cpu.read_op(insn, 1)?;
                cpu.write_op(insn, 0, b)?;
                cpu.write_op(insn, 1, a)?;
            }
        }
        M::Cmpxchg => {
            let size = cpu.op_size(insn, 0);
            let acc = cpu.s.gpr[RAX] & mask(size);
            let src = cpu.read_op(insn, 1)?;
            let saved = cpu.s.rflags;
            let old = cpu.rmw(insn, false, |c, old| {
                c.s.rflags = saved;
                c.alu(AluOp::Sub, acc, old, size);
                if old & mask(size) == acc {
                    Some(src)
                } else {
                    // The processor writes memory back unchanged (invisible); a register
                    // destination is not written at all, so a 32-bit one is not zero-extended
                    // (only EAX is, below).
                    None
                }
            })?;
            if cpu.s.rflags & ZF == 0 {
                let reg = match size {
                    1 => Register::AL,
                    2 => Register::AX,
                    4 => Register::EAX,
                    _ => Register::RAX,
                };
                cpu.set_reg(reg, old);
            }
        }
        M::Cmpxchg8b | M::Cmpxchg16b => {
            return system::cmpxchg_wide(cpu, insn).map_err(Into::into);
        }
        M::Xadd => {
            let size = cpu.op_size(insn, 0);
            let src = cpu.read_op(insn, 1)?;
            if insn.op0_kind() == OpKind::Register {
                // SRC <- DEST, then DEST <- sum: with one register for both, the sum wins.
                let old = cpu.read_op(insn, 0)?;
                let sum = cpu.alu(AluOp::Add, old, src, size);
                cpu.write_op(insn, 1, old)?;
                cpu.write_op(insn, 0, sum)?;
            } else {
                let saved = cpu.s.rflags;
                let old = cpu.rmw(insn, false, |c, old| {
                    c.s.rflags = saved;
                    Some(c.alu(AluOp::Add, old, src, size))
                })?;
                cpu.write_op(insn, 1, old)?;
            }
        }
        M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
            let kind = match m {
                M::Rol => 0,
                M::Ror => 1,
                M::Rcl => 2,
                M::Rcr => 3,
                M::Shl => 4,
                M::Shr => 5,
                M::Sal => 6,
                _ => 7,
            };
            let size = cpu.op_size(insn, 0);
            let count = if insn.op_count() > 1 {
                cpu.read_op(insn, 1)?
            } else {
                1
            };
            let saved = cpu.s.rflags;
            cpu.rmw(insn, false, |c, a| {
                c.s.rflags = saved;
                Some(c.shift(kind, a, count, size))
            })?;
        }
        M::Shld | M::Shrd => {
            let size = cpu.op_size(insn, 0);
            let src = cpu.read_op(insn, 1)?;
            let count = cpu.read_op(insn, 2)?;
            let saved = cpu.s.rflags;
            cpu.rmw(insn, false, |c, d| {
                c.s.rflags = saved;
                Some(c.shift_double(m == M::Shld, d, src, count, size))
            })?;
        }
        M::Mul | M::Imul | M::Div | M::Idiv => muldiv(cpu, insn, m)?,
        M::Cbw => {
            let v = sext(cpu.s.gpr[RAX], 1);
            cpu.set_reg(Register::AX, v);
        }
        M::Cwde => {
            let v = sext(cpu.s.gpr[RAX], 2);
            cpu.set_reg(Register::EAX, v);
        }
        M::Cdqe => cpu.s.gpr[RAX] = sext(cpu.s.gpr[RAX], 4),
        M::Cwd => {
            let v = if cpu.s.gpr[RAX] & 0x8000 != 0 {
                0xffff
            } else {
                0
            };
            cpu.set_reg(Register::DX, v);
        }
        M::Cdq => {
            let v = if cpu.s.gpr[RAX] & 0x8000_0000 != 0 {
                0xffff_ffff
            } else {
                0
            };
            cpu.set_reg(Register::EDX, v);
        }
        M::Cqo => {
            cpu.s.gpr[RDX] = if (cpu.s.gpr[RAX] as i64) < 0 {
                u64::MAX
            } else {
                0
            };
        }
        M::Bt | M::Bts | M::Btr | M::Btc => bit_test(cpu, insn, m)?,
        M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt | M::Popcnt => {
            let size = cpu.op_size(insn, 0);
            let v = cpu.read_op(insn, 1)? & mask(size);
            let bits = (size * 8) as u64;
            let mut f = cpu.s.rflags & !(CF | ZF | SF | OF | AF | PF);
            match m {
                M::Bsf | M::Bsr => {
                    if v == 0 {
                        cpu.s.rflags = f | ZF;
                    } else {
                        let r = if m == M::Bsf {
                            v.trailing_zeros() as u64
                        } else {
                            63 - v.leading_zeros() as u64
                        };
                        cpu.s.rflags = f;
                        cpu.write_op(insn, 0, r)?;
                    }
                }
                M::Popcnt => {
                    let r = v.count_ones() as u64;
                    if v == 0 {
                        f |= ZF;
                    }
                    cpu.s.rflags = f;
                    cpu.write_op(insn, 0, r)?;
                }
                _ => {
                    let r = if m == M::Tzcnt {
                        if v == 0 {
                            bits
                        } else {
                            v.trailing_zeros() as u64
                        }
                    } else if v == 0 {
                        bits
                    } else {
                        (v.leading_zeros() as u64) - (64 - bits)
                    };
                    if v == 0 {
                        f |= CF;
                    }
                    if r == 0 {
                        f |= ZF;
                    }
                    cpu.s.rflags = f;
                    cpu.write_op(insn, 0, r)?;
                }
            }
        }
        M::Bswap => {
            let r = insn.op0_register();
            let v = cpu.reg(r);
            let nv = if r.size() == 8 {
                v.swap_bytes()
            } else {
                u64::from((v as u32).swap_bytes())
            };
            cpu.set_reg(r, nv);
        }
        M::Clc => cpu.s.rflags &= !CF,
        M::Stc => cpu.s.rflags |= CF,
        M::Cmc => cpu.s.rflags ^= CF,
        M::Cld => cpu.s.rflags &= !DF,
        M::Std => cpu.s.rflags |= DF,
        M::Lahf => {
            let v = cpu.s.rflags & 0xd5 | 2;
            cpu.set_reg(Register::AH, v);
        }
        M::Sahf => {
            let ah = (cpu.s.gpr[RAX] >> 8) & 0xd5;
            cpu.s.rflags = (cpu.s.rflags & !0xd5) | ah;
        }
        M::Nop
        | M::Pause
        | M::Endbr64
        | M::Endbr32
        | M::Lfence
        | M::Mfence
        | M::Sfence
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw
        | M::Clflush
        | M::Clflushopt
        | M::Wait => {}
        M::Leave => {
            let ss = cpu.s.stack_size() as usize;
            let bp = cpu.s.gpr[RBP] & mask(ss);
            let size = stack_op_size(cpu, insn);
            let lin = cpu.linear(super::state::SS, bp);
            let v = cpu.read_lin(lin, size, Access::Read)?;
            cpu.s.gpr[RSP] =
                (cpu.s.gpr[RSP] & !mask(ss)) | (bp.wrapping_add(size as u64) & mask(ss));
            let reg = match size {
                2 => Register::BP,
                4 => Register::EBP,
                _ => Register::RBP,
            };
            cpu.set_reg(reg, v);
        }
        M::Enter => {
            let size = stack_op_size(cpu, insn);
            let alloc = u64::from(insn.immediate16());
            let level = insn.immediate8_2nd() & 31;
            let ss = cpu.s.stack_size() as usize;
            cpu.push(cpu.s.gpr[RBP] & mask(size), size)?;
            let frame = cpu.s.gpr[RSP] & mask(ss);
            for i in 1..level {
                let bp = cpu.s.gpr[RBP].wrapping_sub(u64::from(i) * size as u64) & mask(ss);
                let lin = cpu.linear(super::state::SS, bp);
                let v = cpu.read_lin(lin, size, Access::Read)?;
                cpu.push(v, size)?;
            }
            if level > 0 {
                cpu.push(frame, size)?;
            }
            let reg = match size {
                2 => Register::BP,
                4 => Register::EBP,
                _ => Register::RBP,
            };
            cpu.set_reg(reg, frame);
            let sp = cpu.s.gpr[RSP].wrapping_sub(alloc) & mask(ss);
            cpu.s.gpr[RSP] = (cpu.s.gpr[RSP] & !mask(ss)) | sp;
        }
        M::Xlatb => {
            let asz = if cpu.s.bitness() == 64 { 8 } else { 4 };
            let ea = cpu.s.gpr[super::state::RBX].wrapping_add(cpu.s.gpr[RAX] & 0xff) & mask(asz);
            let lin = cpu.linear(super::operand::seg_index(insn.memory_segment()), ea);
            let v = cpu.read_lin(lin, 1, Access::Read)?;
            cpu.set_reg(Register::AL, v);
        }
        M::Pushf | M::Pushfd | M::Pushfq => {
            let size = stack_op_size(cpu, insn);
            // VM and RF are never pushed.
            let v = cpu.s.rflags & !(super::state::flags::VM | super::state::flags::RF);
            cpu.push(v, size)?;
        }
        M::Popf | M::Popfd | M::Popfq => {
            let size = stack_op_size(cpu, insn);
            let v = cpu.pop(size)?;
            system::write_flags(cpu, v, size);
        }
        M::Movsb
        | M::Movsw
        | M::Movsq
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Stosq
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Lodsq
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsq
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Scasq
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd => string::execute(cpu, insn)?,
        M::Movsd | M::Cmpsd if string::is_string_form(insn) => string::execute(cpu, insn)?,
        M::Hlt => {
            if cpu.s.cpl() != 0 {
                return Err(super::gp(0).into());
            }
            return Err(StepEnd::Halt);
        }
        M::Ud0 | M::Ud1 | M::Ud2 => return Err(ud().into()),
        M::Int3 => return system::software_interrupt(cpu, vector::BP, true).map_err(Into::into),
        M::Int => {
            return system::software_interrupt(cpu, insn.immediate8(), false).map_err(Into::into)
        }
        M::Int1 => return system::software_interrupt(cpu, vector::DB, true).map_err(Into::into),
        M::Into => {
            if cpu.s.rflags & OF != 0 {
                return system::software_interrupt(cpu, vector::OF, true).map_err(Into::into);
            }
        }
        _ => {
            if let Some(r) = system::execute(cpu, insn) {
                return r.map_err(Into::into);
            }
            if let Some(r) = sse::execute(cpu, insn) {
                return r.map_err(Into::into);
            }
            return Err(cpu.unimplemented(insn).into());
        }
    }
    Ok(())
}

/// Operand size of a near branch target (the size RIP is truncated to).
fn branch_size(insn: &Instruction) -> usize {
    match insn.op0_kind() {
        OpKind::NearBranch16 => 2,
        OpKind::NearBranch32 => 4,
        _ => 8,
    }
}

/// Operand size of stack instructions without explicit operands (RET, LEAVE, PUSHF, …).
pub(crate) fn stack_op_size(cpu: &Cpu, insn: &Instruction) -> usize {
    let sp = insn.stack_pointer_increment().unsigned_abs() as usize;
    match insn.mnemonic() {
        Mnemonic::Ret if insn.op_count() == 1 => {
            let n = usize::from(insn.immediate16());
            (sp - n).max(2)
        }
        _ if sp == 2 || sp == 4 || sp == 8 => sp,
        _ => {
            if cpu.s.bitness() == 64 {
                8
            } else if cpu.s.bitness() == 32 {
                4
            } else {
                2
            }
        }
    }
}

/// Size of a push of an immediate or segment register.
fn push_size(cpu: &Cpu, insn: &Instruction) -> usize {
    let sp = insn.stack_pointer_increment().unsigned_abs() as usize;
    if sp == 2 || sp == 4 || sp == 8 {
        sp
    } else {
        stack_op_size(cpu, insn)
    }
}

fn is_far_mem(insn: &Instruction) -> bool {
    matches!(
        insn.memory_size(),
        iced_x86::MemorySize::SegPtr16
            | iced_x86::MemorySize::SegPtr32
            | iced_x86::MemorySize::SegPtr64
    )
}

fn bit_test(cpu: &mut Cpu, insn: &Instruction, m: Mnemonic) -> Exec {
    let size = cpu.op_size(insn, 0);
    let bits = (size * 8) as u64;
    let off = cpu.read_op(insn, 1)?;
    let (bit, saved_insn_addr_adjust) =
        if insn.op0_kind() == OpKind::Memory && insn.op1_kind() == OpKind::Register {
            // A register bit offset addresses memory beyond the operand (signed).
            let soff = sext(off, size) as i64;
            let byte_off = (soff >> 3) & !((size as i64) - 1);
            ((soff as u64) & (bits - 1), byte_off)
        } else {
            (off & (bits - 1), 0)
        };
    let op = match m {
        Mnemonic::Bts => 1,
        Mnemonic::Btr => 2,
        Mnemonic::Btc => 3,
        _ => 0,
    };
    let f = |v: u64| -> u64 {
        match op {
            1 => v | (1 << bit),
            2 => v & !(1 << bit),
            3 => v ^ (1 << bit),
            _ => v,
        }
    };
    let old = if saved_insn_addr_adjust != 0 {
        let lin = cpu
            .mem_linear(insn)
            .wrapping_add(saved_insn_addr_adjust as u64);
        let v = cpu.read_lin(lin, size, Access::Read)?;
        if op != 0 {
            cpu.write_lin(lin, size, f(v))?;
        }
        v
    } else if op == 0 {
        cpu.read_op(insn, 0)?
    } else {
        cpu.rmw(insn, false, |_, v| Some(f(v)))?
    };
    cpu.s.rflags = (cpu.s.rflags & !CF) | ((old >> bit) & 1);
    Ok(())
}

fn muldiv(cpu: &mut Cpu, insn: &Instruction, m: Mnemonic) -> Exec {
    // Two- and three-operand IMUL.
    if m == Mnemonic::Imul && insn.op_count() >= 2 {
        let size = cpu.op_size(insn, 0);
        let (a, b) = if insn.op_count() == 3 {
            (cpu.read_op(insn, 1)?, cpu.read_op(insn, 2)?)
        } else {
            (cpu.read_op(insn, 0)?, cpu.read_op(insn, 1)?)
        };
        let bsize = cpu.op_size(insn, if insn.op_count() == 3 { 2 } else { 1 });
        let a = sext(a, size) as i64 as i128;
        let b = sext(b, bsize.min(size)) as i64 as i128;
        let full = a * b;
        let r = (full as u64) & mask(size);
        let overflow = sext(r, size) as i64 as i128 != full;
        let mut f = cpu.s.rflags & !(CF | OF | SF | ZF | PF | AF);
        f |= szp(r, size) & (SF | ZF | PF);
        if overflow {
            f |= CF | OF;
        }
        cpu.s.rflags = f;
        cpu.write_op(insn, 0, r)?;
        return Ok(());
    }
    let size = cpu.op_size(insn, 0);
    let src = cpu.read_op(insn, 0)? & mask(size);
    let bits = (size * 8) as u32;
    let m_ = mask(size);
    let (lo, hi) = match size {
        1 => (cpu.s.gpr[RAX] & 0xff, (cpu.s.gpr[RAX] >> 8) & 0xff),
        _ => (cpu.s.gpr[RAX] & m_, cpu.s.gpr[RDX] & m_),
    };
    let set_pair = |cpu: &mut Cpu, lo: u64, hi: u64| {
        if size == 1 {
            cpu.set_reg(Register::AX, (lo & 0xff) | ((hi & 0xff) << 8));
        } else {
            let (rl, rh) = match size {
                2 => (Register::AX, Register::DX),
                4 => (Register::EAX, Register::EDX),
                _ => (Register::RAX, Register::RDX),
            };
            cpu.set_reg(rl, lo);
            cpu.set_reg(rh, hi);
        }
    };
    match m {
        Mnemonic::Mul => {
            let full = (lo as u128) * (src as u128);
            let rlo = (full as u64) & m_;
            let rhi = ((full >> bits) as u64) & m_;
            set_pair(cpu, rlo, rhi);
            let mut f = cpu.s.rflags & !(CF | OF | SF | ZF | PF | AF);
            f |= szp(rlo, size) & (SF | ZF | PF);
            if rhi != 0 {
                f |= CF | OF;
            }
            cpu.s.rflags = f;
        }
        Mnemonic::Imul => {
            let full = (sext(lo, size) as i64 as i128) * (sext(src, size) as i64 as i128);
            let rlo = (full as u64) & m_;
            let rhi = ((full >> bits) as u64) & m_;
            set_pair(cpu, rlo, rhi);
            let mut f = cpu.s.rflags & !(CF | OF | SF | ZF | PF | AF);
            f |= szp(rlo, size) & (SF | ZF | PF);
            if sext(rlo, size) as i64 as i128 != full {
                f |= CF | OF;
            }
            cpu.s.rflags = f;
        }
        Mnemonic::Div => {
            if src == 0 {
                return Err(de());
            }
            let dividend = ((hi as u128) << bits) | lo as u128;
            let q = dividend / src as u128;
            let r = dividend % src as u128;
            if q > m_ as u128 {
                return Err(de());
            }
            set_pair(cpu, q as u64, r as u64);
        }
        _ => {
            if src == 0 {
                return Err(de());
            }
            let dividend = (((hi as u128) << bits) | lo as u128) as i128;
            // Sign-extend the 2*size-byte dividend.
            let shift = 128 - 2 * bits;
            let dividend = (dividend << shift) >> shift;
            let divisor = sext(src, size) as i64 as i128;
            if dividend == i128::MIN && divisor == -1 {
                return Err(de());
            }
            let q = dividend / divisor;
            let r = dividend % divisor;
            let max = (m_ >> 1) as i128;
            if q > max || q < -max - 1 {
                return Err(de());
            }
            set_pair(cpu, (q as u64) & m_, (r as u64) & m_);
        }
    }
    Ok(())
}
