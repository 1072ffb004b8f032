//! Hot blocks translated to host code.
//!
//! A 64-bit block that is entered often within a short window (sampled [`HEAT`] times within
//! 2^[`WINDOW_SHIFT`] blocks run) is translated into host instructions that do its work on the
//! CPU state in place: guest registers and RFLAGS stay in [`Cpu`] (addressed from RDI), a memory
//! operand goes through an inline probe of the TLB, and the status flags come from the host's
//! own arithmetic (`pushfq`) where anything can read them. A block is translated up to its
//! first instruction without a translation; the interpreter runs the rest.
//!
//! The generated code never handles anything unusual itself: on a TLB miss, an access that is
//! not to RAM or not aligned, or a store into the running block's own code, it stores the
//! address of the instruction it stopped at and returns how many instructions it completed,
//! and the block's ops go on from there in the interpreter (`Cpu::run_native`). Nothing of
//! the instruction it stopped at has happened then, so faults, MMIO and self-modifying code are
//! the interpreter's, exactly as before. A translated block is entered only where its
//! interpreted form would be — after the same lookup and the same check of its bytes against
//! guest memory, with the budget covering it whole and in the TLB mode it was translated for —
//! so what the guest can observe is the same.
//!
//! Why only hot blocks: the kernel's I/O path runs thousands of different blocks once or twice
//! per request; translated, they take far more host code than their ops take data, and on
//! these hosts instruction-cache misses cost more than the interpretation saves (see
//! docs/decisions/emulator-road-to-translator.md). Loops that run hundreds of times per
//! request (pinning and mapping pages) are where translation pays.

use std::ptr::NonNull;

