//! Pre-decoded instructions: each instruction of a block is compiled once into an [`Op`], a
//! handler chosen for its exact form (operation, operand kinds and size fixed at compile time
//! by const generics) plus the register indexes, immediate and address recipe it needs. The
//! forms a Linux boot spends nearly all its time in (MOV, ALU, shifts, IMUL, Jcc, CALL/RET,
//! PUSH/POP, SETcc, CMOVcc, LEA, MOVZX/MOVSX) get their own handlers; every other instruction
//! runs through the general interpreter (`exec::execute`) from the same `Op`.
//!
//! Handlers have the general interpreter's semantics exactly; the host-comparison tests run
//! both paths.

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind, Register};

use super::alu::AluOp;
use super::mmu::Access;
use super::operand::{mask, sext};
use super::state::{FS, RCX, RSP};
use super::{exec, Cpu, StepEnd};
use crate::memory;

/// What a handler returns: pointer-sized, so it comes back in a register; the rare ways an
/// instruction does not simply complete are boxed.
pub(crate) type Step = Result<(), Box<StepEnd>>;

pub(crate) type Handler = fn(&mut Cpu, &Op) -> Step;

/// "No register" in a [`Mem`] recipe.
const NONE: u8 = 0xff;
/// The base of a RIP-relative operand in a [`Mem`] recipe: the address of the block's first
/// instruction (`Cpu::block_rip`), to which the displacement is relative.
const RIP: u8 = 0xfe;
/// Marks AH, CH, DH, BH in a register field (bits 8..15 of registers 0..3).
const HIGH: u8 = 0x10;

/// How a memory operand's linear address is formed from its effective address.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum SegMode {
    /// 64-bit mode, CS/DS/ES/SS: the segment base is ignored.
    Flat,
    /// 64-bit mode, FS/GS: base + offset, no truncation.
    Based64,
    /// Legacy modes: base + offset, truncated to 32 bits.
    Legacy,
}

/// The address recipe of a memory operand, resolved at compile time. No padding (see [`Op`]).
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Mem {
    /// Displacement (sign-extended; 32 bits cover every form but a 64-bit absolute `moffs`,
    /// which takes the general path). Relative to the block's first instruction for [`RIP`];
    /// for CALL, the return address's distance from it.
    disp: i32,
    /// Base register, [`RIP`], or [`NONE`].
    base: u8,
    index: u8,
    scale: u8,
    seg: u8,
    mode: SegMode,
    /// 64 minus the address size in bits: the effective address is masked with
    /// `u64::MAX >> ashift`.
    ashift: u8,
    _pad: [u8; 2],
}

const NO_MEM: Mem = Mem {
    base: NONE,
    index: NONE,
    scale: 0,
    seg: 0,
    mode: SegMode::Flat,
    disp: 0,
    ashift: 0,
    _pad: [0; 2],
};

/// One compiled instruction: half a cache line, so that the code a guest runs often (the
/// kernel's I/O path is thousands of blocks) stays in the host's caches. Its address is not
/// kept: it follows the previous instruction's (`Cpu::run_ops` counts it), and what the
/// general interpreter and a budget cut need lives beside the ops (`block::Block`).
///
/// Blocks saved with a snapshot are mapped into other processes of the same build and shared
/// (`block::BlockCache::adopt`): the handler address is the compiling process's (its block
/// records where [`general`] was there, so the handler's distance from it is known), the
/// general path's instruction is found by its distance from the op. Every byte is a field
/// (no padding), so a saved op can be checked by comparing bytes with one compiled afresh
/// before it is ever read as an `Op`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Op {
    /// The handler's address in the process that compiled the op. See [`Op::handler`].
    pub run: usize,
    /// Immediate operand (sign-extended as the instruction defines), or branch target; for
    /// the general interpreter, the distance in bytes from this op to its decoded
    /// instruction, which the block owns.
    imm: u64,
    mem: Mem,
    /// Length in bytes.
    pub len: u8,
    /// Destination (or only) register, with [`HIGH`] for AH..BH.
    dst: u8,
    /// Source register.
    src: u8,
    cc: ConditionCode,
}

const _: () = assert!(std::mem::size_of::<ConditionCode>() == 1);
const _: () = assert!(std::mem::size_of::<Mem>() == 12);
// The fields' sizes add up to the op's: there is no padding.
const _: () = assert!(std::mem::size_of::<Op>() == 8 + 8 + 12 + 4);

impl Op {
    /// Gives a general-path op its decoded instruction, which must stay at the same distance
    /// from the op for as long as the op can run (both are in the same block).
    pub(crate) fn point_at(&mut self, insn: *const Instruction, op_at: *const Op) {
        self.imm = (insn as usize).wrapping_sub(op_at as usize) as u64;
    }

    /// The function that runs this op, given its block's `slide` (`block::Block::slide`).
    ///
    /// # Safety
    /// `slide` must be that of the block holding the op (0 if this process compiled it).
    #[inline(always)]
    pub(crate) unsafe fn handler(&self, slide: usize) -> Handler {
        // SAFETY: `run + slide` is a handler of this process (the caller's guarantee).
        unsafe { std::mem::transmute::<usize, Handler>(self.run.wrapping_add(slide)) }
    }
}

