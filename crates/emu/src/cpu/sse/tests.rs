//! Unit tests: instructions run through the real fetch/decode/dispatch path on a CPU in
//! 64-bit long mode (identity-mapped with one 1 GiB page) over a small RAM, with results
//! checked against hand-computed values.

use std::sync::Arc;

use iced_x86::Instruction;

use super::super::state::flags::{AF, CF, OF, PF, SF, ZF};
use super::super::state::{cr0, cr4, efer, Seg, CS, DS, ES, FS, GS, RAX, SS};
use super::super::{vector, Cpu, Fault, Machine, StepEnd};
use super::x87;
use crate::memory::{PhysMem, RamRegion};

struct NoDevices;

impl Machine for NoDevices {
    fn pio_read(&mut self, _: u16, _: u8) -> Option<u32> {
        Some(!0)
    }
    fn pio_write(&mut self, _: u16, _: u8, _: u32) -> bool {
        true
    }
    fn mmio_read(&mut self, _: u64, _: u8) -> Option<u64> {
        Some(!0)
    }
    fn mmio_write(&mut self, _: u64, _: u8, _: u64) -> bool {
        true
    }
    fn rdmsr(&mut self, _: u32) -> Option<u64> {
        None
    }
    fn wrmsr(&mut self, _: u32, _: u64) -> Option<bool> {
        None
    }
    fn rdtsc(&mut self) -> u64 {
        0
    }
    fn cpuid(&self, _: u32, _: u32) -> [u32; 4] {
        [0; 4]
    }
    fn take_interrupt(&mut self) -> Option<u8> {
        None
    }
    fn interrupt_pending(&self) -> bool {
        false
    }
    fn halt(&mut self) {}
}

const RAM: usize = 4 << 20;
const CODE: u64 = 0x10000;
const DATA: u64 = 0x20000;

struct T {
    cpu: Cpu,
    _ram: Vec<u8>,
}

impl T {
    fn new() -> T {
        let mut ram = vec![0u8; RAM];
        let mut mem = PhysMem::default();
        mem.add(RamRegion {
            gpa: 0,
            len: RAM as u64,
            host: ram.as_mut_ptr(),
        });
        let mut cpu = Cpu::new(Arc::new(mem), Box::new(NoDevices));
        // PML4[0] -> PDPT at 0x2000; PDPT[0]: a 1 GiB identity page.
        cpu.mem.write(0x1000, 8, 0x2000 | 3);
        cpu.mem.write(0x2000, 8, 0x83);
        let s = &mut cpu.s;
        s.cr0 = cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::PG;
        s.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT;
        s.cr3 = 0x1000;
        s.efer = efer::LME | efer::LMA;
        s.seg[CS] = Seg {
            selector: 8,
            base: 0,
            limit: 0xffff_ffff,
            attr: 0xa09b,
        };
        for i in [ES, SS, DS, FS, GS] {
            s.seg[i] = Seg {
                selector: 0x10,
                base: 0,
                limit: 0xffff_ffff,
                attr: 0xc093,
            };
        }
        s.gpr[RAX] = DATA;
        cpu.flush_tlb();
        T { cpu, _ram: ram }
    }

    /// Loads `code` at CODE and runs its instructions one by one (`n` of them); stops at the
    /// first fault.
    fn run(&mut self, code: &[u8], n: usize) -> Result<(), Fault> {
        assert!(self.cpu.mem.write_bytes(CODE, code));
        self.cpu.s.rip = CODE;
        let mut insn = Instruction::default();
        for _ in 0..n {
            match self.cpu.step(&mut insn) {
                Ok(()) => {}
                Err(StepEnd::Fault(f)) => return Err(f),
                Err(StepEnd::Halt) => panic!("hlt"),
                Err(StepEnd::Posted) => panic!("device write"),
            }
        }
        Ok(())
    }

    fn write(&self, gpa: u64, b: &[u8]) {
        assert!(self.cpu.mem.write_bytes(gpa, b));
    }

    fn read(&self, gpa: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        assert!(self.cpu.mem.read_bytes(gpa, &mut v));
        v
    }

    fn xmm(&mut self, i: usize) -> &mut [u8; 16] {
        &mut self.cpu.s.fpu.xmm[i]
    }

    fn set_f64(&mut self, i: usize, lo: f64, hi: f64) {
        *self.xmm(i) = super::from64(lo.to_bits(), hi.to_bits());
    }

    fn get_f64(&mut self, i: usize) -> (f64, f64) {
        let v = *self.xmm(i);
        (
            f64::from_bits(super::lo64(&v)),
            f64::from_bits(super::hi64(&v)),
        )
    }

    fn set_f32(&mut self, i: usize, x: [f32; 4]) {
        let mut v = [0u8; 16];
        for (k, f) in x.iter().enumerate() {
            v[4 * k..4 * k + 4].copy_from_slice(&f.to_bits().to_le_bytes());
        }
        *self.xmm(i) = v;
    }

    fn get_u32(&mut self, i: usize) -> [u32; 4] {
        let v = *self.xmm(i);
        std::array::from_fn(|k| u32::from_le_bytes(v[4 * k..4 * k + 4].try_into().unwrap()))
    }
}

fn exc(v: u8, code: Option<u32>) -> Fault {
    Fault::Exception {
        vector: v,
        error_code: code,
    }
}

#[test]
fn pcmpeqb_pmovmskb() {
    let mut t = T::new();
    *t.xmm(0) = std::array::from_fn(|i| i as u8);
    let mut b: [u8; 16] = std::array::from_fn(|i| i as u8);
    b[1] = 0xee;
    b[15] = 0;
    *t.xmm(1) = b;
    // pcmpeqb xmm0, xmm1; pmovmskb eax, xmm0
    t.run(&[0x66, 0x0f, 0x74, 0xc1, 0x66, 0x0f, 0xd7, 0xc0], 2)
        .unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 0x7ffd);
    assert_eq!(t.xmm(0)[1], 0);
    assert_eq!(t.xmm(0)[2], 0xff);
}

