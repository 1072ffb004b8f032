//! String instructions (MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS) with REP prefixes.
//!
//! A REP loop runs until the count is exhausted, a condition ends it, or an iteration needs the
//! VMM (port I/O, MMIO); then RIP stays on the instruction with RCX/RSI/RDI updated, so the
//! next run continues the loop, as an interrupted REP does on hardware.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::alu::AluOp;
use super::mmu::Access;
use super::operand::{mask, seg_index};
use super::state::flags::{DF, ZF};
use super::state::{ES, RAX, RCX, RDI, RDX, RSI};
use super::{Cpu, Exec, IoReq};

/// Whether a MOVSD/CMPSD is the string form (not the SSE2 scalar-double form).
pub(crate) fn is_string_form(insn: &Instruction) -> bool {
    matches!(
        insn.op0_kind(),
        OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

/// Iterations between checks for pending interrupts in a long REP loop.
const REP_CHUNK: u64 = 4096;

fn elem_size(m: Mnemonic) -> usize {
    use Mnemonic as M;
    match m {
        M::Movsb | M::Stosb | M::Lodsb | M::Cmpsb | M::Scasb | M::Insb | M::Outsb => 1,
        M::Movsw | M::Stosw | M::Lodsw | M::Cmpsw | M::Scasw | M::Insw | M::Outsw => 2,
        M::Movsd | M::Stosd | M::Lodsd | M::Cmpsd | M::Scasd | M::Insd | M::Outsd => 4,
        _ => 8,
    }
}

/// Address size of the string operands from the operand kinds iced reports.
fn addr_size(insn: &Instruction) -> usize {
    for n in 0..insn.op_count() {
        match insn.op_kind(n) {
            OpKind::MemorySegSI | OpKind::MemoryESDI => return 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI => return 8,
            _ => {}
        }
    }
    // INS/OUTS in iced have the string operand as well; this is a fallback.
    8
}

pub(crate) fn execute(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    use Mnemonic as M;
    let m = insn.mnemonic();
    let size = elem_size(m);
    let asz = addr_size(insn);
    let amask = mask(asz);
    let rep = insn.has_rep_prefix() || insn.has_repne_prefix();
    let src_seg = seg_index(insn.memory_segment());
    let step = if cpu.s.rflags & DF != 0 {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    let is_cmp = matches!(
        m,
        M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq | M::Scasb | M::Scasw | M::Scasd | M::Scasq
    );

    let mut done = 0u64;
    loop {
        if rep {
            if cpu.s.gpr[RCX] & amask == 0 {
                break;
            }
            if done == REP_CHUNK {
                // Let interrupts in: restart the instruction later.
                cpu.s.rip = cpu.start_rip;
                return Ok(());
            }
        }
        let si = cpu.s.gpr[RSI] & amask;
        let di = cpu.s.gpr[RDI] & amask;
        match m {
            M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
                let v = cpu.read_lin(cpu.linear(src_seg, si), size, Access::Read)?;
                cpu.write_lin(cpu.linear(ES, di), size, v)?;
                adv(cpu, RSI, step, amask);
                adv(cpu, RDI, step, amask);
            }
            M::Stosb | M::Stosw | M::Stosd | M::Stosq => {
                cpu.write_lin(cpu.linear(ES, di), size, cpu.s.gpr[RAX])?;
                adv(cpu, RDI, step, amask);
            }
            M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => {
                let v = cpu.read_lin(cpu.linear(src_seg, si), size, Access::Read)?;
                let reg = match size {
                    1 => iced_x86::Register::AL,
                    2 => iced_x86::Register::AX,
                    4 => iced_x86::Register::EAX,
                    _ => iced_x86::Register::RAX,
                };
                cpu.set_reg(reg, v);
                adv(cpu, RSI, step, amask);
            }
            M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => {
                let a = cpu.read_lin(cpu.linear(src_seg, si), size, Access::Read)?;
                let b = cpu.read_lin(cpu.linear(ES, di), size, Access::Read)?;
                cpu.alu(AluOp::Sub, a, b, size);
                adv(cpu, RSI, step, amask);
                adv(cpu, RDI, step, amask);
            }
            M::Scasb | M::Scasw | M::Scasd | M::Scasq => {
                let b = cpu.read_lin(cpu.linear(ES, di), size, Access::Read)?;
                cpu.alu(AluOp::Sub, cpu.s.gpr[RAX], b, size);
                adv(cpu, RDI, step, amask);
            }
            M::Insb | M::Insw | M::Insd => {
                let port = cpu.s.gpr[RDX] as u16;
                let lin = cpu.linear(ES, di);
                // Check the destination before the port read has side effects.
                cpu.translate(lin, Access::Write)?;
                let v = cpu.port_in(port, size)?;
                cpu.write_lin(lin, size, v)?;
                adv(cpu, RDI, step, amask);
            }
            M::Outsb | M::Outsw | M::Outsd => {
                let port = cpu.s.gpr[RDX] as u16;
                let v = cpu.read_lin(cpu.linear(src_seg, si), size, Access::Read)?;
                cpu.port_out(port, size, v)?;
                adv(cpu, RSI, step, amask);
            }
            _ => return Err(super::ud()),
        }
        if !rep {
            break;
        }
        let c = cpu.s.gpr[RCX].wrapping_sub(1) & amask;
        set_addr_reg(cpu, RCX, c, amask);
        done += 1;
        if is_cmp {
            let zf = cpu.s.rflags & ZF != 0;
            if (insn.has_repe_prefix() && !zf) || (insn.has_repne_prefix() && zf) {
                break;
            }
        }
        if matches!(
            cpu.io.exit,
            Some(IoReq::PioOut { .. }) | Some(IoReq::MmioWrite { .. })
        ) {
            // The VMM must see this write before the next iteration; continue afterwards.
            if c != 0 {
                cpu.s.rip = cpu.start_rip;
            }
            return Ok(());
        }
    }
    Ok(())
}

fn adv(cpu: &mut Cpu, reg: usize, step: u64, amask: u64) {
    let v = cpu.s.gpr[reg].wrapping_add(step) & amask;
    set_addr_reg(cpu, reg, v, amask);
}

/// Writes RSI/RDI/RCX at the address size: a 16-bit write keeps the upper bits, a 32-bit one
/// zero-extends like any 32-bit register write.
fn set_addr_reg(cpu: &mut Cpu, reg: usize, v: u64, amask: u64) {
    cpu.s.gpr[reg] = if amask == 0xffff_ffff {
        v
    } else {
        (cpu.s.gpr[reg] & !amask) | v
    };
}
