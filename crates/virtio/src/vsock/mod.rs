//! virtio-vsock (virtio 1.2, 5.10): stream sockets between the guest and host programs,
//! with the host side on unix sockets as Firecracker has it.
//!
//! - Host to guest: a host program connects to the unix socket `uds` and writes
//!   `CONNECT <port>\n`; once the guest accepts on `port` it reads `OK <host port>\n` and
//!   the connection carries bytes both ways. If nobody listens in the guest it is closed.
//! - Guest to host: a guest connection to CID 2 (the host), port P, is connected to the unix
//!   socket `<uds>_P`; if nothing listens there the guest's connect fails.
//!
//! Queues: receive (0; device to driver), transmit (1), event (2; used once after a
//! snapshot is restored, see below). Stream sockets only. Everything runs on the VMM's event loop:
//! transmit-queue notifications, receive buffers the driver posts, and the host sockets
//! (through [`Muxer`]'s epoll descriptor, the device's one back-end descriptor). The
//! connection state machine and credit handling are described in [`muxer`] and
//! [`connection`]; packet parsing, where all guest input is checked, in [`packet`].
//!
//! Snapshots: connections are host sockets of the process that saved them and cannot follow
//! the guest into a new one. After a restore the device sends the driver a
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue (as Firecracker does): the guest
//! resets its connections and reads its CID again, which is the one the restored device was
//! configured with (a clone's may differ). Listening sockets in the guest survive.

pub mod connection;
pub mod host;
pub mod muxer;
pub mod packet;

use std::io;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hypervisor::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use crate::state::{decode, encode};
use crate::{
    device_type, features, ActivateError, Activation, QueuePosition, StateError, VirtioDevice,
    VirtioInterrupt,
};
use muxer::Muxer;
use packet::RxBuffer;

/// Descriptors per queue.
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `virtio_vsock_event.id`: the transport was reset; drop every connection, read the CID
/// again (virtio 1.2, 5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Length of a `virtio_vsock_event`.
const EVENT_LEN: u32 = 4;
/// Smallest CID a guest can have (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;
/// Largest: Linux keeps CIDs in 32 bits and `u32::MAX` means "any".
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Why the device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("the directory of vsock socket {0} does not exist")]
    NoDirectory(PathBuf),
    #[error(
        "vsock socket {0} is in use (a process listens on it); stop it or choose another path"
    )]
    InUse(PathBuf),
    #[error("vsock socket path {0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the vsock device's epoll descriptor")]
    Epoll(#[source] io::Error),
    #[error("cannot create the vsock device's connection timer")]
    Timer(#[source] io::Error),
}

impl VsockError {
    /// Whether the user can fix it (a path), as opposed to a failure of the host.
    pub fn is_usage_error(&self) -> bool {
        !matches!(self, VsockError::Epoll(_) | VsockError::Timer(_))
    }
}

/// What happened on the device.
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Packets from the guest, and payload bytes they carried.
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Packets to the guest, and their payload bytes.
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Transmit chains with no valid packet (bad layout, addresses outside guest memory,
    /// length over the limit or beyond the buffers).
    pub invalid: AtomicU64,
    /// Receive chains that could not take a packet.
    pub bad_rx_buffers: AtomicU64,
    /// Packets dropped for their addresses (not from this guest, not to the host).
    pub dropped: AtomicU64,
    /// Connections reset or refused with a RST: an unsupported type or op, no such
    /// connection, nothing listening on the host, an error on either side.
    pub resets_sent: AtomicU64,
    /// Packets that broke the protocol of an open connection (credit exceeded, data before
    /// the connection was up or after a shutdown, ...).
    pub protocol_errors: AtomicU64,
    /// Connections established, both directions.
    pub connections: AtomicU64,
    /// Host clients closed without a connection: driver not up, too many, no valid CONNECT
    /// line (or none within [`CONNECT_LINE_TIMEOUT`](muxer::CONNECT_LINE_TIMEOUT)).
    pub clients_refused: AtomicU64,
    /// Host-initiated connections the guest did not answer within
    /// [`CONNECT_TIMEOUT`](muxer::CONNECT_TIMEOUT).
    pub connect_timeouts: AtomicU64,
}

/// The queues the driver set up.
struct Queues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    event: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The device's state for a snapshot: nothing to restore (connections cannot be), the CID
/// for the record.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockState {
    guest_cid: u64,
    /// The next host port the muxer hands out: the guest may still hold sockets on the
    /// ports handed out before the snapshot (they are reset, but a program may not have
    /// closed them yet), so a restored device must not hand those out again at once.
    #[serde(default)]
    next_host_port: Option<u32>,
}

