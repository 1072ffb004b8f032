//! Integer arithmetic and the status flags it produces.

use super::operand::{mask, sext};
use super::state::flags::{AF, CF, OF, PF, SF, STATUS, ZF};
use super::Cpu;

/// Parity flag for the low byte: set when it has an even number of ones.
#[inline(always)]
pub(crate) fn parity(v: u64) -> u64 {
    if (v as u8).count_ones().is_multiple_of(2) {
        PF
    } else {
        0
    }
}

#[inline(always)]
fn sign_bit(size: usize) -> u64 {
    1u64 << (size * 8 - 1)
}

/// ZF, SF and PF of a result.
#[inline(always)]
pub(crate) fn szp(r: u64, size: usize) -> u64 {
    let r = r & mask(size);
    let mut f = parity(r);
    if r == 0 {
        f |= ZF;
    }
    if r & sign_bit(size) != 0 {
        f |= SF;
    }
    f
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AluOp {
    Add,
    Adc,
    Sub,
    Sbb,
    And,
    Or,
    Xor,
}

impl Cpu {
    #[inline(always)]
    pub(crate) fn set_status(&mut self, f: u64) {
        self.s.rflags = (self.s.rflags & !STATUS) | f;
    }

    #[inline(always)]
    pub(crate) fn cf(&self) -> u64 {
        self.s.rflags & CF
    }

    /// `a op b` on `size` bytes; sets the status flags and returns the result (masked).
    #[inline]
    pub(crate) fn alu(&mut self, op: AluOp, a: u64, b: u64, size: usize) -> u64 {
        let m = mask(size);
        let (a, b) = (a & m, b & m);
        let sb = sign_bit(size);
        let (r, f) = match op {
            AluOp::Add | AluOp::Adc => {
                let c = if op == AluOp::Adc { self.cf() } else { 0 };
                let wide = (a as u128) + (b as u128) + (c as u128);
                let r = (wide as u64) & m;
                let mut f = szp(r, size);
                if wide > m as u128 {
                    f |= CF;
                }
                if (a ^ r) & (b ^ r) & sb != 0 {
                    f |= OF;
                }
                if (a ^ b ^ r) & 0x10 != 0 {
                    f |= AF;
                }
                (r, f)
            }
            AluOp::Sub | AluOp::Sbb => {
                let c = if op == AluOp::Sbb { self.cf() } else { 0 };
                let r = a.wrapping_sub(b).wrapping_sub(c) & m;
                let mut f = szp(r, size);
                if (a as u128) < (b as u128) + (c as u128) {
                    f |= CF;
                }
                if (a ^ b) & (a ^ r) & sb != 0 {
                    f |= OF;
                }
                if (a ^ b ^ r) & 0x10 != 0 {
                    f |= AF;
                }
                (r, f)
            }
            AluOp::And => {
                let r = a & b;
                (r, szp(r, size))
            }
            AluOp::Or => {
                let r = a | b;
                (r, szp(r, size))
            }
            AluOp::Xor => {
                let r = a ^ b;
                (r, szp(r, size))
            }
        };
        self.set_status(f);
        r
    }

    /// INC/DEC: like ADD/SUB 1 but CF is kept.
    pub(crate) fn incdec(&mut self, a: u64, size: usize, inc: bool) -> u64 {
        let cf = self.cf();
        let r = self.alu(if inc { AluOp::Add } else { AluOp::Sub }, a, 1, size);
        self.s.rflags = (self.s.rflags & !CF) | cf;
        r
    }

    /// NEG: 0 - a, CF set unless a is 0.
    pub(crate) fn neg(&mut self, a: u64, size: usize) -> u64 {
        self.alu(AluOp::Sub, 0, a, size)
    }

    /// Shifts and rotates (ROL, ROR, RCL, RCR, SHL/SAL, SHR, SAR) with x86 flag rules.
    /// `kind` is the ModRM reg field: 0 ROL, 1 ROR, 2 RCL, 3 RCR, 4 SHL, 5 SHR, 6 SAL, 7 SAR.
    #[inline(always)]
    pub(crate) fn shift(&mut self, kind: u8, a: u64, count: u64, size: usize) -> u64 {
        let bits = (size * 8) as u64;
        let count = count & if size == 8 { 0x3f } else { 0x1f };
        let m = mask(size);
        let a = a & m;
        if count == 0 {
            return a;
        }
        let sb = sign_bit(size);
        let mut f = self.s.rflags & STATUS;
        let r;
        match kind {
            0 => {
                let c = count % bits;
                r = if c == 0 {
                    a
                } else {
                    ((a << c) | (a >> (bits - c))) & m
                };
                f = (f & !(CF | OF)) | (r & 1);
                if ((r & sb != 0) as u64) ^ (r & 1) != 0 {
                    f |= OF;
                }
            }
            1 => {
                let c = count % bits;
                r = if c == 0 {
                    a
                } else {
                    ((a >> c) | (a << (bits - c))) & m
                };
                f &= !(CF | OF);
                if r & sb != 0 {
                    f |= CF;
                }
                if ((r >> (bits - 1)) ^ (r >> (bits - 2))) & 1 != 0 {
                    f |= OF;
                }
            }
            2 | 3 => {
                // Rotate through carry over bits+1 positions.
                let c = count % (bits + 1);
                let mut v = a as u128 | ((self.cf() as u128) << bits);
                let width = bits + 1;
                let wmask = (1u128 << width) - 1;
                if c != 0 {
                    v = if kind == 2 {
                        ((v << c) | (v >> (width - c))) & wmask
                    } else {
                        ((v >> c) | (v << (width - c))) & wmask
                    };
                }
                r = (v as u64) & m;
                let cf = ((v >> bits) & 1) as u64;
                f = (f & !(CF | OF)) | cf;
                let of = if kind == 2 {
                    ((r >> (bits - 1)) & 1) ^ cf
                } else {
                    ((r >> (bits - 1)) ^ (r >> (bits - 2))) & 1
                };
                if of != 0 {
                    f |= OF;
                }
            }
            4 | 6 => {
                r = if count >= bits { 0 } else { (a << count) & m };
                let cf = if count > bits {
                    0
                } else {
                    (a >> (bits - count)) & 1
                };
                f = szp(r, size) | cf;
                if ((r & sb != 0) as u64) ^ cf != 0 {
                    f |= OF;
                }
            }
            5 => {
                r = if count >= bits { 0 } else { a >> count };
                let cf = if count > bits {
                    0
                } else {
                    (a >> (count - 1)) & 1
                };
                f = szp(r, size) | cf;
                if count == 1 && a & sb != 0 {
                    f |= OF;
                }
            }
            _ => {
                let sa = sext(a, size) as i64;
                let c = count.min(63);
                r = ((sa >> c) as u64) & m;
                let cf = ((sa >> (c - 1).min(63)) & 1) as u64;
                f = szp(r, size) | cf;
            }
        }
        self.set_status(f);
        r
    }

    /// SHLD/SHRD: shift `dst` by `count`, filling from `src`.
    pub(crate) fn shift_double(
        &mut self,
        left: bool,
        dst: u64,
        src: u64,
        count: u64,
        size: usize,
    ) -> u64 {
        let bits = (size * 8) as u32;
        let count = (count & if size == 8 { 0x3f } else { 0x1f }) as u32;
        if count == 0 {
            return dst & mask(size);
        }
        let m = mask(size);
        let (d, s) = (dst & m, src & m);
        // Work in 128 bits: [d:s] for left, [s:d] for right.
        let r;
        let cf;
        if left {
            let wide = ((d as u128) << bits) | s as u128;
            let shifted = wide << count;
            r = ((shifted >> bits) as u64) & m;
            cf = ((wide >> (2 * bits - count)) & 1) as u64;
        } else {
            let wide = ((s as u128) << bits) | d as u128;
            r = ((wide >> count) as u64) & m;
            cf = ((wide >> (count - 1)) & 1) as u64;
        }
        let mut f = szp(r, size) | cf;
        if ((r ^ d) & sign_bit(size)) != 0 {
            f |= OF;
        }
        self.set_status(f);
        r
    }
}
