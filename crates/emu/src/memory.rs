//! Guest physical memory as the emulator sees it: the RAM regions the VMM mapped, accessed
//! through raw host pointers. Accesses from different vCPU threads race exactly as they do on
//! real hardware; aligned accesses of up to 8 bytes use atomic loads and stores so each is
//! single-copy atomic, as x86 guarantees, and LOCK-prefixed operations use host atomics.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

/// Guest page size the dirty-page log counts in.
pub const PAGE_SIZE: u64 = 0x1000;

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
    dirty: DirtyLog,
}

/// Which RAM pages guest stores wrote while logging is on.
///
/// The interpreter's stores hit RAM through TLB entries that allow writes; while logging is
/// on, such an entry is only made for a write, and making it marks the page (`Cpu`'s
/// `tlb_insert`), so the store paths themselves check nothing. Starting the log and taking a
/// record bump `epoch`; each vCPU drops its TLB when it sees a new epoch (at the start of
/// `Cpu::run`), so the next store to any page marks it again. Page-table A/D bit updates and
/// the back end's own writes (`PhysMem::write`, `write_bytes`) mark their pages directly.
#[derive(Default)]
struct DirtyLog {
    on: AtomicBool,
    epoch: AtomicU64,
    /// One bitmap per region, in `PhysMem::regions` order; made when logging first starts.
    bitmaps: OnceLock<Vec<Box<[AtomicU64]>>>,
}