/// Operand kinds, as const generic parameters: register, memory, immediate, and memory at
/// `[base + disp]` in 64-bit code with a flat segment, the commonest form in 64-bit code,
/// whose handlers add one register to the displacement instead of following the whole
/// recipe ([`Mem`]).
const R: u8 = 0;
const M: u8 = 1;
const I: u8 = 2;
const B: u8 = 3;

/// Whether operand kind `K` is in memory.
const fn in_memory(k: u8) -> bool {
    k == M || k == B
}

// ---- operand access -------------------------------------------------------------------------

#[inline(always)]
fn get<const S: usize>(cpu: &Cpu, r: u8) -> u64 {
    if S == 1 && r & HIGH != 0 {
        (cpu.s.gpr[(r & 3) as usize] >> 8) & 0xff
    } else {
        cpu.s.gpr[(r & 15) as usize] & mask(S)
    }
}

#[inline(always)]
fn set<const S: usize>(cpu: &mut Cpu, r: u8, v: u64) {
    if S == 1 && r & HIGH != 0 {
        let g = &mut cpu.s.gpr[(r & 3) as usize];
        *g = (*g & !0xff00) | ((v & 0xff) << 8);
        return;
    }
    let g = &mut cpu.s.gpr[(r & 15) as usize];
    *g = match S {
        1 => (*g & !0xff) | (v & 0xff),
        2 => (*g & !0xffff) | (v & 0xffff),
        4 => v & 0xffff_ffff,
        _ => v,
    };
}

#[inline(always)]
fn ea(cpu: &Cpu, m: &Mem) -> u64 {
    let mut a = m.disp as i64 as u64;
    match m.base {
        NONE => {}
        RIP => a = a.wrapping_add(cpu.block_rip),
        // Register numbers are below 16 (`mem_recipe`); the mask only spares a bounds check.
        b => a = a.wrapping_add(cpu.s.gpr[(b & 15) as usize]),
    }
    if m.index != NONE {
        a = a.wrapping_add(cpu.s.gpr[(m.index & 15) as usize] << m.scale);
    }
    a & (u64::MAX >> m.ashift)
}

/// The linear address of memory operand `m`, of kind `A` ([`M`] or [`B`]).
#[inline(always)]
fn linear<const A: u8>(cpu: &Cpu, m: &Mem) -> u64 {
    if A == B {
        return cpu.s.gpr[(m.base & 15) as usize].wrapping_add(m.disp as i64 as u64);
    }
    let off = ea(cpu, m);
    match m.mode {
        SegMode::Flat => off,
        SegMode::Based64 => cpu.s.seg[m.seg as usize].base.wrapping_add(off),
        SegMode::Legacy => cpu.linear(m.seg as usize, off),
    }
}

/// Reads `S` bytes at linear `l`: straight from the page on a TLB hit.
#[inline(always)]
fn read<const S: usize>(cpu: &mut Cpu, l: u64) -> Result<u64, Box<StepEnd>> {
    if let Some(p) = cpu.tlb_hit(l, S, Access::Read) {
        // SAFETY: tlb_hit returned a RAM pointer aligned to S, with S bytes left in its page.
        return Ok(unsafe { memory::load_aligned(p, S) });
    }
    Ok(cpu.read_lin(l, S, Access::Read)?)
}

/// Writes `S` bytes at linear `l`: straight into the page on a TLB hit.
#[inline(always)]
fn write<const S: usize>(cpu: &mut Cpu, l: u64, v: u64) -> Step {
    if let Some(p) = cpu.tlb_hit(l, S, Access::Write) {
        // SAFETY: tlb_hit returned a RAM pointer aligned to S, with S bytes left in its page.
        unsafe { memory::store_aligned(p, S, v) };
        cpu.note_store(p, S);
        return Ok(());
    }
    cpu.write_lin(l, S, v)?;
    posted(cpu)
}

/// After a write through the general path: a device write left for the VMM ends the run.
#[inline(always)]
fn posted(cpu: &Cpu) -> Step {
    if cpu.io.exit.is_some() {
        return Err(Box::new(StepEnd::Posted));
    }
    Ok(())
}

#[inline(always)]
fn load<const A: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Result<u64, Box<StepEnd>> {
    let l = linear::<A>(cpu, &op.mem);
    read::<S>(cpu, l)
}

/// Operand of kind `K` (register `r`, memory or immediate).
#[inline(always)]
fn operand<const K: u8, const S: usize>(
    cpu: &mut Cpu,
    op: &Op,
    r: u8,
) -> Result<u64, Box<StepEnd>> {
    match K {
        R => Ok(get::<S>(cpu, r)),
        M | B => load::<K, S>(cpu, op),
        _ => Ok(op.imm & mask(S)),
    }
}

