//! The whole virtio-balloon device (`virtio::balloon::Balloon`) driven through its three
//! split virtqueues (inflate 0, deflate 1, statistics 2) in guest memory, one chain at a time.
//!
//! Guest memory (`ferrovisor_fuzz::virtio_kit::memory`; guest RAM is frames 0-7 and 9-0x10,
//! frame 8 is the hole): page 0 holds the rings of the three queues, queue `q` at `q * 0x400`
//! (descriptor table +0, available ring +0x100, used ring +0x200, indirect table +0x300); the
//! rest of the input fills guest memory from 0x1000 on.
//!
//! Input:
//! - byte 0: bit 0 EVENT_IDX, bit 1 STATS_VQ negotiated, bit 2 DEFLATE_ON_OOM offered, bits 3-5
//!   queue size `1 << min(v, 4)`;
//! - bytes 1-2: the starting ring index of all three queues (wrap-around);
//! - byte 3: the initial target in pages (mod 18);
//! - byte: number of operations (mod 32); per operation a kind byte: bits 0-1 the queue
//!   (0 inflate, 1 deflate, 2 statistics, 3 a host request: bit 2 set = ask for statistics,
//!   else set the target to the next byte mod 18 pages). For a queue:
//!   - byte: bits 0-2 descriptor count - 1, bit 3 through an indirect table, bit 4 a frame
//!     list follows;
//!   - byte: head slot; byte: `used_event`;
//!   - the descriptors, in the `virtio_kit::Desc` encoding (only the WRITE flag is used; the
//!     harness links them);
//!   - with bit 4: a count byte (mod 64), then one byte per frame number: below 0xc0 frame
//!     `b % 0x14` (RAM, the hole at 8, just past RAM), 0xc0-0xdf far past RAM, 0xe0-0xff near
//!     `u32::MAX`; written as le32s across the chain's descriptors (where they lie in RAM
//!     above page 0);
//! - the rest fills guest memory from 0x1000.
//!
//! Checks, after every operation, against a reference written here: no panic; the chain is
//! read as `read_chain` must (stop at a device-writable descriptor or one outside guest memory
//! with nothing used, at most `MAX_PFNS_PER_BUFFER` frames or `MAX_STATS_BYTES`, a partial
//! frame ignored; virtio-queue ends a chain longer than 4 GiB); inflate zeroes exactly the
//! pages of the named frames that are guest RAM, and every other byte of guest memory except
//! the served queue's used ring is unchanged (deflate and statistics change nothing); the
//! counters match exactly (inflated/deflated pages, invalid frames, bad buffers, statistics
//! updates, no discard error); each inflate and deflate chain comes back on the used ring with
//! length 0; statistics: the device holds the latest buffer and returns the one it held (length
//! 0) when a new one arrives or the host asks for fresh values; the statistics match a
//! reference decoding (le16 tag, le64 value, 10-byte entries, last wins, unknown tags
//! ignored), as does `parse_stats`'s count of known, unknown and trailing bytes; `pfn_runs`
//! expands back to the frame list and never leaves two mergeable runs side by side;
//! interrupts follow `vring_need_event` with EVENT_IDX, else one per call that used a chain;
//! a new target raises one configuration interrupt. An inflate that discards page 0 (the
//! rings) is checked, then ends the input. After a reset nothing is served.
#![no_main]

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferrovisor_fuzz::virtio_kit::{
    fill, get16, get32, in_ram, memory, put16, put_desc as kit_put_desc, ready_queue, snapshot,
    trace, CountingInterrupt, Desc, Input, F_INDIRECT, F_NEXT, F_WRITE, RAM_END,
};
use hypervisor::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio::balloon::{
    feature, parse_pfns, parse_stats, pfn_runs, Balloon, BalloonCounters, ParsedStats,
    MAX_PFNS_PER_BUFFER, PAGE_SIZE, STAT_NAMES,
};
use virtio::{features, Activation, VirtioDevice};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
const QUEUE_SPAN: u64 = 0x400;
const AVAIL_OFF: u64 = 0x100;
const USED_OFF: u64 = 0x200;
const INDIRECT_OFF: u64 = 0x300;
const DATA: u64 = 0x1000;
/// `MAX_STATS_BYTES` in balloon.rs (private there).
const MAX_STATS_BYTES: usize = 1024;
/// Guest RAM in pages (`RAM_END`), the largest target.
const RAM_PAGES: u8 = (RAM_END / PAGE_SIZE) as u8;

