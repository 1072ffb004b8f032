//! The CMOS real-time clock of a PC (MC146818-compatible), so that guests read the date at boot
//! and `hwclock` works.
//!
//! The guest writes a register number to the index port [`RTC_INDEX_PORT`] (bit 7, NMI disable
//! on a PC, is ignored) and reads or writes the register through the data port
//! [`RTC_DATA_PORT`]. The 128 registers:
//!
//! - `0x00`–`0x09` and the century at [`REG_CENTURY`]: seconds, alarm seconds, minutes, alarm
//!   minutes, hours, alarm hours, day of week (1 = Sunday), day of month, month, year (two
//!   digits). The time and date come from the wall clock the VMM passes in; the day of week is
//!   derived from the date. The alarm registers are plain storage: the alarm never fires.
//! - Status A (`0x0a`): UIP (bit 7) reads 1 during the last 244 µs of each second, as on the
//!   real part, and is read-only; the divider and rate bits read back what was written but
//!   change nothing.
//! - Status B (`0x0b`, initially 24-hour BCD): DM (binary, bit 2) and 24/12 (bit 1) select how
//!   time registers are encoded on both reads and writes; in 12-hour mode bit 7 of the hours
//!   is PM. SET (bit 7) freezes the time registers so the guest can write a new time; clearing
//!   it starts the clock from that time (Linux's `hwclock --systohc` works this way). A time
//!   register written without SET takes effect at once, unless it would make the date invalid
//!   (the real part would store it anyway). A time that is not a valid date is ignored. The
//!   interrupt-enable bits are stored, and daylight-saving (bit 0) is ignored.
//! - Status C (`0x0c`): reads 0 (reading clears it, and no interrupt flag is ever set).
//! - Status D (`0x0d`): reads `0x80`, "RAM and time valid".
//! - Everything else is battery-backed RAM: plain storage, zero at power-on.
//!
//! The device raises no interrupts, although the ACPI tables describe IRQ 8 for it as PCs do:
//! alarms, update-ended and periodic interrupts are not modelled. Linux's `rtc_cmos` driver
//! needs none of them to read and set the time.
//!
//! Setting the time moves the guest's clock only: the device keeps the difference between the
//! time the guest set and the wall clock, and later reads advance from the set time.

mod calendar;

use std::fmt;

use crate::{BusDevice, StateError};
use calendar::DateTime;

/// The index port: the guest writes the register number here.
pub const RTC_INDEX_PORT: u16 = 0x70;
/// The data port: the selected register is read and written here.
pub const RTC_DATA_PORT: u16 = 0x71;
/// Length of the one bus range covering both ports, starting at [`RTC_INDEX_PORT`].
pub const RTC_PORT_LEN: u64 = 2;
/// The ISA IRQ the ACPI tables give the RTC, as on a PC. The device never raises it.
pub const RTC_IRQ: u8 = 8;
/// The century register, where PC firmware keeps it. Our FADT leaves its `CENTURY` field 0, so
/// Linux ignores this register and takes years 00–69 as 20xx; the device still keeps it, and
/// uses it when the guest sets the time.
pub const REG_CENTURY: u8 = 0x32;
/// Bytes of CMOS RAM, registers included.
pub const CMOS_LEN: usize = 128;

/// Where the device gets the time: Unix time in nanoseconds, as the guest should see it.
/// Called on the vCPU thread for every read of a time register, so it must be cheap.
pub type WallClock = Box<dyn Fn() -> u64 + Send>;

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = (RTC_DATA_PORT - RTC_INDEX_PORT) as u64;
/// The index port's bit 7 gates NMIs on a PC; the low 7 bits select the register.
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

/// The registers the clock drives, in the order of [`TimeRegs`].
const TIME_REGS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];
/// The raw bytes of [`TIME_REGS`], in the encoding register B selects.
type TimeRegs = [u8; TIME_REGS.len()];

/// Status A: update in progress (read-only).
const A_UIP: u8 = 0x80;
/// Status A at power-on, as PC firmware leaves it: 32.768 kHz time base, 1024 Hz rate.
const A_INITIAL: u8 = 0x26;
/// Status B: updates inhibited while the guest sets the time.
const B_SET: u8 = 0x80;
/// Status B: time registers in binary rather than BCD.
const B_BINARY: u8 = 0x04;
/// Status B: 24-hour rather than 12-hour mode.
const B_24_HOUR: u8 = 0x02;
/// Status B at power-on: 24-hour mode, BCD.
const B_INITIAL: u8 = B_24_HOUR;
/// Status D: RAM and time valid (the battery is good).
const D_VALID: u8 = 0x80;
/// Hours register in 12-hour mode: PM.
const HOUR_PM: u8 = 0x80;

const NS_PER_SEC: i128 = 1_000_000_000;
/// How long before each second's update UIP reads 1.
const UIP_NS: i128 = 244_000;

