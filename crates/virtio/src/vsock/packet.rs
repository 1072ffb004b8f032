//! virtio-vsock packets (virtio 1.2, 5.10.6): the 44-byte header, reading the packet of a
//! transmit-queue chain, writing one into a receive-queue chain, and deciding what to do with
//! a header before any connection sees it.
//!
//! Everything read here is guest-controlled: no length, address, count or layout is trusted.
//! The driver may split the header across descriptors (virtio 1.x allows any layout): the
//! device-readable descriptors of a transmit chain form one byte stream, a 44-byte header and
//! then `len` bytes of payload; the device-writable descriptors of a receive chain form the
//! stream a packet is written into.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Length of [`Header`] on the wire.
pub const HEADER_LEN: usize = 44;
/// The host's address (virtio 1.2, 5.10.4: CIDs 0-2 are reserved; 2 is the host).
pub const HOST_CID: u64 = 2;
/// Largest payload accepted in, and sent in, one packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// `type`: a stream socket, the only kind this device carries (no SEQPACKET).
pub const TYPE_STREAM: u16 = 1;

/// `flags` of a SHUTDOWN packet: the sender will receive no more / send no more.
pub mod shutdown {
    pub const RCV: u32 = 1;
    pub const SEND: u32 = 2;
    pub const BOTH: u32 = RCV | SEND;
}

/// `op` of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    pub fn from_raw(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    pub fn raw(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }
}

/// `struct virtio_vsock_hdr`, little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload bytes that follow the header.
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer for this connection, in bytes.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of that buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The RST that answers this packet: addresses and ports swapped, no payload.
    pub fn reset_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            kind: TYPE_STREAM,
            op: Op::Rst.raw(),
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

/// Why a chain holds no usable packet (or no usable receive buffer). The chain is returned to
/// the driver untouched and the packet dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("a device-writable buffer in a transmit chain")]
    WritableInTx,
    #[error("a device-readable buffer in a receive chain")]
    ReadableInRx,
    #[error("buffer at {0:#x} is outside guest memory")]
    BadAddress(u64),
    #[error("the chain holds {0} bytes, less than a packet header")]
    ShortHeader(u64),
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("payload of {len} bytes, but only {have} follow the header")]
    Truncated { len: u32, have: u64 },
    #[error("a receive chain with room for a header only")]
    NoRoom,
}

/// A packet from the transmit queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    pub header: Header,
    /// Exactly `header.len` bytes.
    pub payload: Vec<u8>,
}

/// Checks one descriptor: inside guest memory, with no address wrap-around.
fn check_buffer<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    len: u32,
    access: Permissions,
) -> Result<(), PacketError> {
    if addr.checked_add(u64::from(len) - 1).is_none()
        || !mem.check_range(addr, len as usize, access)
    {
        return Err(PacketError::BadAddress(addr.raw_value()));
    }
    Ok(())
}

/// Reads the packet of one transmit chain, given as (address, length, device-writable).
/// Every descriptor must be device-readable and in guest memory; the header may be split
/// anywhere; bytes past the payload are ignored.
pub fn read_tx<M: GuestMemory>(
    mem: &M,
    descriptors: impl IntoIterator<Item = (GuestAddress, u32, bool)>,
) -> Result<TxPacket, PacketError> {
    let mut segments = Vec::new();
    let mut total: u64 = 0;
    for (addr, len, write) in descriptors {
        if write {
            return Err(PacketError::WritableInTx);
        }
        if len == 0 {
            continue;
        }
        check_buffer(mem, addr, len, Permissions::Read)?;
        total += u64::from(len);
        segments.push((addr, len));
    }
    if total < HEADER_LEN as u64 {
        return Err(PacketError::ShortHeader(total));
    }
    let mut stream = Stream::new(&segments);
    let mut raw = [0u8; HEADER_LEN];
    stream.read(mem, &mut raw)?;
    let header = Header::from_bytes(&raw);
    if header.len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(header.len));
    }
    let have = total - HEADER_LEN as u64;
    if u64::from(header.len) > have {
        return Err(PacketError::Truncated {
            len: header.len,
            have,
        });
    }
    let mut payload = vec![0u8; header.len as usize];
    stream.read(mem, &mut payload)?;
    Ok(TxPacket { header, payload })
}