/// Read-modify-write of a register or memory destination. `f` computes the new value and may
/// set flags; if the memory write faults, the flags are put back so the instruction has no
/// effect.
#[inline(always)]
fn modify<const D: u8, const S: usize>(
    cpu: &mut Cpu,
    op: &Op,
    f: impl FnOnce(&mut Cpu, u64) -> u64,
) -> Step {
    if D == R {
        let a = get::<S>(cpu, op.dst);
        let r = f(cpu, a);
        set::<S>(cpu, op.dst, r);
        return Ok(());
    }
    let l = linear::<D>(cpu, &op.mem);
    if let Some(p) = cpu.tlb_hit(l, S, Access::Write) {
        // SAFETY: tlb_hit returned a RAM pointer aligned to S, with S bytes left in its page
        // (a write entry implies the page is readable).
        let a = unsafe { memory::load_aligned(p, S) };
        let r = f(cpu, a);
        // SAFETY: as above.
        unsafe { memory::store_aligned(p, S, r) };
        cpu.note_store(p, S);
        return Ok(());
    }
    let a = cpu.read_lin(l, S, Access::Read)?;
    let saved = cpu.s.rflags;
    let r = f(cpu, a);
    if let Err(e) = cpu.write_lin(l, S, r) {
        cpu.s.rflags = saved;
        return Err(e.into());
    }
    posted(cpu)
}

/// Runs the instruction through the general interpreter.
fn general(cpu: &mut Cpu, op: &Op) -> Step {
    // SAFETY: the block that holds this op pointed `imm` at the decoded instruction
    // (`Op::point_at`), which it keeps beside its ops for as long as they can run.
    let insn = unsafe {
        &*((op as *const Op as *const u8).wrapping_add(op.imm as usize) as *const Instruction)
    };
    // The op loop does not keep RIP (`Cpu::run_ops`): the general interpreter reads it as the
    // next instruction's address, as the CPU does while an instruction runs. The block was
    // decoded at its own address, so the instruction knows where it is.
    let (mut start, mut next) = (insn.ip(), insn.next_ip());
    if cpu.s.bitness() != 64 {
        start &= 0xffff_ffff;
        next &= 0xffff_ffff;
    }
    cpu.start_rip = start;
    cpu.s.rip = next;
    exec::execute(cpu, insn)?;
    if cpu.s.rip != next || cpu.leave != 0 {
        cpu.leave |= super::LEFT;
    }
    posted(cpu)
}

// ---- handlers -------------------------------------------------------------------------------

const fn alu_op(n: u8) -> AluOp {
    match n {
        0 => AluOp::Add,
        1 => AluOp::Adc,
        2 | 7 => AluOp::Sub,
        3 => AluOp::Sbb,
        4 | 8 => AluOp::And,
        5 => AluOp::Or,
        _ => AluOp::Xor,
    }
}

/// ADD ADC SUB SBB AND OR XOR (0..6), CMP (7), TEST (8).
fn alu<const OP: u8, const D: u8, const K: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    let b = operand::<K, S>(cpu, op, op.src)?;
    if OP >= 7 {
        let a = match D {
            R => get::<S>(cpu, op.dst),
            _ => load::<D, S>(cpu, op)?,
        };
        cpu.alu(alu_op(OP), a, b, S);
        return Ok(());
    }
    modify::<D, S>(cpu, op, |c, a| c.alu(alu_op(OP), a, b, S))
}

fn mov<const D: u8, const K: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    let v = operand::<K, S>(cpu, op, op.src)?;
    if D == R {
        set::<S>(cpu, op.dst, v);
    } else {
        let l = linear::<D>(cpu, &op.mem);
        write::<S>(cpu, l, v)?;
    }
    Ok(())
}

/// MOVZX / MOVSX / MOVSXD: destination size `S`, source size `SS`.
fn movx<const SIGNED: bool, const K: u8, const SS: usize, const S: usize>(
    cpu: &mut Cpu,
    op: &Op,
) -> Step {
    let v = operand::<K, SS>(cpu, op, op.src)?;
    let v = if SIGNED { sext(v, SS) } else { v };
    set::<S>(cpu, op.dst, v);
    Ok(())
}

fn lea<const A: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    let a = if A == B {
        linear::<B>(cpu, &op.mem)
    } else {
        ea(cpu, &op.mem)
    };
    set::<S>(cpu, op.dst, a);
    Ok(())
}

/// Shifts and rotates; `KIND` is as in `Cpu::shift`, the count an immediate (`K` = I) or CL.
fn shift<const KIND: u8, const D: u8, const K: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    let count = if K == I {
        op.imm
    } else {
        cpu.s.gpr[RCX] & 0xff
    };
    modify::<D, S>(cpu, op, |c, a| c.shift(KIND, a, count, S))
}

/// INC (0), DEC (1), NEG (2), NOT (3).
fn unary<const KIND: u8, const D: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    modify::<D, S>(cpu, op, |c, a| match KIND {
        0 => c.incdec(a, S, true),
        1 => c.incdec(a, S, false),
        2 => c.neg(a, S),
        _ => !a & mask(S),
    })
}

/// IMUL r, r/m (THREE = false) and IMUL r, r/m, imm (THREE = true).
fn imul<const THREE: bool, const K: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    use super::state::flags::{AF, CF, OF, PF, SF, ZF};
    let v = operand::<K, S>(cpu, op, op.src)?;
    let (a, b) = if THREE {
        (v, op.imm)
    } else {
        (get::<S>(cpu, op.dst), v)
    };
    let full = (sext(a, S) as i64 as i128) * (sext(b & mask(S), S) as i64 as i128);
    let r = (full as u64) & mask(S);
    let mut f = cpu.s.rflags & !(CF | OF | SF | ZF | PF | AF);
    f |= super::alu::szp(r, S) & (SF | ZF | PF);
    if sext(r, S) as i64 as i128 != full {
        f |= CF | OF;
    }
    cpu.s.rflags = f;
    set::<S>(cpu, op.dst, r);
    Ok(())
}

