//! The local APIC of one vCPU (Intel SDM vol. 3, "Advanced Programmable Interrupt Controller").
//!
//! xAPIC registers through the 4 KiB MMIO page at `IA32_APIC_BASE` (0xfee00000 by default),
//! x2APIC registers through MSRs 0x800–0x8ff once the guest sets `IA32_APIC_BASE[10]`, and the
//! TSC-deadline MSR (0x6e0). Version 0x50014: version 0x14, six LVT entries (timer, thermal,
//! performance, LINT0, LINT1, error; no CMCI), no directed-EOI support, as KVM's in-kernel
//! LAPIC presents by default.
//!
//! What this model does and what the VM does:
//! - It never delivers anything itself, not even a self-IPI: a write to ICR (or to the x2APIC
//!   SELF IPI register) returns [`ApicEffect::Ipi`], and the VM offers the request to every
//!   LAPIC (the sender included) with [`LocalApic::accepts_ipi`] and [`LocalApic::deliver_ipi`].
//!   For lowest-priority delivery the VM picks one accepting LAPIC (the first is fine).
//! - I/O APIC and MSI messages arrive through [`LocalApic::accepts`] + [`LocalApic::deliver`].
//! - An EOI of a level-triggered vector returns [`ApicEffect::Eoi`]; the VM passes the vector
//!   to `IoApic::eoi`.
//! - INIT, STARTUP and NMI are latched ([`LocalApic::take_init`], [`LocalApic::take_sipi`],
//!   [`LocalApic::take_nmi`]); the vCPU loop acts on them (INIT: reset the CPU to
//!   wait-for-SIPI and call [`LocalApic::init_reset`]; STARTUP: only in wait-for-SIPI).
//! - The CPU asks [`LocalApic::pending_vector`] between instructions when RFLAGS.IF allows and
//!   calls [`LocalApic::ack`] when it takes the interrupt.
//!
//! Timer: the APIC bus runs at [`APIC_BUS_HZ`] = 1 GHz (KVM's value, which the test guest
//! assumes), divided by the divide configuration register. The current count is computed from
//! `now_ns`; expiries happen in [`LocalApic::poll_timer`], which the vCPU calls when
//! [`LocalApic::next_deadline_ns`] has passed (and which every timer register write also runs
//! first, so an expiry is judged under the settings in force when it fell due). A periodic timer
//! stays on its grid (`start + k * period`, no drift); after a long gap it fires once and skips
//! the missed ticks. Periods below 200 µs are raised to 200 µs in periodic mode, as KVM does
//! (`min_timer_period_us`). The guest TSC is `clock::ns_to_tsc(now_ns)`.
//!
//! Every register value a guest writes is masked to its defined bits; nothing here can panic.

use super::clock::{ns_to_tsc, tsc_to_ns_ceil};
pub use super::msi::{DeliveryMode, MsiMessage};

/// Default guest-physical address of the xAPIC register page.
pub const LAPIC_DEFAULT_BASE: u64 = 0xfee0_0000;
/// Size of the xAPIC register page.
pub const LAPIC_PAGE_LEN: u64 = 0x1000;
/// The APIC timer's input clock (before the divider), Hz: 1 tick = 1 ns.
pub const APIC_BUS_HZ: u64 = 1_000_000_000;
/// Shortest periodic-timer period, as KVM enforces.
pub const MIN_PERIODIC_NS: u64 = 200_000;
/// The version register: version 0x14, max LVT entry 5.
pub const LAPIC_VERSION: u32 = 0x0005_0014;

/// `IA32_APIC_BASE`.
pub const MSR_IA32_APIC_BASE: u32 = 0x1b;
/// `IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// First and last x2APIC register MSRs.
pub const X2APIC_MSR_FIRST: u32 = 0x800;
pub const X2APIC_MSR_LAST: u32 = 0x8ff;
/// `IA32_APIC_BASE` bits.
pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_X2APIC: u64 = 1 << 10;
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// The page address field of `IA32_APIC_BASE` (52-bit physical addresses).
pub const APIC_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
pub mod reg {
    pub const ID: u32 = 0x20;
    pub const VERSION: u32 = 0x30;
    pub const TPR: u32 = 0x80;
    pub const APR: u32 = 0x90;
    pub const PPR: u32 = 0xa0;
    pub const EOI: u32 = 0xb0;
    pub const RRD: u32 = 0xc0;
    pub const LDR: u32 = 0xd0;
    pub const DFR: u32 = 0xe0;
    pub const SVR: u32 = 0xf0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const LVT_CMCI: u32 = 0x2f0;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3e0;
    pub const SELF_IPI: u32 = 0x3f0;
}

/// Error status register bits this model sets.
pub mod esr {
    pub const SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
    pub const RECV_ILLEGAL_VECTOR: u32 = 1 << 6;
}

/// SVR: APIC software enable.
pub const SVR_ENABLE: u32 = 1 << 8;
/// LVT: mask bit.
pub const LVT_MASKED: u32 = 1 << 16;

/// Indices into [`LocalApicState::lvt`].
pub const LVT_TIMER: usize = 0;
pub const LVT_THERMAL: usize = 1;
pub const LVT_PERF: usize = 2;
pub const LVT_LINT0: usize = 3;
pub const LVT_LINT1: usize = 4;
pub const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;
/// Writable bits of each LVT (delivery status and remote IRR are read-only).
const LVT_WRITABLE: [u32; LVT_COUNT] = [0x700ff, 0x107ff, 0x107ff, 0x1a7ff, 0x1a7ff, 0x100ff];
/// Writable bits of ICR low (everything but delivery status and reserved bits).
const ICR_LOW_WRITABLE: u32 = 0x000c_cfff;
/// Writable bits of SVR: vector, software enable, focus processor checking.
const SVR_WRITABLE: u32 = 0x3ff;

/// Destination shorthand of an IPI (ICR bits 19:18).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DestShorthand {
    #[default]
    None,
    Self_,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// An interprocessor interrupt the guest sent by writing ICR; the VM routes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpiRequest {
    pub vector: u8,
    pub delivery_mode: DeliveryMode,
    /// Logical destination mode (ICR bit 11).
    pub logical: bool,
    pub shorthand: DestShorthand,
    /// 8-bit xAPIC destination (ICR bits 63:56), or the 32-bit x2APIC destination.
    pub dest: u32,
    /// The level bit (14): false with INIT and level trigger is "INIT level de-assert".
    pub level: bool,
    /// Trigger mode bit (15).
    pub level_triggered: bool,
}

