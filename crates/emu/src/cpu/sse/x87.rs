//! The x87 FPU: control instructions (FNINIT, FLDCW, FNSTCW, FNSTSW, FNCLEX, FFREE, …),
//! loads and stores, and a practical subset of arithmetic.
//!
//! Registers hold genuine 80-bit values and everything that only moves them is exact: FLD and
//! FSTP m80, FXCH, FCHS, FABS, FILD/FIST of any integer, constants, compares, FSCALE and
//! FXTRACT of normal numbers, FRNDINT. **Arithmetic (FADD … FDIVR, FSQRT, the transcendental
//! functions) is computed in `f64`**: operands are rounded to 53 bits (and to the f64 exponent
//! range) first, so results can differ from a real x87 in the last 11 bits of the 64-bit
//! significand, precision control (FCW.PC) is ignored, and PE/UE/OE are not reported. Invalid,
//! divide-by-zero and stack faults set their FSW flags (and ES/B when unmasked), but #MF is
//! never raised: the masked response is always applied.
//!
//! `FpuState::st[i]` is ST(i) (the physical registers rotated by TOP), the FXSAVE order;
//! `ftw` is the abridged tag word, one bit per *physical* register.

use std::cmp::Ordering;

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::super::operand::sext;
use super::super::state::flags::{AF, CF, OF, PF, SF, ZF};
use super::super::{Cpu, Exec};
use super::mx;

pub(super) type F80 = [u8; 10];

const C0: u16 = 1 << 8;
const C1: u16 = 1 << 9;
const C2: u16 = 1 << 10;
const C3: u16 = 1 << 14;
const FSW_SF: u16 = 1 << 6;
const FSW_ES: u16 = 1 << 7;
const FSW_B: u16 = 1 << 15;

const BIAS: i32 = 16383;
const INT_BIT: u64 = 1 << 63;
/// 2^63: FSIN/FCOS/FPTAN/FSINCOS leave larger operands alone (C2 = 1).
const TWO63: f64 = INT_BIT as f64;

pub(super) fn handles(m: M) -> bool {
    matches!(
        m,
        M::Fninit
            | M::Finit
            | M::Fldcw
            | M::Fnstcw
            | M::Fstcw
            | M::Fnstsw
            | M::Fstsw
            | M::Fnclex
            | M::Fclex
            | M::Ffree
            | M::Ffreep
            | M::Fincstp
            | M::Fdecstp
            | M::Fnop
            | M::Fld
            | M::Fst
            | M::Fstp
            | M::Fild
            | M::Fist
            | M::Fistp
            | M::Fldz
            | M::Fld1
            | M::Fldpi
            | M::Fldl2e
            | M::Fldl2t
            | M::Fldlg2
            | M::Fldln2
            | M::Fadd
            | M::Faddp
            | M::Fiadd
            | M::Fsub
            | M::Fsubp
            | M::Fisub
            | M::Fsubr
            | M::Fsubrp
            | M::Fisubr
            | M::Fmul
            | M::Fmulp
            | M::Fimul
            | M::Fdiv
            | M::Fdivp
            | M::Fidiv
            | M::Fdivr
            | M::Fdivrp
            | M::Fidivr
            | M::Fchs
            | M::Fabs
            | M::Fxch
            | M::Fsqrt
            | M::Frndint
            | M::Fscale
            | M::Fprem
            | M::Fprem1
            | M::Fxtract
            | M::Fsin
            | M::Fcos
            | M::Fsincos
            | M::Fptan
            | M::Fpatan
            | M::F2xm1
            | M::Fyl2x
            | M::Fyl2xp1
            | M::Fcom
            | M::Fcomp
            | M::Fcompp
            | M::Fucom
            | M::Fucomp
            | M::Fucompp
            | M::Ficom
            | M::Ficomp
            | M::Ftst
            | M::Fxam
            | M::Fcomi
            | M::Fcomip
            | M::Fucomi
            | M::Fucomip
            | M::Fcmovb
            | M::Fcmove
            | M::Fcmovbe
            | M::Fcmovu
            | M::Fcmovnb
            | M::Fcmovne
            | M::Fcmovnbe
            | M::Fcmovnu
    )
}

// ---- 80-bit values ----

