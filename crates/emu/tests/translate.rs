//! Translated blocks against the general interpreter: random runs of the instructions the
//! translator handles — register, immediate and memory forms of MOV and the ALU group, INC,
//! DEC, NEG, NOT, LEA, MOVZX/MOVSX, shifts, PUSH/POP, CALL/RET and conditional branches — run
//! with every 64-bit block translated on its first entry and run one instruction at a time by
//! the general interpreter from the same state must end in the same registers, flags and
//! memory; stores into the running block, loads that fault and budgets that end inside a
//! block must land where the interpreter does.
#![cfg(target_arch = "x86_64")]

use emu::testkit::{FlatCpu, Regs};
use iced_x86::code_asm::*;

mod common;
use common::{Rng, REGS16, REGS32, REGS64, REGS8};

const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x18_0000;
const STACK_TOP: u64 = 0x20_0000;
/// Status flags plus DF.
const FLAGS: u64 = 0x8d5 | 0x400;

/// Appends one random instruction of the forms the translator handles (and a few it does
/// not, which keep their block with the interpreter). R12 holds DATA and R13 a small index,
/// never written, so memory operands stay in the data page.
fn random_insn(a: &mut CodeAssembler, r: &mut Rng, data: CodeLabel) -> Result<(), IcedError> {
    let x = REGS64[r.below(8) as usize];
    let y = REGS64[r.below(8) as usize];
    let x32 = REGS32[r.below(8) as usize];
    let y32 = REGS32[r.below(8) as usize];
    let b8 = REGS8[r.below(8) as usize];
    let w16 = REGS16[r.below(8) as usize];
    let imm = (r.next() as i32) >> r.below(31);
    let disp = (r.below(64) * 8) as i32;
    let q = qword_ptr(r12 + disp);
    let d = dword_ptr(r12 + disp);
    let b = byte_ptr(r12 + disp + r.below(8) as i32);
    let w = word_ptr(r12 + disp + 2 * r.below(4) as i32);
    let b8b = REGS8[r.below(8) as usize];
    let w16b = REGS16[r.below(8) as usize];
    match r.below(52) {
        34 => a.test(b8, imm as i8 as i32),
        35 => a.cmp(b, imm as i8 as i32),
        36 => a.mov(b, b8),
        37 => a.mov(b8, b),
        38 => a.add(b8, b8b),
        39 => a.and(w16, w16b),
        40 => a.or(w, imm as i16 as i32),
        41 => a.inc(qword_ptr(r12 + disp)),
        42 => a.dec(b),
        43 => a.cmovb(x, y),
        44 => a.cmovle(x32, d),
        45 => a.setg(b8),
        46 => a.setne(b),
        47 => a.shr(x, cl),
        48 => a.shr(x32, 1u32),
        49 => a.rol(b8, (r.below(16)) as u32),
        50 => a.neg(w),
        51 => a.test(b, b8),
        0 => a.add(x, y),
        1 => a.sub(x32, y32),
        2 => a.and(x, imm),
        3 => a.or(x32, imm),
        4 => a.xor(x, y),
        5 => a.cmp(x, y),
        6 => a.test(x32, y32),
        7 => a.mov(x, y),
        8 => a.mov(x32, imm),
        9 => a.mov(x, q),
        10 => a.mov(q, y),
        11 => a.mov(d, y32),
        12 => a.mov(x32, d),
        13 => a.add(x, q),
        14 => a.sub(q, y),
        15 => a.cmp(d, imm),
        16 => a.and(q, imm),
        17 => a.inc(x),
        18 => a.dec(x32),
        19 => a.neg(x),
        20 => a.not(x32),
        21 => a.lea(x, qword_ptr(y + r13 * 8 + imm)),
        22 => a.lea(x32, qword_ptr(y + imm)),
        23 => a.movzx(x32, b8),
        24 => a.movsx(x, w16),
        25 => a.movzx(x, byte_ptr(r12 + disp + 3)),
        26 => a.movsxd(x, d),
        27 => a.shl(x, (r.below(64)) as u32),
        28 => a.sar(x32, (r.below(32)) as u32),
        29 => a.mov(x, qword_ptr(data)),
        30 => a.mov(qword_ptr(r12 + r13 * 8 + 16), x),
        31 => a.xor(x32, x32),
        32 => a.adc(x, y),
        _ => a.imul_2(x, y),
    }
}

fn random_regs(r: &mut Rng) -> Regs {
    let mut regs = Regs::default();
    for g in regs.gpr.iter_mut() {
        *g = common::random_value(r);
    }
    regs.gpr[4] = STACK_TOP;
    regs.gpr[12] = DATA;
    regs.gpr[13] = r.below(8);
    regs.rip = CODE;
    regs.rflags = 0x2 | (r.next() & 0x8d5);
    regs
}

/// One machine's end state: registers, the exception frame's RIP if it stopped in a
/// handler, the data page and the top of the stack.
type End = (Regs, Option<u64>, Vec<u8>, Vec<u8>);

fn run(code: &[u8], regs: &Regs, data: &[u8], steps: u64, translate: bool) -> (End, u64) {
    let mut c = FlatCpu::new();
    c.load_code(CODE, code);
    c.write(DATA, data);
    c.set_regs(regs);
    if translate {
        c.cpu.set_translate_threshold(1);
        c.step(steps);
    } else {
        c.cpu.run_interpreted(steps);
    }
    let frame_rip = c.exception().map(|e| e.rip);
    let mut end = c.regs();
    end.rflags &= FLAGS;
    let translated = c.cpu.blocks_translated();
    (
        (
            end,
            frame_rip,
            c.read(DATA, 4096),
            c.read(STACK_TOP - 256, 256),
        ),
        translated,
    )
}

