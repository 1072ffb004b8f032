//! The CPU interpreter: fetch, decode (iced-x86), execute, deliver exceptions and interrupts.
//!
//! One [`Cpu`] per vCPU thread. Guest RAM is shared between vCPUs through [`PhysMem`]; the
//! platform (local APIC, I/O APIC, PIT, kvm-clock, CPUID) is reached through [`Machine`];
//! anything else — port I/O and MMIO of the VMM's devices — ends the run with an [`IoReq`]
//! the VMM completes, as a KVM exit would.

mod alu;
mod block;
pub use block::AdoptError;
mod exec;
mod fast;
mod interrupt;
mod mmu;
mod operand;
mod sse;
pub mod state;
mod string;
mod system;
mod translate;

use std::sync::Arc;

use iced_x86::{Decoder, DecoderOptions, Instruction};

pub use mmu::Access;
pub use state::CpuState;

use crate::memory::PhysMem;
use state::flags;

/// Exception vectors.
pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const XM: u8 = 19;
}

/// Why an instruction did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A CPU exception to deliver through the IDT.
    Exception { vector: u8, error_code: Option<u32> },
    /// The instruction needs the VMM to complete a device read; nothing was committed and the
    /// instruction restarts once the VMM has supplied the value.
    NeedIo,
    /// Instruction fetch from an address with no RAM: the emulator (like KVM's) cannot run
    /// code from device memory.
    FetchFromMmio,
}

pub type Exec<T = ()> = Result<T, Fault>;

#[inline]
pub fn gp(code: u32) -> Fault {
    Fault::Exception {
        vector: vector::GP,
        error_code: Some(code),
    }
}

#[inline]
pub fn ud() -> Fault {
    Fault::Exception {
        vector: vector::UD,
        error_code: None,
    }
}

/// A device access the VMM must handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IoReq {
    PioIn { port: u16, size: u8 },
    PioOut { port: u16, size: u8, value: u32 },
    MmioRead { gpa: u64, size: u8 },
    MmioWrite { gpa: u64, size: u8, value: u64 },
}

/// What the platform (everything KVM would do in the kernel) offers the CPU.
pub trait Machine {
    /// Port read of a platform device, or `None` if the VMM must handle it.
    fn pio_read(&mut self, port: u16, size: u8) -> Option<u32>;
    /// Port write to a platform device; false if the VMM must handle it.
    fn pio_write(&mut self, port: u16, size: u8, value: u32) -> bool;
    /// MMIO read of a platform device (LAPIC, I/O APIC), or `None` for the VMM.
    fn mmio_read(&mut self, gpa: u64, size: u8) -> Option<u64>;
    /// MMIO write to a platform device; false if the VMM must handle it.
    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64) -> bool;
    /// Platform MSR read (APIC base, TSC, TSC deadline, kvm-clock); `None` if not one.
    fn rdmsr(&mut self, index: u32) -> Option<u64>;
    /// Platform MSR write; `None` if not one, `Some(false)` to raise #GP.
    fn wrmsr(&mut self, index: u32, value: u64) -> Option<bool>;
    /// The guest's time-stamp counter now.
    fn rdtsc(&mut self) -> u64;
    /// CPUID leaf `leaf`, subleaf `subleaf`: [eax, ebx, ecx, edx].
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// The vector of an interrupt the local APIC wants to deliver now, taken (IRR → ISR).
    fn take_interrupt(&mut self) -> Option<u8>;
    /// Whether an interrupt is pending (checked between blocks).
    fn interrupt_pending(&self) -> bool;
    /// A flag that is set whenever an interrupt may have become pending (and may be set
    /// spuriously): while it is clear the CPU skips `interrupt_pending`. None: always ask.
    fn interrupt_hint(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        None
    }
    /// The guest executed HLT with interrupts enabled: the back end may sleep until an
    /// interrupt is due.
    fn halt(&mut self);
    /// For back ends that need their concrete machine back.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
    /// As [`Machine::as_any_mut`], shared.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// State of a device access in flight.
