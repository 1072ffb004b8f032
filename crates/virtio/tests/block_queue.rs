//! The virtio-blk device through a real split virtqueue in guest memory: the driver side is
//! virtio-queue's `MockSplitQueue` (descriptor table and available ring at guest address 0),
//! the image a temporary file.
//!
//! The used ring is placed here, at [`USED_RING`], and read directly: the mock puts it at
//! `avail.end()`, which in virtio-queue 0.18 is the available ring's entries plus its *length*
//! in elements rather than bytes, so a mock used ring overlaps the second half of the
//! available ring.
//!

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hypervisor::GuestMemoryMmap;
use virtio::block::Block;
use virtio::{features, Activation, VirtioDevice, VirtioInterrupt};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

mod support;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const QUEUE_SIZE: u16 = 16;
/// Where the used ring goes (clear of the mock's descriptor table and available ring).
const USED_RING: u64 = 0x1000;
/// Headers, data buffers and status bytes live from here on (the rings are below).
const BUFFERS: u64 = 0x1_0000;
const MEM_SIZE: usize = 0x4_0000;
const SECTOR: usize = 512;

/// A temporary image file, removed when dropped.
struct TempImage(PathBuf);

impl TempImage {
    fn new(tag: &str, contents: &[u8]) -> TempImage {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "fv-virtio-{tag}-{}-{}.img",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempImage(path)
    }

    fn read(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Default)]
struct CountingInterrupt {
    queue: AtomicUsize,
}

impl VirtioInterrupt for CountingInterrupt {
    fn notify_queue(&self, queue: u16) {
        assert_eq!(queue, 0);
        self.queue.fetch_add(1, Ordering::SeqCst);
    }
    fn notify_config(&self) {}
}

/// Bytes that differ from sector to sector and within each.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / SECTOR) as u8).wrapping_mul(37) ^ (i as u8).wrapping_add(seed))
        .collect()
}