pub(super) fn split(x: &F80) -> (bool, u16, u64) {
    let man = u64::from_le_bytes(x[..8].try_into().unwrap());
    let se = u16::from_le_bytes([x[8], x[9]]);
    (se & 0x8000 != 0, se & 0x7fff, man)
}

pub(super) fn join(sign: bool, exp: u16, man: u64) -> F80 {
    let mut o = [0u8; 10];
    o[..8].copy_from_slice(&man.to_le_bytes());
    o[8..].copy_from_slice(&((exp & 0x7fff) | if sign { 0x8000 } else { 0 }).to_le_bytes());
    o
}

/// The "real indefinite" QNaN.
pub(super) const INDEFINITE: F80 = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff];

fn is_nan(x: &F80) -> bool {
    let (_, e, m) = split(x);
    e == 0x7fff && m << 1 != 0
}

fn is_snan(x: &F80) -> bool {
    is_nan(x) && split(x).2 & (1 << 62) == 0
}

fn quiet(x: &F80) -> F80 {
    let (s, e, m) = split(x);
    join(s, e, m | (1 << 62) | INT_BIT)
}

/// `x * 2^e`, exact while the result is a normal f64.
fn ldexp(mut x: f64, mut e: i32) -> f64 {
    let big = f64::from_bits(((1000 + 1023) as u64) << 52);
    let small = f64::from_bits(((-1000 + 1023) as u64) << 52);
    while e > 1000 {
        x *= big;
        e -= 1000;
    }
    while e < -1000 {
        x *= small;
        e += 1000;
    }
    x * f64::from_bits(((e + 1023) as u64) << 52)
}

/// Rounds an 80-bit value to the nearest `f64` (this is where arithmetic loses precision).
pub(super) fn to_f64(x: &F80) -> f64 {
    let (s, e, m) = split(x);
    let sign = if s { -1.0 } else { 1.0 };
    if e == 0x7fff {
        if m << 1 == 0 {
            return sign * f64::INFINITY;
        }
        let frac = (m >> 11) & ((1 << 52) - 1);
        let frac = if frac == 0 { 1 } else { frac };
        return f64::from_bits(u64::from(s) << 63 | 0x7ff << 52 | frac);
    }
    if m == 0 {
        return sign * 0.0;
    }
    let exp = if e == 0 { 1 } else { i32::from(e) };
    sign * ldexp(m as f64, exp - BIAS - 63)
}

/// Converts an `f64` to 80 bits (exact).
pub(super) fn from_f64(x: f64) -> F80 {
    let b = x.to_bits();
    let s = b >> 63 != 0;
    let e = ((b >> 52) & 0x7ff) as i32;
    let frac = b & ((1 << 52) - 1);
    if e == 0x7ff {
        return join(s, 0x7fff, INT_BIT | (frac << 11));
    }
    if e == 0 {
        if frac == 0 {
            return join(s, 0, 0);
        }
        let lz = frac.leading_zeros() as i32;
        // value = frac * 2^-1074 = (frac << lz) * 2^(-1074 - lz).
        return join(s, (-1074 - lz + BIAS + 63) as u16, frac << lz);
    }
    join(s, (e - 1023 + BIAS) as u16, INT_BIT | (frac << 11))
}

/// An integer as 80 bits (exact for all of i64 and ±2^64).
pub(super) fn from_int(v: i128) -> F80 {
    if v == 0 {
        return join(false, 0, 0);
    }
    let a = v.unsigned_abs();
    let lz = a.leading_zeros();
    let norm = a << lz;
    let man = (norm >> 64) as u64;
    join(v < 0, (BIAS + 127 - lz as i32) as u16, man)
}

/// `x` as (sign, unbiased exponent of the top bit, normalized significand), `None` for zero.
fn normalize(x: &F80) -> Option<(bool, i32, u64)> {
    let (s, e, m) = split(x);
    if m == 0 {
        return None;
    }
    let lz = m.leading_zeros() as i32;
    let exp = if e == 0 { 1 } else { i32::from(e) };
    Some((s, exp - BIAS - lz, m << lz))
}