/// The CMOS RTC and its RAM. See the [module documentation](self).
pub struct Rtc {
    clock: WallClock,
    /// The guest's time minus the wall clock's, in nanoseconds; zero until the guest sets the
    /// time. `i128` holds any difference the registers can express (years 0 to 9999).
    offset_ns: i128,
    /// The register the next data-port access reaches.
    index: u8,
    /// Every register's storage. The time registers' bytes are used only while SET freezes
    /// them; otherwise they are computed from the clock on each read.
    cmos: [u8; CMOS_LEN],
}

/// An [`Rtc`]'s registers, as a snapshot stores them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtcState {
    /// The guest's time minus the wall clock's, in nanoseconds, as a decimal string (it can
    /// exceed 64 bits).
    pub offset_ns: String,
    pub index: u8,
    /// All [`CMOS_LEN`] registers.
    pub cmos: Vec<u8>,
}

impl Rtc {
    /// The registers and the guest's offset from the wall clock, for a snapshot.
    pub fn save_state(&self) -> RtcState {
        RtcState {
            offset_ns: self.offset_ns.to_string(),
            index: self.index,
            cmos: self.cmos.to_vec(),
        }
    }

    /// Puts back what [`save_state`](Rtc::save_state) returned. The clock keeps running from
    /// the wall clock this RTC was made with: a restored guest's RTC shows the time now (plus
    /// the offset the guest had set), not the time of the snapshot.
    pub fn restore_state(&mut self, state: &RtcState) -> Result<(), StateError> {
        let bad = |why: String| StateError::new("rtc", why);
        let offset_ns = state
            .offset_ns
            .parse::<i128>()
            .map_err(|e| bad(format!("offset_ns {:?}: {e}", state.offset_ns)))?;
        let cmos: [u8; CMOS_LEN] = state.cmos.as_slice().try_into().map_err(|_| {
            bad(format!(
                "{} CMOS bytes, expected {CMOS_LEN}",
                state.cmos.len()
            ))
        })?;
        self.offset_ns = offset_ns;
        self.index = state.index;
        self.cmos = cmos;
        Ok(())
    }

    /// An RTC showing the time `clock` gives, in 24-hour BCD mode, with its RAM cleared.
    pub fn new(clock: WallClock) -> Self {
        let mut cmos = [0u8; CMOS_LEN];
        cmos[usize::from(REG_A)] = A_INITIAL;
        cmos[usize::from(REG_B)] = B_INITIAL;
        cmos[usize::from(REG_D)] = D_VALID;
        Rtc {
            clock,
            offset_ns: 0,
            index: 0,
            cmos,
        }
    }

    fn reg(&self, reg: u8) -> u8 {
        self.cmos[usize::from(reg & INDEX_MASK)]
    }

    fn set_reg(&mut self, reg: u8, value: u8) {
        self.cmos[usize::from(reg & INDEX_MASK)] = value;
    }

    /// Whether SET freezes the time registers.
    fn frozen(&self) -> bool {
        self.reg(REG_B) & B_SET != 0
    }

    /// The guest's current time in nanoseconds since the Unix epoch.
    fn now_ns(&self) -> i128 {
        i128::from((self.clock)()) + self.offset_ns
    }

