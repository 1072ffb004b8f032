//! Interrupt messages on the (virtual) APIC bus: what an I/O APIC redirection entry, a PCI
//! MSI/MSI-X write or an IPI asks the local APICs to do.
//!
//! The VM routes a [`MsiMessage`] by offering it to every local APIC whose
//! `LocalApic::accepts(dest, logical)` is true and calling `LocalApic::deliver` on it (for
//! lowest priority, on one of them only, e.g. the first).

/// The "delivery mode" field (3 bits) of ICR, LVT, redirection entries and MSI data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    #[default]
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
    /// Encoding 3, reserved: delivered nowhere.
    Reserved,
}

impl DeliveryMode {
    /// Decodes the low three bits of `bits`.
    pub fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            3 => DeliveryMode::Reserved,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            _ => DeliveryMode::ExtInt,
        }
    }

    /// The 3-bit encoding.
    pub fn bits(self) -> u32 {
        match self {
            DeliveryMode::Fixed => 0,
            DeliveryMode::LowestPriority => 1,
            DeliveryMode::Smi => 2,
            DeliveryMode::Reserved => 3,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::StartUp => 6,
            DeliveryMode::ExtInt => 7,
        }
    }
}

/// One interrupt message for the local APICs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Destination: an APIC ID (physical) or a logical mask; 0xff (xAPIC) is a broadcast.
    pub dest: u32,
    /// Logical destination mode (matched against LDR/DFR); else physical (an APIC ID).
    pub logical: bool,
    pub delivery_mode: DeliveryMode,
    pub vector: u8,
    /// Level-triggered: sets the TMR bit, and its EOI is broadcast to the I/O APIC.
    pub level_triggered: bool,
}

impl MsiMessage {
    /// Decodes a PCI MSI address/data pair (address `0xfeeX_XXXX`: destination ID in bits 19:12,
    /// destination mode in bit 2; data: vector, delivery mode, trigger mode in bit 15). `None`
    /// if the address is outside the interrupt window, where the write is ordinary memory.
    pub fn from_address_data(address: u64, data: u32) -> Option<Self> {
        if address >> 20 != 0xfee {
            return None;
        }
        Some(MsiMessage {
            dest: ((address >> 12) & 0xff) as u32,
            logical: address & (1 << 2) != 0,
            delivery_mode: DeliveryMode::from_bits(data >> 8),
            vector: (data & 0xff) as u8,
            level_triggered: data & (1 << 15) != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_round_trips() {
        for b in 0..8 {
            assert_eq!(DeliveryMode::from_bits(b).bits(), b);
        }
    }

    #[test]
    fn msi_address_data_decode() {
        let m = MsiMessage::from_address_data(0xfee0_3004, 0x8000 | 0x100 | 0x41).unwrap();
        assert_eq!(m.dest, 3);
        assert!(m.logical);
        assert_eq!(m.delivery_mode, DeliveryMode::LowestPriority);
        assert_eq!(m.vector, 0x41);
        assert!(m.level_triggered);
        assert_eq!(MsiMessage::from_address_data(0x1000, 0), None);
    }
}
