//! Linear → physical translation (paging off, or 4-level long-mode paging with 4 KiB, 2 MiB
//! and 1 GiB pages), a software TLB, and memory access by linear address.

use super::state::{cr0, cr4, efer, CpuState};
use super::{vector, Cpu, Exec, Fault, IoReq};
use crate::memory;

/// Kind of access, for permission checks and page-fault error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read = 0,
    Write = 1,
    Exec = 2,
}

/// TLB entries (direct-mapped by linear page). The kernel's I/O path touches more pages than
/// 1 024 entries hold: 4 096 cut the host instructions per 4 KiB read by 4 % (fewer walks;
/// bench/emu-cost.sh). Flushes visit only the entries in use (`Tlb::live`).
const TLB_ENTRIES: usize = 4096;
const PAGE_MASK: u64 = !0xfff;

const PTE_P: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_U: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_G: u64 = 1 << 8;
const PTE_NX: u64 = 1 << 63;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Permission bits kept in a TLB entry.
const T_WRITE: u8 = 1;
const T_USER: u8 = 2;
const T_EXEC: u8 = 4;
/// The dirty bit is already set in the guest PTE (or paging is off): writes need no walk.
const T_DIRTY: u8 = 8;
const T_GLOBAL: u8 = 16;

/// A cached translation. `tags[mode * 3 + access]` holds the page's tag (linear page |
/// [`TAG_VALID`]) when that access is allowed without a walk in that mode (0 supervisor,
/// 1 user), and 0 otherwise, so a lookup is one compare whatever the access.
#[derive(Clone, Copy)]
struct TlbEntry {
    tags: [u64; 6],
    /// Physical page address.
    gpa: u64,
    /// Host address of the page if it is RAM, else null (MMIO).
    host: *mut u8,
    perm: u8,
}

const EMPTY: TlbEntry = TlbEntry {
    tags: [0; 6],
    gpa: 0,
    host: std::ptr::null_mut(),
    perm: 0,
};

pub struct Tlb {
    entries: Box<[TlbEntry; TLB_ENTRIES]>,
    /// One bit per entry that holds a translation, so that a flush (every MOV to CR3 of a
    /// guest switching processes) touches only those, not the whole table.
    live: Box<[u64; TLB_ENTRIES / 64]>,
}

impl Tlb {
    pub fn new() -> Self {
        // Zeroed memory is an empty table (`EMPTY` is all zeros), and from the allocator it is
        // fresh zero pages that take host memory only once an entry in them is filled: a
        // clone restored from a snapshot fills a fraction of the 288 KiB.
        let entries = Box::<[TlbEntry; TLB_ENTRIES]>::new_zeroed();
        // SAFETY: every field of `TlbEntry` is an integer or a raw pointer, for which all
        // zeros is a valid value (`EMPTY`).
        let entries = unsafe { entries.assume_init() };
        Tlb {
            entries,
            live: Box::new([0; TLB_ENTRIES / 64]),
        }
    }

    /// Fills entry `i`.
    #[inline(always)]
    fn set(&mut self, i: usize, e: TlbEntry) {
        self.entries[i] = e;
        self.live[i / 64] |= 1 << (i % 64);
    }

    /// Empties the entries in use that `drop` picks.
    fn flush_where(&mut self, drop: impl Fn(&TlbEntry) -> bool) {
        for (w, word) in self.live.iter_mut().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let i = w * 64 + b;
                if drop(&self.entries[i]) {
                    self.entries[i] = EMPTY;
                    *word &= !(1 << b);
                }
            }
        }
    }

    pub fn flush_all(&mut self) {
        self.flush_where(|_| true);
    }

    /// Drops non-global entries (MOV to CR3 with PGE on).
    pub fn flush_non_global(&mut self) {
        self.flush_where(|e| e.perm & T_GLOBAL == 0);
    }

    pub fn flush_page(&mut self, lin: u64) {
        let i = index(lin);
        if self.entries[i].tags.contains(&tag(lin)) {
            self.entries[i] = EMPTY;
            self.live[i / 64] &= !(1 << (i % 64));
        }
    }
}

