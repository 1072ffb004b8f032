//! Guest physical memory as the emulator sees it: the RAM regions the VMM mapped, accessed
//! through raw host pointers. Accesses from different vCPU threads race exactly as they do on
//! real hardware; aligned accesses of up to 8 bytes use atomic loads and stores so each is
//! single-copy atomic, as x86 guarantees, and LOCK-prefixed operations use host atomics.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// One RAM region.
#[derive(Clone, Copy, Debug)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub host: *mut u8,
}

// SAFETY: the host pointers refer to mappings the VMM keeps alive for the VM's lifetime
// (`Vm::map_memory` contract); all access through them is by atomics or volatile copies.
unsafe impl Send for RamRegion {}
// SAFETY: as above.
unsafe impl Sync for RamRegion {}

/// All guest RAM. Regions never overlap; lookups are linear (a VM has one or two).
#[derive(Default)]
pub struct PhysMem {
    regions: Vec<RamRegion>,
}

impl PhysMem {
    pub fn add(&mut self, region: RamRegion) {
        self.regions.push(region);
        self.regions.sort_by_key(|r| r.gpa);
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Host pointer for `len` bytes at `gpa`, if they are all RAM in one region.
    #[inline]
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            if gpa >= r.gpa && gpa - r.gpa < r.len {
                let off = gpa - r.gpa;
                if len > r.len - off {
                    return None;
                }
                // SAFETY: off < r.len, so the result stays inside the mapping.
                return Some(unsafe { r.host.add(off as usize) });
            }
        }
        None
    }

    /// The RAM page containing `gpa` (4 KiB aligned), if any.
    #[inline]
    pub fn page_ptr(&self, gpa: u64) -> Option<*mut u8> {
        self.host_ptr(gpa & !0xfff, 0x1000)
    }

    /// Reads up to 8 bytes of RAM at `gpa`.
    pub fn read(&self, gpa: u64, size: usize) -> Option<u64> {
        let p = self.host_ptr(gpa, size as u64)?;
        // SAFETY: host_ptr checked that `size` bytes at `p` are mapped guest RAM.
        Some(unsafe { load(p, size) })
    }

    /// Writes up to 8 bytes of RAM at `gpa`; false if it is not RAM.
    pub fn write(&self, gpa: u64, size: usize, value: u64) -> bool {
        match self.host_ptr(gpa, size as u64) {
            Some(p) => {
                // SAFETY: as in `read`.
                unsafe { store(p, size, value) };
                true
            }
            None => false,
        }
    }

    /// Copies guest RAM into `buf`; false if any byte is not RAM.
    pub fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.host_ptr(gpa, buf.len() as u64) {
            Some(p) => {
                for (i, b) in buf.iter_mut().enumerate() {
                    // SAFETY: host_ptr checked the whole range.
                    *b = unsafe { std::ptr::read_volatile(p.add(i)) };
                }
                true
            }
            None => false,
        }
    }

    /// Copies `buf` into guest RAM; false if any byte is not RAM.
    pub fn write_bytes(&self, gpa: u64, buf: &[u8]) -> bool {
        match self.host_ptr(gpa, buf.len() as u64) {
            Some(p) => {
                for (i, b) in buf.iter().enumerate() {
                    // SAFETY: host_ptr checked the whole range.
                    unsafe { std::ptr::write_volatile(p.add(i), *b) };
                }
                true
            }
            None => false,
        }
    }
}

/// Loads `size` (1, 2, 4, 8) bytes, little-endian.
///
/// # Safety
/// `p..p+size` must be mapped and valid for reads.
#[inline(always)]
pub unsafe fn load(p: *const u8, size: usize) -> u64 {
    let aligned = (p as usize) & (size - 1) == 0;
    // SAFETY: the caller guarantees the bytes are mapped; the atomic types are only used
    // when `p` is aligned for them.
    unsafe {
        match size {
            1 => u64::from((*(p as *const AtomicU8)).load(Ordering::Relaxed)),
            2 if aligned => u64::from((*(p as *const AtomicU16)).load(Ordering::Relaxed)),
            4 if aligned => u64::from((*(p as *const AtomicU32)).load(Ordering::Relaxed)),
            8 if aligned => (*(p as *const AtomicU64)).load(Ordering::Relaxed),
            _ => {
                let mut v = 0u64;
                for i in 0..size {
                    v |= u64::from(std::ptr::read_volatile(p.add(i))) << (8 * i);
                }
                v
            }
        }
    }
}

/// Stores the low `size` (1, 2, 4, 8) bytes of `v`, little-endian.
///
/// # Safety
/// `p..p+size` must be mapped and valid for writes.
#[inline(always)]
pub unsafe fn store(p: *mut u8, size: usize, v: u64) {
    let aligned = (p as usize) & (size - 1) == 0;
    // SAFETY: as in `load`.
    unsafe {
        match size {
            1 => (*(p as *const AtomicU8)).store(v as u8, Ordering::Relaxed),
            2 if aligned => (*(p as *const AtomicU16)).store(v as u16, Ordering::Relaxed),
            4 if aligned => (*(p as *const AtomicU32)).store(v as u32, Ordering::Relaxed),
            8 if aligned => (*(p as *const AtomicU64)).store(v, Ordering::Relaxed),
            _ => {
                for i in 0..size {
                    std::ptr::write_volatile(p.add(i), (v >> (8 * i)) as u8);
                }
            }
        }
    }
}

/// Atomically replaces the `size`-byte value at `p` with `f(old)` if `f` returns `Some`;
/// returns the old value. Used for LOCK-prefixed read-modify-write instructions. Misaligned
/// locked accesses (split locks) fall back to a non-atomic update.
///
/// # Safety
/// `p..p+size` must be mapped and valid for reads and writes.
pub unsafe fn atomic_rmw(p: *mut u8, size: usize, mut f: impl FnMut(u64) -> Option<u64>) -> u64 {
    macro_rules! cas_loop {
        ($t:ty, $int:ty) => {{
            // SAFETY: aligned (checked by the caller of the macro) and mapped.
            let a = unsafe { &*(p as *const $t) };
            let mut old = a.load(Ordering::SeqCst);
            loop {
                match f(u64::from(old)) {
                    None => break u64::from(old),
                    Some(new) => {
                        match a.compare_exchange_weak(
                            old,
                            new as $int,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        ) {
                            Ok(_) => break u64::from(old),
                            Err(actual) => old = actual,
                        }
                    }
                }
            }
        }};
    }
    let aligned = (p as usize) & (size - 1) == 0;
    match size {
        1 => cas_loop!(AtomicU8, u8),
        2 if aligned => cas_loop!(AtomicU16, u16),
        4 if aligned => cas_loop!(AtomicU32, u32),
        8 if aligned => cas_loop!(AtomicU64, u64),
        _ => {
            // SAFETY: mapped per the contract.
            let old = unsafe { load(p, size) };
            if let Some(new) = f(old) {
                // SAFETY: as above.
                unsafe { store(p, size, new) };
            }
            old
        }
    }
}
