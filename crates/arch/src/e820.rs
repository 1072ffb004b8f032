//! The guest's RAM regions and the e820 map that describes them.

use vm_memory::GuestAddress;

use crate::layout::{ACPI_TABLES_START, EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};

/// e820 entry types (ACPI address range types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: GuestAddress,
    pub len_bytes: u64,
    pub kind: E820Kind,
}

/// The host-backed RAM regions of a guest with `mem_size_bytes` of memory: one below the 32-bit
/// MMIO hole, and one from 4 GiB for whatever does not fit below it.
pub fn ram_regions(mem_size_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let below_hole = MMIO_HOLE_START.0;
    if mem_size_bytes <= below_hole {
        vec![(GuestAddress(0), mem_size_bytes)]
    } else {
        vec![
            (GuestAddress(0), below_hole),
            (MMIO_HOLE_END, mem_size_bytes - below_hole),
        ]
    }
}

/// The e820 map for a guest with `mem_size_bytes` of memory (at least 1 MiB + 1 page).
///
/// RAM regions leave out the EBDA, the legacy VGA/ROM area and the ACPI tables, which are
/// listed as reserved where something lives there.
pub fn e820_map(mem_size_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: GuestAddress(0),
            len_bytes: EBDA_START.0,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            len_bytes: 0xa0000 - EBDA_START.0,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: ACPI_TABLES_START,
            len_bytes: HIMEM_START.0 - ACPI_TABLES_START.0,
            kind: E820Kind::Reserved,
        },
    ];
    for (start, len) in ram_regions(mem_size_bytes) {
        // The first region starts at 0; its usable part above the legacy area starts at 1 MiB.
        let (start, len) = if start.0 == 0 {
            (HIMEM_START, len.saturating_sub(HIMEM_START.0))
        } else {
            (start, len)
        };
        if len > 0 {
            map.push(E820Entry {
                addr: start,
                len_bytes: len,
                kind: E820Kind::Ram,
            });
        }
    }
    map
}

/// Total usable RAM the e820 map reports, in bytes.
pub fn usable_ram_bytes(map: &[E820Entry]) -> u64 {
    map.iter()
        .filter(|e| e.kind == E820Kind::Ram)
        .map(|e| e.len_bytes)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_guest_has_one_ram_region() {
        assert_eq!(ram_regions(128 * MIB), vec![(GuestAddress(0), 128 * MIB)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let regions = ram_regions(6 * GIB);
        assert_eq!(regions[0], (GuestAddress(0), 3 * GIB));
        assert_eq!(regions[1], (GuestAddress(4 * GIB), 3 * GIB));
    }

    #[test]
    fn e820_covers_ram_except_legacy_area() {
        for size in [128 * MIB, 3 * GIB, 5 * GIB] {
            let map = e820_map(size);
            assert_eq!(
                usable_ram_bytes(&map),
                size - (HIMEM_START.0 - EBDA_START.0)
            );
            for e in &map {
                let end = e.addr.0 + e.len_bytes;
                assert!(
                    end <= MMIO_HOLE_START.0 || e.addr.0 >= MMIO_HOLE_END.0,
                    "entry {e:?} overlaps the MMIO hole"
                );
            }
        }
    }

    #[test]
    fn e820_entries_do_not_overlap_and_are_sorted() {
        let map = e820_map(5 * GIB);
        for pair in map.windows(2) {
            assert!(pair[0].addr.0 + pair[0].len_bytes <= pair[1].addr.0);
        }
    }
}