    fn read_register(&self, reg: u8) -> u8 {
        if let Some(pos) = TIME_REGS.iter().position(|&r| r == reg) {
            if self.frozen() {
                return self.reg(reg);
            }
            return self.encode_time(&DateTime::from_unix(unix_secs(self.now_ns())))[pos];
        }
        match reg {
            REG_A => {
                let second_ends = self.now_ns().rem_euclid(NS_PER_SEC) >= NS_PER_SEC - UIP_NS;
                let uip = if second_ends && !self.frozen() {
                    A_UIP
                } else {
                    0
                };
                (self.reg(REG_A) & !A_UIP) | uip
            }
            // No interrupt flag is ever raised, so there is nothing to clear.
            REG_C => 0,
            REG_D => D_VALID,
            _ => self.reg(reg),
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        if let Some(pos) = TIME_REGS.iter().position(|&r| r == reg) {
            if self.frozen() {
                // Takes effect when SET is cleared.
                self.set_reg(reg, value);
                return;
            }
            // The clock runs: change this one field of the current time, keeping the fraction
            // of the second.
            let now_ns = self.now_ns();
            let now = unix_secs(now_ns);
            let mut regs = self.encode_time(&DateTime::from_unix(now));
            regs[pos] = value;
            match self.decode_time(&regs) {
                Some(secs) => self.offset_ns += i128::from(secs - now) * NS_PER_SEC,
                None => tracing::debug!(reg, value, "rtc: invalid time register write ignored"),
            }
            return;
        }
        match reg {
            REG_A => self.set_reg(REG_A, value & !A_UIP),
            REG_B => self.write_b(value),
            REG_C | REG_D => tracing::trace!(reg, value, "rtc: write to read-only register"),
            _ => self.set_reg(reg, value),
        }
    }

    fn write_b(&mut self, value: u8) {
        let was_frozen = self.frozen();
        self.set_reg(REG_B, value);
        match (was_frozen, self.frozen()) {
            (false, true) => {
                // Freeze the current time, encoded as the new mode says, for the guest to read
                // or overwrite.
                let regs = self.encode_time(&DateTime::from_unix(unix_secs(self.now_ns())));
                for (reg, byte) in TIME_REGS.into_iter().zip(regs) {
                    self.set_reg(reg, byte);
                }
            }
            (true, false) => {
                // Restart the clock from the registers, at the start of their second.
                let mut regs = [0u8; TIME_REGS.len()];
                for (byte, reg) in regs.iter_mut().zip(TIME_REGS) {
                    *byte = self.reg(reg);
                }
                match self.decode_time(&regs) {
                    Some(secs) => {
                        self.offset_ns = i128::from(secs) * NS_PER_SEC - i128::from((self.clock)());
                        tracing::debug!(secs, "rtc: the guest set the time");
                    }
                    None => tracing::debug!(?regs, "rtc: invalid time set by the guest ignored"),
                }
            }
            _ => {}
        }
    }

    fn binary(&self) -> bool {
        self.reg(REG_B) & B_BINARY != 0
    }

    fn hours_24(&self) -> bool {
        self.reg(REG_B) & B_24_HOUR != 0
    }

    /// The time registers' bytes for `t` in the current mode.
    fn encode_time(&self, t: &DateTime) -> TimeRegs {
        let enc = |v: u8| encode(v, self.binary());
        let hours = if self.hours_24() {
            enc(t.hour)
        } else {
            let pm = if t.hour >= 12 { HOUR_PM } else { 0 };
            // 0:xx is 12:xx AM and 12:xx is 12:xx PM.
            let hour = match t.hour % 12 {
                0 => 12,
                h => h,
            };
            enc(hour) | pm
        };
        // Both are below 100; `rem_euclid` keeps them so for any year.
        let year = t.year.rem_euclid(100) as u8;
        let century = t.year.div_euclid(100).rem_euclid(100) as u8;
        [
            enc(t.second),
            enc(t.minute),
            hours,
            enc(t.weekday()),
            enc(t.day),
            enc(t.month),
            enc(year),
            enc(century),
        ]
    }

    /// The Unix time the time registers' bytes `regs` give in the current mode, or `None` if
    /// they are not a valid encoding of a valid date. The day of week is not checked.
    fn decode_time(&self, regs: &TimeRegs) -> Option<i64> {
        let binary = self.binary();
        let dec = |v: u8| decode(v, binary);
        let [second, minute, hours, _weekday, day, month, year, century] = *regs;
        let hour = if self.hours_24() {
            dec(hours)?
        } else {
            let hour = dec(hours & !HOUR_PM)?;
            if !(1..=12).contains(&hour) {
                return None;
            }
            hour % 12 + if hours & HOUR_PM != 0 { 12 } else { 0 }
        };
        DateTime {
            year: i64::from(dec(century)?) * 100 + i64::from(dec(year)?),
            month: dec(month)?,
            day: dec(day)?,
            hour,
            minute: dec(minute)?,
            second: dec(second)?,
        }
        .to_unix()
    }
}

/// Whole seconds of `ns` (rounded towards the past), saturating at the ends of `i64`.
fn unix_secs(ns: i128) -> i64 {
    let secs = ns.div_euclid(NS_PER_SEC);
    i64::try_from(secs).unwrap_or(if secs < 0 { i64::MIN } else { i64::MAX })
}

/// `value` (below 100) as a register byte: binary, or two BCD digits.
fn encode(value: u8, binary: bool) -> u8 {
    if binary {
        value
    } else {
        ((value / 10 % 10) << 4) | (value % 10)
    }
}

/// A register byte as a number: binary, or two BCD digits (`None` if a digit exceeds 9 or the
/// number 99).
fn decode(byte: u8, binary: bool) -> Option<u8> {
    if binary {
        return (byte < 100).then_some(byte);
    }
    let (tens, ones) = (byte >> 4, byte & 0x0f);
    (tens <= 9 && ones <= 9).then_some(tens * 10 + ones)
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.read_register(self.index),
            // The index port is write-only.
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (INDEX_OFFSET, &[index]) => self.index = index & INDEX_MASK,
            (DATA_OFFSET, &[value]) => self.write_register(self.index, value),
            _ => tracing::trace!(offset, len = data.len(), "rtc: write ignored"),
        }
    }
}

impl fmt::Debug for Rtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rtc")
            .field("offset_ns", &self.offset_ns)
            .field("index", &self.index)
            .field("status_a", &self.reg(REG_A))
            .field("status_b", &self.reg(REG_B))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
