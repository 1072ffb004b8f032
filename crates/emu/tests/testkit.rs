//! Tests of the test kit itself: `FlatCpu` runs code in 64-bit mode at CPL 0 and 3, and
//! reports exceptions through its IDT stubs.

use emu::cpu::state::flags::{CF, IF};
use emu::cpu::RunExit;
use emu::testkit::{layout, FlatCpu, Regs};

const CODE: u64 = layout::FREE;

fn regs_with(fc: &FlatCpu, set: &[(usize, u64)]) -> Regs {
    let mut r = fc.regs();
    for &(i, v) in set {
        r.gpr[i] = v;
    }
    r
}

#[test]
fn runs_code_and_reads_memory() {
    let mut fc = FlatCpu::new();
    // add rax, rcx; mov [rdx], rax; stc
    fc.load_code(CODE, &[0x48, 0x01, 0xc8, 0x48, 0x89, 0x02, 0xf9]);
    let r = regs_with(&fc, &[(0, 40), (1, 2), (2, 0x20_0000)]);
    fc.set_regs(&r);
    assert_eq!(fc.step(3), RunExit::Budget);
    let r = fc.regs();
    assert_eq!(r.gpr[0], 42);
    assert_eq!(r.rip, CODE + 7);
    assert_ne!(r.rflags & CF, 0);
    assert_eq!(fc.read_u64(0x20_0000), 42);
    assert_eq!(fc.read(0x20_0000, 2), vec![42, 0]);
    assert_eq!(fc.exception(), None);
}

#[test]
fn reports_exceptions_with_error_codes() {
    let mut fc = FlatCpu::new();
    // ud2
    fc.load_code(CODE, &[0x0f, 0x0b]);
    fc.step(1);
    let e = fc.exception().expect("#UD");
    assert_eq!((e.vector, e.error_code, e.rip), (6, None, CODE));
    // A stopped CPU stays stopped.
    assert_eq!(fc.step(10), RunExit::Dead);

    // mov al, [rbx] with RBX beyond RAM: not mapped, #PF with CR2.
    fc.reset_state();
    fc.load_code(CODE, &[0x8a, 0x03]);
    let beyond = fc.ram_size() + 0x1234;
    let r = regs_with(&fc, &[(3, beyond)]);
    fc.set_regs(&r);
    fc.step(1);
    let e = fc.exception().expect("#PF");
    assert_eq!(e.vector, 14);
    assert_eq!(e.error_code, Some(0));
    assert_eq!(e.cr2, beyond);

    // div rcx with RCX = 0.
    fc.reset_state();
    fc.load_code(CODE, &[0x48, 0xf7, 0xf1]);
    fc.step(1);
    assert_eq!(fc.exception().map(|e| e.vector), Some(0));
}

#[test]
fn user_mode_runs_and_faults_onto_the_kernel_stack() {
    let mut fc = FlatCpu::new();
    fc.set_user_mode(true);
    assert_eq!(fc.cpu.s.cpl(), 3);
    // inc rax; hlt (privileged at CPL 3: #GP(0))
    fc.load_code(CODE, &[0x48, 0xff, 0xc0, 0xf4]);
    let mut r = regs_with(&fc, &[(0, 1), (4, 0x30_0000)]);
    r.rflags |= IF;
    fc.set_regs(&r);
    fc.step(2);
    let e = fc.exception().expect("#GP");
    assert_eq!((e.vector, e.error_code, e.rip), (13, Some(0), CODE + 3));
    assert_eq!(fc.regs().gpr[0], 2);
    assert_eq!(fc.cpu.s.cpl(), 0);
    // The frame is on the TSS's RSP0 stack: [code, rip, cs, rflags, rsp, ss].
    let sp = fc.regs().gpr[4];
    assert_eq!(sp, layout::KERNEL_STACK_TOP - 48);
    assert_eq!(fc.read_u64(sp + 16), u64::from(layout::USER_CS));
    assert_eq!(fc.read_u64(sp + 32), 0x30_0000);
}