#[derive(Default)]
pub struct IoState {
    /// The access the VMM must perform before the vCPU continues.
    pub exit: Option<IoReq>,
    /// The VMM's answer to the last read exit, consumed by the restarted instruction.
    pub response: Option<(IoReq, u64)>,
}

/// What a snapshot keeps of a [`Cpu`]: the architectural state and the interpreter's own state
/// between instructions. Caches (TLB, blocks) and statistics other than the instruction count
/// are rebuilt or restarted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuSnapshot {
    pub state: CpuState,
    pub halted: bool,
    pub interrupt_shadow: bool,
    /// Instructions retired (deterministic mode's clock is derived from it).
    pub icount: u64,
    /// The VMM's answer to a device read whose instruction has not run again yet.
    pub io_response: Option<(IoReq, u64)>,
}

/// How a call to [`Cpu::run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// A device access for the VMM (see `Cpu::io`).
    Io(IoReq),
    /// The instruction budget ran out; call again.
    Budget,
    /// Triple fault: the CPU shut down.
    Shutdown,
    /// HLT with interrupts disabled: nothing can wake this CPU but INIT/NMI.
    Dead,
    /// Halted waiting for an interrupt, and the platform's wait ended without one (a kick, a
    /// timeout): call again.
    Halted,
    /// The CPU tried to execute from an address that is not RAM.
    FetchFromMmio,
}

/// [`Cpu::leave`]: the op just run set RIP to where execution goes on (a taken branch, or an
/// instruction of the general interpreter).
const LEFT: u8 = 1;
/// [`Cpu::leave`]: a store of this CPU hit the running block's code.
const WRITTEN: u8 = 2;

/// An emulated x86-64 CPU.
pub struct Cpu {
    blocks: block::BlockCache,
    /// Hot blocks translated to host code, and the arena flushes it has forgotten blocks for.
    jit: translate::Translator,
    jit_flushes: u64,
    /// Host address range of the code of the block running now: a store of this CPU into it
    /// is self-modifying code, after which the block must not run on ([`WRITTEN`]).
    code_lo: usize,
    code_len: usize,
    /// Address of the running block's first instruction: the ops keep RIP-relative operands
    /// and return addresses as distances from it.
    block_rip: u64,
    /// Why the running block must stop after the current op ([`LEFT`], [`WRITTEN`]), or 0.
    leave: u8,
    /// The machine's interrupt hint (`Machine::interrupt_hint`).
    irq_hint: Option<Arc<std::sync::atomic::AtomicBool>>,
    pub s: CpuState,
    /// The platform: interrupt controllers, timers, CPUID.
    pub m: Box<dyn Machine + Send>,
    pub mem: Arc<PhysMem>,
    pub io: IoState,
    tlb: mmu::Tlb,
    /// Instructions retired.
    pub icount: u64,
    /// Blocks entered, and blocks compiled (statistics).
    pub blocks_run: u64,
    pub blocks_compiled: u64,
    /// In the HLT state, waiting for an interrupt.
    pub halted: bool,
    /// Accesses are implicit supervisor accesses (descriptor tables, TSS, interrupt frames).
    supervisor_access: bool,
    /// Whether the handlers' fast path (`tlb_hit`) compares with a TLB entry's user tags
    /// (else its supervisor tags). Kept by `refresh_tlb_mode` where an
    /// instruction or a block starts and around implicit supervisor accesses: the CPL only
    /// changes in instructions that end a block, and an access later in the same instruction
    /// is one the CPU makes at the old CPL (the pops of a far return or IRET) or an implicit
    /// supervisor access. The slow paths (`tlb_lookup`) compute the mode afresh.
    tlb_user: bool,
    /// CR2 of a fetch fault on the second page of an instruction, raised only if needed.
    pending_fetch_cr2: u64,
    /// STI/MOV SS shadow: no interrupt before the next instruction retires.
    interrupt_shadow: bool,
    /// RIP at the start of the current instruction (faults restart here).
    start_rip: u64,
    /// Debug tracing (FERROVISOR_EMU_TRACE): instructions left to print, and whether to print
    /// every exception delivered.
    trace_insns: u64,
    trace_exceptions: bool,
    /// Unimplemented instructions already logged, so each is reported once.
    reported_ud: std::collections::HashSet<iced_x86::Code>,
    /// The dirty-page log epoch the TLB was last dropped for (`PhysMem::dirty_epoch`).
    dirty_epoch: u64,
}