fn header(t: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn range(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&sectors.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    r
}

/// A driver: the rings, a bump allocator for buffers, the device and its interrupt.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    block: Block,
    irq: Arc<CountingInterrupt>,
    next_desc: u16,
    avail: u16,
    used: u16,
    next_buf: u64,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, block: Block) -> Driver<'a> {
        Self::with_queue(mem, block, |q| q)
    }

    /// A driver whose queue is adjusted by `tweak` before the device gets it.
    fn with_queue(
        mem: &'a GuestMemoryMmap,
        mut block: Block,
        tweak: impl FnOnce(Queue) -> Queue,
    ) -> Driver<'a> {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(USED_RING))
            .unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![tweak(queue)],
                features: features::VERSION_1,
                interrupt: irq.clone(),
            })
            .unwrap();
        Driver {
            mem,
            vq,
            block,
            irq,
            next_desc: 0,
            avail: 0,
            used: 0,
            next_buf: BUFFERS,
        }
    }

    /// A guest buffer of `len` bytes holding `contents` (zeroes past it).
    fn buffer(&mut self, len: usize, contents: &[u8]) -> u64 {
        let at = self.next_buf;
        self.next_buf += (len as u64).next_multiple_of(0x100).max(0x100);
        let mut b = vec![0u8; len];
        b[..contents.len()].copy_from_slice(contents);
        self.mem.write_slice(&b, GuestAddress(at)).unwrap();
        at
    }

    /// Makes a chain of (address, length, device-writable) available; returns its head.
    fn submit(&mut self, chain: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QUEUE_SIZE;
            let last = i + 1 == chain.len();
            let flags = if last { 0 } else { NEXT } | if w { WRITE } else { 0 };
            let next = (idx + 1) % QUEUE_SIZE;
            self.vq
                .desc_table()
                .store(
                    idx,
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }
        self.next_desc = (self.next_desc + chain.len() as u16) % QUEUE_SIZE;
        let slot = usize::from(self.avail % QUEUE_SIZE);
        self.vq
            .avail()
            .ring()
            .ref_at(slot)
            .unwrap()
            .store(head.to_le());
        self.avail = self.avail.wrapping_add(1);
        self.vq.avail().idx().store(self.avail.to_le());
        head
    }

    fn process(&mut self) {
        self.block.process_queue(0);
    }

    /// The device's used index.
    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap())
    }

    /// The next used element: (head, length).
    fn pop_used(&mut self) -> (u16, u32) {
        assert_ne!(self.used_idx(), self.used, "no used element left");
        let at = USED_RING + 4 + 8 * u64::from(self.used % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used = self.used.wrapping_add(1);
        (u32::from_le(id) as u16, u32::from_le(len))
    }

    fn byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    }

    fn interrupts(&self) -> usize {
        self.irq.queue.load(Ordering::SeqCst)
    }

    /// A request of type `t` at `sector` with `data` (device-readable) or room for `read_len`
    /// bytes (device-writable), in one data descriptor; serves it and returns the status, the
    /// used length and where the read data went.
    fn request(&mut self, t: u32, sector: u64, data: &[u8], read_len: usize) -> (u8, u32, u64) {
        let hdr = self.buffer(16, &header(t, sector));
        let status = self.buffer(1, &[0xff]);
        let mut chain = vec![(hdr, 16, false)];
        let mut buf = 0;
        if !data.is_empty() {
            buf = self.buffer(data.len(), data);
            chain.push((buf, data.len() as u32, false));
        } else if read_len > 0 {
            buf = self.buffer(read_len, &[]);
            chain.push((buf, read_len as u32, true));
        }
        chain.push((status, 1, true));
        let head = self.submit(&chain);
        self.process();
        let (id, len) = self.pop_used();
        assert_eq!(id, head);
        (self.byte(status), len, buf)
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn a_write_then_a_read_across_several_descriptors() {
    let img = TempImage::new("rw", &[0u8; 64 * SECTOR]);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    let data = pattern(4 * SECTOR, 7);

    // The write: header, then the data split 700 + 836 + 512 bytes (not at sector
    // boundaries), then the status byte.
    let hdr = d.buffer(16, &header(VIRTIO_BLK_T_OUT, 5));
    let a = d.buffer(700, &data[..700]);
    let b = d.buffer(836, &data[700..1536]);
    let c = d.buffer(512, &data[1536..]);
    let status = d.buffer(1, &[0xff]);
    let head = d.submit(&[
        (hdr, 16, false),
        (a, 700, false),
        (b, 836, false),
        (c, 512, false),
        (status, 1, true),
    ]);
    d.process();
    assert_eq!(d.pop_used(), (head, 1));
    assert_eq!(d.byte(status), OK);
    let file = img.read();
    assert_eq!(&file[5 * SECTOR..9 * SECTOR], &data[..]);
    assert!(file[..5 * SECTOR].iter().all(|&x| x == 0));
    assert!(file[9 * SECTOR..].iter().all(|&x| x == 0));

    // The read, into 1000 + 1048 bytes, with the status byte at the end of the last one.
    let hdr = d.buffer(16, &header(VIRTIO_BLK_T_IN, 5));
    let x = d.buffer(1000, &[]);
    let y = d.buffer(1049, &[0xee; 1049]);
    let head = d.submit(&[(hdr, 16, false), (x, 1000, true), (y, 1049, true)]);
    d.process();
    assert_eq!(d.pop_used(), (head, 2048 + 1));
    assert_eq!(d.byte(y + 1048), OK);
    let mut back = d.bytes(x, 1000);
    back.extend(d.bytes(y, 1048));
    assert_eq!(back, data);
}

#[test]
fn a_read_past_the_end_fails_and_touches_nothing() {
    let contents = pattern(8 * SECTOR, 1);
    let img = TempImage::new("past-end", &contents);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    // Sectors 7 and 8 of an 8-sector disk.
    let (s, len, buf) = d.request(VIRTIO_BLK_T_IN, 7, &[], 2 * SECTOR);
    assert_eq!((s, len), (IOERR, 1));
    assert!(d.bytes(buf, 2 * SECTOR).iter().all(|&x| x == 0));
    // Far past the end, and where sector * 512 overflows.
    for sector in [1 << 40, u64::MAX / 256, u64::MAX] {
        assert_eq!(d.request(VIRTIO_BLK_T_IN, sector, &[], SECTOR).0, IOERR);
        assert_eq!(
            d.request(VIRTIO_BLK_T_OUT, sector, &[1; SECTOR], 0).0,
            IOERR
        );
    }
    // A write that starts on the disk and runs off it changes nothing either.
    assert_eq!(d.request(VIRTIO_BLK_T_OUT, 7, &[9; 2 * SECTOR], 0).0, IOERR);
    // Data that is not a whole number of sectors.
    assert_eq!(d.request(VIRTIO_BLK_T_OUT, 0, &[9; 100], 0).0, IOERR);
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, &[], 100).0, IOERR);
    assert_eq!(img.read(), contents);
    // The last sector itself is fine.
    let (s, len, buf) = d.request(VIRTIO_BLK_T_IN, 7, &[], SECTOR);
    assert_eq!((s, len), (OK, SECTOR as u32 + 1));
    assert_eq!(d.bytes(buf, SECTOR), &contents[7 * SECTOR..]);
}

