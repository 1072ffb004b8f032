//! The virtio-vsock device through real split virtqueues in guest memory (a small driver
//! written here: receive buffers as Linux 6.1 posts them, a 44-byte header descriptor and a
//! 4 KiB data descriptor) and real unix sockets on the host side.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hypervisor::GuestMemoryMmap;
use virtio::vsock::muxer::{CONNECT_LINE_TIMEOUT, CONNECT_TIMEOUT, MAX_CONTROL_BACKLOG};
use virtio::vsock::packet::{shutdown, Header, Op, HEADER_LEN, HOST_CID, TYPE_STREAM};
use virtio::vsock::Vsock;
use virtio::{features, Activation, VirtioDevice, VirtioInterrupt};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const QUEUE_SIZE: u16 = 256;
const GUEST_CID: u64 = 3;
const RX: usize = 0;
const TX: usize = 1;
const RX_DATA: u32 = 4096;
/// Rings of queue i live at `i * RING_SPAN`; buffers from `BUFFERS` on.
const RING_SPAN: u64 = 0x4000;
const BUFFERS: u64 = 0x1_0000;
const MEM_SIZE: usize = 32 << 20;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "fv-vsock-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Irq {
    queue: [AtomicUsize; 3],
}

impl VirtioInterrupt for Irq {
    fn notify_queue(&self, queue: u16) {
        self.queue[usize::from(queue)].fetch_add(1, Ordering::SeqCst);
    }
    fn notify_config(&self) {}
}

/// The driver side of one split virtqueue.
struct Ring {
    base: u64,
    next_desc: u16,
    avail: u16,
    used_seen: u16,
}

impl Ring {
    fn new(index: u64) -> Ring {
        Ring {
            base: index * RING_SPAN,
            next_desc: 0,
            avail: 0,
            used_seen: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.try_set_desc_table_address(GuestAddress(self.base))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.base + 0x1000))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.base + 0x2000))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Makes a chain of (address, length, device-writable) available; returns its head.
    fn push(&mut self, mem: &GuestMemoryMmap, chain: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QUEUE_SIZE;
            let last = i + 1 == chain.len();
            let flags = if last { 0 } else { NEXT } | if w { WRITE } else { 0 };
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, (idx + 1) % QUEUE_SIZE));
            mem.write_obj(d, GuestAddress(self.base + 16 * u64::from(idx)))
                .unwrap();
        }
        self.next_desc = (self.next_desc + chain.len() as u16) % QUEUE_SIZE;
        let slot = u64::from(self.avail % QUEUE_SIZE);
        mem.write_obj(head.to_le(), GuestAddress(self.base + 0x1004 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        mem.write_obj(self.avail.to_le(), GuestAddress(self.base + 0x1002))
            .unwrap();
        head
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.base + 0x2002)).unwrap())
    }

    /// The next used element: (head, length).
    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        if self.used_idx(mem) == self.used_seen {
            return None;
        }
        let at = self.base + 0x2004 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((u32::from_le(id) as u16, u32::from_le(len)))
    }
}

struct Driver {
    mem: GuestMemoryMmap,
    dev: Vsock,
    irq: Arc<Irq>,
    rings: [Ring; 3],
    next_buf: u64,
    /// Receive chains posted: head -> (header buffer, data buffer).
    rx_posted: HashMap<u16, (u64, u64)>,
    _dir: TempDir,
    uds: PathBuf,
}

impl Driver {
    fn new(tag: &str) -> Driver {
        let dir = TempDir::new(tag);
        let uds = dir.0.join("v.sock");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut dev = Vsock::new(GUEST_CID, &uds).unwrap();
        let rings = [Ring::new(0), Ring::new(1), Ring::new(2)];
        let irq = Arc::new(Irq::default());
        dev.activate(Activation {
            mem: mem.clone(),
            queues: rings.iter().map(Ring::queue).collect(),
            features: features::VERSION_1,
            interrupt: irq.clone(),
        })
        .unwrap();
        Driver {
            mem,
            dev,
            irq,
            rings,
            next_buf: BUFFERS,
            rx_posted: HashMap::new(),
            _dir: dir,
            uds,
        }
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let at = self.next_buf;
        self.next_buf += (len as u64).next_multiple_of(0x100).max(0x100);
        assert!(self.next_buf < MEM_SIZE as u64, "test driver out of memory");
        at
    }

