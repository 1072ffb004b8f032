//! The RTC driven through its ports, as a guest driver does, with a clock the test moves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

const NS: u64 = 1_000_000_000;
/// 2024-02-29 13:45:56 UTC, a Thursday.
const LEAP_DAY_AFTERNOON: u64 = 1_709_214_356;
/// 1999-12-31 23:59:59 UTC, a Friday.
const LAST_SECOND_OF_1999: u64 = 946_684_799;
/// 2100-02-28 23:59:59 UTC, a Sunday (2100 is not a leap year).
const LAST_SECOND_OF_FEB_2100: u64 = 4_107_542_399;

/// Linux's `RTC_DIV_RESET2`: the divider held in reset while the time is set.
const A_DIVIDER_RESET: u8 = 0x70;

/// The wall clock the device reads: Unix nanoseconds the test sets.
#[derive(Clone, Default)]
struct TestClock(Arc<AtomicU64>);

impl TestClock {
    fn set(&self, secs: u64, ns: u64) {
        self.0.store(secs * NS + ns, Ordering::SeqCst);
    }

    fn advance_ns(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::SeqCst);
    }
}

fn rtc_at(secs: u64, ns: u64) -> (Rtc, TestClock) {
    let clock = TestClock::default();
    clock.set(secs, ns);
    let source = clock.clone();
    let rtc = Rtc::new(Box::new(move || source.0.load(Ordering::SeqCst)));
    (rtc, clock)
}

fn read(rtc: &mut Rtc, reg: u8) -> u8 {
    rtc.write(INDEX_OFFSET, &[reg]);
    let mut data = [0u8; 1];
    rtc.read(DATA_OFFSET, &mut data);
    data[0]
}

fn write(rtc: &mut Rtc, reg: u8, value: u8) {
    rtc.write(INDEX_OFFSET, &[reg]);
    rtc.write(DATA_OFFSET, &[value]);
}

/// Seconds, minutes, hours, day of week, day, month, year, century.
fn time(rtc: &mut Rtc) -> [u8; 8] {
    TIME_REGS.map(|reg| read(rtc, reg))
}

/// Sets the time as Linux's `mc146818_set_time` does: SET and divider reset, the fields, then
/// the saved status registers back. `fields` as [`time`] returns them, in the current mode.
fn set_time_like_linux(rtc: &mut Rtc, fields: [u8; 8]) {
    let b = read(rtc, REG_B);
    write(rtc, REG_B, b | B_SET);
    let a = read(rtc, REG_A);
    write(rtc, REG_A, a | A_DIVIDER_RESET);
    for (reg, value) in TIME_REGS.into_iter().zip(fields) {
        // Linux does not write the day of week.
        if reg != REG_WEEKDAY {
            write(rtc, reg, value);
        }
    }
    write(rtc, REG_B, b);
    write(rtc, REG_A, a);
}

#[test]
fn ports_are_index_then_data() {
    assert_eq!(DATA_OFFSET, 1);
    assert_eq!(
        u64::from(RTC_INDEX_PORT) + RTC_PORT_LEN - 1,
        u64::from(RTC_DATA_PORT)
    );
}

#[test]
fn time_reads_in_24_hour_bcd_by_default() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, NS / 2);
    assert_eq!(read(&mut rtc, REG_B), 0x02, "24-hour BCD at power-on");
    assert_eq!(read(&mut rtc, REG_A), 0x26);
    assert_eq!(
        time(&mut rtc),
        [0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
    );
}

#[test]
fn binary_mode_reads_plain_numbers() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    write(&mut rtc, REG_B, B_24_HOUR | B_BINARY);
    assert_eq!(time(&mut rtc), [56, 45, 13, 5, 29, 2, 24, 20]);
}