impl IpiRequest {
    /// The request as a message for [`LocalApic::deliver`] (shorthand aside).
    pub fn message(&self) -> MsiMessage {
        MsiMessage {
            dest: self.dest,
            logical: self.logical,
            delivery_mode: self.delivery_mode,
            vector: self.vector,
            level_triggered: self.level_triggered,
        }
    }

    /// INIT level de-assert: a legacy arbitration-ID sync that modern APICs ignore.
    pub fn is_init_deassert(&self) -> bool {
        self.delivery_mode == DeliveryMode::Init && !self.level && self.level_triggered
    }
}

/// Side effect of a register write the VM must carry out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ApicEffect {
    #[default]
    None,
    /// Route this IPI (see the module doc).
    Ipi(IpiRequest),
    /// The guest EOI'd this level-triggered vector: broadcast it to the I/O APIC.
    Eoi(u8),
}

/// The LVT timer mode (bits 18:17).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
    /// Encoding 3: the timer does not run.
    Reserved,
}

/// Everything a LAPIC holds, for snapshots. Times are on the `now_ns` time line.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalApicState {
    /// The APIC ID the platform assigned (the vCPU index); x2APIC ID, and xAPIC ID at reset.
    pub initial_id: u32,
    pub apic_base: u64,
    /// xAPIC ID register (ID in bits 31:24).
    pub id: u32,
    pub tpr: u32,
    pub ldr: u32,
    pub dfr: u32,
    pub svr: u32,
    pub isr: [u32; 8],
    pub tmr: [u32; 8],
    pub irr: [u32; 8],
    /// ESR as last latched by a write to it.
    pub esr: u32,
    /// Errors detected since the last ESR write.
    pub esr_pending: u32,
    pub icr_low: u32,
    pub icr_high: u32,
    pub lvt: [u32; LVT_COUNT],
    pub timer_initial: u32,
    pub timer_divide: u32,
    /// When the running one-shot/periodic count was loaded.
    pub timer_start_ns: u64,
    /// One count-down (one-shot) or period (periodic), in ns.
    pub timer_period_ns: u64,
    /// The divisor the running count was loaded with.
    pub timer_divisor: u32,
    /// Next expiry of a one-shot/periodic count; `None` when not counting.
    pub timer_next_ns: Option<u64>,
    /// `IA32_TSC_DEADLINE`; 0 = disarmed.
    pub tsc_deadline: u64,
    /// Last level seen on LINT0/LINT1.
    pub lint_level: [bool; 2],
    pub nmi_pending: bool,
    pub init_pending: bool,
    pub sipi_pending: Option<u8>,
}

/// One vCPU's local APIC.
#[derive(Clone, Debug)]
pub struct LocalApic {
    s: LocalApicState,
}

fn bit_index(vector: u8) -> (usize, u32) {
    (usize::from(vector >> 5), 1u32 << (vector & 31))
}

fn set_bit(regs: &mut [u32; 8], vector: u8) {
    let (i, m) = bit_index(vector);
    regs[i] |= m;
}

fn clear_bit(regs: &mut [u32; 8], vector: u8) {
    let (i, m) = bit_index(vector);
    regs[i] &= !m;
}

fn test_bit(regs: &[u32; 8], vector: u8) -> bool {
    let (i, m) = bit_index(vector);
    regs[i] & m != 0
}

fn highest(regs: &[u32; 8]) -> Option<u8> {
    regs.iter()
        .enumerate()
        .rev()
        .find(|(_, &w)| w != 0)
        .map(|(i, &w)| ((i as u32) * 32 + 31 - w.leading_zeros()) as u8)
}

/// The divisor a divide configuration register value selects (1, 2, 4, ..., 128).
pub fn timer_divisor(dcr: u32) -> u32 {
    let v = ((dcr >> 1) & 4) | (dcr & 3);
    if v == 7 {
        1
    } else {
        2 << v
    }
}

impl LocalApic {
    /// A LAPIC in its power-on state; the one with `apic_id` 0 is the bootstrap processor.
    pub fn new(apic_id: u32) -> Self {
        let mut apic = LocalApic {
            s: LocalApicState {
                initial_id: apic_id,
                ..Default::default()
            },
        };
        apic.reset();
        apic
    }

    /// Power-on / RESET state: xAPIC mode enabled at 0xfee00000, software-disabled
    /// (SVR 0xff), all LVTs masked, nothing pending.
    pub fn reset(&mut self) {
        let id = self.s.initial_id;
        let bsp = if id == 0 { APIC_BASE_BSP } else { 0 };
        self.s = LocalApicState {
            initial_id: id,
            apic_base: LAPIC_DEFAULT_BASE | APIC_BASE_ENABLE | bsp,
            id: id << 24,
            ..Default::default()
        };
        self.reset_registers();
    }

    /// The state after an INIT: registers as at power-on, except the APIC ID and
    /// `IA32_APIC_BASE`, which keep their values. Pending NMI is dropped; a STARTUP that
    /// already arrived is kept.
    pub fn init_reset(&mut self) {
        self.reset_registers();
        self.s.nmi_pending = false;
        self.s.init_pending = false;
    }

    fn reset_registers(&mut self) {
        let s = &mut self.s;
        s.tpr = 0;
        s.ldr = 0;
        s.dfr = 0xffff_ffff;
        s.svr = 0xff;
        s.isr = [0; 8];
        s.tmr = [0; 8];
        s.irr = [0; 8];
        s.esr = 0;
        s.esr_pending = 0;
        s.icr_low = 0;
        s.icr_high = 0;
        s.lvt = [LVT_MASKED; LVT_COUNT];
        s.timer_initial = 0;
        s.timer_divide = 0;
        s.timer_start_ns = 0;
        s.timer_period_ns = 0;
        s.timer_divisor = 0;
        s.timer_next_ns = None;
        s.tsc_deadline = 0;
        s.lint_level = [false; 2];
    }

    /// A copy of the state, for snapshots.
    pub fn state(&self) -> LocalApicState {
        self.s.clone()
    }

    /// A LAPIC restored from a snapshot. Any values are safe (nothing can panic), they are
    /// just taken as the guest left them.
    pub fn from_state(state: LocalApicState) -> Self {
        LocalApic { s: state }
    }

    /// The current APIC ID: the x2APIC ID in x2APIC mode, else the xAPIC ID register's.
    pub fn apic_id(&self) -> u32 {
        if self.is_x2apic() {
            self.s.initial_id
        } else {
            self.s.id >> 24
        }
    }

