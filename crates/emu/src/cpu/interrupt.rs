//! Delivering exceptions and interrupts through the IDT (real mode IVT, 32-bit protected-mode
//! gates, 64-bit gates with IST), with double- and triple-fault detection.

use super::operand::mask;
use super::state::flags::{AC, IF, NT, RF, TF, VM};
use super::state::{cr0, Seg, CS, RSP, SS};
use super::{gp, vector, Cpu, Exec, Fault};

/// Exception classes for the double-fault rules (SDM vol. 3, table 6-5).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Benign,
    Contributory,
    PageFault,
    DoubleFault,
}

fn class(v: u8) -> Class {
    match v {
        vector::DE | vector::TS | vector::NP | vector::SS | vector::GP => Class::Contributory,
        vector::PF => Class::PageFault,
        vector::DF => Class::DoubleFault,
        _ => Class::Benign,
    }
}

/// A fault while delivering: the IDT entry of `vector` is unusable.
fn idt_fault(kind: u8, vector: u8, external: bool) -> Fault {
    Fault::Exception {
        vector: kind,
        error_code: Some(u32::from(vector) * 8 + 2 + external as u32),
    }
}

impl Cpu {
    /// Delivers a CPU exception raised by the current instruction (RIP is at its start).
    /// `Err` means a triple fault: the CPU shuts down.
    pub(crate) fn deliver_exception(
        &mut self,
        mut vec: u8,
        mut code: Option<u32>,
    ) -> Result<(), ()> {
        let mut first: Option<u8> = None;
        loop {
            match self.deliver(vec, code, false, true) {
                Ok(()) => return Ok(()),
                Err(Fault::NeedIo) | Err(Fault::FetchFromMmio) => {
                    // The IDT or stack is in MMIO: nothing sensible can run.
                    return Err(());
                }
                Err(Fault::Exception {
                    vector: v2,
                    error_code: c2,
                }) => {
                    let prev = first.unwrap_or(vec);
                    first = Some(prev);
                    let (c1, c2c) = (class(vec), class(v2));
                    if c1 == Class::DoubleFault {
                        return Err(());
                    }
                    let double = (c1 == Class::Contributory && c2c == Class::Contributory)
                        || (c1 == Class::PageFault
                            && (c2c == Class::Contributory || c2c == Class::PageFault));
                    if double {
                        vec = vector::DF;
                        code = Some(0);
                    } else {
                        vec = v2;
                        code = c2;
                    }
                }
            }
        }
    }

    /// Delivers an external interrupt (from the local APIC).
    pub(crate) fn deliver_external(&mut self, v: u8) -> Result<(), ()> {
        match self.deliver(v, None, false, false) {
            Ok(()) => Ok(()),
            Err(Fault::Exception { vector, error_code }) => {
                self.deliver_exception(vector, error_code)
            }
            Err(Fault::NeedIo) | Err(Fault::FetchFromMmio) => Err(()),
        }
    }

    /// INT n / INT3 / INTO / INT1: a trap, returning to the next instruction.
    pub(crate) fn deliver_software(&mut self, v: u8, icebp: bool) -> Exec {
        self.deliver(v, None, !icebp, false)
    }

