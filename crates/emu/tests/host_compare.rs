//! Instruction-by-instruction comparison of the emulator with the host CPU.
//!
//! For every instruction form in the tables below, random input states (GPRs, status flags and
//! DF, XMM registers, a 4 KiB data page and a 4 KiB stack page) are generated from a seeded
//! PRNG. Each state is run
//!
//! * on the host, in user mode, in a forked child process: the instruction bytes sit in an
//!   RWX page between a generated prologue (load every GPR, RFLAGS and XMM register from a
//!   context block) and landing pads that record where execution continued and jump to an
//!   epilogue (store everything back). A fault (#DE from DIV, …) is caught by a signal handler
//!   on an alternate stack that records the signal and resumes at a recovery pad;
//! * in the emulator ([`emu::testkit::FlatCpu`]), from the same state at the same addresses.
//!
//! Then all 16 GPRs, RIP after the instruction, the status flags and DF (minus the flags the
//! SDM leaves undefined for the form), XMM0–15, the data page and the stack page are compared.
//!
//! Environment: `EMU_COMPARE_ITERATIONS` (default 200) states per form, `EMU_COMPARE_SEED`
//! (default fixed) to vary the states, `EMU_COMPARE_FILTER` (substring) to run only some forms,
//! `EMU_COMPARE_CPL3=1` to run the emulator side at CPL 3 instead of CPL 0.
//!
//! Known emulator bugs are listed in [`KNOWN_DIVERGENCES`]: they are reported but do not fail
//! the test; anything else that diverges fails it.
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::fmt::Write as _;

use emu::cpu::state::flags::{AF, CF, DF, IF, OF, PF, SF, ZF};
use emu::testkit::{FlatCpu, Regs};
use iced_x86::code_asm::*;
use iced_x86::{
    Code, Decoder, DecoderOptions, FastFormatter, Instruction, MemoryOperand, Register,
};

// ---------------------------------------------------------------------------------------------
// Known divergences: (form name, reason). Listed forms still run and print their mismatches,
// but do not fail the test. Remove an entry once the emulator is fixed (the test says so).
// ---------------------------------------------------------------------------------------------

const KNOWN_DIVERGENCES: &[(&str, &str)] = &[];

// ---------------------------------------------------------------------------------------------
// Fixed addresses, identical on the host (MAP_FIXED_NOREPLACE in the child) and in the guest.
// ---------------------------------------------------------------------------------------------

/// Prologue: loads the context and jumps to the instruction.
const PROLOGUE: u64 = 0x0200_0000;
/// Epilogue: stores the context and returns to Rust.
const EPILOGUE: u64 = PROLOGUE + 0x400;
/// Where the fault handler resumes: restores the host stack and returns.
const FAULT_PAD: u64 = PROLOGUE + 0x800;
/// The instruction under test, followed by the fall-through landing pad.
const INSN: u64 = PROLOGUE + 0x1000;
/// Branch target of Jcc/CALL/RET/JMP forms (reachable with rel8): a second landing pad.
const BRANCH: u64 = INSN + 0x70;
const CODE_SIZE: usize = 0x2000;
/// The data page memory operands point into.
const DATA: u64 = 0x0300_0000;
/// The stack page; RSP starts near its middle.
const STACK: u64 = 0x0300_2000;
const STACK_MID: u64 = STACK + 0x800;
/// The host-only context block.
const CTX: u64 = 0x0300_4000;
const PAGE: usize = 4096;

const STATUS_DF: u64 = CF | PF | AF | ZF | SF | OF | DF;

const RAX: usize = 0;
const RCX: usize = 1;
const RDX: usize = 2;
const RBX: usize = 3;
const RSP: usize = 4;
const RBP: usize = 5;
const RSI: usize = 6;
const RDI: usize = 7;
const R9: usize = 9;
const R10: usize = 10;
const R11: usize = 11;

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// The host context block at [`CTX`].
#[repr(C)]
struct Ctx {
    gpr_in: [u64; 16],
    flags_in: u64,
    xmm_in: [[u8; 16]; 16],
    gpr_out: [u64; 16],
    flags_out: u64,
    xmm_out: [[u8; 16]; 16],
    rip_out: u64,
    host_rsp: u64,
    signal: u64,
    fault_rip: u64,
}

fn ctx_field(off: usize) -> u64 {
    CTX + off as u64
}

// ---------------------------------------------------------------------------------------------
// PRNG.
// ---------------------------------------------------------------------------------------------

/// splitmix64: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 != 0
    }
    /// A value biased towards the edge cases of 8/16/32/64-bit arithmetic.
    fn val(&mut self) -> u64 {
        const EDGES: [u64; 16] = [
            0,
            1,
            2,
            u64::MAX,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            i64::MAX as u64,
            i64::MIN as u64,
            0x1_0000_0000,
        ];
        match self.below(10) {
            0..=3 => self.next(),
            4 => self.below(17),
            5 => self.below(17).wrapping_neg(),
            6 | 7 => {
                let e = EDGES[self.below(16) as usize];
                // Occasionally keep random high bits above the interesting low part.
                if self.bool() {
                    e
                } else {
                    let w = [8, 16, 32][self.below(3) as usize];
                    (self.next() << w) | (e & ((1u64 << w) - 1))
                }
            }
            8 => {
                // Sign-extended narrow value.
                let w = [8u32, 16, 32][self.below(3) as usize];
                let v = self.next() << (64 - w);
                ((v as i64) >> (64 - w)) as u64
            }
            _ => self.next() & ((1u64 << self.below(64)) - 1),
        }
    }
}