use iced_x86::code_asm::*;
use iced_x86::{ConditionCode, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use super::block::Block;
use super::fast::{is_cmov, is_setcc, kind_is_immediate};
use super::mmu::layout as tlb;
use super::state::flags::{AF, CF, OF, PF, SF, STATUS, ZF};
use super::state::{CpuState, Seg, FS, GS, RSP};
use super::Cpu;

/// Generated code for one block: runs its instructions on the CPU and returns how many it
/// completed, with [`BAIL`] set if it stopped at an instruction the interpreter must run;
/// RIP is then where execution goes on.
pub(crate) type Native = unsafe extern "C" fn(*mut Cpu) -> u64;

/// In what [`Native`] code returns: it stopped before an instruction it could not complete.
pub(crate) const BAIL: u64 = 1 << 32;

/// How hotness is found: one block entry in 2^[`SAMPLE_SHIFT`] is sampled (the block being
/// entered when the count of blocks run is a multiple of it), and a block sampled [`HEAT`]
/// times within one window of 2^[`WINDOW_SHIFT`] blocks run is hot: it takes about 1.5 % of
/// the blocks entered. A loop run hundreds of times per I/O request is; a block run once per
/// request is not (it would need to be 1 in 64). Sampling keeps the cost for every other
/// block at a test of the count.
const SAMPLE_SHIFT: u32 = 8;
const HEAT: u32 = 4;
const WINDOW_SHIFT: u32 = 16;
/// Bytes of host code per vCPU at most; when they are used up, nothing more is translated
/// until the block cache is emptied.
const CODE_BYTES: usize = 16 << 20;

/// A block's [`Block::hot`]: bits 0..15 count its entries in the window of bits 16..29; bits
/// 30..31 say whether it was translated or cannot be.
const COUNT: u32 = 0xffff;
const WINDOW: u32 = 0x3fff << 16;
const TRANSLATED: u32 = 1 << 30;
const NEVER: u32 = 2 << 30;

/// Blocks start on these boundaries in their arena (`block::BLOCK_ALIGN`).
const BLOCK_UNIT: usize = 64;

/// What the run loop does with a block it is about to run.
pub(crate) enum Entry {
    Interpret,
    Run(Native),
    Translate,
}

/// Per-vCPU translator state: where each translated block's code is, and the code.
pub(crate) struct Translator {
    /// For each unit of the block arena (`arena_base`, `units`) whose block was translated:
    /// the address of its code, with bit 0 set if translated for user mode. Touched only
    /// for translated blocks.
    native: NonNull<usize>,
    units: usize,
    arena_base: usize,
    /// Generated code: readable; executable where code was put, and writable (not
    /// executable) only while code is copied in.
    code: NonNull<u8>,
    code_used: usize,
    /// Samples within a window that make a block hot (0: never translate), and which block
    /// entries are sampled (those where the count of blocks run has these bits clear).
    threshold: u32,
    sample_mask: u64,
    /// Blocks translated, runs of translated blocks, and runs that stopped early for the
    /// interpreter (statistics).
    pub translated: u64,
    pub runs: u64,
    pub bails: u64,
}

// SAFETY: the mappings are this translator's own; it moves between threads with its vCPU.
unsafe impl Send for Translator {}

impl Translator {
    /// A translator for the blocks of an arena of `arena_bytes` at `arena_base`.
    pub fn new(arena_base: usize, arena_bytes: usize) -> Translator {
        let units = arena_bytes / BLOCK_UNIT;
        let native = crate::memory::map_anonymous(units * std::mem::size_of::<usize>())
            .unwrap_or_else(|| panic!("emu: cannot map the translator's block table"));
        // SAFETY: a new mapping the kernel places, reserved only.
        let code = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CODE_BYTES,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(
            code != libc::MAP_FAILED,
            "emu: cannot reserve the translator's code space"
        );
        // FERROVISOR_EMU_TRANSLATE=0 turns translation off (to compare).
        let threshold = match std::env::var("FERROVISOR_EMU_TRANSLATE").as_deref() {
            Ok(v) => v.parse().unwrap_or(HEAT),
            Err(_) => HEAT,
        };
        Translator {
            native: native.cast(),
            units,
            arena_base,
            code: NonNull::new(code.cast()).expect("mmap returned a null mapping"),
            code_used: 0,
            threshold: threshold.min(COUNT),
            sample_mask: (1 << SAMPLE_SHIFT) - 1,
            translated: 0,
            runs: 0,
            bails: 0,
        }
    }

    /// Bytes of host code generated since the last reset.
    pub fn code_bytes(&self) -> usize {
        self.code_used
    }

    /// Makes a block hot once it was entered `n` times within a window, every entry counted
    /// (0: never translate). For tests: the usual setting samples entries.
    pub fn set_threshold(&mut self, n: u32) {
        self.threshold = n.min(COUNT);
        self.sample_mask = 0;
    }

    /// Forgets all generated code: the block arena was emptied or moved, and with it every
    /// block's mark.
    pub fn reset(&mut self, arena_base: usize) {
        self.arena_base = arena_base;
        // SAFETY: both mappings are this translator's own; nothing refers into them once the
        // blocks they describe are gone (the run loop asks again for every block).
        unsafe {
            let len = self.units * std::mem::size_of::<usize>();
            libc::madvise(self.native.as_ptr().cast(), len, libc::MADV_DONTNEED);
            libc::mprotect(self.code.as_ptr().cast(), CODE_BYTES, libc::PROT_READ);
            libc::madvise(self.code.as_ptr().cast(), CODE_BYTES, libc::MADV_DONTNEED);
        }
        self.code_used = 0;
    }

    /// The slot of the block at `block` in the table of code addresses.
    fn slot(&self, block: &Block) -> Option<*mut usize> {
        let unit = (block as *const Block as usize).wrapping_sub(self.arena_base) / BLOCK_UNIT;
        // SAFETY: in bounds of the table's mapping.
        (unit < self.units).then(|| unsafe { self.native.as_ptr().add(unit) })
    }

    /// Whether [`enter`](Self::enter) may do more for `block` than say "interpret": it was
    /// translated, or this entry is sampled.
    #[inline(always)]
    pub fn worth_a_look(&self, block: &Block, run: u64) -> bool {
        block.hot.get() & TRANSLATED != 0 || run & self.sample_mask == 0
    }

    /// What to do with `block`, about to be run whole in TLB mode `user` when `run` blocks
    /// have run so far: run its translation, translate it, or interpret it. The block must
    /// be this process's own (its mark is written).
    #[inline(always)]
    pub fn enter(&mut self, block: &Block, user: bool, run: u64) -> Entry {
        let hot = block.hot.get();
        if hot & TRANSLATED != 0 {
            return match self.native(block, user) {
                Some(f) => Entry::Run(f),
                None => Entry::Interpret,
            };
        }
        if run & self.sample_mask == 0 {
            return self.sample(block, run);
        }
        Entry::Interpret
    }

    /// Counts a sample of `block`'s entries.
    #[inline(never)]
    fn sample(&mut self, block: &Block, run: u64) -> Entry {
        let hot = block.hot.get();
        if hot & NEVER != 0 || self.threshold == 0 {
            return Entry::Interpret;
        }
        let window = (((run >> WINDOW_SHIFT) as u32) << 16) & WINDOW;
        let count = if hot & WINDOW == window {
            (hot & COUNT) + 1
        } else {
            1
        };
        block.hot.set(window | count);
        if count >= self.threshold {
            Entry::Translate
        } else {
            Entry::Interpret
        }
    }

    /// The code of `block`, if it was translated for TLB mode `user`.
    #[inline(always)]
    pub fn native(&self, block: &Block, user: bool) -> Option<Native> {
        if block.hot.get() & TRANSLATED == 0 {
            return None;
        }
        let slot = self.slot(block)?;
        // SAFETY: in the table, which only this vCPU's thread touches.
        let at = unsafe { *slot };
        if at == 0 || at & 1 != user as usize {
            return None;
        }
        // SAFETY: `translate` stored the address of code generated for this block.
        Some(unsafe { std::mem::transmute::<usize, Native>(at & !1) })
    }

    /// Translates `block` for TLB mode `user` (CPL 3 when true) and remembers the result.
    #[cold]
    #[inline(never)]
    pub fn translate(&mut self, block: &Block, user: bool) -> Option<Native> {
        let slot = self.slot(block)?;
        let code = emit(
            block,
            user,
            self.code.as_ptr() as u64 + self.code_used as u64,
        )
        .and_then(|bytes| self.install(&bytes));
        let Some(at) = code else {
            block.hot.set(NEVER);
            return None;
        };
        self.translated += 1;
        block.hot.set(TRANSLATED);
        // SAFETY: as in `native`.
        unsafe { *slot = at | user as usize };
        // SAFETY: `install` put code generated for this block at `at`.
        Some(unsafe { std::mem::transmute::<usize, Native>(at) })
    }

    /// Copies `bytes` (assembled for the next free address) into the code space.
    fn install(&mut self, bytes: &[u8]) -> Option<usize> {
        if self.code_used + bytes.len() > CODE_BYTES {
            return None;
        }
        let at = self.code.as_ptr() as usize + self.code_used;
        let page = at & !0xfff;
        let end = (at + bytes.len() + 0xfff) & !0xfff;
        // SAFETY: `page .. end` is inside the code space, which this translator owns; no code
        // runs while it is writable (one thread per vCPU, and this one is here).
        unsafe {
            if libc::mprotect(
                page as *mut _,
                end - page,
                libc::PROT_READ | libc::PROT_WRITE,
            ) != 0
            {
                return None;
            }
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len());
            if libc::mprotect(
                page as *mut _,
                end - page,
                libc::PROT_READ | libc::PROT_EXEC,
            ) != 0
            {
                return None;
            }
        }
        self.code_used = (self.code_used + bytes.len() + 15) & !15;
        Some(at)
    }
}