fn setcc<const D: u8>(cpu: &mut Cpu, op: &Op) -> Step {
    let v = cpu.condition(op.cc) as u64;
    if D == R {
        set::<1>(cpu, op.dst, v);
    } else {
        let l = linear::<D>(cpu, &op.mem);
        write::<1>(cpu, l, v)?;
    }
    Ok(())
}

fn cmovcc<const K: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    let v = operand::<K, S>(cpu, op, op.src)?;
    if cpu.condition(op.cc) {
        set::<S>(cpu, op.dst, v);
    } else if S == 4 {
        // A 32-bit CMOV zero-extends its destination even when the condition is false.
        let cur = get::<4>(cpu, op.dst);
        set::<4>(cpu, op.dst, cur);
    }
    Ok(())
}

/// Leaves the block for `target` (`Cpu::run_ops`).
#[inline(always)]
fn branch(cpu: &mut Cpu, target: u64) {
    cpu.s.rip = target;
    cpu.leave |= super::LEFT;
}

fn jcc(cpu: &mut Cpu, op: &Op) -> Step {
    if cpu.condition(op.cc) {
        branch(cpu, op.imm);
    }
    Ok(())
}

fn jmp(cpu: &mut Cpu, op: &Op) -> Step {
    branch(cpu, op.imm);
    Ok(())
}

/// CALL rel32 in 64-bit mode.
fn call64(cpu: &mut Cpu, op: &Op) -> Step {
    let sp = cpu.s.gpr[RSP].wrapping_sub(8);
    let ret = cpu.block_rip.wrapping_add(op.mem.disp as i64 as u64);
    write::<8>(cpu, sp, ret)?;
    cpu.s.gpr[RSP] = sp;
    branch(cpu, op.imm);
    Ok(())
}

/// RET in 64-bit mode.
fn ret64(cpu: &mut Cpu, _op: &Op) -> Step {
    let sp = cpu.s.gpr[RSP];
    let target = read::<8>(cpu, sp)?;
    cpu.s.gpr[RSP] = sp.wrapping_add(8);
    branch(cpu, target);
    Ok(())
}

/// PUSH r64 in 64-bit mode (PUSH RSP pushes the value before the decrement).
fn push64(cpu: &mut Cpu, op: &Op) -> Step {
    let v = cpu.s.gpr[op.src as usize];
    let sp = cpu.s.gpr[RSP].wrapping_sub(8);
    write::<8>(cpu, sp, v)?;
    cpu.s.gpr[RSP] = sp;
    Ok(())
}

/// POP r64 in 64-bit mode (POP RSP loads the popped value).
fn pop64(cpu: &mut Cpu, op: &Op) -> Step {
    let sp = cpu.s.gpr[RSP];
    let v = read::<8>(cpu, sp)?;
    cpu.s.gpr[RSP] = sp.wrapping_add(8);
    cpu.s.gpr[op.dst as usize] = v;
    Ok(())
}

fn nop(_cpu: &mut Cpu, _op: &Op) -> Step {
    Ok(())
}

/// Instantiates handler `$f` for the operand size `$size` (1, 2, 4, 8), after the other const
/// arguments.
macro_rules! sized {
    ($f:ident, $size:expr $(, $c:expr)*) => {
        match $size {
            1 => $f::<$($c,)* 1> as Handler,
            2 => $f::<$($c,)* 2> as Handler,
            4 => $f::<$($c,)* 4> as Handler,
            _ => $f::<$($c,)* 8> as Handler,
        }
    };
}

/// Instantiates handler `$f` for a (destination, source) kind pair after `$c`.
macro_rules! kinds {
    ($f:ident, $d:expr, $k:expr, $size:expr $(, $c:expr)*) => {
        match ($d, $k) {
            (R, R) => sized!($f, $size $(, $c)*, R, R),
            (R, M) => sized!($f, $size $(, $c)*, R, M),
            (R, B) => sized!($f, $size $(, $c)*, R, B),
            (R, _) => sized!($f, $size $(, $c)*, R, I),
            (B, R) => sized!($f, $size $(, $c)*, B, R),
            (B, _) => sized!($f, $size $(, $c)*, B, I),
            (_, R) => sized!($f, $size $(, $c)*, M, R),
            _ => sized!($f, $size $(, $c)*, M, I),
        }
    };
}

// ---- flagless variants, for instructions whose flags nothing can observe -----------------

/// ADD SUB AND OR XOR (and CMP, TEST: nothing) on a register, without flags.
fn alu_nf<const OP: u8, const K: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    if OP >= 7 {
        return Ok(());
    }
    let b = operand::<K, S>(cpu, op, op.src)?;
    let a = get::<S>(cpu, op.dst);
    let r = match OP {
        0 => a.wrapping_add(b),
        2 => a.wrapping_sub(b),
        4 => a & b,
        5 => a | b,
        _ => a ^ b,
    };
    set::<S>(cpu, op.dst, r);
    Ok(())
}

fn imul_nf<const THREE: bool, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    let v = get::<S>(cpu, op.src);
    let (a, b) = if THREE {
        (v, op.imm)
    } else {
        (get::<S>(cpu, op.dst), v)
    };
    set::<S>(cpu, op.dst, a.wrapping_mul(b));
    Ok(())
}

