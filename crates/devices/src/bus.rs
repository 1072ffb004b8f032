//! An address space that routes guest accesses to the devices mapped in it.
//!
//! The VMM keeps two: one for port I/O (addresses are 16-bit ports widened to `u64`) and one for
//! MMIO (guest physical addresses).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::BusDevice;

/// A failed [`Bus`] operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// [`Bus::insert`] was given an empty range.
    #[error("Zero-length range at {base:#x}")]
    ZeroLength {
        /// Base of the rejected range.
        base: u64,
    },
    /// [`Bus::insert`] was given a range that runs past the end of the address space.
    #[error("Range at {base:#x} of length {len:#x} overflows the address space")]
    Overflow {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// [`Bus::insert`] was given a range that shares an address with a device already mapped.
    #[error(
        "Range at {base:#x} of length {len:#x} overlaps the device at {other_base:#x} of length \
         {other_len:#x}"
    )]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the device already mapped there.
        other_base: u64,
        /// Length of the device already mapped there.
        other_len: u64,
    },
    /// [`Bus::remove`] was given an address where no range starts.
    #[error("No range starts at {base:#x}")]
    NotMapped {
        /// The address given.
        base: u64,
    },
    /// No device is mapped at the address accessed.
    #[error("No device at {addr:#x}")]
    NoDevice {
        /// The address accessed.
        addr: u64,
    },
    /// The access starts inside a device but ends past its last address.
    #[error(
        "Access of {len_bytes} bytes at {addr:#x} runs past the device at {base:#x} of length \
         {device_len:#x}"
    )]
    AccessPastEnd {
        /// The address accessed.
        addr: u64,
        /// Size of the access.
        len_bytes: usize,
        /// Base of the device containing `addr`.
        base: u64,
        /// Length of that device's range.
        device_len: u64,
    },
}

/// One mapped range: `[base, base + len)`, with `len > 0`.
struct BusRange {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

impl BusRange {
    /// Whether `addr` falls in this range. Written without computing `base + len`, which may be
    /// 2^64 for a range that ends at the top of the address space.
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
}

/// An address space of non-overlapping ranges, each routed to one [`BusDevice`].
///
/// # Locks
///
/// The bus holds its ranges behind an [`RwLock`]; each device sits behind its own [`Mutex`].
/// [`read`](Bus::read) and [`write`](Bus::write) take the bus lock for reading only to find the
/// device, clone its `Arc`, and release the bus lock *before* taking the device lock. So:
///
/// - the bus lock and a device lock are never held together, and a device's `read`/`write` may
///   itself insert into a bus without deadlocking;
/// - vCPUs accessing different devices contend only on the (read-mostly) bus lock;
/// - [`insert`](Bus::insert) and [`remove`](Bus::remove) take the bus lock for writing and never
///   touch a device lock. Do not call them while holding an allocator lock that a device access
///   may need.
///
/// Lookups are a binary search in a sorted `Vec`: no allocation per access.
///
/// # Example
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use devices::{bus::Bus, BusDevice};
///
/// struct Scratch(u8);
/// impl BusDevice for Scratch {
///     fn read(&mut self, _offset: u64, data: &mut [u8]) {
///         data.fill(self.0);
///     }
///     fn write(&mut self, _offset: u64, data: &[u8]) {
///         if let Some(&value) = data.first() {
///             self.0 = value;
///         }
///     }
/// }
///
/// let bus = Bus::new();
/// bus.insert(Arc::new(Mutex::new(Scratch(0))), 0x80, 1).unwrap();
/// bus.write(0x80, &[0x42]).unwrap();
/// let mut data = [0u8; 1];
/// bus.read(0x80, &mut data).unwrap();
/// assert_eq!(data, [0x42]);
/// assert!(bus.read(0x81, &mut data).is_err());
/// ```
#[derive(Default)]
pub struct Bus {
    /// Sorted by `base`; ranges never overlap.
    ranges: RwLock<Vec<BusRange>>,
}

impl Bus {
    /// An empty address space.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    ///
    /// The range may end exactly at the top of the address space, but not wrap past it; it must
    /// not share an address with a range already mapped.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;

