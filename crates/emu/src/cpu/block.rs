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
//!
//! Blocks live in one region per vCPU ([`Arena`]), each in one piece — header, code bytes,
//! ops — laid out in the order they were first run, and each remembers the blocks that
//! followed it ([`Block::chain`]). The kernel's I/O path runs thousands of different blocks,
//! more than the host's caches hold: entering the next block through the chain, from memory
//! the host's prefetchers already stream in, skips the cache lookup and its dependent miss.

use std::cell::Cell;
use std::ptr::NonNull;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, RflagsBits};

use super::fast::{self, Handler, Op};

/// Instructions per block at most: bounds interrupt latency and the cost of a rebuild.
pub(crate) const MAX_OPS: usize = 64;
/// Bytes decoded for a block at most.
const MAX_BYTES: usize = 256;
/// Cache slots (a power of two); direct-mapped by address. Each slot is 4 bytes (see
/// [`BlockCache::slots`]), so the table takes 1 MiB; a clone restored from a snapshot touches
/// most of its pages within its first second, so its size is part of every clone's footprint.
const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_BITS: u32 = 18;

/// Bytes of address space each vCPU reserves for its blocks. Only what is filled takes host
/// memory; when it is full, every block is dropped and the guest's code compiles again (as
/// QEMU does when its translation buffer fills). Booting the Debian kernel to a shell compiles
/// ~40 MiB of blocks.
const ARENA_BYTES: usize = 64 << 20;

/// A compiled block's header. The block is one piece of its vCPU's [`Arena`]:
///
/// ```text
/// header (48 bytes) | code bytes (len) | pad to 32 | ops (32 bytes each) |
///                   | decoded instructions of the ops that take the general path
/// ```
///
/// so that what runs on every entry — this header, the code it is compared against and the
/// ops — is a few consecutive cache lines.
#[repr(C)]
pub(crate) struct Block {
    /// RIP and linear address of the first instruction, and the code size it was decoded at.
    pub rip: u64,
    pub lin: u64,
    /// The blocks that followed this one last (most recent first), or null: entered from here
    /// without the cache lookup when they match (see [`BlockCache::find`]).
    chain: [Cell<*const Block>; 2],
    pub bitness: u32,
    /// How many bytes the block was compiled from (all inside one page; at most
    /// [`MAX_BYTES`]).
    len: u16,
    n_ops: u16,
    /// Offset from the header of the ops.
    ops_at: u32,
}

const HEADER: usize = std::mem::size_of::<Block>();
const _: () = assert!(HEADER == 48);
/// Alignment of a block in the arena: a cache line.
const BLOCK_ALIGN: usize = 64;

fn align_up(n: usize, to: usize) -> usize {
    (n + to - 1) & !(to - 1)
}