/// SHL/SAL, SHR, SAR (KIND 4/6, 5, 7) of a register by an immediate or CL, without flags.
fn shift_nf<const KIND: u8, const K: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    let count = if K == I {
        op.imm
    } else {
        cpu.s.gpr[RCX] & 0xff
    } & if S == 8 { 0x3f } else { 0x1f };
    let a = get::<S>(cpu, op.dst);
    let bits = (S * 8) as u64;
    let r = match KIND {
        4 | 6 => {
            if count >= bits {
                0
            } else {
                a << count
            }
        }
        5 => {
            if count >= bits {
                0
            } else {
                a >> count
            }
        }
        _ => (sext(a, S) as i64 >> count.min(63)) as u64,
    };
    set::<S>(cpu, op.dst, r);
    Ok(())
}

/// INC, DEC, NEG (KIND 0, 1, 2) of a register, without flags.
fn unary_nf<const KIND: u8, const S: usize>(cpu: &mut Cpu, op: &Op) -> Step {
    let a = get::<S>(cpu, op.dst);
    let r = match KIND {
        0 => a.wrapping_add(1),
        1 => a.wrapping_sub(1),
        _ => a.wrapping_neg(),
    };
    set::<S>(cpu, op.dst, r);
    Ok(())
}

/// Whether `insn` can neither fault, leave the block nor reach a device: register and
/// immediate operands only (LEA computes an address without touching memory), and an
/// operation that raises nothing on them.
pub(crate) fn cannot_fault(insn: &Instruction) -> bool {
    use Mnemonic as Mn;
    let m = insn.mnemonic();
    let operands_ok = (0..insn.op_count()).all(|n| match insn.op_kind(n) {
        OpKind::Register => insn.op_register(n).is_gpr(),
        OpKind::Memory => m == Mn::Lea,
        k => kind_is_immediate(k),
    });
    operands_ok
        && !insn.has_lock_prefix()
        && matches!(
            m,
            Mn::Mov
                | Mn::Movzx
                | Mn::Movsx
                | Mn::Movsxd
                | Mn::Lea
                | Mn::Add
                | Mn::Adc
                | Mn::Sub
                | Mn::Sbb
                | Mn::And
                | Mn::Or
                | Mn::Xor
                | Mn::Cmp
                | Mn::Test
                | Mn::Inc
                | Mn::Dec
                | Mn::Neg
                | Mn::Not
                | Mn::Rol
                | Mn::Ror
                | Mn::Rcl
                | Mn::Rcr
                | Mn::Shl
                | Mn::Sal
                | Mn::Shr
                | Mn::Sar
                | Mn::Shld
                | Mn::Shrd
                | Mn::Bswap
                | Mn::Nop
        )
        || (m == Mn::Imul && insn.op_count() >= 2 && operands_ok)
        || (operands_ok && is_setcc_or_cmov(m))
}

fn is_setcc_or_cmov(m: Mnemonic) -> bool {
    is_setcc(m) || is_cmov(m)
}

pub(crate) fn is_setcc(m: Mnemonic) -> bool {
    use Mnemonic as Mn;
    matches!(
        m,
        Mn::Seta
            | Mn::Setae
            | Mn::Setb
            | Mn::Setbe
            | Mn::Sete
            | Mn::Setg
            | Mn::Setge
            | Mn::Setl
            | Mn::Setle
            | Mn::Setne
            | Mn::Setno
            | Mn::Setnp
            | Mn::Setns
            | Mn::Seto
            | Mn::Setp
            | Mn::Sets
    )
}

pub(crate) fn is_cmov(m: Mnemonic) -> bool {
    use Mnemonic as Mn;
    matches!(
        m,
        Mn::Cmova
            | Mn::Cmovae
            | Mn::Cmovb
            | Mn::Cmovbe
            | Mn::Cmove
            | Mn::Cmovg
            | Mn::Cmovge
            | Mn::Cmovl
            | Mn::Cmovle
            | Mn::Cmovne
            | Mn::Cmovno
            | Mn::Cmovnp
            | Mn::Cmovns
            | Mn::Cmovo
            | Mn::Cmovp
            | Mn::Cmovs
    )
}

