//! Basic blocks: straight runs of compiled instructions ([`Op`]s), cached by the address they
//! start at and checked against guest memory on every entry.
//!
//! A block ends at the first instruction that can change the flow of control (a conditional
//! branch is a side exit and does not end it), the CPU mode,
//! the address space or interrupt delivery, at the end of the page, or after [`MAX_OPS`]
//! instructions. Interrupts are taken between blocks. A block is used only if the bytes it was
//! compiled from are still in memory, compared on entry, so code written by this vCPU, another
//! vCPU or the VMM (DMA) never runs stale, with no invalidation protocol to get wrong. (A block
//! that loops to its own start runs again without the check until the next interrupt check,
//! unless this vCPU wrote its bytes: see `Cpu::run_block`.)

use std::cell::Cell;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, RflagsBits};

use super::fast::{self, Handler, Op};

/// Instructions per block at most: bounds interrupt latency and the cost of a rebuild.
const MAX_OPS: usize = 64;
/// Bytes decoded for a block at most.
const MAX_BYTES: usize = 256;
/// Cache slots (a power of two); direct-mapped by address.
const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_BITS: u32 = 18;

/// Code bytes a block keeps in its header; a longer block keeps the rest with its cold parts
/// (two more dependent loads on every entry). Nearly all blocks are shorter: kernel I/O paths
/// average ~42 bytes.
const HEAD_BYTES: usize = 120;

/// A compiled block. Small on purpose: what runs on every entry (this header and the ops) is
/// what has to stay in the host's caches while a guest runs thousands of different blocks.
/// Three cache lines: the first holds what is checked and followed on entry, the others the
/// code bytes it is compared against.
#[repr(C, align(64))]
pub(crate) struct Block {
    /// RIP and linear address of the first instruction, and the code size it was decoded at.
    pub rip: u64,
    pub lin: u64,
    /// Where control went after this block the last time it ran (see [`BlockCache::enter`]).
    next: Cell<Next>,
    pub bitness: u32,
    /// How many bytes the block was compiled from (all inside one page; at most
    /// [`MAX_BYTES`]); the first of them are in `head`, so that the check on entry touches
    /// one allocation for most blocks.
    len: u32,
    pub ops: Box<[Op]>,
    head: [u8; HEAD_BYTES],
    cold: Box<Cold>,
}

const _: () = assert!(std::mem::size_of::<Block>() == 192);

/// The block that followed another, as addresses to prefetch: never dereferenced, so it may
/// name a block that is gone.
#[derive(Clone, Copy, Default)]
struct Next {
    slot: usize,
    header: usize,
    ops: usize,
}

/// The parts of a block that only rare paths read.
struct Cold {
    /// Code bytes past [`HEAD_BYTES`].
    tail: Box<[u8]>,
    /// For each op, the handler that computes every flag (used when the budget cuts the
    /// block short).
    exact: Box<[Handler]>,
    /// The decoded instructions the general interpreter's ops point to.
    _general: Box<[Box<Instruction>]>,
}

impl Block {
    /// Bytes of code the block was compiled from.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// For each op, the handler that computes every flag it writes.
    pub fn exact(&self) -> &[Handler] {
        &self.cold.exact
    }

    /// Whether the code at `host` (the host address of `lin`) is still what was compiled.
    #[inline(always)]
    pub fn matches(&self, rip: u64, lin: u64, bitness: u32, host: *const u8) -> bool {
        if self.rip != rip || self.lin != lin || self.bitness != bitness {
            return false;
        }
        let n = self.len();
        // SAFETY: `host` is the mapped RAM page holding `lin`; the block's bytes were read
        // from the same offset and do not cross the page, so `host .. host + n` is inside it.
        unsafe {
            if n <= HEAD_BYTES {
                return same(host, &self.head[..n]);
            }
            same(host, &self.head) && same(host.add(HEAD_BYTES), &self.cold.tail)
        }
    }

