//! System instructions: segment and descriptor-table loads, control registers, MSRs, port
//! I/O, far transfers, IRET, SYSCALL/SYSRET, CPUID, TSC, and interrupt-flag control.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::mmu::Access;
use super::operand::{mask, seg_index};
use super::state::flags::{self, IF, IOPL, RF, VM};
use super::state::{cr0, cr4, efer, Dtr, Seg, CS, DS, ES, FS, GS, RAX, RCX, RDX, RSP, SS};
use super::{gp, ud, vector, Cpu, Exec, Fault, IoReq};
use crate::memory;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const MSR_SPEC_CTRL: u32 = 0x48;
const MSR_PRED_CMD: u32 = 0x49;
const MSR_ARCH_CAPABILITIES: u32 = 0x10a;

/// SPEC_CTRL bits a guest may set: IBRS, STIBP, SSBD (no effect on a CPU that does not
/// speculate; kept so the guest reads back what it wrote).
const SPEC_CTRL_BITS: u64 = 0b111;
/// IA32_ARCH_CAPABILITIES of the emulated CPU (see `cpuid::LEAF7_EDX`): not affected by
/// Meltdown (RDCL_NO), enhanced IBRS (IBRS_ALL), and not affected by speculative store
/// bypass, MDS, page-size-change machine checks, TAA, the MMIO stale-data family, BHI,
/// post-barrier RSB, GDS and RFDS.
const ARCH_CAPABILITIES: u64 = 1
    | 1 << 1
    | 1 << 4
    | 1 << 5
    | 1 << 6
    | 1 << 8
    | 1 << 13
    | 1 << 14
    | 1 << 15
    | 1 << 20
    | 1 << 24
    | 1 << 26
    | 1 << 27;

impl Cpu {
    /// IN: reads a port of the platform or, through an exit, of the VMM.
    pub(crate) fn port_in(&mut self, port: u16, size: usize) -> Exec<u64> {
        if let Some(v) = self.m.pio_read(port, size as u8) {
            return Ok(u64::from(v));
        }
        let req = IoReq::PioIn {
            port,
            size: size as u8,
        };
        if let Some((r, v)) = self.io.response {
            if r == req {
                self.io.response = None;
                if self.trace_insns > 0 {
                    eprintln!("emu: in {port:#x} -> {v:#x}");
                }
                return Ok(v);
            }
        }
        self.io.exit = Some(req);
        Err(Fault::NeedIo)
    }

    /// OUT: writes a port of the platform or records an exit for the VMM.
    pub(crate) fn port_out(&mut self, port: u16, size: usize, v: u64) -> Exec {
        if !self.m.pio_write(port, size as u8, v as u32) {
            self.io.exit = Some(IoReq::PioOut {
                port,
                size: size as u8,
                value: (v & mask(size)) as u32,
            });
        }
        Ok(())
    }

    /// Loads segment register `seg` with `selector` (MOV/POP to a segment register, far
    /// transfers), reading the descriptor in protected mode.
    pub(crate) fn load_segment(&mut self, seg: usize, selector: u16) -> Exec {
        if self.s.cr0 & cr0::PE == 0 || self.s.rflags & VM != 0 {
            self.s.seg[seg].selector = selector;
            self.s.seg[seg].base = u64::from(selector) << 4;
            if seg == CS {
                self.s.seg[CS].attr = (self.s.seg[CS].attr & !0x6000) | 0x9b;
            }
            return Ok(());
        }
        if selector & !3 == 0 {
            if seg == SS && !(self.s.long_mode() && self.s.bitness() == 64) || seg == CS {
                return Err(gp(0));
            }
            // A null selector: the segment is unusable (base kept 0 except FS/GS in long mode).
            self.s.seg[seg] = Seg {
                selector,
                base: 0,
                limit: 0,
                attr: if seg == SS {
                    0x4093 | ((selector & 3) << 5)
                } else {
                    0
                },
            };
            return Ok(());
        }
        let desc = self.read_descriptor(selector)?;
        let s = Seg::from_descriptor(selector, desc);
        if !s.present() {
            let v = if seg == SS { vector::SS } else { vector::NP };
            return Err(Fault::Exception {
                vector: v,
                error_code: Some(u32::from(selector & !3)),
            });
        }
        self.s.seg[seg] = s;
        Ok(())
    }

