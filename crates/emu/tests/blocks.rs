//! Block execution against single-stepping: random runs of register instructions (the forms the
//! block compiler may compile without their flag computations when nothing can observe them)
//! executed as whole blocks and one instruction at a time from the same state must end in the
//! same registers and flags, and, when a later instruction faults, push the same flags in the
//! exception frame. Blocks with memory operands, calls and faults are also held against the
//! general interpreter alone (`Cpu::run_interpreted`).
#![cfg(target_arch = "x86_64")]

use emu::testkit::{FlatCpu, Regs};
use iced_x86::code_asm::*;

mod common;
use common::{Rng, REGS32, REGS64, REGS8};

const CODE: u64 = 0x10_0000;
const STACK_TOP: u64 = 0x20_0000;
/// Status flags plus DF: what a difference would show in.
const FLAGS: u64 = 0x8d5 | 0x400;

/// Appends one random register-only instruction.
fn random_insn(a: &mut CodeAssembler, r: &mut Rng) -> Result<(), IcedError> {
    let x = REGS64[r.below(8) as usize];
    let y = REGS64[r.below(8) as usize];
    let x32 = REGS32[r.below(8) as usize];
    let y32 = REGS32[r.below(8) as usize];
    let b8 = REGS8[r.below(8) as usize];
    let imm = (r.next() as i32) >> r.below(31);
    let sh = r.below(70) as u32;
    match r.below(26) {
        0 => a.add(x, y),
        1 => a.sub(x, y),
        2 => a.and(x, imm),
        3 => a.or(x32, y32),
        4 => a.xor(x, y),
        5 => a.cmp(x, y),
        6 => a.test(x32, y32),
        7 => a.imul_2(x, y),
        8 => a.imul_3(x32, y32, imm),
        9 => a.shl(x, sh),
        10 => a.shr(x32, sh),
        11 => a.sar(x, sh),
        12 => a.shl(x, cl),
        13 => a.inc(x),
        14 => a.dec(x32),
        15 => a.neg(x),
        16 => a.adc(x, y),
        17 => a.sbb(x32, y32),
        18 => a.setb(b8),
        19 => a.cmovae(x, y),
        20 => a.setne(b8),
        21 => a.add(x32, imm),
        22 => a.sub(x, imm),
        23 => a.mov(x, y),
        24 => a.lea(x, qword_ptr(y + x * 4 + imm)),
        _ => a.rol(x, sh),
    }
}

fn random_regs(r: &mut Rng) -> Regs {
    let mut regs = Regs::default();
    for g in regs.gpr.iter_mut() {
        *g = common::random_value(r);
    }
    regs.gpr[4] = STACK_TOP;
    regs.rip = CODE;
    regs.rflags = 0x2 | (r.next() & 0x8d5);
    regs
}

fn assemble(body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("64-bit assembler");
    body(&mut a).expect("assembles");
    a.assemble(CODE).expect("assembles")
}

/// Runs `code` from `regs` as blocks (a large budget) and one instruction per run; returns
/// both end states (registers, and the exception frame's RFLAGS if the CPU stopped in a
/// handler).
fn both_ways(code: &[u8], regs: &Regs, steps: u64) -> [(Regs, Option<u64>); 2] {
    let mut out = [(Regs::default(), None); 2];
    for (way, slot) in out.iter_mut().enumerate() {
        let mut c = FlatCpu::new();
        c.load_code(CODE, code);
        c.set_regs(regs);
        if way == 0 {
            c.step(steps);
        } else {
            for _ in 0..steps {
                c.step(1);
            }
        }
        let frame_flags = c.exception().map(|e| {
            let rsp_now = c.regs().gpr[4];
            let frame = if e.error_code.is_some() {
                rsp_now + 8
            } else {
                rsp_now
            };
            c.read_u64(frame + 16)
        });
        *slot = (c.regs(), frame_flags);
    }
    out
}

