//! The whole virtio-net device (`virtio::net::Net`) behind two split virtqueues in guest
//! memory, on a SEQPACKET socket pair (`virtio::net::SeqPacket`) whose other end the target
//! holds: it injects frames for the guest and receives the frames the guest sends.
//!
//! Guest memory (`virtio_kit::memory_with_big`): receive rings at 0x0 / 0x100 / 0x200, transmit
//! rings at 0x300 / 0x400 / 0x500, a scratch area 0x800..0x1000 that hostile descriptors may
//! share, private buffers bump-allocated from 0x1000 (across the region boundary at 0x4000,
//! skipping the hole) and, for large ones, from the 2 GiB region at `BIG_BASE`.
//!
//! Input: byte 0: bit 0 MRG_RXBUF, bit 1 EVENT_IDX, bits 2-3 queue size `2 << v`; then ops
//! (at most 96), one byte each plus operands: 0 a transmit chain, 1 a receive chain (1-4
//! descriptors, each: a kind byte (bit 0 device-writable, bits 1-2 where: private small,
//! private large, scratch / hole / past RAM, or a raw descriptor with flags and `next` from
//! the input) and a 16-bit length), 2 a frame from the host (16-bit size, 12 bytes up to
//! 70000, so larger than the largest frame too), 3 process_queue(TX), 4 process_queue(RX),
//! 5 process_backend, 6 a new `used_event` on both queues.
//!
//! Checks: no panic or hang; each queue's used entries name, in order, the chains made
//! available (never more); transmit: each frame the peer receives is exactly the readable
//! bytes of a valid chain, in order, and the counters add up; receive (predicted exactly from
//! the chains and the frames): unusable chains come back empty, a frame fills the chains as
//! the device must (lengths bounded by each chain's writable room), its bytes and num_buffers
//! land in guest memory, and after every receive the device has either delivered every frame
//! or has no room for the next (and with EVENT_IDX asked to be told of the next buffer); no
//! interrupt without used entries. A raw descriptor makes the chain unpredictable: then only
//! "no panic or hang" is checked for the rest of the input.
#![no_main]

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferrovisor_fuzz::virtio_kit::{
    fill, in_ram, memory_with_big, ready_queue, CountingInterrupt, Input, BIG_BASE,
};
use hypervisor::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio::net::{Net, SeqPacket, MAX_RX_FRAME, MAX_TX_LEN, VNET_HDR_LEN};
use virtio::{features, Activation, VirtioDevice};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::{Bytes, GuestAddress};

const RINGS: [u64; 2] = [0x0, 0x300];
const SCRATCH: u64 = 0x800;
const SMALL: u64 = 0x1000;
const RX: usize = 0;
const TX: usize = 1;

fuzz_target!(|data: &[u8]| run(data));

#[derive(Clone, Debug)]
struct Chain {
    head: u16,
    descs: Vec<u16>,
    /// (address, length, writable)
    bufs: Vec<(u64, u32, bool)>,
    /// Every buffer lies in bump-allocated memory of its own.
    private: bool,
}

impl Chain {
    fn parts(&self, writable: bool) -> impl Iterator<Item = &(u64, u32, bool)> {
        self.bufs.iter().filter(move |b| b.2 == writable)
    }
    fn len(&self, writable: bool) -> u64 {
        self.parts(writable).map(|b| u64::from(b.1)).sum()
    }
    fn ok(&self, writable: bool) -> bool {
        self.parts(writable)
            .all(|b| in_ram(b.0, u64::from(b.1), true))
    }
}

struct Ring {
    base: u64,
    size: u16,
    free: Vec<u16>,
    avail: u16,
    used: u16,
    pending: VecDeque<Chain>,
}