#[test]
fn movdqa_alignment() {
    let mut t = T::new();
    let data: Vec<u8> = (0..32).collect();
    t.write(DATA, &data);
    // movdqa xmm0, [rax] (aligned)
    t.run(&[0x66, 0x0f, 0x6f, 0x00], 1).unwrap();
    assert_eq!(&t.xmm(0)[..], &data[..16]);
    // misaligned: #GP(0)
    t.cpu.s.gpr[RAX] = DATA + 8;
    assert_eq!(
        t.run(&[0x66, 0x0f, 0x6f, 0x00], 1),
        Err(exc(vector::GP, Some(0)))
    );
    // movdqu xmm1, [rax] is fine
    t.run(&[0xf3, 0x0f, 0x6f, 0x08], 1).unwrap();
    assert_eq!(&t.xmm(1)[..], &data[8..24]);
    // paddb xmm0, [rax] misaligned: #GP(0); movss xmm0, [rax] (4 bytes) is not checked.
    assert_eq!(
        t.run(&[0x66, 0x0f, 0xfc, 0x00], 1),
        Err(exc(vector::GP, Some(0)))
    );
    t.run(&[0xf3, 0x0f, 0x10, 0x00], 1).unwrap();
    assert_eq!(
        &t.xmm(0)[..],
        &[8, 9, 10, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    // movdqa [rax], xmm1 with rax aligned
    t.cpu.s.gpr[RAX] = DATA + 0x100;
    t.run(&[0x66, 0x0f, 0x7f, 0x08], 1).unwrap();
    assert_eq!(t.read(DATA + 0x100, 16), data[8..24].to_vec());
}

#[test]
fn checks_cr0_cr4() {
    let mut t = T::new();
    let addps = [0x0f, 0x58, 0xc1];
    t.cpu.s.cr0 |= cr0::TS;
    assert_eq!(t.run(&addps, 1), Err(exc(vector::NM, None)));
    // x87 and FXSAVE: #NM too
    assert_eq!(t.run(&[0xd9, 0xe8], 1), Err(exc(vector::NM, None)));
    assert_eq!(t.run(&[0x0f, 0xae, 0x00], 1), Err(exc(vector::NM, None)));
    t.cpu.s.cr0 &= !cr0::TS;
    t.cpu.s.cr0 |= cr0::EM;
    assert_eq!(t.run(&addps, 1), Err(exc(vector::UD, None)));
    assert_eq!(t.run(&[0xd9, 0xe8], 1), Err(exc(vector::NM, None)));
    t.cpu.s.cr0 &= !cr0::EM;
    t.cpu.s.cr4 &= !cr4::OSFXSR;
    assert_eq!(t.run(&addps, 1), Err(exc(vector::UD, None)));
    // MMX does not need OSFXSR: paddb mm0, mm1
    t.run(&[0x0f, 0xfc, 0xc1], 1).unwrap();
    t.cpu.s.cr4 |= cr4::OSFXSR;
    t.run(&addps, 1).unwrap();
    // SSE4.1 PEXTRW (66 0F 3A 15) is not advertised: #UD.
    assert_eq!(
        t.run(&[0x66, 0x0f, 0x3a, 0x15, 0xc1, 0x01], 1),
        Err(exc(vector::UD, None))
    );
    // SSE2 PEXTRW eax, xmm1, 1 works.
    *t.xmm(1) = std::array::from_fn(|i| i as u8);
    t.run(&[0x66, 0x0f, 0xc5, 0xc1, 0x01], 1).unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 0x0302);
}

#[test]
fn fxsave_layout_and_restore() {
    let mut t = T::new();
    let f = &mut t.cpu.s.fpu;
    f.fcw = 0x027f;
    f.fsw = 0x3800 | 0x0001; // TOP = 7, IE
    f.ftw = 0x80;
    f.fop = 0x1234;
    f.fip = 0x1122_3344_5566_7788;
    f.fdp = 0x99aa_bbcc_ddee_ff00;
    f.mxcsr = 0x1f80 | 0x20;
    f.st[0] = x87::from_f64(1.5);
    for i in 0..16 {
        f.xmm[i] = [i as u8 + 1; 16];
    }
    t.write(DATA, &[0x5a; 512]);
    // fxsave64 [rax]
    t.run(&[0x48, 0x0f, 0xae, 0x00], 1).unwrap();
    let img = t.read(DATA, 512);
    assert_eq!(
        &img[0..8],
        &[0x7f, 0x02, 0x01, 0x38, 0x80, 0x00, 0x34, 0x02]
    );
    assert_eq!(&img[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(&img[16..24], &0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
    assert_eq!(&img[24..28], &0x1fa0u32.to_le_bytes());
    assert_eq!(&img[28..32], &0xffffu32.to_le_bytes());
    // 1.5 = 0x3fff c000000000000000
    assert_eq!(
        &img[32..48],
        &[0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0x3f, 0, 0, 0, 0, 0, 0]
    );
    for i in 0..16 {
        assert_eq!(&img[160 + 16 * i..176 + 16 * i], &[i as u8 + 1; 16]);
    }
    assert!(
        img[416..].iter().all(|&b| b == 0x5a),
        "reserved area untouched"
    );

    // fxsave (32-bit format): FIP is 32 bits then FCS = 0.
    t.run(&[0x0f, 0xae, 0x00], 1).unwrap();
    let img = t.read(DATA, 32);
    assert_eq!(&img[8..16], &[0x88, 0x77, 0x66, 0x55, 0, 0, 0, 0]);

    // Change everything, then fxrstor64 brings it back.
    let saved = t.cpu.s.fpu;
    t.run(&[0x48, 0x0f, 0xae, 0x00], 1).unwrap();
    t.cpu.s.fpu = Default::default();
    t.run(&[0x48, 0x0f, 0xae, 0x08], 1).unwrap();
    let f = &t.cpu.s.fpu;
    assert_eq!(
        (f.fcw, f.fsw, f.ftw, f.fop & 0x7ff),
        (saved.fcw, saved.fsw, saved.ftw, saved.fop & 0x7ff)
    );
    assert_eq!((f.fip, f.fdp, f.mxcsr), (saved.fip, saved.fdp, saved.mxcsr));
    assert_eq!(f.st, saved.st);
    assert_eq!(f.xmm, saved.xmm);

    // Reserved MXCSR bits in the image: #GP(0). Misaligned: #GP(0).
    t.write(DATA + 24, &0x1_0000u32.to_le_bytes());
    assert_eq!(t.run(&[0x0f, 0xae, 0x08], 1), Err(exc(vector::GP, Some(0))));
    t.cpu.s.gpr[RAX] = DATA + 8;
    assert_eq!(t.run(&[0x0f, 0xae, 0x00], 1), Err(exc(vector::GP, Some(0))));
}

#[test]
fn ldmxcsr_stmxcsr() {
    let mut t = T::new();
    t.write(DATA, &0x3f80u32.to_le_bytes());
    // ldmxcsr [rax]; stmxcsr [rax+4]
    t.run(&[0x0f, 0xae, 0x10, 0x0f, 0xae, 0x58, 0x04], 2)
        .unwrap();
    assert_eq!(t.cpu.s.fpu.mxcsr, 0x3f80);
    assert_eq!(t.read(DATA + 4, 4), 0x3f80u32.to_le_bytes().to_vec());
    t.write(DATA, &0x2_1f80u32.to_le_bytes());
    assert_eq!(t.run(&[0x0f, 0xae, 0x10], 1), Err(exc(vector::GP, Some(0))));
}

#[test]
fn cvttsd2si_indefinite() {
    let mut t = T::new();
    t.set_f64(0, 1e20, 0.0);
    // cvttsd2si rax, xmm0
    t.run(&[0xf2, 0x48, 0x0f, 0x2c, 0xc0], 1).unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 0x8000_0000_0000_0000);
    assert_eq!(t.cpu.s.fpu.mxcsr & 0x3f, 1, "IE");
    // cvttsd2si eax, xmm0 with -2.7: -2; cvtsd2si rounds: -3
    t.set_f64(0, -2.7, 0.0);
    t.run(&[0xf2, 0x0f, 0x2c, 0xc0], 1).unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 0xffff_fffe);
    t.run(&[0xf2, 0x0f, 0x2d, 0xc0], 1).unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 0xffff_fffd);
    // NaN → indefinite (32-bit)
    t.set_f64(0, f64::NAN, 0.0);
    t.run(&[0xf2, 0x0f, 0x2c, 0xc0], 1).unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 0x8000_0000);
    // 2.5 with round-to-nearest-even: 2; with RC = up: 3
    t.set_f64(0, 2.5, 0.0);
    t.run(&[0xf2, 0x0f, 0x2d, 0xc0], 1).unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 2);
    t.cpu.s.fpu.mxcsr = 0x1f80 | (2 << 13);
    t.run(&[0xf2, 0x0f, 0x2d, 0xc0], 1).unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 3);
}