    fn set_cr0(&mut self, v: u64) -> Exec {
        let old = self.s.cr0;
        let v = v | cr0::ET;
        if v & cr0::PG != 0 && v & cr0::PE == 0 {
            return Err(gp(0));
        }
        if v & cr0::PG != 0 && old & cr0::PG == 0 && self.s.efer & efer::LME != 0 {
            if self.s.cr4 & cr4::PAE == 0 {
                return Err(gp(0));
            }
            self.s.efer |= efer::LMA;
        }
        if v & cr0::PG == 0 && old & cr0::PG != 0 {
            self.s.efer &= !efer::LMA;
        }
        self.s.cr0 = v;
        if (old ^ v) & (cr0::PG | cr0::WP | cr0::PE) != 0 {
            self.tlb_flush_all();
        }
        Ok(())
    }

    fn set_cr4(&mut self, v: u64) -> Exec {
        // Bits for features not advertised in CPUID are reserved.
        let allowed = cr4::VME
            | cr4::PSE
            | cr4::PAE
            | cr4::PGE
            | cr4::OSFXSR
            | cr4::OSXMMEXCPT
            | cr4::FSGSBASE
            | cr4::OSXSAVE
            | (1 << 3) // DE
            | (1 << 6) // MCE
            | (1 << 8) // PCE
            | cr4::UMIP;
        if v & !allowed != 0 {
            return Err(gp(0));
        }
        if self.s.long_mode() && v & cr4::PAE == 0 {
            return Err(gp(0));
        }
        let old = self.s.cr4;
        self.s.cr4 = v;
        if (old ^ v) & (cr4::PAE | cr4::PGE | cr4::PSE) != 0 {
            self.tlb_flush_all();
        }
        Ok(())
    }

    fn rdmsr(&mut self, index: u32) -> Exec<u64> {
        if let Some(v) = self.m.rdmsr(index) {
            return Ok(v);
        }
        let msr = &self.s.msr;
        Ok(match index {
            MSR_EFER => self.s.efer,
            MSR_STAR => msr.star,
            MSR_LSTAR => msr.lstar,
            MSR_CSTAR => msr.cstar,
            MSR_SFMASK => msr.sfmask,
            MSR_FS_BASE => self.s.seg[FS].base,
            MSR_GS_BASE => self.s.seg[GS].base,
            MSR_KERNEL_GS_BASE => msr.kernel_gs_base,
            MSR_TSC_AUX => msr.tsc_aux,
            MSR_SPEC_CTRL => msr.spec_ctrl,
            MSR_ARCH_CAPABILITIES => ARCH_CAPABILITIES,
            0x174 => msr.sysenter_cs,
            0x175 => msr.sysenter_esp,
            0x176 => msr.sysenter_eip,
            0x277 => msr.pat,
            0x1a0 => msr.misc_enable,
            // MTRRcap: 8 variable ranges, fixed ranges, write-combining.
            0xfe => 0x508,
            0x2ff => msr.mtrr_def_type,
            0x200..=0x20f => msr.mtrr_var[(index - 0x200) as usize],
            0x250 => msr.mtrr_fixed[0],
            0x258 | 0x259 => msr.mtrr_fixed[(index - 0x258 + 1) as usize],
            0x268..=0x26f => msr.mtrr_fixed[(index - 0x268 + 3) as usize],
            // Machine check: no banks.
            0x179 | 0x17a => 0,
            // Microcode revision.
            0x8b => 0,
            // AMD SYSCFG, HWCR, NB_CFG, TOP_MEM2: read by Linux's AMD and MTRR code; zero means
            // no memory above 4 GiB is special and nothing is locked.
            0xc001_0010 | 0xc001_0015 | 0xc001_001f | 0xc001_001d => 0,
            _ => return Err(gp(0)),
        })
    }