impl Ring {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail_addr(&self) -> u64 {
        self.base + 0x100
    }
    fn used_addr(&self) -> u64 {
        self.base + 0x200
    }
    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used_addr() + 2)).unwrap()
    }
    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(self.desc() + 16 * u64::from(i)))
            .unwrap();
    }
    fn publish(&mut self, mem: &GuestMemoryMmap, c: Chain) {
        let slot = self.avail_addr() + 4 + 2 * u64::from(self.avail % self.size);
        mem.write_obj(c.head, GuestAddress(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        mem.write_obj(self.avail, GuestAddress(self.avail_addr() + 2))
            .unwrap();
        self.pending.push_back(c);
    }
    /// New used entries: (head, len).
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        let idx = self.used_idx(mem);
        assert!(
            idx.wrapping_sub(self.used) as usize <= self.pending.len(),
            "more used entries than chains available"
        );
        while self.used != idx {
            let at = self.used_addr() + 4 + 8 * u64::from(self.used % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.used = self.used.wrapping_add(1);
        }
        out
    }
    fn retire(&mut self, c: &Chain) {
        self.free.extend(&c.descs);
    }
}

struct Bump {
    small: u64,
    big: u64,
}

impl Bump {
    fn small(&mut self, len: u64) -> Option<u64> {
        let mut at = self.small;
        if at < 0x8000 && at + len > 0x8000 {
            at = 0x9000;
        }
        if at + len > 0x1_1000 {
            return None;
        }
        self.small = at + len;
        Some(at)
    }
    fn big(&mut self, len: u64) -> u64 {
        let at = self.big;
        self.big += len.next_multiple_of(64);
        at
    }
}

fn run(data: &[u8]) {
    let mem = memory_with_big();
    let mut input = Input::new(data);
    let f = input.u8();
    let mergeable = f & 1 != 0;
    let event_idx = f & 2 != 0;
    let size = 2u16 << ((f >> 2) & 3);
    fill(mem, SCRATCH, &[0x11; 0x800]);

    let (dev, peer) = SeqPacket::pair("fuzz").expect("socketpair");
    let mut net = Net::with_io(Box::new(dev), [2, 0, 0, 0, 0, 1]).expect("net");
    let irq = Arc::new(CountingInterrupt::default());
    let mut rings: Vec<Ring> = RINGS
        .iter()
        .map(|&base| Ring {
            base,
            size,
            free: (0..size).rev().collect(),
            avail: 0,
            used: 0,
            pending: VecDeque::new(),
        })
        .collect();
    let queues = rings
        .iter()
        .map(|r| ready_queue(size, event_idx, 0, r.desc(), r.avail_addr(), r.used_addr()))
        .collect();
    let mut feats = features::VERSION_1;
    if mergeable {
        feats |= 1 << VIRTIO_NET_F_MRG_RXBUF;
    }
    if event_idx {
        feats |= features::RING_EVENT_IDX;
    }
    net.activate(Activation {
        mem: mem.clone(),
        queues,
        features: feats,
        interrupt: irq.clone(),
    })
    .expect("activate");
    let counters = net.counters();

    let mut bump = Bump {
        small: SMALL,
        big: BIG_BASE,
    };
    let mut wild = false;
    // Frames in the socket, not yet delivered.
    let mut frames: VecDeque<Vec<u8>> = VecDeque::new();
    let mut seed = 0u8;
    let mut buf = vec![0u8; 0x2_0000];
    let mut tx_frames = 0u64;
    let mut tx_dropped = 0u64;
    let mut rx_dropped = 0u64;
    let mut rx_frames = 0u64;

    for _ in 0..96 {
        if input.is_empty() {
            break;
        }
        let op = input.u8() % 7;
        let irq_before = irq.queue_count();
        let used_before = [rings[0].used_idx(mem), rings[1].used_idx(mem)];
        match op {
            0 | 1 => {
                let r = &mut rings[if op == 0 { TX } else { RX }];
                let n = 1 + usize::from(input.u8() % 4);
                if r.free.len() < n {
                    continue;
                }
                let descs: Vec<u16> = (0..n).map(|_| r.free.pop().unwrap()).collect();
                let mut c = Chain {
                    head: descs[0],
                    descs: descs.clone(),
                    bufs: vec![],
                    private: true,
                };
                for (i, &d) in descs.iter().enumerate() {
                    let kind = input.u8();
                    let len = u32::from(input.u16());
                    let w = kind & 1 != 0;
                    let next = descs.get(i + 1).copied();
                    let mut flags = if next.is_some() { 1 } else { 0 } | if w { 2 } else { 0 };
                    let (addr, len) = match (kind >> 1) & 3 {
                        0 => {
                            let len = len % 0x1000;
                            match bump.small(u64::from(len)) {
                                Some(a) => (a, len),
                                None => (u64::MAX - 0x10, len),
                            }
                        }
                        1 => {
                            let len = len.max(1) * 2;
                            (bump.big(u64::from(len)), len)
                        }
                        2 => {
                            c.private = false;
                            match kind >> 3 & 3 {
                                0 => (SCRATCH + u64::from(len % 0x700), len % 0x100),
                                1 => (0x8000 + u64::from(len % 0x1000), 0x10),
                                2 => (0x1_1000 - 8, 16),
                                _ => (u64::MAX - 8, 0x20),
                            }
                        }
                        _ => {
                            wild = true;
                            flags = u16::from(kind >> 3) & 7;
                            let a = SCRATCH + u64::from(input.u16() % 0x800);
                            let nx = u16::from(input.u8());
                            r.write_desc(mem, d, a, len, flags, nx);
                            continue;
                        }
                    };
                    if (kind >> 1) & 3 < 2 {
                        // Contents for transmit, zeroes (for a clean check) for receive.
                        let fillb: Vec<u8> = (0..len).map(|k| (k as u8) ^ seed ^ 0x5a).collect();
                        let _ = mem.write_slice(&fillb, GuestAddress(addr));
                        seed = seed.wrapping_add(1);
                    }
                    r.write_desc(mem, d, addr, len, flags, next.unwrap_or(0));
                    c.bufs.push((addr, len, w));
                }
                r.publish(mem, c);
            }
            2 => {
                let v = input.u16();
                let len = if v & 1 != 0 {
                    VNET_HDR_LEN + (usize::from(v >> 1) * 3) % 70_000
                } else {
                    VNET_HDR_LEN + usize::from(v >> 1) % 1600
                };
                let fr: Vec<u8> = (0..len).map(|k| (k as u8).wrapping_mul(7) ^ seed).collect();
                seed = seed.wrapping_add(3);
                if peer.send(&fr).is_ok() {
                    frames.push_back(fr);
                }
            }
            3 => {
                // What each valid chain must send, read before the device serves.
                let expect: Vec<Option<Vec<u8>>> = rings[TX]
                    .pending
                    .iter()
                    .map(|c| {
                        let len = c.len(false);
                        (c.ok(false) && (VNET_HDR_LEN as u64..=MAX_TX_LEN as u64).contains(&len))
                            .then(|| {
                                let mut v = Vec::new();
                                for &(a, l, _) in c.parts(false) {
                                    let mut b = vec![0u8; l as usize];
                                    mem.read_slice(&mut b, GuestAddress(a)).unwrap();
                                    v.extend(b);
                                }
                                v
                            })
                    })
                    .collect();
                net.process_queue(TX);
                let used = rings[TX].take_used(mem);
                let mut got = Vec::new();
                while let Ok(n) = peer.recv(&mut buf) {
                    got.push(buf[..n.min(buf.len())].to_vec());
                }
                if !wild {
                    assert_eq!(used.len(), expect.len(), "transmit left chains");
                    let mut it = got.iter().peekable();
                    let mut sent = 0;
                    for ((h, l), e) in used.iter().zip(&expect) {
                        let c = rings[TX].pending.pop_front().unwrap();
                        assert_eq!((*h, *l), (c.head, 0), "transmit used entry");
                        rings[TX].retire(&c);
                        if let Some(e) = e {
                            if it.peek() == Some(&e) {
                                it.next();
                                sent += 1;
                            }
                        }
                    }
                    assert!(it.next().is_none(), "peer got a frame no valid chain held");
                    tx_frames += sent;
                    tx_dropped += used.len() as u64 - sent;
                    assert_eq!(counters.tx_frames.load(Ordering::Relaxed), tx_frames);
                    assert_eq!(counters.tx_dropped.load(Ordering::Relaxed), tx_dropped);
                } else {
                    for _ in &used {
                        if let Some(c) = rings[TX].pending.pop_front() {
                            rings[TX].retire(&c);
                        }
                    }
                }
            }
            4 | 5 => {
                if op == 4 {
                    net.process_queue(RX);
                } else {
                    net.process_backend(0);
                }
                let used = rings[RX].take_used(mem);
                if wild {
                    for _ in &used {
                        if let Some(c) = rings[RX].pending.pop_front() {
                            rings[RX].retire(&c);
                        }
                    }
                } else {
                    check_rx(
                        mem,
                        &mut rings[RX],
                        &used,
                        &mut frames,
                        mergeable,
                        &mut rx_dropped,
                        &mut rx_frames,
                    );
                    assert_eq!(counters.rx_dropped.load(Ordering::Relaxed), rx_dropped);
                    assert_eq!(counters.rx_frames.load(Ordering::Relaxed), rx_frames);
                    // Liveness: every frame delivered, or no room for the next.
                    if !frames.is_empty() {
                        let want = if mergeable { MAX_RX_FRAME as u64 } else { 1 };
                        let mut room = 0;
                        // An unusable chain behind usable ones that hold too little stops
                        // receive for good (see fuzz/README.md); the driver only hurts itself.
                        let mut blocked = false;
                        for c in &rings[RX].pending {
                            if !c.ok(true) || c.len(true) < VNET_HDR_LEN as u64 {
                                blocked = true;
                                break;
                            }
                            room += c.len(true);
                        }
                        assert!(room < want, "device stopped with room for a frame");
                        if event_idx && !blocked {
                            let at = rings[RX].used_addr() + 4 + 8 * u64::from(size);
                            let ev: u16 = mem.read_obj(GuestAddress(at)).unwrap();
                            assert_eq!(
                                ev, rings[RX].avail,
                                "avail_event: the next buffer would not notify"
                            );
                        }
                    }
                }
            }
            _ => {
                let ev = input.u16();
                for r in &rings {
                    let at = r.avail_addr() + 4 + 2 * u64::from(size);
                    mem.write_obj(ev, GuestAddress(at)).unwrap();
                }
            }
        }
        let after = [rings[0].used_idx(mem), rings[1].used_idx(mem)];
        if after == used_before {
            assert_eq!(
                irq.queue_count(),
                irq_before,
                "interrupt without used entries"
            );
        }
        if !event_idx && after != used_before {
            assert!(
                irq.queue_count() > irq_before,
                "used entries without an interrupt"
            );
        }
    }
}

fn check_rx(
    mem: &GuestMemoryMmap,
    ring: &mut Ring,
    used: &[(u16, u32)],
    frames: &mut VecDeque<Vec<u8>>,
    mergeable: bool,
    rx_dropped: &mut u64,
    rx_frames: &mut u64,
) {
    let want = if mergeable { MAX_RX_FRAME as u64 } else { 1 };
    let mut i = 0;
    while i < used.len() {
        let c = ring
            .pending
            .front()
            .cloned()
            .expect("used entry for no chain");
        let usable = c.ok(true) && c.len(true) >= VNET_HDR_LEN as u64;
        if !usable {
            assert_eq!(used[i], (c.head, 0), "unusable chain");
            ring.pending.pop_front();
            ring.retire(&c);
            *rx_dropped += 1;
            i += 1;
            continue;
        }
        // The chains the device gathers, and how the frame fills them.
        let frame = frames
            .pop_front()
            .expect("frame delivered that was never sent");
        let mut gathered = Vec::new();
        let mut room = 0;
        for c in &ring.pending {
            if room >= want || !c.ok(true) || c.len(true) < VNET_HDR_LEN as u64 {
                break;
            }
            room += c.len(true);
            gathered.push(c.clone());
        }
        assert!(room >= want, "frame delivered without room for the largest");
        let mut left = frame.len() as u64;
        let mut taken = Vec::new();
        for c in &gathered {
            if !taken.is_empty() && left == 0 {
                break;
            }
            let t = left.min(c.len(true));
            taken.push((c.clone(), t));
            left -= t;
        }
        let n = taken.len();
        let mut got = Vec::new();
        let mut private = true;
        for (c, t) in &taken {
            assert_eq!(
                used.get(i),
                Some(&(c.head, *t as u32)),
                "receive used entry"
            );
            assert!(u64::from(used[i].1) <= c.len(true));
            i += 1;
            ring.pending.pop_front();
            ring.retire(c);
            private &= c.private;
            let mut t = *t;
            for &(a, l, _) in c.parts(true) {
                let k = t.min(u64::from(l));
                let mut b = vec![0u8; k as usize];
                mem.read_slice(&mut b, GuestAddress(a)).unwrap();
                got.extend(b);
                t -= k;
            }
        }
        if private {
            let mut expect = frame[..got.len()].to_vec();
            expect[10..12].copy_from_slice(&(n as u16).to_le_bytes());
            assert_eq!(got, expect, "frame bytes in guest memory");
        }
        *rx_frames += 1;
    }
}
