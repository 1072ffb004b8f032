//! REP MOVS / REP STOS over more than one page, overlapping, faulting half way and longer than
//! one run of the loop: the page-at-a-time path must leave memory and registers exactly as
//! element-by-element execution (and hardware) does. Single-page cases are compared with the
//! host CPU in host_compare.rs.

use emu::cpu::state::{RAX, RCX, RDI, RSI};
use emu::testkit::{layout, FlatCpu};

const CODE: u64 = layout::FREE;
const SRC: u64 = 0x40_0000;
const DST: u64 = 0x50_0000;

/// Runs `insn` once (all its iterations) with the given registers, followed by `jmp $`.
fn run(fc: &mut FlatCpu, insn: &[u8], set: &[(usize, u64)]) {
    let mut code = insn.to_vec();
    code.extend_from_slice(&[0xeb, 0xfe]);
    fc.load_code(CODE, &code);
    let mut r = fc.regs();
    for &(i, v) in set {
        r.gpr[i] = v;
    }
    fc.set_regs(&r);
    fc.step(64);
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn rep_movsb_copies_across_pages_between_unaligned_addresses() {
    let mut fc = FlatCpu::new();
    let n = 3 * 4096 + 100;
    let data = pattern(n, 7);
    let (src, dst) = (SRC + 0xff3, DST + 0x21);
    fc.write(src, &data);
    run(
        &mut fc,
        &[0xf3, 0xa4],
        &[(RSI, src), (RDI, dst), (RCX, n as u64)],
    );
    assert_eq!(fc.exception(), None);
    assert_eq!(fc.read(dst, n), data);
    let r = fc.regs();
    assert_eq!(
        (r.gpr[RSI], r.gpr[RDI], r.gpr[RCX]),
        (src + n as u64, dst + n as u64, 0)
    );
    assert_eq!(r.rip, CODE + 2, "stopped on the jmp after the copy");
    // The bytes around the destination are untouched.
    assert_eq!(fc.read(dst - 1, 1), vec![0]);
    assert_eq!(fc.read(dst + n as u64, 1), vec![0]);
}

#[test]
fn an_overlapping_forward_copy_repeats_what_it_just_wrote() {
    let mut fc = FlatCpu::new();
    // rep movsb with RDI = RSI + 3: every byte reads one the copy wrote three bytes earlier,
    // so the first three bytes repeat (element order, not memmove).
    fc.write(SRC, &[1, 2, 3]);
    run(
        &mut fc,
        &[0xf3, 0xa4],
        &[(RSI, SRC), (RDI, SRC + 3), (RCX, 5000)],
    );
    let got = fc.read(SRC, 5003);
    assert!(
        got.chunks(3).all(|c| c == &[1, 2, 3][..c.len()]),
        "not a repeat of 1 2 3: {:?}",
        &got[..24]
    );
    // rep movsq with RDI = RSI + 8 repeats the first quadword.
    fc.write(DST, &0x1122_3344_5566_7788u64.to_le_bytes());
    run(
        &mut fc,
        &[0xf3, 0x48, 0xa5],
        &[(RSI, DST), (RDI, DST + 8), (RCX, 1000)],
    );
    for k in 0..1001 {
        assert_eq!(
            fc.read_u64(DST + 8 * k),
            0x1122_3344_5566_7788,
            "quadword {k}"
        );
    }
    // RDI below RSI, overlapping: a plain move down.
    let data = pattern(9000, 1);
    fc.write(SRC + 100, &data);
    run(
        &mut fc,
        &[0xf3, 0xa4],
        &[(RSI, SRC + 100), (RDI, SRC + 40), (RCX, 9000)],
    );
    assert_eq!(fc.read(SRC + 40, 9000), data);
}

#[test]
fn rep_stos_fills_across_pages() {
    let mut fc = FlatCpu::new();
    let v = 0x0102_0304_0506_0708u64;
    // rep stosq from an address that is not 8-aligned, 2.5 pages.
    run(
        &mut fc,
        &[0xf3, 0x48, 0xab],
        &[(RAX, v), (RDI, DST + 4), (RCX, 1280)],
    );
    for k in 0..1280 {
        assert_eq!(fc.read_u64(DST + 4 + 8 * k), v, "quadword {k}");
    }
    assert_eq!(fc.regs().gpr[RDI], DST + 4 + 8 * 1280);
    // rep stosb.
    run(
        &mut fc,
        &[0xf3, 0xaa],
        &[(RAX, 0x5a), (RDI, SRC + 1), (RCX, 10_000)],
    );
    assert!(fc.read(SRC + 1, 10_000).iter().all(|&b| b == 0x5a));
    assert_eq!(fc.read(SRC, 1), vec![0]);
    assert_eq!(fc.read(SRC + 10_001, 1), vec![0]);
}

#[test]
fn a_fault_half_way_leaves_the_registers_at_the_faulting_element() {
    let mut fc = FlatCpu::new();
    let end = fc.ram_size();
    // rep movsq whose source runs off the end of RAM after three quadwords.
    let src = end - 24;
    fc.write(src, &pattern(24, 9));
    run(
        &mut fc,
        &[0xf3, 0x48, 0xa5],
        &[(RSI, src), (RDI, DST), (RCX, 10)],
    );
    let e = fc.exception().expect("#PF");
    assert_eq!((e.vector, e.cr2, e.rip), (14, end, CODE));
    let r = fc.regs();
    assert_eq!((r.gpr[RSI], r.gpr[RDI], r.gpr[RCX]), (end, DST + 24, 7));
    assert_eq!(fc.read(DST, 24), pattern(24, 9));
    assert_eq!(
        fc.read_u64(DST + 24),
        0,
        "nothing of the faulting element written"
    );

    // The destination runs off the end: the source element is read, nothing written.
    fc.reset_state();
    let dst = end - 16;
    run(
        &mut fc,
        &[0xf3, 0x48, 0xa5],
        &[(RSI, SRC), (RDI, dst), (RCX, 4)],
    );
    let e = fc.exception().expect("#PF");
    assert_eq!((e.vector, e.cr2), (14, end));
    let r = fc.regs();
    assert_eq!((r.gpr[RSI], r.gpr[RDI], r.gpr[RCX]), (SRC + 16, end, 2));
}

#[test]
fn a_long_copy_is_taken_in_runs_and_finishes() {
    let mut fc = FlatCpu::new();
    // 20 000 quadwords: several runs of the loop, each ending with a look for interrupts.
    let n = 20_000usize;
    let data = pattern(8 * n, 3);
    fc.write(SRC, &data);
    run(
        &mut fc,
        &[0xf3, 0x48, 0xa5],
        &[(RSI, SRC), (RDI, DST), (RCX, n as u64)],
    );
    assert_eq!(fc.exception(), None);
    assert_eq!(fc.regs().gpr[RCX], 0);
    assert_eq!(fc.regs().rip, CODE + 3);
    assert_eq!(fc.read(DST, 8 * n), data);
}

#[test]
fn rep_movsq_between_differently_aligned_addresses_copies_every_page() {
    // An unaligned copy meets a quadword that straddles a page boundary on every page (the
    // kernel's copy to user space of a received packet's payload does): that element goes
    // through the general path, the runs around it straight between pages.
    let mut fc = FlatCpu::new();
    let n = 3 * 512 + 5;
    let data = pattern(8 * n, 11);
    let (src, dst) = (SRC + 0x42, DST + 0xff8);
    fc.write(src, &data);
    run(
        &mut fc,
        &[0xf3, 0x48, 0xa5],
        &[(RSI, src), (RDI, dst), (RCX, n as u64)],
    );
    assert_eq!(fc.exception(), None);
    assert_eq!(fc.read(dst, 8 * n), data);
    let r = fc.regs();
    assert_eq!(
        (r.gpr[RSI], r.gpr[RDI], r.gpr[RCX], r.rip),
        (src + 8 * n as u64, dst + 8 * n as u64, 0, CODE + 3)
    );
    assert_eq!(fc.read(dst - 1, 1), vec![0]);
    assert_eq!(fc.read(dst + 8 * n as u64, 1), vec![0]);
}

#[test]
fn a_straddling_element_that_faults_leaves_the_registers_at_it() {
    let mut fc = FlatCpu::new();
    let end = fc.ram_size();
    // rep movsq from 12 bytes before the end of RAM: the first quadword fits, the second
    // straddles into the hole and faults on its second page, before anything of it is
    // written.
    let src = end - 12;
    fc.write(src, &pattern(12, 5));
    run(
        &mut fc,
        &[0xf3, 0x48, 0xa5],
        &[(RSI, src), (RDI, DST), (RCX, 5)],
    );
    let e = fc.exception().expect("#PF");
    assert_eq!((e.vector, e.cr2, e.rip), (14, end, CODE));
    let r = fc.regs();
    assert_eq!((r.gpr[RSI], r.gpr[RDI], r.gpr[RCX]), (end - 4, DST + 8, 4));
    assert_eq!(fc.read(DST, 8), pattern(8, 5));
    assert_eq!(
        fc.read_u64(DST + 8),
        0,
        "nothing of the faulting element written"
    );
}