/// A byte stream over guest buffers that were checked to lie in guest memory.
struct Stream<'a> {
    segments: &'a [(GuestAddress, u32)],
    /// Offset into the first segment.
    at: u32,
}

impl<'a> Stream<'a> {
    fn new(segments: &'a [(GuestAddress, u32)]) -> Self {
        Stream { segments, at: 0 }
    }

    /// Fills `buf` from the stream (the caller checked that it is long enough).
    fn read<M: GuestMemory>(&mut self, mem: &M, mut buf: &mut [u8]) -> Result<(), PacketError> {
        while !buf.is_empty() {
            let Some(&(addr, len)) = self.segments.first() else {
                return Err(PacketError::ShortHeader(0));
            };
            let n = ((len - self.at) as usize).min(buf.len());
            let from = addr.unchecked_add(u64::from(self.at));
            mem.read_slice(&mut buf[..n], from)
                .map_err(|_| PacketError::BadAddress(from.raw_value()))?;
            buf = &mut buf[n..];
            self.advance(n as u32);
        }
        Ok(())
    }

    /// Writes `buf` into the stream (the caller checked that it has room).
    fn write<M: GuestMemory>(&mut self, mem: &M, mut buf: &[u8]) -> Result<(), PacketError> {
        while !buf.is_empty() {
            let Some(&(addr, len)) = self.segments.first() else {
                return Err(PacketError::ShortHeader(0));
            };
            let n = ((len - self.at) as usize).min(buf.len());
            let to = addr.unchecked_add(u64::from(self.at));
            mem.write_slice(&buf[..n], to)
                .map_err(|_| PacketError::BadAddress(to.raw_value()))?;
            buf = &buf[n..];
            self.advance(n as u32);
        }
        Ok(())
    }

    fn advance(&mut self, n: u32) {
        self.at += n;
        if let Some(&(_, len)) = self.segments.first() {
            if self.at == len {
                self.segments = &self.segments[1..];
                self.at = 0;
            }
        }
    }
}

/// The device-writable buffers of one receive chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    segments: Vec<(GuestAddress, u32)>,
    /// Total bytes, counted up to `HEADER_LEN + MAX_PAYLOAD` (more is never used).
    capacity: u32,
}

/// Bytes of a receive chain that are ever used.
const MAX_PACKET: u32 = HEADER_LEN as u32 + MAX_PAYLOAD;

impl RxBuffer {
    /// Checks a receive chain: every descriptor device-writable and in guest memory, room for
    /// at least a header.
    pub fn new<M: GuestMemory>(
        mem: &M,
        descriptors: impl IntoIterator<Item = (GuestAddress, u32, bool)>,
    ) -> Result<RxBuffer, PacketError> {
        let mut segments = Vec::new();
        let mut total: u64 = 0;
        for (addr, len, write) in descriptors {
            if !write {
                return Err(PacketError::ReadableInRx);
            }
            if len == 0 {
                continue;
            }
            check_buffer(mem, addr, len, Permissions::Write)?;
            total += u64::from(len);
            segments.push((addr, len));
        }
        if total < HEADER_LEN as u64 {
            return Err(PacketError::ShortHeader(total));
        }
        Ok(RxBuffer {
            segments,
            capacity: total.min(u64::from(MAX_PACKET)) as u32,
        })
    }

    /// Most payload bytes a packet written here may carry.
    pub fn payload_room(&self) -> usize {
        self.capacity as usize - HEADER_LEN
    }

    /// Writes `header` (with `len` set to the payload's length) and `payload`; returns the
    /// bytes written, for the used ring. `payload` must fit [`payload_room`](Self::payload_room).
    pub fn write<M: GuestMemory>(
        &self,
        mem: &M,
        header: &Header,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        if payload.len() > self.payload_room() {
            return Err(PacketError::TooLong(payload.len() as u32));
        }
        let header = Header {
            len: payload.len() as u32,
            ..*header
        };
        let mut stream = Stream::new(&self.segments);
        stream.write(mem, &header.to_bytes())?;
        stream.write(mem, payload)?;
        Ok((HEADER_LEN + payload.len()) as u32)
    }
}

/// What to do with a packet from the driver, judged from its header alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Addressed from this guest to the host, a stream packet with a known op.
    Accept(Op),
    /// Answer with [`Header::reset_reply`] and forget it: a type or op this device does not
    /// carry.
    Reset,
    /// Drop it without an answer: a spoofed source, another destination, or a RST (never
    /// answered, so that two ends cannot bounce resets).
    Drop,
}

