//! Packed integer (MMX and SSE2) and bitwise instructions: arithmetic, compares, shifts,
//! shuffles, unpacks, packs, and the PS/PD logical and shuffle forms.
//!
//! Everything works on 16-byte values; MMX forms use the low 8 bytes (`w` = 8), which only
//! matters for the instructions that move data between lanes.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use super::super::{Cpu, Exec};
use super::{from64, hi64, lo64, V};

pub(super) fn handles(m: M) -> bool {
    matches!(
        m,
        M::Pxor
            | M::Por
            | M::Pand
            | M::Pandn
            | M::Andps
            | M::Andpd
            | M::Andnps
            | M::Andnpd
            | M::Orps
            | M::Orpd
            | M::Xorps
            | M::Xorpd
            | M::Paddb
            | M::Paddw
            | M::Paddd
            | M::Paddq
            | M::Psubb
            | M::Psubw
            | M::Psubd
            | M::Psubq
            | M::Paddusb
            | M::Paddusw
            | M::Psubusb
            | M::Psubusw
            | M::Paddsb
            | M::Paddsw
            | M::Psubsb
            | M::Psubsw
            | M::Pcmpeqb
            | M::Pcmpeqw
            | M::Pcmpeqd
            | M::Pcmpgtb
            | M::Pcmpgtw
            | M::Pcmpgtd
            | M::Pminub
            | M::Pmaxub
            | M::Pminsw
            | M::Pmaxsw
            | M::Pavgb
            | M::Pavgw
            | M::Psadbw
            | M::Pmullw
            | M::Pmulhw
            | M::Pmulhuw
            | M::Pmuludq
            | M::Pmaddwd
            | M::Psllw
            | M::Pslld
            | M::Psllq
            | M::Psrlw
            | M::Psrld
            | M::Psrlq
            | M::Psraw
            | M::Psrad
            | M::Pslldq
            | M::Psrldq
            | M::Pshufd
            | M::Pshuflw
            | M::Pshufhw
            | M::Pshufw
            | M::Punpcklbw
            | M::Punpcklwd
            | M::Punpckldq
            | M::Punpcklqdq
            | M::Punpckhbw
            | M::Punpckhwd
            | M::Punpckhdq
            | M::Punpckhqdq
            | M::Unpcklps
            | M::Unpckhps
            | M::Unpcklpd
            | M::Unpckhpd
            | M::Packsswb
            | M::Packssdw
            | M::Packuswb
            | M::Shufps
            | M::Shufpd
    )
}

macro_rules! lanes {
    ($get:ident, $put:ident, $t:ty, $n:expr) => {
        pub(super) fn $get(v: &V) -> [$t; $n] {
            const S: usize = std::mem::size_of::<$t>();
            let mut o = [0 as $t; $n];
            for (i, x) in o.iter_mut().enumerate() {
                *x = <$t>::from_le_bytes(v[i * S..(i + 1) * S].try_into().unwrap());
            }
            o
        }
        pub(super) fn $put(a: [$t; $n]) -> V {
            const S: usize = std::mem::size_of::<$t>();
            let mut v = [0u8; 16];
            for (i, x) in a.iter().enumerate() {
                v[i * S..(i + 1) * S].copy_from_slice(&x.to_le_bytes());
            }
            v
        }
    };
}

lanes!(w16, p16, u16, 8);
lanes!(w32, p32, u32, 4);
lanes!(w64, p64, u64, 2);

fn map8(a: &V, b: &V, f: impl Fn(u8, u8) -> u8) -> V {
    std::array::from_fn(|i| f(a[i], b[i]))
}

fn map16(a: &V, b: &V, f: impl Fn(u16, u16) -> u16) -> V {
    let (x, y) = (w16(a), w16(b));
    p16(std::array::from_fn(|i| f(x[i], y[i])))
}

