//! The virtio-net device (`virtio::net::Net`) through real split virtqueues in guest memory,
//! on a SEQPACKET socket pair instead of a tap (no root needed): the test holds the other end
//! and plays the host network.
//!
//! The rings are laid out here (not with virtio-queue's `MockSplitQueue`, whose used ring
//! overlaps its available ring, see block_queue.rs) and read and written directly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hypervisor::GuestMemoryMmap;
use virtio::net::{Net, SeqPacket, MAX_RX_FRAME, VNET_HDR_LEN};
use virtio::{features, Activation, VirtioDevice, VirtioInterrupt};
use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const MEM_SIZE: usize = 0x20_0000;
const BUFFERS: u64 = 0x1_0000;
const RX: usize = 0;
const TX: usize = 1;

#[derive(Default)]
struct Irqs([AtomicUsize; 2]);

impl VirtioInterrupt for Irqs {
    fn notify_queue(&self, queue: u16) {
        self.0[usize::from(queue)].fetch_add(1, Ordering::SeqCst);
    }
    fn notify_config(&self) {}
}

/// One split virtqueue as the driver sees it.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(base: u64, size: u16) -> Ring {
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Makes a chain of (address, length, device-writable) available; returns its head.
    fn submit(&mut self, mem: &GuestMemoryMmap, chain: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == chain.len();
            let flags = if last { 0 } else { NEXT } | if w { WRITE } else { 0 };
            let next = (idx + 1) % self.size;
            let at = self.desc + 16 * u64::from(idx);
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(at)).unwrap();
        }
        self.next_desc = (self.next_desc + chain.len() as u16) % self.size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// The used elements added since the last call: (head, length).
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        while self.used_seen != self.used_idx(mem) {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((u32::from_le(id) as u16, u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// `avail_event` (after the used ring's entries), which the device writes with EVENT_IDX.
    fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(mem.read_obj(GuestAddress(at)).unwrap())
    }
}

struct Driver {
    mem: GuestMemoryMmap,
    net: Net,
    peer: SeqPacket,
    irq: Arc<Irqs>,
    rx: Ring,
    tx: Ring,
    next_buf: u64,
}

impl Driver {
    fn new(size: u16, extra: u64) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (dev, peer) = SeqPacket::pair("test").unwrap();
        let mut net = Net::with_io(Box::new(dev), [2, 0, 0, 0, 0, 1]).unwrap();
        let rx = Ring::new(0, size);
        let tx = Ring::new(0x3000, size);
        let event_idx = extra & features::RING_EVENT_IDX != 0;
        let irq = Arc::new(Irqs::default());
        net.activate(Activation {
            mem: mem.clone(),
            queues: vec![rx.queue(event_idx), tx.queue(event_idx)],
            features: features::VERSION_1 | extra,
            interrupt: irq.clone(),
        })
        .unwrap();
        Driver {
            mem,
            net,
            peer,
            irq,
            rx,
            tx,
            next_buf: BUFFERS,
        }
    }

    fn buffer(&mut self, contents: &[u8], len: usize) -> u64 {
        let at = self.next_buf;
        self.next_buf += (len as u64).next_multiple_of(0x100).max(0x100);
        let mut b = vec![0u8; len];
        b[..contents.len()].copy_from_slice(contents);
        self.mem.write_slice(&b, GuestAddress(at)).unwrap();
        at
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    fn irqs(&self, q: usize) -> usize {
        self.irq.0[q].load(Ordering::SeqCst)
    }

    /// The next record the peer received, if any.
    fn peer_frame(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 0x2_0000];
        match self.peer.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("peer recv: {e}"),
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ seed)
        .collect()
}

/// A frame as the host sends it: a header (num_buffers 0) and `len` bytes of payload.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = 1; // NEEDS_CSUM, to see the header arrive untouched
    f.extend(pattern(len, seed));
    f
}