impl Drop for Translator {
    fn drop(&mut self) {
        // SAFETY: the mappings `new` made, used by nothing else.
        unsafe {
            libc::munmap(
                self.native.as_ptr().cast(),
                self.units * std::mem::size_of::<usize>(),
            );
            libc::munmap(self.code.as_ptr().cast(), CODE_BYTES);
        }
    }
}

// ---- code generation ------------------------------------------------------------------------

/// Offsets in [`Cpu`] that generated code uses (from RDI).
struct Layout;

impl Layout {
    const S: usize = std::mem::offset_of!(Cpu, s);
    const GPR: usize = Self::S + std::mem::offset_of!(CpuState, gpr);
    const RIP: usize = Self::S + std::mem::offset_of!(CpuState, rip);
    const RFLAGS: usize = Self::S + std::mem::offset_of!(CpuState, rflags);
    const SEG: usize = Self::S + std::mem::offset_of!(CpuState, seg);
    const TLB: usize = std::mem::offset_of!(Cpu, tlb) + tlb::ENTRIES_PTR;
    const CODE_LO: usize = std::mem::offset_of!(Cpu, code_lo);
    const CODE_LEN: usize = std::mem::offset_of!(Cpu, code_len);

    fn gpr(r: u8) -> i32 {
        (Self::GPR + 8 * usize::from(r)) as i32
    }

    fn seg_base(seg: usize) -> i32 {
        (Self::SEG + seg * std::mem::size_of::<Seg>() + std::mem::offset_of!(Seg, base)) as i32
    }
}

fn g64(r: u8) -> AsmMemoryOperand {
    qword_ptr(rdi + Layout::gpr(r))
}

fn g32(r: u8) -> AsmMemoryOperand {
    dword_ptr(rdi + Layout::gpr(r))
}

/// Why a block is not translated.
#[derive(Debug)]
struct Unsupported;

impl From<IcedError> for Unsupported {
    fn from(_: IcedError) -> Self {
        Unsupported
    }
}

type Emit<T = ()> = Result<T, Unsupported>;

/// A memory operand in 64-bit code.
#[derive(Clone, Copy)]
struct MemOp {
    /// RIP-relative: the absolute address.
    abs: Option<u64>,
    base: Option<u8>,
    index: Option<(u8, u32)>,
    disp: i32,
    /// FS or GS: its base is added.
    seg: Option<usize>,
}

#[derive(Clone, Copy)]
enum Opnd {
    Reg(u8),
    Imm(u64),
    Mem(MemOp),
}

/// The number (0..15) of a general register of `size` bytes (AH..BH have none: they are not
/// the low part of a register).
fn gpr(r: Register, size: usize) -> Option<u8> {
    if r.size() != size || matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) {
        return None;
    }
    let n = (r.full_register() as u32).wrapping_sub(Register::RAX as u32);
    (n < 16).then_some(n as u8)
}

fn reg64(r: Register) -> Option<u8> {
    if r == Register::None {
        return None;
    }
    gpr(r, 8)
}

fn mem_op(insn: &Instruction) -> Emit<MemOp> {
    let seg = match insn.memory_segment() {
        Register::FS => Some(FS),
        Register::GS => Some(GS),
        _ => None,
    };
    if insn.memory_base() == Register::RIP {
        return Ok(MemOp {
            abs: Some(insn.ip_rel_memory_address()),
            base: None,
            index: None,
            disp: 0,
            seg,
        });
    }
    let base = match insn.memory_base() {
        Register::None => None,
        r => Some(reg64(r).ok_or(Unsupported)?),
    };
    let index = match insn.memory_index() {
        Register::None => None,
        r => Some((reg64(r).ok_or(Unsupported)?, insn.memory_index_scale())),
    };
    let disp = i32::try_from(insn.memory_displacement64() as i64).map_err(|_| Unsupported)?;
    Ok(MemOp {
        abs: None,
        base,
        index,
        disp,
        seg,
    })
}

fn operand(insn: &Instruction, n: u32, size: usize) -> Emit<Opnd> {
    Ok(match insn.op_kind(n) {
        OpKind::Register => Opnd::Reg(gpr(insn.op_register(n), size).ok_or(Unsupported)?),
        OpKind::Memory => Opnd::Mem(mem_op(insn)?),
        k if kind_is_immediate(k) => Opnd::Imm(insn.immediate(n)),
        _ => return Err(Unsupported),
    })
}

/// The size of operand `n`.
fn op_size(insn: &Instruction, n: u32) -> usize {
    match insn.op_kind(n) {
        OpKind::Register => insn.op_register(n).size(),
        OpKind::Memory => insn.memory_size().size(),
        _ => 0,
    }
}

/// One block's code being generated.
struct Gen {
    a: CodeAssembler,
    user: bool,
    /// Stubs that leave the block: label, RIP to store, instructions completed, and whether
    /// the next one needs the interpreter ([`BAIL`]).
    exits: Vec<(CodeLabel, u64, u32, bool)>,
}