#[test]
fn a_partial_last_sector_is_not_on_the_disk() {
    let img = TempImage::new("partial", &[0u8; 2 * SECTOR + 100]);
    let mem = memory();
    let block = Block::new(&img.0, false, None).unwrap();
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2, "capacity in sectors");
    let mut d = Driver::new(&mem, block);
    assert_eq!(d.request(VIRTIO_BLK_T_OUT, 2, &[1; SECTOR], 0).0, IOERR);
    assert_eq!(img.read(), vec![0u8; 2 * SECTOR + 100]);
}

#[test]
fn writes_to_a_read_only_disk_fail() {
    let contents = pattern(16 * SECTOR, 3);
    let img = TempImage::new("ro", &contents);
    let mem = memory();
    let block = Block::new(&img.0, true, None).unwrap();
    assert_ne!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let mut d = Driver::new(&mem, block);
    let (s, len, _) = d.request(VIRTIO_BLK_T_OUT, 1, &[0xaa; SECTOR], 0);
    assert_eq!((s, len), (IOERR, 1));
    let zero_range = range(0, 4, 0);
    assert_eq!(d.request(VIRTIO_BLK_T_DISCARD, 0, &zero_range, 0).0, IOERR);
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &zero_range, 0).0,
        IOERR
    );
    assert_eq!(img.read(), contents);
    // Reads still work.
    let (s, _, buf) = d.request(VIRTIO_BLK_T_IN, 1, &[], SECTOR);
    assert_eq!(s, OK);
    assert_eq!(d.bytes(buf, SECTOR), &contents[SECTOR..2 * SECTOR]);
}

#[test]
fn flush_succeeds() {
    let img = TempImage::new("flush", &[0u8; 4 * SECTOR]);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0), (OK, 1, 0));
    // The sector field of a flush means nothing.
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, u64::MAX, &[], 0).0, OK);
}

#[test]
fn get_id_returns_the_serial() {
    let img = TempImage::new("id", &[0u8; 4 * SECTOR]);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, Some("disk-0042")).unwrap());
    let (s, len, buf) = d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!((s, len), (OK, 21));
    let mut want = b"disk-0042".to_vec();
    want.resize(20, 0);
    assert_eq!(d.bytes(buf, 20), want);

    // A serial longer than 20 bytes is cut; a shorter buffer gets a prefix.
    let img2 = TempImage::new("id-long", &[0u8; 4 * SECTOR]);
    let long = "abcdefghijklmnopqrstuvwxyz";
    let mem2 = memory();
    let mut d2 = Driver::new(&mem2, Block::new(&img2.0, false, Some(long)).unwrap());
    let (s, len, buf) = d2.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!((s, len), (OK, 21));
    assert_eq!(d2.bytes(buf, 20), &long.as_bytes()[..20]);
    let (s, len, buf) = d2.request(VIRTIO_BLK_T_GET_ID, 0, &[], 8);
    assert_eq!((s, len), (OK, 9));
    assert_eq!(d2.bytes(buf, 8), &long.as_bytes()[..8]);
}

