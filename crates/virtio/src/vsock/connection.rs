//! One stream connection between a guest port and a host unix socket: its state, the bytes
//! buffered in each direction, and the credit (virtio 1.2, 5.10.6.3) that bounds them.
//!
//! Credit: each side advertises `buf_alloc` (its receive buffer for the connection) and
//! `fwd_cnt` (bytes it has taken out of that buffer so far) in every packet it sends. A
//! sender may have at most `buf_alloc - (tx_cnt - fwd_cnt)` bytes in flight. Here:
//! - guest to host: the device advertises [`TO_HOST_BUF`] and counts in `fwd_cnt` the bytes
//!   written to the host socket. Bytes the socket does not take at once wait in `to_host`,
//!   which therefore never holds more than `TO_HOST_BUF` unless the guest ignores the credit
//!   (then the connection is reset).
//! - host to guest: the device reads from the host socket only while the guest has room
//!   (`peer_free`) and `to_guest` is below [`TO_GUEST_BUF`]; it sends at most `peer_free`.
//!
//! Nothing here blocks: the socket is non-blocking and every read or write stops at
//! `WouldBlock`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::packet::shutdown;

/// Receive buffer the device advertises per connection: guest bytes the host socket has not
/// taken yet, at most.
pub const TO_HOST_BUF: u32 = 256 * 1024;
/// Host bytes read ahead per connection, waiting for receive buffers and credit, at most.
pub const TO_GUEST_BUF: usize = 64 * 1024;
/// Forwarded bytes after which the device tells the guest its new `fwd_cnt` unasked.
pub const CREDIT_UPDATE_THRESHOLD: u32 = TO_HOST_BUF / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the REQUEST is out, the guest has not answered.
    Connecting,
    /// Data may flow (until shut down).
    Established,
}

/// Why a connection must be reset.
#[derive(Debug)]
pub enum ConnError {
    /// The guest broke the protocol: data before the connection was up or after it said it
    /// would send no more, or more than its credit allowed.
    Protocol(&'static str),
    /// The host socket failed.
    Host(io::Error),
}

pub struct Connection {
    pub stream: UnixStream,
    /// The socket's token in the device's epoll set.
    pub token: u64,
    pub state: State,
    /// Guest to host: a line for the host client ahead of any guest data (`OK <port>\n`).
    line: Vec<u8>,
    to_host: VecDeque<u8>,
    /// Guest bytes written to the host socket (wrapping), as advertised in `fwd_cnt`.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last sent to the guest.
    pub fwd_cnt_sent: u32,
    /// A CREDIT_UPDATE for this connection waits in the device's queue.
    pub credit_update_queued: bool,
    /// Host to guest: bytes read from the host socket, not yet sent.
    to_guest: VecDeque<u8>,
    /// Payload bytes sent to the guest (wrapping).
    tx_cnt: u32,
    /// The guest's credit, from the last packet it sent on this connection.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// [`shutdown`] flags the guest sent.
    guest_shutdown: u32,
    /// The host socket reached end of file.
    host_eof: bool,
    /// The guest was told the host sends no more.
    shutdown_sent: bool,
    /// The host socket's write side is shut down.
    host_write_closed: bool,
    /// The connection is in the device's list of connections with data for the guest.
    pub in_ready: bool,
    /// Events the socket is registered for in the device's epoll set, if it is registered.
    pub interest: Option<u32>,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, state: State) -> Connection {
        Connection {
            stream,
            token,
            state,
            line: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            credit_update_queued: false,
            to_guest: VecDeque::new(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            guest_shutdown: 0,
            host_eof: false,
            shutdown_sent: false,
            host_write_closed: false,
            in_ready: false,
            interest: None,
        }
    }

    /// A host-initiated connection waiting for the guest's answer; `early` is what the host
    /// client sent after its CONNECT line (sent to the guest once the connection is up).
    pub fn connecting(stream: UnixStream, token: u64, early: &[u8]) -> Connection {
        let mut c = Connection::new(stream, token, State::Connecting);
        c.to_guest.extend(early);
        c
    }

    /// A guest-initiated connection, connected on the host.
    pub fn established(stream: UnixStream, token: u64) -> Connection {
        Connection::new(stream, token, State::Established)
    }

    /// The guest accepted a host-initiated connection: `line` goes to the host client first.
    pub fn accept(&mut self, line: &[u8]) {
        self.state = State::Established;
        self.line.extend_from_slice(line);
    }

    /// Takes in the guest's credit from a packet it sent.
    pub fn set_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can take now: its buffer minus what it has not consumed. A guest that
    /// reports more consumed than was sent only gets nothing.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Payload bytes that can go to the guest now.
    pub fn sendable(&self) -> usize {
        if self.state != State::Established {
            return 0;
        }
        self.to_guest.len().min(self.peer_free() as usize)
    }

    /// The next `n` bytes (at most [`sendable`](Self::sendable)) for the guest; they stay
    /// buffered until [`sent_to_guest`](Self::sent_to_guest).
    pub fn peek_for_guest(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.sendable());
        &self.to_guest.make_contiguous()[..n]
    }