fn map32(a: &V, b: &V, f: impl Fn(u32, u32) -> u32) -> V {
    let (x, y) = (w32(a), w32(b));
    p32(std::array::from_fn(|i| f(x[i], y[i])))
}

fn map64(a: &V, b: &V, f: impl Fn(u64, u64) -> u64) -> V {
    let (x, y) = (w64(a), w64(b));
    p64(std::array::from_fn(|i| f(x[i], y[i])))
}

fn mask_if(c: bool) -> u64 {
    if c {
        u64::MAX
    } else {
        0
    }
}

/// Interleaves the low (or high) halves of the `w`-byte values `a` and `b` in `e`-byte
/// elements: a0 b0 a1 b1 …
fn unpack(a: &V, b: &V, e: usize, w: usize, high: bool) -> V {
    let half = w / 2;
    let base = if high { half } else { 0 };
    let mut o = [0u8; 16];
    for k in 0..half / e {
        let src = base + k * e;
        o[2 * k * e..2 * k * e + e].copy_from_slice(&a[src..src + e]);
        o[2 * k * e + e..2 * k * e + 2 * e].copy_from_slice(&b[src..src + e]);
    }
    o
}

/// Packs the `w`-byte values `a` then `b` of signed `2e`-byte elements to `e`-byte ones
/// with signed (or unsigned) saturation.
fn pack(a: &V, b: &V, e: usize, w: usize, unsigned: bool) -> V {
    let n = w / (2 * e);
    let mut o = [0u8; 16];
    for (half, src) in [a, b].iter().enumerate() {
        for k in 0..n {
            let out = (half * n + k) * e;
            if e == 1 {
                let x = i16::from_le_bytes([src[2 * k], src[2 * k + 1]]);
                o[out] = if unsigned {
                    x.clamp(0, 255) as u8
                } else {
                    x.clamp(-128, 127) as i8 as u8
                };
            } else {
                let x = i32::from_le_bytes(src[4 * k..4 * k + 4].try_into().unwrap());
                let y = x.clamp(-32768, 32767) as i16;
                o[out..out + 2].copy_from_slice(&y.to_le_bytes());
            }
        }
    }
    o
}

/// A shift of each `bits`-wide lane by `count` (logical left/right or arithmetic right).
fn shift(a: &V, bits: u32, count: u64, kind: u8) -> V {
    let big = count >= u64::from(bits);
    let c = count as u32;
    match (bits, kind) {
        (16, 0) => map16(a, a, |x, _| if big { 0 } else { x << c }),
        (16, 1) => map16(a, a, |x, _| if big { 0 } else { x >> c }),
        (16, _) => map16(a, a, |x, _| ((x as i16) >> c.min(15)) as u16),
        (32, 0) => map32(a, a, |x, _| if big { 0 } else { x << c }),
        (32, 1) => map32(a, a, |x, _| if big { 0 } else { x >> c }),
        (32, _) => map32(a, a, |x, _| ((x as i32) >> c.min(31)) as u32),
        (_, 0) => map64(a, a, |x, _| if big { 0 } else { x << c }),
        _ => map64(a, a, |x, _| if big { 0 } else { x >> c }),
    }
}

pub(super) fn execute(cpu: &mut Cpu, insn: &Instruction) -> Option<Exec> {
    Some(exec(cpu, insn))
}