/// Judges a header sent by the guest whose CID is `guest_cid`.
pub fn classify(h: &Header, guest_cid: u64) -> Verdict {
    if h.src_cid != guest_cid || h.dst_cid != HOST_CID {
        return Verdict::Drop;
    }
    let op = Op::from_raw(h.op);
    if op == Some(Op::Rst) && h.kind != TYPE_STREAM {
        return Verdict::Drop;
    }
    match op {
        Some(op) if h.kind == TYPE_STREAM => Verdict::Accept(op),
        _ => Verdict::Reset,
    }
}

#[cfg(test)]
mod tests {
    use hypervisor::GuestMemoryMmap;

    use super::*;

    const GUEST: u64 = 3;

    fn mem() -> GuestMemoryMmap {
        // Two regions with a hole between them.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2_0000), 0x1_0000),
        ])
        .unwrap()
    }

    fn header(op: Op, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 5000,
            len,
            kind: TYPE_STREAM,
            op: op.raw(),
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    /// Writes `bytes` at `at` and returns the descriptor for them.
    fn put(m: &GuestMemoryMmap, at: u64, bytes: &[u8]) -> (GuestAddress, u32, bool) {
        m.write_slice(bytes, GuestAddress(at)).unwrap();
        (GuestAddress(at), bytes.len() as u32, false)
    }

    #[test]
    fn header_round_trips_and_matches_the_wire_layout() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 9,
            len: 10,
            kind: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x1000,
            fwd_cnt: 0xffff_fffe,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[7], 0x01);
        assert_eq!(b[16..20], [0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(b[28..32], [1, 0, 5, 0]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn a_header_split_across_descriptors_and_a_payload_are_read() {
        let m = mem();
        let h = header(Op::Rw, 5).to_bytes();
        let descs = [
            put(&m, 0x100, &h[..3]),
            put(&m, 0x200, &h[3..40]),
            put(&m, 0x300, &h[40..]),
            (GuestAddress(0x400), 0, false),
            put(&m, 0x500, b"hel"),
            put(&m, 0x600, b"lo and more"),
        ];
        let p = read_tx(&m, descs).unwrap();
        assert_eq!(p.header, header(Op::Rw, 5));
        assert_eq!(p.payload, b"hello");
    }

    #[test]
    fn a_buffer_running_off_a_region_into_a_hole_is_refused() {
        let m = mem();
        let h = header(Op::Rw, 0).to_bytes();
        m.write_slice(&h[..20], GuestAddress(0x1_0000 - 20))
            .unwrap();
        let descs = [(GuestAddress(0x1_0000 - 20), HEADER_LEN as u32, false)];
        assert_eq!(
            read_tx(&m, descs),
            Err(PacketError::BadAddress(0x1_0000 - 20))
        );
    }

    #[test]
    fn hostile_transmit_chains_are_refused() {
        let m = mem();
        let h = header(Op::Rw, 8).to_bytes();
        let hdr = put(&m, 0x100, &h);
        // Payload shorter than `len`.
        let short = put(&m, 0x200, b"1234");
        assert_eq!(
            read_tx(&m, [hdr, short]),
            Err(PacketError::Truncated { len: 8, have: 4 })
        );
        // Header cut short.
        assert_eq!(
            read_tx(&m, [(GuestAddress(0x100), 43, false)]),
            Err(PacketError::ShortHeader(43))
        );
        assert_eq!(read_tx(&m, []), Err(PacketError::ShortHeader(0)));
        // A writable descriptor.
        assert_eq!(
            read_tx(&m, [hdr, (GuestAddress(0x200), 8, true)]),
            Err(PacketError::WritableInTx)
        );
        // Outside guest memory, and wrapping around the address space.
        assert_eq!(
            read_tx(&m, [hdr, (GuestAddress(0x1_8000), 8, false)]),
            Err(PacketError::BadAddress(0x1_8000))
        );
        assert_eq!(
            read_tx(&m, [hdr, (GuestAddress(u64::MAX - 3), 8, false)]),
            Err(PacketError::BadAddress(u64::MAX - 3))
        );
        // A length over the limit, even with the buffers to back it.
        let big = header(Op::Rw, MAX_PAYLOAD + 1).to_bytes();
        let bighdr = put(&m, 0x2_0000, &big);
        let data = (GuestAddress(0x2_0000 + 44), 0xf000, false);
        assert_eq!(
            read_tx(&m, [bighdr, data, (GuestAddress(0), 0x1_0000, false)]),
            Err(PacketError::TooLong(MAX_PAYLOAD + 1))
        );
        // A zero-length header descriptor followed by the real one is fine.
        let p = read_tx(
            &m,
            [
                (GuestAddress(u64::MAX), 0, false),
                put(&m, 0x100, &header(Op::Request, 0).to_bytes()),
            ],
        )
        .unwrap();
        assert_eq!(p.header.op, Op::Request.raw());
        assert!(p.payload.is_empty());
    }

    #[test]
    fn a_packet_is_written_across_receive_buffers() {
        let m = mem();
        let descs = [
            (GuestAddress(0x1000), 10, true),
            (GuestAddress(0x2000), 0, true),
            (GuestAddress(0x3000), 40, true),
            (GuestAddress(0x4000), 100, true),
        ];
        let rx = RxBuffer::new(&m, descs).unwrap();
        assert_eq!(rx.payload_room(), 150 - HEADER_LEN);
        let h = header(Op::Rw, 999);
        let n = rx.write(&m, &h, b"payload!").unwrap();
        assert_eq!(n, 52);
        let mut got = vec![0u8; 50];
        m.read_slice(&mut got[..10], GuestAddress(0x1000)).unwrap();
        m.read_slice(&mut got[10..50], GuestAddress(0x3000))
            .unwrap();
        let mut tail = [0u8; 2];
        m.read_slice(&mut tail, GuestAddress(0x4000)).unwrap();
        got.extend_from_slice(&tail);
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&got[..HEADER_LEN]);
        assert_eq!(Header::from_bytes(&raw), Header { len: 8, ..h });
        assert_eq!(&got[HEADER_LEN..], b"payload!");
        assert_eq!(
            rx.write(&m, &h, &[0u8; 107]),
            Err(PacketError::TooLong(107))
        );
    }

    #[test]
    fn hostile_receive_chains_are_refused() {
        let m = mem();
        assert_eq!(
            RxBuffer::new(&m, [(GuestAddress(0x1000), 43, true)]),
            Err(PacketError::ShortHeader(43))
        );
        assert_eq!(
            RxBuffer::new(&m, [(GuestAddress(0x1000), 100, false)]),
            Err(PacketError::ReadableInRx)
        );
        assert_eq!(
            RxBuffer::new(&m, [(GuestAddress(0xffff), 100, true)]),
            Err(PacketError::BadAddress(0xffff))
        );
        // A huge chain counts only as much as one packet can use.
        let rx = RxBuffer::new(
            &m,
            [
                (GuestAddress(0), 0x1_0000, true),
                (GuestAddress(0x2_0000), 0x1_0000, true),
            ],
        )
        .unwrap();
        assert_eq!(rx.payload_room(), MAX_PAYLOAD as usize);
    }

    #[test]
    fn headers_are_judged_by_address_type_and_op() {
        let ok = header(Op::Rw, 0);
        assert_eq!(classify(&ok, GUEST), Verdict::Accept(Op::Rw));
        // Spoofed source, or not for the host.
        assert_eq!(classify(&ok, GUEST + 1), Verdict::Drop);
        let other = Header { dst_cid: 7, ..ok };
        assert_eq!(classify(&other, GUEST), Verdict::Drop);
        // SEQPACKET and unknown types are refused with a reset, as are unknown ops...
        let seq = Header { kind: 2, ..ok };
        assert_eq!(classify(&seq, GUEST), Verdict::Reset);
        let bad_op = Header { op: 0, ..ok };
        assert_eq!(classify(&bad_op, GUEST), Verdict::Reset);
        let bad_op = Header { op: 8, ..ok };
        assert_eq!(classify(&bad_op, GUEST), Verdict::Reset);
        // ...but a reset is never answered.
        let rst = Header {
            kind: 2,
            op: Op::Rst.raw(),
            ..ok
        };
        assert_eq!(classify(&rst, GUEST), Verdict::Drop);
        let r = ok.reset_reply();
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (HOST_CID, GUEST, 5000, 1234)
        );
        assert_eq!((r.op, r.kind, r.len), (Op::Rst.raw(), TYPE_STREAM, 0));
    }
}