    fn wrmsr(&mut self, index: u32, v: u64) -> Exec {
        match self.m.wrmsr(index, v) {
            Some(true) => return Ok(()),
            Some(false) => return Err(gp(0)),
            None => {}
        }
        let canonical = |v: u64| {
            let top = (v as i64) >> 47;
            top == 0 || top == -1
        };
        match index {
            MSR_EFER => {
                let allowed = efer::SCE | efer::LME | efer::NXE | efer::LMA;
                if v & !allowed != 0 {
                    return Err(gp(0));
                }
                // LMA is read-only; LME cannot change while paging is on.
                let lma = self.s.efer & efer::LMA;
                if self.s.cr0 & cr0::PG != 0 && (v ^ self.s.efer) & efer::LME != 0 {
                    return Err(gp(0));
                }
                self.s.efer = (v & !efer::LMA) | lma;
                self.tlb_flush_all();
            }
            MSR_STAR => self.s.msr.star = v,
            MSR_LSTAR | MSR_CSTAR if !canonical(v) => return Err(gp(0)),
            MSR_LSTAR => self.s.msr.lstar = v,
            MSR_CSTAR => self.s.msr.cstar = v,
            MSR_SFMASK => self.s.msr.sfmask = v & 0xffff_ffff,
            MSR_FS_BASE | MSR_GS_BASE | MSR_KERNEL_GS_BASE if !canonical(v) => return Err(gp(0)),
            MSR_FS_BASE => self.s.seg[FS].base = v,
            MSR_GS_BASE => self.s.seg[GS].base = v,
            MSR_KERNEL_GS_BASE => self.s.msr.kernel_gs_base = v,
            MSR_TSC_AUX => self.s.msr.tsc_aux = v & 0xffff_ffff,
            MSR_SPEC_CTRL if v & !SPEC_CTRL_BITS == 0 => self.s.msr.spec_ctrl = v,
            // IBPB: no predictor to flush. (Other bits, and other values, fault below.)
            MSR_PRED_CMD if v <= 1 => {}
            0x174 => self.s.msr.sysenter_cs = v,
            0x175 => self.s.msr.sysenter_esp = v,
            0x176 => self.s.msr.sysenter_eip = v,
            0x277 => self.s.msr.pat = v,
            0x1a0 => self.s.msr.misc_enable = v,
            0x2ff => self.s.msr.mtrr_def_type = v,
            0x200..=0x20f => self.s.msr.mtrr_var[(index - 0x200) as usize] = v,
            0x250 => self.s.msr.mtrr_fixed[0] = v,
            0x258 | 0x259 => self.s.msr.mtrr_fixed[(index - 0x258 + 1) as usize] = v,
            0x268..=0x26f => self.s.msr.mtrr_fixed[(index - 0x268 + 3) as usize] = v,
            0x179 | 0x17a | 0x8b => {}
            0xc001_0010 | 0xc001_0015 | 0xc001_001f | 0xc001_001d => {}
            _ => return Err(gp(0)),
        }
        Ok(())
    }

    /// Sets an MSR from outside the guest (boot state, restore); false if it is unknown or the
    /// value is invalid.
    pub fn set_msr(&mut self, index: u32, value: u64) -> bool {
        self.wrmsr(index, value).is_ok()
    }

    fn require_cpl0(&self) -> Exec {
        if self.s.cpl() != 0 {
            Err(gp(0))
        } else {
            Ok(())
        }
    }

    fn io_allowed(&self) -> Exec {
        // No I/O permission bitmap: ports are for CPL <= IOPL only.
        let iopl = ((self.s.rflags & IOPL) >> 12) as u8;
        if self.s.cr0 & cr0::PE != 0 && self.s.cpl() > iopl {
            Err(gp(0))
        } else {
            Ok(())
        }
    }
}

/// Writes RFLAGS from POPF/IRET: only writable bits; IF and IOPL follow privilege rules.
pub(crate) fn write_flags(cpu: &mut Cpu, v: u64, size: usize) {
    let cpl = cpu.s.cpl();
    let iopl = ((cpu.s.rflags & IOPL) >> 12) as u8;
    let mut writable = flags::WRITABLE & mask(size);
    if cpl > 0 {
        writable &= !IOPL;
    }
    if cpl > iopl {
        writable &= !IF;
    }
    writable &= !RF;
    cpu.s.rflags = (cpu.s.rflags & !writable) | (v & writable) | flags::FIXED1;
}

pub(crate) fn software_interrupt(cpu: &mut Cpu, v: u8, icebp: bool) -> Exec {
    if cpu.s.long_mode() && cpu.s.bitness() != 64 && v == vector::OF {
        return Err(ud());
    }
    cpu.deliver_software(v, icebp)
}