fn exec(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let m = insn.mnemonic();
    let dst = insn.op0_register();
    let w = if dst.is_mm() { 8 } else { 16 };
    // Shuffles with an immediate read only their source.
    if matches!(m, M::Pshufd | M::Pshuflw | M::Pshufhw | M::Pshufw) {
        let s = cpu.vread(insn, 1)?;
        let imm = usize::from(insn.immediate8());
        let sel = |i: usize| (imm >> (2 * i)) & 3;
        let r = match m {
            M::Pshufd => {
                let x = w32(&s);
                p32(std::array::from_fn(|i| x[sel(i)]))
            }
            M::Pshufw => {
                let x = w16(&s);
                p16(std::array::from_fn(|i| if i < 4 { x[sel(i)] } else { 0 }))
            }
            M::Pshuflw => {
                let x = w16(&s);
                p16(std::array::from_fn(
                    |i| if i < 4 { x[sel(i)] } else { x[i] },
                ))
            }
            _ => {
                let x = w16(&s);
                p16(std::array::from_fn(|i| {
                    if i < 4 {
                        x[i]
                    } else {
                        x[4 + sel(i - 4)]
                    }
                }))
            }
        };
        cpu.set_vreg(dst, r);
        return Ok(());
    }
    let a = cpu.vreg(dst);
    // Shift counts: an immediate, or the low 64 bits of the source operand.
    if matches!(
        m,
        M::Psllw
            | M::Pslld
            | M::Psllq
            | M::Psrlw
            | M::Psrld
            | M::Psrlq
            | M::Psraw
            | M::Psrad
            | M::Pslldq
            | M::Psrldq
    ) {
        let count = if insn.op1_kind() == OpKind::Register || insn.op1_kind() == OpKind::Memory {
            lo64(&cpu.vread(insn, 1)?)
        } else {
            u64::from(insn.immediate8())
        };
        let r = match m {
            M::Psllw => shift(&a, 16, count, 0),
            M::Pslld => shift(&a, 32, count, 0),
            M::Psllq => shift(&a, 64, count, 0),
            M::Psrlw => shift(&a, 16, count, 1),
            M::Psrld => shift(&a, 32, count, 1),
            M::Psrlq => shift(&a, 64, count, 1),
            M::Psraw => shift(&a, 16, count, 2),
            M::Psrad => shift(&a, 32, count, 2),
            M::Pslldq => {
                let x = u128::from_le_bytes(a);
                (if count > 15 { 0 } else { x << (count * 8) }).to_le_bytes()
            }
            _ => {
                let x = u128::from_le_bytes(a);
                (if count > 15 { 0 } else { x >> (count * 8) }).to_le_bytes()
            }
        };
        cpu.set_vreg(dst, r);
        return Ok(());
    }
    let b = cpu.vread(insn, 1)?;
    let r = match m {
        M::Pxor | M::Xorps | M::Xorpd => map64(&a, &b, |x, y| x ^ y),
        M::Por | M::Orps | M::Orpd => map64(&a, &b, |x, y| x | y),
        M::Pand | M::Andps | M::Andpd => map64(&a, &b, |x, y| x & y),
        M::Pandn | M::Andnps | M::Andnpd => map64(&a, &b, |x, y| !x & y),
        M::Paddb => map8(&a, &b, u8::wrapping_add),
        M::Paddw => map16(&a, &b, u16::wrapping_add),
        M::Paddd => map32(&a, &b, u32::wrapping_add),
        M::Paddq => map64(&a, &b, u64::wrapping_add),
        M::Psubb => map8(&a, &b, u8::wrapping_sub),
        M::Psubw => map16(&a, &b, u16::wrapping_sub),
        M::Psubd => map32(&a, &b, u32::wrapping_sub),
        M::Psubq => map64(&a, &b, u64::wrapping_sub),
        M::Paddusb => map8(&a, &b, u8::saturating_add),
        M::Paddusw => map16(&a, &b, u16::saturating_add),
        M::Psubusb => map8(&a, &b, u8::saturating_sub),
        M::Psubusw => map16(&a, &b, u16::saturating_sub),
        M::Paddsb => map8(&a, &b, |x, y| (x as i8).saturating_add(y as i8) as u8),
        M::Paddsw => map16(&a, &b, |x, y| (x as i16).saturating_add(y as i16) as u16),
        M::Psubsb => map8(&a, &b, |x, y| (x as i8).saturating_sub(y as i8) as u8),
        M::Psubsw => map16(&a, &b, |x, y| (x as i16).saturating_sub(y as i16) as u16),
        M::Pcmpeqb => map8(&a, &b, |x, y| mask_if(x == y) as u8),
        M::Pcmpeqw => map16(&a, &b, |x, y| mask_if(x == y) as u16),
        M::Pcmpeqd => map32(&a, &b, |x, y| mask_if(x == y) as u32),
        M::Pcmpgtb => map8(&a, &b, |x, y| mask_if(x as i8 > y as i8) as u8),
        M::Pcmpgtw => map16(&a, &b, |x, y| mask_if(x as i16 > y as i16) as u16),
        M::Pcmpgtd => map32(&a, &b, |x, y| mask_if(x as i32 > y as i32) as u32),
        M::Pminub => map8(&a, &b, u8::min),
        M::Pmaxub => map8(&a, &b, u8::max),
        M::Pminsw => map16(&a, &b, |x, y| (x as i16).min(y as i16) as u16),
        M::Pmaxsw => map16(&a, &b, |x, y| (x as i16).max(y as i16) as u16),
        M::Pavgb => map8(&a, &b, |x, y| {
            ((u16::from(x) + u16::from(y) + 1) >> 1) as u8
        }),
        M::Pavgw => map16(&a, &b, |x, y| {
            ((u32::from(x) + u32::from(y) + 1) >> 1) as u16
        }),
        M::Psadbw => map64(&a, &b, |x, y| {
            let (x, y) = (x.to_le_bytes(), y.to_le_bytes());
            (0..8).map(|i| u64::from(x[i].abs_diff(y[i]))).sum()
        }),
        M::Pmullw => map16(&a, &b, u16::wrapping_mul),
        M::Pmulhw => map16(&a, &b, |x, y| {
            ((i32::from(x as i16) * i32::from(y as i16)) >> 16) as u16
        }),
        M::Pmulhuw => map16(&a, &b, |x, y| ((u32::from(x) * u32::from(y)) >> 16) as u16),
        M::Pmuludq => map64(&a, &b, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
        M::Pmaddwd => map32(&a, &b, |x, y| {
            let p = |s: u32| i32::from((x >> s) as u16 as i16) * i32::from((y >> s) as u16 as i16);
            p(0).wrapping_add(p(16)) as u32
        }),
        M::Punpcklbw => unpack(&a, &b, 1, w, false),
        M::Punpcklwd => unpack(&a, &b, 2, w, false),
        M::Punpckldq | M::Unpcklps => unpack(&a, &b, 4, w, false),
        M::Punpcklqdq | M::Unpcklpd => unpack(&a, &b, 8, w, false),
        M::Punpckhbw => unpack(&a, &b, 1, w, true),
        M::Punpckhwd => unpack(&a, &b, 2, w, true),
        M::Punpckhdq | M::Unpckhps => unpack(&a, &b, 4, w, true),
        M::Punpckhqdq | M::Unpckhpd => unpack(&a, &b, 8, w, true),
        M::Packsswb => pack(&a, &b, 1, w, false),
        M::Packuswb => pack(&a, &b, 1, w, true),
        M::Packssdw => pack(&a, &b, 2, w, false),
        M::Shufps => {
            let imm = usize::from(insn.immediate8());
            let (x, y) = (w32(&a), w32(&b));
            let sel = |i: usize| (imm >> (2 * i)) & 3;
            p32([x[sel(0)], x[sel(1)], y[sel(2)], y[sel(3)]])
        }
        M::Shufpd => {
            let imm = insn.immediate8();
            let lo = if imm & 1 != 0 { hi64(&a) } else { lo64(&a) };
            let hi = if imm & 2 != 0 { hi64(&b) } else { lo64(&b) };
            from64(lo, hi)
        }
        _ => return Err(cpu.unimplemented(insn)),
    };
    cpu.set_vreg(dst, r);
    Ok(())
}
