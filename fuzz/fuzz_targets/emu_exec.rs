//! Block execution against single-stepping on arbitrary code from an arbitrary (but
//! architecturally reachable) register state, at CPL 0 or 3.
//!
//! The first [`HEADER`] bytes of the input choose the registers, RFLAGS and mode (see
//! `ferrovisor_fuzz::parse`); the rest is code at 0x10_0000. Two fresh CPUs run it: one with a
//! single `step(N)`, the other with N `step(1)` calls. The emulator must not panic in either,
//! and both must end with the same registers, RIP and RFLAGS — and the same exit, instruction
//! count, architectural state and guest RAM. On a difference the target panics with a report
//! that names the first instruction count at which the two ways part.
#![no_main]

use ferrovisor_fuzz::{
    difference, disassemble, hex, outcome, parse, prepare, run_blocks, run_single, self_modifying,
    skipping, trace, Setup, HEADER,
};
use libfuzzer_sys::fuzz_target;

/// Instructions per run.
const N: u64 = 64;

fn compare(setup: &Setup, code: &[u8], n: u64) -> Option<String> {
    let mut a = prepare(setup, code);
    let ea = run_blocks(&mut a, n);
    let oa = outcome(&a, ea);
    let mut b = prepare(setup, code);
    let eb = run_single(&mut b, n);
    let ob = outcome(&b, eb);
    difference(&a, &oa, &b, &ob)
}

fuzz_target!(|data: &[u8]| {
    let (setup, code) = parse(data);
    if std::env::var_os("EMU_FUZZ_TRACE").is_some() {
        trace(&setup, code, N);
    }
    if let Some(diff) = compare(&setup, code, N) {
        let smc = self_modifying(&setup, code, N);
        if let Some((_, j)) = smc {
            // Skipping requested: skip the input if the runs still agree right after the store.
            if skipping("smc") && compare(&setup, code, j).is_none() {
                return;
            }
        }
        // Find the shortest budget that already shows a difference, for the report.
        let first = (1..=N)
            .find_map(|k| compare(&setup, code, k).map(|d| (k, d)))
            .unwrap_or((N, diff.clone()));
        let smc = match smc {
            Some((a, j)) if j < first.0 => format!(
                "\nInstruction {j} rewrote {a:#x}, near code the run executed: self-modifying \
                 code, which a block compiled from the old bytes must not run on \
                 (EMU_FUZZ_SKIP=smc skips such inputs)."
            ),
            _ => String::new(),
        };
        let at = {
            let mut g = prepare(&setup, code);
            run_single(&mut g, first.0 - 1);
            g.c.regs().rip
        };
        panic!(
            "emu_exec: step({N}) and {N} x step(1) end differently.{smc}\n{diff}\n\
             First seen with a budget of {} (instruction at rip {at:#x}): {}\n\
             initial state: {setup:x?}\ninput ({} bytes, header {HEADER}): {}\ncode:\n{}",
            first.0,
            first.1,
            data.len(),
            hex(data),
            disassemble(code, 80),
        );
    }
});
