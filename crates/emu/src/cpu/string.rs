//! String instructions (MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS) with REP prefixes.
//!
//! A REP loop runs until the count is exhausted, a condition ends it, or an iteration needs the
//! VMM (port I/O, MMIO); then RIP stays on the instruction with RCX/RSI/RDI updated, so the
//! next run continues the loop, as an interrupted REP does on hardware.
//!
//! REP MOVS and REP STOS going forward with 64-bit addresses — the kernel's copies to and from
//! user space, page clearing, `memcpy`/`memset` — move a page at a time straight between the
//! host pages ([`bulk`]); element by element they cost a full address translation each, which
//! made every copy the guest's network and file code does run at ~100 MB/s.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::alu::AluOp;
use super::mmu::Access;
use super::operand::{mask, seg_index};
use super::state::flags::{DF, ZF};
use super::state::{ES, RAX, RCX, RDI, RDX, RSI};
use super::{Cpu, Exec, IoReq};
use crate::memory;

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
    let bulk_form = matches!(
        m,
        M::Movsb | M::Movsw | M::Movsd | M::Movsq | M::Stosb | M::Stosw | M::Stosd | M::Stosq
    );
    if rep && bulk_form && asz == 8 && step == size as u64 {
        match bulk(cpu, m, size, src_seg, &mut done)? {
            Bulk::Finished => return Ok(()),
            Bulk::Yield => {
                cpu.s.rip = cpu.start_rip;
                return Ok(());
            }
            Bulk::Posted => {
                if cpu.s.gpr[RCX] != 0 {
                    cpu.s.rip = cpu.start_rip;
                }
                return Ok(());
            }
            // The rest element by element (from where `bulk` stopped).
            Bulk::Elementwise => {}
        }
    }
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

/// How [`bulk`] ended.
enum Bulk {
    /// RCX reached 0.
    Finished,
    /// [`REP_CHUNK`] elements done: restart the instruction after a look for interrupts.
    Yield,
    /// The next element touches a device page: the element loop goes on.
    Elementwise,
    /// An element that straddled a page wrote to a device: the VMM must see it before the
    /// next; the instruction goes on afterwards (if RCX is not 0).
    Posted,
}

/// REP MOVS / REP STOS with DF clear and 64-bit addresses, a run of whole elements within one
/// source and one destination page at a time, straight between host pointers. Registers
/// advance after each run, so a fault on the next page (raised before anything of its run is
/// written, source first as the element order has it) leaves them where hardware would.
fn bulk(cpu: &mut Cpu, m: Mnemonic, size: usize, src_seg: usize, done: &mut u64) -> Exec<Bulk> {
    use Mnemonic as M;
    let movs = matches!(m, M::Movsb | M::Movsw | M::Movsd | M::Movsq);
    loop {
        let count = cpu.s.gpr[RCX];
        if count == 0 {
            return Ok(Bulk::Finished);
        }
        if *done >= REP_CHUNK {
            return Ok(Bulk::Yield);
        }
        let dst_lin = cpu.linear(ES, cpu.s.gpr[RDI]);
        let mut room = 0x1000 - (dst_lin & 0xfff);
        let src_lin = movs.then(|| cpu.linear(src_seg, cpu.s.gpr[RSI]));
        if let Some(l) = src_lin {
            room = room.min(0x1000 - (l & 0xfff));
        }
        let k = count.min(room / size as u64).min(REP_CHUNK - *done);
        if k == 0 {
            // The next element straddles a page boundary (an unaligned copy meets one every
            // page): it alone goes through the general path, then the runs go on. Left to the
            // element loop, the rest of the instruction (up to REP_CHUNK elements) would.
            let v = match src_lin {
                Some(l) => cpu.read_lin(l, size, Access::Read)?,
                None => cpu.s.gpr[RAX],
            };
            cpu.write_lin(dst_lin, size, v)?;
            if movs {
                cpu.s.gpr[RSI] = cpu.s.gpr[RSI].wrapping_add(size as u64);
            }
            cpu.s.gpr[RDI] = cpu.s.gpr[RDI].wrapping_add(size as u64);
            cpu.s.gpr[RCX] = count - 1;
            *done += 1;
            if matches!(
                cpu.io.exit,
                Some(IoReq::PioOut { .. }) | Some(IoReq::MmioWrite { .. })
            ) {
                // A device write the VMM must see before the next element.
                return Ok(Bulk::Posted);
            }
            continue;
        }
        let src = match src_lin {
            Some(l) => match cpu.ram_ptr(l, Access::Read)? {
                Some(p) => Some(p),
                None => return Ok(Bulk::Elementwise),
            },
            None => None,
        };
        let Some(dst) = cpu.ram_ptr(dst_lin, Access::Write)? else {
            return Ok(Bulk::Elementwise);
        };
        let bytes = k as usize * size;
        // SAFETY: `src .. src + bytes` and `dst .. dst + bytes` lie inside one mapped RAM page
        // each (`room`); other vCPUs and devices may access them meanwhile, as they may any
        // guest memory the emulator reads or writes.
        unsafe {
            match src {
                Some(src) => {
                    let (s, d) = (src as usize, dst as usize);
                    if d <= s || d >= s + bytes {
                        // Element-wise forward copying and memmove agree here.
                        std::ptr::copy(src, dst, bytes);
                    } else {
                        // The destination overlaps the source ahead of it: each element must
                        // see the ones written before it, as on hardware.
                        for i in 0..k as usize {
                            let v = memory::load(src.add(i * size), size);
                            memory::store(dst.add(i * size), size, v);
                        }
                    }
                }
                None if size == 1 => std::ptr::write_bytes(dst, cpu.s.gpr[RAX] as u8, bytes),
                None => {
                    for i in 0..k as usize {
                        memory::store(dst.add(i * size), size, cpu.s.gpr[RAX]);
                    }
                }
            }
        }
        cpu.note_store(dst, bytes);
        if movs {
            cpu.s.gpr[RSI] = cpu.s.gpr[RSI].wrapping_add(bytes as u64);
        }
        cpu.s.gpr[RDI] = cpu.s.gpr[RDI].wrapping_add(bytes as u64);
        cpu.s.gpr[RCX] = count - k;
        *done += k;
    }
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