pub(crate) fn kind_is_immediate(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// The flagless handler for `insn`, if it has one: register destination, no memory.
fn select_flagless(insn: &Instruction, op: &Op) -> Option<Handler> {
    use Mnemonic as Mn;
    if !cannot_fault(insn) || insn.op_count() == 0 || insn.op_kind(0) != OpKind::Register {
        return None;
    }
    let size = insn.op0_register().size();
    if !matches!(size, 1 | 2 | 4 | 8) || op.dst & HIGH != 0 {
        return None;
    }
    let m = insn.mnemonic();
    let k1 = if insn.op_count() > 1 {
        kind(insn, 1)
    } else {
        None
    };
    Some(match m {
        Mn::Add | Mn::Sub | Mn::And | Mn::Or | Mn::Xor | Mn::Cmp | Mn::Test => {
            let k = k1?;
            macro_rules! by_op {
                ($($name:ident = $o:literal),*) => {
                    match m {
                        $(Mn::$name => if k == R {
                            sized!(alu_nf, size, $o, R)
                        } else {
                            sized!(alu_nf, size, $o, I)
                        },)*
                        _ => return None,
                    }
                };
            }
            by_op!(
                Add = 0,
                Sub = 2,
                And = 4,
                Or = 5,
                Xor = 6,
                Cmp = 7,
                Test = 8
            )
        }
        Mn::Imul if matches!(size, 2 | 4 | 8) && k1? == R => {
            if insn.op_count() == 3 {
                sized!(imul_nf, size, true)
            } else {
                sized!(imul_nf, size, false)
            }
        }
        Mn::Shl | Mn::Sal | Mn::Shr | Mn::Sar => {
            let by_cl = insn.op_kind(1) == OpKind::Register && insn.op1_register() == Register::CL;
            if !by_cl && insn.op_kind(1) != OpKind::Immediate8 {
                return None;
            }
            macro_rules! by_kind {
                ($($name:ident = $kind:literal),*) => {
                    match m {
                        $(Mn::$name => if by_cl {
                            sized!(shift_nf, size, $kind, R)
                        } else {
                            sized!(shift_nf, size, $kind, I)
                        },)*
                        _ => return None,
                    }
                };
            }
            by_kind!(Shl = 4, Sal = 6, Shr = 5, Sar = 7)
        }
        Mn::Inc => sized!(unary_nf, size, 0),
        Mn::Dec => sized!(unary_nf, size, 1),
        Mn::Neg => sized!(unary_nf, size, 2),
        _ => return None,
    })
}

// ---- compilation ----------------------------------------------------------------------------

/// Register field value for a general-purpose register, or None.
fn gpr(reg: Register) -> Option<u8> {
    if !reg.is_gpr() {
        return None;
    }
    if matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    ) {
        return Some(HIGH | (reg as u8 - Register::AH as u8));
    }
    Some((reg.full_register() as usize - Register::RAX as usize) as u8)
}

/// The recipe of `insn`'s memory operand; None if its displacement does not fit 32 bits (a
/// 64-bit absolute `moffs`).
fn mem_recipe(insn: &Instruction, bitness: u32, block_rip: u64) -> Option<Mem> {
    let seg = super::operand::seg_index(insn.memory_segment());
    let mode = if bitness != 64 {
        SegMode::Legacy
    } else if seg >= FS {
        SegMode::Based64
    } else {
        SegMode::Flat
    };
    let reg = |r: Register| gpr(r).map(|g| g & 15).unwrap_or(NONE);
    if insn.is_ip_rel_memory_operand() {
        // RIP-relative (EIP-relative with an address-size prefix): the handler adds the
        // block's address (`Cpu::block_rip`; the op loop does not keep RIP).
        let asize = if insn.memory_base() == Register::EIP {
            4
        } else {
            8
        };
        let disp = insn.ip_rel_memory_address().wrapping_sub(block_rip) as i64;
        return Some(Mem {
            base: RIP,
            seg: seg as u8,
            mode,
            disp: i32::try_from(disp).ok()?,
            ashift: (64 - 8 * asize) as u8,
            ..NO_MEM
        });
    }
    let (base, index) = (insn.memory_base(), insn.memory_index());
    let asize = if base != Register::None {
        base.size()
    } else if index != Register::None {
        index.size()
    } else {
        match insn.memory_displ_size() {
            2 => 2,
            4 => 4,
            _ if bitness == 64 => 8,
            _ => 4,
        }
    };
    let disp = insn.memory_displacement64();
    let disp = if asize < 8 {
        // The address is masked to `asize` bytes: the low 32 bits decide it.
        disp as u32 as i32
    } else {
        i32::try_from(disp as i64).ok()?
    };
    Some(Mem {
        base: reg(base),
        index: reg(index),
        scale: insn.memory_index_scale().trailing_zeros() as u8,
        seg: seg as u8,
        mode,
        disp,
        ashift: (64 - 8 * asize) as u8,
        _pad: [0; 2],
    })
}

/// Kind of operand `n`: R (a general-purpose register), M, I, or None for anything else.
fn kind(insn: &Instruction, n: u32) -> Option<u8> {
    match insn.op_kind(n) {
        OpKind::Register => gpr(insn.op_register(n)).map(|_| R),
        OpKind::Memory => Some(M),
        k if kind_is_immediate(k) => Some(I),
        _ => None,
    }
}

fn size_of(insn: &Instruction, n: u32) -> usize {
    match insn.op_kind(n) {
        OpKind::Register => insn.op_register(n).size(),
        OpKind::Memory => insn.memory_size().size(),
        _ => 0,
    }
}

/// A compiled instruction: the op, and whether it takes the general path, whose op must be
/// pointed at the decoded instruction ([`Op::point_at`]).
pub(crate) struct Compiled {
    pub op: Op,
    pub general: bool,
}

/// The handler that computes every flag `insn` writes: what an op compiled from it runs when
/// its block does not run to its end, in case [`compile`] dropped its flags (see
/// `block::flags_needed`). The same choice `compile` makes before dropping them (for the
/// same block address).
pub(crate) fn exact_handler(insn: &Instruction, bitness: u32, block_rip: u64) -> Handler {
    {
        let run = compile(insn, bitness, block_rip, true).op.run;
        // SAFETY: compiled just now, by this process.
        unsafe { std::mem::transmute::<usize, Handler>(run) }
    }
}

/// Where the general interpreter's handler is in this process: what blocks record, so that
/// the handlers of ops compiled by another process can be found (`block::Block::slide`).
pub(crate) fn general_address() -> usize {
    general as Handler as usize
}