pub struct Vsock {
    config: [u8; 8],
    muxer: Muxer,
    queues: Option<Queues>,
    /// The transmit queue waits for receive buffers (too many answers are queued).
    tx_stalled: bool,
    /// Restored from a snapshot: the driver is owed a transport reset event.
    reset_pending: bool,
    counters: Arc<VsockCounters>,
}

impl Vsock {
    /// A device for the guest with CID `guest_cid` (in `MIN_GUEST_CID..=MAX_GUEST_CID`), its
    /// host side listening on the unix socket `uds`.
    pub fn new(guest_cid: u64, uds: &Path) -> Result<Vsock, VsockError> {
        let counters = Arc::new(VsockCounters::default());
        let muxer = Muxer::new(guest_cid, uds, counters.clone())?;
        Ok(Vsock {
            config: guest_cid.to_le_bytes(),
            muxer,
            queues: None,
            tx_stalled: false,
            reset_pending: false,
            counters,
        })
    }

    /// The guest's CID (what the configuration space shows).
    pub fn guest_cid(&self) -> u64 {
        u64::from_le_bytes(self.config)
    }

    /// Sends the owed transport reset event, if there is an event buffer for it (else the
    /// driver's next event buffer gets it).
    fn send_transport_reset(&mut self) {
        let Some(q) = self.queues.as_mut().filter(|_| self.reset_pending) else {
            return;
        };
        let mut used = false;
        while self.reset_pending {
            let Some(chain) = q.event.pop_descriptor_chain(&q.mem) else {
                let _ = q.event.enable_notification(&q.mem);
                break;
            };
            let head = chain.head_index();
            let room = chain
                .filter(|d| d.is_write_only())
                .find(|d| d.len() >= EVENT_LEN);
            let written = room.is_some_and(|d| {
                q.mem
                    .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                    .is_ok()
            });
            let len = if written { EVENT_LEN } else { 0 };
            if let Err(e) = q.event.add_used(&q.mem, head, len) {
                tracing::warn!("vsock: cannot return descriptor chain {head}: {e:?}");
            }
            used = true;
            if written {
                self.reset_pending = false;
            } else {
                self.counters.bad_rx_buffers.fetch_add(1, Ordering::Relaxed);
            }
        }
        if used && q.event.needs_notification(&q.mem).unwrap_or(true) {
            q.interrupt.notify_queue(EVENT as u16);
        }
    }

    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.muxer.connections()
    }

    /// Serves the transmit queue: every packet the guest sent, unless answers pile up for
    /// lack of receive buffers (then the rest waits until the driver posts some).
    fn process_tx(&mut self) {
        let Some(q) = self.queues.as_mut() else {
            return;
        };
        let mut used = 0usize;
        let mut idle_passes = 0;
        loop {
            let _ = q.tx.disable_notification(&q.mem);
            let mut popped = false;
            while !self.muxer.backlogged() {
                let Some(chain) = q.tx.pop_descriptor_chain(&q.mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let pkt = packet::read_tx(
                    &q.mem,
                    chain.map(|d| (d.addr(), d.len(), d.is_write_only())),
                );
                if let Err(e) = q.tx.add_used(&q.mem, head, 0) {
                    tracing::warn!("vsock: cannot return descriptor chain {head}: {e:?}");
                }
                used += 1;
                match pkt {
                    Ok(p) => {
                        self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .tx_bytes
                            .fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                        self.muxer.guest_packet(&p);
                    }
                    Err(e) => {
                        self.counters.invalid.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("vsock: invalid packet: {e}");
                    }
                }
            }
            self.tx_stalled = self.muxer.backlogged();
            if self.tx_stalled {
                break;
            }
            idle_passes = if popped { 0 } else { idle_passes + 1 };
            // With EVENT_IDX this asks for a notification when more arrives; look again in
            // case some came in between. An available index that pops nothing (a driver that
            // corrupted its ring) is looked at twice, not forever.
            match q.tx.enable_notification(&q.mem) {
                Ok(true) if idle_passes < 2 => continue,
                _ => break,
            }
        }
        if used > 0 && q.tx.needs_notification(&q.mem).unwrap_or(true) {
            q.interrupt.notify_queue(TX as u16);
        }
        self.fill_rx();
    }

    /// Puts waiting packets into the receive buffers the driver posted.
    fn fill_rx(&mut self) {
        let Some(q) = self.queues.as_mut() else {
            return;
        };
        let mut used = 0usize;
        let mut idle_passes = 0;
        loop {
            let mut popped = false;
            while self.muxer.has_pending() {
                let Some(chain) = q.rx.pop_descriptor_chain(&q.mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let written = match RxBuffer::new(
                    &q.mem,
                    chain.map(|d| (d.addr(), d.len(), d.is_write_only())),
                ) {
                    Ok(buf) => match self.muxer.emit(&q.mem, &buf) {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => {
                            self.counters.bad_rx_buffers.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!("vsock: unusable receive buffer: {e}");
                            0
                        }
                        None => {
                            // Nothing was left to send after all: keep the buffer.
                            q.rx.go_to_previous_position();
                            break;
                        }
                    },
                    Err(e) => {
                        self.counters.bad_rx_buffers.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("vsock: unusable receive buffer: {e}");
                        0
                    }
                };
                if let Err(e) = q.rx.add_used(&q.mem, head, written) {
                    tracing::warn!("vsock: cannot return descriptor chain {head}: {e:?}");
                }
                used += 1;
            }
            if !self.muxer.has_pending() {
                break;
            }
            // Out of receive buffers with packets waiting: have the driver notify when it
            // posts more, and look again in case it did in between.
            idle_passes = if popped { 0 } else { idle_passes + 1 };
            match q.rx.enable_notification(&q.mem) {
                Ok(true) if idle_passes < 2 => continue,
                _ => break,
            }
        }
        if used > 0 && q.rx.needs_notification(&q.mem).unwrap_or(true) {
            q.interrupt.notify_queue(RX as u16);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let got = a.queues.len();
        let mut queues = a.queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount { want: 3, got });
        };
        if got != 3 || !rx.ready() || !tx.ready() {
            return Err(ActivateError::QueueCount { want: 3, got });
        }
        self.queues = Some(Queues {
            mem: a.mem,
            rx,
            tx,
            event,
            interrupt: a.interrupt,
        });
        self.tx_stalled = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.queues = None;
        self.tx_stalled = false;
        self.reset_pending = false;
        self.muxer.reset();
    }

    fn process_queue(&mut self, index: usize) {
        // After a restore the driver hears of the reset before anything else.
        self.send_transport_reset();
        match index {
            RX => {
                self.fill_rx();
                if self.tx_stalled {
                    self.process_tx();
                }
            }
            TX => self.process_tx(),
            // The driver posted event buffers: only a transport reset uses them (above).
            EVENT => {}
            _ => {}
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.muxer.epoll_fd()]
    }

    fn process_backend(&mut self, _index: usize) {
        self.send_transport_reset();
        self.muxer.host_events(self.queues.is_some());
        self.fill_rx();
    }

    fn pci_class(&self) -> (u8, u8, u8) {
        // Communication controller, "other".
        (0x07, 0x80, 0x00)
    }

    fn queue_positions(&self) -> Vec<Option<QueuePosition>> {
        match &self.queues {
            Some(q) => [&q.rx, &q.tx, &q.event]
                .into_iter()
                .map(|q| Some(QueuePosition::of(q)))
                .collect(),
            None => vec![None; 3],
        }
    }

    fn save_state(&self) -> Result<serde_json::Value, StateError> {
        encode(
            "virtio-vsock",
            &VsockState {
                guest_cid: self.guest_cid(),
                next_host_port: Some(self.muxer.next_host_port()),
            },
        )
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        let s: VsockState = decode("virtio-vsock", state)?;
        if s.guest_cid != self.guest_cid() {
            tracing::info!(
                "vsock: guest CID {} (was {}); the guest reads it at the transport reset",
                self.guest_cid(),
                s.guest_cid
            );
        }
        if let Some(port) = s.next_host_port {
            self.muxer.set_next_host_port(port);
        }
        self.reset_pending = true;
        Ok(())
    }
}
