//! SSE/SSE2 floating point: scalar and packed arithmetic, MIN/MAX, SQRT, RCP/RSQRT, compares,
//! COMIS/UCOMIS and conversions.
//!
//! Arithmetic runs on the host's IEEE `f32`/`f64`, which round to nearest-even; the other
//! MXCSR rounding modes are applied afterwards from the exact error term of the operation
//! (two-sum for add/sub, fused multiply-add residuals for mul/div/sqrt), so every result is
//! correctly rounded in all four modes. NaN propagation follows the SSE rules (first source's
//! NaN wins, quieted; invalid operations give the negative "QNaN floating-point
//! indefinite"). The exception flags IE, DE, ZE, OE, UE and PE are computed; DAZ and FTZ are
//! honoured. RCPPS/RSQRTPS return the exactly rounded reciprocal, which is within the
//! architectural error bound but not bit-identical to any real CPU's table.

use std::cmp::Ordering;

use iced_x86::{Instruction, Mnemonic as M};

use super::super::state::flags::{AF, CF, OF, PF, SF, ZF};
use super::super::{Cpu, Exec};
use super::{mx, V};

pub(super) fn handles(m: M) -> bool {
    op_of(m).is_some()
        || matches!(
            m,
            M::Cmpss
                | M::Cmpsd
                | M::Cmpps
                | M::Cmppd
                | M::Comiss
                | M::Comisd
                | M::Ucomiss
                | M::Ucomisd
                | M::Cvtsi2ss
                | M::Cvtsi2sd
                | M::Cvtss2si
                | M::Cvtsd2si
                | M::Cvttss2si
                | M::Cvttsd2si
                | M::Cvtss2sd
                | M::Cvtsd2ss
                | M::Cvtps2pd
                | M::Cvtpd2ps
                | M::Cvtdq2ps
                | M::Cvtps2dq
                | M::Cvttps2dq
                | M::Cvtdq2pd
                | M::Cvtpd2dq
                | M::Cvttpd2dq
                | M::Cvtpi2ps
                | M::Cvtps2pi
                | M::Cvttps2pi
                | M::Cvtpi2pd
                | M::Cvtpd2pi
                | M::Cvttpd2pi
        )
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    Sqrt,
    Rcp,
    Rsqrt,
}

/// (operation, double precision, scalar).
fn op_of(m: M) -> Option<(Op, bool, bool)> {
    use Op::*;
    Some(match m {
        M::Addss => (Add, false, true),
        M::Addsd => (Add, true, true),
        M::Addps => (Add, false, false),
        M::Addpd => (Add, true, false),
        M::Subss => (Sub, false, true),
        M::Subsd => (Sub, true, true),
        M::Subps => (Sub, false, false),
        M::Subpd => (Sub, true, false),
        M::Mulss => (Mul, false, true),
        M::Mulsd => (Mul, true, true),
        M::Mulps => (Mul, false, false),
        M::Mulpd => (Mul, true, false),
        M::Divss => (Div, false, true),
        M::Divsd => (Div, true, true),
        M::Divps => (Div, false, false),
        M::Divpd => (Div, true, false),
        M::Minss => (Min, false, true),
        M::Minsd => (Min, true, true),
        M::Minps => (Min, false, false),
        M::Minpd => (Min, true, false),
        M::Maxss => (Max, false, true),
        M::Maxsd => (Max, true, true),
        M::Maxps => (Max, false, false),
        M::Maxpd => (Max, true, false),
        M::Sqrtss => (Sqrt, false, true),
        M::Sqrtsd => (Sqrt, true, true),
        M::Sqrtps => (Sqrt, false, false),
        M::Sqrtpd => (Sqrt, true, false),
        M::Rcpss => (Rcp, false, true),
        M::Rcpps => (Rcp, false, false),
        M::Rsqrtss => (Rsqrt, false, true),
        M::Rsqrtps => (Rsqrt, false, false),
        _ => return None,
    })
}

/// An IEEE binary format as the SSE unit sees it.
pub(super) trait Fp: Copy + PartialOrd + std::fmt::Debug {
    const BYTES: usize;
    const MAN: u32;
    const EXP_MASK: u64;
    const QUIET: u64;
    const SIGN: u64;
    const INDEFINITE: u64;
    fn bits(self) -> u64;
    fn from_bits(b: u64) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn sqrt(self) -> Self;
    fn fma(self, a: Self, b: Self) -> Self;
    fn zero() -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;