impl Cpu {
    pub fn new(mem: Arc<PhysMem>, m: Box<dyn Machine + Send>) -> Self {
        let blocks = block::BlockCache::new();
        Cpu {
            code_lo: 0,
            code_len: 0,
            block_rip: 0,
            leave: 0,
            irq_hint: m.interrupt_hint(),
            jit: {
                let (base, bytes) = blocks.arena_span();
                translate::Translator::new(base, bytes)
            },
            blocks,
            jit_flushes: 0,
            s: CpuState::default(),
            m,
            mem,
            io: IoState::default(),
            tlb: mmu::Tlb::new(),
            icount: 0,
            blocks_run: 0,
            blocks_compiled: 0,
            halted: false,
            supervisor_access: false,
            tlb_user: false,
            pending_fetch_cr2: 0,
            interrupt_shadow: false,
            start_rip: 0,
            reported_ud: Default::default(),
            dirty_epoch: 0,
            trace_insns: std::env::var("FERROVISOR_EMU_TRACE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            trace_exceptions: std::env::var_os("FERROVISOR_EMU_TRACE").is_some(),
        }
    }

    /// Replaces the whole architectural state (boot, INIT, restore).
    pub fn set_state(&mut self, s: CpuState) {
        self.s = s;
        self.tlb.flush_all();
        self.refresh_tlb_mode();
    }

    /// The state a snapshot keeps (see [`CpuSnapshot`]).
    pub fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            state: self.s.clone(),
            halted: self.halted,
            interrupt_shadow: self.interrupt_shadow,
            icount: self.icount,
            io_response: self.io.response,
        }
    }

    /// Puts back what [`Cpu::snapshot`] returned; no device access is left in flight.
    pub fn restore(&mut self, snap: CpuSnapshot) {
        self.set_state(snap.state);
        self.halted = snap.halted;
        self.interrupt_shadow = snap.interrupt_shadow;
        self.icount = snap.icount;
        self.io = IoState {
            exit: None,
            response: snap.io_response,
        };
    }

    /// Writes this vCPU's compiled blocks (see `block::BlockCache::save`).
    pub fn save_blocks(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        self.blocks.save(out)
    }

    /// Shares blocks another process saved (see `block::BlockCache::adopt`), before this
    /// vCPU first runs.
    pub fn adopt_blocks(&mut self, file: &std::fs::File) -> Result<(), block::AdoptError> {
        let r = self.blocks.adopt(file);
        // The arena moved (or was remapped): what the translator knew of it is gone.
        self.jit.reset(self.blocks.arena_span().0);
        r
    }

    /// Sets how many entries within a window make a block hot enough to translate to host
    /// code (0: interpret every block).
    pub fn set_translate_threshold(&mut self, n: u32) {
        self.jit.set_threshold(n);
    }

    /// Blocks translated to host code (statistics).
    pub fn blocks_translated(&self) -> u64 {
        self.jit.translated
    }

    /// Statistics of the translator: blocks translated, bytes of host code, runs of
    /// translated blocks, and runs that stopped early for the interpreter.
    pub fn translation_stats(&self) -> (u64, usize, u64, u64) {
        (
            self.jit.translated,
            self.jit.code_bytes(),
            self.jit.runs,
            self.jit.bails,
        )
    }

    /// Bytes of compiled blocks held now (statistics).
    pub fn compiled_bytes(&self) -> usize {
        self.blocks.bytes()
    }

    /// How many times the block arena filled and every block was dropped (statistics).
    pub fn block_flushes(&self) -> u64 {
        self.blocks.flushes
    }

    /// Drops every cached translation (after the VMM changed page tables or control registers).
    pub fn flush_tlb(&mut self) {
        self.tlb.flush_all();
    }

    /// Runs up to `budget` instructions, or until a device access needs the VMM, HLT with
    /// interrupts off, or a triple fault.
    pub fn run(&mut self, budget: u64) -> RunExit {
        let epoch = self.mem.dirty_epoch();
        if epoch != self.dirty_epoch {
            // Dirty-page logging started or a record was taken: translations that allow
            // writes without logging them must go.
            self.dirty_epoch = epoch;
            self.tlb.flush_all();
        }
        let end = self.icount + budget;
        while self.icount < end {
            if self.may_take_interrupt() && self.m.interrupt_pending() {
                if let Some(v) = self.m.take_interrupt() {
                    self.halted = false;
                    if self.deliver_external(v).is_err() {
                        return RunExit::Shutdown;
                    }
                }
            }
            if self.halted {
                if self.s.rflags & flags::IF == 0 {
                    return RunExit::Dead;
                }
                self.m.halt();
                if !self.m.interrupt_pending() {
                    return RunExit::Halted;
                }
                continue;
            }
            self.interrupt_shadow = false;
            let flow = if self.trace_insns > 0 {
                self.single_step()
            } else if self.blocks.has_shared() {
                self.run_shared_block(end)
            } else {
                self.run_block::<false>(end)
            };
            if let Flow::Exit(e) = flow {
                return e;
            }
        }
        RunExit::Budget
    }

    /// Runs up to `budget` instructions one at a time through the general interpreter, with
    /// no blocks and no compiled handlers: the reference the compiled forms are tested
    /// against. Interrupts are not taken.
    pub fn run_interpreted(&mut self, budget: u64) -> RunExit {
        let end = self.icount + budget;
        while self.icount < end {
            if self.halted {
                return RunExit::Halted;
            }
            self.interrupt_shadow = false;
            if let Flow::Exit(e) = self.single_step() {
                return e;
            }
        }
        RunExit::Budget
    }

    /// [`run_block`](Self::run_block) while some of the cache's blocks are shared: apart, so
    /// that the usual case's loop stays as it is (its registers are sensitive to any more
    /// code around it).
    #[inline(never)]
    fn run_shared_block(&mut self, end: u64) -> Flow {
        self.run_block::<true>(end)
    }

    /// Runs the block at RIP, compiling it first if the cache does not hold it, stopping early
    /// when the instruction count reaches `end`. `SHARED`: the cache holds blocks another
    /// process compiled (adopted from a snapshot), which run with this process's handlers.
    #[inline(always)]
    fn run_block<const SHARED: bool>(&mut self, end: u64) -> Flow {
        self.refresh_tlb_mode();
        let rip = self.s.rip;
        let bitness = self.s.bitness();
        let lin = self.linear(state::CS, rip);
        let host = match self.tlb_hit(lin, 1, Access::Exec) {
            Some(p) => p,
            None => match self.translate_host(lin, Access::Exec) {
                Ok(p) => p,
                Err(f) => {
                    self.start_rip = rip;
                    return self.retire(Err(f.into()));
                }
            },
        };
        let block = match self.blocks.find::<SHARED>(rip, lin, bitness, host) {
            Some(b) => b,
            None => match self.blocks.compile(rip, lin, bitness, host) {
                Some(b) => {
                    self.blocks_compiled += 1;
                    if self.blocks.flushes != self.jit_flushes {
                        // The arena was emptied: every translation went with its block.
                        self.jit_flushes = self.blocks.flushes;
                        self.jit.reset(self.blocks.arena_span().0);
                    }
                    b
                }
                None => return self.single_step(),
            },
        };
        self.blocks.enter(block);
        // SAFETY: the block lives in the cache's arena, which only `compile` (above, before
        // this point) changes; the instructions it runs do not reach the cache, so the block
        // stays alive and unchanged while its instructions run.
        let block: &block::Block = unsafe { &*block };
        self.blocks_run += 1;
        let ipmask = if bitness == 64 { u64::MAX } else { 0xffff_ffff };
        self.code_lo = host as usize;
        self.code_len = block.len();
        self.block_rip = rip;
        // What to add to an op's handler address: 0 for this process's own blocks; for one
        // another process compiled (shared from a snapshot), the distance between where the
        // handlers are here and where they were there.
        let slide = if SHARED { block.slide() } else { 0 };
        // Most blocks are neither translated nor sampled: one test of the block's mark and
        // one of the count keep them on the usual path.
        if !SHARED && self.jit.worth_a_look(block, self.blocks_run) {
            if let Some(f) = self.native_for(block, bitness, end) {
                return self.run_native(f, block, rip, end);
            }
        }
        let flow = loop {
            self.leave = 0;
            let n = block.ops().len().min((end - self.icount) as usize);
            if n < block.ops().len() {
                // Cut short by the budget: a dropped flag computation might be visible after it.
                let mut exact = [fast::general_handler(); block::MAX_OPS];
                block.exact(n, &mut exact);
                let ops = &block.ops()[..n];
                let end_rip = after(ops, rip, ipmask);
                break self.run_ops::<true>(ops, &exact[..n], rip, end_rip, ipmask, 0);
            }
            let end_rip = rip.wrapping_add(block.len() as u64) & ipmask;
            let flow = self.run_ops::<false>(block.ops(), &[], rip, end_rip, ipmask, slide);
            // A loop whose body is this block goes round again without the lookup and the
            // byte check: nothing this vCPU ran wrote the block's code ([`WRITTEN`]), and
            // code written by another vCPU or a device need not be seen before the next
            // serializing event (Intel SDM vol. 3, 9.1.3, cross-modifying code) — an interrupt,
            // which the run loop checks for, or the end of the budget.
            if !matches!(flow, Flow::Next)
                || self.s.rip != rip
                || self.leave & WRITTEN != 0
                || self.may_take_interrupt()
                || self.io.exit.is_some()
            {
                break flow;
            }
            self.blocks_run += 1;
        };
        self.code_len = 0;
        self.leave = 0;
        flow
    }

    /// [`run_block`](Self::run_block) for a block translated to host code `f` (64-bit code,
    /// entered whole): its code runs, and where it stops for the interpreter, the block's ops
    /// go on from that instruction. The block after it, if translated too, is entered from
    /// here as the run loop would enter it (the same lookup, check of its bytes and budget),
    /// without the rest of the loop: translated code changes neither the CPU mode nor the
    /// address space, and anything that could (an interrupt, a device access, a store into
    /// the block) goes back to the loop.
    #[inline(never)]
    fn run_native(
        &mut self,
        mut f: translate::Native,
        mut block: &block::Block,
        mut rip: u64,
        end: u64,
    ) -> Flow {
        let flow = loop {
            self.leave = 0;
            // SAFETY: code generated for this block and TLB mode (`native_for`), entered as
            // its ops would be: the block's bytes matched, its fields are set, the budget
            // covers it whole.
            let r = unsafe { f(self) };
            let done = r as u32 as usize;
            self.icount += done as u64;
            self.jit.runs += 1;
            let flow = if r & translate::BAIL != 0 {
                self.jit.bails += 1;
                let end_rip = rip.wrapping_add(block.len() as u64);
                let ops = &block.ops()[done..];
                self.run_ops::<false>(ops, &[], self.s.rip, end_rip, u64::MAX, 0)
            } else {
                Flow::Next
            };
            if !matches!(flow, Flow::Next)
                || self.leave & WRITTEN != 0
                || self.may_take_interrupt()
                || self.io.exit.is_some()
            {
                break flow;
            }
            // The next block (this one again, or another), found as `run_block` finds it; in
            // 64-bit code the linear address is RIP.
            let next = self.s.rip;
            let Some(host) = self.tlb_hit(next, 1, Access::Exec) else {
                break flow;
            };
            let Some(b) = self.blocks.find::<false>(next, next, 64, host) else {
                break flow;
            };
            // SAFETY: as in `run_block`: only `compile` changes the arena.
            let b = unsafe { &*b };
            let Some(g) = self.jit.native(b, self.tlb_user) else {
                break flow;
            };
            if ((end - self.icount) as usize) < b.ops().len() {
                break flow;
            }
            self.blocks.enter(b);
            self.blocks_run += 1;
            self.code_lo = host as usize;
            self.code_len = b.len();
            self.block_rip = next;
            (block, f, rip) = (b, g, next);
        };
        self.code_len = 0;
        self.leave = 0;
        flow
    }

    /// The host code to run for `block` (64-bit code about to run whole within the budget
    /// that ends at `end`), translating it first if it just became hot.
    #[inline(never)]
    fn native_for(
        &mut self,
        block: &block::Block,
        bitness: u32,
        end: u64,
    ) -> Option<translate::Native> {
        if bitness != 64 || block.ops().len() as u64 > end - self.icount {
            return None;
        }
        match self.jit.enter(block, self.tlb_user, self.blocks_run) {
            translate::Entry::Run(f) => Some(f),
            translate::Entry::Translate => self.jit.translate(block, self.tlb_user),
            translate::Entry::Interpret => None,
        }
    }

    /// Whether the run loop must look for a pending interrupt before the next block: the
    /// cheap half of its check (interrupts enabled, no shadow, and the machine's hint set).
    #[inline(always)]
    fn may_take_interrupt(&self) -> bool {
        self.s.rflags & flags::IF != 0
            && !self.interrupt_shadow
            && self
                .irq_hint
                .as_ref()
                .is_none_or(|h| h.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Records a store of `size` bytes at host address `p`: if it overwrites the running
    /// block's code, the block stops after this instruction (the next one is compiled from
    /// the new bytes, as a CPU fetches them).
    #[inline(always)]
    pub(crate) fn note_store(&mut self, p: *const u8, size: usize) {
        let a = p as usize;
        if a < self.code_lo + self.code_len && a + size > self.code_lo {
            self.leave |= WRITTEN;
        }
    }

    /// Runs compiled instructions in order, the first at `rip`, until one leaves the
    /// sequence; RIP is then where execution goes on (`end_rip` after the last op). `EXACT`
    /// runs each with all its flags (`exact[i]` for `ops[i]`). `slide` is the block's
    /// [`slide`](block::Block::slide).
    ///
    /// RIP is not kept op by op: the ops need it only where they branch (and set it) or read
    /// it (a RIP-relative operand, a return address: distances from `Cpu::block_rip`; the
    /// general interpreter's instruction knows its address). A handler that changes the
    /// flow, and a store into the block's code, say so in [`Cpu::leave`]; on the way out of
    /// a failed instruction its address is counted from the lengths of the ops before it.
    #[inline(always)]
    fn run_ops<const EXACT: bool>(
        &mut self,
        ops: &[fast::Op],
        exact: &[fast::Handler],
        rip: u64,
        end_rip: u64,
        ipmask: u64,
        slide: usize,
    ) -> Flow {
        // The loop steps a pointer and nothing else: the index of an op (and the count of
        // retired instructions, which nothing the handlers do reads) is its distance from the
        // start, worked out on the way out.
        let range = ops.as_ptr_range();
        let mut at = range.start;
        let index =
            |at: *const fast::Op| (at as usize - range.start as usize) / size_of::<fast::Op>();
        let flow = loop {
            if at == range.end {
                self.s.rip = end_rip;
                break Flow::Next;
            }
            // SAFETY: `at` is in `ops` (it stops at the end, checked above).
            let op = unsafe { &*at };
            let run = if EXACT {
                exact[index(at)]
            } else {
                // SAFETY: `slide` is the block's (`run_block`).
                unsafe { op.handler(slide) }
            };
            if let Err(e) = run(self, op) {
                // SAFETY: `at` is in `ops`.
                let ops = unsafe { ops_until(range.start, at.add(1)) };
                return self.op_failed(ops, rip, ipmask, run, *e);
            }
            // SAFETY: one past `at`, at most the end of `ops`.
            at = unsafe { at.add(1) };
            if self.leave != 0 {
                if self.leave & LEFT == 0 {
                    // A store into the block's own code: on after this instruction.
                    // SAFETY: `at` is in `ops` or just past it.
                    self.s.rip = after(unsafe { ops_until(range.start, at) }, rip, ipmask);
                }
                break Flow::Next;
            }
        };
        self.icount += index(at) as u64;
        flow
    }

    /// On the way out of a block whose op `ops.last()` failed with `e`, run by `run`.
    #[cold]
    #[inline(never)]
    fn op_failed(
        &mut self,
        ops: &[fast::Op],
        rip: u64,
        ipmask: u64,
        run: fast::Handler,
        e: StepEnd,
    ) -> Flow {
        let i = ops.len() - 1;
        // The general interpreter sets RIP and `start_rip` itself (`fast::general`); the
        // other handlers fail before they change RIP.
        if run as usize != fast::general_address() {
            self.start_rip = after(&ops[..i], rip, ipmask);
            self.s.rip = after(ops, rip, ipmask);
        }
        self.icount += i as u64;
        self.retire_slow(e)
    }

    /// Fetches, decodes and runs one instruction on its own (tracing, or an instruction that
    /// crosses a page boundary).
    fn single_step(&mut self) -> Flow {
        let mut insn = Instruction::default();
        let r = self.step(&mut insn);
        self.retire(r)
    }

    /// Accounts for how an instruction ended.
    #[inline(always)]
    fn retire(&mut self, r: Result<(), StepEnd>) -> Flow {
        match r {
            Ok(()) => {
                self.icount += 1;
                if let Some(req) = self.io.exit {
                    return Flow::Exit(RunExit::Io(req));
                }
                Flow::Next
            }
            Err(e) => self.retire_slow(e),
        }
    }

    #[cold]
    fn retire_slow(&mut self, e: StepEnd) -> Flow {
        match e {
            StepEnd::Posted => {
                self.icount += 1;
                let req = self.io.exit.expect("Posted always records the request");
                Flow::Exit(RunExit::Io(req))
            }
            StepEnd::Halt => {
                self.icount += 1;
                self.halted = true;
                Flow::Stop
            }
            StepEnd::Fault(Fault::FetchFromMmio) => {
                self.s.rip = self.start_rip;
                Flow::Exit(RunExit::FetchFromMmio)
            }
            StepEnd::Fault(Fault::NeedIo) => {
                // Nothing was committed: the instruction runs again with the VMM's answer.
                self.s.rip = self.start_rip;
                let req = self.io.exit.expect("NeedIo always records the request");
                Flow::Exit(RunExit::Io(req))
            }
            StepEnd::Fault(Fault::Exception { vector, error_code }) => {
                self.s.rip = self.start_rip;
                if self.trace_exceptions {
                    eprintln!(
                        "emu: exception {vector} code {error_code:?} at {:#x} cr2={:#x} icount={}",
                        self.start_rip, self.s.cr2, self.icount
                    );
                }
                if self.deliver_exception(vector, error_code).is_err() {
                    return Flow::Exit(RunExit::Shutdown);
                }
                Flow::Stop
            }
        }
    }

    /// Fetches, decodes and executes one instruction.
    fn step(&mut self, insn: &mut Instruction) -> Result<(), StepEnd> {
        self.refresh_tlb_mode();
        self.start_rip = self.s.rip;
        let bitness = self.s.bitness();
        let rip = self.s.rip;
        let mut bytes = [0u8; 15];
        let (n, tail_fault) = self.fetch(&mut bytes).map_err(StepEnd::Fault)?;
        let mut decoder = Decoder::with_ip(bitness, &bytes[..n], rip, DecoderOptions::NONE);
        decoder.decode_out(insn);
        if insn.is_invalid() {
            if let Some(f) = tail_fault {
                // The instruction continues on a page that cannot be fetched.
                self.s.cr2 = self.pending_fetch_cr2;
                return Err(StepEnd::Fault(f));
            }
            return Err(StepEnd::Fault(ud()));
        }
        self.finish_step(insn, bitness)
    }

    /// Advances RIP past `insn` and executes it.
    #[inline(always)]
    fn finish_step(&mut self, insn: &Instruction, bitness: u32) -> Result<(), StepEnd> {
        if self.trace_insns > 0 {
            self.trace_insns -= 1;
            let mut out = String::new();
            let mut f = iced_x86::FastFormatter::new();
            f.format(insn, &mut out);
            eprintln!("emu: {:#018x} {out}", insn.ip());
        }
        let next = insn.next_ip();
        self.s.rip = if bitness == 64 {
            next
        } else {
            next & 0xffff_ffff
        };
        exec::execute(self, insn)
    }

    /// Reads the instruction bytes at CS:RIP: up to 15, or fewer when the next page cannot be
    /// read, together with the fault reading it raised (delivered only if the instruction
    /// turns out to need those bytes).
    fn fetch(&mut self, out: &mut [u8; 15]) -> Exec<(usize, Option<Fault>)> {
        let lin = self.linear(state::CS, self.s.rip);
        let first = (0x1000 - (lin & 0xfff)).min(15) as usize;
        let p = self.translate_host(lin, Access::Exec)?;
        // SAFETY: translate_host returned a pointer to a mapped RAM page; `first` bytes stay
        // inside it.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), first) };
        if first == 15 {
            return Ok((15, None));
        }
        let cr2 = self.s.cr2;
        match self.translate_host(lin.wrapping_add(first as u64), Access::Exec) {
            Ok(p2) => {
                // SAFETY: as above, for the start of the next page.
                unsafe {
                    std::ptr::copy_nonoverlapping(p2, out.as_mut_ptr().add(first), 15 - first)
                };
                Ok((15, None))
            }
            Err(f) => {
                // The instruction may end before the next page: decode what we have first.
                let fault_cr2 = self.s.cr2;
                self.s.cr2 = cr2;
                self.pending_fetch_cr2 = fault_cr2;
                Ok((first, Some(f)))
            }
        }
    }

    /// Logs an instruction the emulator does not implement (once per form) and raises #UD, as a
    /// CPU without the feature would.
    fn unimplemented(&mut self, insn: &Instruction) -> Fault {
        if self.reported_ud.insert(insn.code()) {
            let mut bytes = [0u8; 15];
            let lin = self.linear(state::CS, self.start_rip);
            let n = insn.len().min(15);
            for (i, b) in bytes.iter_mut().enumerate().take(n) {
                *b = self.read_lin(lin + i as u64, 1, Access::Exec).unwrap_or(0) as u8;
            }
            tracing::warn!(
                "emu: unimplemented instruction {:?} at {:#x} (bytes {:02x?}): raising #UD",
                insn.code(),
                self.start_rip,
                &bytes[..n]
            );
        }
        ud()
    }
}

/// What the run loop does after an instruction.
enum Flow {
    /// Go on with the next instruction of the block.
    Next,
    /// Leave the block (HLT, an exception delivered): back to the interrupt check.
    Stop,
    /// Return from `run`.
    Exit(RunExit),
}

/// How a step ended other than by retiring normally.
pub(crate) enum StepEnd {
    Fault(Fault),
    Halt,
    /// The instruction completed and left a device write (`Cpu::io.exit`) for the VMM.
    Posted,
}

impl From<Fault> for StepEnd {
    fn from(f: Fault) -> Self {
        StepEnd::Fault(f)
    }
}

impl From<Fault> for Box<StepEnd> {
    fn from(f: Fault) -> Self {
        Box::new(StepEnd::Fault(f))
    }
}

/// The ops from `start` up to `end` (not included), for the op loop's way out: apart from
/// the loop, so that it keeps no index of its own (`Cpu::run_ops`).
///
/// # Safety
/// `start` and `end` point into (or just past) the same slice of ops, `start` not after `end`.
#[cold]
#[inline(never)]
unsafe fn ops_until<'a>(start: *const fast::Op, end: *const fast::Op) -> &'a [fast::Op] {
    // SAFETY: as the caller promises.
    unsafe { std::slice::from_raw_parts(start, end.offset_from(start) as usize) }
}

/// The address after the instructions `ops` compiled, the first at `rip`. Apart from the op
/// loop, which must not keep the counters it needs.
#[cold]
#[inline(never)]
fn after(ops: &[fast::Op], rip: u64, ipmask: u64) -> u64 {
    let len: u64 = ops.iter().map(|op| u64::from(op.len)).sum();
    rip.wrapping_add(len) & ipmask
}