#[test]
fn discard_and_write_zeroes_zero_the_range() {
    let contents = pattern(32 * SECTOR, 9);
    let img = TempImage::new("zero", &contents);
    let mem = memory();
    let block = Block::new(&img.0, false, None).unwrap();
    let f = block.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let mut d = Driver::new(&mem, block);
    let mut want = contents.clone();

    assert_eq!(d.request(VIRTIO_BLK_T_DISCARD, 0, &range(2, 3, 0), 0).0, OK);
    want[2 * SECTOR..5 * SECTOR].fill(0);
    assert_eq!(img.read(), want);

    // Write-zeroes, without and with permission to deallocate.
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(8, 4, 0), 0)
            .0,
        OK
    );
    want[8 * SECTOR..12 * SECTOR].fill(0);
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(20, 12, 1), 0)
            .0,
        OK
    );
    want[20 * SECTOR..].fill(0);
    assert_eq!(img.read(), want);
    assert_eq!(img.read().len(), 32 * SECTOR, "the image keeps its size");

    // Ranges off the disk fail and change nothing.
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(30, 3, 0), 0)
            .0,
        IOERR
    );
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &range(u64::MAX / 2, 1, 0), 0)
            .0,
        IOERR
    );
    // Two ranges are more than the device accepts (max_discard_seg = 1); a partial range is
    // not a range.
    let mut two = range(0, 1, 0).to_vec();
    two.extend_from_slice(&range(1, 1, 0));
    assert_eq!(d.request(VIRTIO_BLK_T_DISCARD, 0, &two, 0).0, UNSUPP);
    assert_eq!(d.request(VIRTIO_BLK_T_DISCARD, 0, &[0; 8], 0).0, UNSUPP);
    assert_eq!(img.read(), want);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let img = TempImage::new("unsupp", &[0u8; 4 * SECTOR]);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    for t in [2, 3, 99, VIRTIO_BLK_T_SECURE_ERASE, u32::MAX] {
        assert_eq!(d.request(t, 0, &[], 0), (UNSUPP, 1, 0), "type {t}");
    }
    let counters = d.block.counters();
    assert_eq!(counters.requests.load(Ordering::Relaxed), 5);
    assert_eq!(counters.failed.load(Ordering::Relaxed), 5);
    assert_eq!(counters.invalid.load(Ordering::Relaxed), 0);
}

#[test]
fn a_chain_without_a_status_byte_is_returned_untouched() {
    let contents = pattern(4 * SECTOR, 5);
    let img = TempImage::new("no-status", &contents);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());

    // A write with no device-writable descriptor at all.
    let hdr = d.buffer(16, &header(VIRTIO_BLK_T_OUT, 0));
    let data = d.buffer(SECTOR, &[0x55; SECTOR]);
    let head = d.submit(&[(hdr, 16, false), (data, SECTOR as u32, false)]);
    // A read whose only writable descriptor is empty.
    let hdr2 = d.buffer(16, &header(VIRTIO_BLK_T_IN, 0));
    let empty = d.buffer(16, &[0x77; 16]);
    let head2 = d.submit(&[(hdr2, 16, false), (empty, 0, true)]);
    // A header shorter than 16 bytes.
    let hdr3 = d.buffer(16, &header(VIRTIO_BLK_T_IN, 0));
    let st3 = d.buffer(1, &[0xff]);
    let head3 = d.submit(&[(hdr3, 8, false), (st3, 1, true)]);
    d.process();
    assert_eq!(d.pop_used(), (head, 0));
    assert_eq!(d.pop_used(), (head2, 0));
    assert_eq!(d.pop_used(), (head3, 0));
    assert_eq!(d.byte(st3), 0xff, "nothing written to an invalid request");
    assert_eq!(d.bytes(empty, 16), [0x77; 16]);
    assert_eq!(img.read(), contents);
    assert_eq!(d.block.counters().invalid.load(Ordering::Relaxed), 3);

    // The device keeps working.
    let (s, len, buf) = d.request(VIRTIO_BLK_T_IN, 0, &[], SECTOR);
    assert_eq!((s, len), (OK, SECTOR as u32 + 1));
    assert_eq!(d.bytes(buf, SECTOR), &contents[..SECTOR]);
}