    /// Pushes the interrupt frame and enters the handler of `vec`.
    /// `soft`: INT n (gate DPL is checked); `exception`: a CPU exception (may have a code).
    fn deliver(&mut self, vec: u8, code: Option<u32>, soft: bool, exception: bool) -> Exec {
        let external = !soft && !exception;
        if self.s.cr0 & cr0::PE == 0 {
            return self.deliver_real(vec);
        }
        let long = self.s.long_mode();
        let entry_size = if long { 16 } else { 8 };
        let off = u64::from(vec) * entry_size;
        if off + entry_size - 1 > u64::from(self.s.idtr.limit) {
            return Err(idt_fault(vector::GP, vec, external));
        }
        let lo = self.read_sys(self.s.idtr.base.wrapping_add(off), 8)?;
        let hi = if long {
            self.read_sys(self.s.idtr.base.wrapping_add(off + 8), 8)?
        } else {
            0
        };
        let typ = ((lo >> 40) & 0xf) as u8;
        let dpl = ((lo >> 45) & 3) as u8;
        let present = lo & (1 << 47) != 0;
        if !matches!(typ, 0x6 | 0x7 | 0xe | 0xf) {
            // Task gates and junk are not supported.
            return Err(idt_fault(vector::GP, vec, external));
        }
        if soft && dpl < self.s.cpl() {
            return Err(idt_fault(vector::GP, vec, false));
        }
        if !present {
            return Err(idt_fault(vector::NP, vec, external));
        }
        let selector = ((lo >> 16) & 0xffff) as u16;
        let mut target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        if long {
            target |= hi << 32;
        }
        let gate32 = typ & 0x8 != 0;
        let interrupt_gate = typ & 1 == 0;

        if selector & !3 == 0 {
            return Err(gp(0));
        }
        let cs_desc = self.read_descriptor(selector)?;
        let mut new_cs = Seg::from_descriptor(selector, cs_desc);
        if !new_cs.present() {
            return Err(Fault::Exception {
                vector: vector::NP,
                error_code: Some(u32::from(selector & !3)),
            });
        }
        let cpl = self.s.cpl();
        let new_cpl = new_cs.dpl().min(cpl);
        new_cs.selector = (selector & !3) | u16::from(new_cpl);

        let old_cs = self.s.seg[CS].selector;
        let old_ss = self.s.seg[SS];
        let old_rsp = self.s.gpr[RSP];
        let old_flags = self.s.rflags;
        let old_rip = self.s.rip;

        if long {
            let ist = (lo >> 32) & 7;
            let (mut rsp, switch) = if ist != 0 {
                (
                    self.read_sys(self.s.tr.base.wrapping_add(0x24 + (ist - 1) * 8), 8)?,
                    true,
                )
            } else if new_cpl < cpl {
                (
                    self.read_sys(self.s.tr.base.wrapping_add(4 + u64::from(new_cpl) * 8), 8)?,
                    true,
                )
            } else {
                (old_rsp, false)
            };
            rsp &= !0xf;
            let frame: [u64; 6] = [
                u64::from(old_ss.selector),
                old_rsp,
                old_flags,
                u64::from(old_cs),
                old_rip,
                u64::from(code.unwrap_or(0)),
            ];
            let n = if code.is_some() { 6 } else { 5 };
            for v in frame.iter().take(n) {
                rsp = rsp.wrapping_sub(8);
                self.write_sys(rsp, 8, *v)?;
            }
            self.s.gpr[RSP] = rsp;
            if switch && new_cpl < cpl {
                // SS becomes a null selector with RPL = new CPL.
                self.s.seg[SS] = Seg {
                    selector: u16::from(new_cpl),
                    base: 0,
                    limit: 0xffff_ffff,
                    attr: 0x4093 | (u16::from(new_cpl) << 5),
                };
            } else if switch && old_ss.selector & 3 != u16::from(new_cpl) {
                self.s.seg[SS].selector = (old_ss.selector & !3) | u16::from(new_cpl);
            }
            self.s.seg[CS] = new_cs;
            self.s.rip = target;
        } else {
            let size = if gate32 { 4 } else { 2 };
            let mut sp_seg = old_ss;
            let mut esp = old_rsp;
            let switch = new_cpl < cpl;
            if switch {
                // 32-bit TSS: ESPn at 4 + 8n, SSn at 8 + 8n.
                let base = self.s.tr.base;
                let new_esp = self.read_sys(base.wrapping_add(4 + u64::from(new_cpl) * 8), 4)?;
                let new_ss =
                    self.read_sys(base.wrapping_add(8 + u64::from(new_cpl) * 8), 2)? as u16;
                let desc = self.read_descriptor(new_ss)?;
                sp_seg = Seg::from_descriptor(new_ss, desc);
                esp = new_esp;
            }
            let smask = if sp_seg.db() { 0xffff_ffff } else { 0xffff };
            let mut push = |cpu: &mut Cpu, v: u64| -> Exec {
                esp = esp.wrapping_sub(size as u64) & smask;
                let lin = sp_seg.base.wrapping_add(esp) & 0xffff_ffff;
                cpu.write_sys(lin, size, v)
            };
            if switch {
                push(self, u64::from(old_ss.selector))?;
                push(self, old_rsp & mask(size))?;
            }
            push(self, old_flags & mask(size))?;
            push(self, u64::from(old_cs))?;
            push(self, old_rip & mask(size))?;
            if let Some(c) = code {
                push(self, u64::from(c))?;
            }
            if switch {
                self.s.seg[SS] = sp_seg;
            }
            self.s.gpr[RSP] = (self.s.gpr[RSP] & !smask) | esp;
            self.s.seg[CS] = new_cs;
            self.s.rip = target & if gate32 { 0xffff_ffff } else { 0xffff };
        }
        let mut f = self.s.rflags & !(TF | NT | RF | VM);
        if interrupt_gate {
            f &= !IF;
        }
        self.s.rflags = f;
        Ok(())
    }

    /// Real mode: the IVT at IDTR.base, 4 bytes per vector.
    fn deliver_real(&mut self, vec: u8) -> Exec {
        let off = u64::from(vec) * 4;
        if off + 3 > u64::from(self.s.idtr.limit) {
            return Err(gp(0));
        }
        let ent = self.read_sys(self.s.idtr.base.wrapping_add(off), 4)?;
        let flags = self.s.rflags & 0xffff;
        let cs = u64::from(self.s.seg[CS].selector);
        let ip = self.s.rip & 0xffff;
        self.push(flags, 2)?;
        self.push(cs, 2)?;
        self.push(ip, 2)?;
        self.s.seg[CS] = Seg {
            selector: (ent >> 16) as u16,
            base: (ent >> 16) << 4,
            ..self.s.seg[CS]
        };
        self.s.rip = ent & 0xffff;
        self.s.rflags &= !(IF | TF | AC);
        Ok(())
    }

    /// Reads the 8-byte descriptor `selector` names in the GDT or LDT.
    pub(crate) fn read_descriptor(&mut self, selector: u16) -> Exec<u64> {
        let (base, limit) = if selector & 4 != 0 {
            (self.s.ldtr.base, u64::from(self.s.ldtr.limit))
        } else {
            (self.s.gdtr.base, u64::from(self.s.gdtr.limit))
        };
        let off = u64::from(selector & !7);
        if off + 7 > limit {
            return Err(gp(u32::from(selector & !3)));
        }
        self.read_sys(base.wrapping_add(off), 8)
    }
}