#[test]
fn ucomisd_comisd_flags() {
    let mut t = T::new();
    t.cpu.s.rflags = 2 | OF | SF | AF;
    t.set_f64(0, f64::NAN, 0.0);
    t.set_f64(1, 1.0, 0.0);
    // ucomisd xmm0, xmm1: unordered, QNaN does not signal
    t.run(&[0x66, 0x0f, 0x2e, 0xc1], 1).unwrap();
    assert_eq!(t.cpu.s.rflags & (ZF | PF | CF | OF | SF | AF), ZF | PF | CF);
    assert_eq!(t.cpu.s.fpu.mxcsr & 0x3f, 0);
    // comisd signals on QNaN
    t.run(&[0x66, 0x0f, 0x2f, 0xc1], 1).unwrap();
    assert_eq!(t.cpu.s.fpu.mxcsr & 0x3f, 1);
    // less, equal, greater
    for (a, b, want) in [
        (0.5, 1.0, CF),
        (1.0, 1.0, ZF),
        (2.0, 1.0, 0),
        (-0.0, 0.0, ZF),
    ] {
        t.set_f64(0, a, 0.0);
        t.set_f64(1, b, 0.0);
        t.run(&[0x66, 0x0f, 0x2e, 0xc1], 1).unwrap();
        assert_eq!(t.cpu.s.rflags & (ZF | PF | CF), want, "{a} vs {b}");
    }
    // ucomiss with single precision
    t.set_f32(0, [3.0, 0.0, 0.0, 0.0]);
    t.set_f32(1, [4.0, 0.0, 0.0, 0.0]);
    t.run(&[0x0f, 0x2e, 0xc1], 1).unwrap();
    assert_eq!(t.cpu.s.rflags & (ZF | PF | CF), CF);
}