#[test]
fn twelve_hour_mode_sets_the_pm_bit() {
    // (seconds into 2024-02-29, hours register in 12-hour BCD, in 12-hour binary)
    let day = LEAP_DAY_AFTERNOON - (13 * 3600 + 45 * 60 + 56);
    let cases = [
        (0, 0x12, 12),                          // 00:00 is 12 AM
        (11 * 3600 + 59 * 60, 0x11, 11),        // 11:59 AM
        (12 * 3600, 0x92, 0x80 | 12),           // 12:00 is 12 PM
        (13 * 3600 + 45 * 60, 0x81, 0x81),      // 1:45 PM
        (23 * 3600 + 59 * 60, 0x91, 0x80 | 11), // 11:59 PM
    ];
    for (secs, bcd, binary) in cases {
        let (mut rtc, _) = rtc_at(day + secs, 0);
        write(&mut rtc, REG_B, 0);
        assert_eq!(read(&mut rtc, REG_HOURS), bcd, "BCD at {secs}");
        write(&mut rtc, REG_B, B_BINARY);
        assert_eq!(read(&mut rtc, REG_HOURS), binary, "binary at {secs}");
        // Only the hours change with the 12/24-hour bit.
        assert_eq!(read(&mut rtc, REG_DAY), 29);
    }
}

#[test]
fn the_time_advances_with_the_clock() {
    let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    clock.advance_ns(3 * NS + NS / 3);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x59);
    clock.advance_ns(NS);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x00);
    assert_eq!(read(&mut rtc, REG_MINUTES), 0x46);
}

#[test]
fn setting_the_time_as_linux_does_moves_the_guest_clock() {
    let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON, NS / 2);
    // 2031-07-04 08:09:10, a Friday.
    set_time_like_linux(&mut rtc, [0x10, 0x09, 0x08, 0, 0x04, 0x07, 0x31, 0x20]);
    assert_eq!(read(&mut rtc, REG_A), 0x26, "status A restored");
    assert_eq!(read(&mut rtc, REG_B), 0x02, "status B restored");
    assert_eq!(
        time(&mut rtc),
        [0x10, 0x09, 0x08, 0x06, 0x04, 0x07, 0x31, 0x20]
    );
    // Later reads advance from the set time, whatever the wall clock's fraction of a second.
    clock.advance_ns(90 * NS + NS / 4);
    assert_eq!(
        time(&mut rtc),
        [0x40, 0x10, 0x08, 0x06, 0x04, 0x07, 0x31, 0x20]
    );
}

#[test]
fn set_freezes_the_time_registers() {
    let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    write(&mut rtc, REG_B, B_24_HOUR | B_SET);
    clock.advance_ns(10 * NS);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x56, "frozen");
    assert_eq!(read(&mut rtc, REG_A) & A_UIP, 0);
    write(&mut rtc, REG_MINUTES, 0x30);
    assert_eq!(read(&mut rtc, REG_MINUTES), 0x30);
    // The clock restarts from the registers, at the start of that second.
    write(&mut rtc, REG_B, B_24_HOUR);
    assert_eq!(time(&mut rtc)[..3], [0x56, 0x30, 0x13]);
    clock.advance_ns(NS - 1);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x56);
    clock.advance_ns(1);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x57);
}

#[test]
fn setting_the_time_in_binary_12_hour_mode_honours_pm() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    write(&mut rtc, REG_B, B_BINARY);
    // 2024-03-01 7:05:00 PM.
    set_time_like_linux(&mut rtc, [0, 5, HOUR_PM | 7, 0, 1, 3, 24, 20]);
    assert_eq!(read(&mut rtc, REG_HOURS), HOUR_PM | 7);
    write(&mut rtc, REG_B, B_24_HOUR);
    assert_eq!(
        time(&mut rtc),
        [0x00, 0x05, 0x19, 0x06, 0x01, 0x03, 0x24, 0x20]
    );
}