    /// Posts `n` receive chains and tells the device.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let hdr = self.alloc(HEADER_LEN);
            let data = self.alloc(RX_DATA as usize);
            let head = self.rings[RX].push(
                &self.mem,
                &[(hdr, HEADER_LEN as u32, true), (data, RX_DATA, true)],
            );
            self.rx_posted.insert(head, (hdr, data));
        }
        self.dev.process_queue(RX);
    }

    /// Packets the device put in the receive queue since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rings[RX].pop_used(&self.mem) {
            let (hdr, data) = self.rx_posted.remove(&head).expect("a posted chain");
            assert!(len as usize >= HEADER_LEN, "used length {len}");
            let mut raw = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(hdr)).unwrap();
            let h = Header::from_bytes(&raw);
            let mut payload = vec![0u8; len as usize - HEADER_LEN];
            self.mem
                .read_slice(&mut payload, GuestAddress(data))
                .unwrap();
            assert_eq!(
                h.len as usize,
                payload.len(),
                "header length vs used length"
            );
            out.push((h, payload));
        }
        out
    }

    /// Puts a packet on the transmit queue (header and payload in separate descriptors)
    /// without telling the device.
    fn queue_tx(&mut self, h: &Header, payload: &[u8]) {
        let hdr = self.alloc(HEADER_LEN);
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(hdr))
            .unwrap();
        let mut chain = vec![(hdr, HEADER_LEN as u32, false)];
        if !payload.is_empty() {
            let data = self.alloc(payload.len());
            self.mem.write_slice(payload, GuestAddress(data)).unwrap();
            chain.push((data, payload.len() as u32, false));
        }
        self.rings[TX].push(&self.mem, &chain);
    }

    /// Sends a packet from the guest.
    fn send(&mut self, h: &Header, payload: &[u8]) {
        self.queue_tx(h, payload);
        self.dev.process_queue(TX);
    }

    /// Lets the device look at its host sockets.
    fn host(&mut self) {
        self.dev.process_backend(0);
    }

    /// Whether the device's back-end descriptor reports an event.
    fn backend_ready(&self) -> bool {
        let fd = self.dev.backend_fds()[0];
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, timeout 0.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }
}

/// A packet from the guest's port `src` to host port `dst`.
fn pkt(op: Op, src: u32, dst: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        len: 0,
        kind: TYPE_STREAM,
        op: op.raw(),
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Reads from `s` until `n` bytes or a timeout.
fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = vec![0u8; n];
    s.read_exact(&mut out).unwrap();
    out
}

/// Reads `n` bytes from `s`, letting the device write to it in between.
fn drain(d: &mut Driver, s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while out.len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "got {} of {n}",
            out.len()
        );
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => d.host(),
            Err(e) => panic!("{e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    out
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn assert_eof(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("{n} more bytes instead of end of file"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no end of file: {e}"),
    }
}

/// A host client connected to guest port `port`: returns the client, the host port the
/// device picked and the REQUEST it sent.
fn host_connect(d: &mut Driver, port: u32, guest_buf: u32) -> (UnixStream, u32) {
    let mut c = UnixStream::connect(&d.uds).unwrap();
    c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    d.host();
    d.host();
    let got = d.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = got[0].0;
    assert_eq!(req.op, Op::Request.raw());
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, port);
    assert_eq!(req.kind, TYPE_STREAM);
    let host_port = req.src_port;
    let mut resp = pkt(Op::Response, port, host_port);
    resp.buf_alloc = guest_buf;
    d.send(&resp, &[]);
    assert_eq!(read_line(&mut c), format!("OK {host_port}\n"));
    (c, host_port)
}

