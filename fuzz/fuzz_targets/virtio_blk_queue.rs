//! The whole virtio-blk device (`virtio::block::Block`) driven through a split virtqueue in
//! guest memory, on a small disk image in a memfd.
//!
//! Guest memory (`ferrovisor_fuzz::virtio_kit::memory`): the descriptor table at 0x0, the
//! available ring at 0x100, the used ring at 0x200; indirect tables go in 0x1000..0x1200; data
//! from 0x1200 on (crossing two region boundaries and a hole).
//!
//! Input:
//! - byte 0: bit 0 read-only disk, bit 1 EVENT_IDX, bit 2 strict (one chain per
//!   `process_queue`, checked against a model), bits 3-5 queue size `1 << min(v, 4)`, bit 6
//!   the vCPU tries first (every `process_queue(0)` that serves chains is preceded by
//!   `process_queue_now(0)`, as on the emulator's notifying vCPU);
//! - byte 1: image size in sectors - 1 (mod 128); byte 2: half the bytes past the last whole
//!   sector (a partial sector); bytes 3-4: the starting ring index (both rings; wrap-around);
//!   byte 5: serial length (mod 26; 25 means none, so the file name); byte 6: image pattern;
//! - the descriptor table: queue-size descriptors in the `virtio_kit::Desc` encoding;
//! - byte: rounds (mod 5); per round: a count, `used_event` (2 bytes), then one byte per head
//!   made available (heads past the queue size included);
//! - the rest fills guest memory from 0x1000 (32 raw indirect descriptors, then request
//!   headers and data).
//!
//! `VIRTIO_FUZZ_TRACE=1` prints each chain served in strict mode and its predicted outcome,
//! and what `process_queue_now` did.
//!
//! Up to 31 chains may be made available at once, more than the queue holds (an index the
//! queue refuses once hung the device: fuzz/README.md); then the harness stops predicting and
//! keeps only the checks that hold whatever the device serves. Buffers the device writes are
//! kept out of the rings and tables (`tame`), so each chain stays predictable.
//!
//! Checks, always: no panic or hang, the image keeps its size, a read-only image is never
//! changed, capacity in the configuration space matches the image. In strict mode each chain
//! is walked (with virtio-queue) just before the device serves it and its outcome predicted:
//! request parsed with `request::parse` (itself checked by `virtio_blk_request`), then the
//! status, the data written to guest memory and the image, the used ring entry (head, length),
//! the interrupt (the spec's `vring_need_event` with EVENT_IDX, else one per batch) and the
//! counters must match, and guest memory outside the used ring must be exactly as predicted
//! (a request that reads the used ring, which the device writes as it serves, is only checked
//! for its used entry). In batch mode (all heads of a round at once): the used ring lists the
//! valid heads in order, lengths are bounded by the chains' writable bytes, the rings and
//! tables are left alone, the interrupt matches.
//!
//! When the vCPU tries first (`process_queue_now`, which serves only what needs no waiting
//! and stops at the first request that would wait, leaving it and what follows available):
//! - strict mode: if it returns true, the chain was served (all the checks above hold) and
//!   the `process_queue(0)` after it changes nothing (guest memory, used index, interrupts,
//!   counters, image); a flush, discard or write-zeroes must not have been served by it. If
//!   it returns false, nothing changed (guest memory byte for byte, but for the used ring's
//!   flags, which without EVENT_IDX may be left at `VRING_USED_F_NO_NOTIFY` for the event
//!   loop's pass to clear; used index, interrupts, counters, image), and the request (parsed
//!   from memory as the device saw it) is one that may wait: a flush, discard or
//!   write-zeroes, or a read or write that reaches the image (in range, whole sectors, a
//!   write to a writable image); then `process_queue(0)` serves it as predicted;
//! - batch mode: the requests counter after `process_queue_now` says how many chains it
//!   served; it returns true exactly when that is all of them (then `process_queue(0)`
//!   changes no byte of guest memory), else the chain it stopped at is one that may wait;
//!   the used index after it counts exactly the valid heads of those chains; each of the
//!   two calls raises the interrupt the spec wants for what it served (`vring_need_event`
//!   from the used index before it to the one after it with EVENT_IDX, else one if it
//!   served anything), and the checks above hold after both.
#![no_main]

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferrovisor_fuzz::virtio_kit::{
    fill, get16, image, memory, put16, put_desc, ready_queue, snapshot, trace, CountingInterrupt,
    Desc, Input, F_INDIRECT, F_WRITE,
};
use hypervisor::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio::block::request::{parse, RequestType, RANGE_LEN, SECTOR_SIZE};
use virtio::block::{Block, BlockCounters};
use virtio::{features, Activation, VirtioDevice};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const DESC_TABLE: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const INDIRECT: u64 = 0x1000;
const INDIRECT_SLOTS: u64 = (DATA - INDIRECT) / 16;
const DATA: u64 = 0x1200;
type Chain = Vec<(GuestAddress, u32, bool)>;