/// MOV to or from control, debug and segment registers.
pub(crate) fn mov_special(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let dst = insn.op0_register();
    let src_kind = insn.op1_kind();
    if insn.op0_kind() == OpKind::Register && dst.is_segment_register() {
        let sel = cpu.read_op(insn, 1)? as u16;
        let seg = seg_index(dst);
        if seg == CS {
            return Err(ud());
        }
        cpu.load_segment(seg, sel)?;
        if seg == SS {
            cpu.interrupt_shadow = true;
        }
        return Ok(());
    }
    if src_kind == OpKind::Register && insn.op1_register().is_segment_register() {
        let sel = u64::from(cpu.s.seg[seg_index(insn.op1_register())].selector);
        // To a register the value is zero-extended at 32/64 bits; to memory 16 bits are written.
        return cpu.write_op(insn, 0, sel);
    }
    cpu.require_cpl0()?;
    let cr_of = |r: Register| -> Option<u8> {
        Some(match r {
            Register::CR0 => 0,
            Register::CR2 => 2,
            Register::CR3 => 3,
            Register::CR4 => 4,
            Register::CR8 => 8,
            _ => return None,
        })
    };
    let dr_of = |r: Register| -> Option<usize> {
        let n = r as usize;
        let d0 = Register::DR0 as usize;
        (d0..=d0 + 7).contains(&n).then(|| n - d0)
    };
    if let Some(n) = cr_of(dst) {
        let v = cpu.reg(insn.op1_register());
        match n {
            0 => cpu.set_cr0(v)?,
            2 => cpu.s.cr2 = v,
            3 => {
                cpu.s.cr3 = v & 0x000f_ffff_ffff_f000 | (v & 0x18);
                cpu.tlb_flush_cr3();
            }
            4 => cpu.set_cr4(v)?,
            _ => {
                // CR8 is the TPR: bits 3..0 mirror TPR[7:4] of the local APIC.
                cpu.m.mmio_write(0xfee0_0080, 4, (v & 0xf) << 4);
            }
        }
        return Ok(());
    }
    if let Some(n) = cr_of(insn.op1_register()) {
        let v = match n {
            0 => cpu.s.cr0,
            2 => cpu.s.cr2,
            3 => cpu.s.cr3,
            4 => cpu.s.cr4,
            _ => (cpu.m.mmio_read(0xfee0_0080, 4).unwrap_or(0) >> 4) & 0xf,
        };
        cpu.set_reg(dst, v);
        return Ok(());
    }
    if let Some(n) = dr_of(dst) {
        cpu.s.dr[n] = cpu.reg(insn.op1_register());
        return Ok(());
    }
    if let Some(n) = dr_of(insn.op1_register()) {
        let v = cpu.s.dr[n];
        cpu.set_reg(dst, v);
        return Ok(());
    }
    Err(cpu.unimplemented(insn))
}

pub(crate) fn pop_segment(cpu: &mut Cpu, insn: &Instruction, size: usize) -> Exec {
    let saved = cpu.s.gpr[RSP];
    let sel = cpu.pop(size)? as u16;
    let seg = seg_index(insn.op0_register());
    if let Err(e) = cpu.load_segment(seg, sel) {
        cpu.s.gpr[RSP] = saved;
        return Err(e);
    }
    if seg == SS {
        cpu.interrupt_shadow = true;
    }
    Ok(())
}

/// The selector and offset of a far pointer operand (immediate or memory).
fn far_target(cpu: &mut Cpu, insn: &Instruction) -> Exec<(u16, u64, usize)> {
    match insn.op0_kind() {
        OpKind::FarBranch16 => Ok((
            insn.far_branch_selector(),
            u64::from(insn.far_branch16()),
            2,
        )),
        OpKind::FarBranch32 => Ok((
            insn.far_branch_selector(),
            u64::from(insn.far_branch32()),
            4,
        )),
        _ => {
            let size = insn.memory_size().size() - 2;
            let lin = cpu.mem_linear(insn);
            let off = cpu.read_lin(lin, size, Access::Read)?;
            let sel = cpu.read_lin(lin.wrapping_add(size as u64), 2, Access::Read)? as u16;
            Ok((sel, off, size))
        }
    }
}

/// Loads CS for a far transfer (same privilege level only) and jumps.
fn enter_code_segment(cpu: &mut Cpu, sel: u16, off: u64, size: usize) -> Exec {
    cpu.load_segment(CS, sel)?;
    if cpu.s.cr0 & cr0::PE != 0 {
        let rpl = sel & 3;
        cpu.s.seg[CS].selector = (sel & !3) | rpl;
    }
    cpu.s.rip = off & mask(if cpu.s.bitness() == 64 { 8 } else { size });
    Ok(())
}

pub(crate) fn far_jump(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let (sel, off, size) = far_target(cpu, insn)?;
    enter_code_segment(cpu, sel, off, size)
}

pub(crate) fn far_call(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let (sel, off, size) = far_target(cpu, insn)?;
    let old_cs = u64::from(cpu.s.seg[CS].selector);
    let ret = cpu.s.rip;
    cpu.push(old_cs, size)?;
    cpu.push(ret, size)?;
    enter_code_segment(cpu, sel, off, size)
}

