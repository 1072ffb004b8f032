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
//!
//! A snapshot saves the arena and the table ([`BlockCache::save`]); a VM restored from it maps
//! them copy-on-write at the same address ([`BlockCache::adopt`]), so that clones share one
//! copy, and checks each saved block before its first use by compiling its bytes again.

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
/// Slots of the fresh table a cache with shared blocks compiles into first (16 KiB).
const FRESH_BITS: u32 = 12;

/// Bytes of address space each vCPU reserves for its blocks. Only what is filled takes host
/// memory; when it is full, every block is dropped and the guest's code compiles again (as
/// QEMU does when its translation buffer fills). Booting the Debian kernel to a shell compiles
/// ~40 MiB of blocks.
const ARENA_BYTES: usize = 64 << 20;

/// A compiled block's header. The block is one piece of its vCPU's [`Arena`]:
///
/// ```text
/// header (56 bytes) | code bytes (len) | pad to 32 | ops (32 bytes each) |
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
    /// Where the general interpreter's handler was in the process that compiled the block
    /// ([`fast::general_address`]): its ops' handler addresses are that process's.
    anchor: u64,
    /// The blocks that followed this one last (most recent first), or null: entered from here
    /// without the cache lookup when they match (see [`BlockCache::find`]). A saved block's
    /// chain is valid in a process that adopts it because the arena is mapped at the same
    /// address there ([`BlockCache::adopt`]), and is checked before it is followed.
    chain: [Cell<*const Block>; 2],
    pub bitness: u32,
    /// How many bytes the block was compiled from (all inside one page; at most
    /// [`MAX_BYTES`]).
    len: u16,
    n_ops: u16,
    /// Offset from the header of the ops.
    ops_at: u32,
    /// How hot the block is, for the translator (`translate::Translator::enter`); 0 when
    /// compiled. Never read in a block shared from another process.
    pub hot: Cell<u32>,
}

// Every field is an integer or a raw pointer: a header read from a saved file is a valid
// `Block` whatever its bytes (they are checked before the block is used, see `Arena::verify`).
const HEADER: usize = std::mem::size_of::<Block>();
const _: () = assert!(HEADER == 56);
/// Bytes of an op.
const OP: usize = std::mem::size_of::<Op>();

// `Arena::verify` compares the bytes of decoded instructions: iced-x86's `Instruction` must have
// no padding. Its fields add up to 40 bytes (an explicit `pad` byte among them).
const _: () = assert!(std::mem::size_of::<Instruction>() == 40);

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
    pub(crate) fn code_bytes(&self) -> &[u8] {
        self.code()
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
            // General-path ops keep the general handler (its address is the block's anchor).
            *slot = if op.run as u64 == self.anchor {
                fast::general_handler()
            } else {
                fast::exact_handler(&insn, self.bitness, self.rip)
            };
        }
    }

    /// What to add to an op's handler address to get this process's handler: 0 for a block
    /// this process compiled; for one another process compiled (saved with a snapshot), the
    /// distance between where the handlers are here and where they were there. Its ops are
    /// at the same distances from the general handler as what this build compiles from the
    /// block's bytes (`Arena::verify` checked), so that gives a handler of this process.
    #[inline(always)]
    pub fn slide(&self) -> usize {
        fast::general_address().wrapping_sub(self.anchor as usize)
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
        let Some(plan) = Plan::new(code, rip, bitness) else {
            return Ok(None);
        };
        let base = arena.alloc(plan.size).ok_or(Full)?;
        // SAFETY: `base .. base + size` is a fresh piece of the arena, aligned to
        // `BLOCK_ALIGN`; nothing else refers to it yet.
        Ok(Some(unsafe { plan.write(base.as_ptr(), code, lin) }))
    }
}

/// A block as compiled from some code: its instructions, their ops, and where each part of
/// it goes (offsets from the header).
struct Plan {
    rip: u64,
    bitness: u32,
    insns: Vec<Instruction>,
    compiled: Vec<fast::Compiled>,
    /// Code bytes the instructions take.
    used: usize,
    ops_at: usize,
    insns_at: usize,
    size: usize,
}