impl PhysMem {
    pub fn add(&mut self, region: RamRegion) {
        assert!(
            self.dirty.bitmaps.get().is_none(),
            "RAM regions cannot change once dirty-page logging has started"
        );
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
                self.mark_dirty(gpa);
                self.mark_dirty(gpa + size.saturating_sub(1) as u64);
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
                if let Some(last) = buf.len().checked_sub(1) {
                    let mut page = gpa & !(PAGE_SIZE - 1);
                    while page <= gpa + last as u64 {
                        self.mark_dirty(page);
                        page += PAGE_SIZE;
                    }
                }
                true
            }
            None => false,
        }
    }

    // ------------------------------------------------------------- dirty-page log

    /// Starts (or restarts, with an empty record) logging written pages.
    pub fn start_dirty_log(&self) {
        let bitmaps = self.dirty.bitmaps.get_or_init(|| {
            self.regions
                .iter()
                .map(|r| {
                    let words = r.len.div_ceil(PAGE_SIZE).div_ceil(64) as usize;
                    (0..words).map(|_| AtomicU64::new(0)).collect()
                })
                .collect()
        });
        for word in bitmaps.iter().flat_map(|b| b.iter()) {
            word.store(0, Ordering::Relaxed);
        }
        self.dirty.on.store(true, Ordering::Release);
        self.dirty.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Stops logging (the record is dropped at the next start).
    pub fn stop_dirty_log(&self) {
        self.dirty.on.store(false, Ordering::Release);
    }

    /// Whether written pages are being logged.
    #[inline(always)]
    pub fn dirty_logging(&self) -> bool {
        self.dirty.on.load(Ordering::Relaxed)
    }

    /// Changes whenever vCPUs must drop the write permissions their TLBs hold, so that their
    /// next store to each page is logged.
    #[inline(always)]
    pub fn dirty_epoch(&self) -> u64 {
        self.dirty.epoch.load(Ordering::Acquire)
    }

    /// The pages written since logging started or the last take, per region in address order
    /// (bit `i` of word `i / 64`: the page at region offset `i * 4096`), and starts a new
    /// record; `None` if logging is off.
    pub fn take_dirty_log(&self) -> Option<Vec<(u64, Vec<u64>)>> {
        if !self.dirty_logging() {
            return None;
        }
        let bitmaps = self.dirty.bitmaps.get()?;
        let taken = self
            .regions
            .iter()
            .zip(bitmaps)
            .map(|(r, b)| {
                let words = b.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect();
                (r.gpa, words)
            })
            .collect();
        self.dirty.epoch.fetch_add(1, Ordering::AcqRel);
        Some(taken)
    }

    /// Records a write to the page holding `gpa`, if logging is on and it is RAM.
    #[inline(always)]
    pub fn mark_dirty(&self, gpa: u64) {
        if self.dirty_logging() {
            self.mark_dirty_slow(gpa);
        }
    }

    #[cold]
    fn mark_dirty_slow(&self, gpa: u64) {
        let Some(bitmaps) = self.dirty.bitmaps.get() else {
            return;
        };
        for (r, b) in self.regions.iter().zip(bitmaps) {
            if gpa >= r.gpa && gpa - r.gpa < r.len {
                let page = (gpa - r.gpa) / PAGE_SIZE;
                if let Some(w) = b.get((page / 64) as usize) {
                    w.fetch_or(1 << (page % 64), Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// A fresh private anonymous read/write mapping of `len` bytes, without swap reservation
/// (pages take host memory only when touched); None if the kernel refuses it.
pub fn map_anonymous(len: usize) -> Option<std::ptr::NonNull<u8>> {
    // SAFETY: a new mapping at an address the kernel picks; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    std::ptr::NonNull::new(p.cast())
}

/// Loads `size` (1, 2, 4, 8) bytes, little-endian.
///
/// # Safety
/// `p..p+size` must be mapped and valid for reads.
#[inline(always)]
pub unsafe fn load(p: *const u8, size: usize) -> u64 {
    if matches!(size, 1 | 2 | 4 | 8) && (p as usize) & (size - 1) == 0 {
        // SAFETY: the caller guarantees the bytes are mapped; `p` is aligned to `size`.
        return unsafe { load_aligned(p, size) };
    }
    let mut v = 0u64;
    for i in 0..size {
        // SAFETY: the caller guarantees `p..p+size` is mapped.
        v |= u64::from(unsafe { std::ptr::read_volatile(p.add(i)) }) << (8 * i);
    }
    v
}

/// Loads `size` (1, 2, 4, 8) bytes at `p`, which is aligned to `size`: one atomic load.
///
/// # Safety
/// `p..p+size` must be mapped, and `p` a multiple of `size`.
#[inline(always)]
pub unsafe fn load_aligned(p: *const u8, size: usize) -> u64 {
    debug_assert_eq!(p as usize & (size - 1), 0);
    // SAFETY: the caller guarantees the bytes are mapped and `p` aligned for the atomic type.
    unsafe {
        match size {
            1 => u64::from((*(p as *const AtomicU8)).load(Ordering::Relaxed)),
            2 => u64::from((*(p as *const AtomicU16)).load(Ordering::Relaxed)),
            4 => u64::from((*(p as *const AtomicU32)).load(Ordering::Relaxed)),
            _ => (*(p as *const AtomicU64)).load(Ordering::Relaxed),
        }
    }
}

/// Stores the low `size` (1, 2, 4, 8) bytes of `v` at `p`, which is aligned to `size`: one
/// atomic store.
///
/// # Safety
/// `p..p+size` must be mapped and valid for writes, and `p` a multiple of `size`.
#[inline(always)]
pub unsafe fn store_aligned(p: *mut u8, size: usize, v: u64) {
    debug_assert_eq!(p as usize & (size - 1), 0);
    // SAFETY: as in `load_aligned`.
    unsafe {
        match size {
            1 => (*(p as *const AtomicU8)).store(v as u8, Ordering::Relaxed),
            2 => (*(p as *const AtomicU16)).store(v as u16, Ordering::Relaxed),
            4 => (*(p as *const AtomicU32)).store(v as u32, Ordering::Relaxed),
            _ => (*(p as *const AtomicU64)).store(v, Ordering::Relaxed),
        }
    }
}

/// Stores the low `size` (1, 2, 4, 8) bytes of `v`, little-endian.
///
/// # Safety
/// `p..p+size` must be mapped and valid for writes.
#[inline(always)]
pub unsafe fn store(p: *mut u8, size: usize, v: u64) {
    if matches!(size, 1 | 2 | 4 | 8) && (p as usize) & (size - 1) == 0 {
        // SAFETY: the caller guarantees the bytes are mapped and writable; `p` is aligned.
        return unsafe { store_aligned(p, size, v) };
    }
    for i in 0..size {
        // SAFETY: the caller guarantees `p..p+size` is mapped and writable.
        unsafe { std::ptr::write_volatile(p.add(i), (v >> (8 * i)) as u8) };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two regions over one host buffer: 16 pages at 0, 70 pages at 1 MiB.
    fn mem(buf: &mut [u64]) -> PhysMem {
        let host = buf.as_mut_ptr().cast::<u8>();
        let mut m = PhysMem::default();
        m.add(RamRegion {
            gpa: 0x10_0000,
            len: 70 * PAGE_SIZE,
            // SAFETY: 16 pages into the 86-page buffer.
            host: unsafe { host.add(16 * PAGE_SIZE as usize) },
        });
        m.add(RamRegion {
            gpa: 0,
            len: 16 * PAGE_SIZE,
            host,
        });
        m
    }

    fn pages(log: &[(u64, Vec<u64>)]) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for (gpa, words) in log {
            for (i, w) in words.iter().enumerate() {
                for b in 0..64 {
                    if w & (1 << b) != 0 {
                        v.push((*gpa, i as u64 * 64 + b));
                    }
                }
            }
        }
        v
    }

    #[test]
    fn dirty_log_marks_back_end_writes_per_page() {
        let mut buf = vec![0u64; 86 * 512];
        let m = mem(&mut buf);
        assert!(m.take_dirty_log().is_none(), "off until started");
        m.write(0x20, 4, 1);
        let epoch = m.dirty_epoch();
        m.start_dirty_log();
        assert_ne!(m.dirty_epoch(), epoch, "starting tells the vCPUs");
        m.write(0x1ffe, 4, 1); // straddles pages 1 and 2
        assert!(m.write_bytes(0x10_0000 + 69 * PAGE_SIZE + 10, &[1; 8]));
        m.mark_dirty(0x5000_0000); // not RAM: ignored
        let log = m.take_dirty_log().unwrap();
        assert_eq!(log.iter().map(|(_, w)| w.len()).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(pages(&log), [(0, 1), (0, 2), (0x10_0000, 69)]);
        assert_eq!(pages(&m.take_dirty_log().unwrap()), []);
        m.write(0, 1, 1);
        m.start_dirty_log();
        assert_eq!(pages(&m.take_dirty_log().unwrap()), [], "a restart clears");
        m.stop_dirty_log();
        m.write(0, 1, 1);
        assert!(m.take_dirty_log().is_none());
    }
}