#[test]
fn a_host_initiated_connection_carries_data_within_the_guests_credit() {
    let mut d = Driver::new("host-init");
    d.post_rx(16);
    let (mut c, hp) = host_connect(&mut d, 5000, 10_000);
    assert!(hp >= 1 << 30);

    // 30000 bytes from the host; the guest has room for 10000.
    let data = pattern(30_000);
    c.write_all(&data).unwrap();
    d.host();
    let got = d.recv();
    let total: usize = got.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(total, 10_000, "sent beyond the credit");
    for (h, p) in &got {
        assert_eq!(h.op, Op::Rw.raw());
        assert_eq!((h.src_port, h.dst_port), (hp, 5000));
        assert!(p.len() <= RX_DATA as usize);
        assert_eq!(h.buf_alloc, 256 * 1024);
    }
    let mut received: Vec<u8> = got.into_iter().flat_map(|(_, p)| p).collect();
    // More host events change nothing.
    d.host();
    assert!(d.recv().is_empty());
    assert!(
        !d.backend_ready(),
        "the device keeps being woken without credit"
    );

    // The guest consumed it all: the rest flows.
    let mut upd = pkt(Op::CreditUpdate, 5000, hp);
    upd.buf_alloc = 10_000;
    upd.fwd_cnt = 10_000;
    d.send(&upd, &[]);
    d.post_rx(4);
    received.extend(d.recv().into_iter().flat_map(|(_, p)| p));
    upd.fwd_cnt = 20_000;
    d.send(&upd, &[]);
    d.post_rx(4);
    received.extend(d.recv().into_iter().flat_map(|(_, p)| p));
    assert_eq!(received, data);

    // Guest to host.
    let mut rw = pkt(Op::Rw, 5000, hp);
    rw.len = 5;
    d.send(&rw, b"hello");
    assert_eq!(read_n(&mut c, 5), b"hello");

    // A credit request is answered with the device's count of forwarded bytes.
    d.send(&pkt(Op::CreditRequest, 5000, hp), &[]);
    let got = d.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, Op::CreditUpdate.raw());
    assert_eq!(got[0].0.fwd_cnt, 5);

    // The guest closes: the host sees end of file, the guest gets a RST.
    let mut sd = pkt(Op::Shutdown, 5000, hp);
    sd.flags = shutdown::BOTH;
    d.send(&sd, &[]);
    assert_eof(&mut c);
    let got = d.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, Op::Rst.raw());
    assert_eq!(d.dev.connections(), 0);
}

#[test]
fn a_host_client_whose_guest_port_is_closed_is_disconnected() {
    let mut d = Driver::new("host-rst");
    d.post_rx(4);
    let mut c = UnixStream::connect(&d.uds).unwrap();
    c.write_all(b"CONNECT 7\n").unwrap();
    d.host();
    let got = d.recv();
    let req = got[0].0;
    d.send(&pkt(Op::Rst, 7, req.src_port), &[]);
    assert_eof(&mut c);
    assert_eq!(d.dev.connections(), 0);
    assert!(d.recv().is_empty(), "a RST is not answered");

    // A bad line, and a line that never ends, are refused too.
    let mut c = UnixStream::connect(&d.uds).unwrap();
    c.write_all(b"HELLO 7\n").unwrap();
    d.host();
    d.host();
    assert_eof(&mut c);
    let mut c = UnixStream::connect(&d.uds).unwrap();
    c.write_all(&[b'9'; 100]).unwrap();
    d.host();
    d.host();
    assert_eof(&mut c);
    assert!(d.recv().is_empty());
}