pub(crate) fn far_return(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let size = match insn.code() {
        iced_x86::Code::Retfq | iced_x86::Code::Retfq_imm16 => 8,
        iced_x86::Code::Retfd | iced_x86::Code::Retfd_imm16 => 4,
        _ => 2,
    };
    let off = cpu.peek_stack(0, size)?;
    let sel = cpu.peek_stack(size as u64, size)? as u16;
    let cpl = cpu.s.cpl();
    let outer = cpu.s.cr0 & cr0::PE != 0 && (sel & 3) as u8 > cpl;
    let imm = if insn.op_count() == 1 {
        u64::from(insn.immediate16())
    } else {
        0
    };
    let (new_sp, new_ss) = if outer {
        let sp = cpu.peek_stack(2 * size as u64 + imm, size)?;
        let ss = cpu.peek_stack(3 * size as u64 + imm, size)? as u16;
        (Some(sp), Some(ss))
    } else {
        (None, None)
    };
    enter_code_segment(cpu, sel, off, size)?;
    let ssz = cpu.s.stack_size() as usize;
    match (new_sp, new_ss) {
        (Some(sp), Some(ss)) => {
            cpu.load_segment(SS, ss)?;
            cpu.s.gpr[RSP] = sp.wrapping_add(imm);
        }
        _ => {
            let sp = cpu.s.gpr[RSP].wrapping_add(2 * size as u64 + imm) & mask(ssz);
            cpu.s.gpr[RSP] = (cpu.s.gpr[RSP] & !mask(ssz)) | sp;
        }
    }
    Ok(())
}

fn iret(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let size = match insn.mnemonic() {
        Mnemonic::Iretq => 8,
        Mnemonic::Iretd => 4,
        _ => 2,
    };
    if cpu.s.cr0 & cr0::PE == 0 {
        let ip = cpu.pop(size)?;
        let cs = cpu.pop(size)? as u16;
        let fl = cpu.pop(size)?;
        cpu.load_segment(CS, cs)?;
        cpu.s.rip = ip & mask(size);
        write_flags(cpu, fl, size);
        return Ok(());
    }
    let ip = cpu.peek_stack(0, size)?;
    let cs = cpu.peek_stack(size as u64, size)? as u16;
    let fl = cpu.peek_stack(2 * size as u64, size)?;
    let cpl = cpu.s.cpl();
    let to_outer = (cs & 3) as u8 > cpl;
    let long64 = cpu.s.bitness() == 64;
    let (sp, ss) = if long64 || to_outer {
        (
            Some(cpu.peek_stack(3 * size as u64, size)?),
            Some(cpu.peek_stack(4 * size as u64, size)? as u16),
        )
    } else {
        (None, None)
    };
    // Flags are written with the old CPL's rules (IOPL/IF may change only at CPL 0).
    write_flags(cpu, fl, size);
    let desc = cpu.read_descriptor(cs)?;
    let new_cs = Seg::from_descriptor(cs, desc);
    if !new_cs.present() {
        return Err(Fault::Exception {
            vector: vector::NP,
            error_code: Some(u32::from(cs & !3)),
        });
    }
    cpu.s.seg[CS] = new_cs;
    cpu.s.rip = ip
        & mask(if cpu.s.bitness() == 64 {
            8
        } else {
            size.min(4)
        });
    match (sp, ss) {
        (Some(sp), Some(ss)) => {
            if ss & !3 == 0 && long64 {
                cpu.s.seg[SS] = Seg {
                    selector: ss,
                    base: 0,
                    limit: 0xffff_ffff,
                    attr: 0x4093 | ((ss & 3) << 5),
                };
            } else {
                cpu.load_segment(SS, ss)?;
            }
            cpu.s.gpr[RSP] = sp;
        }
        _ => {
            let ssz = cpu.s.stack_size() as usize;
            let nsp = cpu.s.gpr[RSP].wrapping_add(3 * size as u64) & mask(ssz);
            cpu.s.gpr[RSP] = (cpu.s.gpr[RSP] & !mask(ssz)) | nsp;
        }
    }
    if to_outer {
        // Data segments the outer level may not use become null.
        for s in [ES, DS, FS, GS] {
            let seg = cpu.s.seg[s];
            let conforming_code = seg.typ() & 0xc == 0xc;
            if seg.dpl() < (cs & 3) as u8 && !conforming_code && seg.selector & !3 != 0 {
                cpu.s.seg[s].selector = 0;
                cpu.s.seg[s].attr = 0;
            }
        }
    }
    Ok(())
}

