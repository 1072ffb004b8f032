//! The hardware-reduced ACPI registers of `docs/platform.md`: sleep control, sleep status and
//! reset, three byte-wide I/O ports.
//!
//! The constants are the contract with the ACPI tables (FADT and `\_S5_`), which are built from
//! them elsewhere.

use std::fmt;
use std::sync::Arc;

use crate::{BusDevice, GuestEvent, GuestEventSink};

/// The FADT sleep control register: an 8-bit I/O port.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// The FADT sleep status register: an 8-bit I/O port; reads 0.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// The FADT reset register: an 8-bit I/O port.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// The FADT reset value: writing it to [`ACPI_RESET_PORT`] resets the machine.
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// Length of the one bus range, starting at [`ACPI_SLEEP_CONTROL_PORT`], that [`AcpiPm`] covers.
pub const ACPI_PM_PORT_LEN: u64 = 3;

/// `SLP_EN`, bit 5 of the sleep control register: enter the sleep state in `SLP_TYP`.
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// Position of `SLP_TYP` (bits 2–4) in the sleep control register.
pub const SLEEP_TYPE_SHIFT: u8 = 2;
/// `SLP_TYP` mask, after shifting by [`SLEEP_TYPE_SHIFT`].
pub const SLEEP_TYPE_MASK: u8 = 0b111;
/// `SLP_TYP` of S5 (soft off); the DSDT's `\_S5_` package must carry this value.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The byte a guest writes to the sleep control register to power off: `0x34`.
pub const S5_SLEEP_CONTROL_VALUE: u8 = SLEEP_ENABLE | (S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT);

const SLEEP_CONTROL_OFFSET: u64 = 0;
const SLEEP_STATUS_OFFSET: u64 = (ACPI_SLEEP_STATUS_PORT - ACPI_SLEEP_CONTROL_PORT) as u64;
const RESET_OFFSET: u64 = (ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT) as u64;

/// The ACPI power-management registers, inserted at [`ACPI_SLEEP_CONTROL_PORT`] with length
/// [`ACPI_PM_PORT_LEN`].
///
/// - offset 0, sleep control: a write with [`SLEEP_ENABLE`] and `SLP_TYP` ==
///   [`S5_SLEEP_TYPE`] reports [`GuestEvent::PowerOff`]; other sleep types are ignored;
/// - offset 1, sleep status: reads 0, writes ignored;
/// - offset 2, reset: a write of [`ACPI_RESET_VALUE`] reports [`GuestEvent::Reset`].
///
/// All registers read 0; accesses wider than a byte read `0xff` and are otherwise ignored.
pub struct AcpiPm {
    events: Arc<dyn GuestEventSink>,
}

impl AcpiPm {
    /// Registers that report power-off and reset to `events`.
    pub fn new(events: Arc<dyn GuestEventSink>) -> Self {
        AcpiPm { events }
    }

    fn write_sleep_control(&self, value: u8) {
        if value & SLEEP_ENABLE == 0 {
            return;
        }
        match (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK {
            S5_SLEEP_TYPE => {
                tracing::debug!("ACPI: guest entered S5");
                self.events.notify(GuestEvent::PowerOff);
            }
            sleep_type => tracing::debug!(sleep_type, "ACPI: unsupported sleep type ignored"),
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (SLEEP_CONTROL_OFFSET | SLEEP_STATUS_OFFSET | RESET_OFFSET, 1) => 0,
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (SLEEP_CONTROL_OFFSET, &[value]) => self.write_sleep_control(value),
            (RESET_OFFSET, &[ACPI_RESET_VALUE]) => {
                tracing::debug!("ACPI: guest wrote the reset register");
                self.events.notify(GuestEvent::Reset);
            }
            _ => tracing::trace!(offset, len = data.len(), "ACPI: write ignored"),
        }
    }
}

impl fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcpiPm").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingSink;