#[test]
fn the_interrupt_fires_once_per_batch() {
    let img = TempImage::new("irq", &[0u8; 8 * SECTOR]);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    d.process();
    assert_eq!(d.interrupts(), 0, "nothing served, no interrupt");
    d.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    assert_eq!(d.interrupts(), 1);
    // Three requests made available at once are served in one go, with one interrupt.
    let mut heads = Vec::new();
    for i in 0..3 {
        let hdr = d.buffer(16, &header(VIRTIO_BLK_T_IN, i));
        let buf = d.buffer(SECTOR, &[]);
        let st = d.buffer(1, &[0xff]);
        heads.push(d.submit(&[(hdr, 16, false), (buf, SECTOR as u32, true), (st, 1, true)]));
    }
    d.process();
    assert_eq!(d.interrupts(), 2);
    for h in heads {
        assert_eq!(d.pop_used(), (h, SECTOR as u32 + 1));
    }
    // After a reset the device serves nothing and raises nothing.
    d.block.reset();
    d.request_no_wait(VIRTIO_BLK_T_FLUSH);
    d.process();
    assert_eq!(d.interrupts(), 2);
    assert_eq!(d.used_idx(), d.used);
}

impl Driver<'_> {
    fn request_no_wait(&mut self, t: u32) -> u16 {
        let hdr = self.buffer(16, &header(t, 0));
        let st = self.buffer(1, &[0xff]);
        self.submit(&[(hdr, 16, false), (st, 1, true)])
    }
}

/// Serves queue 0 on another thread; whether it returned within two seconds. A thread that
/// does not return keeps spinning until the test process exits.
fn returns_in_time(mut block: Block) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        block.process_queue(0);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(2)).is_ok()
}

/// Regression (found while writing fuzz target `virtio_blk_queue`) (found with the fuzz harness): a driver that moves the
/// available index more than a queue size ahead of what the device has consumed hangs the
/// device. `ActiveQueue::serve` (crates/virtio/src/lib.rs; the serving loop of virtio-blk and
/// virtio-rng) re-runs its loop while `enable_notification()` returns `Ok(true)`, which only
/// compares the available index with `next_avail`; but `pop_descriptor_chain` returns None
/// for such an index (virtio-queue refuses it as `InvalidAvailRingIndex`), so the loop never
/// ends: the VMM's event loop thread spins at 100% CPU and every device it serves stops.
/// Now `process_queue` returns and the queue waits for the driver's next notification.
#[test]
fn an_available_index_far_ahead_does_not_hang_the_device() {
    let img = TempImage::new("hang-idx", &[0u8; 4 * SECTOR]);
    let mem = memory();
    let d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    d.vq.avail().idx().store((QUEUE_SIZE + 1).to_le());
    assert!(returns_in_time(d.block), "process_queue did not return");
}

/// Regression (found with the fuzz harness), same cause: a driver that puts its available ring at guest address 0 (which nothing
/// forbids) and makes a buffer available hangs the device. virtio-queue's `iter` treats an
/// available ring at 0 as "queue not ready", so `pop_descriptor_chain` returns None while the
/// index differs.
#[test]
fn an_available_ring_at_address_zero_does_not_hang_the_device() {
    let img = TempImage::new("hang-zero", &[0u8; 4 * SECTOR]);
    let mem = memory();
    let d = Driver::with_queue(&mem, Block::new(&img.0, false, None).unwrap(), |mut q| {
        q.try_set_avail_ring_address(GuestAddress(0)).unwrap();
        q
    });
    // The available index of a ring at 0 (bytes 2-3): one buffer.
    d.mem.write_obj(1u16.to_le(), GuestAddress(2)).unwrap();
    assert!(returns_in_time(d.block), "process_queue did not return");
}

/// Regression (spec): virtio 1.2, 5.2.6.2: "the device MUST set the status byte to
/// VIRTIO_BLK_S_UNSUPP for discard and write zeroes commands if any unknown flag is set.
/// Furthermore, the device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard
/// commands if the unmap flag is set." The device once ignored the flags.
#[test]
fn discard_with_the_unmap_flag_or_unknown_flags_is_unsupported() {
    let contents = pattern(8 * SECTOR, 2);
    let img = TempImage::new("flags", &contents);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &range(0, 1, 1), 0).0,
        UNSUPP
    );
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &range(1, 1, 2), 0).0,
        UNSUPP
    );
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &range(2, 1, 4), 0)
            .0,
        UNSUPP
    );
    assert_eq!(img.read(), contents);
}

/// The block device behind the virtio-pci transport, for what the transport adds.
mod transport {
    use std::sync::{Arc, Mutex};

