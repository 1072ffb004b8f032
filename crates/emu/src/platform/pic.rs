//! The legacy dual 8259A PIC at ports 0x20/0x21 (master) and 0xa0/0xa1 (slave), with the ELCR
//! at 0x4d0/0x4d1: registers only, no interrupt delivery.
//!
//! On this platform (hardware-reduced ACPI) Linux uses its null legacy PIC and routes every
//! interrupt through the I/O APIC, and firmware or a boot loader at most masks the 8259s. So
//! this model accepts the ICW1–ICW4 initialisation sequence and OCW1–OCW3, remembers what was
//! programmed (vector bases, cascade, mode, mask, ELCR), and reads back the mask register as
//! written; IRR and ISR always read 0, a poll command reads "no interrupt", and nothing is ever
//! delivered (the LAPICs drop ExtINT). If a guest ever needs a working 8259, this is the place
//! to add it.

/// One 8259A's registers, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PicChipState {
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// Last ICW1.
    pub icw1: u8,
    /// Vector base (ICW2, bits 7:3).
    pub vector_base: u8,
    /// Cascade configuration (ICW3).
    pub icw3: u8,
    /// Mode (ICW4).
    pub icw4: u8,
    /// The next data-port write is ICW2 (2), ICW3 (3), ICW4 (4), or OCW1 (0).
    pub init_step: u8,
    /// OCW3 selected ISR (else IRR) for command-port reads.
    pub read_isr: bool,
    /// OCW3 poll command pending: the next command-port read returns the poll byte.
    pub poll: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
}

/// Both PICs and the ELCR, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PicState {
    /// Master (index 0) and slave (index 1).
    pub chips: [PicChipState; 2],
    /// Edge/level control registers (0x4d0 master, 0x4d1 slave).
    pub elcr: [u8; 2],
}

/// Bits of the ELCRs that may be set (IRQ 0, 1, 2, 8 and 13 are always edge-triggered).
const ELCR_WRITABLE: [u8; 2] = [0xf8, 0xde];

impl PicChipState {
    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1: starts initialisation; clears the mask, selects IRR reads.
            self.icw1 = value;
            self.imr = 0;
            self.read_isr = false;
            self.poll = false;
            self.special_mask = false;
            self.icw4 = 0;
            self.init_step = 2;
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            self.poll = value & 0x04 != 0;
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        }
        // OCW2 (EOI and rotation commands): nothing is ever in service.
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            2 => {
                self.vector_base = value & 0xf8;
                self.init_step = if self.icw1 & 0x02 == 0 {
                    3
                } else if self.icw1 & 0x01 != 0 {
                    4
                } else {
                    0
                };
            }
            3 => {
                self.icw3 = value;
                self.init_step = if self.icw1 & 0x01 != 0 { 4 } else { 0 };
            }
            4 => {
                self.icw4 = value;
                self.init_step = 0;
            }
            _ => self.imr = value,
        }
    }

    fn read_command(&mut self) -> u8 {
        // Poll byte: bit 7 clear = no interrupt; IRR and ISR are always empty.
        self.poll = false;
        0
    }
}

/// The dual 8259A.
#[derive(Clone, Debug, Default)]
pub struct Pic {
    s: PicState,
}

impl Pic {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn reset(&mut self) {
        *self = Self::new();
    }

    pub fn state(&self) -> PicState {
        self.s.clone()
    }

    pub fn from_state(state: PicState) -> Self {
        Pic { s: state }
    }

    /// Whether `port` belongs to the PICs or the ELCR.
    pub fn handles(port: u16) -> bool {
        matches!(port, 0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1)
    }

    /// The mask register of the master (0) or slave (1) PIC.
    pub fn imr(&self, chip: usize) -> u8 {
        self.s.chips.get(chip).map_or(0xff, |c| c.imr)
    }

    /// A byte read; foreign ports read 0xff.
    pub fn port_read(&mut self, port: u16) -> u8 {
        match port {
            0x20 => self.s.chips[0].read_command(),
            0xa0 => self.s.chips[1].read_command(),
            0x21 => self.s.chips[0].imr,
            0xa1 => self.s.chips[1].imr,
            0x4d0 => self.s.elcr[0],
            0x4d1 => self.s.elcr[1],
            _ => 0xff,
        }
    }

    /// A byte write; foreign ports are ignored.
    pub fn port_write(&mut self, port: u16, value: u8) {
        match port {
            0x20 => self.s.chips[0].write_command(value),
            0xa0 => self.s.chips[1].write_command(value),
            0x21 => self.s.chips[0].write_data(value),
            0xa1 => self.s.chips[1].write_data(value),
            0x4d0 => self.s.elcr[0] = value & ELCR_WRITABLE[0],
            0x4d1 => self.s.elcr[1] = value & ELCR_WRITABLE[1],
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_init_sequence_then_mask() {
        let mut pic = Pic::new();
        // As Linux's init_8259A: mask all, ICW1..4 on both, then restore masks.
        pic.port_write(0x21, 0xff);
        pic.port_write(0xa1, 0xff);
        pic.port_write(0x20, 0x11);
        pic.port_write(0x21, 0x30);
        pic.port_write(0x21, 0x04);
        pic.port_write(0x21, 0x01);
        pic.port_write(0xa0, 0x11);
        pic.port_write(0xa1, 0x38);
        pic.port_write(0xa1, 0x02);
        pic.port_write(0xa1, 0x01);
        let s = pic.state();
        assert_eq!(s.chips[0].vector_base, 0x30);
        assert_eq!(s.chips[1].vector_base, 0x38);
        assert_eq!(s.chips[0].icw3, 0x04);
        assert_eq!(s.chips[1].icw4, 0x01);
        pic.port_write(0x21, 0xfb);
        pic.port_write(0xa1, 0xff);
        assert_eq!(pic.port_read(0x21), 0xfb);
        assert_eq!(pic.port_read(0xa1), 0xff);
        assert_eq!(pic.imr(0), 0xfb);
    }

    #[test]
    fn irr_and_isr_read_zero() {
        let mut pic = Pic::new();
        pic.port_write(0x20, 0x0a);
        assert_eq!(pic.port_read(0x20), 0);
        pic.port_write(0x20, 0x0b);
        assert_eq!(pic.port_read(0x20), 0);
        pic.port_write(0x20, 0x0c); // poll
        assert_eq!(pic.port_read(0x20), 0);
        pic.port_write(0x20, 0x20); // EOI: accepted, no effect
    }

    #[test]
    fn single_mode_without_icw4_skips_steps() {
        let mut pic = Pic::new();
        pic.port_write(0x20, 0x12); // single, no ICW4
        pic.port_write(0x21, 0x08);
        pic.port_write(0x21, 0x5a); // OCW1 now
        assert_eq!(pic.port_read(0x21), 0x5a);
    }

    #[test]
    fn elcr_keeps_writable_bits() {
        let mut pic = Pic::new();
        pic.port_write(0x4d0, 0xff);
        pic.port_write(0x4d1, 0xff);
        assert_eq!(pic.port_read(0x4d0), 0xf8);
        assert_eq!(pic.port_read(0x4d1), 0xde);
        assert_eq!(pic.port_read(0x1234), 0xff);
    }
}
