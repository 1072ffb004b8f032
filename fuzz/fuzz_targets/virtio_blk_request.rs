//! The virtio-blk request parser (`virtio::block::request::{parse, ranges}`) on hostile
//! descriptor lists, against a reference written here from the request layout (virtio 1.2,
//! 5.2.6): the device-readable descriptors form one byte stream (16-byte header, then data),
//! the device-writable ones another (data, then the status byte).
//!
//! Input: byte 0 is the number of descriptors (mod 17), byte 1 the most discard ranges
//! accepted (mod 4), bytes 2-3 (LE) where the memory contents go, then that many descriptors
//! in the encoding of `ferrovisor_fuzz::virtio_kit::Desc` (only the WRITE flag counts); the
//! rest fills guest memory from that address on (three small guarded regions with a hole,
//! plus a 2 GiB sparse region so buffers can reach the parser's size limit).
//!
//! Checks: `parse` fails exactly when the reference does, and otherwise returns the same
//! request; every data segment and the status byte lie in guest memory; the data never
//! exceeds `MAX_DATA`; `ranges` agrees with the reference on the request's data and on the
//! raw descriptors.
#![no_main]

use ferrovisor_fuzz::virtio_kit::{fill, in_ram, memory_with_big, Desc, Input};
use hypervisor::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio::block::request::{
    parse, ranges, Range, Request, RequestType, Segment, MAX_DATA, RANGE_LEN,
};
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

const HEADER: u64 = 16;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let n = usize::from(input.u8() % 17);
    let max_ranges = usize::from(input.u8() % 4);
    let fill_at = u64::from(input.u16());
    let descs: Vec<(GuestAddress, u32, bool)> = (0..n)
        .map(|_| {
            let d = Desc::read(&mut input);
            (GuestAddress(d.addr), d.len, d.writable())
        })
        .collect();
    let mem = memory_with_big();
    fill(mem, fill_at, input.rest());

    let got = parse(mem, descs.iter().copied());
    let want = reference(mem, &descs);
    match (&got, &want) {
        (Ok(g), Ok(w)) => assert_eq!(g, w, "parse differs from the reference on {descs:x?}"),
        (Err(_), Err(_)) => {}
        _ => panic!("parse gave {got:?}, the reference {want:?}, on {descs:x?}"),
    }
    if let Ok(req) = &got {
        check_request(req, &descs);
        assert_eq!(
            ranges(mem, &req.data, max_ranges),
            reference_ranges(mem, &req.data, max_ranges),
            "ranges of {req:x?}"
        );
    }
    // `ranges` on segments that need not be in memory at all.
    let raw: Vec<Segment> = descs
        .iter()
        .filter(|d| d.1 != 0)
        .map(|&(addr, len, _)| Segment { addr, len })
        .collect();
    assert_eq!(
        ranges(mem, &raw, max_ranges),
        reference_ranges(mem, &raw, max_ranges),
        "ranges of {raw:x?}"
    );
});

/// Invariants that hold for any request, whatever the reference says.
fn check_request(req: &Request, descs: &[(GuestAddress, u32, bool)]) {
    for s in &req.data {
        assert!(s.len > 0, "empty data segment in {req:x?}");
        assert!(
            in_ram(s.addr.0, u64::from(s.len), true),
            "data segment outside guest memory in {req:x?}"
        );
    }
    assert!(
        in_ram(req.status.0, 1, true),
        "status byte outside memory: {req:x?}"
    );
    assert!(req.data_len() <= MAX_DATA, "too much data: {req:x?}");
    // The status byte is the last byte of the last non-empty writable descriptor.
    let last = descs
        .iter()
        .rev()
        .find(|d| d.2 && d.1 > 0)
        .expect("status descriptor");
    assert_eq!(req.status.0, last.0 .0 + u64::from(last.1) - 1);
    // Reads and GET_ID put their data in device-writable buffers, the rest take it from
    // device-readable ones: every segment lies inside a descriptor of the right kind.
    let writable = matches!(req.kind, RequestType::In | RequestType::GetId);
    for s in &req.data {
        assert!(
            descs.iter().any(|&(a, l, w)| w == writable
                && a.0 <= s.addr.0
                && s.addr.0 + u64::from(s.len) <= a.0.saturating_add(u64::from(l))),
            "segment {s:x?} of {req:x?} is not inside a {} descriptor",
            if writable { "writable" } else { "readable" }
        );
    }
}