    /// Decodes and compiles the block starting at `rip` (linear `lin`, host address `host`).
    /// None if not even one instruction fits in the page (it crosses into the next one) or
    /// the first is invalid: the caller then steps it alone.
    pub fn compile(rip: u64, lin: u64, bitness: u32, host: *const u8) -> Option<Block> {
        let avail = (0x1000 - (lin & 0xfff) as usize).min(MAX_BYTES);
        // SAFETY: `host` is the host address of `lin` in a mapped RAM page; `avail` bytes
        // stay inside that page.
        let code = unsafe { std::slice::from_raw_parts(host, avail) }.to_vec();
        let mut decoder = Decoder::with_ip(bitness, &code, rip, DecoderOptions::NONE);
        let mut insns = Vec::with_capacity(MAX_OPS);
        let mut used = 0;
        let mut insn = Instruction::default();
        while insns.len() < MAX_OPS && decoder.can_decode() {
            decoder.decode_out(&mut insn);
            if insn.is_invalid() {
                break;
            }
            used += insn.len();
            insns.push(insn);
            if ends_block(&insn) {
                break;
            }
        }
        if insns.is_empty() {
            return None;
        }
        let needed = flags_needed(&insns);
        let mut ops = Vec::with_capacity(insns.len());
        let mut exact = Vec::with_capacity(insns.len());
        let mut general = Vec::new();
        for (insn, flags) in insns.iter().zip(needed) {
            let c = fast::compile(insn, bitness, flags);
            ops.push(c.op);
            exact.push(c.exact);
            general.extend(c.insn);
        }
        let mut head = [0; HEAD_BYTES];
        let in_head = used.min(HEAD_BYTES);
        head[..in_head].copy_from_slice(&code[..in_head]);
        Some(Block {
            rip,
            lin,
            bitness,
            len: used as u32,
            head,
            ops: ops.into_boxed_slice(),
            cold: Box::new(Cold {
                tail: code[in_head..used].into(),
                exact: exact.into_boxed_slice(),
                _general: general.into_boxed_slice(),
            }),
            next: Cell::new(Next::default()),
        })
    }
}

/// Asks the host CPU to bring the cache line at `addr` in. A hint: it never faults, whatever
/// `addr` is.
#[inline(always)]
#[allow(unused_unsafe)] // `_mm_prefetch` is an unsafe fn before Rust 1.87 and safe after.
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 reads nothing architecturally and never faults, for any address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Whether the `old.len()` bytes at `host` equal `old`.
///
/// # Safety
/// `host .. host + old.len()` must be readable.
#[inline(always)]
unsafe fn same(host: *const u8, old: &[u8]) -> bool {
    let n = old.len();
    let old = old.as_ptr();
    // SAFETY: every read below is inside `host .. host + n` and `old .. old + n` (words at
    // 0, 8, … and one ending at the last byte), which the caller guarantees and the slice is.
    unsafe {
        let word = |p: *const u8, at: usize| std::ptr::read_unaligned(p.add(at) as *const u64);
        if n < 8 {
            return (0..n).all(|k| *host.add(k) == *old.add(k));
        }
        let mut at = 0;
        while at + 8 < n {
            if word(host, at) != word(old, at) {
                return false;
            }
            at += 8;
        }
        word(host, n - 8) == word(old, n - 8)
    }
}

/// The block cache of one vCPU.
pub(crate) struct BlockCache {
    slots: Box<[Option<Box<Block>>]>,
    /// The slot and address of the block entered last (see [`BlockCache::enter`]).
    last: Option<(usize, usize)>,
}

impl BlockCache {
    pub fn new() -> Self {
        BlockCache {
            slots: (0..SLOTS).map(|_| None).collect(),
            last: None,
        }
    }

    /// Notes that the block at `block` (in `slot`; `fresh` if just `put` there) is being
    /// entered, and prefetches what followed it last time: its cache slot, header and ops.
    ///
    /// The kernel's I/O path runs thousands of different blocks, too many for the host's
    /// caches, so each block entry used to wait on three dependent loads (slot, header,
    /// ops). Most blocks have one usual successor; loading it while this block runs hides
    /// most of that wait.
    #[inline(always)]
    pub fn enter(&mut self, slot: usize, block: *const Block, fresh: bool) {
        // SAFETY: `block` is in the cache (the caller just got or put it).
        let b = unsafe { &*block };
        if let Some((last_slot, last)) = self.last {
            // The previous block is still in the cache unless this one, just compiled,
            // replaced it: only `put` drops blocks.
            if !(fresh && last_slot == slot) {
                // SAFETY: as just said, `last` is a live block of this cache.
                let last = unsafe { &*(last as *const Block) };
                last.next.set(Next {
                    slot,
                    header: block as usize,
                    ops: b.ops.as_ptr() as usize,
                });
            }
        }
        self.last = Some((slot, block as usize));
        let next = b.next.get();
        if next.header != 0 {
            prefetch(self.slots.as_ptr().wrapping_add(next.slot) as usize);
            prefetch(next.header);
            prefetch(next.header + 64);
            prefetch(next.header + 128);
            prefetch(next.ops);
        }
    }