    fn get(v: &V, i: usize) -> Self {
        let mut b = [0u8; 8];
        b[..Self::BYTES].copy_from_slice(&v[i * Self::BYTES..(i + 1) * Self::BYTES]);
        Self::from_bits(u64::from_le_bytes(b))
    }
    fn put(self, v: &mut V, i: usize) {
        v[i * Self::BYTES..(i + 1) * Self::BYTES]
            .copy_from_slice(&self.bits().to_le_bytes()[..Self::BYTES]);
    }
    /// Exponent of the smallest normal number.
    const MIN_EXP: i32 = -(Self::BIAS - 1);
    const BIAS: i32;
    /// 2^e, for e in the normal range.
    fn pow2(e: i32) -> Self {
        Self::from_bits(((e + Self::BIAS) as u64) << Self::MAN)
    }
    fn abs(self) -> Self {
        Self::from_bits(self.bits() & !Self::SIGN)
    }
    fn negate(self) -> Self {
        Self::from_bits(self.bits() ^ Self::SIGN)
    }
    fn is_nan_(self) -> bool {
        let b = self.bits();
        b & Self::EXP_MASK == Self::EXP_MASK && b & ((1 << Self::MAN) - 1) != 0
    }
    fn is_snan(self) -> bool {
        self.is_nan_() && self.bits() & Self::QUIET == 0
    }
    fn quiet(self) -> Self {
        Self::from_bits(self.bits() | Self::QUIET)
    }
    fn is_denormal(self) -> bool {
        let b = self.bits();
        b & Self::EXP_MASK == 0 && b & ((1 << Self::MAN) - 1) != 0
    }
    fn is_inf(self) -> bool {
        self.bits() & !Self::SIGN == Self::EXP_MASK
    }
    fn is_zero(self) -> bool {
        self.bits() & !Self::SIGN == 0
    }
    fn neg(self) -> bool {
        self.bits() & Self::SIGN != 0
    }
    fn indefinite() -> Self {
        Self::from_bits(Self::INDEFINITE)
    }
    /// The next representable value towards +∞ (`up`) or −∞.
    fn step(self, up: bool) -> Self {
        let b = self.bits();
        if self.is_zero() {
            return Self::from_bits(if up { 1 } else { Self::SIGN | 1 });
        }
        // Moving away from zero increments the magnitude.
        if up != self.neg() {
            Self::from_bits(b + 1)
        } else {
            Self::from_bits(b - 1)
        }
    }
    /// The largest finite value with the given sign.
    fn max_finite(neg: bool) -> Self {
        Self::from_bits((Self::EXP_MASK - 1) | if neg { Self::SIGN } else { 0 })
    }
}