/// Runs `code` both ways for `steps` instructions: single-stepping must reach its end (the
/// HLT), and blocks the same registers and flags.
fn assert_both_ways_reach_the_end(case: u64, code: &[u8], regs: &Regs, steps: u64) {
    let [(blocks, _), (single, _)] = both_ways(code, regs, steps);
    assert_eq!(
        single.rip,
        CODE + code.len() as u64,
        "case {case}: did not reach the end"
    );
    assert_eq!(
        (blocks.gpr, blocks.rflags & FLAGS),
        (single.gpr, single.rflags & FLAGS),
        "case {case}: block execution diverges from single-stepping for {code:02x?} from {regs:x?}"
    );
}

#[test]
fn blocks_end_in_the_state_single_stepping_reaches() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..3000 {
        let n = 1 + r.below(20);
        let mut seed = Rng(r.next() | 1);
        let code = assemble(|a| {
            for _ in 0..n {
                random_insn(a, &mut seed)?;
            }
            a.hlt()
        });
        let regs = random_regs(&mut r);
        assert_both_ways_reach_the_end(case, &code, &regs, n + 1);
    }
}

#[test]
fn a_fault_after_dropped_flag_computations_shows_the_exact_flags() {
    let mut r = Rng(0x1234_5678_9abc_def1);
    for case in 0..1000 {
        let n = 1 + r.below(12);
        let mut seed = Rng(r.next() | 1);
        // Random instructions, then a load from a non-canonical address (#GP), then more
        // instructions that would have overwritten the flags.
        let code = assemble(|a| {
            for _ in 0..n {
                random_insn(a, &mut seed)?;
            }
            a.mov(r10, qword_ptr(r11))?;
            a.add(rax, rcx)?;
            a.hlt()
        });
        let mut regs = random_regs(&mut r);
        regs.gpr[11] = 0x8000_0000_0000_0000;
        let [(_, blocks), (_, single)] = both_ways(&code, &regs, n + 3);
        assert!(single.is_some(), "case {case}: the load did not fault");
        assert_eq!(
            blocks.map(|f| f & FLAGS),
            single.map(|f| f & FLAGS),
            "case {case}: the exception frame's RFLAGS differ for {code:02x?}"
        );
    }
}

#[test]
fn a_store_into_the_running_block_takes_effect_at_once() {
    // mov byte [0x100009], 5   ; the immediate of the next instruction
    // mov eax, 1               ; so this loads 5, as on a CPU
    // hlt
    let code = [
        0xc6, 0x04, 0x25, 0x09, 0x00, 0x10, 0x00, 0x05, 0xb8, 0x01, 0x00, 0x00, 0x00, 0xf4,
    ];
    assert_eq!(CODE + 9, 0x10_0009);
    let mut regs = Regs {
        rip: CODE,
        rflags: 0x2,
        ..Regs::default()
    };
    regs.gpr[4] = STACK_TOP;
    let [(blocks, _), (single, _)] = both_ways(&code, &regs, 3);
    assert_eq!(single.gpr[0], 5, "single-stepping sees the new immediate");
    assert_eq!(blocks.gpr[0], 5, "block execution must see it too");
}

#[test]
fn a_loop_that_rewrites_its_own_body_runs_the_new_code() {
    // A block that jumps back to its own start goes round without re-checking its bytes;
    // a store into them must still end that, as a CPU refetches.
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(edx, 1)?; // 83 c2 01: the immediate is at CODE + 2
        a.mov(byte_ptr(CODE + 2), 2)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    assert_eq!(&code[..3], &[0x83, 0xc2, 0x01]);
    let mut regs = Regs {
        rip: CODE,
        rflags: 0x2,
        ..Regs::default()
    };
    regs.gpr[1] = 4;
    regs.gpr[4] = STACK_TOP;
    let [(blocks, _), (single, _)] = both_ways(&code, &regs, 4 * 4 + 1);
    assert_eq!(
        single.gpr[2],
        1 + 2 + 2 + 2,
        "single-stepping adds the new immediate"
    );
    assert_eq!(blocks.gpr[2], single.gpr[2], "the looping block must too");
}