#[test]
fn setting_12_am_in_12_hour_bcd_mode_is_midnight() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    write(&mut rtc, REG_B, 0);
    set_time_like_linux(&mut rtc, [0x00, 0x00, 0x12, 0, 0x01, 0x03, 0x24, 0x20]);
    write(&mut rtc, REG_B, B_24_HOUR);
    assert_eq!(read(&mut rtc, REG_HOURS), 0x00);
}

#[test]
fn an_invalid_time_is_ignored() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    let before = time(&mut rtc);
    // Month 13; then February 30th; then a non-BCD seconds byte; then hour 13 in 12-hour mode.
    set_time_like_linux(&mut rtc, [0x00, 0x00, 0x00, 0, 0x01, 0x13, 0x24, 0x20]);
    set_time_like_linux(&mut rtc, [0x00, 0x00, 0x00, 0, 0x30, 0x02, 0x24, 0x20]);
    set_time_like_linux(&mut rtc, [0x0a, 0x00, 0x00, 0, 0x01, 0x01, 0x24, 0x20]);
    write(&mut rtc, REG_B, 0);
    set_time_like_linux(&mut rtc, [0x00, 0x00, 0x13, 0, 0x01, 0x01, 0x24, 0x20]);
    write(&mut rtc, REG_B, B_24_HOUR);
    assert_eq!(time(&mut rtc), before);
    // Nor does a bad value written while the clock runs change anything.
    write(&mut rtc, REG_MINUTES, 0x60);
    assert_eq!(time(&mut rtc), before);
}

#[test]
fn a_time_register_written_while_running_takes_effect_at_once() {
    let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON, 3 * NS / 4);
    write(&mut rtc, REG_MINUTES, 0x00);
    // 2025-02-29 does not exist: that write is dropped, the ones that stay valid apply.
    write(&mut rtc, REG_YEAR, 0x25);
    assert_eq!(read(&mut rtc, REG_YEAR), 0x24);
    write(&mut rtc, REG_DAY, 0x28);
    write(&mut rtc, REG_YEAR, 0x25);
    // 2025-02-28 13:00:56: a Friday.
    assert_eq!(
        time(&mut rtc),
        [0x56, 0x00, 0x13, 0x06, 0x28, 0x02, 0x25, 0x20]
    );
    // The fraction of the second is kept.
    clock.advance_ns(NS / 4);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x57);
}

#[test]
fn uip_is_set_for_the_last_244_us_of_each_second() {
    let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON, NS - 244_001);
    assert_eq!(read(&mut rtc, REG_A), 0x26);
    clock.advance_ns(1);
    assert_eq!(read(&mut rtc, REG_A), 0x26 | A_UIP);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x56, "not yet updated");
    clock.advance_ns(243_999);
    assert_eq!(read(&mut rtc, REG_A), 0x26 | A_UIP);
    clock.advance_ns(1);
    assert_eq!(read(&mut rtc, REG_A), 0x26);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x57);
}

#[test]
fn status_a_rate_bits_read_back_and_uip_is_read_only() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    write(&mut rtc, REG_A, 0xff);
    assert_eq!(read(&mut rtc, REG_A), 0x7f);
    write(&mut rtc, REG_A, 0x2f);
    assert_eq!(read(&mut rtc, REG_A), 0x2f);
}

#[test]
fn status_c_reads_zero_and_d_reads_valid() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    // Interrupt enables are stored, but no flag is ever raised.
    write(&mut rtc, REG_B, B_24_HOUR | 0x70);
    assert_eq!(read(&mut rtc, REG_B), B_24_HOUR | 0x70);
    write(&mut rtc, REG_C, 0xff);
    write(&mut rtc, REG_D, 0x00);
    assert_eq!(read(&mut rtc, REG_C), 0);
    assert_eq!(read(&mut rtc, REG_C), 0);
    assert_eq!(read(&mut rtc, REG_D), D_VALID);
}