fuzz_target!(|data: &[u8]| run(data));

struct Limits {
    discard: (u32, u32),
    write_zeroes: (u32, u32),
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let f = input.u8();
    let read_only = f & 1 != 0;
    let event_idx = f & 2 != 0;
    let strict = f & 4 != 0;
    let size: u16 = 1 << ((f >> 3) & 7).min(4);
    let vcpu_first = f & 0x40 != 0;
    let sectors = u64::from(input.u8() % 128) + 1;
    let image_len = sectors * SECTOR_SIZE + u64::from(input.u8()) * 2;
    let start = input.u16();
    let serial_len = usize::from(input.u8() % 26);
    let seed = input.u8();
    let serial = (serial_len < 25).then(|| "serial-0123456789abcdefghij"[..serial_len].to_owned());
    let table: Vec<Desc> = (0..size).map(|_| Desc::read(&mut input)).collect();
    let rounds: Vec<(u16, Vec<u16>)> = (0..input.u8() % 5)
        .map(|_| {
            let count = input.u8();
            let used_event = input.u16();
            let n = count % 32;
            (used_event, (0..n).map(|_| u16::from(input.u8())).collect())
        })
        .collect();

    let mem = memory();
    fill(mem, INDIRECT, input.rest());
    for (i, d) in table.iter().enumerate() {
        let d = tame(*d);
        put_desc(
            mem,
            DESC_TABLE + 16 * i as u64,
            d.addr,
            d.len,
            d.flags,
            d.next,
        );
    }
    tame_page(mem);
    put16(mem, AVAIL, 0);
    put16(mem, AVAIL + 2, start);
    put16(mem, USED, 0);
    put16(mem, USED + 2, start);

    let img = image();
    let initial = img.reset(image_len, seed);
    let mut block = Block::new(&img.path, read_only, serial.as_deref()).expect("block device");
    let mut cfg = [0u8; 64];
    block.read_config(0, &mut cfg);
    let cfg32 = |at: usize| u32::from_le_bytes(cfg[at..at + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        sectors,
        "capacity"
    );
    let limits = Limits {
        discard: (cfg32(36), cfg32(40)),
        write_zeroes: (cfg32(48), cfg32(52)),
    };
    let mut id = [0u8; 20];
    let name =
        serial.unwrap_or_else(|| img.path.file_name().unwrap().to_string_lossy().into_owned());
    let n = name.len().min(20);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);

    let irq = Arc::new(CountingInterrupt::default());
    let mut feats = features::VERSION_1;
    if event_idx {
        feats |= features::RING_EVENT_IDX;
    }
    block
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![queue(size, event_idx, start)],
            features: feats,
            interrupt: irq.clone(),
        })
        .expect("activation");

    let mut h = Harness {
        mem,
        size,
        event_idx,
        read_only,
        vcpu_first,
        id,
        limits,
        shadow: queue(size, event_idx, start),
        avail_idx: Wrapping(start),
        used_idx: Wrapping(start),
        desync: false,
        model: initial.clone(),
        irq,
        counters: block.counters(),
        want: [0; 3],
    };
    for (used_event, heads) in &rounds {
        put16(mem, AVAIL + 4 + 2 * u64::from(size), *used_event);
        if strict {
            for &head in heads {
                h.publish(&[head]);
                h.one_chain(&mut block, head);
                h.check_image(image_len, &initial);
            }
        } else {
            h.publish(heads);
            h.batch(&mut block, heads);
            h.check_image(image_len, &initial);
        }
    }

    // Past activation: extra queue indices are ignored; after a reset nothing is served.
    let used = get16(mem, USED + 2);
    if vcpu_first {
        block.process_queue_now(1);
    }
    block.process_queue(1);
    block.reset();
    h.publish(&[0]);
    if vcpu_first {
        block.process_queue_now(0);
    }
    block.process_queue(0);
    assert_eq!(
        get16(mem, USED + 2),
        used,
        "a reset device served a request"
    );
}