    fn acpi() -> (AcpiPm, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (AcpiPm::new(sink.clone()), sink)
    }

    #[test]
    fn constants_match_platform_contract() {
        assert_eq!(S5_SLEEP_CONTROL_VALUE, 0x34);
        assert_eq!(SLEEP_STATUS_OFFSET, 1);
        assert_eq!(RESET_OFFSET, 2);
        assert_eq!(
            u64::from(ACPI_SLEEP_CONTROL_PORT) + ACPI_PM_PORT_LEN - 1,
            u64::from(ACPI_RESET_PORT)
        );
    }

    #[test]
    fn s5_with_sleep_enable_powers_off() {
        let (mut dev, sink) = acpi();
        dev.write(SLEEP_CONTROL_OFFSET, &[0x34]);
        assert_eq!(sink.events(), vec![GuestEvent::PowerOff]);
    }

    #[test]
    fn s5_ignores_bits_outside_type_and_enable() {
        let (mut dev, sink) = acpi();
        dev.write(SLEEP_CONTROL_OFFSET, &[0x34 | 0xc3]);
        assert_eq!(sink.events(), vec![GuestEvent::PowerOff]);
    }

    #[test]
    fn s5_without_sleep_enable_does_nothing() {
        let (mut dev, sink) = acpi();
        dev.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT]);
        assert!(sink.events().is_empty());
    }

    #[test]
    fn other_sleep_types_are_ignored() {
        let (mut dev, sink) = acpi();
        for sleep_type in (0..=SLEEP_TYPE_MASK).filter(|&t| t != S5_SLEEP_TYPE) {
            dev.write(
                SLEEP_CONTROL_OFFSET,
                &[SLEEP_ENABLE | (sleep_type << SLEEP_TYPE_SHIFT)],
            );
        }
        assert!(sink.events().is_empty());
    }

    #[test]
    fn reset_value_resets() {
        let (mut dev, sink) = acpi();
        dev.write(RESET_OFFSET, &[ACPI_RESET_VALUE]);
        assert_eq!(sink.events(), vec![GuestEvent::Reset]);
    }

    #[test]
    fn other_reset_values_are_ignored() {
        let (mut dev, sink) = acpi();
        for value in [0x00, 0x02, 0x06, 0xff] {
            dev.write(RESET_OFFSET, &[value]);
        }
        assert!(sink.events().is_empty());
    }

    #[test]
    fn sleep_status_reads_zero_and_ignores_writes() {
        let (mut dev, sink) = acpi();
        dev.write(SLEEP_STATUS_OFFSET, &[0x34]);
        dev.write(SLEEP_STATUS_OFFSET, &[ACPI_RESET_VALUE]);
        let mut data = [0xaau8; 1];
        dev.read(SLEEP_STATUS_OFFSET, &mut data);
        assert_eq!(data, [0]);
        assert!(sink.events().is_empty());
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let (mut dev, sink) = acpi();
        dev.write(SLEEP_CONTROL_OFFSET, &[0x34, 0x00]);
        dev.write(RESET_OFFSET, &[ACPI_RESET_VALUE, 0]);
        let mut data = [0u8; 2];
        dev.read(SLEEP_CONTROL_OFFSET, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert!(sink.events().is_empty());
    }

    #[test]
    fn works_through_the_bus() {
        let (dev, sink) = acpi();
        let bus = crate::bus::Bus::new();
        bus.insert(
            Arc::new(std::sync::Mutex::new(dev)),
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            ACPI_PM_PORT_LEN,
        )
        .unwrap();
        bus.write(u64::from(ACPI_RESET_PORT), &[ACPI_RESET_VALUE])
            .unwrap();
        bus.write(
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            &[S5_SLEEP_CONTROL_VALUE],
        )
        .unwrap();
        assert_eq!(sink.events(), vec![GuestEvent::Reset, GuestEvent::PowerOff]);
    }
}