/// Rounds a finite `x` to an integer per `rc` (0 nearest-even, 1 down, 2 up, 3 toward
/// zero); `None` when it does not fit in an i128-representable 66-bit range. The flag says
/// whether rounding was inexact.
pub(super) fn to_int(x: &F80, rc: u16) -> Option<(i128, bool)> {
    let Some((s, e, m)) = normalize(x) else {
        return Some((0, false));
    };
    // value = m * 2^(e - 63)
    if e >= 66 {
        return None;
    }
    let sign = |q: u128| if s { -(q as i128) } else { q as i128 };
    if e >= 63 {
        return Some((sign(u128::from(m) << (e - 63)), false));
    }
    let sh = (63 - e) as u32;
    let (mut q, half_cmp) = if sh > 64 {
        (0u128, Ordering::Less)
    } else {
        let m = u128::from(m);
        let rem = m & ((1u128 << sh) - 1);
        (m >> sh, rem.cmp(&(1u128 << (sh - 1))))
    };
    let inexact = sh > 64 || (u128::from(m) & ((1u128 << sh) - 1)) != 0;
    if inexact {
        let bump = match rc {
            0 => half_cmp == Ordering::Greater || (half_cmp == Ordering::Equal && q & 1 == 1),
            1 => s,
            2 => !s,
            _ => false,
        };
        if bump {
            q += 1;
        }
    }
    Some((sign(q), inexact))
}

/// Total order of two non-NaN values (`None` if either is a NaN).
fn cmp80(a: &F80, b: &F80) -> Option<Ordering> {
    if is_nan(a) || is_nan(b) {
        return None;
    }
    let key = |x: &F80| -> (i32, i128) {
        // Infinity sorts above every finite value.
        let (s, e, _) = split(x);
        if e == 0x7fff {
            return (if s { -1 } else { 1 }, i128::MAX);
        }
        match normalize(x) {
            None => (0, 0),
            Some((s, e, m)) => {
                let mag = (i128::from(e + 20000) << 64) | i128::from(m);
                (if s { -1 } else { 1 }, mag)
            }
        }
    };
    let (sa, ma) = key(a);
    let (sb, mb) = key(b);
    Some(match (sa, sb) {
        (0, 0) => Ordering::Equal,
        _ if sa != sb => sa.cmp(&sb),
        (1, _) => ma.cmp(&mb),
        _ => mb.cmp(&ma),
    })
}

const CONST_1: F80 = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f];