/// CMPXCHG8B / CMPXCHG16B.
pub(crate) fn cmpxchg_wide(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    let wide = insn.mnemonic() == Mnemonic::Cmpxchg16b;
    let lin = cpu.mem_linear(insn);
    let zf;
    if wide {
        if lin & 15 != 0 {
            return Err(gp(0));
        }
        let lo = cpu.read_lin(lin, 8, Access::Write)?;
        let hi = cpu.read_lin(lin + 8, 8, Access::Write)?;
        let (rax, rdx) = (cpu.s.gpr[RAX], cpu.s.gpr[RDX]);
        if lo == rax && hi == rdx {
            // Not atomic across vCPUs as a 16-byte unit; CX16 is not advertised, so only code
            // that probes it without checking CPUID gets here.
            cpu.write_lin(lin, 8, cpu.s.gpr[super::state::RBX])?;
            cpu.write_lin(lin + 8, 8, cpu.s.gpr[RCX])?;
            zf = true;
        } else {
            cpu.s.gpr[RAX] = lo;
            cpu.s.gpr[RDX] = hi;
            zf = false;
        }
    } else {
        let expected = (cpu.s.gpr[RAX] & 0xffff_ffff) | (cpu.s.gpr[RDX] << 32);
        let new = (cpu.s.gpr[super::state::RBX] & 0xffff_ffff) | (cpu.s.gpr[RCX] << 32);
        let old = if (lin & 0xfff) <= 0xff8 {
            match cpu.translate_host(lin, Access::Write) {
                Ok(p) => {
                    // SAFETY: mapped RAM page, 8 bytes within it.
                    let old =
                        unsafe { memory::atomic_rmw(p, 8, |old| (old == expected).then_some(new)) };
                    cpu.note_store(p, 8);
                    old
                }
                Err(e) => return Err(e),
            }
        } else {
            let old = cpu.read_lin(lin, 8, Access::Write)?;
            if old == expected {
                cpu.write_lin(lin, 8, new)?;
            }
            old
        };
        zf = old == expected;
        if !zf {
            cpu.s.gpr[RAX] = old & 0xffff_ffff;
            cpu.s.gpr[RDX] = old >> 32;
        }
    }
    cpu.s.rflags = (cpu.s.rflags & !flags::ZF) | if zf { flags::ZF } else { 0 };
    Ok(())
}

fn syscall(cpu: &mut Cpu) -> Exec {
    if cpu.s.efer & efer::SCE == 0 || !cpu.s.long_mode() {
        return Err(ud());
    }
    cpu.s.gpr[RCX] = cpu.s.rip;
    cpu.s.gpr[11] = cpu.s.rflags;
    let base = ((cpu.s.msr.star >> 32) & 0xfffc) as u16;
    cpu.s.seg[CS] = Seg {
        selector: base,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xa09b,
    };
    cpu.s.seg[SS] = Seg {
        selector: base + 8,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xc093,
    };
    cpu.s.rflags &= !(cpu.s.msr.sfmask | RF);
    cpu.s.rflags |= flags::FIXED1;
    cpu.s.rip = cpu.s.msr.lstar;
    Ok(())
}

fn sysret(cpu: &mut Cpu, insn: &Instruction) -> Exec {
    if cpu.s.efer & efer::SCE == 0 || !cpu.s.long_mode() {
        return Err(ud());
    }
    cpu.require_cpl0()?;
    let base = ((cpu.s.msr.star >> 48) & 0xffff) as u16;
    let to64 = insn.code() == iced_x86::Code::Sysretq;
    if to64 {
        let rip = cpu.s.gpr[RCX];
        let top = (rip as i64) >> 47;
        if top != 0 && top != -1 {
            return Err(gp(0));
        }
        cpu.s.seg[CS] = Seg {
            selector: (base + 16) | 3,
            base: 0,
            limit: 0xffff_ffff,
            attr: 0xa0fb,
        };
        cpu.s.rip = rip;
    } else {
        cpu.s.seg[CS] = Seg {
            selector: base | 3,
            base: 0,
            limit: 0xffff_ffff,
            attr: 0xc0fb,
        };
        cpu.s.rip = cpu.s.gpr[RCX] & 0xffff_ffff;
    }
    cpu.s.seg[SS].selector = (base + 8) | 3;
    cpu.s.seg[SS].attr = 0xc0f3;
    cpu.s.rflags = (cpu.s.gpr[11] & flags::WRITABLE & !RF) | flags::FIXED1;
    Ok(())
}

