//! kvm-clock: the pvclock structures the guest reads (the kernel's
//! `Documentation/virt/kvm/x86/msr.rst`).
//!
//! The guest writes the guest-physical address of a `pvclock_vcpu_time_info` (bit 0 = enable) to
//! `MSR_KVM_SYSTEM_TIME(_NEW)` and of a `pvclock_wall_clock` to `MSR_KVM_WALL_CLOCK(_NEW)`; the
//! VMM fills them with the bytes built here. The guest computes
//! `system_time + ((tsc - tsc_timestamp) <<|>> tsc_shift) * tsc_to_system_mul >> 32`.
//!
//! With the guest TSC defined as `clock::ns_to_tsc(now_ns)`, the VMM takes one `now_ns` and
//! writes `pvclock_vcpu_time_info(ns_to_tsc(now_ns), now_ns, version)` (see [`time_info_at`]):
//! the scale for [`TSC_HZ`] is exact, so the structure never needs refreshing while the TSC
//! stays stable, and `PVCLOCK_TSC_STABLE_BIT` is set.

use super::clock::{ns_to_tsc, TSC_HZ};

/// Wall clock MSR, new numbering (`KVM_FEATURE_CLOCKSOURCE2`).
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// System time MSR, new numbering (`KVM_FEATURE_CLOCKSOURCE2`).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// Wall clock MSR, old numbering (`KVM_FEATURE_CLOCKSOURCE`).
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// System time MSR, old numbering (`KVM_FEATURE_CLOCKSOURCE`).
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;

/// `flags`: the TSC is synchronized across vCPUs, the guest need not keep a global maximum.
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;

/// Size of `struct pvclock_vcpu_time_info`.
pub const PVCLOCK_VCPU_TIME_INFO_LEN: usize = 32;
/// Size of `struct pvclock_wall_clock`.
pub const PVCLOCK_WALL_CLOCK_LEN: usize = 12;

/// The guest address a `MSR_KVM_SYSTEM_TIME(_NEW)` value enables, or `None` if bit 0 (enable) is
/// clear. The address is the value with bit 0 cleared (the ABI asks for 4-byte alignment; the
/// 32-byte structure must not cross a page boundary).
pub fn system_time_gpa(msr_value: u64) -> Option<u64> {
    (msr_value & 1 != 0).then_some(msr_value & !1)
}

/// `(tsc_to_system_mul, tsc_shift)` such that
/// `ns = ((ticks << shift) or (ticks >> -shift)) * mul >> 32` converts ticks of `hz` to ns.
/// Chooses the smallest shift in -31..=31 for which `mul` fits 32 bits, i.e. the most precise
/// multiplier. `hz` of 0 is treated as 1.
pub fn scale_for_hz(hz: u64) -> (u32, i8) {
    let hz = u128::from(hz.max(1));
    for shift in -31i32..=31 {
        // mul = 1e9 * 2^(32 - shift) / hz; 32 - shift is within 1..=63.
        let exp = u32::try_from(32 - shift).unwrap_or(32);
        let mul = (1_000_000_000u128 << exp) / hz;
        if let (Ok(mul), Ok(shift)) = (u32::try_from(mul), i8::try_from(shift)) {
            return (mul, shift);
        }
    }
    (u32::MAX, 31)
}

/// `struct pvclock_vcpu_time_info` for a TSC of [`TSC_HZ`]: `version` (even when the guest may
/// read it; the writer makes it odd while updating), `tsc_timestamp = tsc`,
/// `system_time = system_time_ns`, flags = `PVCLOCK_TSC_STABLE_BIT`.
pub fn pvclock_vcpu_time_info(
    tsc: u64,
    system_time_ns: u64,
    version: u32,
) -> [u8; PVCLOCK_VCPU_TIME_INFO_LEN] {
    let (mul, shift) = scale_for_hz(TSC_HZ);
    let mut b = [0u8; PVCLOCK_VCPU_TIME_INFO_LEN];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    // 4..8: pad0
    b[8..16].copy_from_slice(&tsc.to_le_bytes());
    b[16..24].copy_from_slice(&system_time_ns.to_le_bytes());
    b[24..28].copy_from_slice(&mul.to_le_bytes());
    b[28] = shift.to_le_bytes()[0];
    b[29] = PVCLOCK_TSC_STABLE_BIT;
    // 30..32: pad
    b
}

