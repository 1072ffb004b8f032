//! Unix time to calendar fields and back, in UTC on the proleptic Gregorian calendar, for the
//! RTC's date and time registers.
//!
//! The day conversions are Howard Hinnant's `days_from_civil` and `civil_from_days`
//! (<https://howardhinnant.github.io/date_algorithms.html>): exact for every day, with no tables
//! and no dependency. Unix time has no leap seconds, so a day is always 86 400 seconds.

/// Seconds in a day of Unix time.
const SECS_PER_DAY: i64 = 86_400;
/// Days from 0000-03-01 to 1970-01-01: the algorithms count from a March 1st so that the leap
/// day ends the year.
const DAYS_TO_UNIX_EPOCH: i64 = 719_468;
/// Days in a 400-year Gregorian cycle (an "era").
const DAYS_PER_ERA: i64 = 146_097;

/// A UTC date and time of day, as the RTC's registers hold them (before encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DateTime {
    /// The full year, e.g. 2024.
    pub year: i64,
    /// `1..=12`.
    pub month: u8,
    /// `1..=`[`days_in_month`].
    pub day: u8,
    /// `0..=23`.
    pub hour: u8,
    /// `0..=59`.
    pub minute: u8,
    /// `0..=59`.
    pub second: u8,
}

impl DateTime {
    /// The calendar fields of Unix time `secs` (any value: the day count cannot overflow).
    pub fn from_unix(secs: i64) -> DateTime {
        let days = secs.div_euclid(SECS_PER_DAY);
        let of_day = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        // `of_day` is below 86 400, so each field fits its range.
        DateTime {
            year,
            month,
            day,
            hour: (of_day / 3600) as u8,
            minute: (of_day / 60 % 60) as u8,
            second: (of_day % 60) as u8,
        }
    }

    /// Unix time of these fields, or `None` if one is out of range (month 13, February 30th,
    /// hour 24, ...) or the year is outside `0..=9999`.
    pub fn to_unix(self) -> Option<i64> {
        let valid = (0..=9999).contains(&self.year)
            && (1..=12).contains(&self.month)
            && (1..=days_in_month(self.year, self.month)).contains(&self.day)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60;
        valid.then(|| {
            days_from_civil(self.year, self.month, self.day) * SECS_PER_DAY
                + i64::from(self.hour) * 3600
                + i64::from(self.minute) * 60
                + i64::from(self.second)
        })
    }

    /// Day of the week as the RTC numbers it: 1 = Sunday, ..., 7 = Saturday.
    pub fn weekday(self) -> u8 {
        // 1970-01-01 was a Thursday (Sunday + 4).
        let days = days_from_civil(self.year, self.month, self.day);
        ((days + 4).rem_euclid(7) + 1) as u8
    }
}

/// Whether `year` has a February 29th.
pub(super) fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// Days in `month` (`1..=12`) of `year`; 0 for a month out of range.
pub(super) fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a valid date.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    // Years start on March 1st, so January and February belong to the previous one.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * DAYS_PER_ERA + day_of_era - DAYS_TO_UNIX_EPOCH
}

/// The date `days` after 1970-01-01 (negative: before), as (year, month, day).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let days = days + DAYS_TO_UNIX_EPOCH;
    let era = days.div_euclid(DAYS_PER_ERA);
    let day_of_era = days.rem_euclid(DAYS_PER_ERA);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Month counted from March = 0.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = (month_from_march + 2) % 12 + 1;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // day is 1..=31 and month 1..=12 by construction.
    (year, month as u8, day as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(year: i64, month: u8, day: u8, hour: u8, minute: u8, second: u8) -> DateTime {
        DateTime {
            year,
            month,
            day,
            hour,
            minute,
            second,
        }
    }

    #[test]
    fn known_instants_convert_both_ways() {
        // (Unix time, fields, weekday), checked against Python's calendar.timegm.
        let cases = [
            (0, dt(1970, 1, 1, 0, 0, 0), 5),
            (951_782_400, dt(2000, 2, 29, 0, 0, 0), 3),
            (946_684_799, dt(1999, 12, 31, 23, 59, 59), 6),
            (1_709_214_356, dt(2024, 2, 29, 13, 45, 56), 5),
            (1_767_225_600, dt(2026, 1, 1, 0, 0, 0), 5),
            (4_102_444_799, dt(2099, 12, 31, 23, 59, 59), 5),
            (4_107_542_399, dt(2100, 2, 28, 23, 59, 59), 1),
            (4_107_542_400, dt(2100, 3, 1, 0, 0, 0), 2),
            (-1, dt(1969, 12, 31, 23, 59, 59), 4),
        ];
        for (secs, fields, weekday) in cases {
            assert_eq!(DateTime::from_unix(secs), fields, "{secs}");
            assert_eq!(fields.to_unix(), Some(secs), "{fields:?}");
            assert_eq!(fields.weekday(), weekday, "{fields:?}");
        }
    }

    #[test]
    fn every_day_for_three_centuries_follows_the_previous_one() {
        let mut prev = DateTime::from_unix(days_from_civil(1899, 12, 31) * SECS_PER_DAY);
        assert_eq!(prev, dt(1899, 12, 31, 0, 0, 0));
        for days in days_from_civil(1900, 1, 1)..days_from_civil(2201, 1, 1) {
            let d = DateTime::from_unix(days * SECS_PER_DAY);
            let expected = if prev.day < days_in_month(prev.year, prev.month) {
                (prev.year, prev.month, prev.day + 1)
            } else if prev.month < 12 {
                (prev.year, prev.month + 1, 1)
            } else {
                (prev.year + 1, 1, 1)
            };
            assert_eq!((d.year, d.month, d.day), expected, "day {days}");
            assert_eq!(d.weekday(), prev.weekday() % 7 + 1, "{d:?}");
            assert_eq!(d.to_unix(), Some(days * SECS_PER_DAY));
            prev = d;
        }
    }

    #[test]
    fn leap_years_follow_the_gregorian_rules() {
        assert!(is_leap_year(2024));
        assert!(is_leap_year(2000), "divisible by 400");
        assert!(!is_leap_year(2100), "divisible by 100 only");
        assert!(!is_leap_year(2023));
        assert_eq!(days_in_month(2000, 2), 29);
        assert_eq!(days_in_month(2100, 2), 28);
        assert_eq!(days_in_month(2024, 13), 0);
    }

    #[test]
    fn out_of_range_fields_have_no_unix_time() {
        assert_eq!(dt(2100, 2, 29, 0, 0, 0).to_unix(), None);
        assert_eq!(dt(2023, 4, 31, 0, 0, 0).to_unix(), None);
        assert_eq!(dt(2023, 0, 1, 0, 0, 0).to_unix(), None);
        assert_eq!(dt(2023, 13, 1, 0, 0, 0).to_unix(), None);
        assert_eq!(dt(2023, 1, 0, 0, 0, 0).to_unix(), None);
        assert_eq!(dt(2023, 1, 1, 24, 0, 0).to_unix(), None);
        assert_eq!(dt(2023, 1, 1, 0, 60, 0).to_unix(), None);
        assert_eq!(dt(2023, 1, 1, 0, 0, 60).to_unix(), None);
        assert_eq!(dt(10_000, 1, 1, 0, 0, 0).to_unix(), None);
    }

    #[test]
    fn extreme_unix_times_do_not_overflow() {
        for secs in [i64::MIN, i64::MAX] {
            let d = DateTime::from_unix(secs);
            assert!(
                (1..=12).contains(&d.month) && (1..=31).contains(&d.day),
                "{d:?}"
            );
        }
    }
}