impl Block {
    /// Bytes of code the block was compiled from.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    fn base(&self) -> *const u8 {
        self as *const Block as *const u8
    }

    /// The code bytes the block was compiled from.
    #[inline(always)]
    fn code(&self) -> &[u8] {
        // SAFETY: `compile` wrote `len` code bytes right after the header, inside the
        // block's piece of the arena, which lives as long as the block.
        unsafe { std::slice::from_raw_parts(self.base().add(HEADER), self.len()) }
    }

    /// The compiled instructions, in order.
    #[inline(always)]
    pub fn ops(&self) -> &[Op] {
        // SAFETY: `compile` wrote `n_ops` ops at `ops_at` (aligned for `Op`) in the block's
        // piece of the arena.
        unsafe {
            std::slice::from_raw_parts(
                self.base().add(self.ops_at as usize) as *const Op,
                usize::from(self.n_ops),
            )
        }
    }

    /// For the first `n` ops, the handler that computes every flag the op writes, chosen
    /// again from the instructions decoded from the block's bytes ([`fast::exact_handler`]).
    /// Needed only when the block is cut short (the instruction budget ends inside it, about
    /// once per budget), so it is not kept: 8 bytes less per op in every block.
    pub fn exact(&self, n: usize, out: &mut [Handler; MAX_OPS]) {
        let mut decoder =
            Decoder::with_ip(self.bitness, self.code(), self.rip, DecoderOptions::NONE);
        let mut insn = Instruction::default();
        for (slot, op) in out.iter_mut().zip(&self.ops()[..n]) {
            decoder.decode_out(&mut insn);
            *slot = if fast::is_general(op) {
                op.run
            } else {
                fast::exact_handler(&insn, self.bitness)
            };
        }
    }

    /// Whether the code at `host` (the host address of `lin`) is still what was compiled.
    #[inline(always)]
    pub fn matches(&self, rip: u64, lin: u64, bitness: u32, host: *const u8) -> bool {
        if self.rip != rip || self.lin != lin || self.bitness != bitness {
            return false;
        }
        // SAFETY: `host` is the mapped RAM page holding `lin`; the block's bytes were read
        // from the same offset and do not cross the page, so `host .. host + len` is inside it.
        unsafe { same(host, self.code()) }
    }

    /// Decodes and compiles the block starting at `rip` (linear `lin`, host address `host`)
    /// into `arena`. None if not even one instruction fits in the page (it crosses into the
    /// next one) or the first is invalid: the caller then steps it alone; or if the arena is
    /// full (`Err`): the caller empties it and asks again.
    fn compile(
        arena: &mut Arena,
        rip: u64,
        lin: u64,
        bitness: u32,
        host: *const u8,
    ) -> Result<Option<NonNull<Block>>, Full> {
        let avail = (0x1000 - (lin & 0xfff) as usize).min(MAX_BYTES);
        // SAFETY: `host` is the host address of `lin` in a mapped RAM page; `avail` bytes
        // stay inside that page.
        let code = unsafe { std::slice::from_raw_parts(host, avail) };
        let mut decoder = Decoder::with_ip(bitness, code, rip, DecoderOptions::NONE);
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
            return Ok(None);
        }
        let needed = flags_needed(&insns);
        let compiled: Vec<_> = insns
            .iter()
            .zip(needed)
            .map(|(insn, flags)| fast::compile(insn, bitness, flags))
            .collect();
        let n = compiled.len();
        let generals = compiled.iter().filter(|c| c.general).count();
        let ops_at = align_up(HEADER + used, 32);
        let insns_at = align_up(
            ops_at + n * std::mem::size_of::<Op>(),
            std::mem::align_of::<Instruction>(),
        );
        let size = insns_at + generals * std::mem::size_of::<Instruction>();
        let base = arena.alloc(size).ok_or(Full)?;
        // SAFETY: `base .. base + size` is a fresh piece of the arena, aligned to
        // `BLOCK_ALIGN`, which every offset above respects for what is written there
        // (header, bytes, `Op`s at a multiple of 32, instructions at their own alignment);
        // nothing else refers to it yet. The code bytes are copied from the
        // guest page (`used <= avail`).
        unsafe {
            let base = base.as_ptr();
            std::ptr::copy_nonoverlapping(code.as_ptr(), base.add(HEADER), used);
            let ops = base.add(ops_at) as *mut Op;
            let mut general = base.add(insns_at) as *mut Instruction;
            for (i, (c, insn)) in compiled.iter().zip(&insns).enumerate() {
                let mut op = c.op;
                if c.general {
                    general.write(*insn);
                    op.point_at(general);
                    general = general.add(1);
                }
                ops.add(i).write(op);
            }
            let block = base as *mut Block;
            block.write(Block {
                rip,
                lin,
                chain: Default::default(),
                bitness,
                len: used as u16,
                n_ops: n as u16,
                ops_at: ops_at as u32,
            });
            Ok(Some(NonNull::new_unchecked(block)))
        }
    }
}

/// The arena is full.
struct Full;

/// Where the first block goes: one alignment unit in, so that no block's slot is 0 (empty).
const FIRST_BLOCK: usize = BLOCK_ALIGN;

