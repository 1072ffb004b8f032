//! Shared pieces of the virtio fuzz targets (`virtio_blk_request`, `virtio_blk_queue`,
//! `virtio_pci_transport`): guest memory whose regions are fenced by inaccessible guard
//! mappings, a disk image in a memfd, a counting [`VirtioInterrupt`], an input reader, and the
//! compact descriptor encoding the block targets use.
//!
//! Everything here is test scaffolding; none of it changes how the device code runs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use hypervisor::GuestMemoryMmap;
use hypervisor::GuestRegionMmap;
use virtio::VirtioInterrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, MmapRegion};

/// Guest RAM of the targets: two adjacent regions (a buffer may run from one into the next,
/// which the host sees as two mappings), a hole, and a third region; 64 KiB in all.
pub const REGIONS: [(u64, usize); 3] = [(0x0, 0x4000), (0x4000, 0x4000), (0x9000, 0x8000)];
/// The hole between the second and third region.
pub const HOLE: (u64, u64) = (0x8000, 0x9000);
/// End of the last small region.
pub const RAM_END: u64 = 0x1_1000;
/// A large region (mapped `MAP_NORESERVE`, never touched beyond a few pages) that only
/// [`memory_with_big`] has: with it, buffers long enough to reach the parser's size limit
/// still lie in guest memory.
pub const BIG_BASE: u64 = 1 << 32;
pub const BIG_LEN: usize = 0x8000_0000;

/// Inaccessible bytes placed right below and right above each small region on the host.
const GUARD: usize = 64 << 10;

/// Maps a small region between two `PROT_NONE` guards. The mapping is never unmapped: the
/// memory objects built from it live for the whole process.
fn guarded_region(gpa: u64, len: usize) -> GuestRegionMmap {
    let total = len + 2 * GUARD;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing; no existing
    // memory is affected.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), total, libc::PROT_NONE, flags, -1, 0) };
    assert_ne!(base, libc::MAP_FAILED, "cannot reserve guest memory");
    let ram = (base as usize + GUARD) as *mut libc::c_void;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: changes the protection of pages inside the mapping made just above, which
    // nothing else uses.
    let r = unsafe { libc::mprotect(ram, len, prot) };
    assert_eq!(r, 0, "cannot make guest memory accessible");
    // SAFETY: `ram .. ram + len` is a readable and writable private anonymous mapping (made
    // above with `prot` and `flags`) that is never unmapped, so it outlives the region.
    let mapping = unsafe { MmapRegion::build_raw(ram.cast(), len, prot, flags) }
        .expect("cannot describe guest memory");
    GuestRegionMmap::new(mapping, GuestAddress(gpa)).expect("guest region")
}

fn small_regions() -> Vec<GuestRegionMmap> {
    REGIONS
        .iter()
        .map(|&(gpa, len)| guarded_region(gpa, len))
        .collect()
}

/// The targets' guest memory: the three guarded small regions. Built once per process;
/// [`fill`] resets it for each input.
pub fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| GuestMemoryMmap::from_regions(small_regions()).expect("guest memory"))
}

/// [`memory`] plus the large sparse region at [`BIG_BASE`] (a separate memory object with
/// its own small regions).
pub fn memory_with_big() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        let mut regions = small_regions();
        let big = MmapRegion::new(BIG_LEN).expect("cannot map the large region");
        regions.push(GuestRegionMmap::new(big, GuestAddress(BIG_BASE)).expect("large region"));
        GuestMemoryMmap::from_regions(regions).expect("guest memory")
    })
}

/// Zeroes the small regions, then writes `bytes` from guest address `from` on, across the
/// regions in order (skipping the hole), as far as they reach.
pub fn fill(mem: &GuestMemoryMmap, from: u64, bytes: &[u8]) {
    static ZERO: [u8; 0x8000] = [0; 0x8000];
    for &(gpa, len) in &REGIONS {
        mem.write_slice(&ZERO[..len], GuestAddress(gpa))
            .expect("zeroing guest memory");
    }
    let mut left = bytes;
    for &(gpa, len) in &REGIONS {
        let end = gpa + len as u64;
        if left.is_empty() || from >= end {
            continue;
        }
        let at = from.max(gpa);
        let n = left.len().min((end - at) as usize);
        mem.write_slice(&left[..n], GuestAddress(at))
            .expect("filling guest memory");
        left = &left[n..];
    }
}

/// A split virtqueue of `size` entries with its descriptor table, available and used rings at
/// the given guest addresses, EVENT_IDX as negotiated, both ring indices at `start` (so a
/// harness can make them wrap), ready for the device.
pub fn ready_queue(
    size: u16,
    event_idx: bool,
    start: u16,
    desc: u64,
    avail: u64,
    used: u64,
) -> Queue {
    let mut q = Queue::new(size).expect("queue size");
    q.try_set_desc_table_address(GuestAddress(desc))
        .and_then(|()| q.try_set_avail_ring_address(GuestAddress(avail)))
        .and_then(|()| q.try_set_used_ring_address(GuestAddress(used)))
        .expect("ring addresses");
    q.set_event_idx(event_idx);
    q.set_next_avail(start);
    q.set_next_used(start);
    q.set_ready(true);
    q
}

/// Writes a little-endian u16 (a ring index or flags) into guest memory.
pub fn put16(mem: &GuestMemoryMmap, at: u64, v: u16) {
    mem.write_obj(v.to_le(), GuestAddress(at)).unwrap();
}