impl Plan {
    /// Decodes the block at the start of `code` (at `rip`, in `bitness`-bit code) and
    /// compiles it; None if not even one instruction can be decoded from `code`.
    fn new(code: &[u8], rip: u64, bitness: u32) -> Option<Plan> {
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
            return None;
        }
        let needed = flags_needed(&insns);
        let compiled: Vec<_> = insns
            .iter()
            .zip(needed)
            .map(|(insn, flags)| fast::compile(insn, bitness, rip, flags))
            .collect();
        let n = compiled.len();
        let generals = compiled.iter().filter(|c| c.general).count();
        let ops_at = align_up(HEADER + used, 32);
        // `Op`s are 32 bytes, so the instructions (8-byte aligned) follow with no gap.
        let insns_at = ops_at + n * std::mem::size_of::<Op>();
        const _: () = assert!(std::mem::align_of::<Instruction>() <= 32);
        let size = insns_at + generals * std::mem::size_of::<Instruction>();
        Some(Plan {
            rip,
            bitness,
            insns,
            compiled,
            used,
            ops_at,
            insns_at,
            size,
        })
    }

    /// Writes the block (header, the first `used` bytes of `code`, ops, the general path's
    /// instructions) at `base`.
    ///
    /// # Safety
    /// `base .. base + size` must be writable, aligned to 8 (what the header, ops and
    /// instructions need; blocks in the arena are aligned to [`BLOCK_ALIGN`]), and referred to
    /// by nothing else; `code` must be what the plan was made from.
    unsafe fn write(&self, base: *mut u8, code: &[u8], lin: u64) -> NonNull<Block> {
        // SAFETY: every offset below is inside `base .. base + size` and respects what is
        // written there (header at 0, bytes, `Op`s at a multiple of 32, instructions right
        // after them at a multiple of 8); the caller vouches for the rest.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), base.add(HEADER), self.used);
            let ops = base.add(self.ops_at) as *mut Op;
            let mut general = base.add(self.insns_at) as *mut Instruction;
            for (i, (c, insn)) in self.compiled.iter().zip(&self.insns).enumerate() {
                let mut op = c.op;
                if c.general {
                    general.write(*insn);
                    op.point_at(general, ops.add(i));
                    general = general.add(1);
                }
                ops.add(i).write(op);
            }
            let block = base as *mut Block;
            block.write(Block {
                rip: self.rip,
                lin,
                anchor: fast::general_address() as u64,
                chain: Default::default(),
                bitness: self.bitness,
                len: self.used as u16,
                n_ops: self.compiled.len() as u16,
                ops_at: self.ops_at as u32,
                hot: Cell::new(0),
            });
            NonNull::new_unchecked(block)
        }
    }
}

/// The arena is full.
struct Full;

/// Where the first block goes: one alignment unit in, so that no block's slot is 0 (empty).
const FIRST_BLOCK: usize = BLOCK_ALIGN;

/// One vCPU's blocks: a region of address space filled from the start, emptied all at once
/// when full. Only filled pages take host memory.
///
/// The start of it may be *shared*: blocks another process compiled and saved with a
/// snapshot, mapped copy-on-write from the file ([`BlockCache::adopt`]), so that clones of one
/// snapshot share the page cache's copy instead of each compiling its own. Nothing in a
/// shared block is trusted until it is checked ([`Arena::verify`]: compiling its own bytes
/// again gives the same ops) and shared blocks are never written (their chains stay as
/// saved), so their pages stay shared.
struct Arena {
    base: NonNull<u8>,
    used: usize,
    /// Bytes reserved ([`ARENA_BYTES`] but in tests).
    cap: usize,
    /// Bytes at the start that are mapped from a saved file (0 if none).
    shared: usize,
    /// One bit per [`BLOCK_ALIGN`] unit of the shared part: the block there was checked.
    checked: Vec<u64>,
    /// Where `verify` compiles a block afresh to compare with a saved one.
    scratch: Vec<u64>,
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
            shared: 0,
            checked: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The table's name for `block`: its offset in [`BLOCK_ALIGN`] units, never 0.
    fn slot_of(&self, block: *const Block) -> u32 {
        ((block as usize - self.base.as_ptr() as usize) / BLOCK_ALIGN) as u32
    }

    /// The block a table slot names (see [`slot_of`](Self::slot_of)), or null for 0; not
    /// checked.
    #[inline(always)]
    fn block_at(&self, unit: u32) -> *const Block {
        if unit == 0 {
            return std::ptr::null();
        }
        self.base.as_ptr().wrapping_add(unit as usize * BLOCK_ALIGN) as *const Block
    }

    /// Whether `block` (of this arena) is one of the shared blocks.
    #[inline(always)]
    fn is_shared(&self, block: *const Block) -> bool {
        (block as usize).wrapping_sub(self.base.as_ptr() as usize) < self.shared
    }

    /// `b` if it may be entered, or null: null names none; a block this arena compiled may;
    /// a shared one once it is checked (checked now if it was not). A shared block's chain
    /// (`from_shared`) can name only shared blocks.
    #[inline(always)]
    fn usable(&mut self, b: *const Block, from_shared: bool) -> *const Block {
        if b.is_null() {
            return b;
        }
        let at = (b as usize).wrapping_sub(self.base.as_ptr() as usize);
        if at >= self.shared {
            // Past the shared part: this process's own blocks (the saved table's slots there
            // were cleared by `adopt`), but a shared block's chain may say anything.
            return if from_shared || at >= self.used {
                std::ptr::null()
            } else {
                b
            };
        }
        if !at.is_multiple_of(BLOCK_ALIGN) {
            return std::ptr::null();
        }
        let u = at / BLOCK_ALIGN;
        let (word, bit) = (u / 64, 1u64 << (u % 64));
        if self.checked[word] & bit == 0 {
            if !self.verify(at) {
                return std::ptr::null();
            }
            self.checked[word] |= bit;
        }
        b
    }