#[test]
fn cmos_ram_and_alarms_are_plain_storage() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    let storage: Vec<u8> = [0x01, 0x03, 0x05]
        .into_iter()
        .chain((0x0e..0x80).filter(|&r| r != REG_CENTURY))
        .collect();
    assert!(storage.iter().all(|&r| read(&mut rtc, r) == 0), "cleared");
    for &reg in &storage {
        write(&mut rtc, reg, reg ^ 0xa5);
    }
    for &reg in &storage {
        assert_eq!(read(&mut rtc, reg), reg ^ 0xa5, "register {reg:#x}");
    }
    // None of it disturbed the clock.
    assert_eq!(
        time(&mut rtc),
        [0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
    );
}

#[test]
fn the_index_ignores_the_nmi_bit() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    assert_eq!(read(&mut rtc, 0x80 | REG_D), D_VALID);
    assert_eq!(read(&mut rtc, 0x80 | REG_SECONDS), 0x56);
    write(&mut rtc, 0x80 | 0x40, 0x77);
    assert_eq!(read(&mut rtc, 0x40), 0x77);
    assert_eq!(read(&mut rtc, 0xc0), 0x77);
}

#[test]
fn the_date_rolls_over_a_leap_day() {
    let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON - 14 * 3600, 0);
    // 2024-02-28 23:45:56, a Wednesday.
    assert_eq!(time(&mut rtc)[2..6], [0x23, 0x04, 0x28, 0x02]);
    clock.advance_ns(3600 * NS);
    assert_eq!(time(&mut rtc)[2..6], [0x00, 0x05, 0x29, 0x02]);
    clock.advance_ns(24 * 3600 * NS);
    assert_eq!(time(&mut rtc)[2..6], [0x00, 0x06, 0x01, 0x03]);
}

#[test]
fn the_date_rolls_over_into_2000_and_2100() {
    let (mut rtc, clock) = rtc_at(LAST_SECOND_OF_1999, 0);
    assert_eq!(
        time(&mut rtc),
        [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]
    );
    clock.advance_ns(NS);
    assert_eq!(
        time(&mut rtc),
        [0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
    );
    // 2000 is a leap year, 2100 is not.
    clock.set(951_782_400 - 1, 0);
    clock.advance_ns(NS);
    assert_eq!(time(&mut rtc)[3..], [0x03, 0x29, 0x02, 0x00, 0x20]);

    let (mut rtc, clock) = rtc_at(LAST_SECOND_OF_FEB_2100, 0);
    assert_eq!(time(&mut rtc)[3..], [0x01, 0x28, 0x02, 0x00, 0x21]);
    clock.advance_ns(NS);
    assert_eq!(
        time(&mut rtc),
        [0x00, 0x00, 0x00, 0x02, 0x01, 0x03, 0x00, 0x21]
    );
}

#[test]
fn a_time_set_by_the_guest_rolls_over_the_century() {
    let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    set_time_like_linux(&mut rtc, [0x59, 0x59, 0x23, 0, 0x31, 0x12, 0x99, 0x20]);
    clock.advance_ns(NS);
    // 2100-01-01, a Friday.
    assert_eq!(
        time(&mut rtc),
        [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21]
    );
}

#[test]
fn the_index_port_and_wide_accesses_read_all_ones() {
    let (mut rtc, _) = rtc_at(LEAP_DAY_AFTERNOON, 0);
    write(&mut rtc, 0x40, 0x12);
    let mut data = [0u8; 1];
    rtc.read(INDEX_OFFSET, &mut data);
    assert_eq!(data, [0xff]);
    let mut wide = [0u8; 2];
    rtc.read(INDEX_OFFSET, &mut wide);
    assert_eq!(wide, [0xff, 0xff]);
    rtc.write(INDEX_OFFSET, &[0x40, 0x34]);
    rtc.write(DATA_OFFSET, &[0x56, 0x78]);
    assert_eq!(read(&mut rtc, 0x40), 0x12, "wide writes ignored");
}