#[test]
fn float_arithmetic() {
    let mut t = T::new();
    // addsd keeps the upper lane of the destination
    t.set_f64(0, 1.5, 7.0);
    t.set_f64(1, 2.25, 9.0);
    t.run(&[0xf2, 0x0f, 0x58, 0xc1], 1).unwrap();
    assert_eq!(t.get_f64(0), (3.75, 7.0));
    // mulpd
    t.set_f64(0, 3.0, -2.0);
    t.set_f64(1, 0.5, 4.0);
    t.run(&[0x66, 0x0f, 0x59, 0xc1], 1).unwrap();
    assert_eq!(t.get_f64(0), (1.5, -8.0));
    assert_eq!(t.cpu.s.fpu.mxcsr & 0x3f, 0);
    // divss by zero: +inf, ZE
    t.set_f32(0, [1.0, 2.0, 3.0, 4.0]);
    t.set_f32(1, [0.0, 0.0, 0.0, 0.0]);
    t.run(&[0xf3, 0x0f, 0x5e, 0xc1], 1).unwrap();
    assert_eq!(
        t.get_u32(0),
        [
            0x7f80_0000,
            2.0f32.to_bits(),
            3.0f32.to_bits(),
            4.0f32.to_bits()
        ]
    );
    assert_eq!(t.cpu.s.fpu.mxcsr & 0x3f, 4);
    // sqrtsd of -1: the QNaN indefinite, IE
    t.cpu.s.fpu.mxcsr = 0x1f80;
    t.set_f64(1, -1.0, 0.0);
    t.run(&[0xf2, 0x0f, 0x51, 0xc1], 1).unwrap();
    assert_eq!(super::lo64(t.xmm(0)), 0xfff8_0000_0000_0000);
    assert_eq!(t.cpu.s.fpu.mxcsr & 0x3f, 1);
    // 1/3 sets PE
    t.cpu.s.fpu.mxcsr = 0x1f80;
    t.set_f64(0, 1.0, 0.0);
    t.set_f64(1, 3.0, 0.0);
    t.run(&[0xf2, 0x0f, 0x5e, 0xc1], 1).unwrap();
    assert_eq!(t.get_f64(0).0, 1.0 / 3.0);
    assert_eq!(t.cpu.s.fpu.mxcsr & 0x3f, 0x20);
    // NaN propagation: first operand's NaN wins, quieted
    t.set_f64(0, f64::from_bits(0x7ff0_0000_0000_0001), 0.0);
    t.set_f64(1, f64::from_bits(0x7ff8_0000_0000_0002), 0.0);
    t.run(&[0xf2, 0x0f, 0x58, 0xc1], 1).unwrap();
    assert_eq!(super::lo64(t.xmm(0)), 0x7ff8_0000_0000_0001);
    // minsd: second operand when either is NaN or both are zero
    t.set_f64(0, 0.0, 0.0);
    t.set_f64(1, -0.0, 0.0);
    t.run(&[0xf2, 0x0f, 0x5d, 0xc1], 1).unwrap();
    assert_eq!(super::lo64(t.xmm(0)), 0x8000_0000_0000_0000);
    // Rounding up: 1 + 2^-60 → the next double after 1.
    t.cpu.s.fpu.mxcsr = 0x1f80 | (2 << 13);
    t.set_f64(0, 1.0, 0.0);
    t.set_f64(1, 2f64.powi(-60), 0.0);
    t.run(&[0xf2, 0x0f, 0x58, 0xc1], 1).unwrap();
    assert_eq!(super::lo64(t.xmm(0)), 1.0f64.to_bits() + 1);
    // Toward zero: -1 - 2^-60 → -1
    t.cpu.s.fpu.mxcsr = 0x1f80 | (3 << 13);
    t.set_f64(0, -1.0, 0.0);
    t.run(&[0xf2, 0x0f, 0x5c, 0xc1], 1).unwrap();
    assert_eq!(t.get_f64(0).0, -1.0);
    // Rounding down: x - x = -0
    t.cpu.s.fpu.mxcsr = 0x1f80 | (1 << 13);
    t.set_f64(0, 2.0, 0.0);
    t.set_f64(1, 2.0, 0.0);
    t.run(&[0xf2, 0x0f, 0x5c, 0xc1], 1).unwrap();
    assert_eq!(super::lo64(t.xmm(0)), 0x8000_0000_0000_0000);
    // Overflow to infinity sets OE|PE
    t.cpu.s.fpu.mxcsr = 0x1f80;
    t.set_f64(0, f64::MAX, 0.0);
    t.set_f64(1, 2.0, 0.0);
    t.run(&[0xf2, 0x0f, 0x59, 0xc1], 1).unwrap();
    assert_eq!(t.get_f64(0).0, f64::INFINITY);
    assert_eq!(t.cpu.s.fpu.mxcsr & 0x3f, 0x28);
    // Unmasked ZE: #XM and the destination is untouched.
    t.cpu.s.fpu.mxcsr = 0x1f80 & !(mx_mask(2));
    t.set_f64(0, 1.0, 0.0);
    t.set_f64(1, 0.0, 0.0);
    assert_eq!(
        t.run(&[0xf2, 0x0f, 0x5e, 0xc1], 1),
        Err(exc(vector::XM, None))
    );
    assert_eq!(t.get_f64(0).0, 1.0);
}

fn mx_mask(flag_bit: u32) -> u32 {
    1 << (7 + flag_bit)
}

#[test]
fn compares_packed() {
    let mut t = T::new();
    let nan = f32::NAN;
    let inputs = [1.0f32, 2.0, nan, 4.0];
    let other = [1.0f32, 1.0, 1.0, 5.0];
    let want: [[u32; 4]; 8] = [
        [!0, 0, 0, 0],   // EQ
        [0, 0, 0, !0],   // LT
        [!0, 0, 0, !0],  // LE
        [0, 0, !0, 0],   // UNORD
        [0, !0, !0, !0], // NEQ
        [!0, !0, !0, 0], // NLT
        [0, !0, !0, 0],  // NLE
        [!0, !0, 0, !0], // ORD
    ];
    for (p, w) in want.iter().enumerate() {
        t.set_f32(0, inputs);
        t.set_f32(1, other);
        t.run(&[0x0f, 0xc2, 0xc1, p as u8], 1).unwrap();
        assert_eq!(t.get_u32(0), *w, "predicate {p}");
    }
}