fuzz_target!(|data: &[u8]| run(data));

fn base(q: usize) -> u64 {
    q as u64 * QUEUE_SPAN
}

fn put_desc(mem: &GuestMemoryMmap, at: u64, d: &Desc) {
    kit_put_desc(mem, at, d.addr, d.len, d.flags, d.next);
}

fn queue(q: usize, size: u16, event_idx: bool, start: u16) -> Queue {
    let b = base(q);
    ready_queue(size, event_idx, start, b, b + AVAIL_OFF, b + USED_OFF)
}

/// A frame number from its one-byte encoding (see the input format).
fn frame(b: u8) -> u32 {
    match b {
        0..=0xbf => u32::from(b % 0x14),
        0xc0..=0xdf => 0x11 + u32::from(b & 0x1f) * 0x1_0000,
        _ => u32::MAX - u32::from(b & 0x1f),
    }
}

fn frame_in_ram(pfn: u32) -> bool {
    in_ram(u64::from(pfn) * PAGE_SIZE, PAGE_SIZE, false)
}

/// What `read_chain` must make of the descriptors `descs` (address, length, device-writable),
/// read from the guest memory `snap`: the bytes and whether there were more, or `None` for a
/// buffer that cannot be read.
fn read_ref(snap: &[u8], descs: &[Desc], max: usize) -> Option<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    let mut yielded = 0u32;
    for d in descs {
        // virtio-queue ends a chain whose lengths add up past 4 GiB (virtio 1.2, 2.7.5.2).
        let Some(y) = yielded.checked_add(d.len) else {
            break;
        };
        yielded = y;
        if d.writable() {
            return None;
        }
        let len = d.len as usize;
        let n = len.min(max - buf.len());
        if !in_ram(d.addr, n as u64, false) {
            return None;
        }
        if n > 0 {
            buf.extend_from_slice(&snap[d.addr as usize..d.addr as usize + n]);
        }
        if n < len {
            return Some((buf, true));
        }
    }
    Some((buf, false))
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    inflated: u64,
    deflated: u64,
    invalid: u64,
    bad: u64,
    discard_errors: u64,
    stats_updates: u64,
}

impl Counts {
    fn of(c: &BalloonCounters) -> Counts {
        Counts {
            inflated: c.inflated_pages.load(Ordering::Relaxed),
            deflated: c.deflated_pages.load(Ordering::Relaxed),
            invalid: c.invalid_pfns.load(Ordering::Relaxed),
            bad: c.bad_buffers.load(Ordering::Relaxed),
            discard_errors: c.discard_errors.load(Ordering::Relaxed),
            stats_updates: c.stats_updates.load(Ordering::Relaxed),
        }
    }
}

struct Harness {
    mem: &'static GuestMemoryMmap,
    size: u16,
    event_idx: bool,
    with_stats: bool,
    irq: Arc<CountingInterrupt>,
    /// Per queue: the next available index the driver writes, the device's next used index.
    avail_idx: [Wrapping<u16>; 3],
    used_idx: [Wrapping<u16>; 3],
    counts: Counts,
    /// The statistics buffer the device holds.
    held: Option<u16>,
    stats: [Option<u64>; STAT_NAMES.len()],
    /// The target the driver last heard of, in pages.
    notified: u32,
}

/// What serving a chain must do to guest memory, the counters and the used ring.
struct Prediction {
    /// Pages that must read as zeros.
    zeroed: Vec<u32>,
    /// The used entry `(head, length)` the call adds, if any.
    used: Option<u16>,
}