fn seed_of(name: &str) -> u64 {
    let base: u64 = std::env::var("EMU_COMPARE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    // FNV-1a of the name, so each form has its own reproducible stream.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ base;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// `EMU_COMPARE_CPL3=1` runs the emulator side at CPL 3 (as the host does) instead of CPL 0.
fn user_mode() -> bool {
    static USER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USER.get_or_init(|| std::env::var("EMU_COMPARE_CPL3").is_ok_and(|v| v == "1"))
}

fn iterations() -> usize {
    std::env::var("EMU_COMPARE_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

// ---------------------------------------------------------------------------------------------
// Cases and forms.
// ---------------------------------------------------------------------------------------------

/// One input state.
#[derive(Clone)]
struct Case {
    gpr: [u64; 16],
    rflags: u64,
    xmm: [[u8; 16]; 16],
    data: Vec<u8>,
    stack: Vec<u8>,
    /// The form's random immediate.
    imm: u64,
    /// Instruction bytes followed by the fall-through pad.
    code: Vec<u8>,
    insn_len: usize,
}

impl Case {
    fn page_mut(&mut self, addr: u64, len: usize) -> &mut [u8] {
        if (DATA..DATA + PAGE as u64).contains(&addr) && addr + len as u64 <= DATA + PAGE as u64 {
            let o = (addr - DATA) as usize;
            &mut self.data[o..o + len]
        } else if (STACK..STACK + PAGE as u64).contains(&addr)
            && addr + len as u64 <= STACK + PAGE as u64
        {
            let o = (addr - STACK) as usize;
            &mut self.stack[o..o + len]
        } else {
            panic!("setup touches {addr:#x}, outside the data and stack pages")
        }
    }
    fn poke(&mut self, addr: u64, v: u64, len: usize) {
        self.page_mut(addr, len)
            .copy_from_slice(&v.to_le_bytes()[..len]);
    }
    fn peek(&mut self, addr: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(self.page_mut(addr, len));
        u64::from_le_bytes(b)
    }
}

type AsmFn = Box<dyn Fn(&mut CodeAssembler, u64) -> Result<(), IcedError>>;
type SetupFn = Box<dyn Fn(&mut Case, &mut Rng)>;
type UndefFn = Box<dyn Fn(&Case) -> u64>;

/// One instruction form to compare.
struct Form {
    name: String,
    asm: AsmFn,
    /// Flags the SDM leaves undefined for this form (not compared).
    undef: u64,
    /// State-dependent undefined flags (shift counts).
    undef_dyn: Option<UndefFn>,
    /// RBX points into the data page (memory operand base).
    mem: bool,
    /// RSI/RDI point into the middle of the data page and RCX is small (string forms).
    strings: bool,
    setup: Vec<SetupFn>,
    imm: Box<dyn Fn(&mut Rng) -> u64>,
}

impl Form {
    fn new(
        name: impl Into<String>,
        asm: impl Fn(&mut CodeAssembler, u64) -> Result<(), IcedError> + 'static,
    ) -> Form {
        Form {
            name: name.into(),
            asm: Box::new(asm),
            undef: 0,
            undef_dyn: None,
            mem: false,
            strings: false,
            setup: Vec::new(),
            imm: Box::new(|r| r.val()),
        }
    }
    fn undef(mut self, f: u64) -> Form {
        self.undef |= f;
        self
    }
    fn undef_dyn(mut self, f: impl Fn(&Case) -> u64 + 'static) -> Form {
        self.undef_dyn = Some(Box::new(f));
        self
    }
    fn mem(mut self) -> Form {
        self.mem = true;
        self
    }
    fn strings(mut self) -> Form {
        self.strings = true;
        self
    }
    fn setup(mut self, f: impl Fn(&mut Case, &mut Rng) + 'static) -> Form {
        self.setup.push(Box::new(f));
        self
    }
    fn imm(mut self, f: impl Fn(&mut Rng) -> u64 + 'static) -> Form {
        self.imm = Box::new(f);
        self
    }

    /// Generates the state of iteration `i` (same seed, same states).
    fn gen_case(&self, rng: &mut Rng) -> Case {
        let mut c = Case {
            gpr: [0; 16],
            rflags: 2,
            xmm: [[0; 16]; 16],
            data: vec![0; PAGE],
            stack: vec![0; PAGE],
            imm: 0,
            code: Vec::new(),
            insn_len: 0,
        };
        for g in c.gpr.iter_mut() {
            *g = rng.val();
        }
        for x in c.xmm.iter_mut() {
            let a = rng.val().to_le_bytes();
            let b = rng.val().to_le_bytes();
            x[..8].copy_from_slice(&a);
            x[8..].copy_from_slice(&b);
        }
        for chunk in c.data.chunks_mut(8).chain(c.stack.chunks_mut(8)) {
            chunk.copy_from_slice(&rng.val().to_le_bytes());
        }
        c.rflags = 2 | (rng.next() & STATUS_DF);
        // Any alignment; pushes and pops stay inside the stack page.
        c.gpr[RSP] = STACK_MID - 0x100 + rng.below(0x200);
        if self.mem {
            c.gpr[RBX] = DATA + 0x80 + rng.below(0xe00);
        }
        if self.strings {
            c.gpr[RSI] = DATA + 0x200 + rng.below(0xc00);
            c.gpr[RDI] = DATA + 0x200 + rng.below(0xc00);
            c.gpr[RCX] = rng.below(12);
        }
        c.imm = (self.imm)(rng);
        for s in &self.setup {
            s(&mut c, rng);
        }
        c
    }

    /// Assembles the instruction at [`INSN`] and the fall-through pad after it.
    fn assemble(&self, c: &mut Case) {
        let mut a = CodeAssembler::new(64).unwrap();
        (self.asm)(&mut a, c.imm).unwrap_or_else(|e| panic!("{}: cannot assemble: {e}", self.name));
        let insn = a
            .assemble(INSN)
            .unwrap_or_else(|e| panic!("{}: cannot assemble: {e}", self.name));
        assert!(
            !insn.is_empty() && insn.len() <= 15,
            "{}: not one instruction",
            self.name
        );
        let mut d = Decoder::with_ip(64, &insn, INSN, DecoderOptions::NONE);
        let one = d.decode();
        assert!(
            one.len() == insn.len(),
            "{}: assembled more than one instruction",
            self.name
        );
        c.insn_len = insn.len();
        c.code = insn;
        c.code.extend(landing_pad(INSN + c.insn_len as u64));
        assert!(
            c.code.len() as u64 <= BRANCH - INSN,
            "{}: code overlaps the branch pad",
            self.name
        );
    }
}

/// `mov qword [ctx.rip_out], here; jmp EPILOGUE`, assembled at `here`.
fn landing_pad(here: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(
        qword_ptr(ctx_field(std::mem::offset_of!(Ctx, rip_out))),
        here as i32,
    )
    .unwrap();
    a.jmp(EPILOGUE).unwrap();
    a.assemble(here).unwrap()
}

/// The host code image at [`PROLOGUE`]: prologue, epilogue, fault pad, branch pad.
fn host_image() -> Vec<u8> {
    use std::mem::offset_of;
    let gprs = [
        rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
    ];
    let xmms = [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
        xmm14, xmm15,
    ];
    let callee_saved = [rbx, rbp, r12, r13, r14, r15];
    let mut img = vec![0xccu8; CODE_SIZE];
    let mut put = |addr: u64, bytes: Vec<u8>| {
        let o = (addr - PROLOGUE) as usize;
        img[o..o + bytes.len()].copy_from_slice(&bytes);
    };

    // Prologue.
    let mut a = CodeAssembler::new(64).unwrap();
    for r in callee_saved {
        a.push(r).unwrap();
    }
    a.mov(qword_ptr(ctx_field(offset_of!(Ctx, host_rsp))), rsp)
        .unwrap();
    a.push(qword_ptr(ctx_field(offset_of!(Ctx, flags_in))))
        .unwrap();
    a.popfq().unwrap();
    for (i, x) in xmms.iter().enumerate() {
        a.movdqu(*x, xmmword_ptr(ctx_field(offset_of!(Ctx, xmm_in) + 16 * i)))
            .unwrap();
    }
    for (i, r) in gprs.iter().enumerate() {
        if i != RSP {
            a.mov(*r, qword_ptr(ctx_field(offset_of!(Ctx, gpr_in) + 8 * i)))
                .unwrap();
        }
    }
    a.mov(rsp, qword_ptr(ctx_field(offset_of!(Ctx, gpr_in) + 8 * RSP)))
        .unwrap();
    a.jmp(INSN).unwrap();
    put(PROLOGUE, a.assemble(PROLOGUE).unwrap());

    // Epilogue.
    let mut a = CodeAssembler::new(64).unwrap();
    for (i, r) in gprs.iter().enumerate() {
        a.mov(qword_ptr(ctx_field(offset_of!(Ctx, gpr_out) + 8 * i)), *r)
            .unwrap();
    }
    for (i, x) in xmms.iter().enumerate() {
        a.movdqu(
            xmmword_ptr(ctx_field(offset_of!(Ctx, xmm_out) + 16 * i)),
            *x,
        )
        .unwrap();
    }
    a.mov(rsp, qword_ptr(ctx_field(offset_of!(Ctx, host_rsp))))
        .unwrap();
    a.pushfq().unwrap();
    a.pop(qword_ptr(ctx_field(offset_of!(Ctx, flags_out))))
        .unwrap();
    a.cld().unwrap();
    for r in callee_saved.iter().rev() {
        a.pop(*r).unwrap();
    }
    a.ret().unwrap();
    put(EPILOGUE, a.assemble(EPILOGUE).unwrap());

    // Fault recovery pad.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rsp, qword_ptr(ctx_field(offset_of!(Ctx, host_rsp))))
        .unwrap();
    a.cld().unwrap();
    for r in callee_saved.iter().rev() {
        a.pop(*r).unwrap();
    }
    a.ret().unwrap();
    put(FAULT_PAD, a.assemble(FAULT_PAD).unwrap());

    put(BRANCH, landing_pad(BRANCH));
    img
}

// ---------------------------------------------------------------------------------------------
// Host execution (child process).
// ---------------------------------------------------------------------------------------------

/// What one run produced, on either side.
#[derive(Clone)]
struct Outcome {
    gpr: [u64; 16],
    rflags: u64,
    rip: u64,
    xmm: [[u8; 16]; 16],
    data: Vec<u8>,
    stack: Vec<u8>,
    /// Host: the signal that stopped the instruction (0 if none). Emulator: the signal the
    /// exception would have produced on Linux.
    signal: u64,
    /// Emulator only: the exception vector, for messages.
    vector: Option<u8>,
}

/// The per-case record the child writes into shared memory.
#[repr(C)]
#[derive(Clone, Copy)]
struct HostOut {
    gpr: [u64; 16],
    rflags: u64,
    rip: u64,
    xmm: [[u8; 16]; 16],
    data: [u8; PAGE],
    stack: [u8; PAGE],
    signal: u64,
    fault_rip: u64,
}

extern "C" fn on_fault(sig: libc::c_int, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let ctx = CTX as *mut Ctx;
    // SAFETY: the kernel passes a valid ucontext; CTX is mapped in the child for as long as
    // the handler is installed.
    unsafe {
        let uc = &mut *(uc as *mut libc::ucontext_t);
        (*ctx).signal = sig as u64;
        (*ctx).fault_rip = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64;
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] = FAULT_PAD as i64;
    }
}

/// Maps `len` bytes at the fixed `addr`; false if the range is not free.
///
/// # Safety
/// Only in the child: it changes the address space.
unsafe fn map_fixed(addr: u64, len: usize, exec: bool) -> bool {
    let prot = libc::PROT_READ | libc::PROT_WRITE | if exec { libc::PROT_EXEC } else { 0 };
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    p as u64 == addr
}

/// The child's whole life. Runs no allocator and takes no locks (the parent is
/// multi-threaded), writes results to `out[i]` and `progress`, and exits.
///
/// # Safety
/// Only in a freshly forked child; `out` holds `cases.len()` records.
unsafe fn child_main(cases: &[Case], image: &[u8], out: *mut HostOut, progress: *mut u64) -> ! {
    // SAFETY: each step is a syscall or a copy into memory this function just mapped; see the
    // function's contract.
    unsafe {
        if !map_fixed(PROLOGUE, CODE_SIZE, true)
            || !map_fixed(DATA, PAGE, false)
            || !map_fixed(STACK, PAGE, false)
            || !map_fixed(CTX, PAGE, false)
        {
            libc::_exit(90);
        }
        std::ptr::copy_nonoverlapping(image.as_ptr(), PROLOGUE as *mut u8, image.len());
        let alt = libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if alt == libc::MAP_FAILED {
            libc::_exit(91);
        }
        let alt_stack = libc::stack_t {
            ss_sp: alt,
            ss_flags: 0,
            ss_size: 1 << 20,
        };
        if libc::sigaltstack(&alt_stack, std::ptr::null_mut()) != 0 {
            libc::_exit(92);
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_fault as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in [
            libc::SIGFPE,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGTRAP,
        ] {
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                libc::_exit(93);
            }
        }
        let ctx = CTX as *mut Ctx;
        let run: extern "sysv64" fn() =
            std::mem::transmute::<usize, extern "sysv64" fn()>(PROLOGUE as usize);
        for (i, c) in cases.iter().enumerate() {
            std::ptr::copy_nonoverlapping(c.code.as_ptr(), INSN as *mut u8, c.code.len());
            std::ptr::copy_nonoverlapping(c.data.as_ptr(), DATA as *mut u8, PAGE);
            std::ptr::copy_nonoverlapping(c.stack.as_ptr(), STACK as *mut u8, PAGE);
            (*ctx).gpr_in = c.gpr;
            (*ctx).flags_in = c.rflags;
            (*ctx).xmm_in = c.xmm;
            (*ctx).signal = 0;
            (*ctx).rip_out = 0;
            (*ctx).fault_rip = 0;
            run();
            let o = &mut *out.add(i);
            o.gpr = (*ctx).gpr_out;
            o.rflags = (*ctx).flags_out;
            o.rip = (*ctx).rip_out;
            o.xmm = (*ctx).xmm_out;
            o.signal = std::ptr::read_volatile(&(*ctx).signal);
            o.fault_rip = std::ptr::read_volatile(&(*ctx).fault_rip);
            std::ptr::copy_nonoverlapping(DATA as *const u8, o.data.as_mut_ptr(), PAGE);
            std::ptr::copy_nonoverlapping(STACK as *const u8, o.stack.as_mut_ptr(), PAGE);
            std::ptr::write_volatile(progress, i as u64 + 1);
        }
        libc::_exit(0);
    }
}

/// Runs all `cases` on the host in one forked child.
fn run_on_host(form: &str, cases: &[Case], image: &[u8]) -> Vec<Outcome> {
    let n = cases.len();
    let bytes = 8 + n * std::mem::size_of::<HostOut>();
    // SAFETY: a fresh shared anonymous mapping, unmapped below.
    let shm = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(shm != libc::MAP_FAILED, "mmap of the result area failed");
    let progress = shm as *mut u64;
    // SAFETY: the mapping is `bytes` long: 8 bytes of progress, then `n` records.
    let out = unsafe { (shm as *mut u8).add(8) } as *mut HostOut;
    // SAFETY: fork; the child only runs `child_main`, which never returns.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: this is the freshly forked child and `out` holds `n` records.
        unsafe { child_main(cases, image, out, progress) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid failed");
    // SAFETY: the child has exited; the progress word is ours to read.
    let done = unsafe { std::ptr::read_volatile(progress) } as usize;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let what = if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exited with {}", libc::WEXITSTATUS(status))
        };
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(shm, bytes) };
        panic!(
            "{form}: host child {what} after {done} of {n} cases (90: fixed addresses {PROLOGUE:#x}.. not free)"
        );
    }
    let res = (0..n)
        .map(|i| {
            // SAFETY: the child wrote all `n` records before exiting with 0.
            let o = unsafe { &*out.add(i) };
            Outcome {
                gpr: o.gpr,
                rflags: o.rflags,
                rip: o.rip,
                xmm: o.xmm,
                data: o.data.to_vec(),
                stack: o.stack.to_vec(),
                signal: o.signal,
                vector: None,
            }
        })
        .collect();
    // SAFETY: unmapping our own mapping; nothing refers to it any more.
    unsafe { libc::munmap(shm, bytes) };
    res
}

// ---------------------------------------------------------------------------------------------
// Emulator execution.
// ---------------------------------------------------------------------------------------------

/// The Linux signal an exception turns into in user mode.
fn signal_of(vector: u8) -> u64 {
    (match vector {
        0 | 16 | 19 => libc::SIGFPE,
        1 | 3 => libc::SIGTRAP,
        6 => libc::SIGILL,
        13 | 14 => libc::SIGSEGV,
        12 | 17 => libc::SIGBUS,
        v => 1000 + i32::from(v),
    }) as u64
}

fn run_on_emu(fc: &mut FlatCpu, c: &Case) -> Outcome {
    fc.write(INSN, &c.code);
    fc.write(DATA, &c.data);
    fc.write(STACK, &c.stack);
    for (i, x) in c.xmm.iter().enumerate() {
        fc.set_xmm(i, *x);
    }
    // Both privilege levels behave the same for these instructions; CPL 3 also exercises the
    // stack switch of exception delivery.
    fc.set_user_mode(user_mode());
    // The host runs with IF=1 (user mode); PUSHF must see the same.
    fc.set_regs(&Regs {
        gpr: c.gpr,
        rip: INSN,
        rflags: c.rflags | IF,
    });
    // A REP string instruction may take several runs; stop once RIP moves on.
    let mut vector = None;
    for _ in 0..1000 {
        fc.step(1);
        if let Some(e) = fc.exception() {
            vector = Some(e.vector);
            break;
        }
        if fc.regs().rip != INSN {
            break;
        }
    }
    let r = fc.regs();
    Outcome {
        gpr: r.gpr,
        rflags: r.rflags,
        rip: r.rip,
        xmm: std::array::from_fn(|i| fc.xmm(i)),
        data: fc.read(DATA, PAGE),
        stack: fc.read(STACK, PAGE),
        signal: vector.map_or(0, signal_of),
        vector,
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison and reporting.
// ---------------------------------------------------------------------------------------------

fn flag_names(f: u64) -> String {
    let mut s = String::new();
    for (bit, n) in [
        (CF, "CF"),
        (PF, "PF"),
        (AF, "AF"),
        (ZF, "ZF"),
        (SF, "SF"),
        (DF, "DF"),
        (OF, "OF"),
    ] {
        if f & bit != 0 {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(n);
        }
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

fn disasm(bytes: &[u8]) -> String {
    let mut d = Decoder::with_ip(64, bytes, INSN, DecoderOptions::NONE);
    let insn: Instruction = d.decode();
    let mut s = String::new();
    FastFormatter::new().format(&insn, &mut s);
    s
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn xmm_hex(x: &[u8; 16]) -> String {
    format!(
        "{:016x}{:016x}",
        u64::from_le_bytes(x[8..].try_into().unwrap()),
        u64::from_le_bytes(x[..8].try_into().unwrap())
    )
}

/// Differences between the host's (expected) and the emulator's (got) outcome, or empty.
fn diff(form: &Form, c: &Case, host: &Outcome, emu: &Outcome) -> String {
    let mut s = String::new();
    if host.signal != 0 || emu.signal != 0 {
        if host.signal != emu.signal {
            let _ = writeln!(
                s,
                "  fault: host signal {} vs emu {}",
                host.signal,
                emu.vector.map_or("no exception".to_string(), |v| format!(
                    "exception {v} (signal {})",
                    emu.signal
                ))
            );
        }
        return s;
    }
    for (i, name) in GPR_NAMES.iter().enumerate() {
        if host.gpr[i] != emu.gpr[i] {
            let _ = writeln!(
                s,
                "  {:>4}: expected {:#018x} got {:#018x}",
                name, host.gpr[i], emu.gpr[i]
            );
        }
    }
    if host.rip != emu.rip {
        let _ = writeln!(s, "   rip: expected {:#x} got {:#x}", host.rip, emu.rip);
    }
    let undef = form.undef | form.undef_dyn.as_ref().map_or(0, |f| f(c));
    let fd = (host.rflags ^ emu.rflags) & STATUS_DF & !undef;
    if fd != 0 {
        let _ = writeln!(
            s,
            "  flags: expected [{}] got [{}] (differ: {}; undefined: {})",
            flag_names(host.rflags & STATUS_DF),
            flag_names(emu.rflags & STATUS_DF),
            flag_names(fd),
            flag_names(undef)
        );
    }
    for i in 0..16 {
        if host.xmm[i] != emu.xmm[i] {
            let _ = writeln!(
                s,
                "  xmm{i}: expected {} got {}",
                xmm_hex(&host.xmm[i]),
                xmm_hex(&emu.xmm[i])
            );
        }
    }
    for (name, base, h, e) in [
        ("data", DATA, &host.data, &emu.data),
        ("stack", STACK, &host.stack, &emu.stack),
    ] {
        if h == e {
            continue;
        }
        let bad: Vec<usize> = (0..PAGE).filter(|&i| h[i] != e[i]).collect();
        if let (Some(&first), Some(&last)) = (bad.first(), bad.last()) {
            let (lo, hi) = (first & !7, (last | 7).min(PAGE - 1).min((first & !7) + 31));
            let _ = writeln!(
                s,
                "  {name} page: {} bytes differ in {:#x}..={:#x}; at {:#x}: expected {} got {}",
                bad.len(),
                base + first as u64,
                base + last as u64,
                base + lo as u64,
                hex(&h[lo..=hi]),
                hex(&e[lo..=hi])
            );
        }
    }
    s
}

fn describe_input(c: &Case, with_xmm: bool) -> String {
    let mut s = String::new();
    for (i, name) in GPR_NAMES.iter().enumerate() {
        let _ = write!(s, "  {:>4}={:#018x}", name, c.gpr[i]);
        if i % 4 == 3 {
            s.push('\n');
        }
    }
    let _ = writeln!(s, "  flags=[{}] imm={:#x}", flag_names(c.rflags), c.imm);
    if with_xmm {
        for i in 0..16 {
            let _ = write!(s, "  xmm{i}={}", xmm_hex(&c.xmm[i]));
            if i % 2 == 1 {
                s.push('\n');
            }
        }
    }
    s
}

/// Result of one form.
struct FormResult {
    name: String,
    failures: usize,
    host_faults: usize,
    report: String,
}

fn run_form(form: &Form, fc: &mut FlatCpu, image: &[u8], n: usize, sse: bool) -> FormResult {
    let mut rng = Rng(seed_of(&form.name));
    let cases: Vec<Case> = (0..n)
        .map(|_| {
            let mut c = form.gen_case(&mut rng);
            form.assemble(&mut c);
            c
        })
        .collect();
    let host = run_on_host(&form.name, &cases, image);
    let mut failures = 0;
    let mut host_faults = 0;
    let mut report = String::new();
    for (i, c) in cases.iter().enumerate() {
        if host[i].signal != 0 {
            host_faults += 1;
        }
        let emu = run_on_emu(fc, c);
        let d = diff(form, c, &host[i], &emu);
        if !d.is_empty() {
            failures += 1;
            if failures <= 3 {
                let bytes = &c.code[..c.insn_len];
                let _ = writeln!(
                    report,
                    "MISMATCH {} (case {i}): {}  [{}]\n input:\n{} diff (host = expected, emu = got):\n{}",
                    form.name,
                    disasm(bytes),
                    hex(bytes),
                    describe_input(c, sse),
                    d
                );
            }
        }
    }
    FormResult {
        name: form.name.clone(),
        failures,
        host_faults,
        report,
    }
}

/// Runs a group of forms and fails on any divergence not in [`KNOWN_DIVERGENCES`].
fn run_group(group: &str, forms: Vec<Form>, sse: bool) {
    let n = iterations();
    let filter = std::env::var("EMU_COMPARE_FILTER").ok();
    let image = host_image();
    let mut fc = FlatCpu::new();
    let mut unexpected = Vec::new();
    let mut passed = 0;
    let mut names = std::collections::HashSet::new();
    for form in &forms {
        assert!(
            names.insert(form.name.clone()),
            "duplicate form name {}",
            form.name
        );
        if filter
            .as_ref()
            .is_some_and(|f| !form.name.contains(f.as_str()))
        {
            continue;
        }
        let r = run_form(form, &mut fc, &image, n, sse);
        let known = KNOWN_DIVERGENCES.iter().find(|(k, _)| *k == r.name);
        match (r.failures, known) {
            (0, None) => passed += 1,
            (0, Some(_)) => {
                passed += 1;
                println!(
                    "NOTE {}: listed in KNOWN_DIVERGENCES but now matches the host; remove it",
                    r.name
                );
            }
            (f, Some((_, why))) => {
                println!(
                    "KNOWN DIVERGENCE {} ({f}/{n} cases): {why}\n{}",
                    r.name, r.report
                );
            }
            (f, None) => {
                println!("{}", r.report);
                unexpected.push(format!("{} ({f}/{n})", r.name));
            }
        }
        if r.host_faults == n && n > 0 {
            println!("note {}: every case faulted on the host", r.name);
        }
    }
    println!("{group}: {passed} forms match the host over {n} random states each");
    assert!(
        unexpected.is_empty(),
        "{group}: {} forms diverge from the host CPU: {}",
        unexpected.len(),
        unexpected.join(", ")
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers for the tables.
// ---------------------------------------------------------------------------------------------

/// An imm32 that does not fit imm8 (forces the imm32 encoding).
fn wide32(imm: u64) -> i32 {
    let v = imm as i32;
    if i32::from(v as i8) == v {
        v ^ 0x4000_1000
    } else {
        v
    }
}

/// Copies the low `len` bytes of register `reg` to [rbx+disp] (so memory and register
/// operands can be made equal).
fn reg_to_mem(c: &mut Case, reg: usize, disp: i64, len: usize) {
    let a = c.gpr[RBX].wrapping_add(disp as u64);
    c.poke(a, c.gpr[reg], len);
}

fn mask(bits: u32) -> u64 {
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

// ---------------------------------------------------------------------------------------------
// Tables.
// ---------------------------------------------------------------------------------------------

macro_rules! alu_forms {
    ($v:ident, $op:ident, $undef:expr, lock: $lock:tt) => {{
        let n = stringify!($op);
        let u: u64 = $undef;
        $v.push(Form::new(format!("{n} r8,r8"), |a, _| a.$op(r9b, r10b)).undef(u));
        $v.push(Form::new(format!("{n} r8,sil"), |a, _| a.$op(dil, sil)).undef(u));
        $v.push(Form::new(format!("{n} r16,r16"), |a, _| a.$op(r9w, r10w)).undef(u));
        $v.push(Form::new(format!("{n} r32,r32"), |a, _| a.$op(r9d, r10d)).undef(u));
        $v.push(Form::new(format!("{n} r64,r64"), |a, _| a.$op(r9, r10)).undef(u));
        $v.push(Form::new(format!("{n} r64,same"), |a, _| a.$op(rdx, rdx)).undef(u));
        $v.push(Form::new(format!("{n} m8,r8"), |a, _| a.$op(byte_ptr(rbx + 1), r10b)).undef(u).mem());
        $v.push(Form::new(format!("{n} r8,m8"), |a, _| a.$op(r10b, byte_ptr(rbx - 3))).undef(u).mem());
        $v.push(Form::new(format!("{n} m16,r16"), |a, _| a.$op(word_ptr(rbx + 0x11), cx)).undef(u).mem());
        $v.push(Form::new(format!("{n} r16,m16"), |a, _| a.$op(cx, word_ptr(rbx))).undef(u).mem());
        $v.push(Form::new(format!("{n} m32,r32"), |a, _| a.$op(dword_ptr(rbx), r11d)).undef(u).mem());
        $v.push(Form::new(format!("{n} r32,m32"), |a, _| a.$op(r11d, dword_ptr(rbx + 0x7f))).undef(u).mem());
        $v.push(Form::new(format!("{n} m64,r64"), |a, _| a.$op(qword_ptr(rbx - 0x40), r12)).undef(u).mem());
        $v.push(Form::new(format!("{n} r64,m64"), |a, _| a.$op(r12, qword_ptr(rbx + 0x28))).undef(u).mem());
        $v.push(Form::new(format!("{n} r8,imm8"), |a, i| a.$op(r9b, i as i8 as i32)).undef(u));
        $v.push(Form::new(format!("{n} r16,imm16"), |a, i| a.$op(r9w, i as i16 as i32 | 0x100)).undef(u));
        $v.push(Form::new(format!("{n} r32,imm32"), |a, i| a.$op(r9d, wide32(i))).undef(u));
        $v.push(Form::new(format!("{n} r64,imm32"), |a, i| a.$op(r9, wide32(i))).undef(u));
        $v.push(Form::new(format!("{n} r16,imm8sx"), |a, i| a.$op(bp, i as i8 as i32)).undef(u));
        $v.push(Form::new(format!("{n} r32,imm8sx"), |a, i| a.$op(ebp, i as i8 as i32)).undef(u));
        $v.push(Form::new(format!("{n} r64,imm8sx"), |a, i| a.$op(r14, i as i8 as i32)).undef(u));
        $v.push(Form::new(format!("{n} al,imm8"), |a, i| a.$op(al, i as i8 as i32)).undef(u));
        $v.push(Form::new(format!("{n} ax,imm16"), |a, i| a.$op(ax, i as i16 as i32 | 0x100)).undef(u));
        $v.push(Form::new(format!("{n} eax,imm32"), |a, i| a.$op(eax, wide32(i))).undef(u));
        $v.push(Form::new(format!("{n} rax,imm32"), |a, i| a.$op(rax, wide32(i))).undef(u));
        $v.push(Form::new(format!("{n} m8,imm8"), |a, i| a.$op(byte_ptr(rbx + 5), i as i8 as i32)).undef(u).mem());
        $v.push(Form::new(format!("{n} m32,imm8sx"), |a, i| a.$op(dword_ptr(rbx), i as i8 as i32)).undef(u).mem());
        $v.push(Form::new(format!("{n} m64,imm32"), |a, i| a.$op(qword_ptr(rbx + 8), wide32(i))).undef(u).mem());
        $v.push(Form::new(format!("{n} ah,ch"), |a, _| a.$op(ah, ch)).undef(u));
        $v.push(Form::new(format!("{n} bh,dh"), |a, _| a.$op(bh, dh)).undef(u));
        $v.push(Form::new(format!("{n} dh,m8"), |a, _| a.$op(dh, byte_ptr(rbx + 2))).undef(u).mem());
        $v.push(Form::new(format!("{n} m32 addr32"), |a, _| a.$op(dword_ptr(ebx + 8), ecx)).undef(u).setup(|c, r| {
            c.gpr[RBX] = (r.next() << 32) | (DATA + 0x80 + r.below(0xe00));
        }));
        alu_forms!(@lock $v, $op, n, u, $lock);
    }};
    (@lock $v:ident, $op:ident, $n:ident, $u:ident, true) => {
        $v.push(Form::new(format!("lock {} m64,r64", $n), |a, _| a.lock().$op(qword_ptr(rbx), r10)).undef($u).mem());
        $v.push(Form::new(format!("lock {} m8,imm8", $n), |a, i| a.lock().$op(byte_ptr(rbx + 3), i as i8 as i32)).undef($u).mem());
        $v.push(Form::new(format!("lock {} m16,r16 unaligned", $n), |a, _| a.lock().$op(word_ptr(rbx + 1), r10w)).undef($u).mem());
    };
    (@lock $v:ident, $op:ident, $n:ident, $u:ident, false) => {};
}

fn alu_table() -> Vec<Form> {
    let mut v = Vec::new();
    alu_forms!(v, add, 0, lock: true);
    alu_forms!(v, adc, 0, lock: true);
    alu_forms!(v, sub, 0, lock: true);
    alu_forms!(v, sbb, 0, lock: true);
    alu_forms!(v, and, AF, lock: true);
    alu_forms!(v, or, AF, lock: true);
    alu_forms!(v, xor, AF, lock: true);
    alu_forms!(v, cmp, 0, lock: false);
    v.push(Form::new("test r8,r8", |a, _| a.test(r9b, r10b)).undef(AF));
    v.push(Form::new("test r16,r16", |a, _| a.test(r9w, r10w)).undef(AF));
    v.push(Form::new("test r32,r32", |a, _| a.test(r9d, r10d)).undef(AF));
    v.push(Form::new("test r64,r64", |a, _| a.test(r9, r10)).undef(AF));
    v.push(
        Form::new("test m8,r8", |a, _| a.test(byte_ptr(rbx), r9b))
            .undef(AF)
            .mem(),
    );
    v.push(
        Form::new("test m64,r64", |a, _| a.test(qword_ptr(rbx + 8), r9))
            .undef(AF)
            .mem(),
    );
    v.push(Form::new("test r8,imm8", |a, i| a.test(r9b, i as i8 as i32)).undef(AF));
    v.push(Form::new("test r16,imm16", |a, i| a.test(r9w, i as i16 as i32)).undef(AF));
    v.push(Form::new("test r32,imm32", |a, i| a.test(r9d, i as i32)).undef(AF));
    v.push(Form::new("test r64,imm32", |a, i| a.test(r9, i as i32)).undef(AF));
    v.push(Form::new("test al,imm8", |a, i| a.test(al, i as i8 as i32)).undef(AF));
    v.push(Form::new("test rax,imm32", |a, i| a.test(rax, i as i32)).undef(AF));
    v.push(
        Form::new("test m32,imm32", |a, i| a.test(dword_ptr(rbx), i as i32))
            .undef(AF)
            .mem(),
    );
    v.push(Form::new("test ah,bh", |a, _| a.test(ah, bh)).undef(AF));
    v
}

fn unary_table() -> Vec<Form> {
    let mut v = Vec::new();
    macro_rules! unary {
        ($op:ident) => {{
            let n = stringify!($op);
            v.push(Form::new(format!("{n} r8"), |a, _| a.$op(r9b)));
            v.push(Form::new(format!("{n} r16"), |a, _| a.$op(r9w)));
            v.push(Form::new(format!("{n} r32"), |a, _| a.$op(r9d)));
            v.push(Form::new(format!("{n} r64"), |a, _| a.$op(r9)));
            v.push(Form::new(format!("{n} ah"), |a, _| a.$op(ah)));
            v.push(Form::new(format!("{n} bh"), |a, _| a.$op(bh)));
            v.push(Form::new(format!("{n} m8"), |a, _| a.$op(byte_ptr(rbx + 1))).mem());
            v.push(Form::new(format!("{n} m16"), |a, _| a.$op(word_ptr(rbx))).mem());
            v.push(Form::new(format!("{n} m32"), |a, _| a.$op(dword_ptr(rbx + 4))).mem());
            v.push(Form::new(format!("{n} m64"), |a, _| a.$op(qword_ptr(rbx - 8))).mem());
            v.push(Form::new(format!("lock {n} m64"), |a, _| a.lock().$op(qword_ptr(rbx))).mem());
            v.push(
                Form::new(format!("lock {n} m8"), |a, _| {
                    a.lock().$op(byte_ptr(rbx + 7))
                })
                .mem(),
            );
        }};
    }
    unary!(inc);
    unary!(dec);
    unary!(neg);
    unary!(not);
    v
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sh {
    Rol,
    Ror,
    Rcl,
    Rcr,
    Shl,
    Shr,
    Sar,
    Shld,
    Shrd,
}

#[derive(Clone, Copy)]
enum Cnt {
    One,
    Imm,
    Cl,
}

/// Flags the SDM leaves undefined for a shift/rotate of `bits` with raw count `count`.
fn shift_undef(kind: Sh, bits: u32, count: u64) -> u64 {
    let masked = count & if bits == 64 { 0x3f } else { 0x1f };
    if masked == 0 {
        return 0;
    }
    let of = if masked == 1 { 0 } else { OF };
    match kind {
        Sh::Shl | Sh::Shr => AF | of | if masked >= u64::from(bits) { CF } else { 0 },
        Sh::Sar | Sh::Shld | Sh::Shrd => AF | of,
        Sh::Rol | Sh::Ror | Sh::Rcl | Sh::Rcr => of,
    }
}

fn count_of(c: &Case, cnt: Cnt) -> u64 {
    match cnt {
        Cnt::One => 1,
        Cnt::Imm => c.imm & 0xff,
        Cnt::Cl => c.gpr[RCX] & 0xff,
    }
}

/// A count biased towards small values and the interesting boundaries.
fn shift_count(r: &mut Rng) -> u64 {
    match r.below(4) {
        0 => r.below(256),
        1 => r.below(3),
        _ => r.below(66),
    }
}

fn shift_table() -> Vec<Form> {
    let mut v = Vec::new();
    macro_rules! shifts {
        ($kind:expr, $op:ident) => {{
            let n = stringify!($op);
            let k: Sh = $kind;
            macro_rules! one {
                ($name:expr, $bits:expr, $cnt:expr, $asm:expr, $mem:expr) => {{
                    let cnt: Cnt = $cnt;
                    let mut f = Form::new(format!("{n} {}", $name), $asm)
                        .undef_dyn(move |c| shift_undef(k, $bits, count_of(c, cnt)))
                        .imm(shift_count);
                    if let Cnt::Cl = cnt {
                        f = f.setup(|c, r| c.gpr[RCX] = (c.gpr[RCX] & !0xff) | shift_count(r));
                    }
                    if $mem {
                        f = f.mem();
                    }
                    v.push(f);
                }};
            }
            one!("r8,1", 8, Cnt::One, |a, _| a.$op(r9b, 1), false);
            one!(
                "r8,imm",
                8,
                Cnt::Imm,
                |a, i| a.$op(r9b, i as u8 as i32),
                false
            );
            one!("r8,cl", 8, Cnt::Cl, |a, _| a.$op(r9b, cl), false);
            one!("ah,cl", 8, Cnt::Cl, |a, _| a.$op(ah, cl), false);
            one!("r16,1", 16, Cnt::One, |a, _| a.$op(r9w, 1), false);
            one!(
                "r16,imm",
                16,
                Cnt::Imm,
                |a, i| a.$op(r9w, i as u8 as i32),
                false
            );
            one!("r16,cl", 16, Cnt::Cl, |a, _| a.$op(r9w, cl), false);
            one!("r32,1", 32, Cnt::One, |a, _| a.$op(r9d, 1), false);
            one!(
                "r32,imm",
                32,
                Cnt::Imm,
                |a, i| a.$op(r9d, i as u8 as i32),
                false
            );
            one!("r32,cl", 32, Cnt::Cl, |a, _| a.$op(r9d, cl), false);
            one!("r64,1", 64, Cnt::One, |a, _| a.$op(r9, 1), false);
            one!(
                "r64,imm",
                64,
                Cnt::Imm,
                |a, i| a.$op(r9, i as u8 as i32),
                false
            );
            one!("r64,cl", 64, Cnt::Cl, |a, _| a.$op(r9, cl), false);
            one!(
                "m8,cl",
                8,
                Cnt::Cl,
                |a, _| a.$op(byte_ptr(rbx + 1), cl),
                true
            );
            one!("m16,1", 16, Cnt::One, |a, _| a.$op(word_ptr(rbx), 1), true);
            one!(
                "m32,imm",
                32,
                Cnt::Imm,
                |a, i| a.$op(dword_ptr(rbx + 2), i as u8 as i32),
                true
            );
            one!(
                "m64,cl",
                64,
                Cnt::Cl,
                |a, _| a.$op(qword_ptr(rbx - 8), cl),
                true
            );
        }};
    }
    shifts!(Sh::Rol, rol);
    shifts!(Sh::Ror, ror);
    shifts!(Sh::Rcl, rcl);
    shifts!(Sh::Rcr, rcr);
    shifts!(Sh::Shl, shl);
    shifts!(Sh::Shr, shr);
    shifts!(Sh::Sar, sar);
    // SAL is SHL (D0 /4); the /6 alias is not produced by the assembler.
    v.push(
        Form::new("sal r32,cl (d3 /6 alias)", |a, _| a.db(&[0x41, 0xd3, 0xf1]))
            .undef_dyn(|c| shift_undef(Sh::Shl, 32, c.gpr[RCX])),
    );
    v
}

fn shld_table() -> Vec<Form> {
    let mut v = Vec::new();
    macro_rules! dbl {
        ($kind:expr, $op:ident) => {{
            let n = stringify!($op);
            let k: Sh = $kind;
            // 16-bit counts above 16 leave the result undefined: keep them at most 16.
            let set_cl16 = |c: &mut Case, r: &mut Rng| {
                c.gpr[RCX] = (c.gpr[RCX] & !0xff) | r.below(17) | (r.below(8) << 5)
            };
            let set_cl =
                |c: &mut Case, r: &mut Rng| c.gpr[RCX] = (c.gpr[RCX] & !0xff) | shift_count(r);
            v.push(
                Form::new(format!("{n} r16,r16,imm"), |a, i| {
                    a.$op(r9w, r10w, i as i32)
                })
                .imm(|r| r.below(17))
                .undef_dyn(move |c| shift_undef(k, 16, c.imm)),
            );
            v.push(
                Form::new(format!("{n} r16,r16,cl"), |a, _| a.$op(r9w, r10w, cl))
                    .setup(set_cl16)
                    .undef_dyn(move |c| shift_undef(k, 16, c.gpr[RCX] & 0xff)),
            );
            v.push(
                Form::new(format!("{n} r32,r32,imm"), |a, i| {
                    a.$op(r9d, r10d, i as u8 as i32)
                })
                .imm(shift_count)
                .undef_dyn(move |c| shift_undef(k, 32, c.imm)),
            );
            v.push(
                Form::new(format!("{n} r32,r32,cl"), |a, _| a.$op(r9d, r10d, cl))
                    .setup(set_cl)
                    .undef_dyn(move |c| shift_undef(k, 32, c.gpr[RCX] & 0xff)),
            );
            v.push(
                Form::new(format!("{n} r64,r64,imm"), |a, i| {
                    a.$op(r9, r10, i as u8 as i32)
                })
                .imm(shift_count)
                .undef_dyn(move |c| shift_undef(k, 64, c.imm)),
            );
            v.push(
                Form::new(format!("{n} r64,r64,cl"), |a, _| a.$op(r9, r10, cl))
                    .setup(set_cl)
                    .undef_dyn(move |c| shift_undef(k, 64, c.gpr[RCX] & 0xff)),
            );
            v.push(
                Form::new(format!("{n} m32,r32,cl"), |a, _| {
                    a.$op(dword_ptr(rbx + 3), r10d, cl)
                })
                .mem()
                .setup(set_cl)
                .undef_dyn(move |c| shift_undef(k, 32, c.gpr[RCX] & 0xff)),
            );
            v.push(
                Form::new(format!("{n} m64,r64,imm"), |a, i| {
                    a.$op(qword_ptr(rbx), r10, i as u8 as i32)
                })
                .mem()
                .imm(shift_count)
                .undef_dyn(move |c| shift_undef(k, 64, c.imm)),
            );
        }};
    }
    dbl!(Sh::Shld, shld);
    dbl!(Sh::Shrd, shrd);
    v
}

const MUL_UNDEF: u64 = SF | ZF | AF | PF;
const DIV_UNDEF: u64 = CF | OF | SF | ZF | AF | PF;

/// Mostly non-faulting dividends: the high half below the divisor (unsigned) or a
/// sign-extended small dividend (signed); sometimes left random (then #DE is likely).
fn div_setup(bits: u32, signed: bool, mem: bool) -> impl Fn(&mut Case, &mut Rng) {
    move |c, r| {
        let m = mask(bits);
        if r.below(8) == 0 {
            c.gpr[RCX] &= !m; // divide by zero
        } else if c.gpr[RCX] & m == 0 {
            c.gpr[RCX] |= 1 + r.below(m.min(1 << 20));
        }
        if mem {
            reg_to_mem(c, RCX, 0, (bits / 8) as usize);
        }
        let div = c.gpr[RCX] & m;
        if r.below(4) == 0 {
            return;
        }
        let lo = if bits == 8 {
            c.gpr[RAX] & 0xff
        } else {
            c.gpr[RAX] & m
        };
        let hi = if signed {
            if lo >> (bits - 1) & 1 != 0 {
                m
            } else {
                0
            }
        } else if div > 1 {
            r.below(div)
        } else {
            0
        };
        if bits == 8 {
            c.gpr[RAX] = (c.gpr[RAX] & !0xff00) | (hi << 8);
        } else {
            c.gpr[RDX] = (c.gpr[RDX] & !m) | hi;
        }
    }
}

fn muldiv_table() -> Vec<Form> {
    let mut v = Vec::new();
    macro_rules! onearg {
        ($op:ident, $undef:expr) => {{
            let n = stringify!($op);
            v.push(Form::new(format!("{n} r8"), |a, _| a.$op(cl)).undef($undef));
            v.push(Form::new(format!("{n} ah"), |a, _| a.$op(ah)).undef($undef));
            v.push(Form::new(format!("{n} r16"), |a, _| a.$op(cx)).undef($undef));
            v.push(Form::new(format!("{n} r32"), |a, _| a.$op(ecx)).undef($undef));
            v.push(Form::new(format!("{n} r64"), |a, _| a.$op(rcx)).undef($undef));
            v.push(Form::new(format!("{n} r64 (rdx)"), |a, _| a.$op(rdx)).undef($undef));
            v.push(
                Form::new(format!("{n} m8"), |a, _| a.$op(byte_ptr(rbx)))
                    .undef($undef)
                    .mem(),
            );
            v.push(
                Form::new(format!("{n} m16"), |a, _| a.$op(word_ptr(rbx + 2)))
                    .undef($undef)
                    .mem(),
            );
            v.push(
                Form::new(format!("{n} m32"), |a, _| a.$op(dword_ptr(rbx)))
                    .undef($undef)
                    .mem(),
            );
            v.push(
                Form::new(format!("{n} m64"), |a, _| a.$op(qword_ptr(rbx - 16)))
                    .undef($undef)
                    .mem(),
            );
        }};
    }
    onearg!(mul, MUL_UNDEF);
    onearg!(imul, MUL_UNDEF);
    v.push(Form::new("imul r16,r16", |a, _| a.imul_2(r9w, r10w)).undef(MUL_UNDEF));
    v.push(Form::new("imul r32,r32", |a, _| a.imul_2(r9d, r10d)).undef(MUL_UNDEF));
    v.push(Form::new("imul r64,r64", |a, _| a.imul_2(r9, r10)).undef(MUL_UNDEF));
    v.push(
        Form::new("imul r64,m64", |a, _| a.imul_2(r9, qword_ptr(rbx)))
            .undef(MUL_UNDEF)
            .mem(),
    );
    v.push(
        Form::new("imul r16,m16", |a, _| a.imul_2(r9w, word_ptr(rbx + 1)))
            .undef(MUL_UNDEF)
            .mem(),
    );
    v.push(
        Form::new("imul r16,r16,imm8", |a, i| {
            a.imul_3(r9w, r10w, i as i8 as i32)
        })
        .undef(MUL_UNDEF),
    );
    v.push(
        Form::new("imul r16,r16,imm16", |a, i| {
            a.imul_3(r9w, r10w, i as i16 as i32 | 0x100)
        })
        .undef(MUL_UNDEF),
    );
    v.push(
        Form::new("imul r32,r32,imm8", |a, i| {
            a.imul_3(r9d, r10d, i as i8 as i32)
        })
        .undef(MUL_UNDEF),
    );
    v.push(
        Form::new("imul r32,m32,imm32", |a, i| {
            a.imul_3(r9d, dword_ptr(rbx), wide32(i))
        })
        .undef(MUL_UNDEF)
        .mem(),
    );
    v.push(
        Form::new("imul r64,r64,imm8", |a, i| {
            a.imul_3(r9, r10, i as i8 as i32)
        })
        .undef(MUL_UNDEF),
    );
    v.push(Form::new("imul r64,r64,imm32", |a, i| a.imul_3(r9, r10, wide32(i))).undef(MUL_UNDEF));
    macro_rules! div {
        ($op:ident, $signed:expr) => {{
            let n = stringify!($op);
            let s: bool = $signed;
            v.push(
                Form::new(format!("{n} r8"), |a, _| a.$op(cl))
                    .undef(DIV_UNDEF)
                    .setup(div_setup(8, s, false)),
            );
            v.push(
                Form::new(format!("{n} r16"), |a, _| a.$op(cx))
                    .undef(DIV_UNDEF)
                    .setup(div_setup(16, s, false)),
            );
            v.push(
                Form::new(format!("{n} r32"), |a, _| a.$op(ecx))
                    .undef(DIV_UNDEF)
                    .setup(div_setup(32, s, false)),
            );
            v.push(
                Form::new(format!("{n} r64"), |a, _| a.$op(rcx))
                    .undef(DIV_UNDEF)
                    .setup(div_setup(64, s, false)),
            );
            v.push(
                Form::new(format!("{n} m8"), |a, _| a.$op(byte_ptr(rbx)))
                    .undef(DIV_UNDEF)
                    .mem()
                    .setup(div_setup(8, s, true)),
            );
            v.push(
                Form::new(format!("{n} m16"), |a, _| a.$op(word_ptr(rbx)))
                    .undef(DIV_UNDEF)
                    .mem()
                    .setup(div_setup(16, s, true)),
            );
            v.push(
                Form::new(format!("{n} m32"), |a, _| a.$op(dword_ptr(rbx)))
                    .undef(DIV_UNDEF)
                    .mem()
                    .setup(div_setup(32, s, true)),
            );
            v.push(
                Form::new(format!("{n} m64"), |a, _| a.$op(qword_ptr(rbx)))
                    .undef(DIV_UNDEF)
                    .mem()
                    .setup(div_setup(64, s, true)),
            );
            v.push(Form::new(format!("{n} r64 random"), |a, _| a.$op(r10)).undef(DIV_UNDEF));
        }};
    }
    div!(div, false);
    div!(idiv, true);
    // The one signed overflow that is not a large quotient: MIN / -1.
    v.push(
        Form::new("idiv r32 min/-1", |a, _| a.idiv(ecx))
            .undef(DIV_UNDEF)
            .setup(|c, r| {
                c.gpr[RAX] = (r.next() << 32) | 0x8000_0000;
                c.gpr[RDX] = (r.next() << 32) | 0xffff_ffff;
                c.gpr[RCX] = (r.next() << 32) | if r.bool() { 0xffff_ffff } else { 1 };
            }),
    );
    v
}

fn mov_table() -> Vec<Form> {
    let mut v = Vec::new();
    v.push(Form::new("mov r8,r8", |a, _| a.mov(r9b, r10b)));
    v.push(Form::new("mov ah,r8", |a, _| a.mov(ah, dl)));
    v.push(Form::new("mov r8,ch", |a, _| a.mov(bl, ch)));
    v.push(Form::new("mov r16,r16", |a, _| a.mov(r9w, r10w)));
    v.push(Form::new("mov r32,r32", |a, _| a.mov(r9d, r10d)));
    v.push(Form::new("mov r64,r64", |a, _| a.mov(r9, r10)));
    v.push(Form::new("mov r8,imm8", |a, i| a.mov(r9b, i as i8 as i32)));
    v.push(Form::new("mov r16,imm16", |a, i| {
        a.mov(r9w, i as i16 as i32)
    }));
    v.push(Form::new("mov r32,imm32", |a, i| a.mov(r9d, i as u32)));
    v.push(Form::new("mov r64,imm32sx", |a, i| {
        a.mov(r9, i as i32 as i64)
    }));
    v.push(Form::new("mov r64,imm64", |a, i| {
        a.mov(r9, i | 0x8000_0000_0000)
    }));
    v.push(Form::new("mov m8,r8", |a, _| a.mov(byte_ptr(rbx + 3), r9b)).mem());
    v.push(Form::new("mov m8,bh", |a, _| a.mov(byte_ptr(rbx + 3), dh)).mem());
    v.push(Form::new("mov m16,r16", |a, _| a.mov(word_ptr(rbx + 1), r9w)).mem());
    v.push(Form::new("mov m32,r32", |a, _| a.mov(dword_ptr(rbx - 2), r9d)).mem());
    v.push(Form::new("mov m64,r64", |a, _| a.mov(qword_ptr(rbx), r9)).mem());
    v.push(Form::new("mov r8,m8", |a, _| a.mov(r9b, byte_ptr(rbx))).mem());
    v.push(Form::new("mov ah,m8", |a, _| a.mov(ah, byte_ptr(rbx + 9))).mem());
    v.push(Form::new("mov r16,m16", |a, _| a.mov(r9w, word_ptr(rbx))).mem());
    v.push(Form::new("mov r32,m32", |a, _| a.mov(r9d, dword_ptr(rbx + 1))).mem());
    v.push(Form::new("mov r64,m64", |a, _| a.mov(r9, qword_ptr(rbx + 0x70))).mem());
    v.push(Form::new("mov m32,imm32", |a, i| a.mov(dword_ptr(rbx), i as i32)).mem());
    v.push(Form::new("mov m64,imm32sx", |a, i| a.mov(qword_ptr(rbx), i as i32)).mem());
    v.push(
        Form::new("mov r64,[rbx+rsi*4+disp]", |a, _| {
            a.mov(r9, qword_ptr(rbx + rsi * 4 + 0x10))
        })
        .mem()
        .setup(|c, r| {
            c.gpr[RBX] = DATA + 0x80 + r.below(0x400);
            c.gpr[RSI] = r.below(0x200);
        }),
    );
    v.push(
        Form::new("mov r32,[rbx+rsi*8-disp] (rsi<0)", |a, _| {
            a.mov(r9d, dword_ptr(rbx + rsi * 8 - 0x20))
        })
        .mem()
        .setup(|c, r| {
            c.gpr[RBX] = DATA + 0x800 + r.below(0x400);
            c.gpr[RSI] = r.below(0x80).wrapping_neg();
        }),
    );
    v.push(Form::new("movzx r16,r8", |a, _| a.movzx(r9w, r10b)));
    v.push(Form::new("movzx r32,r8", |a, _| a.movzx(r9d, r10b)));
    v.push(Form::new("movzx r32,ah", |a, _| a.movzx(ecx, ah)));
    v.push(Form::new("movzx r64,r8", |a, _| a.movzx(r9, r10b)));
    v.push(Form::new("movzx r32,r16", |a, _| a.movzx(r9d, r10w)));
    v.push(Form::new("movzx r64,r16", |a, _| a.movzx(r9, r10w)));
    v.push(Form::new("movzx r32,m8", |a, _| a.movzx(r9d, byte_ptr(rbx))).mem());
    v.push(Form::new("movzx r64,m16", |a, _| a.movzx(r9, word_ptr(rbx + 1))).mem());
    v.push(Form::new("movsx r16,r8", |a, _| a.movsx(r9w, r10b)));
    v.push(Form::new("movsx r32,r8", |a, _| a.movsx(r9d, r10b)));
    v.push(Form::new("movsx r32,bh", |a, _| a.movsx(edx, bh)));
    v.push(Form::new("movsx r64,r8", |a, _| a.movsx(r9, r10b)));
    v.push(Form::new("movsx r32,r16", |a, _| a.movsx(r9d, r10w)));
    v.push(Form::new("movsx r64,r16", |a, _| a.movsx(r9, r10w)));
    v.push(Form::new("movsx r64,m8", |a, _| a.movsx(r9, byte_ptr(rbx))).mem());
    v.push(Form::new("movsx r16,m8", |a, _| a.movsx(r9w, byte_ptr(rbx - 1))).mem());
    v.push(Form::new("movsxd r64,r32", |a, _| a.movsxd(r9, r10d)));
    v.push(Form::new("movsxd r64,m32", |a, _| a.movsxd(r9, dword_ptr(rbx + 4))).mem());
    // LEA never touches memory: all registers stay random.
    v.push(Form::new("lea r64,[b+i*4+d8]", |a, _| {
        a.lea(rax, qword_ptr(rbx + rcx * 4 + 0x12))
    }));
    v.push(Form::new("lea r64,[b+i*8+d32]", |a, _| {
        a.lea(r9, qword_ptr(r10 + r11 * 8 - 0x1234_5678))
    }));
    v.push(Form::new("lea r32,[b+i*8-d8]", |a, _| {
        a.lea(eax, ptr(rbx + rcx * 8 - 0x80))
    }));
    v.push(Form::new("lea r16,[b+i]", |a, _| a.lea(ax, ptr(rbx + rsi))));
    v.push(Form::new("lea r64,[b32+i32*2+d32] (addr32)", |a, _| {
        a.lea(rax, ptr(ebx + ecx * 2 + 0x1234))
    }));
    v.push(Form::new("lea r32,[b32+i32] (addr32)", |a, _| {
        a.lea(r9d, ptr(r10d + r11d))
    }));
    v.push(Form::new("lea r16,[b32-d8] (addr32)", |a, _| {
        a.lea(dx, ptr(esi - 3))
    }));
    v.push(Form::new("lea r64,[r13]", |a, _| a.lea(r12, ptr(r13))));
    v.push(Form::new("lea r64,[rsp+d8]", |a, _| {
        a.lea(rsi, ptr(rsp + 0x10))
    }));
    v.push(Form::new("lea r64,[i*8] (no base)", |a, _| {
        a.lea(rax, ptr(rcx * 8 + 0x10))
    }));
    v.push(Form::new("lea r64,[abs32]", |a, _| {
        a.lea(rdx, ptr(0x1234_5678u64))
    }));
    v.push(Form::new("lea r64,[rip+d32]", |a, _| {
        a.add_instruction(Instruction::with2(
            Code::Lea_r64_m,
            Register::RAX,
            MemoryOperand::with_base_displ(Register::RIP, (INSN + 0x1234) as i64),
        )?)
    }));
    v.push(Form::new("lea r32,[rip-d32]", |a, _| {
        a.add_instruction(Instruction::with2(
            Code::Lea_r32_m,
            Register::ECX,
            MemoryOperand::with_base_displ(Register::RIP, (INSN - 0x100) as i64),
        )?)
    }));
    v.push(Form::new("xlatb", |a, _| a.xlatb()).mem());
    v.push(Form::new("bswap r32", |a, _| a.bswap(r9d)));
    v.push(Form::new("bswap r64", |a, _| a.bswap(r9)));
    v.push(Form::new("bswap eax", |a, _| a.bswap(eax)));
    v.push(Form::new("bswap rdi", |a, _| a.bswap(rdi)));
    v.push(Form::new("cbw", |a, _| a.cbw()));
    v.push(Form::new("cwde", |a, _| a.cwde()));
    v.push(Form::new("cdqe", |a, _| a.cdqe()));
    v.push(Form::new("cwd", |a, _| a.cwd()));
    v.push(Form::new("cdq", |a, _| a.cdq()));
    v.push(Form::new("cqo", |a, _| a.cqo()));
    v.push(Form::new("lahf", |a, _| a.lahf()));
    v.push(Form::new("sahf", |a, _| a.sahf()));
    v.push(Form::new("clc", |a, _| a.clc()));
    v.push(Form::new("stc", |a, _| a.stc()));
    v.push(Form::new("cmc", |a, _| a.cmc()));
    v.push(Form::new("cld", |a, _| a.cld()));
    v.push(Form::new("std", |a, _| a.std()));
    v.push(Form::new("nop", |a, _| a.nop()));
    v
}

fn cc_table() -> Vec<Form> {
    let mut v = Vec::new();
    macro_rules! cc {
        ($($cc:ident $cmov:ident $set:ident $j8:ident $j32:ident),* $(,)?) => {$(
            let n = stringify!($cc);
            v.push(Form::new(format!("cmov{n} r64,r64"), |a, _| a.$cmov(r9, r10)));
            v.push(Form::new(format!("cmov{n} r32,r32"), |a, _| a.$cmov(r9d, r10d)));
            v.push(Form::new(format!("cmov{n} r16,m16"), |a, _| a.$cmov(r9w, word_ptr(rbx))).mem());
            v.push(Form::new(format!("cmov{n} r32,m32"), |a, _| a.$cmov(r9d, dword_ptr(rbx + 1))).mem());
            v.push(Form::new(format!("set{n} r8"), |a, _| a.$set(r9b)));
            v.push(Form::new(format!("set{n} ah"), |a, _| a.$set(ah)));
            v.push(Form::new(format!("set{n} m8"), |a, _| a.$set(byte_ptr(rbx + 2))).mem());
            v.push(Form::new(format!("j{n} rel8"), |a, _| a.add_instruction(Instruction::with_branch(Code::$j8, BRANCH)?)));
            v.push(Form::new(format!("j{n} rel32"), |a, _| a.add_instruction(Instruction::with_branch(Code::$j32, BRANCH)?)));
        )*};
    }
    cc!(
        o cmovo seto Jo_rel8_64 Jo_rel32_64,
        no cmovno setno Jno_rel8_64 Jno_rel32_64,
        b cmovb setb Jb_rel8_64 Jb_rel32_64,
        ae cmovae setae Jae_rel8_64 Jae_rel32_64,
        e cmove sete Je_rel8_64 Je_rel32_64,
        ne cmovne setne Jne_rel8_64 Jne_rel32_64,
        be cmovbe setbe Jbe_rel8_64 Jbe_rel32_64,
        a cmova seta Ja_rel8_64 Ja_rel32_64,
        s cmovs sets Js_rel8_64 Js_rel32_64,
        ns cmovns setns Jns_rel8_64 Jns_rel32_64,
        p cmovp setp Jp_rel8_64 Jp_rel32_64,
        np cmovnp setnp Jnp_rel8_64 Jnp_rel32_64,
        l cmovl setl Jl_rel8_64 Jl_rel32_64,
        ge cmovge setge Jge_rel8_64 Jge_rel32_64,
        le cmovle setle Jle_rel8_64 Jle_rel32_64,
        g cmovg setg Jg_rel8_64 Jg_rel32_64,
    );
    v.push(Form::new("jmp rel8", |a, _| {
        a.add_instruction(Instruction::with_branch(Code::Jmp_rel8_64, BRANCH)?)
    }));
    v.push(Form::new("jmp rel32", |a, _| {
        a.add_instruction(Instruction::with_branch(Code::Jmp_rel32_64, BRANCH)?)
    }));
    v.push(Form::new("jmp r64", |a, _| a.jmp(r11)).setup(|c, _| c.gpr[R11] = BRANCH));
    v.push(
        Form::new("jmp m64", |a, _| a.jmp(qword_ptr(rbx + 8)))
            .mem()
            .setup(|c, _| {
                let at = c.gpr[RBX] + 8;
                c.poke(at, BRANCH, 8);
            }),
    );
    let jrcxz = |c: &mut Case, r: &mut Rng| {
        if r.bool() {
            c.gpr[RCX] = if r.bool() { 0 } else { r.next() << 32 };
        }
    };
    v.push(
        Form::new("jrcxz", |a, _| {
            a.add_instruction(Instruction::with_branch(Code::Jrcxz_rel8_64, BRANCH)?)
        })
        .setup(jrcxz),
    );
    v.push(
        Form::new("jecxz", |a, _| {
            a.add_instruction(Instruction::with_branch(Code::Jecxz_rel8_64, BRANCH)?)
        })
        .setup(jrcxz),
    );
    let small_rcx = |c: &mut Case, r: &mut Rng| {
        if r.bool() {
            c.gpr[RCX] = r.below(3) | if r.bool() { r.next() << 32 } else { 0 };
        }
    };
    v.push(
        Form::new("loop", |a, _| {
            a.add_instruction(Instruction::with_branch(Code::Loop_rel8_64_RCX, BRANCH)?)
        })
        .setup(small_rcx),
    );
    v.push(
        Form::new("loope", |a, _| {
            a.add_instruction(Instruction::with_branch(Code::Loope_rel8_64_RCX, BRANCH)?)
        })
        .setup(small_rcx),
    );
    v.push(
        Form::new("loopne", |a, _| {
            a.add_instruction(Instruction::with_branch(Code::Loopne_rel8_64_RCX, BRANCH)?)
        })
        .setup(small_rcx),
    );
    v.push(
        Form::new("loop ecx (addr32)", |a, _| {
            a.add_instruction(Instruction::with_branch(Code::Loop_rel8_64_ECX, BRANCH)?)
        })
        .setup(small_rcx),
    );
    v
}

/// Makes the accumulator equal the destination half the time, so CMPXCHG both succeeds and
/// fails.
fn cmpxchg_setup(dst_reg: Option<usize>, disp: i64) -> impl Fn(&mut Case, &mut Rng) {
    move |c, r| {
        if r.bool() {
            c.gpr[RAX] = match dst_reg {
                Some(reg) => c.gpr[reg],
                None => {
                    let a = c.gpr[RBX].wrapping_add(disp as u64);
                    c.peek(a, 8)
                }
            };
        }
    }
}

fn xchg_table() -> Vec<Form> {
    let mut v = Vec::new();
    v.push(Form::new("xchg r8,r8", |a, _| a.xchg(r9b, r10b)));
    v.push(Form::new("xchg ah,dh", |a, _| a.xchg(ah, dh)));
    v.push(Form::new("xchg r16,r16", |a, _| a.xchg(r9w, r10w)));
    v.push(Form::new("xchg r32,r32", |a, _| a.xchg(r9d, r10d)));
    v.push(Form::new("xchg r64,r64", |a, _| a.xchg(r9, r10)));
    v.push(Form::new("xchg ecx,eax (short)", |a, _| a.xchg(ecx, eax)));
    v.push(Form::new("xchg r8d,eax (41 90)", |a, _| {
        a.db(&[0x41, 0x90])
    }));
    v.push(Form::new("xchg eax,eax (87 c0)", |a, _| {
        a.db(&[0x87, 0xc0])
    }));
    v.push(Form::new("xchg rax,rdx (short)", |a, _| a.xchg(rdx, rax)));
    v.push(Form::new("xchg ax,r9w (short)", |a, _| a.xchg(r9w, ax)));
    v.push(Form::new("xchg m8,r8", |a, _| a.xchg(byte_ptr(rbx + 1), r9b)).mem());
    v.push(Form::new("xchg m16,r16", |a, _| a.xchg(word_ptr(rbx + 1), r9w)).mem());
    v.push(Form::new("xchg m32,r32", |a, _| a.xchg(dword_ptr(rbx), r9d)).mem());
    v.push(Form::new("xchg m64,r64", |a, _| a.xchg(qword_ptr(rbx), r9)).mem());
    v.push(
        Form::new("lock xchg m64,r64", |a, _| {
            a.lock().xchg(qword_ptr(rbx), r9)
        })
        .mem(),
    );
    v.push(Form::new("xadd r8,r8", |a, _| a.xadd(r9b, r10b)));
    v.push(Form::new("xadd r16,r16", |a, _| a.xadd(r9w, r10w)));
    v.push(Form::new("xadd r32,r32", |a, _| a.xadd(r9d, r10d)));
    v.push(Form::new("xadd r64,r64", |a, _| a.xadd(r9, r10)));
    v.push(Form::new("xadd r64,same", |a, _| a.xadd(r9, r9)));
    v.push(Form::new("xadd m8,r8", |a, _| a.xadd(byte_ptr(rbx), r9b)).mem());
    v.push(Form::new("xadd m32,r32", |a, _| a.xadd(dword_ptr(rbx + 2), r9d)).mem());
    v.push(Form::new("xadd m64,r64", |a, _| a.xadd(qword_ptr(rbx), r9)).mem());
    v.push(
        Form::new("lock xadd m64,r64", |a, _| {
            a.lock().xadd(qword_ptr(rbx), r9)
        })
        .mem(),
    );
    v.push(
        Form::new("lock xadd m16,r16", |a, _| {
            a.lock().xadd(word_ptr(rbx + 6), r9w)
        })
        .mem(),
    );
    v.push(
        Form::new("cmpxchg r8,r8", |a, _| a.cmpxchg(r9b, r10b)).setup(cmpxchg_setup(Some(R9), 0)),
    );
    v.push(
        Form::new("cmpxchg r16,r16", |a, _| a.cmpxchg(r9w, r10w)).setup(cmpxchg_setup(Some(R9), 0)),
    );
    v.push(
        Form::new("cmpxchg r32,r32", |a, _| a.cmpxchg(r9d, r10d)).setup(cmpxchg_setup(Some(R9), 0)),
    );
    v.push(
        Form::new("cmpxchg r64,r64", |a, _| a.cmpxchg(r9, r10)).setup(cmpxchg_setup(Some(R9), 0)),
    );
    v.push(
        Form::new("cmpxchg r32,eax-dest", |a, _| a.cmpxchg(eax, r10d))
            .setup(cmpxchg_setup(Some(RAX), 0)),
    );
    v.push(
        Form::new("cmpxchg m8,r8", |a, _| a.cmpxchg(byte_ptr(rbx), r10b))
            .mem()
            .setup(cmpxchg_setup(None, 0)),
    );
    v.push(
        Form::new("cmpxchg m16,r16", |a, _| a.cmpxchg(word_ptr(rbx), r10w))
            .mem()
            .setup(cmpxchg_setup(None, 0)),
    );
    v.push(
        Form::new("cmpxchg m32,r32", |a, _| a.cmpxchg(dword_ptr(rbx), r10d))
            .mem()
            .setup(cmpxchg_setup(None, 0)),
    );
    v.push(
        Form::new("cmpxchg m64,r64", |a, _| a.cmpxchg(qword_ptr(rbx), r10))
            .mem()
            .setup(cmpxchg_setup(None, 0)),
    );
    v.push(
        Form::new("lock cmpxchg m32,r32", |a, _| {
            a.lock().cmpxchg(dword_ptr(rbx + 4), r10d)
        })
        .mem()
        .setup(cmpxchg_setup(None, 4)),
    );
    v.push(
        Form::new("lock cmpxchg m64,r64", |a, _| {
            a.lock().cmpxchg(qword_ptr(rbx), r10)
        })
        .mem()
        .setup(cmpxchg_setup(None, 0)),
    );
    // Make EDX:EAX (RDX:RAX) equal the memory operand half the time.
    let cx8 = |c: &mut Case, r: &mut Rng| {
        if r.bool() {
            let m = c.peek(c.gpr[RBX], 8);
            c.gpr[RAX] = (r.next() << 32) | (m & 0xffff_ffff);
            c.gpr[RDX] = (r.next() << 32) | (m >> 32);
        }
    };
    let cx16 = |c: &mut Case, r: &mut Rng| {
        if r.bool() {
            c.gpr[RAX] = c.peek(c.gpr[RBX], 8);
            c.gpr[RDX] = c.peek(c.gpr[RBX] + 8, 8);
        }
    };
    v.push(
        Form::new("cmpxchg8b m64", |a, _| a.cmpxchg8b(qword_ptr(rbx)))
            .mem()
            .setup(cx8),
    );
    v.push(
        Form::new("lock cmpxchg8b m64", |a, _| {
            a.lock().cmpxchg8b(qword_ptr(rbx))
        })
        .mem()
        .setup(aligned8)
        .setup(cx8),
    );
    v.push(
        Form::new("cmpxchg16b m128", |a, _| a.cmpxchg16b(xmmword_ptr(rbx)))
            .mem()
            .setup(aligned16)
            .setup(cx16),
    );
    v.push(
        Form::new("lock cmpxchg16b m128", |a, _| {
            a.lock().cmpxchg16b(xmmword_ptr(rbx))
        })
        .mem()
        .setup(aligned16)
        .setup(cx16),
    );
    v.push(
        Form::new("cmpxchg16b misaligned (#GP)", |a, _| {
            a.cmpxchg16b(xmmword_ptr(rbx + 8))
        })
        .mem()
        .setup(aligned16),
    );
    v.push(
        Form::new("lock cmpxchg m8,r8", |a, _| {
            a.lock().cmpxchg(byte_ptr(rbx + 3), r10b)
        })
        .mem()
        .setup(cmpxchg_setup(None, 3)),
    );
    v
}

const BT_UNDEF: u64 = OF | SF | AF | PF;
const BSF_UNDEF: u64 = CF | OF | SF | AF | PF;

/// A bit offset register for BT m,r: random upper bits beyond the operand size, a signed
/// in-range offset (±0x600 bytes) in the operand-size bits; RBX in the middle of the page.
fn bt_offset(reg: usize, bits: u32) -> impl Fn(&mut Case, &mut Rng) {
    move |c, r| {
        c.gpr[RBX] = DATA + 0x800 + r.below(0x40);
        let off = (r.below(0x6000) as i64 - 0x3000) as u64;
        c.gpr[reg] = (c.gpr[reg] & !mask(bits)) | (off & mask(bits));
    }
}

fn bit_table() -> Vec<Form> {
    let mut v = Vec::new();
    macro_rules! bt {
        ($op:ident, $lockable:expr) => {{
            let n = stringify!($op);
            v.push(Form::new(format!("{n} r16,r16"), |a, _| a.$op(r9w, r10w)).undef(BT_UNDEF));
            v.push(Form::new(format!("{n} r32,r32"), |a, _| a.$op(r9d, r10d)).undef(BT_UNDEF));
            v.push(Form::new(format!("{n} r64,r64"), |a, _| a.$op(r9, r10)).undef(BT_UNDEF));
            v.push(
                Form::new(format!("{n} r16,imm"), |a, i| a.$op(r9w, i as u8 as i32))
                    .undef(BT_UNDEF),
            );
            v.push(
                Form::new(format!("{n} r32,imm"), |a, i| a.$op(r9d, i as u8 as i32))
                    .undef(BT_UNDEF),
            );
            v.push(
                Form::new(format!("{n} r64,imm"), |a, i| a.$op(r9, i as u8 as i32)).undef(BT_UNDEF),
            );
            v.push(
                Form::new(format!("{n} m16,imm"), |a, i| {
                    a.$op(word_ptr(rbx), i as u8 as i32)
                })
                .undef(BT_UNDEF)
                .mem(),
            );
            v.push(
                Form::new(format!("{n} m32,imm"), |a, i| {
                    a.$op(dword_ptr(rbx + 1), i as u8 as i32)
                })
                .undef(BT_UNDEF)
                .mem(),
            );
            v.push(
                Form::new(format!("{n} m64,imm"), |a, i| {
                    a.$op(qword_ptr(rbx), i as u8 as i32)
                })
                .undef(BT_UNDEF)
                .mem(),
            );
            v.push(
                Form::new(format!("{n} m16,r16"), |a, _| a.$op(word_ptr(rbx), r10w))
                    .undef(BT_UNDEF)
                    .setup(bt_offset(R10, 16)),
            );
            v.push(
                Form::new(format!("{n} m32,r32"), |a, _| {
                    a.$op(dword_ptr(rbx + 2), r10d)
                })
                .undef(BT_UNDEF)
                .setup(bt_offset(R10, 32)),
            );
            v.push(
                Form::new(format!("{n} m64,r64"), |a, _| {
                    a.$op(qword_ptr(rbx - 8), r10)
                })
                .undef(BT_UNDEF)
                .setup(bt_offset(R10, 64)),
            );
            v.push(
                Form::new(format!("{n} m64,r64 small"), |a, _| {
                    a.$op(qword_ptr(rbx), rcx)
                })
                .undef(BT_UNDEF)
                .mem()
                .setup(|c, r| {
                    c.gpr[RCX] = r.below(64);
                }),
            );
            if $lockable {
                v.push(
                    Form::new(format!("lock {n} m64,r64"), |a, _| {
                        a.lock().$op(qword_ptr(rbx), r10)
                    })
                    .undef(BT_UNDEF)
                    .setup(bt_offset(R10, 64)),
                );
                v.push(
                    Form::new(format!("lock {n} m32,imm"), |a, i| {
                        a.lock().$op(dword_ptr(rbx), i as u8 as i32)
                    })
                    .undef(BT_UNDEF)
                    .mem(),
                );
            }
        }};
    }
    bt!(bt, false);
    bt!(bts, true);
    bt!(btr, true);
    bt!(btc, true);
    macro_rules! bs {
        ($op:ident) => {{
            let n = stringify!($op);
            v.push(Form::new(format!("{n} r16,r16"), |a, _| a.$op(r9w, r10w)).undef(BSF_UNDEF));
            v.push(Form::new(format!("{n} r32,r32"), |a, _| a.$op(r9d, r10d)).undef(BSF_UNDEF));
            v.push(Form::new(format!("{n} r64,r64"), |a, _| a.$op(r9, r10)).undef(BSF_UNDEF));
            v.push(
                Form::new(format!("{n} r32,m32"), |a, _| a.$op(r9d, dword_ptr(rbx)))
                    .undef(BSF_UNDEF)
                    .mem(),
            );
            v.push(
                Form::new(format!("{n} r64,m64"), |a, _| a.$op(r9, qword_ptr(rbx + 8)))
                    .undef(BSF_UNDEF)
                    .mem(),
            );
        }};
    }
    bs!(bsf);
    bs!(bsr);
    let mut extra = Vec::new();
    if std::arch::is_x86_feature_detected!("popcnt") {
        extra.push(Form::new("popcnt r64,r64", |a, _| a.popcnt(r9, r10)));
        extra.push(Form::new("popcnt r16,m16", |a, _| a.popcnt(r9w, word_ptr(rbx))).mem());
    }
    if std::arch::is_x86_feature_detected!("lzcnt") {
        extra.push(Form::new("lzcnt r32,r32", |a, _| a.lzcnt(r9d, r10d)));
        extra.push(Form::new("lzcnt r16,r16", |a, _| a.lzcnt(r9w, r10w)));
        extra.push(Form::new("lzcnt r64,m64", |a, _| a.lzcnt(r9, qword_ptr(rbx))).mem());
    }
    if std::arch::is_x86_feature_detected!("bmi1") {
        extra.push(Form::new("tzcnt r32,r32", |a, _| a.tzcnt(r9d, r10d)));
        extra.push(Form::new("tzcnt r16,r16", |a, _| a.tzcnt(r9w, r10w)));
        extra.push(Form::new("tzcnt r64,r64", |a, _| a.tzcnt(r9, r10)));
    }
    // POPCNT/LZCNT/TZCNT define ZF and CF and clear OF, SF, AF, PF (AMD/Intel agree in practice,
    // the SDM lists OF SF AF PF as cleared for POPCNT and undefined for LZCNT/TZCNT).
    for f in extra {
        let u = if f.name.starts_with("popcnt") {
            0
        } else {
            OF | SF | AF | PF
        };
        v.push(f.undef(u));
    }
    v
}

/// Puts [`BRANCH`] at the top of the stack (the return address of RET forms).
fn ret_to_branch(c: &mut Case, _: &mut Rng) {
    let top = c.gpr[RSP];
    c.poke(top, BRANCH, 8);
}

/// A small RFLAGS image on the stack for POPF (status flags and DF only).
fn popf_value(c: &mut Case, r: &mut Rng) {
    let top = c.gpr[RSP];
    let v = (r.next() & STATUS_DF) | 2 | IF;
    c.poke(top, v, 8);
}

fn stack_table() -> Vec<Form> {
    let mut v = Vec::new();
    v.push(Form::new("push r64", |a, _| a.push(r9)));
    v.push(Form::new("push rsp", |a, _| a.push(rsp)));
    v.push(Form::new("push r16", |a, _| a.push(r9w)));
    v.push(Form::new("push imm8", |a, i| a.push(i as i8 as i32)));
    v.push(Form::new("push imm32", |a, i| a.push(wide32(i))));
    v.push(Form::new("push m64", |a, _| a.push(qword_ptr(rbx + 8))).mem());
    v.push(Form::new("push m16", |a, _| a.push(word_ptr(rbx))).mem());
    v.push(Form::new("pop r64", |a, _| a.pop(r9)));
    v.push(Form::new("pop r16", |a, _| a.pop(r9w)));
    v.push(Form::new("pop rsp", |a, _| a.pop(rsp)));
    v.push(Form::new("pop m64", |a, _| a.pop(qword_ptr(rbx))).mem());
    v.push(Form::new("pop [rsp+8]", |a, _| a.pop(qword_ptr(rsp + 8))));
    v.push(Form::new("pushfq", |a, _| a.pushfq()));
    v.push(Form::new("popfq", |a, _| a.popfq()).setup(popf_value));
    v.push(Form::new("call rel32", |a, _| {
        a.add_instruction(Instruction::with_branch(Code::Call_rel32_64, BRANCH)?)
    }));
    v.push(Form::new("call r64", |a, _| a.call(r11)).setup(|c, _| c.gpr[R11] = BRANCH));
    v.push(
        Form::new("call m64", |a, _| a.call(qword_ptr(rbx + 0x10)))
            .mem()
            .setup(|c, _| {
                let at = c.gpr[RBX] + 0x10;
                c.poke(at, BRANCH, 8);
            }),
    );
    v.push(Form::new("ret", |a, _| a.ret()).setup(ret_to_branch));
    v.push(Form::new("ret imm16", |a, i| a.ret_1((i & 0x78) as i32)).setup(ret_to_branch));
    v.push(Form::new("leave", |a, _| a.leave()).setup(|c, r| {
        c.gpr[RBP] = STACK_MID - 0x100 + r.below(0x200);
    }));
    v.push(Form::new("enter imm16,0", |a, i| {
        a.enter((i & 0x1f8) as i32, 0)
    }));
    v.push(Form::new("enter imm16,1", |a, i| {
        a.enter((i & 0x78) as i32, 1)
    }));
    v.push(
        Form::new("enter imm16,3", |a, i| a.enter((i & 0x78) as i32, 3)).setup(|c, r| {
            c.gpr[RBP] = STACK_MID - 0x100 + r.below(0x200);
        }),
    );
    v
}

fn string_table() -> Vec<Form> {
    let mut v = Vec::new();
    macro_rules! strs {
        ($($op:ident),*) => {$(
            let n = stringify!($op);
            v.push(Form::new(n, |a, _| a.$op()).strings());
            v.push(Form::new(format!("rep {n}"), |a, _| a.rep().$op()).strings());
        )*};
    }
    strs!(movsb, movsw, movsd, movsq, stosb, stosw, stosd, stosq, lodsb, lodsw, lodsd, lodsq);
    macro_rules! cmps {
        ($($op:ident),*) => {$(
            let n = stringify!($op);
            // Make the compared bytes equal often, so REPE runs on and REPNE stops early.
            let similar = |c: &mut Case, r: &mut Rng| {
                if r.bool() {
                    // Copy the bytes around RSI to RDI (both directions, for DF=1 too).
                    let (s, d) = ((c.gpr[RSI] - DATA) as usize, (c.gpr[RDI] - DATA) as usize);
                    let len = r.below(96) as usize;
                    for k in 0..len {
                        c.data[d + k] = c.data[s + k];
                        c.data[d - k] = c.data[s - k];
                    }
                }
                if r.bool() {
                    // SCAS: the accumulator equals the bytes at RDI.
                    let d = c.gpr[RDI];
                    let v = c.peek(d, 8);
                    c.gpr[RAX] = v;
                    let pattern = v & 0xff;
                    if r.bool() {
                        for k in 0..32u64 {
                            c.poke(d + k, pattern, 1);
                            c.poke(d - k, pattern, 1);
                        }
                        c.gpr[RAX] = pattern * 0x0101_0101_0101_0101;
                    }
                }
            };
            v.push(Form::new(n, |a, _| a.$op()).strings().setup(similar));
            v.push(Form::new(format!("repe {n}"), |a, _| a.repe().$op()).strings().setup(similar));
            v.push(Form::new(format!("repne {n}"), |a, _| a.repne().$op()).strings().setup(similar));
        )*};
    }
    cmps!(cmpsb, cmpsw, cmpsd, cmpsq, scasb, scasw, scasd, scasq);
    // 32-bit address size (0x67): ESI/EDI/ECX are used and written back zero-extended.
    // With ECX = 0 what happens to the upper halves is model-specific (Intel's fast-string
    // MOVS zero-extends all three, AMD leaves them), so the count is never zero here.
    let addr32 = |c: &mut Case, r: &mut Rng| {
        for reg in [RSI, RDI, RCX] {
            c.gpr[reg] |= r.next() << 32;
        }
        if c.gpr[RCX] as u32 == 0 {
            c.gpr[RCX] |= 1;
        }
    };
    for (name, bytes) in [
        ("movsb addr32", &[0x67u8, 0xa4][..]),
        ("rep movsb addr32", &[0x67, 0xf3, 0xa4]),
        ("rep movsq addr32", &[0x67, 0xf3, 0x48, 0xa5]),
        ("rep stosd addr32", &[0x67, 0xf3, 0xab]),
        ("lodsw addr32", &[0x67, 0x66, 0xad]),
        ("repe cmpsb addr32", &[0x67, 0xf3, 0xa6]),
        ("repne scasb addr32", &[0x67, 0xf2, 0xae]),
    ] {
        v.push(
            Form::new(name, move |a, _| a.db(bytes))
                .strings()
                .setup(addr32),
        );
    }
    // REP with RCX = 0 does nothing (and leaves flags alone even for CMPS/SCAS).
    v.push(
        Form::new("rep movsq rcx=0", |a, _| a.rep().movsq())
            .strings()
            .setup(|c, _| c.gpr[RCX] = 0),
    );
    v.push(
        Form::new("repe cmpsq rcx=0", |a, _| a.repe().cmpsq())
            .strings()
            .setup(|c, _| c.gpr[RCX] = 0),
    );
    v
}

// --- SSE2 ---

fn aligned16(c: &mut Case, _: &mut Rng) {
    c.gpr[RBX] &= !15;
}

fn aligned8(c: &mut Case, _: &mut Rng) {
    c.gpr[RBX] &= !7;
}

fn sse_move_table() -> Vec<Form> {
    let mut v = Vec::new();
    v.push(Form::new("movdqa x,x", |a, _| a.movdqa(xmm1, xmm9)));
    v.push(
        Form::new("movdqa x,m", |a, _| a.movdqa(xmm2, xmmword_ptr(rbx)))
            .mem()
            .setup(aligned16),
    );
    v.push(
        Form::new("movdqa m,x", |a, _| {
            a.movdqa(xmmword_ptr(rbx + 0x10), xmm12)
        })
        .mem()
        .setup(aligned16),
    );
    v.push(
        Form::new("movdqa x,m misaligned (#GP)", |a, _| {
            a.movdqa(xmm2, xmmword_ptr(rbx + 4))
        })
        .mem()
        .setup(aligned16),
    );
    v.push(Form::new("movdqu x,x", |a, _| a.movdqu(xmm15, xmm0)));
    v.push(Form::new("movdqu x,m", |a, _| a.movdqu(xmm3, xmmword_ptr(rbx + 1))).mem());
    v.push(Form::new("movdqu m,x", |a, _| a.movdqu(xmmword_ptr(rbx + 3), xmm4)).mem());
    v.push(Form::new("movaps x,x", |a, _| a.movaps(xmm1, xmm2)));
    v.push(
        Form::new("movaps x,m", |a, _| a.movaps(xmm10, xmmword_ptr(rbx)))
            .mem()
            .setup(aligned16),
    );
    v.push(
        Form::new("movaps m,x", |a, _| a.movaps(xmmword_ptr(rbx), xmm5))
            .mem()
            .setup(aligned16),
    );
    v.push(Form::new("movups x,x", |a, _| a.movups(xmm8, xmm7)));
    v.push(Form::new("movups x,m", |a, _| a.movups(xmm6, xmmword_ptr(rbx + 7))).mem());
    v.push(Form::new("movups m,x", |a, _| a.movups(xmmword_ptr(rbx + 9), xmm6)).mem());
    v.push(Form::new("movq x,r64", |a, _| a.movq(xmm1, r9)));
    v.push(Form::new("movq r64,x", |a, _| a.movq(r9, xmm11)));
    v.push(Form::new("movq x,x", |a, _| a.movq(xmm1, xmm2)));
    v.push(Form::new("movq x,m64", |a, _| a.movq(xmm3, qword_ptr(rbx))).mem());
    v.push(Form::new("movq m64,x", |a, _| a.movq(qword_ptr(rbx + 5), xmm13)).mem());
    v.push(Form::new("movd x,r32", |a, _| a.movd(xmm1, r9d)));
    v.push(Form::new("movd r32,x", |a, _| a.movd(r9d, xmm14)));
    v.push(Form::new("movd x,m32", |a, _| a.movd(xmm5, dword_ptr(rbx + 2))).mem());
    v.push(Form::new("movd m32,x", |a, _| a.movd(dword_ptr(rbx), xmm5)).mem());
    v.push(Form::new("pmovmskb r32,x", |a, _| a.pmovmskb(r9d, xmm3)));
    v.push(Form::new("pmovmskb r64,x", |a, _| a.pmovmskb(r9, xmm12)));
    v
}

fn sse_alu_table() -> Vec<Form> {
    let mut v = Vec::new();
    macro_rules! binop {
        ($($op:ident),*) => {$(
            let n = stringify!($op);
            v.push(Form::new(format!("{n} x,x"), |a, _| a.$op(xmm1, xmm2)));
            v.push(Form::new(format!("{n} x,same"), |a, _| a.$op(xmm7, xmm7)));
            v.push(Form::new(format!("{n} xhi,xhi"), |a, _| a.$op(xmm9, xmm14)));
            v.push(Form::new(format!("{n} x,m"), |a, _| a.$op(xmm3, xmmword_ptr(rbx))).mem().setup(aligned16));
        )*};
    }
    binop!(
        pxor, por, pand, pandn, pcmpeqb, pcmpeqd, pcmpgtb, paddb, psubb, pminub, punpcklbw,
        punpcklwd, punpckldq, punpcklqdq
    );
    v.push(
        Form::new("pxor m misaligned (#GP)", |a, _| {
            a.pxor(xmm3, xmmword_ptr(rbx + 1))
        })
        .mem()
        .setup(aligned16),
    );
    // Some byte-equal lanes so PCMPEQ is not always zero.
    v.push(
        Form::new("pcmpeqb x,x similar", |a, _| a.pcmpeqb(xmm1, xmm2)).setup(|c, r| {
            for k in 0..16 {
                if r.bool() {
                    c.xmm[1][k] = c.xmm[2][k];
                }
            }
        }),
    );
    v.push(
        Form::new("pcmpeqd x,x similar", |a, _| a.pcmpeqd(xmm1, xmm2)).setup(|c, r| {
            for k in 0..4 {
                if r.bool() {
                    let (lo, hi) = (4 * k, 4 * k + 4);
                    let src = c.xmm[2];
                    c.xmm[1][lo..hi].copy_from_slice(&src[lo..hi]);
                }
            }
        }),
    );
    v.push(Form::new("pshufd x,x,imm", |a, i| {
        a.pshufd(xmm1, xmm2, i as u8 as i32)
    }));
    v.push(Form::new("pshufd x,same,imm", |a, i| {
        a.pshufd(xmm10, xmm10, i as u8 as i32)
    }));
    v.push(
        Form::new("pshufd x,m,imm", |a, i| {
            a.pshufd(xmm3, xmmword_ptr(rbx), i as u8 as i32)
        })
        .mem()
        .setup(aligned16),
    );
    v.push(Form::new("pslldq x,imm", |a, i| {
        a.pslldq(xmm4, (i % 20) as i32)
    }));
    v.push(Form::new("psrldq x,imm", |a, i| {
        a.psrldq(xmm11, (i % 20) as i32)
    }));
    v
}

// ---------------------------------------------------------------------------------------------
// Tests: one per group.
// ---------------------------------------------------------------------------------------------

#[test]
fn alu_add_adc_sub_sbb_and_or_xor_cmp_test() {
    run_group("alu", alu_table(), false);
}

#[test]
fn inc_dec_neg_not() {
    run_group("unary", unary_table(), false);
}

#[test]
fn shifts_and_rotates() {
    run_group("shifts", shift_table(), false);
}

#[test]
fn shld_shrd() {
    run_group("shld/shrd", shld_table(), false);
}

#[test]
fn mul_imul_div_idiv() {
    run_group("muldiv", muldiv_table(), false);
}

#[test]
fn mov_movzx_movsx_lea_bswap_convert_flags() {
    run_group("mov", mov_table(), false);
}

#[test]
fn cmovcc_setcc_jcc_loop() {
    run_group("cc", cc_table(), false);
}

#[test]
fn xchg_xadd_cmpxchg() {
    run_group("xchg", xchg_table(), false);
}

#[test]
fn bt_bts_btr_btc_bsf_bsr() {
    run_group("bits", bit_table(), false);
}

#[test]
fn push_pop_call_ret_enter_leave() {
    run_group("stack", stack_table(), false);
}

#[test]
fn string_instructions() {
    run_group("strings", string_table(), false);
}

#[test]
fn sse2_moves() {
    run_group("sse2 moves", sse_move_table(), true);
}

#[test]
fn sse2_integer_ops() {
    run_group("sse2 integer", sse_alu_table(), true);
}

/// The harness itself: a host-only sanity check that the prologue/epilogue round-trips a state
/// through a NOP unchanged, and that a faulting DIV is caught as SIGFPE.
#[test]
fn harness_self_check() {
    let image = host_image();
    let nop = Form::new("nop", |a, _| a.nop());
    let mut rng = Rng(1);
    let mut c = nop.gen_case(&mut rng);
    nop.assemble(&mut c);
    let h = run_on_host("self-check nop", std::slice::from_ref(&c), &image);
    assert_eq!(h[0].signal, 0);
    assert_eq!(h[0].gpr, c.gpr);
    assert_eq!(h[0].rip, INSN + 1);
    assert_eq!(h[0].rflags & STATUS_DF, c.rflags & STATUS_DF);
    assert_eq!(h[0].xmm, c.xmm);
    assert_eq!(h[0].data, c.data);
    assert_eq!(h[0].stack, c.stack);
    // The context really carries flags and memory: STC sets CF, STD sets DF, a store lands.
    for (form, check) in [
        (
            Form::new("stc", |a, _| a.stc()),
            (|o: &Outcome, _: &Case| o.rflags & CF != 0) as fn(&Outcome, &Case) -> bool,
        ),
        (Form::new("std", |a, _| a.std()), |o, _| o.rflags & DF != 0),
        (Form::new("xor", |a, _| a.xor(r9d, r9d)), |o, _| {
            o.rflags & ZF != 0 && o.gpr[R9] == 0
        }),
        (
            Form::new("store", |a, _| a.mov(qword_ptr(rbx), r9)).mem(),
            |o, c| {
                let at = (c.gpr[RBX] - DATA) as usize;
                o.data[at..at + 8] == c.gpr[R9].to_le_bytes()
            },
        ),
        (Form::new("push", |a, _| a.push(r9)), |o, c| {
            let at = (c.gpr[RSP] - 8 - STACK) as usize;
            o.gpr[RSP] == c.gpr[RSP] - 8 && o.stack[at..at + 8] == c.gpr[R9].to_le_bytes()
        }),
    ] {
        let mut c = form.gen_case(&mut rng);
        c.rflags = 2;
        form.assemble(&mut c);
        let h = run_on_host("self-check", std::slice::from_ref(&c), &image);
        assert!(check(&h[0], &c), "host self-check {} failed", form.name);
    }
    let div0 = Form::new("div", |a, _| a.div(rcx)).setup(|c, _| c.gpr[RCX] = 0);
    let mut c = div0.gen_case(&mut rng);
    div0.assemble(&mut c);
    let h = run_on_host("self-check div", std::slice::from_ref(&c), &image);
    assert_eq!(h[0].signal, libc::SIGFPE as u64);
    let mut fc = FlatCpu::new();
    let e = run_on_emu(&mut fc, &c);
    assert_eq!(e.vector, Some(0), "the emulator raises #DE for DIV by zero");
}
