//! Parsing a virtio-blk request (virtio 1.2, 5.2.6) out of a descriptor chain.
//!
//! Everything here is guest-controlled: the parser trusts no length, address, count or
//! layout. It makes no assumption about how the driver split the request into descriptors
//! (any layout is allowed by virtio 1.x): the device-readable descriptors form one byte stream
//! (a 16-byte header, then data for writes, discards and write-zeroes), the device-writable
//! ones another (data for reads and GET_ID, then the status byte).

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Bytes per sector: the unit of `sector` and of capacity, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the request header: type, reserved, sector.
const HEADER_LEN: usize = 16;
/// Length of one discard / write-zeroes range: sector, number of sectors, flags.
pub const RANGE_LEN: usize = 16;
/// Largest data transfer accepted in one request.
pub const MAX_DATA: u64 = 1 << 30;

/// One guest-physical buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What the request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A type this device does not implement: answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        use virtio_bindings::virtio_blk::*;
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            t => RequestType::Unsupported(t),
        }
    }
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// The data buffers: device-writable for `In`/`GetId`, device-readable otherwise.
    pub data: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total bytes of data.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Why a chain is not a request. Without a status byte nothing can be reported to the driver:
/// the chain is returned with nothing written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no device-writable status byte")]
    NoStatus,
    #[error("header shorter than 16 bytes")]
    ShortHeader,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("buffer at {0:#x} is outside guest memory")]
    BadAddress(u64),
    #[error("more data than one request may carry")]
    TooLarge,
}

/// Parses the descriptors of one chain, given as (address, length, device-writable).
pub fn parse<M: GuestMemory>(
    mem: &M,
    descriptors: impl IntoIterator<Item = (GuestAddress, u32, bool)>,
) -> Result<Request, RequestError> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut total: u64 = 0;
    for (addr, len, write) in descriptors {
        if len == 0 {
            continue;
        }
        if !write && !writable.is_empty() {
            return Err(RequestError::ReadableAfterWritable);
        }
        if addr.checked_add(u64::from(len) - 1).is_none()
            || !mem.check_range(
                addr,
                len as usize,
                if write {
                    Permissions::Write
                } else {
                    Permissions::Read
                },
            )
        {
            return Err(RequestError::BadAddress(addr.raw_value()));
        }
        total += u64::from(len);
        if total > MAX_DATA + HEADER_LEN as u64 + 1 {
            return Err(RequestError::TooLarge);
        }
        let seg = Segment { addr, len };
        if write {
            writable.push(seg);
        } else {
            readable.push(seg);
        }
    }
    // The status byte: the last byte of the writable stream.
    let last = writable.last_mut().ok_or(RequestError::NoStatus)?;
    let status = last.addr.unchecked_add(u64::from(last.len) - 1);
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    let mut header = [0u8; HEADER_LEN];
    let data_readable = read_prefix(mem, &readable, &mut header)?;
    let kind = RequestType::from_raw(u32::from_le_bytes(header[0..4].try_into().unwrap()));
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let data = match kind {
        RequestType::In | RequestType::GetId => writable,
        _ => data_readable,
    };
    Ok(Request {
        kind,
        sector,
        data,
        status,
    })
}

/// Reads the first `out.len()` bytes of the stream `segs` into `out`; returns the rest of the
/// stream.
fn read_prefix<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    out: &mut [u8],
) -> Result<Vec<Segment>, RequestError> {
    let mut need = out.len();
    let mut rest = Vec::new();
    for s in segs {
        let take = need.min(s.len as usize);
        if take > 0 {
            let at = out.len() - need;
            mem.read_slice(&mut out[at..at + take], s.addr)
                .map_err(|_| RequestError::BadAddress(s.addr.raw_value()))?;
            need -= take;
        }
        if take < s.len as usize {
            rest.push(Segment {
                addr: s.addr.unchecked_add(take as u64),
                len: s.len - take as u32,
            });
        }
    }
    if need > 0 {
        return Err(RequestError::ShortHeader);
    }
    Ok(rest)
}

/// One discard or write-zeroes range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub sector: u64,
    pub sectors: u32,
    /// The flags word: bit 0 "unmap" (write-zeroes may deallocate); no other bit is defined.
    pub flags: u32,
}

/// The "unmap" flag of a range.
pub const RANGE_UNMAP: u32 = 1;