/// TLB access kinds, as `mmu::Access`.
const READ: usize = 0;
const WRITE: usize = 1;

impl Gen {
    /// A new label for leaving the block with RIP = `rip` after `done` instructions, the next
    /// one for the interpreter if `bail`.
    fn exit(&mut self, rip: u64, done: u32, bail: bool) -> CodeLabel {
        let l = self.a.create_label();
        self.exits.push((l, rip, done, bail));
        l
    }

    /// Where to go when instruction `i` at `here` needs the interpreter (not yet begun).
    fn bail(&mut self, here: u64, i: u32) -> CodeLabel {
        self.exit(here, i, true)
    }

    /// RSI = the linear address of `m` (the effective address if `linear` is false).
    fn address(&mut self, m: &MemOp, linear: bool) -> Emit {
        let a = &mut self.a;
        if let Some(abs) = m.abs {
            a.mov(rsi, abs)?;
        } else {
            match m.base {
                Some(b) => a.mov(rsi, g64(b))?,
                None => a.mov(rsi, 0u64)?,
            }
            match m.index {
                Some((ix, scale)) => {
                    a.mov(rdx, g64(ix))?;
                    a.lea(rsi, qword_ptr(rsi + rdx * scale + m.disp))?;
                }
                None if m.disp != 0 => a.lea(rsi, qword_ptr(rsi + m.disp))?,
                None => {}
            }
        }
        if linear {
            if let Some(seg) = m.seg {
                a.add(rsi, qword_ptr(rdi + Layout::seg_base(seg)))?;
            }
        }
        Ok(())
    }

    /// RDX = the host address of the `size`-byte access `acc` at linear RSI, or leave the
    /// block at `bail`. Clobbers RCX and RSI.
    fn probe(&mut self, size: usize, acc: usize, bail: CodeLabel) -> Emit {
        let tag = (usize::from(self.user) * 3 + acc) * 8 + tlb::TAGS;
        let a = &mut self.a;
        a.mov(rdx, rsi)?;
        a.shr(rdx, 12)?;
        a.and(edx, (tlb::ENTRIES - 1) as i32)?;
        a.imul_3(rdx, rdx, tlb::ENTRY_SIZE as i32)?;
        a.add(rdx, qword_ptr(rdi + Layout::TLB as i32))?;
        a.mov(rcx, rsi)?;
        a.and(rcx, (tlb::PAGE_MASK | (size as u64 - 1)) as i64 as i32)?;
        a.or(rcx, tlb::TAG_VALID as i32)?;
        a.cmp(rcx, qword_ptr(rdx + tag as i32))?;
        a.jne(bail)?;
        a.mov(rdx, qword_ptr(rdx + tlb::HOST as i32))?;
        a.test(rdx, rdx)?;
        a.je(bail)?;
        a.and(esi, 0xfff)?;
        a.add(rdx, rsi)?;
        Ok(())
    }

    /// Leaves the block at `bail` if a `size`-byte store at host RDX would write the
    /// running block's own code. Clobbers RCX and R8.
    fn not_own_code(&mut self, size: usize, bail: CodeLabel) -> Emit {
        let a = &mut self.a;
        a.lea(rcx, qword_ptr(rdx + (size as i32 - 1)))?;
        a.sub(rcx, qword_ptr(rdi + Layout::CODE_LO as i32))?;
        a.mov(r8, qword_ptr(rdi + Layout::CODE_LEN as i32))?;
        a.add(r8, size as i32 - 1)?;
        a.cmp(rcx, r8)?;
        a.jb(bail)?;
        Ok(())
    }

    /// Loads `size` bytes from host RDX into RAX (zero-extended), or `dst` if given.
    fn load(&mut self, size: usize, dst: AsmRegister64) -> Emit {
        let a = &mut self.a;
        match size {
            8 => a.mov(dst, qword_ptr(rdx))?,
            4 => a.mov(low32(dst), dword_ptr(rdx))?,
            2 => a.movzx(low32(dst), word_ptr(rdx))?,
            _ => a.movzx(low32(dst), byte_ptr(rdx))?,
        }
        Ok(())
    }

    /// Stores the low `size` bytes of RAX at host RDX.
    fn store(&mut self, size: usize) -> Emit {
        let a = &mut self.a;
        match size {
            8 => a.mov(qword_ptr(rdx), rax)?,
            4 => a.mov(dword_ptr(rdx), eax)?,
            2 => a.mov(word_ptr(rdx), ax)?,
            _ => a.mov(byte_ptr(rdx), al)?,
        }
        Ok(())
    }

    /// Copies the host's status flags into RFLAGS: the bits in `from_host` from the host,
    /// the rest of `written` cleared.
    fn flags(&mut self, written: u64, from_host: u64) -> Emit {
        let a = &mut self.a;
        a.pushfq()?;
        a.pop(rcx)?;
        a.and(ecx, from_host as i32)?;
        a.mov(rdx, qword_ptr(rdi + Layout::RFLAGS as i32))?;
        a.and(rdx, !written as i64 as i32)?;
        a.or(rdx, rcx)?;
        a.mov(qword_ptr(rdi + Layout::RFLAGS as i32), rdx)?;
        Ok(())
    }

    /// Leaves the block for `target` after `done` instructions.
    fn leave_for(&mut self, target: AsmRegister64, done: u32) -> Emit {
        let a = &mut self.a;
        a.mov(qword_ptr(rdi + Layout::RIP as i32), target)?;
        a.mov(eax, done)?;
        a.ret()?;
        Ok(())
    }
}