/// [`pvclock_vcpu_time_info`] for the instant `now_ns` on the guest time line.
pub fn time_info_at(now_ns: u64, version: u32) -> [u8; PVCLOCK_VCPU_TIME_INFO_LEN] {
    pvclock_vcpu_time_info(ns_to_tsc(now_ns), now_ns, version)
}

/// `struct pvclock_wall_clock`: the wall-clock time (seconds and nanoseconds since the Unix
/// epoch) at which the guest's kvm-clock read 0. `sec` is truncated to 32 bits as the ABI does.
pub fn wall_clock(sec: u64, nsec: u32, version: u32) -> [u8; PVCLOCK_WALL_CLOCK_LEN] {
    let mut b = [0u8; PVCLOCK_WALL_CLOCK_LEN];
    b[0..4].copy_from_slice(&version.to_le_bytes());
    b[4..8].copy_from_slice(&(sec as u32).to_le_bytes());
    b[8..12].copy_from_slice(&nsec.min(999_999_999).to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Linux guest's `pvclock_scale_delta` (arch/x86/include/asm/pvclock.h), re-stated.
    fn pvclock_scale_delta(mut delta: u64, mul_frac: u32, shift: i8) -> u64 {
        if shift < 0 {
            delta >>= -shift;
        } else {
            delta <<= shift;
        }
        ((u128::from(delta) * u128::from(mul_frac)) >> 32) as u64
    }

    fn guest_read(info: &[u8; 32], tsc: u64) -> u64 {
        let ts = u64::from_le_bytes(info[8..16].try_into().unwrap());
        let st = u64::from_le_bytes(info[16..24].try_into().unwrap());
        let mul = u32::from_le_bytes(info[24..28].try_into().unwrap());
        let shift = info[28] as i8;
        st + pvclock_scale_delta(tsc - ts, mul, shift)
    }

    #[test]
    fn one_second_of_ticks_is_one_second() {
        let info = pvclock_vcpu_time_info(1000, 500, 2);
        let ns = guest_read(&info, 1000 + TSC_HZ) - 500;
        assert!(ns.abs_diff(1_000_000_000) <= 1, "{ns}");
    }

    #[test]
    fn layout_matches_the_abi() {
        let info = pvclock_vcpu_time_info(0x1122_3344_5566_7788, 0x99, 4);
        assert_eq!(&info[0..4], &4u32.to_le_bytes());
        assert_eq!(&info[4..8], &[0; 4]);
        assert_eq!(&info[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&info[16..24], &0x99u64.to_le_bytes());
        assert_eq!(info[29], PVCLOCK_TSC_STABLE_BIT);
        assert_eq!(&info[30..32], &[0; 2]);
        let w = wall_clock(1_700_000_000, 5, 2);
        assert_eq!(&w[0..4], &2u32.to_le_bytes());
        assert_eq!(&w[4..8], &1_700_000_000u32.to_le_bytes());
        assert_eq!(&w[8..12], &5u32.to_le_bytes());
    }

    #[test]
    fn guest_time_tracks_the_time_line() {
        let info = time_info_at(123_456_789, 0);
        for now in [123_456_789u64, 200_000_000, 10_000_000_000_000] {
            let read = guest_read(&info, ns_to_tsc(now));
            assert!(read.abs_diff(now) <= 1, "{now} vs {read}");
        }
    }

    #[test]
    fn scale_is_accurate_for_other_frequencies() {
        for hz in [
            1u64,
            1_000,
            1_193_182,
            999_999_999,
            2_000_000_000,
            3_700_000_000,
            u64::MAX,
        ] {
            let (mul, shift) = scale_for_hz(hz);
            let ticks = hz.min(1 << 40);
            let want = u128::from(ticks) * 1_000_000_000 / u128::from(hz);
            let got = pvclock_scale_delta(ticks, mul, shift);
            let err = (u128::from(got)).abs_diff(want);
            assert!(
                err * 1_000_000 <= want.max(1_000_000),
                "{hz}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn system_time_msr_enable_bit() {
        assert_eq!(system_time_gpa(0x1000), None);
        assert_eq!(system_time_gpa(0x1001), Some(0x1000));
    }
}