/// Where generated code finds a TLB entry's parts (`translate`): the entries' pointer in a
/// [`Tlb`], an entry's size and the offsets of its tags and host address; the entry count, the
/// valid bit of a tag and the page mask of a linear address.
pub(crate) mod layout {
    use super::{Tlb, TlbEntry};
    pub const ENTRIES_PTR: usize = std::mem::offset_of!(Tlb, entries);
    pub const ENTRY_SIZE: usize = std::mem::size_of::<TlbEntry>();
    pub const TAGS: usize = std::mem::offset_of!(TlbEntry, tags);
    pub const HOST: usize = std::mem::offset_of!(TlbEntry, host);
    pub const ENTRIES: usize = super::TLB_ENTRIES;
    pub const TAG_VALID: u64 = super::TAG_VALID;
    pub const PAGE_MASK: u64 = super::PAGE_MASK;
}

#[inline(always)]
fn index(lin: u64) -> usize {
    ((lin >> 12) as usize) & (TLB_ENTRIES - 1)
}

/// Set in every tag, so a tag is never 0 (the "not allowed" value). Bit 11: above the
/// low bits the fast path's alignment check keeps (`Cpu::tlb_hit`), below the page number.
const TAG_VALID: u64 = 0x800;

#[inline(always)]
fn tag(lin: u64) -> u64 {
    (lin & PAGE_MASK) | TAG_VALID
}

fn page_fault(
    cpu: &mut CpuState,
    lin: u64,
    acc: Access,
    user: bool,
    present: bool,
    rsvd: bool,
) -> Fault {
    cpu.cr2 = lin;
    let mut code = 0u32;
    if present {
        code |= 1;
    }
    if acc == Access::Write {
        code |= 2;
    }
    if user {
        code |= 4;
    }
    if rsvd {
        code |= 8;
    }
    if acc == Access::Exec && cpu.efer & efer::NXE != 0 {
        code |= 16;
    }
    Fault::Exception {
        vector: vector::PF,
        error_code: Some(code),
    }
}

impl Cpu {
    /// Linear address of `offset` in segment `seg`.
    #[inline(always)]
    pub(crate) fn linear(&self, seg: usize, offset: u64) -> u64 {
        if self.s.long_mode() && self.s.seg[super::state::CS].long() {
            if seg >= super::state::FS {
                self.s.seg[seg].base.wrapping_add(offset)
            } else {
                offset
            }
        } else {
            self.s.seg[seg].base.wrapping_add(offset) & 0xffff_ffff
        }
    }

