//! The virtio-vsock packet code (`virtio::vsock::packet`) on hostile descriptor lists and
//! headers, against a reference written here from the packet layout (virtio 1.2, 5.10.6):
//! the device-readable descriptors of a transmit chain form one byte stream (a 44-byte
//! header, then `len` bytes of payload); the device-writable ones of a receive chain form the
//! stream a packet is written into.
//!
//! Input: byte 0 is the number of descriptors (mod 17), byte 1 picks the guest's CID (3 or
//! 4), bytes 2-3 (LE) where the memory contents go, bytes 4-5 (LE) the payload length asked
//! for the receive test, bytes 6-49 a header for it, then that many descriptors in the
//! encoding of `ferrovisor_fuzz::virtio_kit::Desc` (only the WRITE flag counts); the rest
//! fills guest memory from that address on (three small guarded regions with a hole, plus a
//! 2 GiB sparse region).
//!
//! Checks: `read_tx` fails exactly when the reference does and otherwise returns the same
//! header and payload (never more than `MAX_PAYLOAD` bytes); `classify` matches the rules
//! (drop foreign addresses and unanswerable resets, reset unknown types and ops, accept the
//! rest); headers survive a round trip through their wire form; `RxBuffer::new` on the same
//! descriptors fails exactly when the reference does, and a packet written into it lands in
//! the writable stream and nowhere else (every other byte of the small regions is
//! unchanged), with a used length of 44 + payload.
#![no_main]

use ferrovisor_fuzz::virtio_kit::{fill, in_ram, memory_with_big, snapshot, Desc, Input};
use hypervisor::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio::vsock::packet::{
    classify, read_tx, Header, Op, PacketError, RxBuffer, Verdict, HEADER_LEN, HOST_CID,
    MAX_PAYLOAD, TYPE_STREAM,
};
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let n = usize::from(input.u8() % 17);
    let guest_cid = 3 + u64::from(input.u8() & 1);
    let fill_at = u64::from(input.u16());
    let rx_len = usize::from(input.u16());
    let mut rx_header = [0u8; HEADER_LEN];
    for b in &mut rx_header {
        *b = input.u8();
    }
    let descs: Vec<(GuestAddress, u32, bool)> = (0..n)
        .map(|_| {
            let d = Desc::read(&mut input);
            (GuestAddress(d.addr), d.len, d.writable())
        })
        .collect();
    let mem = memory_with_big();
    fill(mem, fill_at, input.rest());

    // Wire form round trips, both ways.
    let h = Header::from_bytes(&rx_header);
    assert_eq!(h.to_bytes(), rx_header);
    assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    assert_eq!(h, reference_header(&rx_header));

    // Transmit side.
    let got = read_tx(mem, descs.iter().copied());
    let want = reference_tx(mem, &descs);
    match (&got, &want) {
        (Ok(g), Some((wh, wp))) => {
            assert_eq!(&g.header, wh, "header of {descs:x?}");
            assert!(&g.payload == wp, "payload of {descs:x?}");
            assert!(g.payload.len() <= MAX_PAYLOAD as usize);
            check_classify(&g.header, guest_cid);
        }
        (Err(_), None) => {}
        _ => panic!(
            "read_tx gave {:?}, the reference {:?}, on {descs:x?}",
            got.as_ref().map(|p| p.header),
            want.as_ref().map(|w| w.0)
        ),
    }
    check_classify(&h, guest_cid);

    // Receive side, on the same descriptors.
    let rx = RxBuffer::new(mem, descs.iter().copied());
    let want = reference_rx(&descs);
    match (&rx, &want) {
        (Ok(rx), Some((_, total))) => check_rx_write(mem, rx, &descs, *total, &h, rx_len),
        (Err(_), None) => {}
        _ => panic!("RxBuffer::new gave {rx:?}, the reference {want:?}, on {descs:x?}"),
    }
});

/// The header in `b`, field by field.
fn reference_header(b: &[u8; HEADER_LEN]) -> Header {
    let le = |at: usize, n: usize| {
        b[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |v, &x| v << 8 | u64::from(x))
    };
    Header {
        src_cid: le(0, 8),
        dst_cid: le(8, 8),
        src_port: le(16, 4) as u32,
        dst_port: le(20, 4) as u32,
        len: le(24, 4) as u32,
        kind: le(28, 2) as u16,
        op: le(30, 2) as u16,
        flags: le(32, 4) as u32,
        buf_alloc: le(36, 4) as u32,
        fwd_cnt: le(40, 4) as u32,
    }
}

/// The first `n` bytes of the stream `segs`, read from memory.
fn read_stream(mem: &GuestMemoryMmap, segs: &[(u64, u64)], mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for &(a, l) in segs {
        if n == 0 {
            break;
        }
        let k = l.min(n);
        let mut b = vec![0u8; k as usize];
        mem.read_slice(&mut b, GuestAddress(a))
            .expect("a segment checked to be in guest memory");
        out.extend_from_slice(&b);
        n -= k;
    }
    out
}

