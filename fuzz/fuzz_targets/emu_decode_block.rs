//! Arbitrary bytes as user-mode (CPL 3) code: the block decoder/compiler and the interpreter
//! must not panic, must not touch host memory outside guest RAM (guard mappings turn that into
//! a crash), and `step(budget)` must return having retired at most `budget` instructions.
//!
//! Input: byte 0 chooses where the code goes (bits 0-1: at 0x10_0000; ending just before a
//! page boundary, so the block stops at the page end and instructions straddle it; or ending
//! exactly at the top of guest RAM, so decoding runs into non-RAM) and, with bit 2, that every
//! block entered is translated to host code (`emu::cpu` translate.rs: the generated code must
//! not touch host memory outside guest RAM either); byte 1 the page-boundary offset; the rest
//! is the code.
#![no_main]

use emu::testkit::Regs;
use ferrovisor_fuzz::{GuardedCpu, CODE, STACK_TOP};
use libfuzzer_sys::fuzz_target;

/// Instructions per run.
const BUDGET: u64 = 256;

fuzz_target!(|data: &[u8]| {
    let (sel, off, code) = match data {
        [s, o, rest @ ..] => (*s, *o, rest),
        _ => return,
    };
    let code = &code[..code.len().min(64 << 10)];
    let mut g = GuardedCpu::new();
    let ram = g.c.ram_size();
    let len = code.len() as u64;
    let at = match sel & 3 {
        // Straddling the page boundary at 0x10_1000 by `off % 16` bytes.
        1 => 0x10_1000 - len.min(0x1000) + u64::from(off % 16).min(len),
        // Ending exactly at the top of RAM.
        2 if len > 0 => ram - len,
        _ => CODE,
    };
    g.c.load_code(at, code);
    let regs = Regs {
        gpr: {
            let mut r = [0u64; 16];
            r[4] = STACK_TOP;
            r
        },
        rip: at,
        rflags: 0x2,
    };
    g.c.set_regs(&regs);
    g.c.set_user_mode(true);
    if sel & 4 != 0 {
        g.c.cpu.set_translate_threshold(1);
    }
    let before = g.c.cpu.icount;
    let _ = g.c.step(BUDGET);
    let retired = g.c.cpu.icount - before;
    assert!(
        retired <= BUDGET,
        "step({BUDGET}) retired {retired} instructions"
    );
});
