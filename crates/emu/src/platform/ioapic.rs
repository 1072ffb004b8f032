//! The I/O APIC (Intel 82093AA datasheet): 24 input pins at 0xfec00000, version 0x11.
//!
//! Registers are reached indirectly: IOREGSEL (offset 0x00) selects, IOWIN (offset 0x10) reads or
//! writes the selected 32-bit register: 0x00 ID, 0x01 version (0x170011: 24 entries, version
//! 0x11, so no EOI register: Linux relies on the local APICs' EOI broadcast), 0x02 arbitration,
//! 0x10 + 2n / 0x11 + 2n the low/high halves of pin n's redirection entry. All pins are masked
//! at reset.
//!
//! Pins are driven with [`IoApic::set_irq`] (a line level: `true` = asserted, whatever the
//! entry's polarity bit says; the polarity is stored for the guest but not applied) or
//! [`IoApic::pulse`] (an edge, as the serial port's irqfd-style interrupts are). An
//! edge-triggered pin delivers on each rising edge while unmasked; an edge while masked is lost.
//! A level-triggered pin delivers while asserted, unmasked and Remote-IRR clear, and sets
//! Remote-IRR; [`IoApic::eoi`] (the local APIC's EOI broadcast) clears Remote-IRR and delivers
//! again if the line is still asserted. Each delivery is an [`MsiMessage`] the VM routes to the
//! local APICs. Delivery is immediate, so the delivery-status bit always reads 0.

pub use super::msi::{DeliveryMode, MsiMessage};

/// Default guest-physical address of the register window.
pub const IOAPIC_DEFAULT_BASE: u64 = 0xfec0_0000;
/// Size of the register window.
pub const IOAPIC_WINDOW_LEN: u64 = 0x20;
/// Number of input pins (GSIs 0–23).
pub const IOAPIC_NUM_PINS: usize = 24;
/// The version register: max redirection entry 23, version 0x11.
pub const IOAPIC_VERSION: u32 = 0x0017_0011;

/// MMIO offsets.
pub const IOREGSEL: u32 = 0x00;
pub const IOWIN: u32 = 0x10;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_REDIR_FIRST: u32 = 0x10;
const REG_REDIR_LAST: u32 = REG_REDIR_FIRST + 2 * IOAPIC_NUM_PINS as u32 - 1;

/// Redirection entry bits.
pub const RTE_DEST_LOGICAL: u64 = 1 << 11;
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
pub const RTE_LEVEL: u64 = 1 << 15;
pub const RTE_MASKED: u64 = 1 << 16;
/// Guest-writable bits of the low half: vector, delivery mode, destination mode, polarity,
/// trigger mode, mask (delivery status and Remote-IRR are read-only).
const RTE_LOW_WRITABLE: u64 = 0x1_afff;
/// Guest-writable bits of the high half: the 8-bit destination in bits 63:56.
const RTE_HIGH_WRITABLE: u64 = 0xff00_0000_0000_0000;

/// The I/O APIC's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoApicState {
    /// ID register (ID in bits 27:24).
    pub id: u32,
    pub ioregsel: u32,
    pub redirection: [u64; IOAPIC_NUM_PINS],
    /// Bit n: pin n's line is asserted.
    pub line_levels: u32,
}

impl Default for IoApicState {
    fn default() -> Self {
        IoApicState {
            id: 0,
            ioregsel: 0,
            redirection: [RTE_MASKED; IOAPIC_NUM_PINS],
            line_levels: 0,
        }
    }
}

/// Messages produced by one I/O APIC operation (at most one per pin), without allocating.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deliveries {
    len: usize,
    items: [MsiMessage; IOAPIC_NUM_PINS],
}

impl Deliveries {
    fn push(&mut self, m: MsiMessage) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = m;
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &MsiMessage> {
        self.items.iter().take(self.len)
    }
}

impl IntoIterator for Deliveries {
    type Item = MsiMessage;
    type IntoIter = std::iter::Take<std::array::IntoIter<MsiMessage, IOAPIC_NUM_PINS>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter().take(self.len)
    }
}

/// The I/O APIC.
#[derive(Clone, Debug, Default)]
pub struct IoApic {
    s: IoApicState,
}

impl IoApic {
    /// An I/O APIC with ID 0, all pins masked.
    pub fn new() -> Self {
        Self::default()
    }

    /// An I/O APIC with the given ID (the platform's MADT says the vCPU count).
    pub fn with_id(id: u8) -> Self {
        let mut a = Self::new();
        a.s.id = (u32::from(id) & 0xf) << 24;
        a
    }

    /// Back to the reset state, keeping the ID and the line levels (wires stay as driven).
    pub fn reset(&mut self) {
        let id = self.s.id;
        let line_levels = self.s.line_levels;
        self.s = IoApicState {
            id,
            line_levels,
            ..Default::default()
        };
    }