/// Reads the ranges of a discard or write-zeroes request; None if the data is not a whole
/// number of ranges or more than `max` of them.
pub fn ranges<M: GuestMemory>(mem: &M, data: &[Segment], max: usize) -> Option<Vec<Range>> {
    let len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    if len == 0 || !len.is_multiple_of(RANGE_LEN as u64) || len / RANGE_LEN as u64 > max as u64 {
        return None;
    }
    let mut bytes = vec![0u8; len as usize];
    let rest = read_prefix(mem, data, &mut bytes).ok()?;
    debug_assert!(rest.is_empty());
    Some(
        bytes
            .chunks_exact(RANGE_LEN)
            .map(|r| Range {
                sector: u64::from_le_bytes(r[0..8].try_into().unwrap()),
                sectors: u32::from_le_bytes(r[8..12].try_into().unwrap()),
                flags: u32::from_le_bytes(r[12..16].try_into().unwrap()),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use hypervisor::GuestMemoryMmap;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        m.write_slice(&t.to_le_bytes(), GuestAddress(at)).unwrap();
        m.write_slice(&sector.to_le_bytes(), GuestAddress(at + 8))
            .unwrap();
    }

    #[test]
    fn a_read_in_three_descriptors() {
        let m = mem();
        header(&m, 0x100, 0, 7);
        let r = parse(
            &m,
            [
                (GuestAddress(0x100), 16, false),
                (GuestAddress(0x1000), 4096, true),
                (GuestAddress(0x200), 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.sector, 7);
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(0x1000),
                len: 4096
            }]
        );
        assert_eq!(r.status, GuestAddress(0x200));
    }

    #[test]
    fn a_write_with_header_and_data_in_one_descriptor() {
        let m = mem();
        header(&m, 0x100, 1, 3);
        let r = parse(
            &m,
            [
                (GuestAddress(0x100), 16 + 512, false),
                (GuestAddress(0x2000), 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::Out);
        assert_eq!(r.data_len(), 512);
        assert_eq!(r.data[0].addr, GuestAddress(0x110));
    }

    #[test]
    fn a_header_split_across_descriptors() {
        let m = mem();
        header(&m, 0x100, 4, 0);
        m.write_slice(&[0xaa; 8], GuestAddress(0x300)).unwrap();
        m.write_slice(&9u64.to_le_bytes(), GuestAddress(0x300))
            .unwrap();
        let r = parse(
            &m,
            [
                (GuestAddress(0x100), 8, false),
                (GuestAddress(0x300), 8, false),
                (GuestAddress(0x2000), 1, true),
            ],
        )
        .unwrap();
        assert_eq!((r.kind, r.sector), (RequestType::Flush, 9));
    }

    #[test]
    fn malformed_chains_are_refused() {
        let m = mem();
        let e = |d: Vec<(GuestAddress, u32, bool)>| parse(&m, d).unwrap_err();
        assert_eq!(
            e(vec![(GuestAddress(0x100), 16, false)]),
            RequestError::NoStatus
        );
        assert_eq!(
            e(vec![
                (GuestAddress(0x100), 8, false),
                (GuestAddress(0), 1, true)
            ]),
            RequestError::ShortHeader
        );
        assert_eq!(
            e(vec![
                (GuestAddress(0x100), 16, false),
                (GuestAddress(0), 1, true),
                (GuestAddress(0x100), 16, false)
            ]),
            RequestError::ReadableAfterWritable
        );
        assert_eq!(
            e(vec![
                (GuestAddress(0xfff0), 32, false),
                (GuestAddress(0), 1, true)
            ]),
            RequestError::BadAddress(0xfff0)
        );
        assert_eq!(
            e(vec![(GuestAddress(u64::MAX), 2, true)]),
            RequestError::BadAddress(u64::MAX)
        );
    }

    #[test]
    fn unknown_types_parse_as_unsupported() {
        let m = mem();
        header(&m, 0x100, 99, 0);
        let r = parse(
            &m,
            [(GuestAddress(0x100), 16, false), (GuestAddress(0), 1, true)],
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::Unsupported(99));
    }

    #[test]
    fn discard_ranges() {
        let m = mem();
        let mut b = Vec::new();
        b.extend_from_slice(&8u64.to_le_bytes());
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        m.write_slice(&b, GuestAddress(0x400)).unwrap();
        let seg = [Segment {
            addr: GuestAddress(0x400),
            len: 16,
        }];
        assert_eq!(
            ranges(&m, &seg, 1),
            Some(vec![Range {
                sector: 8,
                sectors: 16,
                flags: RANGE_UNMAP
            }])
        );
        assert_eq!(ranges(&m, &seg, 0), None);
        let short = [Segment {
            addr: GuestAddress(0x400),
            len: 15,
        }];
        assert_eq!(ranges(&m, &short, 4), None);
    }
}