impl Harness {
    fn used_span(&self, q: usize) -> (usize, usize) {
        let at = (base(q) + USED_OFF) as usize;
        (at, at + 6 + 8 * usize::from(self.size))
    }

    /// Whether the call that moved queue `q`'s used index from `old` must interrupt
    /// (virtio 1.2, 2.7.10: `vring_need_event` with EVENT_IDX).
    fn interrupt_due(&self, q: usize, old: Wrapping<u16>) -> bool {
        let new = self.used_idx[q];
        if new == old {
            return false;
        }
        if !self.event_idx {
            return true;
        }
        let at = base(q) + AVAIL_OFF + 4 + 2 * u64::from(self.size);
        let used_event = Wrapping(get16(self.mem, at));
        new - used_event - Wrapping(1) < new - old
    }

    /// Lays out the chain `descs` on queue `q` (linked from slot `head`, or through the
    /// queue's indirect table) and makes it available. Returns the head.
    fn publish(
        &mut self,
        q: usize,
        head: u8,
        indirect: bool,
        descs: &[Desc],
        used_event: u8,
    ) -> u16 {
        let b = base(q);
        let n = descs.len() as u16;
        let link = |i: u16, d: &Desc, first: u16| {
            let last = i + 1 == n;
            Desc {
                flags: d.flags & F_WRITE | if last { 0 } else { F_NEXT },
                next: if last { 0 } else { first + i + 1 },
                ..*d
            }
        };
        let head = if indirect {
            let head = u16::from(head) % self.size;
            for (i, d) in descs.iter().enumerate() {
                let at = b + INDIRECT_OFF + 16 * i as u64;
                put_desc(self.mem, at, &link(i as u16, d, 0));
            }
            let table = Desc {
                addr: b + INDIRECT_OFF,
                len: 16 * u32::from(n),
                flags: F_INDIRECT,
                next: 0,
            };
            put_desc(self.mem, b + 16 * u64::from(head), &table);
            head
        } else {
            let head = u16::from(head) % (self.size - n + 1);
            for (i, d) in descs.iter().enumerate() {
                let at = b + 16 * (u64::from(head) + i as u64);
                put_desc(self.mem, at, &link(i as u16, d, head));
            }
            head
        };
        let avail = b + AVAIL_OFF;
        let slot = u64::from(self.avail_idx[q].0 % self.size);
        put16(self.mem, avail + 4 + 2 * slot, head);
        self.avail_idx[q] += 1;
        put16(self.mem, avail + 2, self.avail_idx[q].0);
        put16(
            self.mem,
            avail + 4 + 2 * u64::from(self.size),
            u16::from(used_event),
        );
        if !self.event_idx {
            // What the device writes before it pops (VRING_USED_F_NO_NOTIFY), so reading a
            // buffer over the flags gives what the snapshot holds.
            put16(self.mem, b + USED_OFF, 1);
        }
        head
    }