fn constant(m: M) -> F80 {
    let (e, man): (u16, u64) = match m {
        M::Fld1 => return CONST_1,
        M::Fldz => return [0; 10],
        M::Fldpi => (0x4000, 0xc90f_daa2_2168_c235),
        M::Fldl2e => (0x3fff, 0xb8aa_3b29_5c17_f0bc),
        M::Fldl2t => (0x4000, 0xd49a_784b_cd1b_8afe),
        M::Fldlg2 => (0x3ffd, 0x9a20_9a84_fbcf_f799),
        _ => (0x3ffe, 0xb172_17f7_d1cf_79ac),
    };
    join(false, e, man)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arith {
    Add,
    Sub,
    Subr,
    Mul,
    Div,
    Divr,
}

// ---- register stack ----

impl Cpu {
    fn top(&self) -> usize {
        usize::from((self.s.fpu.fsw >> 11) & 7)
    }

    fn set_top(&mut self, t: usize) {
        let f = &mut self.s.fpu;
        f.fsw = (f.fsw & !(7 << 11)) | ((t as u16 & 7) << 11);
    }

    fn phys(&self, i: usize) -> usize {
        (self.top() + i) & 7
    }

    fn st_valid(&self, i: usize) -> bool {
        self.s.fpu.ftw & (1 << self.phys(i)) != 0
    }

    /// Sets x87 exception flags; ES and B follow when one is unmasked.
    fn fpu_flags(&mut self, flags: u32) {
        let f = &mut self.s.fpu;
        f.fsw |= (flags & 0x7f) as u16;
        if f.fsw & !f.fcw & 0x3f != 0 {
            f.fsw |= FSW_ES | FSW_B;
        }
    }

    fn set_cc(&mut self, cc: u16) {
        let f = &mut self.s.fpu;
        f.fsw = (f.fsw & !(C0 | C1 | C2 | C3)) | cc;
    }

    /// ST(i), or the indefinite after a stack underflow if it is empty.
    fn st(&mut self, i: usize) -> F80 {
        if !self.st_valid(i) {
            self.s.fpu.fsw &= !C1;
            self.fpu_flags(mx::IE | u32::from(FSW_SF));
            return INDEFINITE;
        }
        self.s.fpu.st[i]
    }

    fn set_st(&mut self, i: usize, v: F80) {
        let p = self.phys(i);
        self.s.fpu.st[i] = v;
        self.s.fpu.ftw |= 1 << p;
    }

    fn fpush(&mut self, v: F80) {
        let t = (self.top() + 7) & 7;
        let v = if self.s.fpu.ftw & (1 << t) != 0 {
            // Stack overflow: the masked response pushes the indefinite.
            self.s.fpu.fsw |= C1;
            self.fpu_flags(mx::IE | u32::from(FSW_SF));
            INDEFINITE
        } else {
            v
        };
        self.s.fpu.st.rotate_right(1);
        self.set_top(t);
        self.set_st(0, v);
    }

    fn fpop(&mut self) {
        let p = self.phys(0);
        self.s.fpu.ftw &= !(1 << p);
        self.s.fpu.st.rotate_left(1);
        self.set_top(self.top() + 1);
    }

    fn rc(&self) -> u16 {
        (self.s.fpu.fcw >> 10) & 3
    }

    /// Reads a memory operand as an 80-bit value (float or integer by its size).
    fn load_mem(&mut self, insn: &Instruction) -> Exec<F80> {
        use iced_x86::MemorySize as S;
        let lin = self.mem_linear(insn);
        let ms = insn.memory_size();
        Ok(match ms {
            S::Float80 => {
                let v = self.read_vec(lin, 10)?;
                v[..10].try_into().unwrap()
            }
            S::Float32 | S::Float64 => {
                let size = ms.size();
                let raw = self.read_vec(lin, size)?;
                let x = if size == 4 {
                    let b = u32::from_le_bytes(raw[..4].try_into().unwrap());
                    let f = f32::from_bits(b);
                    if f.is_nan() {
                        // Widen the NaN payload by hand (the host conversion may not keep it).
                        let frac = u64::from(b & 0x7f_ffff) << 29;
                        f64::from_bits(u64::from(b >> 31) << 63 | 0x7ff << 52 | frac)
                    } else {
                        f64::from(f)
                    }
                } else {
                    f64::from_bits(u64::from_le_bytes(raw[..8].try_into().unwrap()))
                };
                let v = from_f64(x);
                if is_snan(&v) {
                    self.fpu_flags(mx::IE);
                    quiet(&v)
                } else {
                    v
                }
            }
            _ => {
                let size = ms.size();
                let raw = self.read_lin(lin, size, super::super::mmu::Access::Read)?;
                from_int(i128::from(sext(raw, size) as i64))
            }
        })
    }

    fn arith80(&mut self, op: Arith, a: &F80, b: &F80) -> F80 {
        if is_nan(a) || is_nan(b) {
            if is_snan(a) || is_snan(b) {
                self.fpu_flags(mx::IE);
            }
            // Two NaNs: the one with the larger significand.
            let pick = match (is_nan(a), is_nan(b)) {
                (true, true) => {
                    if split(a).2 << 1 >= split(b).2 << 1 {
                        a
                    } else {
                        b
                    }
                }
                (true, false) => a,
                _ => b,
            };
            return quiet(pick);
        }
        let (x, y) = (to_f64(a), to_f64(b));
        let r = match op {
            Arith::Add => x + y,
            Arith::Sub => x - y,
            Arith::Subr => y - x,
            Arith::Mul => x * y,
            Arith::Div => x / y,
            Arith::Divr => y / x,
        };
        if r.is_nan() {
            self.fpu_flags(mx::IE);
            return INDEFINITE;
        }
        let (num, den) = if op == Arith::Divr { (y, x) } else { (x, y) };
        if matches!(op, Arith::Div | Arith::Divr) && den == 0.0 && num.is_finite() {
            self.fpu_flags(mx::ZE);
        }
        from_f64(r)
    }

    /// Stores ST(0) to a memory operand (float or integer by its size).
    fn store_mem(&mut self, insn: &Instruction, v: &F80) -> Exec {
        use iced_x86::MemorySize as S;
        let lin = self.mem_linear(insn);
        let ms = insn.memory_size();
        match ms {
            S::Float80 => {
                let mut b = [0u8; 16];
                b[..10].copy_from_slice(v);
                self.write_vec(lin, &b, 10)
            }
            S::Float32 => {
                let bits = if is_nan(v) {
                    let (s, _, m) = split(v);
                    u32::from(s) << 31 | 0x7fc0_0000 | ((m >> 40) as u32 & 0x7f_ffff)
                } else {
                    (to_f64(v) as f32).to_bits()
                };
                self.write_lin(lin, 4, u64::from(bits))
            }
            S::Float64 => self.write_lin(lin, 8, to_f64(v).to_bits()),
            _ => {
                let size = ms.size();
                let bits = size as u32 * 8;
                let lim = 1i128 << (bits - 1);
                let r = if is_nan(v) || split(v).1 == 0x7fff {
                    None
                } else {
                    to_int(v, self.rc())
                };
                let val = match r {
                    Some((n, inexact)) if n >= -lim && n < lim => {
                        if inexact {
                            self.fpu_flags(mx::PE);
                        }
                        n as u64
                    }
                    _ => {
                        self.fpu_flags(mx::IE);
                        lim as u64
                    }
                };
                self.write_lin(lin, size, val)
            }
        }
    }

    /// Compares `a` with `b`: sets C3/C2/C0 (or ZF/PF/CF for FCOMI) and IE as FCOM
    /// (`signaling`) or FUCOM do.
    fn fcompare(&mut self, a: &F80, b: &F80, signaling: bool, eflags: bool) {
        let ord = cmp80(a, b);
        if (ord.is_none() && signaling) || is_snan(a) || is_snan(b) {
            self.fpu_flags(mx::IE);
        }
        if eflags {
            let mut f = self.s.rflags & !(ZF | PF | CF | OF | SF | AF);
            f |= match ord {
                None => ZF | PF | CF,
                Some(Ordering::Less) => CF,
                Some(Ordering::Equal) => ZF,
                Some(Ordering::Greater) => 0,
            };
            self.s.rflags = f;
            self.s.fpu.fsw &= !C1;
        } else {
            self.set_cc(match ord {
                None => C3 | C2 | C0,
                Some(Ordering::Less) => C0,
                Some(Ordering::Equal) => C3,
                Some(Ordering::Greater) => 0,
            });
        }
    }
}

fn st_index(r: Register) -> usize {
    r as usize - Register::ST0 as usize
}

/// Whether a control instruction (these leave FIP/FDP/FOP alone).
fn is_control(m: M) -> bool {
    matches!(
        m,
        M::Fninit
            | M::Finit
            | M::Fldcw
            | M::Fnstcw
            | M::Fstcw
            | M::Fnstsw
            | M::Fstsw
            | M::Fnclex
            | M::Fclex
    )
}

pub(super) fn execute(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let m = insn.mnemonic();
    if !is_control(m) {
        cpu.s.fpu.fip = cpu.start_rip;
        if insn.op_count() > 0 && insn.op0_kind() == OpKind::Memory {
            cpu.s.fpu.fdp = cpu.effective_address(insn);
        }
    }
    let reg = |n: u32| st_index(insn.op_register(n));
    match m {
        M::Fninit | M::Finit => {
            let f = &mut cpu.s.fpu;
            f.fcw = 0x37f;
            f.fsw = 0;
            f.ftw = 0;
            f.fop = 0;
            f.fip = 0;
            f.fdp = 0;
        }
        M::Fldcw => {
            let v = cpu.read_op(insn, 0)? as u16;
            cpu.s.fpu.fcw = v;
            let f = &mut cpu.s.fpu;
            if f.fsw & !f.fcw & 0x3f != 0 {
                f.fsw |= FSW_ES | FSW_B;
            } else {
                f.fsw &= !(FSW_ES | FSW_B);
            }
        }
        M::Fnstcw | M::Fstcw => cpu.write_op(insn, 0, u64::from(cpu.s.fpu.fcw))?,
        M::Fnstsw | M::Fstsw => cpu.write_op(insn, 0, u64::from(cpu.s.fpu.fsw))?,
        M::Fnclex | M::Fclex => cpu.s.fpu.fsw &= !(0xff | FSW_B),
        M::Ffree => {
            let p = cpu.phys(reg(0));
            cpu.s.fpu.ftw &= !(1 << p);
        }
        M::Ffreep => {
            let p = cpu.phys(reg(0));
            cpu.s.fpu.ftw &= !(1 << p);
            cpu.fpop();
        }
        M::Fincstp => {
            cpu.s.fpu.st.rotate_left(1);
            cpu.set_top(cpu.top() + 1);
            cpu.s.fpu.fsw &= !C1;
        }
        M::Fdecstp => {
            cpu.s.fpu.st.rotate_right(1);
            cpu.set_top(cpu.top() + 7);
            cpu.s.fpu.fsw &= !C1;
        }
        M::Fnop => {}
        M::Fld => {
            let v = if insn.op0_kind() == OpKind::Memory {
                cpu.load_mem(insn)?
            } else {
                cpu.st(reg(0))
            };
            cpu.s.fpu.fsw &= !C1;
            cpu.fpush(v);
        }
        M::Fild => {
            let v = cpu.load_mem(insn)?;
            cpu.s.fpu.fsw &= !C1;
            cpu.fpush(v);
        }
        M::Fldz | M::Fld1 | M::Fldpi | M::Fldl2e | M::Fldl2t | M::Fldlg2 | M::Fldln2 => {
            cpu.s.fpu.fsw &= !C1;
            cpu.fpush(constant(m));
        }
        M::Fst | M::Fstp | M::Fist | M::Fistp => {
            let v = cpu.st(0);
            cpu.s.fpu.fsw &= !C1;
            if insn.op0_kind() == OpKind::Memory {
                cpu.store_mem(insn, &v)?;
            } else {
                cpu.set_st(reg(0), v);
            }
            if matches!(m, M::Fstp | M::Fistp) {
                cpu.fpop();
            }
        }
        M::Fadd
        | M::Faddp
        | M::Fiadd
        | M::Fsub
        | M::Fsubp
        | M::Fisub
        | M::Fsubr
        | M::Fsubrp
        | M::Fisubr
        | M::Fmul
        | M::Fmulp
        | M::Fimul
        | M::Fdiv
        | M::Fdivp
        | M::Fidiv
        | M::Fdivr
        | M::Fdivrp
        | M::Fidivr => {
            let op = match m {
                M::Fadd | M::Faddp | M::Fiadd => Arith::Add,
                M::Fsub | M::Fsubp | M::Fisub => Arith::Sub,
                M::Fsubr | M::Fsubrp | M::Fisubr => Arith::Subr,
                M::Fmul | M::Fmulp | M::Fimul => Arith::Mul,
                M::Fdiv | M::Fdivp | M::Fidiv => Arith::Div,
                _ => Arith::Divr,
            };
            let (d, src) = if insn.op0_kind() == OpKind::Memory {
                (0, cpu.load_mem(insn)?)
            } else {
                let s = cpu.st(reg(1));
                (reg(0), s)
            };
            let a = cpu.st(d);
            cpu.s.fpu.fsw &= !C1;
            let r = cpu.arith80(op, &a, &src);
            cpu.set_st(d, r);
            if matches!(
                m,
                M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp
            ) {
                cpu.fpop();
            }
        }
        M::Fchs | M::Fabs => {
            let mut v = cpu.st(0);
            if m == M::Fchs {
                v[9] ^= 0x80;
            } else {
                v[9] &= 0x7f;
            }
            cpu.s.fpu.fsw &= !C1;
            cpu.set_st(0, v);
        }
        M::Fxch => {
            let i = reg(1);
            let (a, b) = (cpu.st(0), cpu.st(i));
            cpu.set_st(0, b);
            cpu.set_st(i, a);
            cpu.s.fpu.fsw &= !C1;
        }
        M::Fcom
        | M::Fcomp
        | M::Fcompp
        | M::Fucom
        | M::Fucomp
        | M::Fucompp
        | M::Ficom
        | M::Ficomp
        | M::Ftst => {
            let a = cpu.st(0);
            let b = if m == M::Ftst {
                [0; 10]
            } else if insn.op_count() == 0 {
                cpu.st(1)
            } else if insn.op0_kind() == OpKind::Memory {
                cpu.load_mem(insn)?
            } else {
                cpu.st(reg(insn.op_count() - 1))
            };
            let signaling = !matches!(m, M::Fucom | M::Fucomp | M::Fucompp);
            cpu.fcompare(&a, &b, signaling, false);
            match m {
                M::Fcomp | M::Fucomp | M::Ficomp => cpu.fpop(),
                M::Fcompp | M::Fucompp => {
                    cpu.fpop();
                    cpu.fpop();
                }
                _ => {}
            }
        }
        M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip => {
            let (a, b) = (cpu.st(0), cpu.st(reg(1)));
            cpu.fcompare(&a, &b, matches!(m, M::Fcomi | M::Fcomip), true);
            if matches!(m, M::Fcomip | M::Fucomip) {
                cpu.fpop();
            }
        }
        M::Fxam => {
            let v = cpu.s.fpu.st[0];
            let (s, e, man) = split(&v);
            let c1 = if s { C1 } else { 0 };
            let cc = if !cpu.st_valid(0) {
                C3 | C0
            } else if e == 0x7fff {
                if man & INT_BIT == 0 {
                    0
                } else if man << 1 == 0 {
                    C2 | C0
                } else {
                    C0
                }
            } else if e == 0 {
                if man == 0 {
                    C3
                } else {
                    C3 | C2
                }
            } else if man & INT_BIT == 0 {
                0
            } else {
                C2
            };
            cpu.set_cc(cc | c1);
        }
        M::Fcmovb
        | M::Fcmove
        | M::Fcmovbe
        | M::Fcmovu
        | M::Fcmovnb
        | M::Fcmovne
        | M::Fcmovnbe
        | M::Fcmovnu => {
            let f = cpu.s.rflags;
            let (cf, zf, pf) = (f & CF != 0, f & ZF != 0, f & PF != 0);
            let take = match m {
                M::Fcmovb => cf,
                M::Fcmove => zf,
                M::Fcmovbe => cf || zf,
                M::Fcmovu => pf,
                M::Fcmovnb => !cf,
                M::Fcmovne => !zf,
                M::Fcmovnbe => !cf && !zf,
                _ => !pf,
            };
            let v = cpu.st(reg(1));
            cpu.s.fpu.fsw &= !C1;
            if take {
                cpu.set_st(0, v);
            }
        }
        M::Frndint => {
            let v = cpu.st(0);
            let (s, e, _) = split(&v);
            let r = if is_nan(&v) || e == 0x7fff {
                if is_snan(&v) {
                    cpu.fpu_flags(mx::IE);
                }
                quiet_if_nan(&v)
            } else {
                match to_int(&v, cpu.rc()) {
                    Some((n, inexact)) => {
                        if inexact {
                            cpu.fpu_flags(mx::PE);
                        }
                        let mut r = from_int(n);
                        if n == 0 && s {
                            r[9] |= 0x80;
                        }
                        r
                    }
                    None => v,
                }
            };
            cpu.set_st(0, r);
        }
        M::Fscale => {
            let (a, b) = (cpu.st(0), cpu.st(1));
            let n = to_f64(&b).trunc();
            let r = match normalize(&a) {
                Some((s, e, man)) if !is_nan(&a) && split(&a).1 != 0x7fff && n.abs() < 30000.0 => {
                    let ne = e + n as i32 + BIAS;
                    if (1..0x7fff).contains(&ne) {
                        join(s, ne as u16, man)
                    } else {
                        from_f64(ldexp(to_f64(&a), n as i32))
                    }
                }
                _ => {
                    let x = to_f64(&a) * 2f64.powf(n);
                    if x.is_nan() && !is_nan(&a) && !is_nan(&b) {
                        cpu.fpu_flags(mx::IE);
                        INDEFINITE
                    } else if is_nan(&a) || is_nan(&b) {
                        quiet(if is_nan(&a) { &a } else { &b })
                    } else {
                        from_f64(x)
                    }
                }
            };
            cpu.set_st(0, r);
        }
        M::Fxtract => {
            let v = cpu.st(0);
            match normalize(&v) {
                Some((s, e, man)) if split(&v).1 != 0x7fff => {
                    cpu.set_st(0, from_int(i128::from(e)));
                    cpu.fpush(join(s, BIAS as u16, man));
                }
                None => {
                    cpu.fpu_flags(mx::ZE);
                    cpu.set_st(0, from_f64(f64::NEG_INFINITY));
                    cpu.fpush(v);
                }
                _ => {
                    // NaN or infinity: exponent +inf (or the NaN), significand the value.
                    let e = if is_nan(&v) {
                        quiet(&v)
                    } else {
                        from_f64(f64::INFINITY)
                    };
                    cpu.set_st(0, e);
                    cpu.fpush(quiet_if_nan(&v));
                }
            }
        }
        M::Fprem | M::Fprem1 => {
            let (a, b) = (cpu.st(0), cpu.st(1));
            let (x, y) = (to_f64(&a), to_f64(&b));
            if is_nan(&a) || is_nan(&b) {
                let r = cpu.arith80(Arith::Add, &a, &b);
                cpu.set_st(0, r);
            } else if x.is_infinite() || y == 0.0 {
                cpu.fpu_flags(mx::IE);
                cpu.set_st(0, INDEFINITE);
            } else {
                let r = if m == M::Fprem { x % y } else { ieee_rem(x, y) };
                let q = ((x - r) / y).round().abs() as u64;
                let mut cc = 0;
                if q & 1 != 0 {
                    cc |= C1;
                }
                if q & 2 != 0 {
                    cc |= C3;
                }
                if q & 4 != 0 {
                    cc |= C0;
                }
                cpu.set_cc(cc);
                cpu.set_st(0, from_f64(r));
            }
        }
        M::Fsqrt | M::Fsin | M::Fcos | M::F2xm1 => {
            let a = cpu.st(0);
            if is_nan(&a) {
                if is_snan(&a) {
                    cpu.fpu_flags(mx::IE);
                }
                cpu.set_st(0, quiet(&a));
            } else {
                let x = to_f64(&a);
                if matches!(m, M::Fsin | M::Fcos) && x.abs() >= TWO63 {
                    // Out of range: C2 set, operand unchanged.
                    cpu.set_cc(C2);
                    return Ok(());
                }
                let r = match m {
                    M::Fsqrt => x.sqrt(),
                    M::Fsin => x.sin(),
                    M::Fcos => x.cos(),
                    _ => (x * std::f64::consts::LN_2).exp_m1(),
                };
                cpu.s.fpu.fsw &= !(C1 | C2);
                if r.is_nan() {
                    cpu.fpu_flags(mx::IE);
                    cpu.set_st(0, INDEFINITE);
                } else {
                    cpu.set_st(0, from_f64(r));
                }
            }
        }
        M::Fsincos | M::Fptan => {
            let a = cpu.st(0);
            let x = to_f64(&a);
            if x.is_nan() || x.is_infinite() {
                if !x.is_nan() || is_snan(&a) {
                    cpu.fpu_flags(mx::IE);
                }
                let r = if x.is_nan() { quiet(&a) } else { INDEFINITE };
                cpu.set_st(0, r);
                cpu.fpush(r);
            } else if x.abs() >= TWO63 {
                cpu.set_cc(C2);
            } else {
                cpu.s.fpu.fsw &= !(C1 | C2);
                if m == M::Fsincos {
                    cpu.set_st(0, from_f64(x.sin()));
                    cpu.fpush(from_f64(x.cos()));
                } else {
                    cpu.set_st(0, from_f64(x.tan()));
                    cpu.fpush(CONST_1);
                }
            }
        }
        M::Fpatan | M::Fyl2x | M::Fyl2xp1 => {
            let (a, b) = (cpu.st(0), cpu.st(1));
            let r = if is_nan(&a) || is_nan(&b) {
                cpu.arith80(Arith::Add, &a, &b)
            } else {
                let (x, y) = (to_f64(&a), to_f64(&b));
                let r = match m {
                    M::Fpatan => y.atan2(x),
                    M::Fyl2x => {
                        if x == 0.0 && y != 0.0 && !y.is_nan() {
                            cpu.fpu_flags(mx::ZE);
                        }
                        y * x.log2()
                    }
                    _ => y * x.ln_1p() / std::f64::consts::LN_2,
                };
                if r.is_nan() {
                    cpu.fpu_flags(mx::IE);
                    INDEFINITE
                } else {
                    from_f64(r)
                }
            };
            cpu.set_st(1, r);
            cpu.fpop();
        }
        _ => return Err(cpu.unimplemented(insn)),
    }
    Ok(())
}

fn quiet_if_nan(v: &F80) -> F80 {
    if is_nan(v) {
        quiet(v)
    } else {
        *v
    }
}

/// IEEE remainder: x - y*n with n = x/y rounded to nearest-even.
fn ieee_rem(x: f64, y: f64) -> f64 {
    let r = x % y;
    let ay = y.abs();
    let ar = r.abs();
    if 2.0 * ar > ay || (2.0 * ar == ay && ((x - r) / y).round() as i64 & 1 != 0) {
        if r > 0.0 {
            r - ay
        } else {
            r + ay
        }
    } else {
        r
    }
}
