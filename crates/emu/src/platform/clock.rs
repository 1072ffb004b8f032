//! Guest time: the virtual TSC frequency and the time source every platform model reads.
//!
//! All platform models take the current time as nanoseconds since VM creation (`now_ns`) and
//! never read a clock themselves, so they are deterministic given the sequence of times they
//! are called with. The guest's time-stamp counter is defined from the same time line:
//! `guest TSC = ns_to_tsc(now_ns)`, ticking at [`TSC_HZ`] (advertised through kvm-clock).
//!
//! [`HostClock`] follows the host's `CLOCK_MONOTONIC`; [`ManualClock`] is set by its owner
//! (deterministic mode derives it from the instruction count; tests step it by hand).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The guest's virtual TSC frequency in Hz (2 GHz).
pub const TSC_HZ: u64 = 2_000_000_000;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Guest TSC ticks in `ns` nanoseconds, rounded down; saturates at `u64::MAX` (after ~292 years).
pub fn ns_to_tsc(ns: u64) -> u64 {
    let t = u128::from(ns) * u128::from(TSC_HZ) / u128::from(NS_PER_SEC);
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// Nanoseconds in `tsc` guest TSC ticks, rounded down.
pub fn tsc_to_ns(tsc: u64) -> u64 {
    let ns = u128::from(tsc) * u128::from(NS_PER_SEC) / u128::from(TSC_HZ);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The first nanosecond at which the guest TSC has reached `tsc` (`tsc_to_ns` rounded up), so
/// that `ns_to_tsc(tsc_to_ns_ceil(t)) >= t`; saturates at `u64::MAX`.
pub fn tsc_to_ns_ceil(tsc: u64) -> u64 {
    let num = u128::from(tsc) * u128::from(NS_PER_SEC);
    let ns = num.div_ceil(u128::from(TSC_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Where the platform models get "now" from.
pub trait TimeSource: Send + Sync {
    /// Nanoseconds since the source was created (or since its owner's epoch); never decreases.
    fn now_ns(&self) -> u64;
}

/// The host's `CLOCK_MONOTONIC` (through [`Instant`]), counted from creation, or from the
/// time [`HostClock::set_now`] last put it at (a restored VM continues its saved guest time).
#[derive(Debug)]
pub struct HostClock {
    start: Instant,
    /// Added (wrapping) to the time since `start`: `set_now`'s target minus the elapsed time
    /// then. As the elapsed time only grows, the sum never wraps below the target.
    offset_ns: AtomicU64,
}

impl HostClock {
    pub fn new() -> Self {
        HostClock {
            start: Instant::now(),
            offset_ns: AtomicU64::new(0),
        }
    }

    fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Makes the time now `ns`; it runs on from there with the host's clock. Meant for a
    /// restore, before anyone reads the clock again (it may move backwards).
    pub fn set_now(&self, ns: u64) {
        self.offset_ns
            .store(ns.wrapping_sub(self.elapsed_ns()), Ordering::Release);
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl TimeSource for HostClock {
    fn now_ns(&self) -> u64 {
        self.elapsed_ns()
            .wrapping_add(self.offset_ns.load(Ordering::Acquire))
    }
}

/// A clock its owner sets: deterministic mode (time from the instruction count) and tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    ns: AtomicU64,
}

impl ManualClock {
    pub fn new(ns: u64) -> Self {
        ManualClock {
            ns: AtomicU64::new(ns),
        }
    }

    /// Sets the time. The caller keeps it monotonic; a smaller value is ignored.
    pub fn set(&self, ns: u64) {
        self.ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// Puts the time at `ns`, also backwards (a restore, before the clock is read again).
    pub fn reset(&self, ns: u64) {
        self.ns.store(ns, Ordering::Release);
    }

    /// Moves the time forward by `delta_ns` (saturating) and returns the new time.
    pub fn advance(&self, delta_ns: u64) -> u64 {
        let prev = self
            .ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(delta_ns))
            })
            .unwrap_or_else(|t| t);
        prev.saturating_add(delta_ns)
    }
}

impl TimeSource for ManualClock {
    fn now_ns(&self) -> u64 {
        self.ns.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_conversions_are_exact_at_2ghz() {
        assert_eq!(ns_to_tsc(1_000_000_000), TSC_HZ);
        assert_eq!(tsc_to_ns(TSC_HZ), 1_000_000_000);
        assert_eq!(tsc_to_ns(3), 1);
        assert_eq!(tsc_to_ns_ceil(3), 2);
        assert_eq!(tsc_to_ns_ceil(4), 2);
        assert!(ns_to_tsc(tsc_to_ns_ceil(12_345)) >= 12_345);
    }

    #[test]
    fn tsc_conversions_do_not_overflow() {
        assert_eq!(ns_to_tsc(u64::MAX), u64::MAX);
        assert_eq!(tsc_to_ns(u64::MAX), u64::MAX / 2);
        assert_eq!(tsc_to_ns_ceil(u64::MAX), u64::MAX / 2 + 1);
    }

    #[test]
    fn manual_clock_only_moves_forward() {
        let c = ManualClock::new(10);
        assert_eq!(c.now_ns(), 10);
        c.set(5);
        assert_eq!(c.now_ns(), 10);
        assert_eq!(c.advance(7), 17);
        c.set(u64::MAX);
        assert_eq!(c.advance(1), u64::MAX);
    }

    #[test]
    fn host_clock_continues_from_a_set_time() {
        let c = HostClock::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        c.set_now(1_000);
        let t = c.now_ns();
        assert!((1_000..1_000 + 1_000_000_000).contains(&t), "{t}");
        c.set_now(5_000_000_000_000);
        let t = c.now_ns();
        assert!((5_000_000_000_000..5_001_000_000_000).contains(&t), "{t}");
        assert!(c.now_ns() >= t);
    }

    #[test]
    fn manual_clock_resets_to_any_time() {
        let c = ManualClock::new(10);
        c.reset(3);
        assert_eq!(c.now_ns(), 3);
    }

    #[test]
    fn host_clock_is_monotonic() {
        let c = HostClock::new();
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(b >= a);
    }
}