    /// Predicts what serving `descs` (made available at `head` on `q`) must do, from guest
    /// memory `snap`, and updates the model.
    fn predict(&mut self, q: usize, head: u16, descs: &[Desc], snap: &[u8]) -> Prediction {
        match q {
            INFLATE | DEFLATE => {
                let max = MAX_PFNS_PER_BUFFER * 4;
                let (pfns, bad) = match read_ref(snap, descs, max) {
                    Some((buf, more)) => {
                        let pfns: Vec<u32> = buf
                            .chunks_exact(4)
                            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                            .collect();
                        check_runs(&buf, &pfns);
                        (pfns, more || buf.len() % 4 != 0)
                    }
                    None => (Vec::new(), true),
                };
                let valid: Vec<u32> = pfns.iter().copied().filter(|&p| frame_in_ram(p)).collect();
                let c = &mut self.counts;
                c.bad += u64::from(bad);
                c.invalid += (pfns.len() - valid.len()) as u64;
                if q == INFLATE {
                    c.inflated += valid.len() as u64;
                } else {
                    c.deflated += valid.len() as u64;
                }
                if trace() {
                    eprintln!(
                        "queue {q} head {head}: {descs:x?} -> {} frames, {} in RAM, bad {bad}",
                        pfns.len(),
                        valid.len()
                    );
                }
                Prediction {
                    zeroed: if q == INFLATE { valid } else { Vec::new() },
                    used: Some(head),
                }
            }
            _ => {
                if !self.with_stats {
                    return Prediction {
                        zeroed: Vec::new(),
                        used: None,
                    };
                }
                let buf = match read_ref(snap, descs, MAX_STATS_BYTES) {
                    Some((buf, _)) => buf,
                    None => {
                        self.counts.bad += 1;
                        Vec::new()
                    }
                };
                self.counts.stats_updates += 1;
                // The reference decoding (virtio 1.2, 5.5.6.3).
                let (mut known, mut unknown) = (0, 0);
                for e in buf.chunks_exact(10) {
                    let tag = usize::from(u16::from_le_bytes([e[0], e[1]]));
                    let value = u64::from_le_bytes(e[2..10].try_into().unwrap());
                    if tag < STAT_NAMES.len() {
                        self.stats[tag] = Some(value);
                        known += 1;
                    } else {
                        unknown += 1;
                    }
                }
                let mut scratch = Default::default();
                let parsed = parse_stats(&buf, &mut scratch);
                assert_eq!(
                    parsed,
                    ParsedStats {
                        known,
                        unknown,
                        trailing: buf.len() % 10
                    },
                    "parse_stats on {buf:x?}"
                );
                if trace() {
                    eprintln!("stats head {head}: {descs:x?} -> {} bytes", buf.len());
                }
                Prediction {
                    zeroed: Vec::new(),
                    used: self.held.replace(head),
                }
            }
        }
    }

    /// Serves one chain on queue `q`; false if the input must end (the rings were discarded).
    fn chain(&mut self, balloon: &mut Balloon, q: usize, input: &mut Input) -> bool {
        let mode = input.u8();
        let head = input.u8();
        let used_event = input.u8();
        let n = usize::from(mode & 7) + 1;
        let indirect = mode & 8 != 0;
        let mut descs: Vec<Desc> = (0..n).map(|_| Desc::read(input)).collect();
        if !indirect {
            // A direct chain must fit in the descriptor table.
            descs.truncate(usize::from(self.size));
        }
        if mode & 0x10 != 0 {
            let count = input.u8() % 64;
            let list: Vec<u8> = (0..count)
                .flat_map(|_| frame(input.u8()).to_le_bytes())
                .collect();
            self.write_stream(&descs, &list);
        }
        let head = self.publish(q, head, indirect, &descs, used_event);
        let before = snapshot(self.mem);
        let counts_before = self.counts;
        let p = self.predict(q, head, &descs, &before);
        let irq_before = self.irq.queue_count();
        let old = self.used_idx[q];
        balloon.process_queue(q);

        // Guest memory: the named pages zeroed, nothing else changed but the used ring.
        let got = snapshot(self.mem);
        let mut want = before;
        for &pfn in &p.zeroed {
            let at = pfn as usize * PAGE_SIZE as usize;
            want[at..at + PAGE_SIZE as usize].fill(0);
        }
        let (us, ue) = self.used_span(q);
        want[us..ue].copy_from_slice(&got[us..ue]);
        if got != want {
            let i = (0..got.len()).find(|&i| got[i] != want[i]).unwrap();
            panic!(
                "guest memory at {i:#x} is {:#x}, want {:#x}, after queue {q} served {descs:x?} \
                 (zeroed frames {:x?})",
                got[i], want[i], p.zeroed
            );
        }
        let counts = Counts::of(balloon.handle().counters());
        assert_eq!(
            counts, self.counts,
            "counters after queue {q} served {descs:x?} (before: {counts_before:?})"
        );
        assert_eq!(
            balloon.handle().latest_stats().values,
            self.stats,
            "statistics after {descs:x?}"
        );
        if p.zeroed.contains(&0) {
            // The driver discarded its own rings: the device may find anything there now.
            return false;
        }
        if let Some(id) = p.used {
            self.check_used(q, old, id);
        }
        self.check_ring_and_interrupts(q, old, irq_before, &format!("queue {q} served {descs:x?}"));
        true
    }