    /// Whether the shared block said to start `at` bytes in is exactly what compiling its
    /// own code bytes gives in this process: header, ops (handlers included) and decoded
    /// instructions. Reads only inside the shared part, and reads no byte of it as anything
    /// but an integer before that: a saved file can be wrong in any way.
    fn verify(&mut self, at: usize) -> bool {
        let end = self.shared;
        if at < FIRST_BLOCK || !at.is_multiple_of(BLOCK_ALIGN) || at + HEADER > end {
            return false;
        }
        // SAFETY: the header is inside the shared mapping, aligned; every field of `Block`
        // is an integer or a raw pointer, valid whatever the bytes.
        let b = unsafe { &*(self.base.as_ptr().add(at) as *const Block) };
        let len = b.len();
        let fits = len > 0
            && len <= MAX_BYTES
            && at + HEADER + len <= end
            && (b.lin & 0xfff) as usize + len <= 0x1000
            && matches!(b.bitness, 16 | 32 | 64);
        if !fits {
            return false;
        }
        let code = b.code();
        let Some(plan) = Plan::new(code, b.rip, b.bitness) else {
            return false;
        };
        let same_shape = plan.used == len
            && plan.compiled.len() == usize::from(b.n_ops)
            && plan.ops_at == b.ops_at as usize
            && at + plan.size <= end;
        if !same_shape {
            return false;
        }
        self.scratch.clear();
        self.scratch.resize(plan.size.div_ceil(8), 0);
        let fresh = self.scratch.as_mut_ptr() as *mut u8;
        // SAFETY: `scratch` holds `size` bytes, 8-aligned, which is all `write` needs of a
        // block that is only compared (`Op`s and instructions need at most 8).
        unsafe { plan.write(fresh, code, b.lin) };
        let n = plan.compiled.len();
        let insns = plan.ops_at + n * OP;
        // SAFETY: `fresh` holds `size` initialized bytes (zeroed, then written by `write`:
        // ops and instructions have no padding); `at + size <= end` is inside the mapping.
        let (fresh, saved) = unsafe {
            (
                std::slice::from_raw_parts(fresh, plan.size),
                std::slice::from_raw_parts(self.base.as_ptr().add(at), plan.size),
            )
        };
        let word = |b: &[u8], at: usize| usize::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let (here, there) = (fast::general_address(), b.anchor as usize);
        // Each op: the handler at the same distance from the general one, the rest the same.
        let ops_same = (0..n).all(|i| {
            let o = plan.ops_at + i * OP;
            word(fresh, o).wrapping_sub(here) == word(saved, o).wrapping_sub(there)
                && fresh[o + 8..o + OP] == saved[o + 8..o + OP]
        });
        ops_same && fresh[insns..plan.size] == saved[insns..plan.size]
    }