/// Where the handlers of a few common instructions lie relative to [`general`]: what saved
/// ops encode, so it tells builds whose saved blocks this one cannot use apart
/// (`block::BlockCache::adopt`).
pub(crate) fn handler_fingerprint() -> u64 {
    // mov rax, rbx; mov rax, [rdi]; add eax, 1; jne; call
    let code = [
        0x48, 0x89, 0xd8, 0x48, 0x8b, 0x07, 0x83, 0xc0, 0x01, 0x75, 0x00, 0xe8, 0, 0, 0, 0,
    ];
    let mut decoder = iced_x86::Decoder::new(64, &code, iced_x86::DecoderOptions::NONE);
    let mut h = 0u64;
    for insn in &mut decoder {
        let distance = compile(&insn, 64, 0, true)
            .op
            .run
            .wrapping_sub(general_address());
        h = h.rotate_left(13) ^ distance as u64;
    }
    h
}

/// The general interpreter's handler (a placeholder where a handler is needed).
pub(crate) fn general_handler() -> Handler {
    general
}

/// Compiles `insn` (decoded at `bitness`) into an [`Op`]; `flags` says whether the status
/// flags it writes may be observed (`block::flags_needed`).
///
/// `block_rip` is the address of the block's first instruction: the ops of a block are
/// compiled for that address (a RIP-relative operand or a return address is kept as a
/// distance from it).
pub(crate) fn compile(insn: &Instruction, bitness: u32, block_rip: u64, flags: bool) -> Compiled {
    let mut op = Op {
        run: general as Handler as usize,
        len: insn.len() as u8,
        dst: 0,
        src: 0,
        cc: insn.condition_code(),
        imm: 0,
        mem: NO_MEM,
    };
    let general_path = |mut op: Op| {
        op.run = general as Handler as usize;
        Compiled { op, general: true }
    };
    if insn.has_lock_prefix() || insn.memory_size().size() > 8 {
        return general_path(op);
    }
    let has_mem = (0..insn.op_count()).any(|n| insn.op_kind(n) == OpKind::Memory);
    if has_mem {
        match mem_recipe(insn, bitness, block_rip) {
            Some(m) => op.mem = m,
            None => return general_path(op),
        }
    }
    let Some(run) = select(insn, bitness, block_rip, &mut op) else {
        return general_path(op);
    };
    op.run = run as usize;
    if !flags {
        if let Some(nf) = select_flagless(insn, &op) {
            op.run = nf as usize;
        }
    }
    Compiled { op, general: false }
}