#[test]
fn conversions() {
    let mut t = T::new();
    // cvtsi2sd xmm0, rax keeps the high lane
    t.set_f64(0, 0.0, 5.0);
    t.cpu.s.gpr[RAX] = (-7i64) as u64;
    t.run(&[0xf2, 0x48, 0x0f, 0x2a, 0xc0], 1).unwrap();
    assert_eq!(t.get_f64(0), (-7.0, 5.0));
    // cvtsd2ss xmm0, xmm1
    t.set_f64(1, 0.1, 0.0);
    t.run(&[0xf2, 0x0f, 0x5a, 0xc1], 1).unwrap();
    assert_eq!(t.get_u32(0)[0], 0.1f32.to_bits());
    // cvtps2dq (nearest-even) / cvttps2dq, with an out-of-range lane
    t.set_f32(1, [1.5, -2.5, 3e9, -0.7]);
    t.run(&[0x66, 0x0f, 0x5b, 0xc1], 1).unwrap();
    assert_eq!(
        t.get_u32(0),
        [2, (-2i32) as u32, 0x8000_0000, (-1i32) as u32]
    );
    t.run(&[0xf3, 0x0f, 0x5b, 0xc1], 1).unwrap();
    assert_eq!(t.get_u32(0), [1, (-2i32) as u32, 0x8000_0000, 0]);
    // cvtdq2ps
    *t.xmm(1) = super::int::p32([1, (-3i32) as u32, 16_777_217, 0]);
    t.run(&[0x0f, 0x5b, 0xc1], 1).unwrap();
    assert_eq!(
        t.get_u32(0),
        [
            1.0f32.to_bits(),
            (-3.0f32).to_bits(),
            16_777_216.0f32.to_bits(),
            0
        ]
    );
    // cvtss2sd of a signalling NaN: quieted, payload kept, IE
    t.cpu.s.fpu.mxcsr = 0x1f80;
    t.set_f32(1, [f32::from_bits(0x7f80_0001), 0.0, 0.0, 0.0]);
    t.run(&[0xf3, 0x0f, 0x5a, 0xc1], 1).unwrap();
    assert_eq!(super::lo64(t.xmm(0)), 0x7ff8_0000_2000_0000);
    assert_eq!(t.cpu.s.fpu.mxcsr & 1, 1);
}

#[test]
fn integer_ops() {
    let mut t = T::new();
    // psrldq xmm0, 3
    *t.xmm(0) = std::array::from_fn(|i| i as u8);
    t.run(&[0x66, 0x0f, 0x73, 0xd8, 0x03], 1).unwrap();
    assert_eq!(t.xmm(0)[0], 3);
    assert_eq!(t.xmm(0)[12], 15);
    assert_eq!(t.xmm(0)[13], 0);
    // psllw xmm0, 4
    *t.xmm(0) = super::int::p16([0x1234, 0xffff, 0, 1, 2, 3, 4, 5]);
    t.run(&[0x66, 0x0f, 0x71, 0xf0, 0x04], 1).unwrap();
    assert_eq!(super::int::w16(t.xmm(0))[..2], [0x2340, 0xfff0]);
    // psraw xmm0, xmm1 with a count of 100: sign fill
    *t.xmm(0) = super::int::p16([0x8000, 0x7fff, 0, 0, 0, 0, 0, 0xf000]);
    *t.xmm(1) = super::from64(100, 0);
    t.run(&[0x66, 0x0f, 0xe1, 0xc1], 1).unwrap();
    assert_eq!(
        super::int::w16(t.xmm(0)),
        [0xffff, 0, 0, 0, 0, 0, 0, 0xffff]
    );
    // pshufd xmm0, xmm1, 0x1b (reverse)
    *t.xmm(1) = super::int::p32([10, 11, 12, 13]);
    t.run(&[0x66, 0x0f, 0x70, 0xc1, 0x1b], 1).unwrap();
    assert_eq!(t.get_u32(0), [13, 12, 11, 10]);
    // punpcklbw
    *t.xmm(0) = [0xa0; 16];
    *t.xmm(1) = std::array::from_fn(|i| i as u8);
    t.run(&[0x66, 0x0f, 0x60, 0xc1], 1).unwrap();
    assert_eq!(&t.xmm(0)[..6], &[0xa0, 0, 0xa0, 1, 0xa0, 2]);
    // packuswb
    *t.xmm(0) = super::int::p16([0, 255, 256, 0xffff, 100, 0x7fff, 1, 2]);
    *t.xmm(1) = super::int::p16([3; 8]);
    t.run(&[0x66, 0x0f, 0x67, 0xc1], 1).unwrap();
    assert_eq!(
        &t.xmm(0)[..],
        &[0, 255, 255, 0, 100, 255, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    );
    // pmaddwd, pmuludq, psadbw
    *t.xmm(0) = super::int::p16([2, 3, 0x8000, 0x8000, 1, 1, 0xffff, 1]);
    *t.xmm(1) = super::int::p16([5, 7, 0x8000, 0x8000, 1, 1, 2, 2]);
    t.run(&[0x66, 0x0f, 0xf5, 0xc1], 1).unwrap();
    assert_eq!(t.get_u32(0), [31, 0x8000_0000, 2, 0]);
    *t.xmm(0) = super::int::p32([0xffff_ffff, 9, 3, 9]);
    *t.xmm(1) = super::int::p32([0xffff_ffff, 9, 4, 9]);
    t.run(&[0x66, 0x0f, 0xf4, 0xc1], 1).unwrap();
    assert_eq!(super::lo64(t.xmm(0)), 0xffff_fffe_0000_0001);
    assert_eq!(super::hi64(t.xmm(0)), 12);
    *t.xmm(0) = [10; 16];
    *t.xmm(1) = std::array::from_fn(|i| i as u8);
    t.run(&[0x66, 0x0f, 0xf6, 0xc1], 1).unwrap();
    // |10-0|+…+|10-7| = 10+9+8+7+6+5+4+3 = 52; |10-8|..|10-15| = 2+1+0+1+2+3+4+5 = 18
    assert_eq!((super::lo64(t.xmm(0)), super::hi64(t.xmm(0))), (52, 18));
    // movd eax, xmm0 / movq rax, xmm0 / movd xmm0, eax
    *t.xmm(0) = super::from64(0x1122_3344_5566_7788, 0x99);
    t.run(&[0x66, 0x0f, 0x7e, 0xc0], 1).unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 0x5566_7788);
    t.run(&[0x66, 0x48, 0x0f, 0x7e, 0xc0], 1).unwrap();
    assert_eq!(t.cpu.s.gpr[RAX], 0x1122_3344_5566_7788);
    t.run(&[0x66, 0x0f, 0x6e, 0xc0], 1).unwrap();
    assert_eq!(*t.xmm(0), super::from64(0x5566_7788, 0));
    // movss xmm0, xmm1 keeps the rest; movhlps
    *t.xmm(0) = [0xaa; 16];
    *t.xmm(1) = std::array::from_fn(|i| i as u8);
    t.run(&[0xf3, 0x0f, 0x10, 0xc1], 1).unwrap();
    assert_eq!(&t.xmm(0)[..6], &[0, 1, 2, 3, 0xaa, 0xaa]);
    t.run(&[0x0f, 0x12, 0xc1], 1).unwrap();
    assert_eq!(
        &t.xmm(0)[..],
        &[8, 9, 10, 11, 12, 13, 14, 15, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa]
    );
    // xorps xmm0, xmm0
    t.run(&[0x0f, 0x57, 0xc0], 1).unwrap();
    assert_eq!(*t.xmm(0), [0; 16]);
}

