//! FXSAVE/FXRSTOR (and the REX.W FXSAVE64/FXRSTOR64 forms) in the architectural 512-byte
//! layout:
//!
//! | offset | content |
//! |---|---|
//! | 0 | FCW (2), FSW (2), abridged FTW (1), reserved (1), FOP (2) |
//! | 8 | FIP: 64 bits (REX.W), or 32 bits + FCS (2) + reserved (2) |
//! | 16 | FDP: 64 bits (REX.W), or 32 bits + FDS (2) + reserved (2) |
//! | 24 | MXCSR, MXCSR_MASK (0xffff) |
//! | 32 + 16·i | ST(i): 80 bits, 6 reserved bytes (written as zero) |
//! | 160 + 16·i | XMM i: 16 registers in 64-bit mode, 8 otherwise |
//! | 416..512 | reserved / available to software: never written |
//!
//! FCS and FDS are not tracked and are saved as zero, as on CPUs that deprecate them.

use iced_x86::{Instruction, Mnemonic as M};

use super::super::mmu::Access;
use super::super::{gp, Cpu, Exec};
use super::mx;

pub(super) fn execute(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let lin = cpu.mem_linear(insn);
    if lin & 15 != 0 {
        return Err(gp(0));
    }
    let m = insn.mnemonic();
    let wide = matches!(m, M::Fxsave64 | M::Fxrstor64);
    let nxmm = if cpu.s.bitness() == 64 { 16 } else { 8 };
    let len = 160 + 16 * nxmm;
    if matches!(m, M::Fxsave | M::Fxsave64) {
        let img = image(cpu, wide, nxmm);
        cpu.translate(lin, Access::Write)?;
        cpu.translate(lin + len as u64 - 1, Access::Write)?;
        for off in (0..len).step_by(8) {
            let v = u64::from_le_bytes(img[off..off + 8].try_into().unwrap());
            cpu.write_lin(lin + off as u64, 8, v)?;
        }
        Ok(())
    } else {
        let mut img = [0u8; 512];
        for off in (0..len).step_by(8) {
            let v = cpu.read_lin(lin + off as u64, 8, Access::Read)?;
            img[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
        restore(cpu, &img, wide, nxmm)
    }
}

/// The FXSAVE image of the current state.
pub(super) fn image(cpu: &Cpu, wide: bool, nxmm: usize) -> [u8; 512] {
    let f = &cpu.s.fpu;
    let mut img = [0u8; 512];
    img[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    img[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    img[4] = f.ftw;
    img[6..8].copy_from_slice(&(f.fop & 0x7ff).to_le_bytes());
    if wide {
        img[8..16].copy_from_slice(&f.fip.to_le_bytes());
        img[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    } else {
        img[8..12].copy_from_slice(&(f.fip as u32).to_le_bytes());
        img[16..20].copy_from_slice(&(f.fdp as u32).to_le_bytes());
    }
    img[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    img[28..32].copy_from_slice(&mx::MASK.to_le_bytes());
    for i in 0..8 {
        img[32 + 16 * i..42 + 16 * i].copy_from_slice(&f.st[i]);
    }
    for i in 0..nxmm {
        img[160 + 16 * i..176 + 16 * i].copy_from_slice(&f.xmm[i]);
    }
    img
}

/// Loads the state from an FXSAVE image: #GP(0) if MXCSR has reserved bits set.
pub(super) fn restore(cpu: &mut Cpu, img: &[u8; 512], wide: bool, nxmm: usize) -> Exec {
    let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(img[o..o + 8].try_into().unwrap());
    let mxcsr = u32_at(24);
    if mxcsr & !mx::MASK != 0 {
        return Err(gp(0));
    }
    let f = &mut cpu.s.fpu;
    f.fcw = u16_at(0);
    f.fsw = u16_at(2);
    f.ftw = img[4];
    f.fop = u16_at(6) & 0x7ff;
    if wide {
        f.fip = u64_at(8);
        f.fdp = u64_at(16);
    } else {
        f.fip = u64::from(u32_at(8));
        f.fdp = u64::from(u32_at(16));
    }
    f.mxcsr = mxcsr;
    for i in 0..8 {
        f.st[i].copy_from_slice(&img[32 + 16 * i..42 + 16 * i]);
    }
    for i in 0..nxmm {
        f.xmm[i].copy_from_slice(&img[160 + 16 * i..176 + 16 * i]);
    }
    Ok(())
}