/// The specialised handler for `insn`, filling `op`'s fields; None for the general path.
fn select(insn: &Instruction, bitness: u32, block_rip: u64, op: &mut Op) -> Option<Handler> {
    use Mnemonic as Mn;
    let m = insn.mnemonic();
    let n = insn.op_count();
    let k0 = if n > 0 { kind(insn, 0) } else { None };
    let k1 = if n > 1 { kind(insn, 1) } else { None };
    let size = if n > 0 { size_of(insn, 0) } else { 0 };
    if n > 0 && insn.op_kind(0) == OpKind::Register {
        op.dst = gpr(insn.op0_register()).unwrap_or(0);
    }
    if n > 1 && insn.op_kind(1) == OpKind::Register {
        op.src = gpr(insn.op1_register()).unwrap_or(0);
    }
    if n > 1 && k1 == Some(I) {
        op.imm = insn.immediate(1);
    }
    let sized_ok = matches!(size, 1 | 2 | 4 | 8);
    // The kind of a memory operand for the handlers that have the [`B`] form.
    let mem = &op.mem;
    let flat_base =
        mem.mode == SegMode::Flat && mem.base < 16 && mem.index == NONE && mem.ashift == 0;
    let based = move |k: u8| {
        if k == M && flat_base {
            B
        } else {
            k
        }
    };
    let h = match m {
        Mn::Add | Mn::Adc | Mn::Sub | Mn::Sbb | Mn::And | Mn::Or | Mn::Xor | Mn::Cmp | Mn::Test => {
            let (d, k) = (based(k0?), based(k1?));
            if d == I || (in_memory(d) && in_memory(k)) || !sized_ok {
                return None;
            }
            let code: u8 = match m {
                Mn::Add => 0,
                Mn::Adc => 1,
                Mn::Sub => 2,
                Mn::Sbb => 3,
                Mn::And => 4,
                Mn::Or => 5,
                Mn::Xor => 6,
                Mn::Cmp => 7,
                _ => 8,
            };
            // TEST r/m, r is symmetric; CMP r, r/m reads the memory as its second operand.
            macro_rules! by_op {
                ($($o:literal),*) => {
                    match code {
                        $($o => kinds!(alu, d, k, size, $o),)*
                        _ => kinds!(alu, d, k, size, 8),
                    }
                };
            }
            by_op!(0, 1, 2, 3, 4, 5, 6, 7)
        }
        Mn::Mov => {
            let (d, k) = (based(k0?), based(k1?));
            if d == I || !sized_ok {
                return None;
            }
            kinds!(mov, d, k, size)
        }
        Mn::Movzx | Mn::Movsx | Mn::Movsxd => {
            let (d, k) = (k0?, based(k1?));
            let ss = size_of(insn, 1);
            if d != R || k == I {
                return None;
            }
            macro_rules! by_src {
                ($signed:expr) => {
                    match (k, ss) {
                        (R, 1) => sized!(movx, size, $signed, R, 1),
                        (R, 2) => sized!(movx, size, $signed, R, 2),
                        (R, 4) => sized!(movx, size, $signed, R, 4),
                        (B, 1) => sized!(movx, size, $signed, B, 1),
                        (B, 2) => sized!(movx, size, $signed, B, 2),
                        (B, 4) => sized!(movx, size, $signed, B, 4),
                        (_, 1) => sized!(movx, size, $signed, M, 1),
                        (_, 2) => sized!(movx, size, $signed, M, 2),
                        (_, 4) => sized!(movx, size, $signed, M, 4),
                        _ => return None,
                    }
                };
            }
            if !matches!(size, 2 | 4 | 8) {
                return None;
            }
            if m == Mn::Movzx {
                by_src!(false)
            } else {
                by_src!(true)
            }
        }
        Mn::Lea => {
            if k0? != R || !matches!(size, 2 | 4 | 8) {
                return None;
            }
            if flat_base {
                sized!(lea, size, B)
            } else {
                sized!(lea, size, M)
            }
        }
        Mn::Rol | Mn::Ror | Mn::Shl | Mn::Sal | Mn::Shr | Mn::Sar => {
            let d = k0?;
            if d == I || !sized_ok {
                return None;
            }
            let by_cl = insn.op_kind(1) == OpKind::Register && insn.op1_register() == Register::CL;
            if !by_cl {
                if insn.op_kind(1) != OpKind::Immediate8 {
                    return None;
                }
                op.imm = u64::from(insn.immediate8());
            }
            let k = if by_cl { R } else { I };
            macro_rules! by_kind {
                ($($name:ident = $kind:literal),*) => {
                    match m {
                        $(Mn::$name => match (d, k) {
                            (R, I) => sized!(shift, size, $kind, R, I),
                            (R, _) => sized!(shift, size, $kind, R, R),
                            (_, I) => sized!(shift, size, $kind, M, I),
                            _ => sized!(shift, size, $kind, M, R),
                        },)*
                        _ => return None,
                    }
                };
            }
            by_kind!(Rol = 0, Ror = 1, Shl = 4, Shr = 5, Sal = 6, Sar = 7)
        }
        Mn::Inc | Mn::Dec | Mn::Neg | Mn::Not => {
            let d = k0?;
            if d == I || !sized_ok {
                return None;
            }
            macro_rules! by_dst {
                ($kind:literal) => {
                    if d == R {
                        sized!(unary, size, $kind, R)
                    } else {
                        sized!(unary, size, $kind, M)
                    }
                };
            }
            match m {
                Mn::Inc => by_dst!(0),
                Mn::Dec => by_dst!(1),
                Mn::Neg => by_dst!(2),
                _ => by_dst!(3),
            }
        }
        Mn::Imul if n >= 2 => {
            if k0? != R || !matches!(size, 2 | 4 | 8) {
                return None;
            }
            let k = k1?;
            if n == 3 {
                op.imm = insn.immediate(2);
                if k == M {
                    sized!(imul, size, true, M)
                } else {
                    sized!(imul, size, true, R)
                }
            } else if k == M {
                sized!(imul, size, false, M)
            } else {
                sized!(imul, size, false, R)
            }
        }
        _ if insn.condition_code() != ConditionCode::None => match m {
            Mn::Ja
            | Mn::Jae
            | Mn::Jb
            | Mn::Jbe
            | Mn::Je
            | Mn::Jg
            | Mn::Jge
            | Mn::Jl
            | Mn::Jle
            | Mn::Jne
            | Mn::Jno
            | Mn::Jnp
            | Mn::Jns
            | Mn::Jo
            | Mn::Jp
            | Mn::Js => {
                op.imm = insn.near_branch_target();
                jcc as Handler
            }
            _ if is_setcc(m) && size == 1 => {
                if k0? == R {
                    setcc::<R> as Handler
                } else {
                    setcc::<M> as Handler
                }
            }
            _ if is_cmov(m) && matches!(size, 2 | 4 | 8) => {
                if k1? == M {
                    sized!(cmovcc, size, M)
                } else {
                    sized!(cmovcc, size, R)
                }
            }
            _ => return None,
        },
        Mn::Jmp
            if matches!(
                insn.op0_kind(),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            ) =>
        {
            op.imm = insn.near_branch_target();
            jmp as Handler
        }
        Mn::Call if bitness == 64 && insn.op0_kind() == OpKind::NearBranch64 => {
            op.imm = insn.near_branch_target();
            op.mem.disp = i32::try_from(insn.next_ip().wrapping_sub(block_rip) as i64).ok()?;
            call64 as Handler
        }
        Mn::Ret if bitness == 64 && n == 0 && insn.code() == iced_x86::Code::Retnq => {
            ret64 as Handler
        }
        Mn::Push if bitness == 64 && k0 == Some(R) && size == 8 => {
            op.src = op.dst;
            push64 as Handler
        }
        Mn::Pop if bitness == 64 && k0 == Some(R) && size == 8 => pop64 as Handler,
        Mn::Nop => nop as Handler,
        _ => return None,
    };
    Some(h)
}