#[test]
fn a_guest_initiated_connection_reaches_the_port_socket_and_closes_cleanly() {
    let mut d = Driver::new("guest-init");
    d.post_rx(16);
    let listener = UnixListener::bind(format!("{}_6000", d.uds.display())).unwrap();
    d.send(&pkt(Op::Request, 1111, 6000), &[]);
    let got = d.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, Op::Response.raw());
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (6000, 1111));
    let (mut s, _) = listener.accept().unwrap();

    let data = pattern(100_000);
    for chunk in data.chunks(60_000) {
        let mut rw = pkt(Op::Rw, 1111, 6000);
        rw.len = chunk.len() as u32;
        d.send(&rw, chunk);
    }
    assert_eq!(drain(&mut d, &mut s, data.len()), data);
    // Over the threshold of forwarded bytes: the guest hears of them unasked.
    let got = d.recv();
    assert!(
        got.iter()
            .any(|(h, _)| h.op == Op::CreditUpdate.raw() && h.fwd_cnt >= 64 * 1024),
        "{got:?}"
    );

    // The guest is done sending; the host replies and closes.
    let mut sd = pkt(Op::Shutdown, 1111, 6000);
    sd.flags = shutdown::SEND;
    d.send(&sd, &[]);
    assert_eof(&mut s);
    s.write_all(b"reply").unwrap();
    drop(s);
    d.host();
    let got = d.recv();
    let ops: Vec<u16> = got.iter().map(|(h, _)| h.op).collect();
    assert_eq!(
        ops,
        [Op::Rw.raw(), Op::Shutdown.raw(), Op::Rst.raw()],
        "{got:?}"
    );
    assert_eq!(got[0].1, b"reply");
    assert_eq!(got[1].0.flags, shutdown::SEND);
    assert_eq!(d.dev.connections(), 0);

    // Nothing listens on port 6001.
    d.send(&pkt(Op::Request, 1112, 6001), &[]);
    let got = d.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, Op::Rst.raw());
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (6001, 1112));
}

#[test]
fn hostile_packets_are_dropped_or_reset() {
    let mut d = Driver::new("hostile");
    d.post_rx(16);
    let counters = d.dev.counters();

    // A spoofed source CID, another destination: dropped without an answer.
    let mut h = pkt(Op::Request, 1, 2);
    h.src_cid = 99;
    d.send(&h, &[]);
    let mut h = pkt(Op::Request, 1, 2);
    h.dst_cid = 1;
    d.send(&h, &[]);
    assert!(d.recv().is_empty());
    assert_eq!(counters.dropped.load(Ordering::Relaxed), 2);

    // SEQPACKET, an unknown op, data on no connection: a RST each.
    let mut h = pkt(Op::Request, 1, 2);
    h.kind = 2;
    d.send(&h, &[]);
    let mut h = pkt(Op::Rw, 1, 2);
    h.op = 99;
    d.send(&h, &[]);
    let mut h = pkt(Op::Rw, 1, 2);
    h.len = 3;
    d.send(&h, b"abc");
    let got = d.recv();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(h, _)| h.op == Op::Rst.raw()));

    // A length beyond the buffers, a header cut short: counted, no answer.
    let mut h = pkt(Op::Rw, 1, 2);
    h.len = 1000;
    d.send(&h, b"short");
    let hdr = h.to_bytes();
    let at = d.alloc(64);
    d.mem.write_slice(&hdr, GuestAddress(at)).unwrap();
    d.rings[TX].push(&d.mem, &[(at, 40, false)]);
    d.dev.process_queue(TX);
    assert!(d.recv().is_empty());
    assert_eq!(counters.invalid.load(Ordering::Relaxed), 2);

    // Data beyond the credit the device gave resets the connection.
    let listener = UnixListener::bind(format!("{}_80", d.uds.display())).unwrap();
    d.send(&pkt(Op::Request, 9, 80), &[]);
    let (_s, _) = listener.accept().unwrap();
    let big = vec![0u8; 64 * 1024];
    // The host never reads: the device buffers up to its buf_alloc (256 KiB), then resets.
    let mut rw = pkt(Op::Rw, 9, 80);
    rw.len = big.len() as u32;
    let mut reset = false;
    for _ in 0..32 {
        d.send(&rw, &big);
        if d.recv().iter().any(|(h, _)| h.op == Op::Rst.raw()) {
            reset = true;
            break;
        }
    }
    assert!(reset, "the connection survived a credit overrun");
    assert_eq!(counters.protocol_errors.load(Ordering::Relaxed), 1);
    assert_eq!(d.dev.connections(), 0);

    // A packet of another type on the ports of an open connection: the RST that answers it
    // ends the connection on both sides.
    d.send(&pkt(Op::Request, 10, 80), &[]);
    let (mut s, _) = listener.accept().unwrap();
    assert_eq!(d.dev.connections(), 1);
    let mut h = pkt(Op::Rw, 10, 80);
    h.kind = 2;
    d.send(&h, &[]);
    assert_eq!(d.recv().last().unwrap().0.op, Op::Rst.raw());
    assert_eq!(d.dev.connections(), 0);
    assert_eof(&mut s);
}