    /// `IA32_APIC_BASE[11]`: globally enabled. When clear, the LAPIC reads as 0 and delivers
    /// nothing.
    pub fn is_enabled(&self) -> bool {
        self.s.apic_base & APIC_BASE_ENABLE != 0
    }

    /// x2APIC mode (`IA32_APIC_BASE[11:10]` = 11b): registers are MSRs, the MMIO page is gone.
    pub fn is_x2apic(&self) -> bool {
        self.s.apic_base & (APIC_BASE_ENABLE | APIC_BASE_X2APIC)
            == APIC_BASE_ENABLE | APIC_BASE_X2APIC
    }

    /// SVR bit 8.
    pub fn is_software_enabled(&self) -> bool {
        self.s.svr & SVR_ENABLE != 0
    }

    /// Guest-physical address of the xAPIC page, when it is there (xAPIC mode).
    pub fn mmio_base(&self) -> Option<u64> {
        (self.is_enabled() && !self.is_x2apic()).then_some(self.s.apic_base & APIC_BASE_ADDR_MASK)
    }

    /// `IA32_APIC_BASE`.
    pub fn base_msr(&self) -> u64 {
        self.s.apic_base
    }

    /// Writes `IA32_APIC_BASE`; false means #GP (reserved bits, or a transition the SDM forbids:
    /// x2APIC → xAPIC, disabled → x2APIC, x2APIC without the enable bit). Disabling the APIC
    /// returns it to its power-on register state.
    pub fn set_base_msr(&mut self, value: u64) -> bool {
        let allowed = APIC_BASE_ADDR_MASK | APIC_BASE_ENABLE | APIC_BASE_X2APIC | APIC_BASE_BSP;
        if value & !allowed != 0 {
            return false;
        }
        let mode = |v: u64| (v & APIC_BASE_ENABLE != 0, v & APIC_BASE_X2APIC != 0);
        let old = mode(self.s.apic_base);
        let new = mode(value);
        match (old, new) {
            (_, (false, true)) => return false,
            ((true, true), (true, false)) => return false,
            ((false, _), (true, true)) => return false,
            _ => {}
        }
        self.s.apic_base = value;
        if old.0 && !new.0 {
            self.reset_registers();
            self.s.id = self.s.initial_id << 24;
        }
        true
    }

    // ---------------------------------------------------------------- register access

    /// A 32-bit read at `offset` in the xAPIC page. Unaligned offsets, reserved registers, and
    /// any read while the APIC is disabled or in x2APIC mode give 0.
    pub fn read(&self, offset: u32, now_ns: u64) -> u32 {
        if !self.is_enabled() || self.is_x2apic() || offset & 0xf != 0 {
            return 0;
        }
        self.read_reg(offset & 0xff0, now_ns).unwrap_or(0)
    }

    /// A 32-bit write at `offset` in the xAPIC page. Ignored while the APIC is disabled or in
    /// x2APIC mode, and at unaligned offsets.
    pub fn write(&mut self, offset: u32, value: u32, now_ns: u64) -> ApicEffect {
        if !self.is_enabled() || self.is_x2apic() || offset & 0xf != 0 {
            return ApicEffect::None;
        }
        match offset & 0xff0 {
            reg::ID => self.s.id = value & 0xff00_0000,
            reg::LDR => self.s.ldr = value & 0xff00_0000,
            reg::DFR => self.s.dfr = value | 0x0fff_ffff,
            reg::ICR_HIGH => self.s.icr_high = value & 0xff00_0000,
            reg::ICR_LOW => {
                self.s.icr_low = value & ICR_LOW_WRITABLE;
                return self.send_ipi(self.s.icr_high >> 24);
            }
            off => return self.write_common(off, value, now_ns),
        }
        ApicEffect::None
    }

    /// RDMSR of an x2APIC register (0x800–0x8ff); `None` means #GP (not in x2APIC mode,
    /// reserved or write-only register).
    pub fn read_msr(&self, msr: u32, now_ns: u64) -> Option<u64> {
        let off = Self::x2apic_offset(msr)?;
        if !self.is_x2apic() {
            return None;
        }
        match off {
            reg::ID => Some(u64::from(self.s.initial_id)),
            reg::LDR => Some(u64::from(self.x2apic_ldr())),
            reg::ICR_LOW => Some(u64::from(self.s.icr_high) << 32 | u64::from(self.s.icr_low)),
            reg::APR
            | reg::RRD
            | reg::DFR
            | reg::EOI
            | reg::ICR_HIGH
            | reg::SELF_IPI
            | reg::LVT_CMCI => None,
            _ => self.read_reg(off, now_ns).map(u64::from),
        }
    }

    /// WRMSR of an x2APIC register; `None` means #GP (not in x2APIC mode, read-only or reserved
    /// register, reserved bits set where the SDM requires #GP).
    pub fn write_msr(&mut self, msr: u32, value: u64, now_ns: u64) -> Option<ApicEffect> {
        let off = Self::x2apic_offset(msr)?;
        if !self.is_x2apic() {
            return None;
        }
        if off == reg::ICR_LOW {
            self.s.icr_high = (value >> 32) as u32;
            self.s.icr_low = (value as u32) & ICR_LOW_WRITABLE;
            return Some(self.send_ipi(self.s.icr_high));
        }
        let v = u32::try_from(value).ok()?;
        match off {
            reg::EOI | reg::ESR if v != 0 => None,
            reg::SELF_IPI => {
                let vector = (v & 0xff) as u8;
                if vector < 16 {
                    self.set_error(esr::SEND_ILLEGAL_VECTOR);
                    return Some(ApicEffect::None);
                }
                Some(ApicEffect::Ipi(IpiRequest {
                    vector,
                    delivery_mode: DeliveryMode::Fixed,
                    logical: false,
                    shorthand: DestShorthand::Self_,
                    dest: self.s.initial_id,
                    level: true,
                    level_triggered: false,
                }))
            }
            reg::TPR
            | reg::EOI
            | reg::SVR
            | reg::ESR
            | reg::LVT_TIMER
            | reg::LVT_THERMAL
            | reg::LVT_PERF
            | reg::LVT_LINT0
            | reg::LVT_LINT1
            | reg::LVT_ERROR
            | reg::TIMER_INITIAL
            | reg::TIMER_DIVIDE => Some(self.write_common(off, v, now_ns)),
            _ => None,
        }
    }