    /// Translates `lin` for `acc`, filling the TLB. Returns the TLB entry index.
    fn tlb_fill(&mut self, lin: u64, acc: Access) -> Exec<usize> {
        let user = self.s.cpl() == 3 && !self.supervisor_access;
        let i = index(lin);
        if self.s.cr0 & cr0::PG == 0 {
            let gpa = lin & PAGE_MASK & 0xffff_ffff;
            return Ok(self.tlb_insert(i, lin, gpa, T_WRITE | T_USER | T_EXEC | T_DIRTY, acc));
        }
        if self.s.cr4 & cr4::PAE == 0 || self.s.efer & efer::LMA == 0 {
            return self.tlb_fill_legacy(lin, acc, user, i);
        }
        // Canonical check: bits 63..47 must equal bit 47.
        let top = (lin as i64) >> 47;
        if top != 0 && top != -1 {
            return Err(Fault::Exception {
                vector: vector::GP,
                error_code: Some(0),
            });
        }
        let nxe = self.s.efer & efer::NXE != 0;
        let mut table = self.s.cr3 & PTE_ADDR;
        let mut perm_w = true;
        let mut perm_u = true;
        let mut perm_x = true;
        let mut entries: [(u64, u64); 4] = [(0, 0); 4];
        let mut level = 4;
        let (gpa_page, leaf_at, global) = loop {
            let shift = 12 + 9 * (level - 1);
            let pte_addr = table + ((lin >> shift) & 0x1ff) * 8;
            let Some(pte) = self.mem.read(pte_addr, 8) else {
                // Page tables outside RAM: treat as not present.
                return Err(page_fault(&mut self.s, lin, acc, user, false, false));
            };
            if pte & PTE_P == 0 {
                return Err(page_fault(&mut self.s, lin, acc, user, false, false));
            }
            if pte & PTE_NX != 0 && !nxe {
                return Err(page_fault(&mut self.s, lin, acc, user, true, true));
            }
            entries[4 - level] = (pte_addr, pte);
            perm_w &= pte & PTE_W != 0;
            perm_u &= pte & PTE_U != 0;
            perm_x &= !(nxe && pte & PTE_NX != 0);
            let is_leaf = level == 1 || (pte & PTE_PS != 0 && level <= 3);
            if is_leaf {
                let page_bits = shift;
                let base = pte & PTE_ADDR & !((1u64 << page_bits) - 1);
                let gpa = base | (lin & ((1u64 << page_bits) - 1) & PAGE_MASK);
                break (gpa, 4 - level, pte & PTE_G != 0);
            }
            table = pte & PTE_ADDR;
            level -= 1;
        };
        // Permission checks.
        let wp = self.s.cr0 & cr0::WP != 0;
        let denied = match acc {
            Access::Read => user && !perm_u,
            Access::Write => (user && (!perm_u || !perm_w)) || (!perm_w && wp),
            Access::Exec => (user && !perm_u) || !perm_x,
        };
        if denied {
            return Err(page_fault(&mut self.s, lin, acc, user, true, false));
        }
        // Accessed bits on every level; dirty on the leaf for writes.
        for (k, &(addr, pte)) in entries.iter().enumerate().take(leaf_at + 1) {
            let mut want = pte | PTE_A;
            if k == leaf_at && acc == Access::Write {
                want |= PTE_D;
            }
            if want != pte {
                if let Some(p) = self.mem.host_ptr(addr, 8) {
                    // SAFETY: a mapped, 8-byte aligned PTE in guest RAM; set bits atomically
                    // as the hardware walker does.
                    unsafe {
                        memory::atomic_rmw(p, 8, |old| Some(old | (want & (PTE_A | PTE_D))));
                    }
                    // Code sharing a page with page tables is rare, but a CPU would see it.
                    self.note_store(p, 8);
                    self.mem.mark_dirty(addr);
                }
            }
        }
        let leaf = entries[leaf_at].1;
        let dirty = acc == Access::Write || leaf & PTE_D != 0;
        let mut perm = 0;
        // Supervisor writes to read-only pages are allowed without CR0.WP.
        if perm_w || (!user && !wp) {
            perm |= T_WRITE;
        }
        if perm_u {
            perm |= T_USER;
        }
        if perm_x {
            perm |= T_EXEC;
        }
        if dirty {
            perm |= T_DIRTY;
        }
        if global && self.s.cr4 & cr4::PGE != 0 {
            perm |= T_GLOBAL;
        }
        Ok(self.tlb_insert(i, lin, gpa_page, perm, acc))
    }