    pub fn state(&self) -> IoApicState {
        self.s.clone()
    }

    pub fn from_state(state: IoApicState) -> Self {
        IoApic { s: state }
    }

    /// Pin `pin`'s redirection entry.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.s.redirection.get(pin).copied()
    }

    /// A 32-bit read at `offset` in the window; other offsets read 0.
    pub fn read(&self, offset: u32) -> u32 {
        match offset {
            IOREGSEL => self.s.ioregsel,
            IOWIN => self.read_reg(self.s.ioregsel),
            _ => 0,
        }
    }

    /// A 32-bit write at `offset` in the window. Changing a redirection entry so that a
    /// level-triggered, asserted pin becomes deliverable (typically unmasking it) delivers.
    pub fn write(&mut self, offset: u32, value: u32) -> Option<MsiMessage> {
        match offset {
            IOREGSEL => {
                self.s.ioregsel = value & 0xff;
                None
            }
            IOWIN => self.write_reg(self.s.ioregsel, value),
            _ => None,
        }
    }

    fn read_reg(&self, index: u32) -> u32 {
        match index {
            REG_ID => self.s.id,
            REG_VERSION => IOAPIC_VERSION,
            REG_ARB => self.s.id,
            REG_REDIR_FIRST..=REG_REDIR_LAST => {
                let i = index - REG_REDIR_FIRST;
                let rte = self.s.redirection[(i / 2) as usize];
                if i & 1 == 0 {
                    rte as u32
                } else {
                    (rte >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, index: u32, value: u32) -> Option<MsiMessage> {
        match index {
            REG_ID => {
                self.s.id = value & 0x0f00_0000;
                None
            }
            REG_REDIR_FIRST..=REG_REDIR_LAST => {
                let i = index - REG_REDIR_FIRST;
                let pin = (i / 2) as usize;
                let old = self.s.redirection[pin];
                let new = if i & 1 == 0 {
                    let mut low = u64::from(value) & RTE_LOW_WRITABLE;
                    // Remote-IRR is read-only, and meaningless for an edge-triggered pin.
                    if low & RTE_LEVEL != 0 {
                        low |= old & RTE_REMOTE_IRR;
                    }
                    (old & !0xffff_ffff) | low
                } else {
                    (old & 0xffff_ffff) | ((u64::from(value) << 32) & RTE_HIGH_WRITABLE)
                };
                self.s.redirection[pin] = new;
                self.service_level(pin)
            }
            _ => None,
        }
    }

    /// Delivers a level-triggered pin if it is asserted, unmasked and Remote-IRR is clear.
    fn service_level(&mut self, pin: usize) -> Option<MsiMessage> {
        let rte = *self.s.redirection.get(pin)?;
        let asserted = self.s.line_levels & (1 << pin) != 0;
        if rte & RTE_LEVEL == 0 || rte & (RTE_MASKED | RTE_REMOTE_IRR) != 0 || !asserted {
            return None;
        }
        self.s.redirection[pin] |= RTE_REMOTE_IRR;
        Some(Self::message(rte))
    }

    fn message(rte: u64) -> MsiMessage {
        MsiMessage {
            dest: (rte >> 56) as u32,
            logical: rte & RTE_DEST_LOGICAL != 0,
            delivery_mode: DeliveryMode::from_bits((rte >> 8) as u32),
            vector: rte as u8,
            level_triggered: rte & RTE_LEVEL != 0,
        }
    }

    /// Drives pin `pin` (a GSI) to `level`. Returns the message to deliver, if any. Pins beyond
    /// 23 are ignored.
    pub fn set_irq(&mut self, pin: u32, level: bool) -> Option<MsiMessage> {
        let p = usize::try_from(pin).ok().filter(|&p| p < IOAPIC_NUM_PINS)?;
        let mask = 1u32 << p;
        let was = self.s.line_levels & mask != 0;
        if level {
            self.s.line_levels |= mask;
        } else {
            self.s.line_levels &= !mask;
        }
        let rte = self.s.redirection[p];
        if rte & RTE_LEVEL != 0 {
            return self.service_level(p);
        }
        (level && !was && rte & RTE_MASKED == 0).then(|| Self::message(rte))
    }

    /// An edge on pin `pin`: asserts and de-asserts it. For an edge-triggered pin this delivers
    /// once (if unmasked); for a level-triggered pin it delivers if Remote-IRR is clear, and
    /// nothing is re-delivered after the EOI since the line is low again.
    pub fn pulse(&mut self, pin: u32) -> Option<MsiMessage> {
        let m = self.set_irq(pin, true);
        self.set_irq(pin, false);
        m
    }

    /// EOI broadcast for `vector`: clears Remote-IRR of the level-triggered pins with that
    /// vector and re-delivers those still asserted.
    pub fn eoi(&mut self, vector: u8) -> Deliveries {
        let mut out = Deliveries::default();
        for pin in 0..IOAPIC_NUM_PINS {
            let rte = self.s.redirection[pin];
            if rte as u8 != vector || rte & RTE_REMOTE_IRR == 0 {
                continue;
            }
            self.s.redirection[pin] &= !RTE_REMOTE_IRR;
            if let Some(m) = self.service_level(pin) {
                out.push(m);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut IoApic, pin: u32, low: u32, high: u32) -> Option<MsiMessage> {
        io.write(IOREGSEL, 0x11 + 2 * pin);
        io.write(IOWIN, high);
        io.write(IOREGSEL, 0x10 + 2 * pin);
        io.write(IOWIN, low)
    }

    #[test]
    fn registers_after_reset() {
        let mut io = IoApic::with_id(4);
        io.write(IOREGSEL, 0);
        assert_eq!(io.read(IOWIN), 4 << 24);
        io.write(IOREGSEL, 1);
        assert_eq!(io.read(IOWIN), 0x0017_0011);
        assert_eq!(io.read(IOREGSEL), 1);
        for pin in 0..24 {
            io.write(IOREGSEL, 0x10 + 2 * pin);
            assert_eq!(io.read(IOWIN), 1 << 16);
        }
        io.write(IOREGSEL, 0x40);
        assert_eq!(io.read(IOWIN), 0);
    }

    #[test]
    fn masked_pins_deliver_nothing() {
        let mut io = IoApic::new();
        assert_eq!(io.set_irq(4, true), None);
        assert_eq!(io.pulse(4), None);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edges() {
        let mut io = IoApic::new();
        program(&mut io, 4, 0x24, 1 << 24);
        let m = io.set_irq(4, true).unwrap();
        assert_eq!(
            (m.vector, m.dest, m.logical, m.level_triggered),
            (0x24, 1, false, false)
        );
        assert_eq!(io.set_irq(4, true), None, "still high: no edge");
        io.set_irq(4, false);
        assert!(io.pulse(4).is_some());
        assert!(io.pulse(4).is_some());
        assert!(io.eoi(0x24).is_empty());
    }

    #[test]
    fn level_pin_redelivers_after_eoi_only_while_asserted() {
        let mut io = IoApic::new();
        program(&mut io, 9, 0x8000 | 0x800 | 0x31, 0xff << 24);
        let m = io.set_irq(9, true).unwrap();
        assert!(m.level_triggered && m.logical);
        io.write(IOREGSEL, 0x10 + 18);
        assert_ne!(io.read(IOWIN) & (1 << 14), 0, "Remote-IRR set");
        assert_eq!(io.set_irq(9, true), None, "Remote-IRR blocks");
        let again: Vec<_> = io.eoi(0x31).into_iter().collect();
        assert_eq!(again, vec![m], "still asserted: delivered again");
        io.set_irq(9, false);
        assert!(io.eoi(0x31).is_empty(), "de-asserted: nothing more");
        assert_eq!(io.read(IOWIN) & (1 << 14), 0);
        assert!(io.eoi(0x31).is_empty());
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let mut io = IoApic::new();
        program(&mut io, 5, 0x1_8000 | 0x40, 0);
        assert_eq!(io.set_irq(5, true), None);
        let m = program(&mut io, 5, 0x8000 | 0x40, 0).unwrap();
        assert_eq!(m.vector, 0x40);
        // Rewriting the entry while Remote-IRR is set delivers nothing new.
        assert_eq!(program(&mut io, 5, 0x8000 | 0x40, 0), None);
    }

    #[test]
    fn read_only_bits_stay() {
        let mut io = IoApic::new();
        program(&mut io, 0, 0xffff_ffff, 0xffff_ffff);
        io.write(IOREGSEL, 0x10);
        assert_eq!(io.read(IOWIN), 0x1_afff);
        io.write(IOREGSEL, 0x11);
        assert_eq!(io.read(IOWIN), 0xff00_0000);
        io.write(IOREGSEL, 1);
        io.write(IOWIN, 0);
        assert_eq!(io.read(IOWIN), IOAPIC_VERSION);
    }

    #[test]
    fn hostile_values_do_not_panic() {
        let mut io = IoApic::new();
        for sel in 0..=0xffu32 {
            io.write(IOREGSEL, sel);
            io.write(IOWIN, u32::MAX);
            let _ = io.read(IOWIN);
        }
        for pin in [0, 23, 24, u32::MAX] {
            let _ = io.set_irq(pin, true);
            let _ = io.pulse(pin);
        }
        for v in 0..=255 {
            let _ = io.eoi(v);
        }
        let copy = IoApic::from_state(io.state());
        assert_eq!(copy.state(), io.state());
    }
}