    use devices::pci::PciDevice;
    use hypervisor::GuestMemoryMmap;
    use hypervisor::{MsiMessage, Vm};
    use virtio::block::Block;
    use virtio::pci::VirtioPci;
    use virtio::VirtioDevice;
    use virtio_bindings::virtio_blk::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::support::FakeVm;
    use super::{header, memory, TempImage, SECTOR};

    const DEVICE_STATUS: u64 = 0x14;
    const MSIX_TABLE: u64 = 0x4000;
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x100;
    const USED: u64 = 0x1000;

    struct Pci {
        pci: VirtioPci,
        vm: Arc<FakeVm>,
        mem: GuestMemoryMmap,
        msix_cap: usize,
        avail: u16,
    }

    impl Pci {
        fn new(img: &TempImage) -> Pci {
            let mem = memory();
            let vm = Arc::new(FakeVm::default());
            let dyn_vm: Arc<dyn Vm> = vm.clone();
            let block: Arc<Mutex<dyn VirtioDevice>> =
                Arc::new(Mutex::new(Block::new(&img.0, false, None).unwrap()));
            let mut pci = VirtioPci::new(block, mem.clone(), &dyn_vm).unwrap();
            // The MSI-X capability (ID 0x11) in the capability list.
            let mut at = (pci.config_read(0x34 / 4) & 0xff) as usize;
            while (pci.config_read(at / 4) >> (8 * (at % 4))) as u8 != 0x11 {
                at = ((pci.config_read(at / 4) >> (8 * (at % 4) + 8)) & 0xff) as usize;
                assert_ne!(at, 0, "no MSI-X capability");
            }
            Pci {
                pci,
                vm,
                mem,
                msix_cap: at,
                avail: 0,
            }
        }

        fn write(&mut self, offset: u64, value: u64, len: usize) {
            self.pci.bar_write(0, offset, &value.to_le_bytes()[..len]);
        }

        fn read(&mut self, offset: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.pci.bar_read(0, offset, &mut b[..len]);
            u64::from_le_bytes(b)
        }

        fn msix_control(&mut self) -> u16 {
            (self.pci.config_read(self.msix_cap / 4) >> 16) as u16
        }

        /// MSI-X on, with table entry `entry` sending vector `data` to the boot CPU.
        fn program_msix(&mut self, entry: u64, data: u32) {
            let at = MSIX_TABLE + 16 * entry;
            self.write(at, 0xfee0_0000, 4);
            self.write(at + 4, 0, 4);
            self.write(at + 8, u64::from(data), 4);
            self.write(at + 12, 0, 4);
            let ctl_at = self.msix_cap + 2;
            self.pci
                .config_write(ctl_at / 4, (ctl_at % 4) as u64, &0x8000u16.to_le_bytes());
        }

        /// The driver's set-up (virtio 1.2, 3.1.1) of queue 0 with MSI-X vector 1; with
        /// `msix`, MSI-X is switched on and table entry 1 programmed to send vector 0x41
        /// (what Linux does when it sets up its queues), else MSI-X is left as it is.
        fn start(&mut self, msix: bool) {
            self.mem
                .write_slice(&[0u8; 0x2000], GuestAddress(0))
                .unwrap();
            self.avail = 0;
            self.write(DEVICE_STATUS, 0, 1);
            self.write(DEVICE_STATUS, 3, 1);
            self.write(0x08, 1, 4); // driver_feature_select
            self.write(0x0c, 1, 4); // VERSION_1
            self.write(DEVICE_STATUS, 0xb, 1);
            assert_eq!(self.read(DEVICE_STATUS, 1), 0xb, "features accepted");
            if msix {
                self.program_msix(1, 0x41);
            }
            self.write(0x16, 0, 2); // queue_select
            self.write(0x18, 16, 2); // queue_size
            self.write(0x1a, 1, 2); // queue_msix_vector
            self.write(0x20, DESC, 8);
            self.write(0x28, AVAIL, 8);
            self.write(0x30, USED, 8);
            self.write(0x1c, 1, 2); // queue_enable
            self.write(DEVICE_STATUS, 0xf, 1);
            assert_eq!(self.read(DEVICE_STATUS, 1), 0xf, "device running");
        }