    #[inline(always)]
    pub fn slot(lin: u64) -> usize {
        (lin.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOT_BITS)) as usize
    }

    /// The block in `slot`, as a pointer: the caller runs it while the CPU (which owns the
    /// cache) is borrowed mutably, and must not keep it past the next `put`.
    #[inline(always)]
    pub fn get(&self, slot: usize) -> Option<*const Block> {
        self.slots[slot].as_deref().map(|b| b as *const Block)
    }

    /// Stores `b` in `slot`, dropping the block there; returns a pointer to it as `get` does.
    #[inline(always)]
    pub fn put(&mut self, slot: usize, b: Box<Block>) -> *const Block {
        let p: *const Block = &*b;
        self.slots[slot] = Some(b);
        p
    }
}

/// The status flags.
const STATUS: u32 = RflagsBits::OF
    | RflagsBits::SF
    | RflagsBits::ZF
    | RflagsBits::AF
    | RflagsBits::CF
    | RflagsBits::PF;

/// For each instruction of a block, whether the status flags it writes can be observed: read
/// by a later instruction of the block before another overwrites them, or seen at the end of
/// the block, at a conditional side exit, or in the frame of an exception a later instruction
/// raises before they are overwritten. Where they cannot, the instruction is compiled without
/// computing them (`fast::compile`), the way a translator drops dead flag computations; the
/// architectural state at every point anything can see it is unchanged.
fn flags_needed(insns: &[Instruction]) -> Vec<bool> {
    let mut live = STATUS;
    let mut needed = vec![true; insns.len()];
    for (i, insn) in insns.iter().enumerate().rev() {
        needed[i] = insn.rflags_modified() & live != 0;
        if fast::cannot_fault(insn) {
            live = (live & !flags_always_written(insn)) | insn.rflags_read();
        } else {
            // A fault here shows the flags as they are before this instruction; a branch
            // leaves with all of them.
            live = STATUS;
        }
    }
    needed
}

/// The status flags `insn` writes whatever its operands' values. A shift or rotate by 0
/// leaves the flags alone, so one by CL writes none for sure, and one by an immediate only if
/// the masked count is not 0.
fn flags_always_written(insn: &Instruction) -> u32 {
    use Mnemonic as M;
    let shift = matches!(
        insn.mnemonic(),
        M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar | M::Shld | M::Shrd
    );
    if shift {
        let last = insn.op_count() - 1;
        if insn.op_kind(last) != OpKind::Immediate8 {
            return 0;
        }
        let bits = if insn.op0_register().size() == 8 || insn.memory_size().size() == 8 {
            0x3f
        } else {
            0x1f
        };
        if insn.immediate8() & bits == 0 {
            return 0;
        }
    }
    insn.rflags_modified() & STATUS
}

/// Whether nothing may follow `insn` in a block: it may branch, change the CPU mode, the
/// address space, or when interrupts are taken, or it needs the VMM.
fn ends_block(insn: &Instruction) -> bool {
    use Mnemonic as M;
    // A conditional branch does not end the block: when taken, the run loop leaves the block
    // there (RIP is not the next instruction's); when not, the block goes on.
    if !matches!(
        insn.flow_control(),
        FlowControl::Next | FlowControl::ConditionalBranch
    ) {
        return true;
    }
    let special_reg = |n: u32| {
        insn.op_kind(n) == OpKind::Register && {
            let r = insn.op_register(n);
            r.is_cr() || r.is_dr() || r.is_segment_register()
        }
    };
    if matches!(insn.mnemonic(), M::Mov | M::Pop) && (special_reg(0) || special_reg(1)) {
        return true;
    }
    matches!(
        insn.mnemonic(),
        M::Hlt
            | M::Cli
            | M::Sti
            | M::Popf
            | M::Popfd
            | M::Popfq
            | M::Lgdt
            | M::Lidt
            | M::Lldt
            | M::Ltr
            | M::Lmsw
            | M::Clts
            | M::Invlpg
            | M::Invpcid
            | M::Wrmsr
            | M::Xsetbv
            | M::Cpuid
            | M::In
            | M::Out
            | M::Insb
            | M::Insw
            | M::Insd
            | M::Outsb
            | M::Outsw
            | M::Outsd
            | M::Lss
            | M::Lfs
            | M::Lgs
            | M::Lds
            | M::Les
            | M::Swapgs
            | M::Wbinvd
            | M::Invd
            | M::Monitor
            | M::Mwait
            | M::Pause
    )
}