fn low32(r: AsmRegister64) -> AsmRegister32 {
    if r == rax {
        eax
    } else if r == rcx {
        ecx
    } else {
        edx
    }
}

/// Generates code for `block` as it would run in TLB mode `user`, assembled for address `at`.
fn emit(block: &Block, user: bool, at: u64) -> Option<Vec<u8>> {
    if block.bitness != 64 {
        return None;
    }
    let mut decoder = Decoder::with_ip(64, block.code_bytes(), block.rip, DecoderOptions::NONE);
    let insns: Vec<Instruction> = (0..block.ops().len()).map(|_| decoder.decode()).collect();
    let needed = super::block::flags_needed(&insns);
    let mut g = Gen {
        a: CodeAssembler::new(64).ok()?,
        user,
        exits: Vec::new(),
    };
    let mut ended = false;
    for (i, insn) in insns.iter().enumerate() {
        match one(&mut g, insn, i as u32, needed[i]) {
            Ok(leaves) => ended = leaves,
            // The first instruction without a translation, and the rest of the block, are
            // left to the interpreter (what was emitted for it only reads).
            Err(Unsupported) if i > 0 => {
                let bail = g.bail(insn.ip(), i as u32);
                g.a.jmp(bail).ok()?;
                ended = true;
                break;
            }
            Err(Unsupported) => return None,
        }
        if ended && i + 1 < insns.len() {
            return None;
        }
    }
    if !ended {
        let end = insns.last()?.next_ip();
        g.a.mov(rcx, end).ok()?;
        g.leave_for(rcx, insns.len() as u32).ok()?;
    }
    for (mut l, rip, done, bail) in std::mem::take(&mut g.exits) {
        g.a.set_label(&mut l).ok()?;
        g.a.mov(rcx, rip).ok()?;
        g.a.mov(qword_ptr(rdi + Layout::RIP as i32), rcx).ok()?;
        g.a.mov(rax, u64::from(done) | if bail { BAIL } else { 0 })
            .ok()?;
        g.a.ret().ok()?;
    }
    g.a.assemble(at).ok()
}

/// Where an instruction's first operand is while it runs: a guest register, or guest memory
/// at the host address in RDX.
#[derive(Clone, Copy)]
enum Place {
    Reg(u8),
    Host,
}

/// An immediate as the host instruction of operand size `size` takes it.
fn imm_for(v: u64, size: usize) -> Emit<i32> {
    Ok(match size {
        1 => v as u8 as i8 as i32,
        2 => v as u16 as i16 as i32,
        4 => v as u32 as i32,
        _ => i32::try_from(v as i64).map_err(|_| Unsupported)?,
    })
}

/// Loads the low `size` bytes of guest register `r`, zero-extended, into RAX or RCX.
fn reg_to(g: &mut Gen, host: AsmRegister64, r: u8, size: usize) -> Emit {
    let at = rdi + Layout::gpr(r);
    let a = &mut g.a;
    let h32 = low32(host);
    match size {
        8 => a.mov(host, qword_ptr(at))?,
        4 => a.mov(h32, dword_ptr(at))?,
        2 => a.movzx(h32, word_ptr(at))?,
        _ => a.movzx(h32, byte_ptr(at))?,
    }
    Ok(())
}

/// Writes RAX to guest register `r` as an instruction of operand size `size` does: 4 bytes
/// clear the upper half (RAX holds a zero-extended value then), 1 and 2 keep the rest.
fn rax_to_reg(g: &mut Gen, r: u8, size: usize) -> Emit {
    let at = rdi + Layout::gpr(r);
    let a = &mut g.a;
    match size {
        8 | 4 => a.mov(qword_ptr(at), rax)?,
        2 => a.mov(word_ptr(at), ax)?,
        _ => a.mov(byte_ptr(at), al)?,
    }
    Ok(())
}

/// The value of operand `src` (`size` bytes, zero-extended) into RAX; leaves for the
/// interpreter at instruction `i` (at `here`) if its memory needs it.
fn src_to_rax(g: &mut Gen, src: Opnd, size: usize, (here, i): (u64, u32)) -> Emit {
    match src {
        Opnd::Reg(s) => reg_to(g, rax, s, size),
        Opnd::Imm(v) => {
            g.a.mov(rax, v & mask(size))?;
            Ok(())
        }
        Opnd::Mem(mem) => {
            let bail = g.bail(here, i);
            g.address(&mem, true)?;
            g.probe(size, READ, bail)?;
            g.load(size, rax)
        }
    }
}

/// A source operand: into RCX, or an immediate for the host instruction.
fn fetch_src(g: &mut Gen, src: Opnd, size: usize, here: u64, i: u32) -> Emit<Option<i32>> {
    match src {
        Opnd::Reg(s) => reg_to(g, rcx, s, size)?,
        Opnd::Imm(v) => return Ok(Some(imm_for(v, size)?)),
        Opnd::Mem(mem) => {
            let bail = g.bail(here, i);
            g.address(&mem, true)?;
            g.probe(size, READ, bail)?;
            g.load(size, rcx)?;
        }
    }
    Ok(None)
}

/// The first operand into RAX, for access `acc` (a write is checked against the running
/// block's code first); RCX is kept if `keep_rcx`.
fn fetch_dst(
    g: &mut Gen,
    dst: Opnd,
    size: usize,
    acc: usize,
    (here, i): (u64, u32),
    keep_rcx: bool,
) -> Emit<Place> {
    match dst {
        Opnd::Reg(d) => {
            reg_to(g, rax, d, size)?;
            Ok(Place::Reg(d))
        }
        Opnd::Mem(mem) => {
            if keep_rcx {
                g.a.mov(r9, rcx)?;
            }
            let bail = g.bail(here, i);
            g.address(&mem, true)?;
            g.probe(size, acc, bail)?;
            if acc == WRITE {
                g.not_own_code(size, bail)?;
            }
            g.load(size, rax)?;
            if keep_rcx {
                g.a.mov(rcx, r9)?;
            }
            Ok(Place::Host)
        }
        Opnd::Imm(_) => Err(Unsupported),
    }
}