#[test]
fn transmit_gathers_a_split_frame() {
    let mut d = Driver::new(16, 0);
    let whole = frame(3000, 7);
    let parts = [&whole[..5], &whole[5..12], &whole[12..1000], &whole[1000..]];
    let mut chain = Vec::new();
    for p in parts {
        let at = d.buffer(p, p.len());
        chain.push((at, p.len() as u32, false));
    }
    // A device-writable descriptor in a transmit chain is ignored.
    let junk = d.buffer(&[0xee; 64], 64);
    chain.insert(2, (junk, 64, true));
    let head = d.tx.submit(&d.mem, &chain);
    d.net.process_queue(TX);
    assert_eq!(d.peer_frame().unwrap(), whole);
    assert_eq!(d.peer_frame(), None);
    assert_eq!(d.tx.take_used(&d.mem), vec![(head, 0)]);
    assert_eq!(d.irqs(TX), 1);
    let c = d.net.counters();
    assert_eq!(c.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(c.tx_dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn transmit_drops_bad_chains_and_goes_on() {
    let mut d = Driver::new(16, 0);
    let short = d.buffer(&[1; 11], 11);
    let good = frame(100, 3);
    let g = d.buffer(&good, good.len());
    let h1 = d.tx.submit(&d.mem, &[(short, 11, false)]);
    // Header fine, then a buffer running off the end of guest memory.
    let h2 =
        d.tx.submit(&d.mem, &[(g, 12, false), (MEM_SIZE as u64 - 8, 16, false)]);
    let h3 = d.tx.submit(&d.mem, &[(g, good.len() as u32, false)]);
    // Only writable buffers: nothing to send.
    let h4 = d.tx.submit(&d.mem, &[(g, good.len() as u32, true)]);
    d.net.process_queue(TX);
    assert_eq!(d.peer_frame().unwrap(), good);
    assert_eq!(d.peer_frame(), None);
    assert_eq!(
        d.tx.take_used(&d.mem),
        vec![(h1, 0), (h2, 0), (h3, 0), (h4, 0)]
    );
    let c = d.net.counters();
    assert_eq!(c.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(c.tx_dropped.load(Ordering::Relaxed), 3);
    assert_eq!(d.irqs(TX), 1);
}

#[test]
fn receive_one_frame_per_chain() {
    let mut d = Driver::new(16, 0);
    let mut chains = Vec::new();
    for _ in 0..3 {
        // Header and payload in separate buffers, with a read-only one the device skips.
        let h = d.buffer(&[0xaa; 12], 12);
        let ro = d.buffer(&[0xbb; 32], 32);
        let p = d.buffer(&[], 2048);
        let head =
            d.rx.submit(&d.mem, &[(h, 12, true), (ro, 32, false), (p, 2048, true)]);
        chains.push((head, h, p));
    }
    let f1 = frame(1500, 1);
    let f2 = frame(60, 2);
    d.peer.send(&f1).unwrap();
    d.peer.send(&f2).unwrap();
    d.net.process_backend(0);
    let used = d.rx.take_used(&d.mem);
    assert_eq!(
        used,
        vec![
            (chains[0].0, f1.len() as u32),
            (chains[1].0, f2.len() as u32)
        ]
    );
    for (f, &(_, h, p)) in [&f1, &f2].into_iter().zip(&chains) {
        let mut want = f.to_vec();
        want[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut got = d.read(h, 12);
        got.extend(d.read(p, f.len() - 12));
        assert_eq!(got, want);
    }
    assert_eq!(d.irqs(RX), 1);
    assert_eq!(d.net.counters().rx_frames.load(Ordering::Relaxed), 2);
    // The third chain waits for the next frame.
    let f3 = frame(10, 3);
    d.peer.send(&f3).unwrap();
    d.net.process_backend(0);
    assert_eq!(d.rx.take_used(&d.mem), vec![(chains[2].0, f3.len() as u32)]);
    assert_eq!(d.irqs(RX), 2);
}

#[test]
fn receive_truncates_a_frame_too_large_for_its_chain() {
    let mut d = Driver::new(16, 0);
    let b = d.buffer(&[], 100);
    let head = d.rx.submit(&d.mem, &[(b, 100, true)]);
    let b2 = d.buffer(&[], 100);
    let head2 = d.rx.submit(&d.mem, &[(b2, 100, true)]);
    let big = frame(500, 4);
    let small = frame(20, 5);
    d.peer.send(&big).unwrap();
    d.peer.send(&small).unwrap();
    d.net.process_backend(0);
    // The device sees the full length (as from a tap) but uses only the chain's room; the
    // rest of the frame is gone and the next frame is whole.
    assert_eq!(
        d.rx.take_used(&d.mem),
        vec![(head, 100), (head2, small.len() as u32)]
    );
    assert_eq!(d.read(b + 12, 88), big[12..100]);
    assert_eq!(d.read(b2 + 12, small.len() - 12), small[12..]);
}

#[test]
fn unusable_first_buffer_is_returned_empty() {
    for extra in [0, 1 << VIRTIO_NET_F_MRG_RXBUF] {
        let mut d = Driver::new(64, extra);
        let tiny = d.buffer(&[], 8);
        let h1 = d.rx.submit(&d.mem, &[(tiny, 8, true)]);
        let h2 = d.rx.submit(&d.mem, &[(MEM_SIZE as u64 - 4, 4096, true)]);
        d.net.process_queue(RX);
        assert_eq!(d.rx.take_used(&d.mem), vec![(h1, 0), (h2, 0)]);
        assert_eq!(d.net.counters().rx_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(d.irqs(RX), 1);
        assert_eq!(d.net.counters().rx_frames.load(Ordering::Relaxed), 0);
    }
}

/// Posts `n` mergeable buffers of 4 KiB; returns (head, address) of each.
fn post_4k(d: &mut Driver, n: usize) -> Vec<(u16, u64)> {
    (0..n)
        .map(|_| {
            let b = d.buffer(&[0x5a; 4096], 4096);
            (d.rx.submit(&d.mem, &[(b, 4096, true)]), b)
        })
        .collect()
}

/// Checks that `frame` landed in `bufs` (4 KiB each) as the used entries `used` say, with
/// num_buffers set; returns how many buffers it took.
fn check_merged(d: &Driver, frame: &[u8], bufs: &[(u16, u64)], used: &[(u16, u32)]) -> usize {
    let n = frame.len().div_ceil(4096);
    assert_eq!(used.len(), n);
    let mut got = Vec::new();
    for (i, (&(head, at), &(uh, ul))) in bufs.iter().zip(used).enumerate() {
        let len = if i + 1 == n {
            frame.len() - 4096 * i
        } else {
            4096
        };
        assert_eq!((uh, ul), (head, len as u32));
        got.extend(d.read(at, len));
    }
    let mut want = frame.to_vec();
    want[10..12].copy_from_slice(&(n as u16).to_le_bytes());
    assert_eq!(got, want);
    n
}

#[test]
fn mergeable_frame_spreads_over_buffers() {
    let mut d = Driver::new(64, 1 << VIRTIO_NET_F_MRG_RXBUF);
    let bufs = post_4k(&mut d, 40);
    let f1 = frame(60 << 10, 9);
    let f2 = frame(5000, 10);
    d.peer.send(&f1).unwrap();
    d.net.process_backend(0);
    let used = d.rx.take_used(&d.mem);
    let n = check_merged(&d, &f1, &bufs, &used);
    assert_eq!(n, 16);
    // The buffers the frame did not reach are still there: the next frame starts at the
    // 17th (24 left is more than the largest frame needs).
    d.peer.send(&f2).unwrap();
    d.net.process_backend(0);
    let used = d.rx.take_used(&d.mem);
    assert_eq!(check_merged(&d, &f2, &bufs[n..], &used), 2);
    // The buffer after the second frame is untouched.
    assert_eq!(d.read(bufs[n + 2].1, 4096), vec![0x5a; 4096]);
    assert_eq!(d.net.counters().rx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(d.irqs(RX), 2);
}

#[test]
fn mergeable_waits_for_room_for_the_largest_frame() {
    for event_idx in [false, true] {
        let extra = 1 << VIRTIO_NET_F_MRG_RXBUF
            | if event_idx {
                features::RING_EVENT_IDX
            } else {
                0
            };
        let mut d = Driver::new(64, extra);
        let need = MAX_RX_FRAME.div_ceil(4096);
        let mut bufs = post_4k(&mut d, need - 1);
        let f = frame(100, 11);
        d.peer.send(&f).unwrap();
        d.net.process_backend(0);
        assert_eq!(d.rx.take_used(&d.mem), vec![]);
        assert_eq!(d.irqs(RX), 0);
        if event_idx {
            // Asks to be told when the driver adds the next buffer (vring_need_event fires
            // for the very next one only if avail_event is the current available index).
            assert_eq!(d.rx.avail_event(&d.mem), d.rx.avail_idx);
        }
        bufs.extend(post_4k(&mut d, 1));
        // The driver notifies the receive queue.
        d.net.process_queue(RX);
        let used = d.rx.take_used(&d.mem);
        assert_eq!(check_merged(&d, &f, &bufs, &used), 1);
        assert_eq!(d.irqs(RX), 1);
    }
}

#[test]
fn reset_stops_serving() {
    let mut d = Driver::new(16, 0);
    d.net.reset();
    let f = frame(10, 1);
    let b = d.buffer(&f, f.len());
    d.tx.submit(&d.mem, &[(b, f.len() as u32, false)]);
    d.net.process_queue(TX);
    assert_eq!(d.peer_frame(), None);
    assert_eq!(d.tx.take_used(&d.mem), vec![]);
}

#[test]
fn seqpacket_truncates_and_reports_the_full_length() {
    let (a, b) = SeqPacket::pair("t").unwrap();
    b.send(&[7; 100]).unwrap();
    b.send(&[8; 5]).unwrap();
    let mut buf = [0u8; 10];
    assert_eq!(a.recv(&mut buf).unwrap(), 100);
    assert_eq!(buf, [7; 10]);
    // The rest of the first record is gone.
    assert_eq!(a.recv(&mut buf).unwrap(), 5);
    assert_eq!(buf[..5], [8; 5]);
}