/// The packet the descriptors hold, byte-stream-wise, or `None` if they hold none.
fn reference_tx(
    mem: &GuestMemoryMmap,
    descs: &[(GuestAddress, u32, bool)],
) -> Option<(Header, Vec<u8>)> {
    let mut segs = Vec::new();
    for &(addr, len, write) in descs {
        if write {
            return None;
        }
        if len == 0 {
            continue;
        }
        if !in_ram(addr.0, u64::from(len), true) {
            return None;
        }
        segs.push((addr.0, u64::from(len)));
    }
    let total: u64 = segs.iter().map(|s| s.1).sum();
    if total < HEADER_LEN as u64 {
        return None;
    }
    let head = read_stream(mem, &segs, HEADER_LEN as u64);
    let header = reference_header(head.as_slice().try_into().unwrap());
    if header.len > MAX_PAYLOAD || u64::from(header.len) > total - HEADER_LEN as u64 {
        return None;
    }
    let all = read_stream(mem, &segs, HEADER_LEN as u64 + u64::from(header.len));
    Some((header, all[HEADER_LEN..].to_vec()))
}

/// The writable segments and their total, or `None` if the chain cannot take a packet.
fn reference_rx(descs: &[(GuestAddress, u32, bool)]) -> Option<(Vec<(u64, u64)>, u64)> {
    let mut segs = Vec::new();
    for &(addr, len, write) in descs {
        if !write {
            return None;
        }
        if len == 0 {
            continue;
        }
        if !in_ram(addr.0, u64::from(len), true) {
            return None;
        }
        segs.push((addr.0, u64::from(len)));
    }
    let total: u64 = segs.iter().map(|s| s.1).sum();
    (total >= HEADER_LEN as u64).then_some((segs, total))
}

/// What `classify` must say about `h` from the guest `guest_cid`.
fn check_classify(h: &Header, guest_cid: u64) {
    // Not from the guest or not to the host, or a reset of another type (never answered).
    let want = if h.src_cid != guest_cid
        || h.dst_cid != HOST_CID
        || (h.op == 3 && h.kind != TYPE_STREAM)
    {
        Verdict::Drop
    } else if h.kind == TYPE_STREAM && (1..=7).contains(&h.op) {
        Verdict::Accept(Op::from_raw(h.op).expect("a known op"))
    } else {
        Verdict::Reset
    };
    assert_eq!(classify(h, guest_cid), want, "{h:x?}");
    if let Some(op) = Op::from_raw(h.op) {
        assert_eq!(op.raw(), h.op);
    }
    let r = h.reset_reply();
    assert_eq!(
        (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
        (h.dst_cid, h.src_cid, h.dst_port, h.src_port)
    );
    assert_eq!((r.op, r.kind, r.len), (3, TYPE_STREAM, 0));
}

/// Writes a packet with `want_len` bytes of payload (cut to what fits) into `rx` and checks
/// where it went.
fn check_rx_write(
    mem: &GuestMemoryMmap,
    rx: &RxBuffer,
    descs: &[(GuestAddress, u32, bool)],
    total: u64,
    h: &Header,
    want_len: usize,
) {
    let room = total.min(u64::from(MAX_PAYLOAD) + HEADER_LEN as u64) as usize - HEADER_LEN;
    assert_eq!(rx.payload_room(), room);
    let too_much = vec![0u8; room + 1];
    assert_eq!(
        rx.write(mem, h, &too_much),
        Err(PacketError::TooLong(room as u32 + 1))
    );
    let len = want_len.min(room);
    let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    let mut expected_stream = Header {
        len: len as u32,
        ..*h
    }
    .to_bytes()
    .to_vec();
    expected_stream.extend_from_slice(&payload);
    // Where the stream goes: (address, stream bytes), in order. Descriptors may overlap, so
    // later bytes win, as they do in memory.
    let mut writes = Vec::new();
    let mut at = 0usize;
    for (addr, l) in reference_rx(descs).expect("the same chain").0 {
        if at == expected_stream.len() {
            break;
        }
        let k = (l as usize).min(expected_stream.len() - at);
        writes.push((addr, &expected_stream[at..at + k]));
        at += k;
    }
    // The small regions are predicted over a snapshot; the large one through windows over
    // what is written there, read before the write and patched by every write in order.
    let mut expected = snapshot(mem);
    let mut windows: Vec<(u64, Vec<u8>)> = writes
        .iter()
        .filter(|(addr, _)| *addr >= expected.len() as u64)
        .map(|&(addr, part)| {
            let mut b = vec![0u8; part.len()];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            (addr, b)
        })
        .collect();
    for &(addr, part) in &writes {
        if addr < expected.len() as u64 {
            let a = addr as usize;
            expected[a..a + part.len()].copy_from_slice(part);
            continue;
        }
        let end = addr + part.len() as u64;
        for (w, bytes) in &mut windows {
            let (lo, hi) = (addr.max(*w), end.min(*w + bytes.len() as u64));
            if lo < hi {
                bytes[(lo - *w) as usize..(hi - *w) as usize]
                    .copy_from_slice(&part[(lo - addr) as usize..(hi - addr) as usize]);
            }
        }
    }
    let used = rx.write(mem, h, &payload).expect("a packet that fits");
    assert_eq!(used as usize, HEADER_LEN + len);
    for (w, bytes) in &windows {
        let mut back = vec![0u8; bytes.len()];
        mem.read_slice(&mut back, GuestAddress(*w)).unwrap();
        assert!(&back == bytes, "large-region bytes at {w:#x}");
    }
    assert!(
        snapshot(mem) == expected,
        "guest memory after writing a packet into {descs:x?}"
    );
}