/// The request the descriptors describe, computed byte-stream-wise.
fn reference(mem: &GuestMemoryMmap, descs: &[(GuestAddress, u32, bool)]) -> Result<Request, ()> {
    let mut readable: Vec<(u64, u64)> = Vec::new();
    let mut writable: Vec<(u64, u64)> = Vec::new();
    let mut total = 0u64;
    for &(addr, len, write) in descs {
        let (addr, len) = (addr.0, u64::from(len));
        if len == 0 {
            continue;
        }
        // Once the device-writable part begins, nothing device-readable may follow.
        if !write && !writable.is_empty() {
            return Err(());
        }
        if !in_ram(addr, len, true) {
            return Err(());
        }
        total += len;
        if total > MAX_DATA + HEADER + 1 {
            return Err(());
        }
        if write {
            writable.push((addr, len));
        } else {
            readable.push((addr, len));
        }
    }
    // The status byte ends the writable stream.
    let &(sa, sl) = writable.last().ok_or(())?;
    let status = sa + sl - 1;
    let writable_data = take_front(&writable, writable.iter().map(|s| s.1).sum::<u64>() - 1);
    // The header starts the readable stream.
    let readable_len: u64 = readable.iter().map(|s| s.1).sum();
    if readable_len < HEADER {
        return Err(());
    }
    let mut header = Vec::new();
    for seg in take_front(&readable, HEADER) {
        let mut b = vec![0u8; seg.1 as usize];
        mem.read_slice(&mut b, GuestAddress(seg.0))
            .map_err(|_| ())?;
        header.extend_from_slice(&b);
    }
    let t = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let kind = match t {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        VIRTIO_BLK_T_DISCARD => RequestType::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
        t => RequestType::Unsupported(t),
    };
    let data = match kind {
        RequestType::In | RequestType::GetId => writable_data,
        _ => drop_front(&readable, HEADER),
    };
    Ok(Request {
        kind,
        sector,
        data: data
            .into_iter()
            .map(|(a, l)| Segment {
                addr: GuestAddress(a),
                len: l as u32,
            })
            .collect(),
        status: GuestAddress(status),
    })
}

/// The first `n` bytes of the stream `segs`, as segments.
fn take_front(segs: &[(u64, u64)], mut n: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, l) in segs {
        if n == 0 {
            break;
        }
        let k = l.min(n);
        out.push((a, k));
        n -= k;
    }
    out
}

/// The stream `segs` without its first `n` bytes, as segments.
fn drop_front(segs: &[(u64, u64)], mut n: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, l) in segs {
        let k = l.min(n);
        n -= k;
        if k < l {
            out.push((a + k, l - k));
        }
    }
    out
}

/// The discard / write-zeroes ranges in `data`: a whole number of 16-byte ranges (sector,
/// number of sectors, flags with bit 0 "unmap"), at least one and at most `max`.
fn reference_ranges(mem: &GuestMemoryMmap, data: &[Segment], max: usize) -> Option<Vec<Range>> {
    let len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    if len == 0 || !len.is_multiple_of(RANGE_LEN as u64) || len / RANGE_LEN as u64 > max as u64 {
        return None;
    }
    let mut bytes = Vec::with_capacity(len as usize);
    for s in data {
        let mut b = vec![0u8; s.len as usize];
        mem.read_slice(&mut b, s.addr).ok()?;
        bytes.extend_from_slice(&b);
    }
    Some(
        bytes
            .chunks(RANGE_LEN)
            .map(|r| Range {
                sector: u64::from_le_bytes(r[0..8].try_into().unwrap()),
                sectors: u32::from_le_bytes(r[8..12].try_into().unwrap()),
                flags: u32::from_le_bytes(r[12..16].try_into().unwrap()),
            })
            .collect(),
    )
}