/// One vCPU's blocks: a region of address space filled from the start, emptied all at once
/// when full. Only filled pages take host memory.
struct Arena {
    base: NonNull<u8>,
    used: usize,
    /// Bytes reserved ([`ARENA_BYTES`] but in tests).
    cap: usize,
}

impl Arena {
    fn new(cap: usize) -> Arena {
        let base = crate::memory::map_anonymous(cap).unwrap_or_else(|| {
            panic!(
                "emu: cannot reserve {cap} bytes for compiled code: {}",
                std::io::Error::last_os_error()
            )
        });
        assert!(
            cap / BLOCK_ALIGN <= u32::MAX as usize,
            "arena too large for 32-bit slots"
        );
        Arena {
            base,
            used: FIRST_BLOCK,
            cap,
        }
    }

    /// The table's name for `block`: its offset in [`BLOCK_ALIGN`] units, never 0.
    fn slot_of(&self, block: *const Block) -> u32 {
        ((block as usize - self.base.as_ptr() as usize) / BLOCK_ALIGN) as u32
    }

    /// The block a table slot names (see [`slot_of`](Self::slot_of)), or null for 0.
    #[inline(always)]
    fn block_at(&self, slot: u32) -> *const Block {
        if slot == 0 {
            return std::ptr::null();
        }
        // SAFETY: a nonzero slot was made by `slot_of` from a block of this arena, so the
        // offset is inside the mapping.
        unsafe { self.base.as_ptr().add(slot as usize * BLOCK_ALIGN) as *const Block }
    }

    /// `size` bytes aligned to [`BLOCK_ALIGN`], or None when the arena is full.
    fn alloc(&mut self, size: usize) -> Option<NonNull<u8>> {
        let at = self.used;
        let end = align_up(at + size, BLOCK_ALIGN);
        if end > self.cap {
            return None;
        }
        self.used = end;
        // SAFETY: `at < cap`, inside the mapping.
        Some(unsafe { NonNull::new_unchecked(self.base.as_ptr().add(at)) })
    }

    /// Forgets every block (their memory is reused from the start).
    fn clear(&mut self) {
        self.used = FIRST_BLOCK;
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no block of it is used any more
        // (the cache that owns the arena is being dropped).
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.cap) };
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
    // SAFETY: `differences` reads within the first `n` bytes of both, which the caller
    // guarantees for `host` and the slice is; each width is used only when `n` is at least it.
    unsafe {
        match n {
            16.. => differences::<u128>(host, old, n) == 0,
            8.. => differences::<u64>(host, old, n) == 0,
            4.. => differences::<u32>(host, old, n) == 0,
            _ => differences::<u8>(host, old, n) == 0,
        }
    }
}

/// The bits that differ between `a` and `b` over `n` bytes, read as words of `T`, the last
/// word ending at the last byte (overlapping the one before it). No branch per word: the
/// code nearly always matches.
///
/// # Safety
/// `n >= size_of::<T>()`, and `n` bytes at `a` and at `b` must be readable.
#[inline(always)]
unsafe fn differences<T>(a: *const u8, b: *const u8, n: usize) -> u128
where
    T: Copy + std::ops::BitXor<Output = T> + Into<u128>,
{
    let w = std::mem::size_of::<T>();
    // SAFETY: `at + w <= n` for every word read (the caller's guarantee covers them).
    let word = |at: usize| unsafe {
        (std::ptr::read_unaligned(a.add(at) as *const T)
            ^ std::ptr::read_unaligned(b.add(at) as *const T))
        .into()
    };
    let mut diff = 0;
    let mut at = 0;
    while at + w < n {
        diff |= word(at);
        at += w;
    }
    diff | word(n - w)
}