#[test]
fn mmx_and_emms() {
    let mut t = T::new();
    t.cpu.s.fpu.fsw = 5 << 11;
    t.write(DATA, &[1, 2, 3, 4, 5, 6, 7, 0xff]);
    // movq mm0, [rax]; movq mm1, mm0; paddb mm0, mm1; movq [rax+8], mm0
    t.run(
        &[
            0x0f, 0x6f, 0x00, 0x0f, 0x6f, 0xc8, 0x0f, 0xfc, 0xc1, 0x0f, 0x7f, 0x40, 0x08,
        ],
        4,
    )
    .unwrap();
    assert_eq!(t.read(DATA + 8, 8), vec![2, 4, 6, 8, 10, 12, 14, 0xfe]);
    assert_eq!(t.cpu.s.fpu.fsw >> 11 & 7, 0, "TOP = 0");
    assert_eq!(t.cpu.s.fpu.ftw, 0xff);
    assert_eq!(&t.cpu.s.fpu.st[0][8..], &[0xff, 0xff]);
    // punpckhbw mm0, mm1 uses bytes 4..7
    t.run(&[0x0f, 0x68, 0xc1], 1).unwrap();
    let v = t.cpu.s.fpu.st[0];
    assert_eq!(&v[..8], &[10, 5, 12, 6, 14, 7, 0xfe, 0xff]);
    // emms
    t.run(&[0x0f, 0x77], 1).unwrap();
    assert_eq!(t.cpu.s.fpu.ftw, 0);
}

#[test]
fn x87_basics() {
    let mut t = T::new();
    t.cpu.s.fpu.fcw = 0;
    t.cpu.s.fpu.fsw = 0xffff;
    // fninit; fnstcw [rax]; fnstsw ax
    t.run(&[0xdb, 0xe3, 0xd9, 0x38, 0xdf, 0xe0], 3).unwrap();
    assert_eq!(t.read(DATA, 2), vec![0x7f, 0x03]);
    assert_eq!(t.cpu.s.gpr[RAX] & 0xffff, 0);
    assert_eq!(t.cpu.s.fpu.ftw, 0);
    t.cpu.s.gpr[RAX] = DATA;
    // fld1; fld1; faddp; fistp dword [rax]
    t.run(&[0xd9, 0xe8, 0xd9, 0xe8, 0xde, 0xc1, 0xdb, 0x18], 4)
        .unwrap();
    assert_eq!(t.read(DATA, 4), 2u32.to_le_bytes().to_vec());
    assert_eq!(t.cpu.s.fpu.ftw, 0, "stack empty again");
    assert_eq!(t.cpu.s.fpu.fsw >> 11 & 7, 0);
    // fild qword [rax]; fchs; fistp qword [rax+8]
    t.write(DATA, &0x0123_4567_89ab_cdefu64.to_le_bytes());
    t.run(&[0xdf, 0x28, 0xd9, 0xe0, 0xdf, 0x78, 0x08], 3)
        .unwrap();
    assert_eq!(
        t.read(DATA + 8, 8),
        (-0x0123_4567_89ab_cdefi64).to_le_bytes().to_vec()
    );
    // fld tbyte [rax]; fstp tbyte [rax+16]: exact
    let odd = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x34, 0x12];
    t.write(DATA, &odd);
    t.run(&[0xdb, 0x28, 0xdb, 0x78, 0x10], 2).unwrap();
    assert_eq!(t.read(DATA + 16, 10), odd.to_vec());
    // fld qword 3.0; fld qword 1.0 → ST0=1, ST1=3; fdiv st0, st1; fstp qword [rax+8]
    t.write(DATA, &3.0f64.to_le_bytes());
    t.write(DATA + 8, &1.0f64.to_le_bytes());
    t.run(
        &[0xdd, 0x00, 0xdd, 0x40, 0x08, 0xd8, 0xf1, 0xdd, 0x58, 0x08],
        4,
    )
    .unwrap();
    assert_eq!(t.read(DATA + 8, 8), (1.0f64 / 3.0).to_le_bytes().to_vec());
    // ST0 = 3 is left; fldpi; fcomi st0, st1 → pi > 3: ZF=PF=CF=0; fucomip; fstp st0
    t.cpu.s.rflags = 2 | ZF | CF | PF;
    t.run(&[0xd9, 0xeb, 0xdb, 0xf1], 2).unwrap();
    assert_eq!(t.cpu.s.rflags & (ZF | PF | CF), 0);
    // fxch; fcom st1 → ST0=3 < pi: C0
    t.run(&[0xd9, 0xc9, 0xd8, 0xd1, 0xdf, 0xe0], 3).unwrap();
    let sw = t.cpu.s.gpr[RAX] as u16;
    assert_eq!(sw & 0x4500, 0x0100);
    assert_eq!(sw >> 11 & 7, 6, "two values on the stack");
    // fsqrt of 3.0 → f64 sqrt(3)
    t.cpu.s.gpr[RAX] = DATA;
    t.run(&[0xd9, 0xfa, 0xdd, 0x18], 2).unwrap();
    assert_eq!(t.read(DATA, 8), 3f64.sqrt().to_le_bytes().to_vec());
    // Integer overflow on fistp word: indefinite 0x8000 and IE.
    t.write(DATA, &1e10f64.to_le_bytes());
    t.run(&[0xdd, 0x00, 0xdf, 0x18], 2).unwrap();
    assert_eq!(t.read(DATA, 2), vec![0x00, 0x80]);
    assert_eq!(t.cpu.s.fpu.fsw & 1, 1);
    // fnclex clears it.
    t.run(&[0xdb, 0xe2], 1).unwrap();
    assert_eq!(t.cpu.s.fpu.fsw & 0xff, 0);
}