#[test]
fn the_transmit_queue_waits_for_receive_buffers_when_answers_pile_up() {
    let mut d = Driver::new("backlog");
    // Data on no connection: each packet wants a RST back, and there are no receive buffers.
    let mut port = 1000;
    let mut queue = |d: &mut Driver, n: usize| {
        for _ in 0..n {
            d.queue_tx(&pkt(Op::Rw, port, 2), &[]);
            port += 1;
        }
        d.dev.process_queue(TX);
    };
    queue(&mut d, 200);
    assert_eq!(d.rings[TX].used_idx(&d.mem), 200);
    queue(&mut d, 100);
    assert_eq!(
        usize::from(d.rings[TX].used_idx(&d.mem)),
        MAX_CONTROL_BACKLOG,
        "the device went on serving the transmit queue with its answers piling up"
    );
    // Receive buffers let both queues move on.
    let mut resets = 0;
    while resets < 300 {
        d.post_rx(64);
        let got = d.recv();
        assert!(!got.is_empty(), "stuck after {resets} answers");
        assert!(got.iter().all(|(h, _)| h.op == Op::Rst.raw()));
        resets += got.len();
    }
    assert_eq!(resets, 300);
    assert_eq!(d.rings[TX].used_idx(&d.mem), 300);
    assert!(d.irq.queue[TX].load(Ordering::SeqCst) >= 2);
}

#[test]
fn a_host_socket_that_hangs_up_while_the_guest_has_no_room_does_not_spin() {
    let mut d = Driver::new("hup");
    d.post_rx(8);
    let (mut c, hp) = host_connect(&mut d, 5000, 100);
    c.write_all(&pattern(1000)).unwrap();
    drop(c);
    d.host();
    let got: usize = d.recv().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(got, 100);
    d.host();
    assert!(
        !d.backend_ready(),
        "a hung-up socket keeps waking the device"
    );
    // The guest makes room: the rest arrives, then the host's shutdown.
    let mut upd = pkt(Op::CreditUpdate, 5000, hp);
    upd.buf_alloc = 100_000;
    d.send(&upd, &[]);
    let got = d.recv();
    let data: usize = got.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(data, 900);
    assert_eq!(got.last().unwrap().0.op, Op::Shutdown.raw());
    // The guest closes its end too: done.
    let mut sd = pkt(Op::Shutdown, 5000, hp);
    sd.flags = shutdown::BOTH;
    d.send(&sd, &[]);
    assert_eq!(d.recv().last().unwrap().0.op, Op::Rst.raw());
    assert_eq!(d.dev.connections(), 0);
}