fn data_page(r: &mut Rng) -> Vec<u8> {
    (0..4096).map(|_| r.next() as u8).collect()
}

#[test]
fn translated_blocks_end_where_the_interpreter_does() {
    let mut r = Rng(0x7a11_5eed_0bad_f00d);
    let mut translated = 0;
    for case in 0..1500 {
        let n = 1 + r.below(24);
        let mut seed = Rng(r.next() | 1);
        let shape = r.below(4);
        let code = assemble(|a| {
            let mut data = a.create_label();
            let mut func = a.create_label();
            let mut skip = a.create_label();
            for k in 0..n {
                random_insn(a, &mut seed, data)?;
                if shape == 1 && k == n / 2 {
                    a.jne(skip)?;
                }
                if shape == 2 && k == n / 2 {
                    a.push(rsi)?;
                    a.call(func)?;
                    a.pop(rsi)?;
                }
            }
            a.set_label(&mut skip)?;
            a.hlt()?;
            a.set_label(&mut func)?;
            a.mov(r10, qword_ptr(rsp))?;
            a.ret()?;
            a.set_label(&mut data)?;
            a.dq(&[0x0123_4567_89ab_cdef])
        });
        let regs = random_regs(&mut r);
        let data = data_page(&mut r);
        let steps = n + 6;
        let (interpreted, _) = run(&code, &regs, &data, steps, false);
        let (native, t) = run(&code, &regs, &data, steps, true);
        translated += t;
        assert_eq!(
            native, interpreted,
            "case {case}: the translated block ends elsewhere for {code:02x?} from {regs:x?}"
        );
        // A budget that ends inside the code: the block runs interpreted up to it.
        let cut = 1 + r.below(steps);
        assert_eq!(
            run(&code, &regs, &data, cut, true).0,
            run(&code, &regs, &data, cut, false).0,
            "case {case}: a budget of {cut} ends elsewhere"
        );
    }
    assert!(
        translated > 500,
        "only {translated} blocks were translated: the test does not exercise the translator"
    );
}

#[test]
fn a_loop_runs_translated_and_ends_with_the_interpreters_state() {
    let mut r = Rng(0x1005_1005_cafe_d00d);
    for case in 0..300 {
        let n = 1 + r.below(10);
        let rounds = 1 + r.below(40);
        let mut seed = Rng(r.next() | 1);
        let code = assemble(|a| {
            let data = a.create_label();
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            for _ in 0..n {
                random_insn(a, &mut seed, data)?;
            }
            a.dec(r15)?;
            a.jnz(top)?;
            a.hlt()
        });
        let mut regs = random_regs(&mut r);
        regs.gpr[15] = rounds;
        let data = data_page(&mut r);
        let steps = (n + 2) * rounds + 1;
        let (native, _) = run(&code, &regs, &data, steps, true);
        let (interpreted, _) = run(&code, &regs, &data, steps, false);
        assert_eq!(
            native, interpreted,
            "case {case}: {code:02x?} from {regs:x?}"
        );
    }
}

#[test]
fn faults_and_stores_into_the_block_are_left_to_the_interpreter() {
    // A load from a non-canonical address in the middle of a translated block: the
    // exception frame holds that instruction's address and the registers as before it.
    let code = assemble(|a| {
        a.add(rax, rcx)?;
        a.mov(rdx, qword_ptr(r11))?;
        a.add(rax, 1)?;
        a.hlt()
    });
    let mut regs = random_regs(&mut Rng(5));
    regs.gpr[11] = 0x8000_0000_0000_0000;
    let data = vec![0; 4096];
    let (native, t) = run(&code, &regs, &data, 10, true);
    assert!(t > 0, "the block was not translated");
    assert_eq!(native, run(&code, &regs, &data, 10, false).0);
    assert!(native.1.is_some(), "the load did not fault");

    // LOOPNE has a condition code, but also a counter: it stays with the interpreter.
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(rax, 3)?;
        a.cmp(rax, 1000)?;
        a.loopne(top)?;
        a.hlt()
    });
    let mut regs = random_regs(&mut Rng(6));
    regs.gpr[0] = 0;
    regs.gpr[1] = 50;
    let (native, t) = run(&code, &regs, &data, 200, true);
    assert!(t > 0, "the block was not translated");
    assert_eq!(native, run(&code, &regs, &data, 200, false).0);
    assert_eq!(native.0.gpr[0], 150, "LOOPNE must count RCX down");

    // A store into the next instruction's immediate: the new value is loaded, as on a CPU.
    let code = [
        0xc7, 0x04, 0x25, 0x0c, 0x00, 0x10, 0x00, 0x05, 0x00, 0x00,
        0x00, // mov dword [0x10000c], 5
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0xf4, // hlt
    ];
    let regs = Regs {
        rip: CODE,
        rflags: 0x2,
        gpr: {
            let mut g = [0; 16];
            g[4] = STACK_TOP;
            g
        },
    };
    let (native, t) = run(&code, &regs, &data, 3, true);
    assert!(t > 0, "the block was not translated");
    assert_eq!(
        native.0.gpr[0], 5,
        "the translated block must see its new code"
    );
}

fn assemble(body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("64-bit assembler");
    body(&mut a).expect("assembles");
    a.assemble(CODE).expect("assembles")
}