#[test]
fn x87_stack_overflow_and_fxam() {
    let mut t = T::new();
    t.run(&[0xdb, 0xe3], 1).unwrap();
    // nine fld1: the ninth overflows and pushes the indefinite.
    let code: Vec<u8> = [0xd9u8, 0xe8].repeat(9);
    t.run(&code, 9).unwrap();
    assert_eq!(t.cpu.s.fpu.fsw & 0x41, 0x41, "IE and SF");
    assert_eq!(t.cpu.s.fpu.st[0], x87::INDEFINITE);
    // fxam on a NaN: C0 only (C1 = sign = 1)
    t.run(&[0xd9, 0xe5], 1).unwrap();
    assert_eq!(t.cpu.s.fpu.fsw & 0x4700, 0x0300);
}

#[test]
fn f80_conversions() {
    for x in [
        0.0,
        -0.0,
        1.0,
        -2.5,
        1e300,
        5e-324,
        f64::MIN_POSITIVE,
        f64::INFINITY,
        1.0 / 3.0,
    ] {
        let v = x87::from_f64(x);
        assert_eq!(x87::to_f64(&v).to_bits(), x.to_bits(), "{x}");
    }
    assert_eq!(x87::from_int(1), x87::from_f64(1.0));
    assert_eq!(x87::from_int(-(1 << 63)), x87::from_f64(-(2f64.powi(63))));
    // Rounding to integers in every mode.
    let v = x87::from_f64(-2.5);
    assert_eq!(x87::to_int(&v, 0), Some((-2, true)));
    assert_eq!(x87::to_int(&v, 1), Some((-3, true)));
    assert_eq!(x87::to_int(&v, 2), Some((-2, true)));
    assert_eq!(x87::to_int(&v, 3), Some((-2, true)));
    assert_eq!(x87::to_int(&x87::from_f64(0.75), 0), Some((1, true)));
    assert_eq!(x87::to_int(&x87::from_f64(1e-30), 2), Some((1, true)));
    assert_eq!(
        x87::to_int(&x87::from_f64(12345.0), 0),
        Some((12345, false))
    );
    assert_eq!(x87::to_int(&x87::from_f64(1e30), 0), None);
}

/// The float core against the host CPU's own SSE unit: result bits and MXCSR flags for
/// special and random operands in all four rounding modes, with DAZ/FTZ off and on.
#[cfg(target_arch = "x86_64")]
mod host {
    use std::arch::asm;

    use super::super::float::{arith, compare, to_int, Env, Op};

    macro_rules! host_op {
        ($name:ident, $t:ty, $ins:literal) => {
            fn $name(a: $t, b: $t, mxcsr: u32) -> ($t, u32) {
                let mut x = a;
                let mut m = mxcsr;
                let mut save = 0u32;
                // SAFETY: only XMM registers and the two local MXCSR slots are touched, and the
                // caller's MXCSR is restored before the block ends.
                unsafe {
                    asm!(
                        "stmxcsr [{s}]",
                        "ldmxcsr [{m}]",
                        concat!($ins, " {x}, {y}"),
                        "stmxcsr [{m}]",
                        "ldmxcsr [{s}]",
                        s = in(reg) &mut save,
                        m = in(reg) &mut m,
                        x = inout(xmm_reg) x,
                        y = in(xmm_reg) b,
                        options(nostack),
                    );
                }
                (x, m & 0x3f)
            }
        };
    }

    host_op!(addsd, f64, "addsd");
    host_op!(subsd, f64, "subsd");
    host_op!(mulsd, f64, "mulsd");
    host_op!(divsd, f64, "divsd");
    host_op!(sqrtsd, f64, "sqrtsd");
    host_op!(minsd, f64, "minsd");
    host_op!(maxsd, f64, "maxsd");
    host_op!(addss, f32, "addss");
    host_op!(mulss, f32, "mulss");
    host_op!(divss, f32, "divss");
    host_op!(sqrtss, f32, "sqrtss");

    fn host_cvttsd2si(a: f64, mxcsr: u32) -> (u64, u32) {
        let mut m = mxcsr;
        let mut save = 0u32;
        let r: u64;
        // SAFETY: as in host_op.
        unsafe {
            asm!(
                "stmxcsr [{s}]",
                "ldmxcsr [{m}]",
                "cvtsd2si {r}, {x}",
                "stmxcsr [{m}]",
                "ldmxcsr [{s}]",
                s = in(reg) &mut save,
                m = in(reg) &mut m,
                r = out(reg) r,
                x = in(xmm_reg) a,
                options(nostack),
            );
        }
        (r, m & 0x3f)
    }

    fn host_cmpltsd(a: f64, b: f64) -> (u64, u32) {
        let (r, fl) = {
            let mut x = a;
            let mut m = 0x1f80u32;
            let mut save = 0u32;
            // SAFETY: as in host_op.
            unsafe {
                asm!(
                    "stmxcsr [{s}]",
                    "ldmxcsr [{m}]",
                    "cmpltsd {x}, {y}",
                    "stmxcsr [{m}]",
                    "ldmxcsr [{s}]",
                    s = in(reg) &mut save,
                    m = in(reg) &mut m,
                    x = inout(xmm_reg) x,
                    y = in(xmm_reg) b,
                    options(nostack),
                );
            }
            (x, m & 0x3f)
        };
        (r.to_bits(), fl)
    }