/// Descriptor-table instructions' memory operand: limit (2 bytes) then base (4 or 8).
fn dtr_operand(cpu: &mut Cpu, insn: &Instruction) -> Exec<(u64, usize)> {
    let lin = cpu.mem_linear(insn);
    let base_size = if cpu.s.bitness() == 64 { 8 } else { 4 };
    Ok((lin, base_size))
}

/// The system instructions not handled in `exec`; `None` if `insn` is not one of them.
pub(crate) fn execute(cpu: &mut Cpu, insn: &Instruction) -> Option<Exec> {
    match execute_inner(cpu, insn) {
        Ok(true) => Some(Ok(())),
        Ok(false) => None,
        Err(e) => Some(Err(e)),
    }
}

/// `Ok(false)`: not a system instruction.
fn execute_inner(cpu: &mut Cpu, insn: &Instruction) -> Exec<bool> {
    use Mnemonic as M;
    {
        match insn.mnemonic() {
            M::In => {
                cpu.io_allowed()?;
                let port = cpu.read_op(insn, 1)? as u16;
                let size = insn.op0_register().size();
                let v = cpu.port_in(port, size)?;
                cpu.set_reg(insn.op0_register(), v);
            }
            M::Out => {
                cpu.io_allowed()?;
                let port = cpu.read_op(insn, 0)? as u16;
                let size = insn.op1_register().size();
                let v = cpu.reg(insn.op1_register());
                cpu.port_out(port, size, v)?;
            }
            M::Cli => {
                cpu.io_allowed()?;
                cpu.s.rflags &= !IF;
            }
            M::Sti => {
                cpu.io_allowed()?;
                if cpu.s.rflags & IF == 0 {
                    cpu.interrupt_shadow = true;
                }
                cpu.s.rflags |= IF;
            }
            M::Cpuid => {
                let r = cpu.m.cpuid(cpu.s.gpr[RAX] as u32, cpu.s.gpr[RCX] as u32);
                cpu.s.gpr[RAX] = u64::from(r[0]);
                cpu.s.gpr[super::state::RBX] = u64::from(r[1]);
                cpu.s.gpr[RCX] = u64::from(r[2]);
                cpu.s.gpr[RDX] = u64::from(r[3]);
            }
            M::Rdtsc | M::Rdtscp => {
                let t = cpu.m.rdtsc();
                cpu.s.gpr[RAX] = t & 0xffff_ffff;
                cpu.s.gpr[RDX] = t >> 32;
                if insn.mnemonic() == M::Rdtscp {
                    cpu.s.gpr[RCX] = cpu.s.msr.tsc_aux;
                }
            }
            M::Rdmsr => {
                cpu.require_cpl0()?;
                let v = cpu.rdmsr(cpu.s.gpr[RCX] as u32)?;
                cpu.s.gpr[RAX] = v & 0xffff_ffff;
                cpu.s.gpr[RDX] = v >> 32;
            }
            M::Wrmsr => {
                cpu.require_cpl0()?;
                let v = (cpu.s.gpr[RAX] & 0xffff_ffff) | (cpu.s.gpr[RDX] << 32);
                cpu.wrmsr(cpu.s.gpr[RCX] as u32, v)?;
            }
            M::Lgdt | M::Lidt => {
                cpu.require_cpl0()?;
                let (lin, base_size) = dtr_operand(cpu, insn)?;
                let limit = cpu.read_lin(lin, 2, Access::Read)? as u16;
                let mut base = cpu.read_lin(lin + 2, base_size, Access::Read)?;
                if cpu.s.bitness() == 16 {
                    base &= 0xff_ffff;
                }
                let d = Dtr { base, limit };
                if insn.mnemonic() == M::Lgdt {
                    cpu.s.gdtr = d;
                } else {
                    cpu.s.idtr = d;
                }
            }
            M::Sgdt | M::Sidt => {
                let (lin, base_size) = dtr_operand(cpu, insn)?;
                let d = if insn.mnemonic() == M::Sgdt {
                    cpu.s.gdtr
                } else {
                    cpu.s.idtr
                };
                cpu.write_lin(lin, 2, u64::from(d.limit))?;
                cpu.write_lin(lin + 2, base_size, d.base)?;
            }
            M::Lldt | M::Ltr => {
                cpu.require_cpl0()?;
                let sel = cpu.read_op(insn, 0)? as u16;
                if sel & !3 == 0 {
                    if insn.mnemonic() == M::Ltr {
                        return Err(gp(0));
                    }
                    cpu.s.ldtr = Seg::default();
                    return Ok(true);
                }
                let lo = cpu.read_descriptor(sel)?;
                let mut seg = Seg::from_descriptor(sel, lo);
                if cpu.s.long_mode() {
                    // System descriptors are 16 bytes in long mode.
                    let hi =
                        cpu.read_sys(cpu.s.gdtr.base.wrapping_add(u64::from(sel & !7) + 8), 8)?;
                    seg.base |= (hi & 0xffff_ffff) << 32;
                }
                if !seg.present() {
                    return Err(Fault::Exception {
                        vector: vector::NP,
                        error_code: Some(u32::from(sel & !3)),
                    });
                }
                if insn.mnemonic() == M::Ltr {
                    // Mark the TSS busy in the GDT and in the cache.
                    let addr = cpu.s.gdtr.base.wrapping_add(u64::from(sel & !7));
                    cpu.write_sys(addr, 8, lo | (2 << 40))?;
                    seg.attr |= 2;
                    cpu.s.tr = seg;
                } else {
                    cpu.s.ldtr = seg;
                }
            }
            M::Sldt | M::Str => {
                let v = if insn.mnemonic() == M::Str {
                    cpu.s.tr.selector
                } else {
                    cpu.s.ldtr.selector
                };
                cpu.write_op(insn, 0, u64::from(v))?;
            }
            M::Smsw => {
                let v = cpu.s.cr0 & 0xffff;
                cpu.write_op(insn, 0, v)?;
            }
            M::Lmsw => {
                cpu.require_cpl0()?;
                let v = cpu.read_op(insn, 0)? & 0xf;
                // LMSW can set PE but not clear it.
                let new = (cpu.s.cr0 & !0xe) | v | (cpu.s.cr0 & cr0::PE);
                cpu.set_cr0(new)?;
            }
            M::Clts => {
                cpu.require_cpl0()?;
                cpu.s.cr0 &= !cr0::TS;
            }
            M::Invlpg => {
                cpu.require_cpl0()?;
                let lin = cpu.mem_linear(insn);
                cpu.invlpg(lin);
            }
            M::Wbinvd | M::Invd => cpu.require_cpl0()?,
            M::Iret | M::Iretd | M::Iretq => iret(cpu, insn)?,
            M::Syscall => syscall(cpu)?,
            M::Sysret | M::Sysretq => sysret(cpu, insn)?,
            M::Swapgs => {
                if cpu.s.bitness() != 64 {
                    return Err(ud());
                }
                cpu.require_cpl0()?;
                std::mem::swap(&mut cpu.s.seg[GS].base, &mut cpu.s.msr.kernel_gs_base);
            }
            M::Xgetbv => {
                if cpu.s.cr4 & cr4::OSXSAVE == 0 {
                    return Err(ud());
                }
                if cpu.s.gpr[RCX] as u32 != 0 {
                    return Err(gp(0));
                }
                let v = cpu.s.fpu.xcr0;
                cpu.s.gpr[RAX] = v & 0xffff_ffff;
                cpu.s.gpr[RDX] = v >> 32;
            }
            M::Xsetbv => {
                cpu.require_cpl0()?;
                let v = (cpu.s.gpr[RAX] & 0xffff_ffff) | (cpu.s.gpr[RDX] << 32);
                // x87 must stay on; SSE is the only other state component supported.
                if cpu.s.gpr[RCX] as u32 != 0 || v & 1 == 0 || v & !3 != 0 {
                    return Err(gp(0));
                }
                cpu.s.fpu.xcr0 = v;
            }
            M::Lsl | M::Lar => {
                let sel = cpu.read_op(insn, 1)? as u16;
                let ok = sel & !3 != 0;
                let desc = if ok {
                    cpu.read_descriptor(sel).ok()
                } else {
                    None
                };
                match desc {
                    Some(d) if d & (1 << 47) != 0 => {
                        let v = if insn.mnemonic() == M::Lsl {
                            u64::from(Seg::from_descriptor(sel, d).limit)
                        } else {
                            (d >> 32) & 0x00f0_ff00
                        };
                        cpu.write_op(insn, 0, v)?;
                        cpu.s.rflags |= flags::ZF;
                    }
                    _ => cpu.s.rflags &= !flags::ZF,
                }
            }
            M::Verr | M::Verw => {
                // Used by Linux only as a CPU-buffer-clearing idiom; report "not accessible".
                cpu.s.rflags &= !flags::ZF;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}