/// Writes RAX back to where the first operand came from.
fn put(g: &mut Gen, place: Place, size: usize) -> Emit {
    match place {
        Place::Reg(d) => rax_to_reg(g, d, size),
        Place::Host => g.store(size),
    }
}

/// Runs host instruction `$op` on RAX (at `$size`) and RCX or the immediate `$imm`.
macro_rules! sized_op {
    ($a:expr, $op:ident, $size:expr, $imm:expr) => {
        match ($size, $imm) {
            (8, Some(v)) => $a.$op(rax, v)?,
            (4, Some(v)) => $a.$op(eax, v)?,
            (2, Some(v)) => $a.$op(ax, v)?,
            (_, Some(v)) => $a.$op(al, v)?,
            (8, None) => $a.$op(rax, rcx)?,
            (4, None) => $a.$op(eax, ecx)?,
            (2, None) => $a.$op(ax, cx)?,
            (_, None) => $a.$op(al, cl)?,
        }
    };
}

/// Runs host instruction `$op` on RAX alone (at `$size`), or with count `$n` (CL if None).
macro_rules! sized_unary {
    ($a:expr, $op:ident, $size:expr) => {
        match $size {
            8 => $a.$op(rax)?,
            4 => $a.$op(eax)?,
            2 => $a.$op(ax)?,
            _ => $a.$op(al)?,
        }
    };
    ($a:expr, $op:ident, $size:expr, $n:expr) => {
        match ($size, $n) {
            (8, Some(n)) => $a.$op(rax, n)?,
            (4, Some(n)) => $a.$op(eax, n)?,
            (2, Some(n)) => $a.$op(ax, n)?,
            (_, Some(n)) => $a.$op(al, n)?,
            (8, None) => $a.$op(rax, cl)?,
            (4, None) => $a.$op(eax, cl)?,
            (2, None) => $a.$op(ax, cl)?,
            (_, None) => $a.$op(al, cl)?,
        }
    };
}