    /// A host instruction: (a, b, mxcsr) → (result, flags).
    type HostOp<T> = fn(T, T, u32) -> (T, u32);

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn specials64() -> Vec<u64> {
        vec![
            0,
            1 << 63,
            1.0f64.to_bits(),
            (-1.0f64).to_bits(),
            1.5f64.to_bits(),
            3.0f64.to_bits(),
            f64::MAX.to_bits(),
            f64::MIN_POSITIVE.to_bits(),
            1,
            0x000f_ffff_ffff_ffff,
            0x8000_0000_0000_0003,
            f64::INFINITY.to_bits(),
            f64::NEG_INFINITY.to_bits(),
            0x7ff8_0000_0000_0005,
            0xfff0_0000_0000_0007,
            2f64.powi(-1022).to_bits() + 1,
            1e300f64.to_bits(),
            1e-300f64.to_bits(),
            2f64.powi(53).to_bits(),
            (1.0f64 + f64::EPSILON).to_bits(),
        ]
    }

    fn operands64() -> Vec<u64> {
        let mut v = specials64();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..60 {
            let r = rng.next();
            // Mostly moderate exponents so results are interesting, some anything.
            v.push(if r & 3 == 0 {
                r
            } else {
                (r & 0x800f_ffff_ffff_ffff) | ((0x3c0 + (r >> 52) % 0x80) << 52)
            });
        }
        v
    }

    fn modes() -> impl Iterator<Item = u32> {
        (0..4).flat_map(|rc| [0x1f80 | (rc << 13), 0x9fc0 | (rc << 13)])
    }

    #[test]
    fn f64_arith_matches_host() {
        let ops: [(Op, HostOp<f64>); 7] = [
            (Op::Add, addsd),
            (Op::Sub, subsd),
            (Op::Mul, mulsd),
            (Op::Div, divsd),
            (Op::Sqrt, sqrtsd),
            (Op::Min, minsd),
            (Op::Max, maxsd),
        ];
        let xs = operands64();
        let mut bad = Vec::new();
        for m in modes() {
            let env = Env::from_mxcsr(m);
            for &(op, host) in &ops {
                for &a in &xs {
                    for &b in &xs {
                        let (a, b) = (f64::from_bits(a), f64::from_bits(b));
                        let (hr, hf) = host(a, b, m);
                        let mut fl = 0;
                        let r = arith(op, a, b, &env, &mut fl);
                        if r.to_bits() != hr.to_bits() || fl != hf {
                            bad.push(format!(
                                "{op:?} mxcsr={m:#x} {:#x} {:#x}: emu {:#x}/{fl:#x} host {:#x}/{hf:#x}",
                                a.to_bits(),
                                b.to_bits(),
                                r.to_bits(),
                                hr.to_bits()
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{} mismatches, e.g.\n{}",
            bad.len(),
            bad[..bad.len().min(20)].join("\n")
        );
    }

    #[test]
    fn f32_arith_matches_host() {
        let ops: [(Op, HostOp<f32>); 4] = [
            (Op::Add, addss),
            (Op::Mul, mulss),
            (Op::Div, divss),
            (Op::Sqrt, sqrtss),
        ];
        let mut xs: Vec<u32> = vec![
            0,
            0x8000_0000,
            0x3f80_0000,
            0x7f7f_ffff,
            1,
            0x007f_ffff,
            0x7f80_0000,
            0x7fc0_0001,
            0x7f80_0001,
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..60 {
            let r = rng.next() as u32;
            xs.push(if r & 3 == 0 {
                r
            } else {
                (r & 0x807f_ffff) | ((0x60 + (r >> 23) % 0x40) << 23)
            });
        }
        let mut bad = Vec::new();
        for m in modes() {
            let env = Env::from_mxcsr(m);
            for &(op, host) in &ops {
                for &a in &xs {
                    for &b in &xs {
                        let (a, b) = (f32::from_bits(a), f32::from_bits(b));
                        let (hr, hf) = host(a, b, m);
                        let mut fl = 0;
                        let r = arith(op, a, b, &env, &mut fl);
                        if r.to_bits() != hr.to_bits() || fl != hf {
                            bad.push(format!(
                                "{op:?} mxcsr={m:#x} {:#x} {:#x}: emu {:#x}/{fl:#x} host {:#x}/{hf:#x}",
                                a.to_bits(),
                                b.to_bits(),
                                r.to_bits(),
                                hr.to_bits()
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{} mismatches, e.g.\n{}",
            bad.len(),
            bad[..bad.len().min(20)].join("\n")
        );
    }

    #[test]
    fn cvtsd2si_and_cmplt_match_host() {
        let mut xs = operands64();
        xs.extend([2.5f64, -2.5, 3.5, 9.2e18, -(2f64.powi(63)), 1e19].map(f64::to_bits));
        for m in modes() {
            let env = Env::from_mxcsr(m);
            for &a in &xs {
                let a = f64::from_bits(a);
                let (hr, hf) = host_cvttsd2si(a, m);
                let mut fl = 0;
                let x = env.int_input(a);
                let r = to_int(x, 64, env.rc, &mut fl);
                assert_eq!(
                    (r, fl),
                    (hr, hf),
                    "cvtsd2si {:#x} mxcsr {m:#x}",
                    a.to_bits()
                );
            }
        }
        let env = Env::from_mxcsr(0x1f80);
        for &a in &xs {
            for &b in &xs {
                let (a, b) = (f64::from_bits(a), f64::from_bits(b));
                let mut fl = 0;
                let r = if compare(1, a, b, &env, &mut fl) {
                    u64::MAX
                } else {
                    0
                };
                assert_eq!(
                    (r, fl),
                    host_cmpltsd(a, b),
                    "cmpltsd {:#x} {:#x}",
                    a.to_bits(),
                    b.to_bits()
                );
            }
        }
    }
}