/// The block cache of one vCPU: the arena its blocks live in, a direct-mapped table by
/// linear address, and the block entered last, whose chain is tried first.
pub(crate) struct BlockCache {
    arena: Arena,
    /// Each block by its offset in the arena ([`Arena::slot_of`]; 0 where empty): half the
    /// memory of pointers. A block replaced here stays in the arena (and in chains) until the
    /// arena is emptied: it is still correct code for its address.
    slots: Box<[u32]>,
    /// The block entered last, or null.
    last: *const Block,
    /// Times the arena filled and every block was dropped (statistics).
    pub flushes: u64,
}

// SAFETY: the cache owns its arena and every pointer in it points into that arena; moving the
// cache to another thread moves all of it, and nothing else refers to the blocks.
unsafe impl Send for BlockCache {}

impl BlockCache {
    pub fn new() -> Self {
        Self::with_arena(ARENA_BYTES)
    }

    fn with_arena(bytes: usize) -> Self {
        BlockCache {
            arena: Arena::new(bytes),
            slots: vec![0; SLOTS].into_boxed_slice(),
            last: std::ptr::null(),
            flushes: 0,
        }
    }

    #[inline(always)]
    fn slot(lin: u64) -> usize {
        (lin.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOT_BITS)) as usize
    }

    /// The compiled block for `rip` (linear `lin`, host address `host`) if there is one whose
    /// code is still what is in memory: first among those that followed the last block
    /// entered, then in the table. The pointer stays valid until the next `compile`.
    #[inline(always)]
    pub fn find(
        &mut self,
        rip: u64,
        lin: u64,
        bitness: u32,
        host: *const u8,
    ) -> Option<*const Block> {
        if let Some(last) = self.last() {
            let [first, second] = &last.chain;
            for link in [first, second] {
                let b = link.get();
                // SAFETY: chains hold null or blocks of this arena, which live until it is
                // emptied, and emptying it clears `last`.
                if !b.is_null() && unsafe { &*b }.matches(rip, lin, bitness, host) {
                    if std::ptr::eq(link, second) {
                        // Most recent first.
                        second.set(first.get());
                        first.set(b);
                    }
                    return Some(b);
                }
            }
        }
        let b = self.arena.block_at(self.slots[Self::slot(lin)]);
        // SAFETY: table entries are empty or blocks of this arena (see `chain`).
        if b.is_null() || !unsafe { &*b }.matches(rip, lin, bitness, host) {
            return None;
        }
        self.link(b);
        Some(b)
    }

    /// Compiles the block at `rip` (see [`Block::compile`]) and puts it in the table; None
    /// if the instruction there must be stepped alone. Empties the arena first if it is
    /// full, which ends the life of every block pointer handed out before.
    pub fn compile(
        &mut self,
        rip: u64,
        lin: u64,
        bitness: u32,
        host: *const u8,
    ) -> Option<*const Block> {
        let b = match Block::compile(&mut self.arena, rip, lin, bitness, host) {
            Ok(b) => b?,
            Err(Full) => {
                self.arena.clear();
                self.slots.fill(0);
                self.last = std::ptr::null();
                self.flushes += 1;
                Block::compile(&mut self.arena, rip, lin, bitness, host)
                    .ok()
                    .expect("one block fits in an empty arena")?
            }
        };
        let b = b.as_ptr() as *const Block;
        self.slots[Self::slot(lin)] = self.arena.slot_of(b);
        self.link(b);
        Some(b)
    }

    /// Notes that `block` (from `find` or `compile`) is being entered, and prefetches the
    /// first lines of the blocks that followed it before, so that they are on their way while
    /// this one runs.
    #[inline(always)]
    pub fn enter(&mut self, block: *const Block) {
        self.last = block;
        // SAFETY: `block` is a live block of this arena (the caller just got it).
        let b = unsafe { &*block };
        for link in &b.chain {
            let next = link.get() as usize;
            if next != 0 {
                prefetch(next);
                prefetch(next + 64);
                prefetch(next + 128);
            }
        }
    }

    /// Bytes of the arena in use.
    pub fn bytes(&self) -> usize {
        self.arena.used - FIRST_BLOCK
    }

    /// Makes `b` the most recent successor of the last block entered.
    #[inline(always)]
    fn link(&mut self, b: *const Block) {
        if let Some(last) = self.last() {
            if last.chain[0].get() != b {
                last.chain[1].set(last.chain[0].get());
                last.chain[0].set(b);
            }
        }
    }

    fn last(&self) -> Option<&Block> {
        // SAFETY: `last` is null or a block of this arena entered since it was last emptied.
        unsafe { self.last.as_ref() }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The code compare finds a change of any byte, at any length a block can have.
    #[test]
    fn same_finds_every_changed_byte() {
        let code: Vec<u8> = (0..MAX_BYTES as u32).map(|i| (i * 37 + 11) as u8).collect();
        for n in 1..=MAX_BYTES {
            let mut copy = code[..n].to_vec();
            // SAFETY: `copy` has `n` bytes.
            assert!(unsafe { same(copy.as_ptr(), &code[..n]) }, "length {n}");
            for at in 0..n {
                copy[at] ^= 0x40;
                // SAFETY: as above.
                let unchanged = unsafe { same(copy.as_ptr(), &code[..n]) };
                assert!(!unchanged, "length {n}, byte {at}");
                copy[at] ^= 0x40;
            }
        }
    }

    /// `inc eax; ret` at every multiple of 3: a one-instruction block and its end.
    fn code() -> Vec<u8> {
        [0xff, 0xc0, 0xc3].repeat(0x1000 / 3)
    }

    fn compile(cache: &mut BlockCache, code: &[u8], k: usize, lin: u64) -> *const Block {
        let b = cache
            .compile(lin, lin, 64, code[3 * k..].as_ptr())
            .expect("`inc eax; ret` compiles");
        cache.enter(b);
        b
    }

    #[test]
    fn a_full_arena_is_emptied_and_compiling_goes_on() {
        let code = code();
        let mut cache = BlockCache::with_arena(4096);
        let lin = |k: usize| 0x40_0000 + 3 * k as u64;
        let mut blocks = Vec::new();
        for k in 0..40 {
            blocks.push(compile(&mut cache, &code, k, lin(k)));
        }
        assert!(cache.flushes >= 1, "40 blocks fill a 4 KiB arena");
        assert!(cache.bytes() <= 4096);
        // The first blocks went with the flush; the last is found where it was put.
        let host = |k: usize| code[3 * k..].as_ptr();
        assert!(cache.find(lin(0), lin(0), 64, host(0)).is_none());
        let last = cache.find(lin(39), lin(39), 64, host(39));
        assert_eq!(last, Some(blocks[39]));
        // SAFETY: found just now, and nothing was compiled since.
        let ops = unsafe { &*last.unwrap() }.ops().len();
        assert_eq!(ops, 2, "inc eax; ret");
    }

    #[test]
    fn a_block_is_found_through_the_chain_of_the_one_before_when_its_slot_is_taken() {
        let mut code = code();
        let mut cache = BlockCache::new();
        let (a, b) = (0x1000, 0x2000);
        // An address whose cache slot is `b`'s.
        let c = (0x3000..)
            .find(|&l| BlockCache::slot(l) == BlockCache::slot(b))
            .unwrap();
        let block_a = compile(&mut cache, &code, 0, a);
        let block_b = compile(&mut cache, &code, 1, b);
        compile(&mut cache, &code, 2, c);
        // Back at `a`: `b` followed it last time, though `c` holds its slot now.
        cache.enter(block_a);
        assert_eq!(cache.find(b, b, 64, code[3..].as_ptr()), Some(block_b));
        // A mode or address mismatch, or changed code, is never taken from the chain.
        cache.enter(block_a);
        assert!(cache.find(b, b, 32, code[3..].as_ptr()).is_none());
        assert!(cache.find(b + 1, b, 64, code[3..].as_ptr()).is_none());
        code[3] = 0x90;
        assert!(cache.find(b, b, 64, code[3..].as_ptr()).is_none());
    }
}
