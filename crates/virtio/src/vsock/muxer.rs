//! The host side of the device: the listening socket, the host clients that have not said
//! where they want to go yet, the connections, and the packets waiting for the guest's
//! receive buffers.
//!
//! Every host socket is registered in an epoll descriptor of the device's own; the VMM's
//! event loop watches that one descriptor (it becomes readable when any socket has an event
//! the device asked for) and calls [`Muxer::host_events`]. Interest follows each
//! connection's state: a socket is watched for input only while the connection may read
//! (established, guest credit and read-ahead room left, no end of file yet), for output only
//! while bytes wait for it. A socket whose peer hung up while the connection has no use for
//! its input is taken out of the set (epoll reports hang-ups whatever the interest), and is
//! then served only when guest packets or sent data move the connection on; once hung up,
//! its reads and writes no longer block.
//!
//! A connection's life (`key` = host port, guest port):
//! - host-initiated: a client connects to the listening socket and sends
//!   `CONNECT <port>\n` (within [`CONNECT_LINE_TIMEOUT`], or it is closed); the device picks an ephemeral host port, queues a REQUEST and the
//!   connection is `Connecting`. RESPONSE makes it `Established` and queues `OK <host
//!   port>\n` for the client; RST (nobody listens in the guest) closes the client, and so
//!   does no answer within [`CONNECT_TIMEOUT`] (the guest is told with a RST).
//! - guest-initiated: a REQUEST to host port P connects to `<uds>_P` without blocking;
//!   RESPONSE on success, RST otherwise.
//! - data, credit and shutdowns: see [`Connection`]. When both directions are finished, or
//!   on any error of the host socket or the guest, the device sends RST and closes the host
//!   socket; a RST from the guest closes it without an answer.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnError, Connection, State, TO_HOST_BUF};
use super::host::{self, ConnectLine, Listener, MAX_CONNECT_LINE};
use super::packet::{
    classify, shutdown, Header, Op, PacketError, RxBuffer, TxPacket, Verdict, HEADER_LEN, HOST_CID,
    MAX_PAYLOAD, TYPE_STREAM,
};
use super::{VsockCounters, VsockError};

/// (host port, guest port).
type ConnKey = (u32, u32);

/// The epoll token of the listening socket; host sockets get 1, 2, ...
const LISTENER: u64 = 0;
/// The epoll token of the timer of host clients and connections with a deadline.
const TIMER: u64 = u64::MAX;
/// How long a host-initiated connection waits for the guest's answer (RESPONSE or RST):
/// a guest that never answers (no driver running, a hung guest, a restored guest whose
/// listener is gone) must not keep the host client waiting forever. Firecracker's figure.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host client may take to send its `CONNECT <port>` line: one that connects and
/// says nothing would otherwise hold one of the [`MAX_CONNECTIONS`] places forever (a
/// program waiting for a guest's agent retries; a person typing at `socat` has time).
pub const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// Host clients and connections at most; more are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Payload-less packets waiting for receive buffers beyond which the transmit queue is not
/// served (each packet from the guest queues at most one), until the guest posts buffers.
pub const MAX_CONTROL_BACKLOG: usize = 256;
/// Host ports of host-initiated connections are taken from here up.
const EPHEMERAL_BASE: u32 = 1 << 30;

#[derive(Clone, Copy)]
enum Owner {
    /// A host client still sending its CONNECT line.
    Client,
    Conn(ConnKey),
}

pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: Listener,
    /// The listener is out of the epoll set after an accept error (out of descriptors), until
    /// a connection closes.
    listener_paused: bool,
    epoll: Epoll,
    owners: HashMap<u64, Owner>,
    /// Host clients by token, with what they sent so far.
    clients: HashMap<u64, (UnixStream, Vec<u8>)>,
    conns: HashMap<ConnKey, Connection>,
    /// Packets without payload for the guest, in order; `buf_alloc` and `fwd_cnt` are filled
    /// in when one is sent.
    control: VecDeque<Header>,
    /// Connections that may have data for the guest, served in turn.
    ready: VecDeque<ConnKey>,
    next_token: u64,
    next_port: u32,
    counters: Arc<VsockCounters>,
    /// Armed for the earliest deadline in `connecting` and `greeting`.
    timer: TimerFd,
    /// Host-initiated connections waiting for the guest's answer, oldest first (all wait
    /// [`CONNECT_TIMEOUT`], so this is also deadline order), with the token that tells a
    /// connection from a later one on the same ports.
    connecting: VecDeque<(Instant, ConnKey, u64)>,
    /// Host clients that have not sent their CONNECT line yet, oldest first (deadline order
    /// likewise), by token.
    greeting: VecDeque<(Instant, u64)>,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        uds: &Path,
        counters: Arc<VsockCounters>,
    ) -> Result<Muxer, VsockError> {
        let listener = Listener::bind(uds)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.socket.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(VsockError::Epoll)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        // Read only when epoll says it expired; non-blocking in case it was re-armed since.
        // SAFETY: F_GETFL/F_SETFL on a descriptor the TimerFd owns; no memory involved.
        let nonblocking = unsafe {
            let fd = timer.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !nonblocking {
            return Err(VsockError::Timer(io::Error::last_os_error()));
        }
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Muxer {
            guest_cid,
            uds: uds.to_owned(),
            listener,
            listener_paused: false,
            epoll,
            owners: HashMap::new(),
            clients: HashMap::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            next_token: LISTENER + 1,
            next_port: EPHEMERAL_BASE,
            counters,
            timer,
            connecting: VecDeque::new(),
            greeting: VecDeque::new(),
        })
    }

    /// The descriptor that is readable when a host socket has an event.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Drops every connection and host client (their sockets close) and every queued packet.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.clients.clear();
        self.owners.clear();
        self.control.clear();
        self.ready.clear();
        self.connecting.clear();
        let _ = self.timer.clear();
        self.resume_listener();
    }

    /// Number of open connections (either direction, any state).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether packets wait for receive buffers.
    pub fn has_pending(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    /// Whether enough packets wait that the transmit queue should wait too.
    pub fn backlogged(&self) -> bool {
        self.control.len() >= MAX_CONTROL_BACKLOG
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// A packet from the host end of connection `key` to `guest_cid`, without payload.
    fn header(guest_cid: u64, key: ConnKey, op: Op, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            kind: TYPE_STREAM,
            op: op.raw(),
            flags,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn queue(&mut self, key: ConnKey, op: Op, flags: u32) {
        let h = Self::header(self.guest_cid, key, op, flags);
        self.control.push_back(h);
    }

    /// Answers a packet with RST.
    fn refuse(&mut self, h: &Header) {
        self.counters.resets_sent.fetch_add(1, Ordering::Relaxed);
        self.control.push_back(h.reset_reply());
    }

    /// Closes connection `key`, telling the guest with a RST if `rst`.
    fn close(&mut self, key: ConnKey, rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            self.owners.remove(&c.token);
            if rst {
                self.counters.resets_sent.fetch_add(1, Ordering::Relaxed);
                self.queue(key, Op::Rst, 0);
            }
            self.resume_listener();
        }
    }

    fn resume_listener(&mut self) {
        if self.listener_paused {
            let fd = self.listener.socket.as_raw_fd();
            let ev = EpollEvent::new(EventSet::IN, LISTENER);
            if self.epoll.ctl(ControlOperation::Add, fd, ev).is_ok() {
                self.listener_paused = false;
            }
        }
    }

    // ------------------------------------------------------------------ guest side

    /// Handles one packet from the guest's transmit queue.
    pub fn guest_packet(&mut self, pkt: &TxPacket) {
        let h = &pkt.header;
        let op = match classify(h, self.guest_cid) {
            Verdict::Accept(op) => op,
            Verdict::Reset => {
                tracing::debug!("vsock: refusing a packet of type {} op {}", h.kind, h.op);
                // On the ports of an open connection, the RST ends it for the guest: end it
                // here too.
                self.close((h.dst_port, h.src_port), false);
                self.refuse(h);
                return;
            }
            Verdict::Drop => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "vsock: dropping a packet from CID {} to CID {}",
                    h.src_cid,
                    h.dst_cid
                );
                return;
            }
        };
        let key = (h.dst_port, h.src_port);
        if op == Op::Request {
            self.guest_connect(key, h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if op != Op::Rst {
                self.refuse(h);
            }
            return;
        };
        conn.set_peer_credit(h.buf_alloc, h.fwd_cnt);
        let result = match op {
            Op::Response if conn.state == State::Connecting => {
                conn.accept(format!("OK {}\n", key.0).as_bytes());
                self.counters.connections.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Op::Response => Err(ConnError::Protocol("RESPONSE on an open connection")),
            Op::Rst => {
                self.close(key, false);
                return;
            }
            Op::Shutdown => {
                conn.guest_shutdown(h.flags);
                Ok(())
            }
            Op::Rw => conn.from_guest(&pkt.payload),
            Op::CreditUpdate => Ok(()),
            Op::CreditRequest => {
                if !conn.credit_update_queued {
                    conn.credit_update_queued = true;
                    self.queue(key, Op::CreditUpdate, 0);
                }
                Ok(())
            }
            Op::Request => Ok(()),
        };
        if let Err(e) = result {
            self.counters
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!("vsock: resetting connection {key:?}: {e:?}");
            self.close(key, true);
            return;
        }
        self.service(key);
    }

    /// The guest asks for a connection to host port `key.0`.
    fn guest_connect(&mut self, key: ConnKey, h: &Header) {
        if self.conns.contains_key(&key) {
            // A second REQUEST on an open connection: start over.
            self.counters
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            self.close(key, true);
            return;
        }
        if self.owners.len() >= MAX_CONNECTIONS {
            self.refuse(h);
            return;
        }
        let path = host::port_path(&self.uds, key.0);
        let stream = match host::connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connection to {}: {e}", path.display());
                self.refuse(h);
                return;
            }
        };
        let token = self.new_token();
        let ev = EpollEvent::new(EventSet::empty(), token);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
        {
            tracing::warn!("vsock: cannot watch a host socket: {e}");
            self.refuse(h);
            return;
        }
        let mut conn = Connection::established(stream, token);
        conn.interest = Some(0);
        conn.set_peer_credit(h.buf_alloc, h.fwd_cnt);
        self.owners.insert(token, Owner::Conn(key));
        self.conns.insert(key, conn);
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        self.queue(key, Op::Response, 0);
        self.service(key);
    }

    /// Moves connection `key` on after anything changed: socket I/O, packets it now owes the
    /// guest, closing it when done, its place in the ready list and its epoll interest.
    fn service(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Err(e) = conn.pump() {
            tracing::debug!("vsock: host socket of connection {key:?}: {e:?}");
            self.close(key, true);
            return;
        }
        if conn.needs_credit_update() && !conn.credit_update_queued {
            conn.credit_update_queued = true;
            let h = Self::header(self.guest_cid, key, Op::CreditUpdate, 0);
            self.control.push_back(h);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.needs_shutdown() {
            conn.shutdown_sent();
            let h = Self::header(self.guest_cid, key, Op::Shutdown, shutdown::SEND);
            self.control.push_back(h);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.finished() {
            self.close(key, true);
            return;
        }
        if conn.sendable() > 0 && !conn.in_ready {
            conn.in_ready = true;
            self.ready.push_back(key);
        }
        if let Some(current) = conn.interest {
            let mut want = EventSet::empty();
            if conn.wants_read() {
                want |= EventSet::IN;
            }
            if conn.wants_write() {
                want |= EventSet::OUT;
            }
            if want.bits() != current {
                let ev = EpollEvent::new(want, conn.token);
                let fd = conn.stream.as_raw_fd();
                match self.epoll.ctl(ControlOperation::Modify, fd, ev) {
                    Ok(()) => conn.interest = Some(want.bits()),
                    Err(e) => tracing::warn!("vsock: cannot watch a host socket: {e}"),
                }
            }
        }
    }

    /// Writes the next packet for the guest into `rx`: payload-less packets first, then data
    /// from the ready connections in turn. `None` if nothing is waiting; an error leaves the
    /// packet queued.
    pub fn emit<M: GuestMemory>(
        &mut self,
        mem: &M,
        rx: &RxBuffer,
    ) -> Option<Result<u32, PacketError>> {
        while let Some(&front) = self.control.front() {
            let key = (front.src_port, front.dst_port);
            let mut h = front;
            match self.conns.get(&key) {
                Some(conn) => {
                    h.buf_alloc = TO_HOST_BUF;
                    h.fwd_cnt = conn.fwd_cnt;
                }
                // A closed connection's opening and credit packets are moot; its
                // SHUTDOWN and RST still go out, in order.
                None if h.op != Op::Rst.raw() && h.op != Op::Shutdown.raw() => {
                    self.control.pop_front();
                    continue;
                }
                None => {}
            }
            if let Err(e) = rx.write(mem, &h, &[]) {
                return Some(Err(e));
            }
            self.control.pop_front();
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.fwd_cnt_sent = h.fwd_cnt;
                if h.op == Op::CreditUpdate.raw() {
                    conn.credit_update_queued = false;
                }
            }
            self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
            return Some(Ok(HEADER_LEN as u32));
        }
        while let Some(&key) = self.ready.front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                self.ready.pop_front();
                continue;
            };
            let sendable = conn.sendable();
            if sendable == 0 {
                conn.in_ready = false;
                self.ready.pop_front();
                continue;
            }
            let n = sendable.min(rx.payload_room()).min(MAX_PAYLOAD as usize);
            if n == 0 {
                return Some(Err(PacketError::NoRoom));
            }
            let h = Header {
                len: n as u32,
                buf_alloc: TO_HOST_BUF,
                fwd_cnt: conn.fwd_cnt,
                ..Self::header(self.guest_cid, key, Op::Rw, 0)
            };
            if let Err(e) = rx.write(mem, &h, conn.peek_for_guest(n)) {
                return Some(Err(e));
            }
            conn.sent_to_guest(n);
            conn.fwd_cnt_sent = h.fwd_cnt;
            self.ready.pop_front();
            if conn.sendable() > 0 {
                self.ready.push_back(key);
            } else {
                conn.in_ready = false;
            }
            self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
            self.counters
                .rx_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            // Room in the read-ahead buffer: read on.
            self.service(key);
            return Some(Ok(h.len + HEADER_LEN as u32));
        }
        None
    }

    // ------------------------------------------------------------------ host side

    /// Handles what happened on the host sockets. `active`: whether the driver is up (host
    /// clients are turned away while it is not).
    pub fn host_events(&mut self, active: bool) {
        let mut events = vec![EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("vsock: epoll_wait failed: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER {
                self.accept_clients(active);
                continue;
            }
            if token == TIMER {
                self.expire_deadlines();
                continue;
            }
            match self.owners.get(&token).copied() {
                Some(Owner::Client) => self.read_connect_line(token),
                Some(Owner::Conn(key)) => {
                    self.service(key);
                    let hung_up = ev
                        .event_set()
                        .intersects(EventSet::HANG_UP | EventSet::ERROR);
                    if hung_up {
                        self.detach_if_not_reading(key);
                    }
                }
                None => {}
            }
        }
    }

    /// Takes a hung-up socket that the connection does not read from now out of the epoll
    /// set, where it would be reported again and again.
    fn detach_if_not_reading(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let reading = conn.interest.is_some_and(|i| i & EventSet::IN.bits() != 0);
        if conn.interest.is_some() && !reading {
            let fd = conn.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            conn.interest = None;
        }
    }

    fn accept_clients(&mut self, active: bool) {
        loop {
            match self.listener.socket.accept() {
                Ok((stream, _)) => {
                    if !active || self.owners.len() >= MAX_CONNECTIONS {
                        // The driver is not up, or too many: closed at once.
                        self.counters
                            .clients_refused
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.new_token();
                    let ev = EpollEvent::new(EventSet::IN, token);
                    if let Err(e) = self
                        .epoll
                        .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                    {
                        tracing::warn!("vsock: cannot watch a host socket: {e}");
                        continue;
                    }
                    self.owners.insert(token, Owner::Client);
                    self.clients.insert(token, (stream, Vec::new()));
                    self.greeting
                        .push_back((Instant::now() + CONNECT_LINE_TIMEOUT, token));
                    self.arm_timer();
                    // The line may be there already.
                    self.read_connect_line(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of descriptors, most likely: stop accepting until a connection
                    // closes, rather than be woken for the same error again and again.
                    tracing::warn!("vsock: cannot accept a host connection: {e}");
                    let fd = self.listener.socket.as_raw_fd();
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    self.listener_paused = true;
                    return;
                }
            }
        }
    }

    fn drop_client(&mut self, token: u64) {
        self.clients.remove(&token);
        self.owners.remove(&token);
        self.resume_listener();
    }

    /// Reads from a host client that has not finished its CONNECT line.
    fn read_connect_line(&mut self, token: u64) {
        let Some((stream, line)) = self.clients.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE.saturating_sub(line.len());
        match stream.read(&mut buf[..room]) {
            Ok(0) => return self.drop_client(token),
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return
            }
            Err(_) => return self.drop_client(token),
        }
        match host::parse_connect_line(line) {
            ConnectLine::Partial => {}
            ConnectLine::Invalid => {
                self.counters
                    .clients_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("vsock: a host client sent no valid CONNECT line");
                self.drop_client(token);
            }
            ConnectLine::Connect { port, used } => {
                let Some((stream, line)) = self.clients.remove(&token) else {
                    return;
                };
                let key = (self.ephemeral_port(), port);
                let mut conn = Connection::connecting(stream, token, &line[used..]);
                conn.interest = Some(EventSet::IN.bits());
                self.owners.insert(token, Owner::Conn(key));
                self.conns.insert(key, conn);
                self.connecting
                    .push_back((Instant::now() + CONNECT_TIMEOUT, key, token));
                self.arm_timer();
                self.queue(key, Op::Request, 0);
                self.service(key);
            }
        }
    }

    /// Arms the timer for the earliest deadline (if any).
    fn arm_timer(&mut self) {
        let first = [
            self.connecting.front().map(|c| c.0),
            self.greeting.front().map(|g| g.0),
        ];
        let Some(deadline) = first.into_iter().flatten().min() else {
            return;
        };
        let after = deadline.saturating_duration_since(Instant::now());
        // A zero duration would disarm it.
        if let Err(e) = self.timer.reset(after.max(Duration::from_millis(1)), None) {
            tracing::warn!("vsock: cannot arm the connection timer: {e}");
        }
    }

    /// Closes the host clients that did not send their CONNECT line in time, and the
    /// host-initiated connections the guest has not answered in time (the client's socket
    /// closes; the guest gets a RST in case its answer is on the way).
    fn expire_deadlines(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        while let Some(&(deadline, token)) = self.greeting.front() {
            if deadline > now {
                break;
            }
            self.greeting.pop_front();
            if self.clients.contains_key(&token) {
                self.counters
                    .clients_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("vsock: a host client sent no CONNECT line in time");
                self.drop_client(token);
            }
        }
        while let Some(&(deadline, key, token)) = self.connecting.front() {
            if deadline > now {
                break;
            }
            self.connecting.pop_front();
            let waiting = self
                .conns
                .get(&key)
                .is_some_and(|c| c.token == token && c.state == State::Connecting);
            if waiting {
                self.counters
                    .connect_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("vsock: the guest did not answer connection {key:?} in time");
                self.close(key, true);
            }
        }
        self.arm_timer();
    }

    /// The host port the next host-initiated connection gets (if free), for a snapshot.
    pub(crate) fn next_host_port(&self) -> u32 {
        self.next_port
    }

    /// Continues handing out host ports from `port` (clamped to the ephemeral range).
    pub(crate) fn set_next_host_port(&mut self, port: u32) {
        self.next_port = port.clamp(EPHEMERAL_BASE, u32::MAX - 1);
    }

    /// A host port no connection uses.
    fn ephemeral_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            // u32::MAX is VMADDR_PORT_ANY.
            self.next_port = if p >= u32::MAX - 1 {
                EPHEMERAL_BASE
            } else {
                p + 1
            };
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }
}