    fn x2apic_offset(msr: u32) -> Option<u32> {
        (X2APIC_MSR_FIRST..=X2APIC_MSR_LAST)
            .contains(&msr)
            .then(|| (msr - X2APIC_MSR_FIRST) << 4)
    }

    fn x2apic_ldr(&self) -> u32 {
        let id = self.s.initial_id;
        ((id >> 4) << 16) | (1 << (id & 0xf))
    }

    fn read_reg(&self, off: u32, now_ns: u64) -> Option<u32> {
        let s = &self.s;
        let index = |base: u32| ((off - base) >> 4) as usize;
        Some(match off {
            reg::ID => s.id,
            reg::VERSION => LAPIC_VERSION,
            reg::TPR => s.tpr,
            reg::APR | reg::EOI | reg::RRD => 0,
            reg::PPR => self.ppr(),
            reg::LDR => s.ldr,
            reg::DFR => s.dfr,
            reg::SVR => s.svr,
            0x100..=0x170 => s.isr[index(reg::ISR)],
            0x180..=0x1f0 => s.tmr[index(reg::TMR)],
            0x200..=0x270 => s.irr[index(reg::IRR)],
            reg::ESR => s.esr,
            reg::ICR_LOW => s.icr_low,
            reg::ICR_HIGH => s.icr_high,
            0x320..=0x370 => s.lvt[index(reg::LVT_TIMER)],
            reg::TIMER_INITIAL => s.timer_initial,
            reg::TIMER_CURRENT => self.current_count(now_ns),
            reg::TIMER_DIVIDE => s.timer_divide,
            _ => return None,
        })
    }

    /// Writes shared by the xAPIC page and the x2APIC MSRs.
    fn write_common(&mut self, off: u32, value: u32, now_ns: u64) -> ApicEffect {
        match off {
            reg::TPR => self.s.tpr = value & 0xff,
            reg::EOI => return self.eoi(),
            reg::SVR => {
                self.poll_timer(now_ns);
                self.s.svr = value & SVR_WRITABLE;
                if !self.is_software_enabled() {
                    for lvt in &mut self.s.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                self.s.esr = self.s.esr_pending;
                self.s.esr_pending = 0;
            }
            reg::LVT_TIMER => self.write_lvt_timer(value, now_ns),
            0x330..=0x370 => {
                let i = ((off - reg::LVT_TIMER) >> 4) as usize;
                if let (Some(lvt), Some(mask)) = (self.s.lvt.get_mut(i), LVT_WRITABLE.get(i)) {
                    *lvt = value & mask;
                    if self.s.svr & SVR_ENABLE == 0 {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            reg::TIMER_INITIAL => {
                self.poll_timer(now_ns);
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.s.timer_initial = value;
                    self.start_count(now_ns);
                }
            }
            reg::TIMER_DIVIDE => {
                self.poll_timer(now_ns);
                self.s.timer_divide = value & 0xb;
            }
            _ => {}
        }
        ApicEffect::None
    }

    fn send_ipi(&mut self, dest: u32) -> ApicEffect {
        let low = self.s.icr_low;
        let req = IpiRequest {
            vector: (low & 0xff) as u8,
            delivery_mode: DeliveryMode::from_bits(low >> 8),
            logical: low & (1 << 11) != 0,
            shorthand: match (low >> 18) & 3 {
                0 => DestShorthand::None,
                1 => DestShorthand::Self_,
                2 => DestShorthand::AllIncludingSelf,
                _ => DestShorthand::AllExcludingSelf,
            },
            dest,
            level: low & (1 << 14) != 0,
            level_triggered: low & (1 << 15) != 0,
        };
        let fixed = matches!(
            req.delivery_mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        );
        if fixed && req.vector < 16 {
            self.set_error(esr::SEND_ILLEGAL_VECTOR);
            return ApicEffect::None;
        }
        ApicEffect::Ipi(req)
    }

    // ---------------------------------------------------------------- interrupt acceptance

    /// Processor priority: TPR, or the class of the highest in-service vector if that is higher.
    pub fn ppr(&self) -> u32 {
        let tpr = self.s.tpr & 0xff;
        let isrv = highest(&self.s.isr).map_or(0, u32::from);
        if (tpr & 0xf0) >= (isrv & 0xf0) {
            tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Whether a message's destination (`logical` or physical mode; not an IPI shorthand)
    /// selects this LAPIC. xAPIC: 0xff is a broadcast, logical mode follows DFR (flat or
    /// cluster); x2APIC: 0xffffffff is a broadcast, logical mode is cluster `ID[31:16]` plus a
    /// 16-bit mask.
    pub fn accepts(&self, dest: u32, logical: bool) -> bool {
        if !self.is_enabled() {
            return false;
        }
        if self.is_x2apic() {
            if dest == 0xffff_ffff {
                return true;
            }
            if !logical {
                return dest == self.s.initial_id;
            }
            let ldr = self.x2apic_ldr();
            return dest >> 16 == ldr >> 16 && dest & ldr & 0xffff != 0;
        }
        if dest == 0xff || dest == 0xffff_ffff {
            return true;
        }
        if !logical {
            return dest == self.apic_id();
        }
        let mda = dest & 0xff;
        let ldr = self.s.ldr >> 24;
        if self.s.dfr >> 28 == 0xf {
            ldr & mda != 0
        } else {
            ldr >> 4 == mda >> 4 && ldr & mda & 0xf != 0
        }
    }

    /// Whether an IPI selects this LAPIC; `is_sender` says whether this LAPIC sent it.
    pub fn accepts_ipi(&self, req: &IpiRequest, is_sender: bool) -> bool {
        if !self.is_enabled() {
            return false;
        }
        match req.shorthand {
            DestShorthand::None => self.accepts(req.dest, req.logical),
            DestShorthand::Self_ => is_sender,
            DestShorthand::AllIncludingSelf => true,
            DestShorthand::AllExcludingSelf => !is_sender,
        }
    }

    /// Delivers an IPI this LAPIC accepts (an INIT level de-assert is ignored).
    pub fn deliver_ipi(&mut self, req: &IpiRequest) {
        if !req.is_init_deassert() {
            self.deliver(&req.message());
        }
    }

    /// Delivers a message this LAPIC accepts: fixed and lowest-priority interrupts go to IRR,
    /// NMI/INIT/STARTUP are latched for the vCPU loop, SMI and ExtINT are dropped (no SMM, no
    /// 8259 delivery on this platform).
    pub fn deliver(&mut self, msg: &MsiMessage) {
        if !self.is_enabled() {
            return;
        }
        match msg.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept(msg.vector, msg.level_triggered)
            }
            DeliveryMode::Nmi => self.s.nmi_pending = true,
            DeliveryMode::Init => self.s.init_pending = true,
            DeliveryMode::StartUp => self.s.sipi_pending = Some(msg.vector),
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => {}
        }
    }

    /// Accepts a fixed interrupt: sets its IRR bit, and its TMR bit if level-triggered (else
    /// clears it). Dropped while the APIC is disabled (globally or in SVR, as KVM does);
    /// vectors 0–15 are illegal and set "receive illegal vector" in ESR instead.
    pub fn accept(&mut self, vector: u8, level_triggered: bool) {
        if !self.is_enabled() || !self.is_software_enabled() {
            return;
        }
        if vector < 16 {
            self.set_error(esr::RECV_ILLEGAL_VECTOR);
            return;
        }
        self.raise(vector, level_triggered);
    }

    fn raise(&mut self, vector: u8, level: bool) {
        set_bit(&mut self.s.irr, vector);
        if level {
            set_bit(&mut self.s.tmr, vector);
        } else {
            clear_bit(&mut self.s.tmr, vector);
        }
    }

    fn set_error(&mut self, bits: u32) {
        self.s.esr_pending |= bits;
        let lvt = self.s.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 && self.is_enabled() {
            let vector = (lvt & 0xff) as u8;
            if vector < 16 {
                self.s.esr_pending |= esr::RECV_ILLEGAL_VECTOR;
            } else {
                self.raise(vector, false);
            }
        }
    }

    /// The vector the CPU should take now, if any: the highest IRR vector whose priority class
    /// is above PPR's, while the APIC is enabled globally and in SVR.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.is_enabled() || !self.is_software_enabled() {
            return None;
        }
        let v = highest(&self.s.irr)?;
        (u32::from(v & 0xf0) > (self.ppr() & 0xf0)).then_some(v)
    }

    /// The CPU takes the pending interrupt: IRR → ISR. Returns its vector.
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.pending_vector()?;
        clear_bit(&mut self.s.irr, v);
        set_bit(&mut self.s.isr, v);
        Some(v)
    }