    /// The used entry at `old` on queue `q` names `head` with length 0.
    /// After `what` (which found queue `q`'s used index at `old` and the interrupt count at
    /// `irq_before`): the used index the device published is the one predicted, and it raised
    /// a queue interrupt exactly when one was due.
    fn check_ring_and_interrupts(
        &self,
        q: usize,
        old: Wrapping<u16>,
        irq_before: usize,
        what: &str,
    ) {
        assert_eq!(
            get16(self.mem, base(q) + USED_OFF + 2),
            self.used_idx[q].0,
            "used index of queue {q} after {what}"
        );
        assert_eq!(
            self.irq.queue_count() - irq_before,
            usize::from(self.interrupt_due(q, old)),
            "queue interrupts after {what}"
        );
    }

    fn check_used(&mut self, q: usize, old: Wrapping<u16>, head: u16) {
        let at = base(q) + USED_OFF + 4 + 8 * u64::from(old.0 % self.size);
        let entry = (get32(self.mem, at), get32(self.mem, at + 4));
        assert_eq!(entry, (u32::from(head), 0), "used entry of queue {q}");
        self.used_idx[q] += 1;
    }

    /// Writes `list` as one stream across the bytes of `descs` that lie in guest RAM above
    /// page 0 (the rings stay as laid out).
    fn write_stream(&self, descs: &[Desc], list: &[u8]) {
        let mut left = list;
        for d in descs {
            for i in 0..u64::from(d.len) {
                let Some((&b, rest)) = left.split_first() else {
                    return;
                };
                let Some(at) = d.addr.checked_add(i) else {
                    break;
                };
                if at >= DATA && in_ram(at, 1, false) {
                    self.mem.write_obj(b, GuestAddress(at)).unwrap();
                }
                left = rest;
            }
        }
    }

    /// A host request: ask for statistics, or set a new target.
    fn host(&mut self, balloon: &mut Balloon, kind: u8, input: &mut Input) {
        let h = balloon.handle();
        let (irq, config) = (
            self.irq.queue_count(),
            self.irq.config.load(Ordering::SeqCst),
        );
        let old = self.used_idx[STATS];
        let mut returned = None;
        if kind & 4 != 0 {
            let (stats, fresh) = h.request_stats(Duration::ZERO);
            assert!(!fresh, "fresh statistics without the guest");
            assert_eq!(stats.values, self.stats, "statistics");
            balloon.process_backend(0);
            if self.with_stats {
                returned = self.held.take();
            }
        } else {
            let pages = u32::from(input.u8() % (RAM_PAGES + 1));
            h.set_target(u64::from(pages) * PAGE_SIZE)
                .expect("a target within guest memory");
            balloon.process_backend(0);
            let changed = pages != self.notified;
            self.notified = pages;
            assert_eq!(
                self.irq.config.load(Ordering::SeqCst) - config,
                usize::from(changed),
                "configuration interrupts for a target of {pages} pages"
            );
        }
        if let Some(head) = returned {
            self.check_used(STATS, old, head);
        }
        self.check_ring_and_interrupts(STATS, old, irq, "a host request");
    }
}