    /// Fills TLB slot `i` with the translation of `lin` to `gpa_page`, made for an access of
    /// kind `acc`; returns `i`. While the dirty-page log is on, only a write makes an entry
    /// that allows writes, and it marks the page written.
    fn tlb_insert(
        &mut self,
        i: usize,
        lin: u64,
        gpa_page: u64,
        mut perm: u8,
        acc: Access,
    ) -> usize {
        if self.mem.dirty_logging() {
            if acc == Access::Write {
                self.mem.mark_dirty(gpa_page);
            } else {
                perm &= !T_DIRTY;
            }
        }
        let t = tag(lin);
        let on = |allowed: bool| if allowed { t } else { 0 };
        let (w, u, x) = (perm & T_WRITE != 0, perm & T_USER != 0, perm & T_EXEC != 0);
        // Writes to a page whose dirty bit is clear walk again, to set it.
        let d = perm & T_DIRTY != 0;
        self.tlb.set(
            i,
            TlbEntry {
                tags: [t, on(w && d), on(x), on(u), on(u && w && d), on(u && x)],
                gpa: gpa_page,
                host: self.mem.page_ptr(gpa_page).unwrap_or(std::ptr::null_mut()),
                perm,
            },
        );
        i
    }

    /// 32-bit paging (no PAE) and PAE paging outside long mode.
    fn tlb_fill_legacy(&mut self, lin: u64, acc: Access, user: bool, i: usize) -> Exec<usize> {
        let lin32 = lin & 0xffff_ffff;
        let (gpa_page, w, u) = if self.s.cr4 & cr4::PAE == 0 {
            let pde_addr = (self.s.cr3 & 0xffff_f000) + ((lin32 >> 22) & 0x3ff) * 4;
            let pde = self.mem.read(pde_addr, 4).unwrap_or(0);
            if pde & PTE_P == 0 {
                return Err(page_fault(&mut self.s, lin, acc, user, false, false));
            }
            if pde & PTE_PS != 0 && self.s.cr4 & cr4::PSE != 0 {
                (
                    (pde & 0xffc0_0000) | (lin32 & 0x003f_f000),
                    pde & PTE_W != 0,
                    pde & PTE_U != 0,
                )
            } else {
                let pte_addr = (pde & 0xffff_f000) + ((lin32 >> 12) & 0x3ff) * 4;
                let pte = self.mem.read(pte_addr, 4).unwrap_or(0);
                if pte & PTE_P == 0 {
                    return Err(page_fault(&mut self.s, lin, acc, user, false, false));
                }
                (
                    pte & 0xffff_f000,
                    pde & pte & PTE_W != 0,
                    pde & pte & PTE_U != 0,
                )
            }
        } else {
            let pdpte_addr = (self.s.cr3 & 0xffff_ffe0) + ((lin32 >> 30) & 3) * 8;
            let pdpte = self.mem.read(pdpte_addr, 8).unwrap_or(0);
            if pdpte & PTE_P == 0 {
                return Err(page_fault(&mut self.s, lin, acc, user, false, false));
            }
            let pde_addr = (pdpte & PTE_ADDR) + ((lin32 >> 21) & 0x1ff) * 8;
            let pde = self.mem.read(pde_addr, 8).unwrap_or(0);
            if pde & PTE_P == 0 {
                return Err(page_fault(&mut self.s, lin, acc, user, false, false));
            }
            if pde & PTE_PS != 0 {
                (
                    (pde & PTE_ADDR & !0x1f_ffff) | (lin32 & 0x1f_f000),
                    pde & PTE_W != 0,
                    pde & PTE_U != 0,
                )
            } else {
                let pte_addr = (pde & PTE_ADDR) + ((lin32 >> 12) & 0x1ff) * 8;
                let pte = self.mem.read(pte_addr, 8).unwrap_or(0);
                if pte & PTE_P == 0 {
                    return Err(page_fault(&mut self.s, lin, acc, user, false, false));
                }
                (
                    pte & PTE_ADDR,
                    pde & pte & PTE_W != 0,
                    pde & pte & PTE_U != 0,
                )
            }
        };
        let wp = self.s.cr0 & cr0::WP != 0;
        let denied = match acc {
            Access::Read | Access::Exec => user && !u,
            Access::Write => (user && (!u || !w)) || (!w && wp),
        };
        if denied {
            return Err(page_fault(&mut self.s, lin, acc, user, true, false));
        }
        // Accessed/dirty bits are not maintained in legacy modes (no 64-bit guest relies on
        // them before it enters long mode).
        let mut perm = T_EXEC | T_DIRTY;
        if w || (!user && !wp) {
            perm |= T_WRITE;
        }
        if u {
            perm |= T_USER;
        }
        Ok(self.tlb_insert(i, lin, gpa_page, perm, acc))
    }

