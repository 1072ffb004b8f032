//! Shared pieces of the emulator fuzz targets: a [`FlatCpu`] fenced by inaccessible guard
//! mappings, the input format of `emu_exec`, and the two ways of running the same input that
//! `emu_exec` compares.
//!
//! Everything here is test scaffolding; it never changes how the emulator runs code.
//! [`virtio_kit`] holds the same kind of scaffolding for the virtio targets; [`alloc_count`]
//! (an allocator that measures how much memory the code under test asks for) serves the
//! parser targets.

use std::fmt::Write as _;

pub mod alloc_count;
pub mod virtio_kit;

use emu::cpu::state::flags;
use emu::cpu::RunExit;
use emu::testkit::{FlatCpu, Regs, DEFAULT_RAM};

/// Where the code under test is loaded.
pub const CODE: u64 = 0x10_0000;
/// The default stack pointer.
pub const STACK_TOP: u64 = 0x20_0000;
/// Registers flagged as pointers are folded into `[PTR_BASE, PTR_BASE + PTR_SPAN)`: the code,
/// the stack and some free RAM, so loads and stores mostly hit RAM (and sometimes the code).
pub const PTR_BASE: u64 = 0x10_0000;
pub const PTR_SPAN: u64 = 0x30_0000;
/// Bytes of `emu_exec` input that choose the initial state; the rest is code.
pub const HEADER: usize = 136;
/// Most code bytes loaded.
pub const MAX_CODE: usize = 64 << 10;

/// Size of each inaccessible mapping placed right below and right above guest RAM.
const GUARD: usize = 1 << 20;

/// A [`FlatCpu`] whose RAM mapping is, where the host allows it, directly preceded and
/// followed by `PROT_NONE` mappings: a host access that runs off either end of guest RAM
/// faults (SIGSEGV, which libFuzzer reports as a crash) instead of silently reading or
/// corrupting whatever the host had mapped there.
pub struct GuardedCpu {
    pub c: FlatCpu,
    guards: [Option<usize>; 2],
}

impl GuardedCpu {
    pub fn new() -> GuardedCpu {
        let len = DEFAULT_RAM;
        // The kernel places anonymous mappings top-down in the highest gap that fits. Reserve
        // RAM + 2 guards, then free all but the top guard: FlatCpu's RAM mapping (the first
        // thing `FlatCpu::new` maps) then lands right below that guard. Checked below; if
        // something else got there first, fall back to guarding whatever gap is free.
        let total = len + 2 * GUARD;
        let res = map_none(std::ptr::null_mut(), total, 0);
        let mut top = None;
        if let Some(a) = res {
            unmap(a, len + GUARD);
            top = Some(a + len + GUARD);
        }
        let c = FlatCpu::new();
        let region = c.cpu.mem.regions()[0];
        assert_eq!(region.gpa, 0);
        assert_eq!(region.len, len as u64);
        let base = region.host as usize;
        let hi = match top {
            Some(t) if t == base + len => Some(t),
            Some(t) => {
                unmap(t, GUARD);
                map_none(
                    (base + len) as *mut libc::c_void,
                    GUARD,
                    libc::MAP_FIXED_NOREPLACE,
                )
            }
            None => map_none(
                (base + len) as *mut libc::c_void,
                GUARD,
                libc::MAP_FIXED_NOREPLACE,
            ),
        };
        let lo = base
            .checked_sub(GUARD)
            .and_then(|l| map_none(l as *mut libc::c_void, GUARD, libc::MAP_FIXED_NOREPLACE));
        let g = GuardedCpu {
            c,
            guards: [lo, hi],
        };
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            eprintln!(
                "ferrovisor-fuzz: guest RAM at {base:#x}, guard below: {}, guard above: {}",
                lo.is_some(),
                hi.is_some()
            )
        });
        static PARTLY: std::sync::Once = std::sync::Once::new();
        if !g.fully_guarded() {
            PARTLY.call_once(|| {
                eprintln!("ferrovisor-fuzz: note: a guest RAM mapping could not be fully guarded")
            });
        }
        g
    }

    /// Whether both guards are in place.
    pub fn fully_guarded(&self) -> bool {
        self.guards.iter().all(Option::is_some)
    }
}