macro_rules! fp_impl {
    ($t:ty, $u:ty, $bytes:expr, $man:expr, $exp:expr, $bias:expr) => {
        impl Fp for $t {
            const BYTES: usize = $bytes;
            const BIAS: i32 = $bias;
            const MAN: u32 = $man;
            const EXP_MASK: u64 = $exp;
            const QUIET: u64 = 1 << ($man - 1);
            const SIGN: u64 = 1 << ($bytes * 8 - 1);
            const INDEFINITE: u64 = (1 << ($bytes * 8 - 1)) | $exp | (1 << ($man - 1));
            fn bits(self) -> u64 {
                u64::from(self.to_bits())
            }
            fn from_bits(b: u64) -> Self {
                <$t>::from_bits(b as $u)
            }
            fn add(self, o: Self) -> Self {
                self + o
            }
            fn sub(self, o: Self) -> Self {
                self - o
            }
            fn mul(self, o: Self) -> Self {
                self * o
            }
            fn div(self, o: Self) -> Self {
                self / o
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn fma(self, a: Self, b: Self) -> Self {
                self.mul_add(a, b)
            }
            fn zero() -> Self {
                0.0
            }
            fn to_f64(self) -> f64 {
                f64::from(self)
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
        }
    };
}

fp_impl!(f32, u32, 4, 23, 0x7f80_0000, 127);
fp_impl!(f64, u64, 8, 52, 0x7ff0_0000_0000_0000, 1023);

/// MXCSR state relevant to one computation.
#[derive(Clone, Copy)]
pub(super) struct Env {
    /// Rounding control: 0 nearest, 1 down, 2 up, 3 toward zero.
    pub rc: u32,
    pub daz: bool,
    pub ftz: bool,
    /// Underflow masked (FTZ applies only then).
    pub um: bool,
}

impl Env {
    pub fn from_mxcsr(m: u32) -> Env {
        Env {
            rc: (m >> 13) & 3,
            daz: m & mx::DAZ != 0,
            ftz: m & mx::FTZ != 0,
            um: m & (mx::UE << 7) != 0,
        }
    }

    /// A source operand of a conversion to integer: DAZ applies, DE is never reported.
    pub fn int_input<F: Fp>(&self, x: F) -> F {
        if x.is_denormal() && self.daz {
            return F::from_bits(x.bits() & F::SIGN);
        }
        x
    }

    pub fn input<F: Fp>(&self, x: F, fl: &mut u32) -> F {
        if x.is_denormal() {
            if self.daz {
                return F::from_bits(x.bits() & F::SIGN);
            }
            *fl |= mx::DE;
        }
        x
    }
}

/// Applies the rounding mode to `r`, the round-to-nearest result whose exact value is
/// `r + err` (only the sign of `err` matters), and sets PE/OE/UE.
///
/// `beyond` says whether |err| exceeds a quarter of the smallest normal's ulp (2^(emin-p-1)):
/// x86 detects tininess after rounding with an unbounded exponent, which for a result that
/// rounded to ±MIN_NORMAL depends on it.
fn round_result<F: Fp>(
    mut r: F,
    err: F,
    beyond: bool,
    overflowed: bool,
    env: &Env,
    fl: &mut u32,
) -> F {
    let err_pos = err > F::zero();
    let err_neg = err < F::zero();
    if overflowed {
        *fl |= mx::OE | mx::PE;
        let neg = r.neg();
        let toward_inf = match env.rc {
            0 => true,
            1 => neg,
            2 => !neg,
            _ => false,
        };
        return if toward_inf { r } else { F::max_finite(neg) };
    }
    if !err_pos && !err_neg {
        // Exact, but a denormal result is still flushed under FTZ (with UE masked).
        if r.is_denormal() && env.ftz && env.um {
            *fl |= mx::UE | mx::PE;
            return F::from_bits(r.bits() & F::SIGN);
        }
        return r;
    }
    *fl |= mx::PE;
    // Tiny: the exact value rounded to full precision with an unbounded exponent is below
    // the smallest normal.
    let min_normal = F::pow2(F::MIN_EXP);
    let below = r.abs() == min_normal && (if r.neg() { err_pos } else { err_neg });
    let tiny = r.is_denormal()
        || r.is_zero()
        || (below
            && match env.rc {
                0 => beyond,
                1 => !r.neg(),
                2 => r.neg(),
                _ => true,
            });
    match env.rc {
        1 if err_neg => r = r.step(false),
        2 if err_pos => r = r.step(true),
        3 if (err_neg && !r.neg() && !r.is_zero()) || (err_pos && r.neg()) => {
            r = r.step(err_pos);
        }
        _ => {}
    }
    if r.is_inf() {
        // Directed rounding stepped past the largest finite value.
        *fl |= mx::OE;
        return r;
    }
    // Tiny and inexact: underflow.
    if tiny {
        *fl |= mx::UE;
        if env.ftz && env.um {
            return F::from_bits(r.bits() & F::SIGN);
        }
    }
    r
}

/// One lane of an arithmetic operation `a op b` (`b` alone for the unary ones).
pub(super) fn arith<F: Fp>(op: Op, a: F, b: F, env: &Env, fl: &mut u32) -> F {
    let unary = matches!(op, Op::Sqrt | Op::Rcp | Op::Rsqrt);
    if matches!(op, Op::Min | Op::Max) {
        if a.is_nan_() || b.is_nan_() {
            *fl |= mx::IE;
            let mut ignore = 0;
            return env.input(b, &mut ignore);
        }
        let (x, y) = (env.input(a, fl), env.input(b, fl));
        // With DAZ the flushed operand is what gets returned.
        let pick_a = if op == Op::Min { x < y } else { x > y };
        return if pick_a { x } else { y };
    }
    if unary {
        if b.is_nan_() {
            if b.is_snan() {
                *fl |= mx::IE;
            }
            return b.quiet();
        }
    } else if a.is_nan_() || b.is_nan_() {
        if a.is_snan() || b.is_snan() {
            *fl |= mx::IE;
        }
        return if a.is_nan_() { a.quiet() } else { b.quiet() };
    }
    let mut dfl = 0;
    let a = if unary { a } else { env.input(a, &mut dfl) };
    let b = if matches!(op, Op::Rcp | Op::Rsqrt) {
        b
    } else {
        env.input(b, &mut dfl)
    };
    let r = match op {
        Op::Add => a.add(b),
        Op::Sub => a.sub(b),
        Op::Mul => a.mul(b),
        Op::Div => a.div(b),
        Op::Sqrt => b.sqrt(),
        Op::Rcp => {
            // Approximations: no exceptions, denormal inputs act as zero.
            let b = if b.is_denormal() {
                F::from_bits(b.bits() & F::SIGN)
            } else {
                b
            };
            let r = F::from_f64(1.0).div(b);
            return if r.is_denormal() {
                F::from_bits(r.bits() & F::SIGN)
            } else {
                r
            };
        }
        Op::Rsqrt => {
            let b = if b.is_denormal() {
                F::from_bits(b.bits() & F::SIGN)
            } else {
                b
            };
            if b.neg() && !b.is_zero() {
                return F::indefinite();
            }
            return F::from_f64(1.0 / b.to_f64().sqrt());
        }
        Op::Min | Op::Max => unreachable!(),
    };
    if r.is_nan_() {
        *fl |= mx::IE;
        return F::indefinite();
    }
    if op == Op::Div && b.is_zero() && !a.is_inf() {
        *fl |= mx::ZE;
        return r;
    }
    *fl |= dfl;
    if r.is_inf() {
        if !b.is_inf() && (unary || !a.is_inf()) {
            return round_result(r, F::zero(), false, true, env, fl);
        }
        return r;
    }
    // The exact result is r + err; err's sign drives directed rounding and PE.
    let quarter = F::pow2(F::MIN_EXP + F::MAN as i32);
    let (err, beyond) = match op {
        Op::Add | Op::Sub => {
            let b = if op == Op::Sub {
                F::from_bits(b.bits() ^ F::SIGN)
            } else {
                b
            };
            let bb = r.sub(a);
            (a.sub(r.sub(bb)).add(b.sub(bb)), true)
        }
        // The fused residuals are exact unless they underflow, so tiny results (and square
        // roots of tiny inputs) are checked in a range scaled up by a power of two.
        // A zero quotient or product of non-zero finite operands underflowed completely: the
        // exact value has the result's sign.
        Op::Mul | Op::Div if r.is_zero() && !a.is_zero() && !b.is_zero() && !b.is_inf() => {
            (F::from_bits(F::pow2(0).bits() | (r.bits() & F::SIGN)), true)
        }
        Op::Mul => {
            let (mut x, mut y, mut rs) = (a, b, r);
            let scaled = r.abs() < F::pow2(F::MIN_EXP + F::MAN as i32 + 1);
            if scaled {
                let k = F::pow2(2 * (F::MAN as i32 + 1));
                if a.abs() <= b.abs() {
                    x = a.mul(k);
                } else {
                    y = b.mul(k);
                }
                rs = r.mul(k);
            }
            let e = x.fma(y, rs.negate());
            (e, !scaled || e.abs() > quarter)
        }
        Op::Div => {
            // a - r*b, with the sign of b folded in.
            let (mut x, mut rs) = (a, r);
            let lim = F::pow2(F::MIN_EXP + F::MAN as i32 + 1);
            let scaled = r.abs() < lim || a.abs() < lim;
            if scaled {
                let k = F::pow2(2 * (F::MAN as i32 + 1));
                x = a.mul(k);
                rs = r.mul(k);
            }
            let rem = rs.negate().fma(b, x);
            let beyond = !scaled || rem.abs() > quarter.mul(b.abs());
            (if b.neg() { rem.negate() } else { rem }, beyond)
        }
        _ => {
            let (mut x, mut rs) = (b, r);
            if b.abs() < F::pow2(F::MIN_EXP + F::MAN as i32 + 1) {
                let k = F::MAN as i32 + 1;
                x = b.mul(F::pow2(2 * k));
                rs = r.mul(F::pow2(k));
            }
            (rs.negate().fma(rs, x), true)
        }
    };
    let err = if err.is_nan_() { F::zero() } else { err };
    // An exact zero sum of opposite-signed operands is -0 when rounding down.
    if matches!(op, Op::Add | Op::Sub) && r.is_zero() && env.rc == 1 {
        let b_neg = b.neg() != (op == Op::Sub);
        if a.neg() != b_neg {
            return F::from_bits(F::SIGN);
        }
    }
    round_result(r, err, beyond, false, env, fl)
}

/// Compare predicate 0..7 (EQ, LT, LE, UNORD, NEQ, NLT, NLE, ORD).
pub(super) fn compare<F: Fp>(pred: u8, a: F, b: F, env: &Env, fl: &mut u32) -> bool {
    let unord = a.is_nan_() || b.is_nan_();
    let signaling = matches!(pred & 7, 1 | 2 | 5 | 6);
    if (unord && signaling) || a.is_snan() || b.is_snan() {
        *fl |= mx::IE;
    }
    let mut dfl = 0;
    let (a, b) = (env.input(a, &mut dfl), env.input(b, &mut dfl));
    if *fl & mx::IE == 0 {
        *fl |= dfl;
    }
    match pred & 7 {
        0 => a == b,
        1 => a < b,
        2 => a <= b,
        3 => unord,
        4 => a != b,
        5 => !matches!(a.partial_cmp(&b), Some(Ordering::Less)),
        6 => !matches!(a.partial_cmp(&b), Some(Ordering::Less | Ordering::Equal)),
        _ => !unord,
    }
}

/// Rounds `x` to an integer of `bits` (32 or 64) per `rc` (or truncating): `None` (the integer
/// indefinite) for NaN or out of range.
pub(super) fn to_int(x: f64, bits: u32, rc: u32, fl: &mut u32) -> u64 {
    let r = match rc {
        0 => x.round_ties_even(),
        1 => x.floor(),
        2 => x.ceil(),
        _ => x.trunc(),
    };
    let lim = if bits == 32 {
        2147483648.0
    } else {
        9223372036854775808.0
    };
    if x.is_nan() || r >= lim || r < -lim {
        *fl |= mx::IE;
        return if bits == 32 { 0x8000_0000 } else { 1 << 63 };
    }
    if r != x {
        *fl |= mx::PE;
    }
    let v = r as i64 as u64;
    if bits == 32 {
        v & 0xffff_ffff
    } else {
        v
    }
}

/// Converts a signed integer to `F` with the MXCSR rounding.
fn from_int<F: Fp>(v: i64, env: &Env, fl: &mut u32) -> F {
    let r = F::from_f64(v as f64);
    // `v as f64` may already have rounded (|v| > 2^53): redo it exactly through i128.
    let near: F = if F::BYTES == 4 {
        F::from_bits(u64::from((v as f32).to_bits()))
    } else {
        r
    };
    let back = near.to_f64() as i128;
    let diff = i128::from(v) - back;
    let err = if diff > 0 {
        F::from_f64(1.0)
    } else if diff < 0 {
        F::from_f64(-1.0)
    } else {
        F::zero()
    };
    round_result(near, err, true, false, env, fl)
}

/// Converts between the formats (f32 → f64 exactly, f64 → f32 rounded).
fn convert<S: Fp, D: Fp>(x: S, env: &Env, fl: &mut u32) -> D {
    if x.is_nan_() {
        if x.is_snan() {
            *fl |= mx::IE;
        }
        let sign = if x.neg() { D::SIGN } else { 0 };
        let payload = x.bits() & ((1u64 << S::MAN) - 1);
        let payload = if D::MAN > S::MAN {
            payload << (D::MAN - S::MAN)
        } else {
            payload >> (S::MAN - D::MAN)
        };
        return D::from_bits(sign | D::EXP_MASK | D::QUIET | payload);
    }
    let x = env.input(x, fl);
    let wide = x.to_f64();
    let r = D::from_f64(wide);
    if D::BYTES >= S::BYTES {
        return r;
    }
    if r.is_inf() && !x.is_inf() {
        return round_result(r, D::zero(), false, true, env, fl);
    }
    let back = r.to_f64();
    let err = if wide > back {
        D::from_f64(1.0)
    } else if wide < back {
        D::from_f64(-1.0)
    } else {
        D::zero()
    };
    let beyond = (wide - back).abs()
        > f64::from_bits(((D::MIN_EXP - D::MAN as i32 - 2 + 1023) as u64) << 52);
    round_result(r, err, beyond, false, env, fl)
}

pub(super) fn execute(cpu: &mut Cpu, insn: &Instruction) -> Option<Exec> {
    Some(exec(cpu, insn))
}

fn exec(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let m = insn.mnemonic();
    let env = Env::from_mxcsr(cpu.s.fpu.mxcsr);
    let mut fl = 0u32;
    if let Some((op, double, scalar)) = op_of(m) {
        let dst = insn.op0_register();
        let a = cpu.vreg(dst);
        let b = cpu.vread(insn, 1)?;
        let r = if double {
            lanes::<f64>(&a, &b, scalar, |x, y| arith(op, x, y, &env, &mut fl))
        } else {
            lanes::<f32>(&a, &b, scalar, |x, y| arith(op, x, y, &env, &mut fl))
        };
        cpu.mxcsr_raise(fl)?;
        cpu.set_vreg(dst, r);
        return Ok(());
    }
    match m {
        M::Cmpss | M::Cmpsd | M::Cmpps | M::Cmppd => {
            let dst = insn.op0_register();
            let a = cpu.vreg(dst);
            let b = cpu.vread(insn, 1)?;
            let pred = insn.immediate8();
            let scalar = matches!(m, M::Cmpss | M::Cmpsd);
            let r = if matches!(m, M::Cmpsd | M::Cmppd) {
                lanes::<f64>(&a, &b, scalar, |x, y| {
                    f64::from_bits(if compare(pred, x, y, &env, &mut fl) {
                        u64::MAX
                    } else {
                        0
                    })
                })
            } else {
                lanes::<f32>(&a, &b, scalar, |x, y| {
                    f32::from_bits(if compare(pred, x, y, &env, &mut fl) {
                        u32::MAX
                    } else {
                        0
                    })
                })
            };
            cpu.mxcsr_raise(fl)?;
            cpu.set_vreg(dst, r);
        }
        M::Comiss | M::Comisd | M::Ucomiss | M::Ucomisd => {
            let a = cpu.vreg(insn.op0_register());
            let b = cpu.vread(insn, 1)?;
            let signaling = matches!(m, M::Comiss | M::Comisd);
            // EQ with a signalling variant: LT (pred 1) signals on QNaN, EQ (0) only on SNaN.
            let (unord, lt, eq) = if matches!(m, M::Comisd | M::Ucomisd) {
                let (x, y) = (f64::get(&a, 0), f64::get(&b, 0));
                compare(if signaling { 1 } else { 0 }, x, y, &env, &mut fl);
                (
                    x.is_nan() || y.is_nan(),
                    env_lt(x, y, &env),
                    env_eq(x, y, &env),
                )
            } else {
                let (x, y) = (f32::get(&a, 0), f32::get(&b, 0));
                compare(if signaling { 1 } else { 0 }, x, y, &env, &mut fl);
                (
                    x.is_nan() || y.is_nan(),
                    env_lt(x, y, &env),
                    env_eq(x, y, &env),
                )
            };
            cpu.mxcsr_raise(fl)?;
            let mut f = cpu.s.rflags & !(CF | PF | ZF | OF | SF | AF);
            if unord {
                f |= ZF | PF | CF;
            } else if lt {
                f |= CF;
            } else if eq {
                f |= ZF;
            }
            cpu.s.rflags = f;
        }
        M::Cvtsi2ss | M::Cvtsi2sd => {
            let size = cpu.op_size(insn, 1);
            let raw = cpu.read_op(insn, 1)?;
            let v = if size == 8 {
                raw as i64
            } else {
                i64::from(raw as u32 as i32)
            };
            let dst = insn.op0_register();
            let mut d = cpu.vreg(dst);
            if m == M::Cvtsi2ss {
                from_int::<f32>(v, &env, &mut fl).put(&mut d, 0);
            } else {
                from_int::<f64>(v, &env, &mut fl).put(&mut d, 0);
            }
            cpu.mxcsr_raise(fl)?;
            cpu.set_vreg(dst, d);
        }
        M::Cvtss2si | M::Cvtsd2si | M::Cvttss2si | M::Cvttsd2si => {
            let s = cpu.vread(insn, 1)?;
            let dst = insn.op0_register();
            let bits = if dst.size() == 8 { 64 } else { 32 };
            let rc = if matches!(m, M::Cvttss2si | M::Cvttsd2si) {
                3
            } else {
                env.rc
            };
            let x = if matches!(m, M::Cvtss2si | M::Cvttss2si) {
                env.int_input(f32::get(&s, 0)).to_f64()
            } else {
                env.int_input(f64::get(&s, 0))
            };
            let v = to_int(x, bits, rc, &mut fl);
            cpu.mxcsr_raise(fl)?;
            cpu.set_reg(dst, v);
        }
        M::Cvtss2sd | M::Cvtsd2ss => {
            let dst = insn.op0_register();
            let mut d = cpu.vreg(dst);
            let s = cpu.vread(insn, 1)?;
            if m == M::Cvtss2sd {
                convert::<f32, f64>(f32::get(&s, 0), &env, &mut fl).put(&mut d, 0);
            } else {
                convert::<f64, f32>(f64::get(&s, 0), &env, &mut fl).put(&mut d, 0);
            }
            cpu.mxcsr_raise(fl)?;
            cpu.set_vreg(dst, d);
        }
        _ => return packed_convert(cpu, insn, &env),
    }
    Ok(())
}

fn env_lt<F: Fp>(a: F, b: F, env: &Env) -> bool {
    let mut x = 0;
    env.input(a, &mut x) < env.input(b, &mut x)
}

fn env_eq<F: Fp>(a: F, b: F, env: &Env) -> bool {
    let mut x = 0;
    env.input(a, &mut x) == env.input(b, &mut x)
}

/// Applies `f` to lane 0 (scalar: the other lanes keep `a`'s) or every lane.
fn lanes<F: Fp>(a: &V, b: &V, scalar: bool, mut f: impl FnMut(F, F) -> F) -> V {
    let mut r = *a;
    let n = if scalar { 1 } else { 16 / F::BYTES };
    for i in 0..n {
        f(F::get(a, i), F::get(b, i)).put(&mut r, i);
    }
    r
}

/// The packed conversions, including the MMX forms (CVTPI2PS & co.).
fn packed_convert(cpu: &mut Cpu, insn: &Instruction, env: &Env) -> Exec {
    let m = insn.mnemonic();
    let mut fl = 0u32;
    let dst = insn.op0_register();
    let s = cpu.vread(insn, 1)?;
    let i32_at = |i: usize| i32::from_le_bytes(s[4 * i..4 * i + 4].try_into().unwrap());
    let mut r: V = [0; 16];
    let trunc = matches!(m, M::Cvttps2dq | M::Cvttpd2dq | M::Cvttps2pi | M::Cvttpd2pi);
    let rc = if trunc { 3 } else { env.rc };
    match m {
        M::Cvtdq2ps => {
            for i in 0..4 {
                from_int::<f32>(i64::from(i32_at(i)), env, &mut fl).put(&mut r, i);
            }
        }
        M::Cvtpi2ps => {
            // The upper two lanes of the destination are kept.
            r = cpu.vreg(dst);
            for i in 0..2 {
                from_int::<f32>(i64::from(i32_at(i)), env, &mut fl).put(&mut r, i);
            }
        }
        M::Cvtdq2pd | M::Cvtpi2pd => {
            for i in 0..2 {
                (f64::from(i32_at(i))).put(&mut r, i);
            }
        }
        M::Cvtps2dq | M::Cvttps2dq | M::Cvtps2pi | M::Cvttps2pi => {
            let n = if matches!(m, M::Cvtps2dq | M::Cvttps2dq) {
                4
            } else {
                2
            };
            for i in 0..n {
                let x = env.int_input(f32::get(&s, i)).to_f64();
                let v = to_int(x, 32, rc, &mut fl) as u32;
                r[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        M::Cvtpd2dq | M::Cvttpd2dq | M::Cvtpd2pi | M::Cvttpd2pi => {
            for i in 0..2 {
                let x = env.int_input(f64::get(&s, i));
                let v = to_int(x, 32, rc, &mut fl) as u32;
                r[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        M::Cvtps2pd => {
            for i in 0..2 {
                convert::<f32, f64>(f32::get(&s, i), env, &mut fl).put(&mut r, i);
            }
        }
        M::Cvtpd2ps => {
            for i in 0..2 {
                convert::<f64, f32>(f64::get(&s, i), env, &mut fl).put(&mut r, i);
            }
        }
        _ => return Err(cpu.unimplemented(insn)),
    }
    cpu.mxcsr_raise(fl)?;
    cpu.set_vreg(dst, r);
    Ok(())
}