    /// The TLB entry for `lin` valid for `acc`, walking the page tables on a miss.
    #[inline(always)]
    fn tlb_lookup(&mut self, lin: u64, acc: Access) -> Exec<usize> {
        let i = index(lin);
        let user = self.s.cpl() == 3 && !self.supervisor_access;
        if self.tlb.entries[i].tags[user as usize * 3 + acc as usize] == tag(lin) {
            return Ok(i);
        }
        self.tlb_fill(lin, acc)
    }

    /// Host pointer for a `size`-byte access at `lin` when the TLB already allows it and it
    /// is RAM within one page; None sends the caller to the general path (`read_lin`,
    /// `write_lin`), which walks, faults, crosses pages and reaches devices.
    #[inline(always)]
    pub(crate) fn tlb_hit(&self, lin: u64, size: usize, acc: Access) -> Option<*mut u8> {
        let e = &self.tlb.entries[index(lin)];
        // The tag with the address's low bits below the access size kept: only a naturally
        // aligned access matches, and an aligned access never crosses a page. (Unaligned
        // ones take the general path.)
        let probe = (lin & (PAGE_MASK | (size as u64 - 1))) | TAG_VALID;
        if e.tags[usize::from(self.tlb_user) * 3 + acc as usize] != probe || e.host.is_null() {
            return None;
        }
        // SAFETY: the entry maps a RAM page and the access, aligned, is inside it.
        Some(unsafe { e.host.add((lin & 0xfff) as usize) })
    }

    /// Sets the TLB mode the fast path uses (`Cpu::tlb_user`) from the CPL and whether this
    /// is an implicit supervisor access.
    #[inline(always)]
    pub(crate) fn refresh_tlb_mode(&mut self) {
        self.tlb_user = self.s.cpl() == 3 && !self.supervisor_access;
    }

    /// Host pointer for `lin` for `acc`, None if it is a device page; faults as an access of
    /// that kind would.
    pub(crate) fn ram_ptr(&mut self, lin: u64, acc: Access) -> Exec<Option<*mut u8>> {
        let i = self.tlb_lookup(lin, acc)?;
        let e = self.tlb.entries[i];
        if e.host.is_null() {
            return Ok(None);
        }
        // SAFETY: the page is mapped RAM; the offset is below 4096.
        Ok(Some(unsafe { e.host.add((lin & 0xfff) as usize) }))
    }

    /// Host pointer for `lin` (which must be RAM) for `acc`.
    pub(crate) fn translate_host(&mut self, lin: u64, acc: Access) -> Exec<*mut u8> {
        let i = self.tlb_lookup(lin, acc)?;
        let e = self.tlb.entries[i];
        if e.host.is_null() {
            return Err(Fault::FetchFromMmio);
        }
        // SAFETY: the page is mapped RAM; the offset is below 4096.
        Ok(unsafe { e.host.add((lin & 0xfff) as usize) })
    }

    /// Physical address of `lin` for `acc`.
    pub(crate) fn translate(&mut self, lin: u64, acc: Access) -> Exec<u64> {
        let i = self.tlb_lookup(lin, acc)?;
        Ok(self.tlb.entries[i].gpa | (lin & 0xfff))
    }

    pub(crate) fn invlpg(&mut self, lin: u64) {
        self.tlb.flush_page(lin);
    }

    pub(crate) fn tlb_flush_cr3(&mut self) {
        if self.s.cr4 & cr4::PGE != 0 {
            self.tlb.flush_non_global();
        } else {
            self.tlb.flush_all();
        }
    }