        /// A flush request, served; the status byte.
        fn flush(&mut self) -> u8 {
            let (hdr, status) = (0x1800u64, 0x1900u64);
            let m = &self.mem;
            m.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(hdr))
                .unwrap();
            m.write_obj(0xffu8, GuestAddress(status)).unwrap();
            let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
                let at = DESC + 16 * i;
                m.write_obj(addr, GuestAddress(at)).unwrap();
                m.write_obj(len, GuestAddress(at + 8)).unwrap();
                m.write_obj(flags, GuestAddress(at + 12)).unwrap();
                m.write_obj(next, GuestAddress(at + 14)).unwrap();
            };
            desc(0, hdr, 16, 1, 1);
            desc(1, status, 1, 2, 0);
            m.write_obj(
                0u16,
                GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail % 16)),
            )
            .unwrap();
            self.avail += 1;
            m.write_obj(self.avail, GuestAddress(AVAIL + 2)).unwrap();
            self.pci.device().lock().unwrap().process_queue(0);
            m.read_obj(GuestAddress(status)).unwrap()
        }

        fn fired(&self, vector: usize) -> Vec<MsiMessage> {
            self.vm.vectors.lock().unwrap()[vector]
                .fired
                .lock()
                .unwrap()
                .clone()
        }
    }

    #[test]
    fn a_served_request_raises_the_queue_vector() {
        let img = TempImage::new("pci", &[0u8; 8 * SECTOR]);
        let mut p = Pci::new(&img);
        p.start(true);
        assert_eq!(p.flush(), VIRTIO_BLK_S_OK as u8);
        let want = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(p.fired(1), [want]);
        assert!(p.fired(0).is_empty());
        // The ISR shows the used-buffer interrupt, and reading clears it.
        assert_eq!(p.read(0x1000, 1), 1);
        assert_eq!(p.read(0x1000, 1), 0);
    }

    /// Regression (found by fuzz target `virtio_pci_transport`) (found with the fuzz harness): a driver reset (device_status = 0)
    /// resets the transport's MSI-X state (`Msix::reset`: every table entry zeroed and masked,
    /// enable and function mask cleared) while the MSI-X message control word in
    /// configuration space keeps showing MSI-X enabled. MSI-X is PCI function state, which a
    /// virtio reset has no business changing; as it is, a driver that resets the device and
    /// starts it again without disabling and re-enabling MSI-X gets no interrupts at all
    /// (they are not even marked pending) although configuration space says MSI-X is on.
    /// Expected: the table and the enable bit survive a driver reset, and the request after
    /// the restart raises vector 1 again.
    #[test]
    fn a_driver_reset_leaves_msix_alone() {
        let img = TempImage::new("pci-reset", &[0u8; 8 * SECTOR]);
        let mut p = Pci::new(&img);
        p.start(true);
        assert_eq!(p.flush(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(p.fired(1).len(), 1);

        p.start(false); // begins with a reset
        assert_eq!(p.msix_control() & 0x8000, 0x8000, "config space: MSI-X on");
        assert_eq!(p.read(MSIX_TABLE + 16 + 8, 4), 0x41, "table entry 1 data");
        assert_eq!(p.read(MSIX_TABLE + 16 + 12, 4), 0, "table entry 1 unmasked");
        assert_eq!(p.flush(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(p.fired(1).len(), 2, "the second request's interrupt");
    }
}

// ---- serving at once, on the notifying vCPU (`process_queue_now`) ----------------------------

/// Makes a one-descriptor read of `sectors` at `sector` available; returns its head, data
/// buffer and status byte.
fn submit_read(d: &mut Driver, sector: u64, sectors: usize) -> (u16, u64, u64) {
    let hdr = d.buffer(16, &header(VIRTIO_BLK_T_IN, sector));
    let buf = d.buffer(sectors * SECTOR, &[]);
    let status = d.buffer(1, &[0xff]);
    let len = (sectors * SECTOR) as u32;
    let head = d.submit(&[(hdr, 16, false), (buf, len, true), (status, 1, true)]);
    (head, buf, status)
}

#[test]
fn reads_and_writes_the_page_cache_takes_are_served_at_once() {
    let img = TempImage::new("now", &[0u8; 64 * SECTOR]);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    let data = pattern(8 * SECTOR, 9);
    let hdr = d.buffer(16, &header(VIRTIO_BLK_T_OUT, 16));
    let buf = d.buffer(data.len(), &data);
    let status = d.buffer(1, &[0xff]);
    let head = d.submit(&[
        (hdr, 16, false),
        (buf, data.len() as u32, false),
        (status, 1, true),
    ]);
    // A buffered write waits for no disk (on ext4, which cannot be asked not to wait, it is
    // made anyway).
    assert!(d.block.process_queue_now(0), "the write was left for later");
    assert_eq!(d.pop_used(), (head, 1));
    assert_eq!(d.byte(status), OK);
    assert_eq!(&img.read()[16 * SECTOR..24 * SECTOR], &data[..]);

    // What was just written is in the page cache.
    let (head, buf, status) = submit_read(&mut d, 16, 8);
    assert!(d.block.process_queue_now(0), "the read was left for later");
    assert_eq!(d.pop_used(), (head, 8 * SECTOR as u32 + 1));
    assert_eq!(d.byte(status), OK);
    assert_eq!(d.bytes(buf, data.len()), data);
    assert_eq!(d.interrupts(), 2);
}

#[test]
fn a_request_that_must_wait_is_left_with_everything_after_it_for_the_event_loop() {
    let contents = pattern(64 * SECTOR, 4);
    let img = TempImage::new("later", &contents);
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    // A flush waits for the disk; the read behind it would not, but keeps its place.
    let hdr = d.buffer(16, &header(VIRTIO_BLK_T_FLUSH, 0));
    let flush_status = d.buffer(1, &[0xff]);
    let flush = d.submit(&[(hdr, 16, false), (flush_status, 1, true)]);
    let (read, buf, read_status) = submit_read(&mut d, 2, 2);

    assert!(!d.block.process_queue_now(0));
    assert_eq!(d.used_idx(), 0, "nothing answered");
    assert_eq!(d.interrupts(), 0);
    assert_eq!(d.byte(flush_status), 0xff);
    // Asked again (another notification), the same.
    assert!(!d.block.process_queue_now(0));
    assert_eq!(d.used_idx(), 0);

    // The event loop serves both, in order, each once.
    d.process();
    assert_eq!(d.pop_used(), (flush, 1));
    assert_eq!(d.pop_used(), (read, 2 * SECTOR as u32 + 1));
    assert_eq!(d.used_idx(), 2);
    assert_eq!((d.byte(flush_status), d.byte(read_status)), (OK, OK));
    assert_eq!(d.bytes(buf, 2 * SECTOR), &contents[2 * SECTOR..4 * SECTOR]);
    assert_eq!(d.interrupts(), 1);
}

/// Drops the image's pages from the host's page cache; false if they stay (a file system
/// that keeps files in memory, as tmpfs does).
fn evict(img: &TempImage) -> bool {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(&img.0).unwrap();
    f.sync_all().unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a fresh shared read-only mapping of the whole file, looked at with mincore
    // (which does not bring pages in) and unmapped before returning; `resident` has one byte
    // per page of it.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let mut resident = vec![0u8; len.div_ceil(4096)];
        assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
        libc::munmap(map, len);
        resident.iter().all(|&r| r & 1 == 0)
    }
}

#[test]
fn a_read_the_page_cache_does_not_hold_is_left_for_the_event_loop() {
    let contents = pattern(64 * SECTOR, 5);
    let img = TempImage::new("uncached", &contents);
    if !evict(&img) {
        println!(
            "SKIPPED: {} stays in the page cache after POSIX_FADV_DONTNEED (a file system in \
             memory?), so no read can miss it",
            img.0.display()
        );
        return;
    }
    let mem = memory();
    let mut d = Driver::new(&mem, Block::new(&img.0, false, None).unwrap());
    let (head, buf, status) = submit_read(&mut d, 0, 8);
    assert!(
        !d.block.process_queue_now(0),
        "a read from the disk was served at once"
    );
    assert_eq!(d.used_idx(), 0);
    d.process();
    assert_eq!(d.pop_used(), (head, 8 * SECTOR as u32 + 1));
    assert_eq!(d.byte(status), OK);
    assert_eq!(d.bytes(buf, 8 * SECTOR), &contents[..8 * SECTOR]);
}