    /// End of interrupt: clears the highest ISR bit; a level-triggered vector is returned for
    /// the I/O APIC.
    pub fn eoi(&mut self) -> ApicEffect {
        let Some(v) = highest(&self.s.isr) else {
            return ApicEffect::None;
        };
        clear_bit(&mut self.s.isr, v);
        if test_bit(&self.s.tmr, v) {
            ApicEffect::Eoi(v)
        } else {
            ApicEffect::None
        }
    }

    /// An NMI was delivered since the last call.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.s.nmi_pending)
    }

    /// An INIT was delivered since the last call.
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.s.init_pending)
    }

    /// The vector of a STARTUP IPI delivered since the last call (start at `vector << 12`).
    pub fn take_sipi(&mut self) -> Option<u8> {
        self.s.sipi_pending.take()
    }

    /// Whether an NMI, INIT or STARTUP is latched (cheap; for the vCPU's wake-up check).
    pub fn has_pending_event(&self) -> bool {
        self.s.nmi_pending || self.s.init_pending || self.s.sipi_pending.is_some()
    }

    /// Drives LINT0 (`pin` 0) or LINT1 (`pin` 1) to `level`. A rising edge delivers what the
    /// LVT entry says: a fixed vector or an NMI; ExtINT (8259 virtual wire) delivers nothing on
    /// this platform. Other pins are ignored.
    pub fn lint(&mut self, pin: u8, level: bool) {
        let Some(old) = self.s.lint_level.get_mut(usize::from(pin)) else {
            return;
        };
        let rising = level && !*old;
        *old = level;
        let lvt = self.s.lvt[LVT_LINT0 + usize::from(pin)];
        if !rising || lvt & LVT_MASKED != 0 || !self.is_enabled() {
            return;
        }
        match DeliveryMode::from_bits(lvt >> 8) {
            DeliveryMode::Fixed => self.accept((lvt & 0xff) as u8, lvt & (1 << 15) != 0),
            DeliveryMode::Nmi => self.s.nmi_pending = true,
            _ => {}
        }
    }

    // ---------------------------------------------------------------- timer

    /// The LVT timer mode.
    pub fn timer_mode(&self) -> TimerMode {
        match (self.s.lvt[LVT_TIMER] >> 17) & 3 {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::Reserved,
        }
    }

    fn start_count(&mut self, now_ns: u64) {
        let s = &mut self.s;
        let mode = (s.lvt[LVT_TIMER] >> 17) & 3;
        if s.timer_initial == 0 || mode > 1 {
            s.timer_next_ns = None;
            return;
        }
        let divisor = timer_divisor(s.timer_divide);
        let ticks = u128::from(s.timer_initial) * u128::from(divisor);
        let mut period = u64::try_from(ticks * 1_000_000_000 / u128::from(APIC_BUS_HZ))
            .unwrap_or(u64::MAX)
            .max(1);
        if mode == 1 {
            period = period.max(MIN_PERIODIC_NS);
        }
        s.timer_divisor = divisor;
        s.timer_period_ns = period;
        s.timer_start_ns = now_ns;
        s.timer_next_ns = now_ns.checked_add(period);
    }

    fn write_lvt_timer(&mut self, value: u32, now_ns: u64) {
        self.poll_timer(now_ns);
        let old = self.timer_mode();
        let mut v = value & LVT_WRITABLE[LVT_TIMER];
        if !self.is_software_enabled() {
            v |= LVT_MASKED;
        }
        self.s.lvt[LVT_TIMER] = v;
        let new = self.timer_mode();
        if old == new {
            return;
        }
        if (old == TimerMode::TscDeadline) != (new == TimerMode::TscDeadline)
            || new == TimerMode::Reserved
        {
            self.s.timer_initial = 0;
            self.s.timer_next_ns = None;
            self.s.tsc_deadline = 0;
        } else if new == TimerMode::Periodic {
            self.s.timer_period_ns = self.s.timer_period_ns.max(MIN_PERIODIC_NS);
        }
    }

    /// The current count register: counts down from the initial count at bus/divisor rate;
    /// 0 when not counting or in TSC-deadline mode.
    pub fn current_count(&self, now_ns: u64) -> u32 {
        let s = &self.s;
        let mode = self.timer_mode();
        let Some(next) = s.timer_next_ns else {
            return 0;
        };
        let remaining_ns = match mode {
            TimerMode::OneShot => next.saturating_sub(now_ns),
            TimerMode::Periodic => {
                let period = s.timer_period_ns.max(1);
                let elapsed = now_ns.saturating_sub(s.timer_start_ns);
                period - elapsed % period
            }
            _ => return 0,
        };
        let ticks = u128::from(remaining_ns) * u128::from(APIC_BUS_HZ) / 1_000_000_000;
        let count = ticks.div_ceil(u128::from(s.timer_divisor.max(1)));
        u32::try_from(count)
            .unwrap_or(u32::MAX)
            .min(s.timer_initial)
    }

    /// Writes `IA32_TSC_DEADLINE` (guest TSC units). Ignored unless the LVT timer is in
    /// TSC-deadline mode; 0 disarms; a deadline already past fires at once.
    pub fn write_tsc_deadline(&mut self, tsc: u64, now_ns: u64) {
        if !self.is_enabled() || self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.poll_timer(now_ns);
        self.s.tsc_deadline = tsc;
        self.poll_timer(now_ns);
    }

    /// Reads `IA32_TSC_DEADLINE`: 0 unless armed in TSC-deadline mode.
    pub fn read_tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.s.tsc_deadline
        } else {
            0
        }
    }

    /// When the vCPU must next call [`LocalApic::poll_timer`], if the timer can interrupt.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if !self.is_enabled() || self.s.lvt[LVT_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        match self.timer_mode() {
            TimerMode::OneShot | TimerMode::Periodic => self.s.timer_next_ns,
            TimerMode::TscDeadline => {
                (self.s.tsc_deadline != 0).then(|| tsc_to_ns_ceil(self.s.tsc_deadline))
            }
            TimerMode::Reserved => None,
        }
    }

    /// Runs the timer up to `now_ns`: an expiry that is due sets the LVT timer vector in IRR
    /// (unless masked) and re-arms a periodic timer on its grid; returns whether an interrupt
    /// was raised. At most one interrupt per call.
    pub fn poll_timer(&mut self, now_ns: u64) -> bool {
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                let d = self.s.tsc_deadline;
                if d == 0 || ns_to_tsc(now_ns) < d {
                    return false;
                }
                self.s.tsc_deadline = 0;
            }
            mode @ (TimerMode::OneShot | TimerMode::Periodic) => {
                let Some(next) = self.s.timer_next_ns else {
                    return false;
                };
                if now_ns < next {
                    return false;
                }
                self.s.timer_next_ns = if mode == TimerMode::Periodic {
                    let period = self.s.timer_period_ns.max(1);
                    let start = self.s.timer_start_ns;
                    let k = now_ns.saturating_sub(start) / period + 1;
                    k.checked_mul(period).and_then(|d| start.checked_add(d))
                } else {
                    None
                };
            }
            TimerMode::Reserved => return false,
        }
        self.fire_timer()
    }

    fn fire_timer(&mut self) -> bool {
        let lvt = self.s.lvt[LVT_TIMER];
        if !self.is_enabled() || lvt & LVT_MASKED != 0 {
            return false;
        }
        let vector = (lvt & 0xff) as u8;
        if vector < 16 {
            self.set_error(esr::RECV_ILLEGAL_VECTOR);
            return false;
        }
        self.raise(vector, false);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(id: u32) -> LocalApic {
        let mut a = LocalApic::new(id);
        a.write(reg::SVR, SVR_ENABLE | 0xff, 0);
        a
    }

    #[test]
    fn power_on_state() {
        let a = LocalApic::new(0);
        assert_eq!(a.read(reg::ID, 0), 0);
        assert_eq!(a.read(reg::VERSION, 0), 0x50014);
        assert_eq!(a.read(reg::SVR, 0), 0xff);
        assert_eq!(a.read(reg::DFR, 0), 0xffff_ffff);
        for off in [0x320, 0x330, 0x340, 0x350, 0x360, 0x370] {
            assert_eq!(a.read(off, 0), LVT_MASKED, "{off:#x}");
        }
        assert_eq!(a.base_msr(), 0xfee0_0000 | APIC_BASE_ENABLE | APIC_BASE_BSP);
        let b = LocalApic::new(3);
        assert_eq!(b.read(reg::ID, 0), 3 << 24);
        assert_eq!(b.base_msr() & APIC_BASE_BSP, 0);
        assert_eq!(b.apic_id(), 3);
    }

    #[test]
    fn software_disabled_apic_delivers_nothing() {
        let mut a = LocalApic::new(0);
        a.accept(0x40, false);
        assert_eq!(a.pending_vector(), None);
        let mut a = enabled(0);
        a.accept(0x40, false);
        assert_eq!(a.pending_vector(), Some(0x40));
    }

    #[test]
    fn ppr_masks_lower_priority_vectors() {
        let mut a = enabled(0);
        a.write(reg::TPR, 0x50, 0);
        a.accept(0x45, false);
        assert_eq!(a.pending_vector(), None, "class 4 is below TPR class 5");
        a.accept(0x61, false);
        assert_eq!(a.ack(), Some(0x61));
        assert_eq!(a.read(reg::PPR, 0), 0x60);
        a.accept(0x65, false);
        assert_eq!(
            a.pending_vector(),
            None,
            "same class as the in-service vector"
        );
        a.accept(0x71, false);
        assert_eq!(a.ack(), Some(0x71));
        a.eoi();
        a.eoi();
        a.write(reg::TPR, 0, 0);
        assert_eq!(a.ack(), Some(0x65));
        assert_eq!(a.ack(), None, "class 4 is below the in-service class 6");
        a.eoi();
        assert_eq!(a.ack(), Some(0x45));
    }

    #[test]
    fn eoi_pops_isr_in_priority_order() {
        let mut a = enabled(0);
        a.accept(0x30, false);
        assert_eq!(a.ack(), Some(0x30));
        a.accept(0x50, true);
        assert_eq!(a.ack(), Some(0x50));
        a.accept(0x80, false);
        assert_eq!(a.ack(), Some(0x80));
        assert_eq!(a.read(reg::ISR + 0x40, 0), 1, "0x80 in ISR word 4");
        assert_eq!(a.write(reg::EOI, 0, 0), ApicEffect::None);
        assert_eq!(a.write(reg::EOI, 0, 0), ApicEffect::Eoi(0x50));
        assert_eq!(a.write(reg::EOI, 0, 0), ApicEffect::None);
        assert_eq!(a.read(reg::ISR + 0x10, 0), 0);
        assert_eq!(a.write(reg::EOI, 0, 0), ApicEffect::None);
    }

    #[test]
    fn illegal_vectors_set_esr() {
        let mut a = enabled(0);
        a.accept(5, false);
        assert_eq!(a.pending_vector(), None);
        a.write(reg::ESR, 0, 0);
        assert_eq!(a.read(reg::ESR, 0), esr::RECV_ILLEGAL_VECTOR);
        a.write(reg::ICR_LOW, 0x0000_4003, 0);
        a.write(reg::ESR, 0, 0);
        assert_eq!(a.read(reg::ESR, 0), esr::SEND_ILLEGAL_VECTOR);
        a.write(reg::ESR, 0, 0);
        assert_eq!(a.read(reg::ESR, 0), 0);
    }

    #[test]
    fn error_lvt_raises_an_interrupt() {
        let mut a = enabled(0);
        a.write(reg::LVT_ERROR, 0xfe, 0);
        a.accept(1, false);
        assert_eq!(a.ack(), Some(0xfe));
    }

    #[test]
    fn icr_write_returns_ipi() {
        let mut a = enabled(0);
        a.write(reg::ICR_HIGH, 2 << 24, 0);
        let e = a.write(reg::ICR_LOW, 0x0000_4500, 0);
        let ApicEffect::Ipi(req) = e else {
            panic!("{e:?}")
        };
        assert_eq!(req.delivery_mode, DeliveryMode::Init);
        assert_eq!(req.dest, 2);
        assert!(req.level);
        assert_eq!(
            a.read(reg::ICR_LOW, 0) & (1 << 12),
            0,
            "delivery status idle"
        );
        let mut b = enabled(2);
        let mut c = enabled(1);
        assert!(b.accepts_ipi(&req, false));
        assert!(!c.accepts_ipi(&req, false));
        b.deliver_ipi(&req);
        assert!(b.take_init());
        assert!(!b.take_init());
        let ApicEffect::Ipi(sipi) = a.write(reg::ICR_LOW, 0x0000_4608, 0) else {
            panic!()
        };
        b.deliver_ipi(&sipi);
        assert_eq!(b.take_sipi(), Some(0x08));
        // INIT level de-assert is ignored.
        let ApicEffect::Ipi(deassert) = a.write(reg::ICR_LOW, 0x0008_8500, 0) else {
            panic!()
        };
        assert_eq!(deassert.shorthand, DestShorthand::AllIncludingSelf);
        c.deliver_ipi(&deassert);
        assert!(!c.take_init());
    }

    #[test]
    fn shorthands_and_logical_destinations() {
        let mut a = enabled(1);
        let req = |shorthand| IpiRequest {
            vector: 0x40,
            shorthand,
            ..Default::default()
        };
        assert!(a.accepts_ipi(&req(DestShorthand::Self_), true));
        assert!(!a.accepts_ipi(&req(DestShorthand::Self_), false));
        assert!(!a.accepts_ipi(&req(DestShorthand::AllExcludingSelf), true));
        assert!(a.accepts_ipi(&req(DestShorthand::AllIncludingSelf), true));
        a.write(reg::LDR, 0x02 << 24, 0);
        assert!(a.accepts(0x03, true));
        assert!(!a.accepts(0x04, true));
        assert!(a.accepts(0xff, false));
        a.write(reg::DFR, 0x0fff_ffff, 0); // cluster model
        a.write(reg::LDR, 0x21 << 24, 0);
        assert!(a.accepts(0x23, true));
        assert!(!a.accepts(0x13, true));
    }

    #[test]
    fn periodic_timer_fires_every_period() {
        let mut a = enabled(0);
        // As guests/main.c does: divide by 16, periodic, 62500 → 1 ms.
        a.write(reg::TIMER_DIVIDE, 0x3, 0);
        a.write(reg::LVT_TIMER, 0x20000 | 0xec, 0);
        a.write(reg::TIMER_INITIAL, 62_500, 1000);
        assert_eq!(a.next_deadline_ns(), Some(1_001_000));
        assert_eq!(a.read(reg::TIMER_CURRENT, 1000), 62_500);
        assert_eq!(a.read(reg::TIMER_CURRENT, 1000 + 16 * 100), 62_400);
        let mut fired = 0;
        for step in 1..=10_000u64 {
            let now = 1000 + step * 1000;
            if a.poll_timer(now) {
                fired += 1;
                assert_eq!(a.ack(), Some(0xec));
                a.eoi();
            }
        }
        assert_eq!(fired, 10, "10 ms at 1 ms");
        assert_eq!(a.next_deadline_ns(), Some(1000 + 11_000_000), "no drift");
    }

    #[test]
    fn periodic_timer_does_not_storm_after_a_gap() {
        let mut a = enabled(0);
        a.write(reg::LVT_TIMER, 0x20000 | 0x40, 0);
        a.write(reg::TIMER_DIVIDE, 0xb, 0); // divide by 1
        a.write(reg::TIMER_INITIAL, 1_000_000, 0);
        assert!(a.poll_timer(50_500_000));
        assert!(!a.poll_timer(50_600_000));
        assert_eq!(a.next_deadline_ns(), Some(51_000_000));
    }

    #[test]
    fn periodic_period_has_a_floor() {
        let mut a = enabled(0);
        a.write(reg::LVT_TIMER, 0x20000 | 0x40, 0);
        a.write(reg::TIMER_DIVIDE, 0xb, 0);
        a.write(reg::TIMER_INITIAL, 1, 0);
        assert_eq!(a.next_deadline_ns(), Some(MIN_PERIODIC_NS));
        assert_eq!(a.read(reg::TIMER_CURRENT, 5), 1);
    }

    #[test]
    fn one_shot_timer_fires_once() {
        let mut a = enabled(0);
        a.write(reg::TIMER_DIVIDE, 0x0, 0); // divide by 2
        a.write(reg::LVT_TIMER, 0x41, 0);
        a.write(reg::TIMER_INITIAL, 500, 0);
        assert_eq!(a.next_deadline_ns(), Some(1000));
        assert!(!a.poll_timer(999));
        assert_eq!(a.read(reg::TIMER_CURRENT, 999), 1);
        assert!(a.poll_timer(1000));
        assert!(!a.poll_timer(100_000));
        assert_eq!(a.next_deadline_ns(), None);
        assert_eq!(a.read(reg::TIMER_CURRENT, 100_000), 0);
        assert_eq!(a.ack(), Some(0x41));
    }

    #[test]
    fn masked_timer_counts_but_does_not_interrupt() {
        let mut a = enabled(0);
        a.write(reg::LVT_TIMER, LVT_MASKED | 0x41, 0);
        a.write(reg::TIMER_DIVIDE, 0xb, 0);
        a.write(reg::TIMER_INITIAL, 100, 0);
        assert_eq!(a.next_deadline_ns(), None);
        assert_eq!(a.read(reg::TIMER_CURRENT, 40), 60);
        // It expires while masked; unmasking later must not deliver the stale expiry.
        a.write(reg::LVT_TIMER, 0x41, 500);
        assert!(!a.poll_timer(600));
        assert_eq!(a.pending_vector(), None);
    }

    #[test]
    fn tsc_deadline_fires_at_the_deadline() {
        let mut a = enabled(0);
        a.write(reg::LVT_TIMER, 0x40000 | 0x50, 0);
        a.write(reg::TIMER_INITIAL, 1234, 0);
        assert_eq!(
            a.read(reg::TIMER_INITIAL, 0),
            0,
            "ignored in TSC-deadline mode"
        );
        a.write_tsc_deadline(ns_to_tsc(10_000) + 1, 0);
        assert_eq!(a.next_deadline_ns(), Some(10_001));
        assert!(!a.poll_timer(10_000));
        assert!(a.poll_timer(10_001));
        assert_eq!(a.read_tsc_deadline(), 0, "cleared when it fires");
        assert_eq!(a.ack(), Some(0x50));
        assert!(!a.poll_timer(20_000));
    }

    #[test]
    fn past_tsc_deadline_fires_at_once() {
        let mut a = enabled(0);
        a.write(reg::LVT_TIMER, 0x40000 | 0x50, 0);
        a.write_tsc_deadline(5, 1_000_000);
        assert_eq!(a.pending_vector(), Some(0x50));
        assert_eq!(a.read_tsc_deadline(), 0);
    }

    #[test]
    fn tsc_deadline_ignored_in_other_modes() {
        let mut a = enabled(0);
        a.write(reg::LVT_TIMER, 0x50, 0);
        a.write_tsc_deadline(5, 0);
        assert_eq!(a.read_tsc_deadline(), 0);
        assert!(!a.poll_timer(u64::MAX));
    }

    #[test]
    fn global_disable_hides_the_apic() {
        let mut a = enabled(0);
        a.accept(0x40, false);
        assert!(a.set_base_msr(LAPIC_DEFAULT_BASE));
        assert_eq!(a.read(reg::VERSION, 0), 0);
        assert_eq!(a.pending_vector(), None);
        assert_eq!(a.mmio_base(), None);
        assert!(a.set_base_msr(LAPIC_DEFAULT_BASE | APIC_BASE_ENABLE));
        assert_eq!(a.read(reg::SVR, 0), 0xff, "back to the power-on state");
        assert_eq!(a.mmio_base(), Some(LAPIC_DEFAULT_BASE));
        assert!(!a.set_base_msr(LAPIC_DEFAULT_BASE | 1));
        assert!(!a.set_base_msr(LAPIC_DEFAULT_BASE | APIC_BASE_X2APIC));
    }

    #[test]
    fn x2apic_msrs() {
        let mut a = enabled(0x13);
        assert_eq!(a.read_msr(0x802, 0), None, "not in x2APIC mode");
        assert!(a.set_base_msr(LAPIC_DEFAULT_BASE | APIC_BASE_ENABLE | APIC_BASE_X2APIC));
        assert_eq!(a.read(reg::VERSION, 0), 0, "MMIO gone");
        assert_eq!(a.read_msr(0x802, 0), Some(0x13));
        assert_eq!(a.read_msr(0x80d, 0), Some((1 << 16) | (1 << 3)));
        assert_eq!(a.read_msr(0x803, 0), Some(0x50014));
        assert_eq!(a.write_msr(0x802, 5, 0), None, "ID is read-only");
        assert_eq!(a.write_msr(0x80b, 1, 0), None, "EOI must be 0");
        let e = a.write_msr(0x830, (7u64 << 32) | 0x4041, 0).unwrap();
        let ApicEffect::Ipi(req) = e else { panic!() };
        assert_eq!((req.dest, req.vector), (7, 0x41));
        let e = a.write_msr(0x83f, 0x42, 0).unwrap();
        let ApicEffect::Ipi(req) = e else { panic!() };
        assert!(a.accepts_ipi(&req, true));
        a.deliver_ipi(&req);
        assert_eq!(a.ack(), Some(0x42));
        assert_eq!(a.write_msr(0x80b, 0, 0), Some(ApicEffect::None));
        assert!(
            !a.set_base_msr(LAPIC_DEFAULT_BASE | APIC_BASE_ENABLE),
            "x2APIC → xAPIC"
        );
    }

    #[test]
    fn lint_nmi() {
        let mut a = enabled(0);
        a.write(reg::LVT_LINT1, 0x400, 0);
        a.lint(1, true);
        assert!(a.take_nmi());
        a.lint(1, true);
        assert!(!a.take_nmi(), "level held: no new edge");
        a.lint(7, true);
    }

    #[test]
    fn state_round_trips() {
        let mut a = enabled(2);
        a.write(reg::LVT_TIMER, 0x20000 | 0x40, 0);
        a.write(reg::TIMER_INITIAL, 1_000_000, 0);
        a.accept(0x77, true);
        let b = LocalApic::from_state(a.state());
        assert_eq!(b.state(), a.state());
        assert_eq!(b.next_deadline_ns(), a.next_deadline_ns());
    }

    #[test]
    fn hostile_register_values_do_not_panic() {
        let mut a = enabled(0xffff_ffff);
        for off in (0..0x1000u32).step_by(4) {
            for v in [0u32, 1, 0xff, 0x10000, 0x20000, 0x40000, 0x60000, u32::MAX] {
                let _ = a.write(off, v, u64::from(off) * 7);
                let _ = a.read(off, u64::MAX);
                let _ = a.poll_timer(u64::MAX);
            }
        }
        a.set_base_msr(LAPIC_DEFAULT_BASE | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        for msr in 0x800..=0x8ff {
            for v in [0u64, u64::MAX, 0xffff_ffff] {
                let _ = a.write_msr(msr, v, u64::MAX);
                let _ = a.read_msr(msr, 0);
            }
        }
        a.write_tsc_deadline(u64::MAX, u64::MAX);
        let _ = a.next_deadline_ns();
        let _ = a.current_count(0);
    }
}