        let mut ranges = self.write_ranges();
        // Index of the first range whose base is >= `base`.
        let pos = ranges.partition_point(|r| r.base < base);
        let prev = pos.checked_sub(1).and_then(|i| ranges.get(i));
        let next = ranges.get(pos);
        for other in [prev, next].into_iter().flatten() {
            if other.contains(base) || (other.base >= base && other.base <= last) {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base: other.base,
                    other_len: other.len,
                });
            }
        }
        ranges.insert(pos, BusRange { base, len, device });
        Ok(())
    }

    /// Unmaps the range that starts at `base` and returns its device.
    ///
    /// `base` must be the exact base the range was inserted at; an address inside a range does
    /// not remove it. Like [`insert`](Bus::insert), this takes only the bus lock: an access
    /// already past the lookup may still reach the device once after `remove` returns.
    pub fn remove(&self, base: u64) -> Result<Arc<Mutex<dyn BusDevice>>, BusError> {
        let mut ranges = self.write_ranges();
        let pos = ranges
            .binary_search_by_key(&base, |r| r.base)
            .map_err(|_| BusError::NotMapped { base })?;
        Ok(ranges.remove(pos).device)
    }

    /// The guest reads `data.len()` bytes at `addr`.
    ///
    /// `data` is zeroed, then filled by the device mapped at `addr`; on error it is left as it
    /// was.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (offset, device) = self.resolve(addr, data.len())?;
        data.fill(0);
        device
            .lock()
            .expect("a device panicked during an access: its state is not trustworthy")
            .read(offset, data);
        Ok(())
    }

    /// The guest writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (offset, device) = self.resolve(addr, data.len())?;
        device
            .lock()
            .expect("a device panicked during an access: its state is not trustworthy")
            .write(offset, data);
        Ok(())
    }

    /// Finds the device containing the whole access `[addr, addr + len_bytes)` and returns the
    /// offset of `addr` in it. The bus lock is released on return.
    fn resolve(
        &self,
        addr: u64,
        len_bytes: usize,
    ) -> Result<(u64, Arc<Mutex<dyn BusDevice>>), BusError> {
        let ranges = self.read_ranges();
        // The last range whose base is <= `addr` is the only one that may contain it.
        let range = ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)
            .and_then(|i| ranges.get(i))
            .filter(|r| r.contains(addr))
            .ok_or(BusError::NoDevice { addr })?;
        let offset = addr - range.base;
        // `offset < range.len`, so the subtraction cannot underflow.
        let room = range.len - offset;
        if u64::try_from(len_bytes).map_or(true, |len| len > room) {
            return Err(BusError::AccessPastEnd {
                addr,
                len_bytes,
                base: range.base,
                device_len: range.len,
            });
        }
        Ok((offset, Arc::clone(&range.device)))
    }

    // The vector is valid after every step of `insert` and `remove` (the only writers), so a
    // panic while the lock was held cannot leave it inconsistent: recover from poisoning instead of failing
    // every later access.
    fn read_ranges(&self) -> std::sync::RwLockReadGuard<'_, Vec<BusRange>> {
        self.ranges.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_ranges(&self) -> std::sync::RwLockWriteGuard<'_, Vec<BusRange>> {
        self.ranges.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges = self.read_ranges();
        f.debug_list()
            .entries(ranges.iter().map(|r| (r.base, r.len)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with `fill`.
    #[derive(Default)]
    struct Probe {
        fill: u8,
        last_read: Option<(u64, usize)>,
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.last_read = Some((offset, data.len()));
            if let Some(first) = data.first_mut() {
                *first = self.fill;
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe(fill: u8) -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe {
            fill,
            ..Probe::default()
        }))
    }

    #[test]
    fn insert_rejects_zero_length() {
        let bus = Bus::new();
        assert_eq!(
            bus.insert(probe(0), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
    }

    #[test]
    fn insert_rejects_wrap_past_end_of_address_space() {
        let bus = Bus::new();
        assert_eq!(
            bus.insert(probe(0), u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
    }

    #[test]
    fn range_may_end_at_top_of_address_space() {
        let bus = Bus::new();
        bus.insert(probe(7), u64::MAX - 1, 2).unwrap();
        let mut data = [0u8; 1];
        bus.read(u64::MAX, &mut data).unwrap();
        assert_eq!(data, [7]);
        let mut wide = [0u8; 2];
        bus.read(u64::MAX - 1, &mut wide).unwrap();
        assert!(matches!(
            bus.read(u64::MAX, &mut wide),
            Err(BusError::AccessPastEnd { .. })
        ));
    }

    #[test]
    fn insert_rejects_every_kind_of_overlap() {
        let bus = Bus::new();
        bus.insert(probe(0), 0x100, 0x10).unwrap();
        let overlap = |base, len| BusError::Overlap {
            base,
            len,
            other_base: 0x100,
            other_len: 0x10,
        };
        // Same range, tail overlap, head overlap, inside, surrounding.
        for (base, len) in [
            (0x100, 0x10),
            (0xf8, 0x9),
            (0x10f, 0x4),
            (0x104, 0x2),
            (0xf0, 0x40),
        ] {
            assert_eq!(
                bus.insert(probe(0), base, len),
                Err(overlap(base, len)),
                "{base:#x}+{len:#x}"
            );
        }
    }

    #[test]
    fn insert_accepts_adjacent_ranges_on_both_sides() {
        let bus = Bus::new();
        bus.insert(probe(1), 0x100, 0x10).unwrap();
        bus.insert(probe(2), 0x110, 0x10).unwrap();
        bus.insert(probe(3), 0xf0, 0x10).unwrap();
        let mut data = [0u8; 1];
        for (addr, fill) in [(0xf0, 3), (0xff, 3), (0x100, 1), (0x10f, 1), (0x110, 2)] {
            bus.read(addr, &mut data).unwrap();
            assert_eq!(data, [fill], "{addr:#x}");
        }
    }

    #[test]
    fn overlap_is_checked_against_neighbours_inserted_out_of_order() {
        let bus = Bus::new();
        bus.insert(probe(0), 0x300, 0x10).unwrap();
        bus.insert(probe(0), 0x100, 0x10).unwrap();
        bus.insert(probe(0), 0x200, 0x10).unwrap();
        assert!(matches!(
            bus.insert(probe(0), 0x1f0, 0x11),
            Err(BusError::Overlap {
                other_base: 0x200,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(probe(0), 0x10f, 0x1),
            Err(BusError::Overlap {
                other_base: 0x100,
                ..
            })
        ));
    }

    #[test]
    fn lookup_boundaries() {
        let bus = Bus::new();
        bus.insert(probe(0xaa), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert_eq!(
            bus.read(0x3f7, &mut data),
            Err(BusError::NoDevice { addr: 0x3f7 })
        );
        assert_eq!(
            bus.write(0x400, &[0]),
            Err(BusError::NoDevice { addr: 0x400 })
        );
        bus.read(0x3f8, &mut data).unwrap();
        assert_eq!(data, [0xaa]);
        bus.read(0x3ff, &mut data).unwrap();
        assert_eq!(data, [0xaa]);
    }

    #[test]
    fn empty_bus_has_no_device() {
        let bus = Bus::new();
        assert_eq!(bus.write(0, &[1]), Err(BusError::NoDevice { addr: 0 }));
    }

    #[test]
    fn device_sees_offset_from_its_base() {
        let bus = Bus::new();
        let dev = probe(0);
        bus.insert(dev.clone(), 0x600, 3).unwrap();
        bus.write(0x602, &[1]).unwrap();
        let mut data = [0u8; 2];
        bus.read(0x600, &mut data).unwrap();
        let dev = dev.lock().unwrap();
        assert_eq!(dev.last_write, Some((2, vec![1])));
        assert_eq!(dev.last_read, Some((0, 2)));
    }

    #[test]
    fn access_may_not_extend_past_device() {
        let bus = Bus::new();
        let dev = probe(0);
        bus.insert(dev.clone(), 0x60, 1).unwrap();
        bus.insert(probe(0), 0x61, 1).unwrap();
        let err = BusError::AccessPastEnd {
            addr: 0x60,
            len_bytes: 2,
            base: 0x60,
            device_len: 1,
        };
        assert_eq!(bus.write(0x60, &[1, 2]), Err(err));
        assert_eq!(bus.read(0x60, &mut [0, 0]), Err(err));
        let dev = dev.lock().unwrap();
        assert_eq!(dev.last_write, None);
        assert_eq!(dev.last_read, None);
    }

    #[test]
    fn read_zeroes_bytes_the_device_leaves_unfilled() {
        let bus = Bus::new();
        bus.insert(probe(0x11), 0x1000, 0x100).unwrap();
        let mut data = [0xffu8; 4];
        bus.read(0x1000, &mut data).unwrap();
        assert_eq!(data, [0x11, 0, 0, 0]);
    }

    #[test]
    fn failed_read_leaves_buffer_untouched() {
        let bus = Bus::new();
        let mut data = [0x5au8; 2];
        bus.read(0x10, &mut data).unwrap_err();
        assert_eq!(data, [0x5a, 0x5a]);
    }

    #[test]
    fn failed_insert_leaves_bus_unchanged() {
        let bus = Bus::new();
        bus.insert(probe(1), 0x100, 0x10).unwrap();
        bus.insert(probe(2), 0x108, 0x10).unwrap_err();
        let mut data = [0u8; 1];
        bus.read(0x10f, &mut data).unwrap();
        assert_eq!(data, [1]);
        assert_eq!(
            bus.read(0x110, &mut data),
            Err(BusError::NoDevice { addr: 0x110 })
        );
        assert_eq!(format!("{bus:?}"), "[(256, 16)]");
    }

    #[test]
    fn remove_unmaps_and_returns_the_device() {
        let bus = Bus::new();
        let dev = probe(5);
        bus.insert(probe(1), 0x100, 0x10).unwrap();
        bus.insert(dev.clone(), 0x200, 0x10).unwrap();
        bus.insert(probe(3), 0x300, 0x10).unwrap();

        let removed = bus.remove(0x200).unwrap();
        let dev_dyn: Arc<Mutex<dyn BusDevice>> = dev;
        assert!(Arc::ptr_eq(&removed, &dev_dyn));
        assert_eq!(
            bus.read(0x205, &mut [0]),
            Err(BusError::NoDevice { addr: 0x205 })
        );
        // The neighbours are untouched and the range is free again.
        let mut data = [0u8; 1];
        bus.read(0x10f, &mut data).unwrap();
        assert_eq!(data, [1]);
        bus.read(0x300, &mut data).unwrap();
        assert_eq!(data, [3]);
        bus.insert(probe(9), 0x1f8, 0x10).unwrap();
        bus.read(0x200, &mut data).unwrap();
        assert_eq!(data, [9]);
        assert_eq!(format!("{bus:?}"), "[(256, 16), (504, 16), (768, 16)]");
    }

    #[test]
    fn remove_needs_the_exact_base() {
        let bus = Bus::new();
        bus.insert(probe(1), 0x100, 0x10).unwrap();
        for base in [0x0, 0xff, 0x101, 0x10f, 0x110, u64::MAX] {
            assert!(
                matches!(bus.remove(base), Err(BusError::NotMapped { base: b }) if b == base),
                "{base:#x}"
            );
        }
        bus.remove(0x100).unwrap();
        assert_eq!(
            bus.remove(0x100).err(),
            Some(BusError::NotMapped { base: 0x100 })
        );
        assert_eq!(format!("{bus:?}"), "[]");
    }

    /// A device that maps another device while handling an access: proves the bus lock is not
    /// held while a device runs.
    struct Hotplugger {
        bus: Arc<Bus>,
    }

    impl BusDevice for Hotplugger {
        fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            self.bus.insert(probe(9), 0x20, 1).unwrap();
        }
    }

    #[test]
    fn bus_lock_is_released_before_device_runs() {
        let bus = Arc::new(Bus::new());
        let dev = Arc::new(Mutex::new(Hotplugger { bus: bus.clone() }));
        bus.insert(dev, 0x10, 1).unwrap();
        bus.write(0x10, &[0]).unwrap();
        let mut data = [0u8; 1];
        bus.read(0x20, &mut data).unwrap();
        assert_eq!(data, [9]);
    }
}