    /// Moves the (empty) arena's reservation to `at`, where another process had its arena,
    /// if that address range is free here.
    fn move_to(&mut self, at: usize) -> std::io::Result<()> {
        if at == self.base.as_ptr() as usize {
            return Ok(());
        }
        if at == 0 || !at.is_multiple_of(PAGE) {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        // SAFETY: a new mapping at `at` only if nothing is mapped there (NOREPLACE).
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                self.cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        if p as usize != at {
            // A kernel that does not know NOREPLACE treats it as a hint.
            // SAFETY: the mapping just made, which nothing uses.
            unsafe { libc::munmap(p, self.cap) };
            return Err(std::io::ErrorKind::AddrInUse.into());
        }
        // SAFETY: the old reservation holds no block (the arena is empty) and nothing else
        // refers to it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.cap) };
        // SAFETY: `p` is not null (checked against `at`, which is not 0).
        self.base = unsafe { NonNull::new_unchecked(p.cast()) };
        Ok(())
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

    /// Forgets every block (their memory is reused from the start; a shared part becomes
    /// private memory again).
    fn clear(&mut self) {
        if self.shared > 0 {
            let len = align_up(self.shared, PAGE);
            // SAFETY: replaces the start of this arena's own reservation with fresh private
            // memory; no block of it is used any more (the caller drops them all).
            unsafe { remap_anonymous(self.base.as_ptr(), len) };
            self.shared = 0;
            self.checked = Vec::new();
        }
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

const PAGE: usize = 4096;

/// Maps fresh private zero memory over `len` bytes at `at` (page-aligned), whatever was
/// mapped there; aborts if it cannot (the range would be left unmapped).
///
/// # Safety
/// `at .. at + len` must be part of a mapping the caller owns, and nothing may refer to what
/// it holds.
unsafe fn remap_anonymous(at: *mut u8, len: usize) {
    // SAFETY: the caller owns the range; MAP_FIXED replaces only it.
    let p = unsafe {
        libc::mmap(
            at.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        // Going on would leave a hole where blocks or the table are expected.
        eprintln!(
            "emu: cannot remap compiled code: {}",
            std::io::Error::last_os_error()
        );
        std::process::abort();
    }
}

/// The block table: one 32-bit slot per cache line of [`SLOTS`], in its own mapping so that
/// a saved table can be mapped copy-on-write over it.
struct Table {
    base: NonNull<u32>,
}

const TABLE_BYTES: usize = SLOTS * 4;

impl Table {
    fn new() -> Table {
        let base = crate::memory::map_anonymous(TABLE_BYTES)
            .unwrap_or_else(|| panic!("emu: cannot map the block table"));
        Table { base: base.cast() }
    }

    #[inline(always)]
    fn get(&self, i: usize) -> u32 {
        assert!(i < SLOTS);
        // SAFETY: `i` is in bounds of the mapping, which lives as long as `self`.
        unsafe { *self.base.as_ptr().add(i) }
    }

    #[inline(always)]
    fn set(&mut self, i: usize, unit: u32) {
        assert!(i < SLOTS);
        // SAFETY: as in `get`.
        unsafe { *self.base.as_ptr().add(i) = unit }
    }

    /// Empties every slot (fresh zero pages; a mapped saved table goes away).
    fn clear(&mut self) {
        // SAFETY: the table's own mapping; slots are plain integers nobody refers to.
        unsafe { remap_anonymous(self.base.as_ptr().cast(), TABLE_BYTES) };
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping holds `TABLE_BYTES` initialized bytes.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().cast(), TABLE_BYTES) }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, used by nothing else.
        unsafe { libc::munmap(self.base.as_ptr().cast(), TABLE_BYTES) };
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
    slots: Table,
    /// While blocks are shared: a small table of this process's own, where what it compiles
    /// goes first, so that the shared table's pages are not copied for a few new blocks
    /// (empty otherwise).
    fresh: Vec<u32>,
    /// The block entered last, or null.
    last: *const Block,
    /// Times the arena filled and every block was dropped (statistics).
    pub flushes: u64,
}

// SAFETY: the cache owns its arena and every pointer in it points into that arena; moving the
// cache to another thread moves all of it, and nothing else refers to the blocks.
unsafe impl Send for BlockCache {}

/// What a saved blocks file ([`BlockCache::save`]) starts with.
const FILE_MAGIC: &[u8; 8] = b"FVBLOCK1";
/// The file's header: one page, so the table and the blocks after it can be mapped.
const FILE_HEADER: usize = PAGE;

/// Why a saved blocks file was not used (the cache is then as it was: its blocks compile).
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("it can be written by others than its owner, or is not ours")]
    NotPrivate,
    #[error("it is not a blocks file of this build")]
    OtherBuild,
    #[error("it is shorter than its header says")]
    Truncated,
    #[error("the address its blocks were saved at is taken in this process: {0}")]
    AddressTaken(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl BlockCache {
    pub fn new() -> Self {
        Self::with_arena(ARENA_BYTES)
    }

    fn with_arena(bytes: usize) -> Self {
        BlockCache {
            arena: Arena::new(bytes),
            slots: Table::new(),
            fresh: Vec::new(),
            last: std::ptr::null(),
            flushes: 0,
        }
    }

    /// The fresh table's slot for table slot `slot`.
    #[inline(always)]
    fn fresh_slot(slot: usize) -> usize {
        slot >> (SLOT_BITS - FRESH_BITS)
    }

    #[inline(always)]
    fn slot(lin: u64) -> usize {
        (lin.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOT_BITS)) as usize
    }

    /// The compiled block for `rip` (linear `lin`, host address `host`) if there is one whose
    /// code is still what is in memory: first among those that followed the last block
    /// entered, then in the table. The pointer stays valid until the next `compile`.
    ///
    /// `SHARED` must be whether the cache holds shared blocks ([`has_shared`](Self::has_shared)):
    /// then each block is checked before its first use ([`Arena::usable`]), shared blocks'
    /// chains are not written, and the fresh table is looked in first. Without them this is
    /// the plain lookup the run loop needs (the checks fold away).
    #[inline(always)]
    pub fn find<const SHARED: bool>(
        &mut self,
        rip: u64,
        lin: u64,
        bitness: u32,
        host: *const u8,
    ) -> Option<*const Block> {
        debug_assert_eq!(SHARED, self.has_shared());
        // SAFETY: `last` is null or a block of this arena entered since it was last emptied
        // (a shared one was checked before it was entered).
        if let Some(last) = unsafe { self.last.as_ref() } {
            let from_shared = SHARED && self.arena.is_shared(last);
            for k in 0..2 {
                let mut b = last.chain[k].get();
                if SHARED {
                    b = self.arena.usable(b, from_shared);
                }
                // SAFETY: chains hold null or blocks of this arena, which live until it is
                // emptied (emptying it clears `last`); shared ones passed `usable`.
                if !b.is_null() && unsafe { &*b }.matches(rip, lin, bitness, host) {
                    if k == 1 && !from_shared {
                        // Most recent first.
                        last.chain[1].set(last.chain[0].get());
                        last.chain[0].set(b);
                    }
                    return Some(b);
                }
            }
        }
        let slot = Self::slot(lin);
        if SHARED {
            let fresh = self.arena.block_at(self.fresh[Self::fresh_slot(slot)]);
            // SAFETY: the fresh table holds only blocks this process compiled since it
            // adopted.
            if !fresh.is_null() && unsafe { &*fresh }.matches(rip, lin, bitness, host) {
                self.link(fresh);
                return Some(fresh);
            }
        }
        let mut b = self.arena.block_at(self.slots.get(slot));
        if SHARED {
            b = self.arena.usable(b, false);
        }
        // SAFETY: table entries are empty or blocks of this arena; shared ones passed `usable`.
        if b.is_null() || !unsafe { &*b }.matches(rip, lin, bitness, host) {
            return None;
        }
        self.link(b);
        Some(b)
    }

    /// Where the arena is and how many bytes it spans (blocks lie inside).
    pub fn arena_span(&self) -> (usize, usize) {
        (self.arena.base.as_ptr() as usize, self.arena.cap)
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
                self.slots.clear();
                self.fresh = Vec::new();
                self.last = std::ptr::null();
                self.flushes += 1;
                Block::compile(&mut self.arena, rip, lin, bitness, host)
                    .ok()
                    .expect("one block fits in an empty arena")?
            }
        };
        let b = b.as_ptr() as *const Block;
        let (slot, unit) = (Self::slot(lin), self.arena.slot_of(b));
        if self.arena.shared != 0 {
            let f = Self::fresh_slot(slot);
            if self.fresh[f] == 0 {
                self.fresh[f] = unit;
                self.link(b);
                return Some(b);
            }
        }
        self.slots.set(slot, unit);
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

    /// Whether some blocks are shared (adopted from a saved file and not yet dropped).
    #[inline(always)]
    pub fn has_shared(&self) -> bool {
        self.arena.shared != 0
    }

    /// Bytes of the arena in use.
    pub fn bytes(&self) -> usize {
        self.arena.used - FIRST_BLOCK
    }

    /// Makes `b` the most recent successor of the last block entered (unless that one is
    /// shared: its page stays the file's).
    #[inline(always)]
    fn link(&mut self, b: *const Block) {
        if let Some(last) = self.last() {
            if last.chain[0].get() != b && !self.arena.is_shared(last) {
                last.chain[1].set(last.chain[0].get());
                last.chain[0].set(b);
            }
        }
    }

    fn last(&self) -> Option<&Block> {
        // SAFETY: `last` is null or a block of this arena entered since it was last emptied.
        unsafe { self.last.as_ref() }
    }

    /// Writes the table and every block to `out`, for restored copies of this vCPU to share
    /// ([`adopt`](Self::adopt)): a header page (magic, this build's fingerprint, the bytes of
    /// blocks), the table, then the arena from its start.
    pub fn save(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut header = vec![0u8; FILE_HEADER];
        header[..8].copy_from_slice(FILE_MAGIC);
        header[8..16].copy_from_slice(&fingerprint().to_le_bytes());
        header[16..24].copy_from_slice(&(self.arena.used as u64).to_le_bytes());
        header[24..32].copy_from_slice(&(self.arena.base.as_ptr() as u64).to_le_bytes());
        out.write_all(&header)?;
        // The table with what went to the fresh table put where it belongs.
        let mut table = self.slots.bytes().to_vec();
        for &unit in &self.fresh {
            let b = self.arena.block_at(unit);
            // SAFETY: the fresh table holds 0 or blocks this process compiled.
            if let Some(b) = unsafe { b.as_ref() } {
                let at = 4 * Self::slot(b.lin);
                table[at..at + 4].copy_from_slice(&unit.to_le_bytes());
            }
        }
        out.write_all(&table)?;
        // SAFETY: the arena's first `used` bytes are mapped and were written (blocks, the
        // gaps between them zero or earlier blocks' bytes, the unused first unit zero).
        let blocks =
            unsafe { std::slice::from_raw_parts(self.arena.base.as_ptr(), self.arena.used) };
        out.write_all(blocks)
    }

    /// Maps the table and blocks another process saved ([`save`](Self::save)) copy-on-write
    /// into this empty cache: clones of one snapshot then share one copy of them in the page
    /// cache. Each saved block is checked before it is first entered ([`Arena::verify`]);
    /// blocks compiled from now on are this process's own. On an error nothing changed.
    pub fn adopt(&mut self, file: &std::fs::File) -> Result<(), AdoptError> {
        use std::os::unix::fs::{FileExt, MetadataExt};
        use std::os::unix::io::AsRawFd;
        assert!(
            self.arena.used == FIRST_BLOCK && self.arena.shared == 0,
            "blocks are adopted into an empty cache"
        );
        // Checked blocks are trusted from then on; pages of a private mapping that were not
        // copied yet follow the file, so nobody but its owner (this user) may write it.
        let meta = file.metadata()?;
        // SAFETY: geteuid has no preconditions.
        if meta.uid() != unsafe { libc::geteuid() } || meta.mode() & 0o022 != 0 {
            return Err(AdoptError::NotPrivate);
        }
        let mut header = vec![0u8; FILE_HEADER];
        file.read_exact_at(&mut header, 0)
            .map_err(|_| AdoptError::Truncated)?;
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8"));
        if &header[..8] != FILE_MAGIC || word(8) != fingerprint() {
            return Err(AdoptError::OtherBuild);
        }
        let used = usize::try_from(word(16)).map_err(|_| AdoptError::OtherBuild)?;
        if used < FIRST_BLOCK || used > self.arena.cap || !used.is_multiple_of(BLOCK_ALIGN) {
            return Err(AdoptError::OtherBuild);
        }
        if meta.len() < (FILE_HEADER + TABLE_BYTES + used) as u64 {
            return Err(AdoptError::Truncated);
        }
        // The saved blocks point at each other (chains): the arena goes where it was.
        let at = usize::try_from(word(24)).map_err(|_| AdoptError::OtherBuild)?;
        self.arena.move_to(at).map_err(AdoptError::AddressTaken)?;
        let map = |at: *mut u8, len: usize, offset: usize| {
            // SAFETY: replaces part of this cache's own mappings (the table or the start of
            // the empty arena), which nothing refers to, with a private view of the file.
            let p = unsafe {
                libc::mmap(
                    at.cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let arena_len = align_up(used, PAGE);
        if let Err(e) = map(
            self.arena.base.as_ptr(),
            arena_len,
            FILE_HEADER + TABLE_BYTES,
        ) {
            // SAFETY: the arena's own start, holding no block (it is empty).
            unsafe { remap_anonymous(self.arena.base.as_ptr(), arena_len) };
            return Err(e.into());
        }
        if let Err(e) = map(self.slots.base.as_ptr().cast(), TABLE_BYTES, FILE_HEADER) {
            self.slots.clear();
            // SAFETY: as above.
            unsafe { remap_anonymous(self.arena.base.as_ptr(), arena_len) };
            return Err(e.into());
        }
        self.arena.used = used;
        self.arena.shared = used;
        self.arena.checked = vec![0; (used / BLOCK_ALIGN).div_ceil(64)];
        self.fresh = vec![0; 1 << FRESH_BITS];
        // Slots past the saved blocks would be taken for this process's own: drop them (a
        // correct file has none, so no page of the table is copied).
        for i in 0..SLOTS {
            if self.slots.get(i) as usize * BLOCK_ALIGN >= used {
                self.slots.set(i, 0);
            }
        }
        self.last = std::ptr::null();
        Ok(())
    }
}

/// Names the build a blocks file was saved by: the layout constants and where handlers lie
/// relative to each other, which ops encode. A file of another build would only fail
/// [`Arena::verify`] block by block; this refuses it at once.
fn fingerprint() -> u64 {
    let parts = [
        std::mem::size_of::<Op>() as u64,
        HEADER as u64,
        SLOTS as u64,
        MAX_OPS as u64,
        fast::handler_fingerprint(),
    ];
    parts.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &p| {
        (h ^ p).wrapping_mul(0x100_0000_01b3)
    })
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
pub(crate) fn flags_needed(insns: &[Instruction]) -> Vec<bool> {
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

    impl BlockCache {
        /// `find` as the run loop calls it.
        fn lookup(
            &mut self,
            rip: u64,
            lin: u64,
            bitness: u32,
            host: *const u8,
        ) -> Option<*const Block> {
            if self.has_shared() {
                self.find::<true>(rip, lin, bitness, host)
            } else {
                self.find::<false>(rip, lin, bitness, host)
            }
        }
    }

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
        assert!(cache.lookup(lin(0), lin(0), 64, host(0)).is_none());
        let last = cache.lookup(lin(39), lin(39), 64, host(39));
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
        assert_eq!(cache.lookup(b, b, 64, code[3..].as_ptr()), Some(block_b));
        // A mode or address mismatch, or changed code, is never taken from the chain.
        cache.enter(block_a);
        assert!(cache.lookup(b, b, 32, code[3..].as_ptr()).is_none());
        assert!(cache.lookup(b + 1, b, 64, code[3..].as_ptr()).is_none());
        code[3] = 0x90;
        assert!(cache.lookup(b, b, 64, code[3..].as_ptr()).is_none());
    }

    /// A saved blocks file, removed when dropped.
    struct SavedFile {
        file: std::fs::File,
        path: std::path::PathBuf,
    }

    impl std::ops::Deref for SavedFile {
        type Target = std::fs::File;
        fn deref(&self) -> &std::fs::File {
            &self.file
        }
    }

    impl Drop for SavedFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// A file with the blocks of `cache`, as a snapshot saves them (owner-only).
    fn saved(cache: &BlockCache, name: &str) -> SavedFile {
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!("fv-blocks-{}-{name}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        cache.save(&mut file).unwrap();
        SavedFile { file, path }
    }

    /// Saves `cache` and drops it (its blocks go back to the same address when adopted):
    /// the file and the arena's address.
    fn saved_and_gone(cache: BlockCache, name: &str) -> (SavedFile, usize) {
        let file = saved(&cache, name);
        (file, cache.arena.base.as_ptr() as usize)
    }

    /// Where, in a saved file, the byte `offset` bytes into `block` is (`base`: the saving
    /// arena's).
    fn file_offset(base: usize, block: *const Block, offset: usize) -> u64 {
        (FILE_HEADER + TABLE_BYTES + block as usize - base + offset) as u64
    }

    const LIN: u64 = 0x40_0000;

    /// Compiles blocks 0..n of `code()` at `LIN + 3k`, each entered after the one before.
    fn compiled(n: usize) -> (BlockCache, Vec<*const Block>) {
        let code = code();
        let mut cache = BlockCache::new();
        let blocks = (0..n)
            .map(|k| compile(&mut cache, &code, k, LIN + 3 * k as u64))
            .collect();
        (cache, blocks)
    }

    /// A cache that adopted `file`. The saving cache must be gone: the blocks go back to the
    /// address they were saved at, so its pointers to them name the adopted ones.
    fn adopted(file: &std::fs::File) -> BlockCache {
        let mut b = BlockCache::new();
        b.adopt(file).unwrap();
        b
    }

    #[test]
    fn adopted_blocks_are_checked_found_and_never_written() {
        use std::os::unix::fs::FileExt;
        let code = code();
        let (a, blocks) = compiled(10);
        let used = a.arena.used;
        let (file, base) = saved_and_gone(a, "adopt");
        let mut b = adopted(&file);
        assert_eq!(b.arena.base.as_ptr() as usize, base);
        assert_eq!(b.arena.used, used);
        for k in 0..10 {
            let lin = LIN + 3 * k as u64;
            let found = b
                .lookup(lin, lin, 64, code[3 * k..].as_ptr())
                .expect("adopted");
            assert_eq!(found, blocks[k]);
            assert!(b.arena.is_shared(found));
            // SAFETY: found just now.
            assert_eq!(unsafe { &*found }.ops().len(), 2, "inc eax; ret");
            b.enter(found);
        }
        assert_eq!(b.arena.used, used, "nothing was compiled");
        // Linking them in another order did not rewrite their chains: the file's bytes are
        // what the mapping shows.
        let mut chain = [0u8; 16];
        file.read_exact_at(&mut chain, file_offset(base, blocks[4], 24))
            .unwrap();
        b.last = blocks[4];
        b.link(blocks[7]);
        // SAFETY: block 4 was checked above.
        let now = unsafe { &*blocks[4] }.chain.iter().map(|c| c.get() as u64);
        let then = chain
            .chunks(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()));
        assert!(now.eq(then));
        // Changed guest code is not run from an adopted block either.
        let mut changed = code.clone();
        changed[0] = 0x90;
        assert!(b.lookup(LIN, LIN, 64, changed.as_ptr()).is_none());
    }

    #[test]
    fn a_block_another_process_compiled_runs_with_this_ones_handlers() {
        use std::os::unix::fs::FileExt;
        let code = code();
        let (a, blocks) = compiled(3);
        // SAFETY: the blocks are live in `a`.
        let block = unsafe { &*blocks[1] };
        let (ops_at, runs) = (block.ops_at as usize, block.ops().iter().map(|o| o.run));
        let runs: Vec<usize> = runs.collect();
        let (file, base) = saved_and_gone(a, "moved");
        // As if the saving process had its handlers 0x5000 bytes further on.
        let moved = |at: u64| {
            let mut w = [0u8; 8];
            file.read_exact_at(&mut w, at).unwrap();
            let v = u64::from_le_bytes(w).wrapping_add(0x5000);
            file.write_all_at(&v.to_le_bytes(), at).unwrap();
        };
        moved(file_offset(base, blocks[1], 16));
        for i in 0..runs.len() {
            moved(file_offset(base, blocks[1], ops_at + i * OP));
        }
        let mut b = adopted(&file);
        let lin = LIN + 3;
        let found = b
            .lookup(lin, lin, 64, code[3..].as_ptr())
            .expect("accepted");
        // SAFETY: found just now.
        let found = unsafe { &*found };
        assert_eq!(found.slide(), 0usize.wrapping_sub(0x5000));
        for (op, run) in found.ops().iter().zip(runs) {
            // SAFETY: the block's own slide.
            assert_eq!(unsafe { op.handler(found.slide()) } as usize, run);
        }
    }

    #[test]
    fn a_tampered_saved_block_is_refused_and_compiled_again() {
        use std::os::unix::fs::FileExt;
        let code = code();
        let (a, blocks) = compiled(10);

        // Block 3: its first op's handler moved by one byte; block 5: one op fewer; block 6
        // follows block 2 at a pointer into the middle of block 7.
        // SAFETY: the blocks are live in `a`.
        let ops_at = unsafe { &*blocks[3] }.ops_at as usize;
        let (file, base) = saved_and_gone(a, "tampered");
        file.write_all_at(&[0x11], file_offset(base, blocks[3], ops_at))
            .unwrap();
        file.write_all_at(&1u16.to_le_bytes(), file_offset(base, blocks[5], 46))
            .unwrap();
        let middle = (blocks[7] as u64 + 64).to_le_bytes();
        file.write_all_at(&middle, file_offset(base, blocks[6], 24))
            .unwrap();
        let mut b = adopted(&file);
        let used = b.arena.used;
        for k in [3, 5] {
            let lin = LIN + 3 * k as u64;
            let host = code[3 * k..].as_ptr();
            assert!(b.lookup(lin, lin, 64, host).is_none(), "block {k}");
            let again = b.compile(lin, lin, 64, host).unwrap();
            assert!(!b.arena.is_shared(again));
            assert_eq!(b.lookup(lin, lin, 64, host), Some(again));
        }
        assert!(b.arena.used > used);
        assert!(b
            .arena
            .usable(blocks[7].wrapping_byte_add(64), true)
            .is_null());
        let lin = LIN + 12;
        let four = b.lookup(lin, lin, 64, code[12..].as_ptr()).unwrap();
        assert!(b.arena.is_shared(four), "the others are still used");
    }

    #[test]
    fn files_that_cannot_be_used_leave_the_cache_compiling_its_own() {
        use std::os::unix::fs::{FileExt, PermissionsExt};
        let code = code();
        let (a, _) = compiled(4);
        type Spoil = fn(&std::fs::File, &std::path::Path);
        let cases: [(&str, Spoil); 4] = [
            ("it is not a blocks file of this build", |f, _| {
                f.write_all_at(b"XX", 0).unwrap()
            }),
            ("it is not a blocks file of this build", |f, _| {
                f.write_all_at(&[0xff], 8).unwrap()
            }),
            ("it is shorter than its header says", |f, _| {
                f.set_len((FILE_HEADER + TABLE_BYTES) as u64).unwrap()
            }),
            ("can be written by others", |_, p| {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o620)).unwrap()
            }),
        ];
        for (i, (why, spoil)) in cases.iter().enumerate() {
            let file = saved(&a, &format!("bad{i}"));
            spoil(&file, &file.path);
            let mut b = BlockCache::new();
            let err = b.adopt(&file).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
            assert!(b.lookup(LIN, LIN, 64, code.as_ptr()).is_none());
            assert!(b.compile(LIN, LIN, 64, code.as_ptr()).is_some());
        }
    }

    #[test]
    fn table_slots_past_the_saved_blocks_are_dropped() {
        use std::os::unix::fs::FileExt;
        let code = code();
        let (a, _) = compiled(2);
        // A slot naming a unit past the saved blocks: this process's own blocks go there.
        let slot = BlockCache::slot(LIN + 3 * 5);
        let past = (a.arena.used / BLOCK_ALIGN) as u32;
        let (file, _) = saved_and_gone(a, "slots");
        file.write_all_at(&past.to_le_bytes(), (FILE_HEADER + 4 * slot) as u64)
            .unwrap();
        let mut b = adopted(&file);
        assert_eq!(b.slots.get(slot), 0);
        // What goes there is compiled, not taken from the slot.
        let lin = LIN + 15;
        assert!(b.lookup(lin, lin, 64, code[15..].as_ptr()).is_none());
    }

    #[test]
    fn blocks_compiled_after_adopting_go_to_a_table_of_their_own_first() {
        let code = code();
        let (a, _) = compiled(2);
        let (file, _) = saved_and_gone(a, "fresh");
        let mut b = adopted(&file);
        let table: Vec<u32> = (0..SLOTS).map(|i| b.slots.get(i)).collect();
        let mut placed = 0;
        for k in 2..40 {
            let lin = LIN + 3 * k as u64;
            let new = compile(&mut b, &code, k, lin);
            assert!(!b.arena.is_shared(new));
            assert_eq!(b.lookup(lin, lin, 64, code[3 * k..].as_ptr()), Some(new));
            let f = BlockCache::fresh_slot(BlockCache::slot(lin));
            placed += usize::from(b.fresh[f] == b.arena.slot_of(new));
        }
        // Those whose fresh slot was free did not touch the shared table.
        let changed = (0..SLOTS).filter(|&i| b.slots.get(i) != table[i]).count();
        assert_eq!(changed, 38 - placed);
        assert!(placed > 30, "{placed} of 38 in the fresh table");
        // A snapshot of the clone saves them in the table.
        let (again, _) = saved_and_gone(b, "fresh-again");
        let mut c = adopted(&again);
        for k in 0..40 {
            let lin = LIN + 3 * k as u64;
            let found = c
                .lookup(lin, lin, 64, code[3 * k..].as_ptr())
                .expect("saved");
            assert!(c.arena.is_shared(found));
        }
    }

    #[test]
    fn a_full_arena_after_adopting_starts_again_with_private_memory() {
        let code = code();
        let mut a = BlockCache::with_arena(3 * PAGE);
        for k in 0..10 {
            compile(&mut a, &code, k, LIN + 3 * k as u64);
        }
        let (file, _) = saved_and_gone(a, "full");
        let mut b = BlockCache::with_arena(3 * PAGE);
        b.adopt(&file).unwrap();
        let mut k = 10;
        while b.flushes == 0 {
            compile(&mut b, &code, k, LIN + 3 * k as u64);
            k += 1;
        }
        assert_eq!(b.arena.shared, 0);
        assert!(b.lookup(LIN, LIN, 64, code.as_ptr()).is_none());
        let again = compile(&mut b, &code, 0, LIN);
        assert!(!b.arena.is_shared(again));
    }
}