/// Generates instruction `i` of the block; true if it leaves the block (it must be the last).
/// `flags`: whether anything can read the status flags it writes.
fn one(g: &mut Gen, insn: &Instruction, i: u32, flags: bool) -> Emit<bool> {
    use Mnemonic as Mn;
    if insn.has_lock_prefix() || insn.has_rep_prefix() || insn.has_repne_prefix() {
        return Err(Unsupported);
    }
    // Where the interpreter takes over if this instruction needs it.
    let at = (insn.ip(), i);
    let m = insn.mnemonic();
    let size = if insn.op_count() > 0 {
        op_size(insn, 0)
    } else {
        0
    };
    let sized = matches!(size, 1 | 2 | 4 | 8);
    match m {
        Mn::Nop => Ok(false),
        Mn::Mov if sized => {
            let dst = operand(insn, 0, size)?;
            let src = operand(insn, 1, size)?;
            src_to_rax(g, src, size, at)?;
            match dst {
                Opnd::Reg(d) => rax_to_reg(g, d, size)?,
                Opnd::Mem(mem) => {
                    let bail = g.bail(at.0, i);
                    g.address(&mem, true)?;
                    g.probe(size, WRITE, bail)?;
                    g.not_own_code(size, bail)?;
                    g.store(size)?;
                }
                Opnd::Imm(_) => return Err(Unsupported),
            }
            Ok(false)
        }
        Mn::Add | Mn::Sub | Mn::And | Mn::Or | Mn::Xor | Mn::Cmp | Mn::Test if sized => {
            let dst = operand(insn, 0, size)?;
            let src = operand(insn, 1, size)?;
            let writes = !matches!(m, Mn::Cmp | Mn::Test);
            let imm = fetch_src(g, src, size, at.0, i)?;
            let acc = if writes { WRITE } else { READ };
            let place = fetch_dst(g, dst, size, acc, at, imm.is_none())?;
            let a = &mut g.a;
            match m {
                Mn::Add => sized_op!(a, add, size, imm),
                Mn::Sub => sized_op!(a, sub, size, imm),
                Mn::And => sized_op!(a, and, size, imm),
                Mn::Or => sized_op!(a, or, size, imm),
                Mn::Xor => sized_op!(a, xor, size, imm),
                Mn::Cmp => sized_op!(a, cmp, size, imm),
                _ => sized_op!(a, test, size, imm),
            }
            // Results are written before the flags are copied: MOV leaves the host's flags.
            if writes {
                put(g, place, size)?;
            }
            if flags {
                let logic = matches!(m, Mn::And | Mn::Or | Mn::Xor | Mn::Test);
                g.flags(STATUS, if logic { STATUS & !AF } else { STATUS })?;
            }
            Ok(false)
        }
        Mn::Inc | Mn::Dec | Mn::Neg | Mn::Not if sized => {
            let place = fetch_dst(g, operand(insn, 0, size)?, size, WRITE, at, false)?;
            let a = &mut g.a;
            match m {
                Mn::Inc => sized_unary!(a, inc, size),
                Mn::Dec => sized_unary!(a, dec, size),
                Mn::Neg => sized_unary!(a, neg, size),
                _ => sized_unary!(a, not, size),
            }
            put(g, place, size)?;
            if flags && m != Mn::Not {
                // INC and DEC keep CF.
                let bits = if m == Mn::Neg { STATUS } else { STATUS & !CF };
                g.flags(bits, bits)?;
            }
            Ok(false)
        }
        Mn::Shl | Mn::Sal | Mn::Shr | Mn::Sar | Mn::Rol | Mn::Ror if sized => {
            let count = match insn.op_kind(1) {
                OpKind::Immediate8 => {
                    Some(u32::from(insn.immediate8()) & if size == 8 { 63 } else { 31 })
                }
                OpKind::Register if insn.op1_register() == Register::CL => None,
                _ => return Err(Unsupported),
            };
            // The flags are the host's where they are defined the same way; SHL's OF and
            // SHR's OF after more than one position are set as the interpreter does.
            let shifts = matches!(m, Mn::Shl | Mn::Sal | Mn::Shr | Mn::Sar);
            if flags && !(shifts && matches!(size, 4 | 8) && count.is_some()) {
                return Err(Unsupported);
            }
            let place = fetch_dst(g, operand(insn, 0, size)?, size, WRITE, at, false)?;
            let a = &mut g.a;
            if count.is_none() {
                a.mov(ecx, g32(super::state::RCX as u8))?;
            }
            match m {
                Mn::Shl | Mn::Sal => sized_unary!(a, shl, size, count),
                Mn::Shr => sized_unary!(a, shr, size, count),
                Mn::Sar => sized_unary!(a, sar, size, count),
                Mn::Rol => sized_unary!(a, rol, size, count),
                _ => sized_unary!(a, ror, size, count),
            }
            put(g, place, size)?;
            if flags && count != Some(0) {
                let n = count.unwrap_or(0);
                let mut from_host = CF | PF | ZF | SF;
                if m == Mn::Shr && n == 1 {
                    from_host |= OF;
                }
                let a = &mut g.a;
                a.pushfq()?;
                a.pop(rcx)?;
                a.and(ecx, from_host as i32)?;
                if matches!(m, Mn::Shl | Mn::Sal) {
                    // OF = the result's sign bit XOR CF, for every count.
                    a.mov(edx, ecx)?;
                    a.shr(edx, 7)?;
                    a.xor(edx, ecx)?;
                    a.and(edx, 1)?;
                    a.shl(edx, 11)?;
                    a.or(ecx, edx)?;
                }
                a.mov(rdx, qword_ptr(rdi + Layout::RFLAGS as i32))?;
                a.and(rdx, !STATUS as i64 as i32)?;
                a.or(rdx, rcx)?;
                a.mov(qword_ptr(rdi + Layout::RFLAGS as i32), rdx)?;
            }
            Ok(false)
        }
        Mn::Lea if matches!(size, 4 | 8) => {
            let Opnd::Reg(d) = operand(insn, 0, size)? else {
                return Err(Unsupported);
            };
            g.address(&mem_op(insn)?, false)?;
            if size == 4 {
                g.a.mov(esi, esi)?;
            }
            g.a.mov(g64(d), rsi)?;
            Ok(false)
        }
        Mn::Movzx | Mn::Movsx | Mn::Movsxd if matches!(size, 4 | 8) => {
            let from_size = op_size(insn, 1);
            let Opnd::Reg(d) = operand(insn, 0, size)? else {
                return Err(Unsupported);
            };
            src_to_rax(g, operand(insn, 1, from_size)?, from_size, at)?;
            let a = &mut g.a;
            if m != Mn::Movzx {
                match (from_size, size) {
                    (1, 8) => a.movsx(rax, al)?,
                    (1, _) => a.movsx(eax, al)?,
                    (2, 8) => a.movsx(rax, ax)?,
                    (2, _) => a.movsx(eax, ax)?,
                    (4, 8) => a.movsxd(rax, eax)?,
                    _ => return Err(Unsupported),
                }
                if size == 4 {
                    a.mov(eax, eax)?;
                }
            }
            a.mov(g64(d), rax)?;
            Ok(false)
        }
        _ if is_cmov(m) && matches!(size, 4 | 8) => {
            let Opnd::Reg(d) = operand(insn, 0, size)? else {
                return Err(Unsupported);
            };
            // The source is read (and may fault) whether or not the condition holds.
            src_to_rax(g, operand(insn, 1, size)?, size, at)?;
            let mut no = g.a.create_label();
            let mut done = g.a.create_label();
            jcc(g, negate(insn.condition_code()), no)?;
            g.a.mov(g64(d), rax)?;
            g.a.jmp(done)?;
            g.a.set_label(&mut no)?;
            if size == 4 {
                // A 32-bit CMOV clears the upper half even when it does not move.
                g.a.mov(eax, g32(d))?;
                g.a.mov(g64(d), rax)?;
            } else {
                g.a.nop()?;
            }
            g.a.set_label(&mut done)?;
            g.a.nop()?;
            Ok(false)
        }
        _ if is_setcc(m) && size == 1 => {
            let dst = operand(insn, 0, 1)?;
            let mut set = g.a.create_label();
            g.a.mov(r10d, 1)?;
            jcc(g, insn.condition_code(), set)?;
            g.a.mov(r10d, 0)?;
            g.a.set_label(&mut set)?;
            g.a.mov(rax, r10)?;
            match dst {
                Opnd::Reg(d) => rax_to_reg(g, d, 1)?,
                Opnd::Mem(mem) => {
                    let bail = g.bail(at.0, i);
                    g.address(&mem, true)?;
                    g.probe(1, WRITE, bail)?;
                    g.not_own_code(1, bail)?;
                    g.store(1)?;
                }
                Opnd::Imm(_) => return Err(Unsupported),
            }
            Ok(false)
        }
        Mn::Push if insn.op_kind(0) == OpKind::Register => {
            let s = gpr(insn.op0_register(), 8).ok_or(Unsupported)?;
            g.a.mov(rax, g64(s))?;
            push_rax(g, at.0, i)?;
            Ok(false)
        }
        Mn::Pop if insn.op_kind(0) == OpKind::Register => {
            let d = gpr(insn.op0_register(), 8).ok_or(Unsupported)?;
            pop_rax(g, at.0, i)?;
            g.a.mov(g64(d), rax)?;
            Ok(false)
        }
        Mn::Call if insn.op0_kind() == OpKind::NearBranch64 => {
            g.a.mov(rax, insn.next_ip())?;
            push_rax(g, at.0, i)?;
            g.a.mov(rcx, insn.near_branch_target())?;
            g.leave_for(rcx, i + 1)?;
            Ok(true)
        }
        Mn::Ret if insn.code() == iced_x86::Code::Retnq => {
            pop_rax(g, at.0, i)?;
            g.leave_for(rax, i + 1)?;
            Ok(true)
        }
        Mn::Jmp if insn.op0_kind() == OpKind::NearBranch64 => {
            g.a.mov(rcx, insn.near_branch_target())?;
            g.leave_for(rcx, i + 1)?;
            Ok(true)
        }
        // Jcc only (LOOPcc has a condition code too, and a counter).
        _ if insn.is_jcc_short_or_near() && insn.op0_kind() == OpKind::NearBranch64 => {
            let taken = g.exit(insn.near_branch_target(), i + 1, false);
            jcc(g, insn.condition_code(), taken)?;
            Ok(false)
        }
        _ => Err(Unsupported),
    }
}