fn queue(size: u16, event_idx: bool, start: u16) -> Queue {
    ready_queue(size, event_idx, start, DESC_TABLE, AVAIL, USED)
}

/// Keeps the device's writes out of the rings and tables, so the harness can predict each
/// chain from the descriptors it laid out (a buffer over the descriptor table would change the
/// chains after it mid-batch): an indirect table stays within the indirect area, a buffer the
/// device writes stays above it.
fn tame(d: Desc) -> Desc {
    if d.flags & F_INDIRECT != 0 {
        let addr = INDIRECT + 16 * (d.addr % INDIRECT_SLOTS);
        let room = (DATA - addr) as u32;
        let len = if d.len > room {
            room | (d.len & 15)
        } else {
            d.len
        };
        Desc { addr, len, ..d }
    } else if d.flags & F_WRITE != 0 && d.addr < DATA {
        Desc {
            addr: d.addr + DATA,
            ..d
        }
    } else {
        d
    }
}

/// [`tame`] for the raw descriptors of the indirect area (nested indirect descriptors are
/// refused by virtio-queue anyway).
fn tame_page(mem: &GuestMemoryMmap) {
    for i in 0..INDIRECT_SLOTS {
        let at = INDIRECT + 16 * i;
        let addr: u64 = mem.read_obj(GuestAddress(at)).unwrap();
        let flags = get16(mem, at + 12);
        if flags & F_WRITE != 0 && flags & F_INDIRECT == 0 && addr < DATA {
            mem.write_obj(addr + DATA, GuestAddress(at)).unwrap();
        }
    }
}

struct Harness {
    mem: &'static GuestMemoryMmap,
    size: u16,
    event_idx: bool,
    read_only: bool,
    /// Each `process_queue(0)` is preceded by `process_queue_now(0)`.
    vcpu_first: bool,
    id: [u8; 20],
    limits: Limits,
    /// A second queue over the same rings, a step ahead of the device: it walks each chain
    /// before the device does.
    shadow: Queue,
    avail_idx: Wrapping<u16>,
    /// The device's next used index.
    used_idx: Wrapping<u16>,
    /// The guest wrote into the rings (or made more available than the queue holds): the
    /// harness no longer knows what the device will serve, so only the checks that hold
    /// whatever it serves remain.
    desync: bool,
    /// What the image holds.
    model: Vec<u8>,
    irq: Arc<CountingInterrupt>,
    counters: Arc<BlockCounters>,
    /// Expected requests, invalid and failed counts.
    want: [u64; 3],
}

/// The state [`Harness::seen`] records.
struct Seen {
    mem: Vec<u8>,
    irq: usize,
    /// Requests, invalid, failed.
    counters: [u64; 3],
    image: Vec<u8>,
}

/// A status byte and the image contents that go with it.
type Answer = (u8, Vec<u8>);

/// What serving one chain must do.
struct Outcome {
    /// The request's type; None if the chain is not a request.
    kind: Option<RequestType>,
    used_len: u32,
    /// Where the status byte goes, and the values it may take, each with the image contents
    /// that go with it.
    status: Option<(u64, Vec<Answer>)>,
    /// Data written into guest memory, in order.
    writes: Vec<(u64, Vec<u8>)>,
}

impl Harness {
    fn used_span(&self) -> (u64, u64) {
        (USED, USED + 6 + 8 * u64::from(self.size))
    }