impl Default for GuardedCpu {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for GuardedCpu {
    fn drop(&mut self) {
        for g in self.guards.iter().flatten() {
            unmap(*g, GUARD);
        }
    }
}

/// Maps `len` bytes of `PROT_NONE` at `at` (a hint unless `extra` says fixed); the address,
/// if the mapping was made exactly where asked.
fn map_none(at: *mut libc::c_void, len: usize, extra: libc::c_int) -> Option<usize> {
    // SAFETY: an anonymous PROT_NONE mapping; with MAP_FIXED_NOREPLACE the kernel refuses
    // rather than replace an existing mapping, so no memory in use is affected.
    let p = unsafe {
        libc::mmap(
            at,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | extra,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    if !at.is_null() && p != at {
        // An old kernel that took MAP_FIXED_NOREPLACE as a hint.
        unmap(p as usize, len);
        return None;
    }
    Some(p as usize)
}

fn unmap(at: usize, len: usize) {
    // SAFETY: only ever called on mappings made by `map_none`.
    unsafe { libc::munmap(at as *mut libc::c_void, len) };
}

/// The initial state an `emu_exec` input asks for.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub regs: Regs,
    pub user: bool,
}

/// Splits an `emu_exec` input into the initial state and the code. Layout (a shorter input is
/// zero-padded):
///
/// | bytes    | meaning                                                                  |
/// |----------|--------------------------------------------------------------------------|
/// | 0..128   | RAX..R15, little-endian u64 each                                         |
/// | 128..132 | RFLAGS (u32 LE), masked to the bits software can set (`flags::WRITABLE`) |
/// | 132      | bit 0: run at CPL 3; bit 1: RSP taken raw (else 0x20_0000 or a pointer)  |
/// | 133..135 | u16 LE: bit i set = GPR i becomes a RAM pointer (see [`PTR_BASE`])       |
/// | 135      | reserved                                                                 |
/// | 136..    | code, loaded at 0x10_0000 (at most [`MAX_CODE`] bytes)                   |
pub fn parse(data: &[u8]) -> (Setup, &[u8]) {
    let mut h = [0u8; HEADER];
    let n = data.len().min(HEADER);
    h[..n].copy_from_slice(&data[..n]);
    let code = &data[n..data.len().min(HEADER + MAX_CODE)];

    let mode = h[132];
    let ptr_mask = u16::from_le_bytes([h[133], h[134]]);
    let mut regs = Regs::default();
    for (i, g) in regs.gpr.iter_mut().enumerate() {
        let v = u64::from_le_bytes(h[8 * i..8 * i + 8].try_into().unwrap());
        *g = if ptr_mask & (1 << i) != 0 {
            PTR_BASE + v % PTR_SPAN
        } else {
            v
        };
    }
    if mode & 2 == 0 && ptr_mask & (1 << 4) == 0 {
        regs.gpr[4] = STACK_TOP;
    }
    regs.rip = CODE;
    let rf = u64::from(u32::from_le_bytes(h[128..132].try_into().unwrap()));
    regs.rflags = (rf & flags::WRITABLE) | flags::FIXED1;
    (
        Setup {
            regs,
            user: mode & 1 != 0,
        },
        code,
    )
}

/// A fresh guarded CPU in the state `setup` describes, with `code` at [`CODE`].
pub fn prepare(setup: &Setup, code: &[u8]) -> GuardedCpu {
    let mut g = GuardedCpu::new();
    g.c.load_code(CODE, code);
    g.c.set_regs(&setup.regs);
    g.c.set_user_mode(setup.user);
    g
}

/// Whether a `RunExit` ends the harness's run: everything but the budget running out needs
/// the VMM (an I/O exit, which this harness does not complete), or can never change again
/// without an interrupt (HLT), or is final (shutdown, fetch from non-RAM).
pub fn is_final(e: RunExit) -> bool {
    !matches!(e, RunExit::Budget)
}

/// Runs `n` instructions as one `step(n)`: block execution.
pub fn run_blocks(g: &mut GuardedCpu, n: u64) -> RunExit {
    g.c.step(n)
}

/// Runs `n` instructions as `n` calls of `step(1)`, stopping at the first exit other than
/// the budget running out (which `step(n)` would also stop at).
pub fn run_single(g: &mut GuardedCpu, n: u64) -> RunExit {
    let mut last = RunExit::Budget;
    for _ in 0..n {
        last = g.c.step(1);
        if is_final(last) {
            break;
        }
    }
    last
}

/// What `emu_exec` compares at the end of a run.
pub struct Outcome {
    pub regs: Regs,
    pub exit: RunExit,
    pub icount: u64,
    pub halted: bool,
    /// Every architectural register (segments, control registers, MSRs, x87/SSE), printed.
    pub state: String,
}

pub fn outcome(g: &GuardedCpu, exit: RunExit) -> Outcome {
    Outcome {
        regs: g.c.regs(),
        exit,
        icount: g.c.cpu.icount,
        halted: g.c.cpu.halted,
        state: format!("{:?}", g.c.cpu.s),
    }
}

/// The first difference between the two runs' end states, if any: registers first (the
/// property the target exists for), then the rest of the architectural state, then guest RAM.
pub fn difference(a: &GuardedCpu, oa: &Outcome, b: &GuardedCpu, ob: &Outcome) -> Option<String> {
    if oa.regs != ob.regs {
        return Some(format!(
            "registers differ:\n{}",
            regs_diff(&oa.regs, &ob.regs)
        ));
    }
    if oa.exit != ob.exit || oa.icount != ob.icount || oa.halted != ob.halted {
        return Some(format!(
            "run ends differ: blocks {:?} icount {} halted {} / single-step {:?} icount {} halted {}",
            oa.exit, oa.icount, oa.halted, ob.exit, ob.icount, ob.halted
        ));
    }
    if oa.state != ob.state {
        return Some(format!(
            "architectural state differs:\nblocks:      {}\nsingle-step: {}",
            oa.state, ob.state
        ));
    }
    ram_difference(a, b)
}

fn regs_diff(a: &Regs, b: &Regs) -> String {
    const NAMES: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    let mut s = String::new();
    for ((name, x), y) in NAMES.iter().zip(a.gpr).zip(b.gpr) {
        if x != y {
            let _ = writeln!(s, "  {name:4} blocks {x:#018x} single-step {y:#018x}");
        }
    }
    if a.rip != b.rip {
        let _ = writeln!(
            s,
            "  rip  blocks {:#018x} single-step {:#018x}",
            a.rip, b.rip
        );
    }
    if a.rflags != b.rflags {
        let _ = writeln!(
            s,
            "  rflags blocks {:#x} single-step {:#x} (xor {:#x})",
            a.rflags,
            b.rflags,
            a.rflags ^ b.rflags
        );
    }
    s
}

/// Compares the RAM pages either CPU has touched (resident in its mapping, per mincore):
/// untouched pages of both are still zero.
fn ram_difference(a: &GuardedCpu, b: &GuardedCpu) -> Option<String> {
    let (ra, rb) = (a.c.cpu.mem.regions()[0], b.c.cpu.mem.regions()[0]);
    let pages = (ra.len as usize) / 4096;
    let (va, vb) = (resident(ra.host, pages), resident(rb.host, pages));
    // Eight pages at a time: a byte loop here would be thousands of instrumented compares.
    let word = |v: &[u8], i: usize| u64::from_ne_bytes(v[i..i + 8].try_into().unwrap());
    let touched = (0..pages / 8)
        .filter(|&w| (word(&va, 8 * w) | word(&vb, 8 * w)) & 0x0101_0101_0101_0101 != 0)
        .flat_map(|w| 8 * w..8 * w + 8);
    for p in touched {
        let addr = (p * 4096) as u64;
        let (x, y) = (a.c.read(addr, 4096), b.c.read(addr, 4096));
        if x != y {
            let off = x.iter().zip(&y).position(|(p, q)| p != q).unwrap();
            let end = (off + 16).min(4096);
            return Some(format!(
                "guest RAM differs at {:#x}: blocks {:02x?} single-step {:02x?}",
                addr + off as u64,
                &x[off..end],
                &y[off..end]
            ));
        }
    }
    None
}

fn resident(host: *mut u8, pages: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages];
    // SAFETY: `host` is the start of a mapping of `pages` pages; mincore only reports.
    let r = unsafe { libc::mincore(host.cast(), pages * 4096, v.as_mut_ptr()) };
    if r != 0 {
        // Cannot tell: compare everything.
        v.fill(1);
    }
    v
}

/// The code disassembled from [`CODE`], for reports.
pub fn disassemble(code: &[u8], max: usize) -> String {
    use iced_x86::{Decoder, DecoderOptions, FastFormatter};
    let mut d = Decoder::with_ip(64, code, CODE, DecoderOptions::NONE);
    let mut f = FastFormatter::new();
    let mut out = String::new();
    for insn in d.iter().take(max) {
        let mut t = String::new();
        f.format(&insn, &mut t);
        let start = (insn.ip() - CODE) as usize;
        let bytes = &code[start..start + insn.len()];
        let _ = writeln!(out, "  {:#x}: {:<30} {}", insn.ip(), hex(bytes), t);
    }
    out
}

pub fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Bytes after the start of an instruction that a block compiled there can cover (the
/// block's byte limit plus one instruction).
const BLOCK_REACH: u64 = 192 + 15;

/// Whether, within its first `n` single steps, the code stores into bytes it then may run
/// from a compiled block: some byte within [`BLOCK_REACH`] after an instruction it executed
/// changed during the run. A block is compiled from the bytes in memory when it is entered;
/// if one of its instructions rewrites a later one and the block runs on, it executes the old
/// bytes where a CPU (and single-stepping) executes the new ones. The emulator used to do
/// that (fixed in a377778: a store into the running block's code now ends the block); this
/// classifies a mismatch as involving such code. Returns the first such address and how many
/// single steps had run when it changed (the store is the last of them).
pub fn self_modifying(setup: &Setup, code: &[u8], n: u64) -> Option<(u64, u64)> {
    use std::collections::BTreeMap;
    let mut g = prepare(setup, code);
    let ram = g.c.ram_size();
    // The content of each page code ran from, when it first ran from it.
    let mut pages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut rips = Vec::new();
    for step in 1..=n {
        let rip = g.c.regs().rip;
        // Linear = physical here, unless the code rewrote the page tables: then this is only
        // a guess, which is fine for a classification.
        let first = rip & !0xfff;
        let last = rip.saturating_add(BLOCK_REACH) & !0xfff;
        for p in (first..=last).step_by(0x1000) {
            if p < ram {
                pages.entry(p).or_insert_with(|| g.c.read(p, 0x1000));
            }
        }
        rips.push(rip);
        let exit = g.c.step(1);
        // Checked after every instruction: a byte may be changed and changed back.
        for (p, before) in &pages {
            let now = g.c.read(*p, 0x1000);
            if now == *before {
                continue;
            }
            for (i, (x, y)) in before.iter().zip(&now).enumerate() {
                let a = p + i as u64;
                if x != y && rips.iter().any(|r| a >= *r && a - r < BLOCK_REACH) {
                    return Some((a, step));
                }
            }
        }
        if is_final(exit) {
            break;
        }
    }
    None
}

/// Mismatch classes named in `EMU_FUZZ_SKIP` (comma-separated; only `smc` exists), whose
/// mismatches are not reported, to look past a known issue; by default every one is.
pub fn skipping(class: &str) -> bool {
    std::env::var("EMU_FUZZ_SKIP")
        .map(|v| v.split(',').any(|c| c.trim() == class))
        .unwrap_or(false)
}

/// Prints, to stderr, every instruction of a single-stepped run of `n` instructions with the
/// registers after it, then the end states of both ways of running (EMU_FUZZ_TRACE=1 when
/// replaying an input).
pub fn trace(setup: &Setup, code: &[u8], n: u64) {
    eprintln!("initial: {setup:x?}\ncode:\n{}", disassemble(code, 80));
    let mut b = prepare(setup, code);
    let mut last = RunExit::Budget;
    for i in 0..n {
        let rip = b.c.regs().rip;
        let bytes = b.c.read(rip.min(b.c.ram_size() - 16), 16);
        last = b.c.step(1);
        let r = b.c.regs();
        eprintln!(
            "step {:2} at {rip:#x} [{}] -> {last:?} rip {:#x} rflags {:#x} icount {}\n        gpr {:x?}",
            i + 1,
            hex(&bytes[..10]),
            r.rip,
            r.rflags,
            b.c.cpu.icount,
            r.gpr
        );
        if is_final(last) {
            break;
        }
    }
    let mut a = prepare(setup, code);
    let ea = run_blocks(&mut a, n);
    eprintln!(
        "blocks:      {:x?} exit {ea:?} icount {}",
        a.c.regs(),
        a.c.cpu.icount
    );
    eprintln!(
        "single-step: {:x?} exit {last:?} icount {}",
        b.c.regs(),
        b.c.cpu.icount
    );
}