/// `parse_pfns` reads the le32s of `buf`, and `pfn_runs` expands back to them with no two
/// mergeable runs side by side.
fn check_runs(buf: &[u8], pfns: &[u32]) {
    assert!(parse_pfns(buf).eq(pfns.iter().copied()), "parse_pfns");
    let runs = pfn_runs(pfns.iter().copied());
    let expanded: Vec<u64> = runs.iter().flat_map(|&(f, c)| f..f + c).collect();
    assert!(
        expanded
            .iter()
            .copied()
            .eq(pfns.iter().map(|&p| u64::from(p))),
        "pfn_runs {runs:x?} does not expand to {pfns:x?}"
    );
    for w in runs.windows(2) {
        assert!(
            w[0].1 > 0 && w[0].0 + w[0].1 != w[1].0,
            "mergeable runs {runs:x?}"
        );
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let f = input.u8();
    let event_idx = f & 1 != 0;
    let with_stats = f & 2 != 0;
    let deflate_on_oom = f & 4 != 0;
    let size: u16 = 1 << ((f >> 3) & 7).min(4);
    let start = input.u16();
    let target = u32::from(input.u8() % (RAM_PAGES + 1));
    // The operations, parsed lazily from the input; the guest memory fill is what follows
    // them, so collect their bytes first.
    let ops = input.u8() % 32;
    let ops_input = input.rest();
    let mut scan = Input::new(ops_input);
    for _ in 0..ops {
        skip_op(&mut scan);
    }
    let fill_bytes = scan.rest();

    let mem = memory();
    fill(mem, DATA, fill_bytes);
    for q in 0..3 {
        let b = base(q);
        put16(mem, b + AVAIL_OFF + 2, start);
        put16(mem, b + USED_OFF + 2, start);
    }

    let mut balloon = Balloon::new(RAM_END, u64::from(target) * PAGE_SIZE, deflate_on_oom, None)
        .expect("balloon");
    assert_eq!(
        balloon.features() & feature::DEFLATE_ON_OOM != 0,
        deflate_on_oom
    );
    let irq = Arc::new(CountingInterrupt::default());
    let mut feats = features::VERSION_1 | features::RING_INDIRECT_DESC;
    if event_idx {
        feats |= features::RING_EVENT_IDX;
    }
    if with_stats {
        feats |= feature::STATS_VQ;
    }
    balloon
        .activate(Activation {
            mem: mem.clone(),
            queues: (0..3).map(|q| queue(q, size, event_idx, start)).collect(),
            features: feats,
            interrupt: irq.clone(),
        })
        .expect("activation");

    let mut h = Harness {
        mem,
        size,
        event_idx,
        with_stats,
        irq,
        avail_idx: [Wrapping(start); 3],
        used_idx: [Wrapping(start); 3],
        counts: Counts::default(),
        held: None,
        stats: [None; STAT_NAMES.len()],
        notified: target,
    };
    let mut input = Input::new(ops_input);
    for _ in 0..ops {
        let kind = input.u8();
        let q = usize::from(kind & 3);
        if q == 3 {
            h.host(&mut balloon, kind, &mut input);
        } else if !h.chain(&mut balloon, q, &mut input) {
            return;
        }
    }

    // After a reset nothing is served.
    balloon.reset();
    let used = get16(mem, base(INFLATE) + USED_OFF + 2);
    h.publish(
        INFLATE,
        0,
        false,
        &[Desc {
            addr: DATA,
            len: 4,
            flags: 0,
            next: 0,
        }],
        0,
    );
    balloon.process_queue(INFLATE);
    assert_eq!(
        get16(mem, base(INFLATE) + USED_OFF + 2),
        used,
        "a reset device served a chain"
    );
}

/// Reads past one operation (the same bytes `Harness::chain` and `Harness::host` read).
fn skip_op(input: &mut Input) {
    let kind = input.u8();
    if kind & 3 == 3 {
        if kind & 4 == 0 {
            input.u8();
        }
        return;
    }
    let mode = input.u8();
    input.u8();
    input.u8();
    let n = usize::from(mode & 7) + 1;
    for _ in 0..n {
        Desc::read(input);
    }
    if mode & 0x10 != 0 {
        let count = input.u8() % 64;
        for _ in 0..count {
            input.u8();
        }
    }
}