    fn avail_span(&self) -> (u64, u64) {
        (AVAIL, AVAIL + 6 + 2 * u64::from(self.size))
    }

    fn publish(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = u64::from(self.avail_idx.0 % self.size);
            put16(self.mem, AVAIL + 4 + 2 * slot, head);
            self.avail_idx += 1;
        }
        put16(self.mem, AVAIL + 2, self.avail_idx.0);
    }

    fn walk(&mut self) -> Option<(u16, Chain)> {
        let chain = self.shadow.pop_descriptor_chain(self.mem)?;
        let head = chain.head_index();
        Some((
            head,
            chain
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect(),
        ))
    }

    fn check_image(&self, len: u64, initial: &[u8]) {
        let img = image();
        assert_eq!(img.len(), len, "the image changed size");
        if self.read_only {
            assert!(img.contents() == initial, "a read-only image was written");
        }
    }

    /// Whether a pass that served chains (`served`) and moved the used index from `old` to
    /// `new` must interrupt (virtio 1.2, 2.7.10: `vring_need_event`).
    fn interrupt_due(&self, served: bool, old: Wrapping<u16>, new: Wrapping<u16>) -> bool {
        if !served {
            return false;
        }
        if !self.event_idx {
            return true;
        }
        let used_event = Wrapping(get16(self.mem, AVAIL + 4 + 2 * u64::from(self.size)));
        new - used_event - Wrapping(1) < new - old
    }

    /// What the vCPU's `process_queue_now` may change, and `process_queue` after it.
    fn seen(&self) -> Seen {
        let c = &self.counters;
        Seen {
            mem: snapshot(self.mem),
            irq: self.irq.queue_count(),
            counters: [
                c.requests.load(Ordering::Relaxed),
                c.invalid.load(Ordering::Relaxed),
                c.failed.load(Ordering::Relaxed),
            ],
            image: image().contents(),
        }
    }

    /// `now` is `then` unchanged; `flags_may_stop`: but for the used ring's flags, which may
    /// have become `VRING_USED_F_NO_NOTIFY` (a pass that stopped at a request that waits
    /// leaves notifications off for the event loop's pass, which turns them back on).
    fn unchanged(&self, then: &Seen, now: &Seen, flags_may_stop: bool, what: &str) {
        let mut want = then.mem.clone();
        let flags = USED as usize..USED as usize + 2;
        if flags_may_stop
            && !self.event_idx
            && now.mem[flags.clone()] == (VRING_USED_F_NO_NOTIFY as u16).to_le_bytes()
        {
            want[flags].copy_from_slice(&now.mem[USED as usize..USED as usize + 2]);
        }
        if now.mem != want {
            let i = (0..want.len()).find(|&i| now.mem[i] != want[i]).unwrap();
            panic!(
                "{what}: guest memory at {i:#x} is {:#x}, was {:#x}",
                now.mem[i], want[i]
            );
        }
        assert_eq!(now.irq, then.irq, "{what}: interrupts");
        assert_eq!(
            now.counters, then.counters,
            "{what}: counters (requests, invalid, failed)"
        );
        assert!(now.image == then.image, "{what}: the image changed");
    }

    /// Whether serving the request in `descs` (parsed from guest memory as it is now) may
    /// have to wait on the host: a flush, discard or write-zeroes (always left for the event
    /// loop by `process_queue_now`), or a read or write that goes to the image. Also returns
    /// the request type, if `descs` is a request.
    fn may_wait(&self, descs: &Chain) -> (Option<RequestType>, bool) {
        let Ok(req) = parse(self.mem, descs.iter().copied()) else {
            return (None, false);
        };
        let waits = match req.kind {
            RequestType::Flush | RequestType::Discard | RequestType::WriteZeroes => true,
            RequestType::In | RequestType::Out => {
                // As `predict`: what is refused without I/O cannot wait.
                let capacity = self.model.len() as u64 / SECTOR_SIZE * SECTOR_SIZE;
                let len = req.data_len();
                let in_range = req
                    .sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|s| s.checked_add(len))
                    .is_some_and(|end| end <= capacity);
                len % SECTOR_SIZE == 0
                    && in_range
                    && !(req.kind == RequestType::Out && self.read_only)
            }
            RequestType::GetId | RequestType::Unsupported(_) => false,
        };
        (Some(req.kind), waits)
    }

    fn one_chain(&mut self, block: &mut Block, head: u16) {
        let walked = if self.desync { None } else { self.walk() };
        let predicted = walked.as_ref().map(|(_, descs)| self.predict(descs));
        let (us, ue) = self.used_span();
        // The request reads from the used ring, which the device itself writes while it
        // serves (notification flags): its contents are not known in advance.
        let reads_used = walked.as_ref().is_some_and(|(_, descs)| {
            descs
                .iter()
                .any(|&(a, l, w)| !w && a.0 < ue && us < a.0.saturating_add(u64::from(l)))
        });
        let hits = |out: &Outcome, (s, e): (u64, u64)| {
            out.writes
                .iter()
                .map(|(a, b)| (*a, b.len() as u64))
                .chain(out.status.iter().map(|(a, _)| (*a, 1)))
                .any(|(a, l)| a < e && s < a.saturating_add(l))
        };
        // The chain is the only one available and serving it leaves the rest of the
        // available ring alone: what the vCPU's pass did is known.
        let known = predicted
            .as_ref()
            .is_some_and(|out| !hits(out, self.avail_span()));
        let irq_before = self.irq.queue_count();
        let before = snapshot(self.mem);
        if self.vcpu_first {
            let then = self.seen();
            let done = block.process_queue_now(0);
            let now = self.seen();
            if trace() {
                let what = if done {
                    "served"
                } else {
                    "left for the event loop"
                };
                eprintln!("head {head}: process_queue_now: {what}");
            }
            if known {
                let descs = &walked.as_ref().unwrap().1;
                if done {
                    // Parsed before serving; one that reads the used ring may have read
                    // something else.
                    let kind = predicted.as_ref().unwrap().kind;
                    let waits_always = matches!(
                        kind,
                        Some(RequestType::Flush | RequestType::Discard | RequestType::WriteZeroes)
                    );
                    assert!(
                        reads_used || !waits_always,
                        "process_queue_now served a {kind:?} request at once: {descs:x?}"
                    );
                } else {
                    self.unchanged(&then, &now, true, "process_queue_now left a request");
                    // Nothing changed since the device parsed it.
                    let (kind, waits) = self.may_wait(descs);
                    assert!(
                        waits,
                        "process_queue_now left a {kind:?} request that cannot wait: {descs:x?}"
                    );
                }
            }
            block.process_queue(0);
            if done && known {
                self.unchanged(
                    &now,
                    &self.seen(),
                    false,
                    "process_queue after process_queue_now served everything",
                );
            }
        } else {
            block.process_queue(0);
        }
        let (Some((walked_head, descs)), Some(out)) = (walked, predicted) else {
            return;
        };
        assert_eq!(walked_head, head);
        if reads_used {
            // Only the used ring is checked; the model follows the device.
            self.resync(head);
            return;
        }
        let hits = |span| hits(&out, span);
        if hits(self.avail_span()) {
            // The request rewrote the available ring: the device may go on serving.
            self.desync = true;
            return;
        }
        let used_hit = hits(self.used_span());

        // Guest memory: exactly the predicted writes, outside the used ring.
        let mut want = before;
        for (a, b) in &out.writes {
            want[*a as usize..*a as usize + b.len()].copy_from_slice(b);
        }
        let got = snapshot(self.mem);
        let mut status_ok = false;
        // The image the status the device chose goes with.
        let mut image_want = &self.model;
        if let Some((at, allowed)) = &out.status {
            let s = got[*at as usize];
            let Some((_, img)) = allowed.iter().find(|(a, _)| *a == s) else {
                let statuses: Vec<u8> = allowed.iter().map(|a| a.0).collect();
                panic!("status {s} for {descs:x?}, want one of {statuses:?}");
            };
            image_want = img;
            want[*at as usize] = s;
            status_ok = s == VIRTIO_BLK_S_OK as u8;
        }
        want[us as usize..ue as usize].copy_from_slice(&got[us as usize..ue as usize]);
        // Slice comparison first (memcmp, not instrumented), the first difference only on
        // failure.
        if got != want {
            let i = (0..got.len()).find(|&i| got[i] != want[i]).unwrap();
            panic!(
                "guest memory at {i:#x} is {:#x}, want {:#x}, after serving {descs:x?}",
                got[i], want[i]
            );
        }

        if trace() {
            let statuses = out
                .status
                .as_ref()
                .map(|(at, a)| (at, a.iter().map(|x| x.0).collect::<Vec<_>>()));
            eprintln!(
                "head {head}: {descs:x?} -> status {statuses:x?}, used length {}",
                out.used_len
            );
        }
        // The image.
        assert!(
            image().contents() == *image_want,
            "the image differs from the model after serving {descs:x?}"
        );
        self.model = image_want.clone();

        // The used ring and the interrupt.
        let old = self.used_idx;
        let added = head < self.size;
        if added {
            self.used_idx += 1;
        }
        if !used_hit {
            assert_eq!(get16(self.mem, USED + 2), self.used_idx.0, "used index");
            if added {
                let at = USED + 4 + 8 * u64::from(old.0 % self.size);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                assert_eq!(
                    (id, len),
                    (u32::from(head), out.used_len),
                    "used entry for {descs:x?}"
                );
            }
            let fired = self.irq.queue_count() - irq_before;
            assert_eq!(
                fired,
                usize::from(self.interrupt_due(true, old, self.used_idx)),
                "interrupts"
            );
        }

        // The counters.
        // A chain that is not a request counts as invalid; one the used ring cannot take (a
        // head past the queue size) may count too.
        let c = &self.counters;
        let invalid = c.invalid.load(Ordering::Relaxed);
        let lo = self.want[1] + u64::from(out.status.is_none());
        assert!(
            (lo..=lo + u64::from(!added)).contains(&invalid),
            "invalid count {invalid}, want {lo} (+1 if an unusable head counts)"
        );
        self.want[0] += 1;
        self.want[1] = invalid;
        self.want[2] += u64::from(out.status.is_some() && !status_ok);
        let got = [
            c.requests.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed),
        ];
        assert_eq!(
            got,
            [self.want[0], self.want[2]],
            "counters (requests, failed)"
        );
    }

    /// After a chain whose outcome was not predicted: the used entry names the head, and the
    /// model takes the device's image and counters.
    fn resync(&mut self, head: u16) {
        let old = self.used_idx;
        if head < self.size {
            self.used_idx += 1;
            let at = USED + 4 + 8 * u64::from(old.0 % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            assert_eq!(id, u32::from(head), "used entry");
        }
        assert_eq!(get16(self.mem, USED + 2), self.used_idx.0, "used index");
        self.model = image().contents();
        let c = &self.counters;
        self.want = [
            c.requests.load(Ordering::Relaxed),
            c.invalid.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed),
        ];
    }

    fn batch(&mut self, block: &mut Block, heads: &[u16]) {
        let mut chains = Vec::new();
        if !self.desync {
            for _ in heads {
                match self.walk() {
                    Some(c) => chains.push(c),
                    // More than a queue size made available: virtio-queue refuses the index.
                    None => self.desync = true,
                }
            }
        }
        // Some buffer the device writes lies in the rings or tables.
        let wild = chains
            .iter()
            .flat_map(|(_, c)| c)
            .any(|&(a, _, w)| w && a.0 < DATA);
        let known = !self.desync && !wild;
        let irq_before = self.irq.queue_count();
        let before = snapshot(self.mem);
        let requests = || self.counters.requests.load(Ordering::Relaxed);
        let requests_before = requests();
        // The vCPU's pass: whether it left the queue empty, how many chains it served (each
        // one counts as a request, one left for later does not), the used index and
        // interrupt count after it, and guest memory if it served everything.
        let mut first = None;
        if self.vcpu_first {
            let done = block.process_queue_now(0);
            let served = (requests() - requests_before) as usize;
            if trace() {
                eprintln!("batch {heads:?}: process_queue_now served {served}, returned {done}");
            }
            if known {
                assert!(
                    served <= chains.len(),
                    "process_queue_now served {served} of {} chains",
                    chains.len()
                );
                assert_eq!(
                    done,
                    served == chains.len(),
                    "process_queue_now's answer after serving {served} of {} chains",
                    chains.len()
                );
                if !done {
                    // Nothing changed since the device parsed it and stopped.
                    let descs = &chains[served].1;
                    let (kind, waits) = self.may_wait(descs);
                    assert!(
                        waits,
                        "process_queue_now stopped at a {kind:?} request that cannot wait: \
                         {descs:x?}"
                    );
                }
            }
            first = Some((
                served,
                get16(self.mem, USED + 2),
                self.irq.queue_count(),
                (done && known).then(|| snapshot(self.mem)),
            ));
        }
        block.process_queue(0);
        if self.desync {
            return;
        }
        if wild {
            self.desync = true;
            return;
        }
        let got = snapshot(self.mem);
        let (us, ue) = self.used_span();
        assert!(
            got[..us as usize] == before[..us as usize]
                && got[ue as usize..DATA as usize] == before[ue as usize..DATA as usize],
            "the device wrote into the rings or tables outside the used ring"
        );
        let old = self.used_idx;
        for (head, chain) in &chains {
            if *head >= self.size {
                continue;
            }
            let at = USED + 4 + 8 * u64::from(self.used_idx.0 % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            let writable: u64 = chain.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
            assert_eq!(id, u32::from(*head), "used ring out of order");
            assert!(
                u64::from(len) <= writable,
                "used length {len} for a chain with {writable} writable bytes: {chain:x?}"
            );
            self.used_idx += 1;
        }
        assert_eq!(get16(self.mem, USED + 2), self.used_idx.0, "used index");
        let irq_after = self.irq.queue_count();
        if let Some((served, used_mid, irq_mid, mem_mid)) = first {
            // Each pass interrupts for what it served.
            let valid = chains[..served]
                .iter()
                .filter(|(head, _)| *head < self.size)
                .count();
            let mid = old + Wrapping(valid as u16);
            assert_eq!(
                used_mid, mid.0,
                "used index after process_queue_now served {served} chains"
            );
            assert_eq!(
                irq_mid - irq_before,
                usize::from(self.interrupt_due(served > 0, old, mid)),
                "interrupts from process_queue_now ({served} of {} chains served)",
                chains.len()
            );
            assert_eq!(
                irq_after - irq_mid,
                usize::from(self.interrupt_due(served < chains.len(), mid, self.used_idx)),
                "interrupts from process_queue after process_queue_now ({served} of {} chains \
                 served by it)",
                chains.len()
            );
            if let Some(mem_mid) = mem_mid {
                assert!(
                    got == mem_mid,
                    "process_queue changed guest memory after process_queue_now served \
                     everything"
                );
            }
        } else {
            assert_eq!(
                irq_after - irq_before,
                usize::from(self.interrupt_due(!heads.is_empty(), old, self.used_idx)),
                "interrupts"
            );
        }
        self.want[0] += heads.len() as u64;
        assert_eq!(self.counters.requests.load(Ordering::Relaxed), self.want[0]);
        // Invalid and failed counts are not predicted per chain here: track the device's.
        self.want[1] = self.counters.invalid.load(Ordering::Relaxed);
        self.want[2] = self.counters.failed.load(Ordering::Relaxed);
        self.model = image().contents();
    }

    /// What the device must do with the chain `descs` (virtio 1.2, 5.2.6).
    fn predict(&self, descs: &Chain) -> Outcome {
        let mem = self.mem;
        let Ok(req) = parse(mem, descs.iter().copied()) else {
            return Outcome {
                kind: None,
                used_len: 0,
                status: None,
                writes: Vec::new(),
            };
        };
        let mut image = self.model.clone();
        let capacity = image.len() as u64 / SECTOR_SIZE * SECTOR_SIZE;
        let in_range = |sector: u64, len: u64| {
            sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|s| s.checked_add(len))
                .is_some_and(|end| end <= capacity)
        };
        let gather = || {
            let mut out = Vec::new();
            for s in &req.data {
                let mut b = vec![0u8; s.len as usize];
                mem.read_slice(&mut b, s.addr).unwrap();
                out.extend_from_slice(&b);
            }
            out
        };
        let len = req.data_len();
        let (ok, ioerr, unsupp) = (
            VIRTIO_BLK_S_OK as u8,
            VIRTIO_BLK_S_IOERR as u8,
            VIRTIO_BLK_S_UNSUPP as u8,
        );
        let mut writes = Vec::new();
        let mut written = 0u32;
        let status: Vec<Answer> = match req.kind {
            RequestType::In | RequestType::Out
                if len % SECTOR_SIZE != 0 || !in_range(req.sector, len) =>
            {
                vec![(ioerr, image)]
            }
            RequestType::In => {
                let mut at = (req.sector * SECTOR_SIZE) as usize;
                for s in &req.data {
                    let n = s.len as usize;
                    writes.push((s.addr.0, image[at..at + n].to_vec()));
                    at += n;
                }
                written = len as u32;
                vec![(ok, image)]
            }
            RequestType::Out if self.read_only => vec![(ioerr, image)],
            RequestType::Out => {
                let at = (req.sector * SECTOR_SIZE) as usize;
                image[at..at + len as usize].copy_from_slice(&gather());
                vec![(ok, image)]
            }
            RequestType::Flush => vec![(ok, image)],
            RequestType::GetId => {
                let mut left = &self.id[..];
                for s in &req.data {
                    let n = left.len().min(s.len as usize);
                    if n > 0 {
                        writes.push((s.addr.0, left[..n].to_vec()));
                    }
                    written += n as u32;
                    left = &left[n..];
                }
                vec![(ok, image)]
            }
            RequestType::Discard | RequestType::WriteZeroes if self.read_only => {
                vec![(ioerr, image)]
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let discard = req.kind == RequestType::Discard;
                let (max_sectors, max_ranges) = if discard {
                    self.limits.discard
                } else {
                    self.limits.write_zeroes
                };
                let r = RANGE_LEN as u64;
                if len == 0 || len % r != 0 || len / r > u64::from(max_ranges) {
                    vec![(unsupp, image)]
                } else {
                    let bytes = gather();
                    // Virtio 1.2, 5.2.6.2: unknown flags, or "unmap" on a discard, are
                    // unsupported.
                    let bad_flags = bytes.chunks(RANGE_LEN).any(|range| {
                        let flags = u32::from_le_bytes(range[12..16].try_into().unwrap());
                        flags & !1 != 0 || (discard && flags & 1 != 0)
                    });
                    let spec = (unsupp, image.clone());
                    let mut status = ok;
                    let mut unspecified = false;
                    for range in bytes.chunks(RANGE_LEN) {
                        let sector = u64::from_le_bytes(range[0..8].try_into().unwrap());
                        let n = u32::from_le_bytes(range[8..12].try_into().unwrap());
                        let bytes = u64::from(n) * SECTOR_SIZE;
                        if n > max_sectors || !in_range(sector, bytes) {
                            status = ioerr;
                            break;
                        }
                        // Zero sectors: not specified; fallocate refuses a zero length on
                        // some paths, so OK and IOERR both do.
                        unspecified |= n == 0;
                        let at = (sector * SECTOR_SIZE) as usize;
                        image[at..at + bytes as usize].fill(0);
                    }
                    let mut answers = vec![(status, image.clone())];
                    if unspecified && status == ok {
                        answers.push((ioerr, image));
                    }
                    if bad_flags {
                        vec![spec]
                    } else {
                        answers
                    }
                }
            }
            RequestType::Unsupported(_) => vec![(unsupp, image)],
        };
        Outcome {
            kind: Some(req.kind),
            used_len: written + 1,
            status: Some((req.status.0, status)),
            writes,
        }
    }
}