    /// The first `n` buffered bytes went to the guest.
    pub fn sent_to_guest(&mut self, n: usize) {
        let n = n.min(self.to_guest.len());
        self.to_guest.drain(..n);
        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
    }

    /// Payload from the guest, to be written to the host socket.
    pub fn from_guest(&mut self, payload: &[u8]) -> Result<(), ConnError> {
        if self.state != State::Established {
            return Err(ConnError::Protocol("data before the connection is up"));
        }
        if self.guest_shutdown & shutdown::SEND != 0 {
            return Err(ConnError::Protocol("data after a send shutdown"));
        }
        if self.to_host.len() + payload.len() > TO_HOST_BUF as usize {
            return Err(ConnError::Protocol("data beyond the credit given"));
        }
        self.to_host.extend(payload);
        Ok(())
    }

    /// The guest shut down one or both directions (flags only ever add up).
    pub fn guest_shutdown(&mut self, flags: u32) {
        let new = flags & shutdown::BOTH & !self.guest_shutdown;
        self.guest_shutdown |= new;
        if new & shutdown::RCV != 0 {
            // Nothing more goes to the guest: forget what was read ahead, and let the host
            // side see that nobody reads.
            self.to_guest.clear();
            let _ = self.stream.shutdown(Shutdown::Read);
        }
    }