fn mask(size: usize) -> u64 {
    if size == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size)) - 1
    }
}

/// The condition that holds exactly when `cc` does not.
fn negate(cc: ConditionCode) -> ConditionCode {
    use ConditionCode as C;
    match cc {
        C::o => C::no,
        C::no => C::o,
        C::b => C::ae,
        C::ae => C::b,
        C::e => C::ne,
        C::ne => C::e,
        C::be => C::a,
        C::a => C::be,
        C::s => C::ns,
        C::ns => C::s,
        C::p => C::np,
        C::np => C::p,
        C::l => C::ge,
        C::ge => C::l,
        C::le => C::g,
        C::g => C::le,
        C::None => C::None,
    }
}

/// Pushes RAX; leaves at instruction `i` (RIP `here`) if the stack needs the interpreter.
fn push_rax(g: &mut Gen, here: u64, i: u32) -> Emit {
    let bail = g.bail(here, i);
    g.a.mov(r9, g64(RSP as u8))?;
    g.a.sub(r9, 8)?;
    g.a.mov(rsi, r9)?;
    g.a.mov(r10, rax)?;
    g.probe(8, WRITE, bail)?;
    g.not_own_code(8, bail)?;
    g.a.mov(qword_ptr(rdx), r10)?;
    g.a.mov(g64(RSP as u8), r9)?;
    Ok(())
}

/// Pops into RAX; leaves at instruction `i` (RIP `here`) if the stack needs the interpreter.
fn pop_rax(g: &mut Gen, here: u64, i: u32) -> Emit {
    let bail = g.bail(here, i);
    g.a.mov(rsi, g64(RSP as u8))?;
    g.probe(8, READ, bail)?;
    g.a.mov(rax, qword_ptr(rdx))?;
    g.a.add(g64(RSP as u8), 8)?;
    Ok(())
}

/// Jumps to `taken` if condition `cc` holds on the guest's RFLAGS.
fn jcc(g: &mut Gen, cc: ConditionCode, taken: CodeLabel) -> Emit {
    use ConditionCode as C;
    let a = &mut g.a;
    a.mov(rcx, qword_ptr(rdi + Layout::RFLAGS as i32))?;
    // One bit (or bits) tested: jump if set (`jnz`) or clear.
    let simple = |bits: u64, set: bool| (bits, set);
    let (bits, set) = match cc {
        C::o => simple(OF, true),
        C::no => simple(OF, false),
        C::b => simple(CF, true),
        C::ae => simple(CF, false),
        C::e => simple(ZF, true),
        C::ne => simple(ZF, false),
        C::be => simple(CF | ZF, true),
        C::a => simple(CF | ZF, false),
        C::s => simple(SF, true),
        C::ns => simple(SF, false),
        C::p => simple(PF, true),
        C::np => simple(PF, false),
        C::l | C::ge | C::le | C::g => {
            // SF != OF into bit 7 of EDX (OF is bit 11, SF bit 7).
            a.mov(edx, ecx)?;
            a.shr(edx, 4)?;
            a.xor(edx, ecx)?;
            a.and(edx, SF as i32)?;
            if matches!(cc, C::le | C::g) {
                a.and(ecx, ZF as i32)?;
                a.or(edx, ecx)?;
            }
            a.test(edx, edx)?;
            if matches!(cc, C::l | C::le) {
                a.jne(taken)?;
            } else {
                a.je(taken)?;
            }
            return Ok(());
        }
        C::None => return Err(Unsupported),
    };
    a.test(ecx, bits as i32)?;
    if set {
        a.jne(taken)?;
    } else {
        a.je(taken)?;
    }
    Ok(())
}