    pub(crate) fn tlb_flush_all(&mut self) {
        self.tlb.flush_all();
    }

    /// Reads `size` bytes at `lin` as an implicit supervisor access (descriptor tables, TSS,
    /// interrupt stack frames), whatever the CPL.
    pub(crate) fn read_sys(&mut self, lin: u64, size: usize) -> Exec<u64> {
        self.supervisor_access = true;
        self.refresh_tlb_mode();
        let r = self.read_lin(lin, size, Access::Read);
        self.supervisor_access = false;
        self.refresh_tlb_mode();
        r
    }

    /// Writes as an implicit supervisor access.
    pub(crate) fn write_sys(&mut self, lin: u64, size: usize, v: u64) -> Exec {
        self.supervisor_access = true;
        self.refresh_tlb_mode();
        let r = self.write_lin(lin, size, v);
        self.supervisor_access = false;
        self.refresh_tlb_mode();
        r
    }

    /// Reads `size` (1, 2, 4, 8) bytes at linear address `lin`.
    #[inline]
    pub(crate) fn read_lin(&mut self, lin: u64, size: usize, acc: Access) -> Exec<u64> {
        if (lin & 0xfff) as usize + size > 0x1000 {
            let mut v = 0;
            for k in 0..size {
                v |= self.read_lin(lin.wrapping_add(k as u64), 1, acc)? << (8 * k);
            }
            return Ok(v);
        }
        let i = self.tlb_lookup(lin, acc)?;
        let e = self.tlb.entries[i];
        if !e.host.is_null() {
            // SAFETY: mapped RAM page, access within it.
            return Ok(unsafe { memory::load(e.host.add((lin & 0xfff) as usize), size) });
        }
        self.mmio_read(e.gpa | (lin & 0xfff), size)
    }

    /// Writes `size` bytes of `v` at linear address `lin`.
    #[inline]
    pub(crate) fn write_lin(&mut self, lin: u64, size: usize, v: u64) -> Exec {
        if (lin & 0xfff) as usize + size > 0x1000 {
            // Check both pages first so a fault leaves memory untouched.
            let second = (lin | 0xfff).wrapping_add(1);
            self.tlb_lookup(lin, Access::Write)?;
            self.tlb_lookup(second, Access::Write)?;
            for k in 0..size {
                self.write_lin(lin.wrapping_add(k as u64), 1, v >> (8 * k))?;
            }
            return Ok(());
        }
        let i = self.tlb_lookup(lin, Access::Write)?;
        let e = self.tlb.entries[i];
        if !e.host.is_null() {
            // SAFETY: mapped RAM page, access within it.
            let p = unsafe { e.host.add((lin & 0xfff) as usize) };
            // SAFETY: as above.
            unsafe { memory::store(p, size, v) };
            self.note_store(p, size);
            return Ok(());
        }
        self.mmio_write(e.gpa | (lin & 0xfff), size, v);
        Ok(())
    }

    /// A read of physical `gpa` that is not RAM.
    fn mmio_read(&mut self, gpa: u64, size: usize) -> Exec<u64> {
        let req = IoReq::MmioRead {
            gpa,
            size: size as u8,
        };
        if let Some(v) = self.m.mmio_read(gpa, size as u8) {
            return Ok(v);
        }
        if let Some((r, v)) = self.io.response {
            if r == req {
                self.io.response = None;
                return Ok(v);
            }
        }
        self.io.exit = Some(req);
        Err(Fault::NeedIo)
    }

    fn mmio_write(&mut self, gpa: u64, size: usize, v: u64) {
        if self.m.mmio_write(gpa, size as u8, v) {
            return;
        }
        self.io.exit = Some(IoReq::MmioWrite {
            gpa,
            size: size as u8,
            value: v,
        });
    }
}