    /// Whether to read from the host socket now.
    pub fn wants_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.guest_shutdown & shutdown::RCV == 0
            && self.read_room() > 0
    }

    /// How much may be read from the host socket now.
    fn read_room(&self) -> usize {
        let buffer_room = TO_GUEST_BUF.saturating_sub(self.to_guest.len());
        let credit_room = (self.peer_free() as usize).saturating_sub(self.to_guest.len());
        buffer_room.min(credit_room)
    }

    /// Whether there are bytes for the host socket.
    pub fn wants_write(&self) -> bool {
        !self.line.is_empty() || !self.to_host.is_empty()
    }

    /// Moves what can move between the host socket and the buffers without blocking: writes
    /// pending bytes, shuts the write side once the guest sends no more, and reads while there
    /// is room and credit.
    pub fn pump(&mut self) -> Result<(), ConnError> {
        if self.state != State::Established {
            return Ok(());
        }
        self.write_host().map_err(ConnError::Host)?;
        if self.guest_shutdown & shutdown::SEND != 0
            && !self.wants_write()
            && !self.host_write_closed
        {
            self.host_write_closed = true;
            // The host end may be gone already; a later read or write reports that.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        self.read_host().map_err(ConnError::Host)
    }

    /// Writes what waits for the host socket. A peer that went away gives `EPIPE`: Rust
    /// programs start with SIGPIPE ignored, so the write fails instead of killing the VMM.
    fn write_host(&mut self) -> io::Result<()> {
        while !self.line.is_empty() {
            match self.stream.write(&self.line) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => drop(self.line.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_host(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        while self.wants_read() {
            let n = self.read_room().min(buf.len());
            match self.stream.read(&mut buf[..n]) {
                Ok(0) => self.host_eof = true,
                Ok(n) => self.to_guest.extend(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether to send the guest a CREDIT_UPDATE unasked: enough was forwarded since it last
    /// heard, so that its idea of the free space would soon hold it back.
    pub fn needs_credit_update(&self) -> bool {
        self.state == State::Established
            && self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Whether to tell the guest the host sends no more (everything read has been sent).
    pub fn needs_shutdown(&self) -> bool {
        self.state == State::Established
            && self.host_eof
            && !self.shutdown_sent
            && self.to_guest.is_empty()
            && self.guest_shutdown & shutdown::RCV == 0
    }

    pub fn shutdown_sent(&mut self) {
        self.shutdown_sent = true;
    }

    /// Whether both directions are finished, so the connection can be closed (with a RST to
    /// the guest, as virtio 1.2, 5.10.6.6 has it).
    pub fn finished(&self) -> bool {
        let guest_done = self.guest_shutdown & shutdown::SEND != 0 && !self.wants_write();
        let host_done = self.guest_shutdown & shutdown::RCV != 0
            || (self.host_eof && self.shutdown_sent && self.to_guest.is_empty());
        self.state == State::Established && guest_done && host_done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::established(a, 1), b)
    }

    fn read_all_now(s: &mut UnixStream) -> Vec<u8> {
        s.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    #[test]
    fn host_data_is_read_only_up_to_the_guests_credit() {
        let (mut c, mut host) = pair();
        host.write_all(&[7u8; 1000]).unwrap();
        // No credit yet: nothing is read.
        c.pump().unwrap();
        assert_eq!(c.sendable(), 0);
        assert!(!c.wants_read());
        c.set_peer_credit(300, 0);
        c.pump().unwrap();
        assert_eq!(c.sendable(), 300);
        assert_eq!(c.peek_for_guest(1000).len(), 300);
        c.sent_to_guest(300);
        assert_eq!(c.peer_free(), 0);
        assert!(!c.wants_read());
        // The guest consumed 200 of the 300.
        c.set_peer_credit(300, 200);
        c.pump().unwrap();
        assert_eq!(c.sendable(), 200);
    }

    #[test]
    fn read_ahead_is_bounded() {
        let (mut c, mut host) = pair();
        c.set_peer_credit(u32::MAX, 0);
        let chunk = vec![1u8; 32 * 1024];
        for _ in 0..4 {
            host.write_all(&chunk).unwrap();
        }
        c.pump().unwrap();
        assert_eq!(c.sendable(), TO_GUEST_BUF);
        assert!(!c.wants_read());
    }

    #[test]
    fn a_guest_reporting_more_consumed_than_sent_gets_no_credit() {
        let (mut c, _host) = pair();
        c.set_peer_credit(1000, 50);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn guest_data_beyond_the_credit_is_a_protocol_error() {
        let (mut c, _host) = pair();
        c.from_guest(&vec![0u8; TO_HOST_BUF as usize]).unwrap();
        assert!(matches!(c.from_guest(&[0]), Err(ConnError::Protocol(_))));
    }

    #[test]
    fn guest_data_reaches_the_host_after_the_line_and_is_counted() {
        let (a, mut host) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::connecting(a, 1, b"early");
        assert!(matches!(c.from_guest(b"x"), Err(ConnError::Protocol(_))));
        c.accept(b"OK 9\n");
        c.from_guest(b"hello").unwrap();
        c.pump().unwrap();
        assert_eq!(read_all_now(&mut host), b"OK 9\nhello");
        assert_eq!(c.fwd_cnt, 5);
        c.set_peer_credit(100, 0);
        assert_eq!(c.peek_for_guest(100), b"early");
    }

    #[test]
    fn shutdowns_both_ways_finish_the_connection() {
        let (mut c, mut host) = pair();
        c.set_peer_credit(1000, 0);
        c.from_guest(b"bye").unwrap();
        c.guest_shutdown(shutdown::SEND);
        assert!(matches!(c.from_guest(b"x"), Err(ConnError::Protocol(_))));
        c.pump().unwrap();
        // The host sees the data, then end of file.
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
        assert!(!c.finished());
        host.write_all(b"reply").unwrap();
        drop(host);
        c.pump().unwrap();
        assert!(!c.needs_shutdown(), "data first");
        let n = c.peek_for_guest(100).len();
        c.sent_to_guest(n);
        assert!(c.needs_shutdown());
        c.shutdown_sent();
        assert!(c.finished());
    }

    #[test]
    fn a_receive_shutdown_drops_read_ahead_data() {
        let (mut c, mut host) = pair();
        c.set_peer_credit(1000, 0);
        host.write_all(b"unwanted").unwrap();
        c.pump().unwrap();
        c.guest_shutdown(shutdown::RCV);
        assert_eq!(c.sendable(), 0);
        assert!(!c.wants_read());
        c.guest_shutdown(shutdown::SEND);
        c.pump().unwrap();
        assert!(c.finished());
    }

    #[test]
    fn credit_updates_follow_forwarded_bytes() {
        let (mut c, mut host) = pair();
        let chunk = vec![0u8; CREDIT_UPDATE_THRESHOLD as usize];
        c.from_guest(&chunk).unwrap();
        c.pump().unwrap();
        let got = read_all_now(&mut host);
        assert_eq!(got.len(), chunk.len(), "the socket buffer took it all");
        assert!(c.needs_credit_update());
        c.fwd_cnt_sent = c.fwd_cnt;
        assert!(!c.needs_credit_update());
    }
}