#[test]
fn loops_end_in_the_state_single_stepping_reaches() {
    // Random bodies that go round a counted loop: the block runs itself again without a
    // lookup, and must still stop exactly at the budget and agree with single-stepping.
    let mut r = Rng(0x0bad_cafe_1234_5679);
    for case in 0..500 {
        let n = 1 + r.below(12);
        let rounds = 1 + r.below(6);
        let mut seed = Rng(r.next() | 1);
        let code = assemble(|a| {
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            for _ in 0..n {
                random_insn(a, &mut seed)?;
            }
            a.dec(r15)?;
            a.jnz(top)?;
            a.hlt()
        });
        let mut regs = random_regs(&mut r);
        regs.gpr[15] = rounds;
        let steps = (n + 2) * rounds + 1;
        assert_both_ways_reach_the_end(case, &code, &regs, steps);
        // Stopping mid-loop at the budget lands where single-stepping does.
        let cut = 1 + r.below(steps - 1);
        let [(blocks, _), (single, _)] = both_ways(&code, &regs, cut);
        assert_eq!(
            (blocks.rip, blocks.gpr),
            (single.rip, single.gpr),
            "case {case}: a budget of {cut} stops elsewhere"
        );
    }
}

#[test]
fn rip_relative_operands_calls_and_faults_agree_with_the_interpreter() {
    // Blocks that read and write RIP-relative data, push, call a function (which reads its
    // return address) and pop, some with a load that faults between random instructions:
    // stopped after every number of instructions (the budget cuts a block there), block
    // execution must be where the general interpreter is, one instruction at a time, and a
    // fault must push the same RIP.
    let mut r = Rng(0x5eed_0fb1_0c4a_1100);
    for case in 0..300 {
        let (n1, n2) = (r.below(6), r.below(6));
        let fault = r.below(2) == 0;
        let mut seed = Rng(r.next() | 1);
        let code = assemble(|a| {
            let mut data = a.create_label();
            let mut data2 = a.create_label();
            let mut func = a.create_label();
            for _ in 0..n1 {
                random_insn(a, &mut seed)?;
            }
            a.mov(rax, qword_ptr(data))?;
            a.mov(qword_ptr(data2), rcx)?;
            a.push(rdx)?;
            a.call(func)?;
            a.pop(rsi)?;
            a.lea(rbx, qword_ptr(data))?;
            if fault {
                a.mov(r10, qword_ptr(r11))?;
            }
            for _ in 0..n2 {
                random_insn(a, &mut seed)?;
            }
            a.add(rdi, qword_ptr(data2))?;
            a.hlt()?;
            a.set_label(&mut func)?;
            a.add(rax, qword_ptr(rsp))?;
            a.ret()?;
            a.set_label(&mut data)?;
            a.dq(&[0x1122_3344_5566_7788])?;
            a.set_label(&mut data2)?;
            a.dq(&[0])
        });
        let mut regs = random_regs(&mut r);
        regs.gpr[11] = 0x8000_0000_0000_0000;
        let steps = n1 + n2 + 10 + u64::from(fault);
        for cut in 1..=steps {
            let mut end = [(Regs::default(), None, 0); 2];
            for (way, slot) in end.iter_mut().enumerate() {
                let mut c = FlatCpu::new();
                c.load_code(CODE, &code);
                c.set_regs(&regs);
                if way == 0 {
                    c.step(cut);
                } else {
                    c.cpu.run_interpreted(cut);
                }
                // The exception frame's RIP (above the error code, if the vector pushes one).
                let frame_rip = c.exception().map(|e| {
                    let top = c.regs().gpr[4];
                    c.read_u64(if e.error_code.is_some() { top + 8 } else { top })
                });
                *slot = (
                    c.regs(),
                    frame_rip,
                    c.read_u64(CODE + code.len() as u64 - 8),
                );
            }
            let [(blocks, brip, bdata), (single, srip, sdata)] = end;
            assert_eq!(
                (blocks.rip, blocks.gpr, brip, bdata),
                (single.rip, single.gpr, srip, sdata),
                "case {case}: after {cut} instructions, blocks and single-stepping differ for \
                 {code:02x?}"
            );
        }
    }
}