/// Reads a little-endian u16 from guest memory.
pub fn get16(mem: &GuestMemoryMmap, at: u64) -> u16 {
    u16::from_le(mem.read_obj(GuestAddress(at)).unwrap())
}

/// Reads a little-endian u32 from guest memory.
pub fn get32(mem: &GuestMemoryMmap, at: u64) -> u32 {
    u32::from_le(mem.read_obj(GuestAddress(at)).unwrap())
}

/// Writes a split-ring descriptor (address, length, flags, next) at `at`.
pub fn put_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
    put16(mem, at + 12, flags);
    put16(mem, at + 14, next);
}

/// A copy of guest memory `0 .. RAM_END` (the hole reads as zeroes).
pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = vec![0u8; RAM_END as usize];
    for &(gpa, len) in &REGIONS {
        let at = gpa as usize;
        mem.read_slice(&mut out[at..at + len], GuestAddress(gpa))
            .expect("reading guest memory");
    }
    out
}

/// Whether every byte of `addr .. addr + len` is in one of the small regions or (if `big`)
/// the large one. Written from the layout above, not with vm-memory, so it can check it.
pub fn in_ram(addr: u64, len: u64, big: bool) -> bool {
    if len == 0 {
        return true;
    }
    let Some(last) = addr.checked_add(len - 1) else {
        return false;
    };
    let mut regions: Vec<(u64, u64)> = REGIONS
        .iter()
        .map(|&(gpa, len)| (gpa, gpa + len as u64))
        .collect();
    if big {
        regions.push((BIG_BASE, BIG_BASE + BIG_LEN as u64));
    }
    let mut at = addr;
    loop {
        let Some(&(_, end)) = regions.iter().find(|&&(s, e)| s <= at && at < e) else {
            return false;
        };
        if last < end {
            return true;
        }
        at = end;
    }
}

/// A disk image in a memfd, reached by the device through `/proc/self/fd/N` (so
/// `Block::new` opens and locks it as it would a file). One per process.
pub struct Image {
    file: File,
    pub path: PathBuf,
}

pub fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        // SAFETY: memfd_create with a NUL-terminated name; it returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"ferrovisor-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        Image {
            file,
            path: PathBuf::from(format!("/proc/self/fd/{fd}")),
        }
    })
}

impl Image {
    /// Gives the image `len` bytes of a pattern that differs from sector to sector; returns
    /// the contents.
    pub fn reset(&self, len: u64, seed: u8) -> Vec<u8> {
        let content: Vec<u8> = (0..len)
            .map(|i| (i / 512).wrapping_mul(31).wrapping_add(i * 7) as u8 ^ seed)
            .collect();
        self.file.set_len(0).expect("truncating the image");
        self.file.set_len(len).expect("sizing the image");
        self.file
            .write_all_at(&content, 0)
            .expect("writing the image");
        content
    }

    pub fn len(&self) -> u64 {
        self.file.metadata().expect("image metadata").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contents(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len() as usize];
        self.file
            .read_exact_at(&mut out, 0)
            .expect("reading the image");
        out
    }
}

/// Counts the interrupts a device raises.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    pub queue: AtomicUsize,
    pub config: AtomicUsize,
}

impl CountingInterrupt {
    pub fn queue_count(&self) -> usize {
        self.queue.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn notify_queue(&self, _queue: u16) {
        self.queue.fetch_add(1, Ordering::SeqCst);
    }

    fn notify_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// Reads the fuzz input front to back; past its end every read is zero.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input(data)
    }

    pub fn u8(&mut self) -> u8 {
        match self.0 {
            [b, rest @ ..] => {
                self.0 = rest;
                *b
            }
            [] => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u24(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), 0])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// Descriptor flags (virtio 1.2, 2.7.5).
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One descriptor as the block targets encode it, in [`DESC_BYTES`] bytes:
///
/// - byte 0: bits 0-2 the descriptor flags (NEXT, WRITE, INDIRECT); bit 3: the length is
///   `u32::MAX - len`; bit 4: the length is `len << 8`; otherwise it is `len % 128 KiB`;
/// - byte 1: `next`;
/// - bytes 2-5 (LE): the address: with the top two bits 0 or 1, `value % RAM_END` (the small
///   regions and the hole); 2, in the large region at [`BIG_BASE`] (present only in
///   [`memory_with_big`]); 3, within 1 GiB below `u64::MAX`, where it wraps;
/// - bytes 6-8 (LE): `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub const DESC_BYTES: usize = 9;

impl Desc {
    pub fn read(input: &mut Input) -> Desc {
        let f = input.u8();
        let next = u16::from(input.u8());
        let a = input.u32();
        let l = input.u24();
        let addr = match a >> 30 {
            0 | 1 => u64::from(a) % RAM_END,
            2 => BIG_BASE + (u64::from(a & 0x3fff_ffff) << 1),
            _ => u64::MAX - u64::from(a & 0x3fff_ffff),
        };
        let len = if f & 0x08 != 0 {
            u32::MAX - l
        } else if f & 0x10 != 0 {
            l << 8
        } else {
            l & 0x1_ffff
        };
        Desc {
            addr,
            len,
            flags: u16::from(f & 7),
            next,
        }
    }

    pub fn writable(&self) -> bool {
        self.flags & F_WRITE != 0
    }
}

/// `VIRTIO_FUZZ_TRACE=1`: the targets describe what they do on stderr (for reproducing).
pub fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VIRTIO_FUZZ_TRACE").is_some_and(|v| v == "1"))
}