#[test]
fn a_device_reset_closes_every_connection_and_clients_wait_for_the_driver() {
    let mut d = Driver::new("reset");
    d.post_rx(8);
    let (mut c, _) = host_connect(&mut d, 5000, 1000);
    d.dev.reset();
    assert_eof(&mut c);
    assert_eq!(d.dev.connections(), 0);
    // Not active: a new client is closed at once.
    let mut c = UnixStream::connect(&d.uds).unwrap();
    c.write_all(b"CONNECT 5000\n").unwrap();
    d.host();
    assert_eof(&mut c);
    assert!(d.dev.counters().clients_refused.load(Ordering::Relaxed) >= 1);
}

#[test]
fn a_host_client_the_guest_never_answers_is_disconnected_after_the_timeout() {
    let mut d = Driver::new("connect-timeout");
    d.post_rx(8);
    let mut waiting = UnixStream::connect(&d.uds).unwrap();
    waiting.write_all(b"CONNECT 5000\n").unwrap();
    d.host();
    let got = d.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, Op::Request.raw());
    let hp = got[0].0.src_port;
    // Another client, answered, is not affected.
    let (mut answered, answered_hp) = host_connect(&mut d, 6000, 1000);
    assert_eq!(d.dev.connections(), 2);

    // The timer wakes the device; the unanswered client is closed and the guest told.
    let start = std::time::Instant::now();
    while !d.backend_ready() {
        assert!(
            start.elapsed() < CONNECT_TIMEOUT * 3,
            "no timeout after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.host();
    assert_eof(&mut waiting);
    let got = d.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, Op::Rst.raw());
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (hp, 5000));
    assert_eq!(d.dev.counters().connect_timeouts.load(Ordering::Relaxed), 1);
    assert_eq!(d.dev.connections(), 1);

    // A RESPONSE that comes too late is answered with a RST.
    d.send(&pkt(Op::Response, 5000, hp), &[]);
    let got = d.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.op, Op::Rst.raw());
    // The answered connection still carries data.
    let mut rw = pkt(Op::Rw, 6000, answered_hp);
    rw.len = 2;
    d.send(&rw, b"hi");
    assert_eq!(read_n(&mut answered, 2), b"hi");
}

#[test]
fn a_host_client_that_sends_no_connect_line_is_closed_after_the_timeout() {
    let mut d = Driver::new("line-timeout");
    d.post_rx(8);
    let mut silent = UnixStream::connect(&d.uds).unwrap();
    let mut partial = UnixStream::connect(&d.uds).unwrap();
    partial.write_all(b"CONNECT 50").unwrap();
    d.host();
    d.host();
    assert!(d.recv().is_empty(), "nothing reaches the guest");
    // Still open: a line may take a while to come.
    silent.set_nonblocking(true).unwrap();
    let still = silent.read(&mut [0u8; 1]);
    assert!(
        matches!(&still, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{still:?}"
    );
    silent.set_nonblocking(false).unwrap();

    // The timer wakes the device; both are closed, counted as refused.
    let start = std::time::Instant::now();
    while !d.backend_ready() {
        assert!(
            start.elapsed() < CONNECT_LINE_TIMEOUT * 3,
            "no timeout after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.host();
    assert_eof(&mut silent);
    assert_eof(&mut partial);
    assert_eq!(d.dev.counters().clients_refused.load(Ordering::Relaxed), 2);
    assert!(d.recv().is_empty(), "the guest never heard of them");
    // Their places are free again: a client that says where it goes is connected.
    let (mut c, hp) = host_connect(&mut d, 6000, 1000);
    let mut rw = pkt(Op::Rw, 6000, hp);
    rw.len = 2;
    d.send(&rw, b"ok");
    assert_eq!(read_n(&mut c, 2), b"ok");
}

#[test]
fn the_socket_file_goes_with_the_device() {
    let d = Driver::new("drop");
    let uds = d.uds.clone();
    assert!(uds.exists());
    drop(d);
    assert!(!uds.exists());
}
