//! virtio-net (virtio 1.2, 5.1) on a tap interface: one receive and one transmit queue, the
//! guest's MAC address, and checksum and TCP segmentation offloads in both directions, so
//! frames of up to 64 KiB cross the tap instead of 1500-byte ones.
//!
//! Frames keep their `virtio_net_hdr_v1` across the tap (`IFF_VNET_HDR`), so the device copies
//! nothing itself: transmit is one `writev` from the guest's buffers, receive one `readv` into
//! them. The tap sits in an epoll set of the device's own, edge-triggered, whose descriptor the
//! VMM's event loop watches: the device reads the tap until it is empty or the guest has no
//! receive buffers left, and reads again when the guest adds some.

pub mod seqpacket;
pub mod tap;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Permissions;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::state::{decode, encode};
use crate::{
    device_type, features, guest_iovecs, ActivateError, Activation, ActiveQueue, QueuePosition,
    StateError, VirtioDevice,
};
pub use seqpacket::SeqPacket;
pub use tap::{Tap, TapError};
pub use tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};

/// Where the device's frames come from and go to: a [`Tap`], or in tests a [`SeqPacket`]
/// socket. Each read or write moves exactly one frame, `virtio_net_hdr_v1` first; the
/// descriptor is non-blocking and the device watches it edge-triggered for input.
pub trait FrameIo: AsRawFd + Send {
    /// Reads one frame into `iovs`; returns its length, which may exceed the room in `iovs`
    /// (the rest of the frame is then lost). WouldBlock when there is none.
    ///
    /// # Safety
    /// Every iovec must describe writable memory that stays valid during the call.
    unsafe fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize>;
    /// Sends one frame gathered from `iovs`.
    ///
    /// # Safety
    /// Every iovec must describe readable memory that stays valid during the call.
    unsafe fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize>;
    /// Which offloaded frames (`TUN_F_*`) the guest accepts.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
    /// For messages.
    fn name(&self) -> &str;
}

impl FrameIo for Tap {
    unsafe fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { Tap::readv(self, iovs) }
    }

    unsafe fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { Tap::writev(self, iovs) }
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }

    fn name(&self) -> &str {
        Tap::name(self)
    }
}

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Largest frame the guest may send: a 64 KiB TSO frame with its Ethernet header, plus the
/// virtio-net header.
pub const MAX_TX_LEN: usize = 65_562 + VNET_HDR_LEN;
/// Largest frame the tap may hand the guest, likewise.
pub const MAX_RX_FRAME: usize = MAX_TX_LEN;
/// Configuration space: MAC, status, max_virtqueue_pairs, MTU.
const CONFIG_LEN: usize = 12;
/// `status`: the link is up.
const LINK_UP: u16 = 1;

#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Frames the guest sent that were malformed (no room for the header, too large) or the
    /// tap refused.
    pub tx_dropped: AtomicU64,
    /// Receive buffers returned unused because the guest made them unusable (shorter than the
    /// header, outside guest memory, or in more pieces than one read takes).
    pub rx_dropped: AtomicU64,
}

/// An interface's state for a snapshot. The negotiated features (with them the tap's
/// offloads and mergeable buffers) are the transport's and come back at activation; frames
/// in the tap stay with the old process.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NetState {
    mac: [u8; 6],
}

pub struct Net {
    tap: Box<dyn FrameIo>,
    epoll: Epoll,
    config: [u8; CONFIG_LEN],
    offered: u64,
    queues: Option<[ActiveQueue; 2]>,
    /// The driver took VIRTIO_NET_F_MRG_RXBUF.
    mergeable: bool,
    iovs: Vec<libc::iovec>,
    /// The receive chains gathered for one frame: head and room.
    chains: Vec<(u16, usize)>,
    counters: Arc<NetCounters>,
}

// SAFETY: `iovs` is scratch space rebuilt for every frame; the raw pointers it holds between
// uses are never dereferenced, so moving the device to another thread is sound.
unsafe impl Send for Net {}

impl Net {
    /// A network interface on the tap `tap` with address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> io::Result<Net> {
        Net::with_io(Box::new(tap), mac)
    }

    /// A network interface whose frames go through `tap` (a [`Tap`], or a [`SeqPacket`] in
    /// tests), with address `mac`.
    pub fn with_io(tap: Box<dyn FrameIo>, mac: [u8; 6]) -> io::Result<Net> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            tap.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
        )?;
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&1500u16.to_le_bytes());
        let offered = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_MRG_RXBUF;
        Ok(Net {
            tap,
            epoll,
            config,
            offered,
            queues: None,
            mergeable: false,
            iovs: Vec::with_capacity(64),
            chains: Vec::with_capacity(64),
            counters: Arc::default(),
        })
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self) {
        let Net {
            tap,
            queues,
            iovs,
            counters,
            ..
        } = self;
        let Some([_, tx]) = queues.as_mut() else {
            return;
        };
        tx.serve(|mem, chain| {
            iovs.clear();
            let bufs = chain
                .filter(|d| !d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize));
            let ok = guest_iovecs(mem, bufs, Permissions::Read, iovs).is_ok();
            let len: usize = iovs.iter().map(|v| v.iov_len).sum();
            if !ok || !(VNET_HDR_LEN..=MAX_TX_LEN).contains(&len) {
                counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            // SAFETY: the iovecs point into guest memory checked by `guest_iovecs`, which
            // `mem` keeps mapped during the call.
            match unsafe { tap.writev(iovs) } {
                Ok(_) => counters.tx_frames.fetch_add(1, Ordering::Relaxed),
                // A full tap queue drops the frame, as a NIC with a full ring would.
                Err(_) => counters.tx_dropped.fetch_add(1, Ordering::Relaxed),
            };
            0
        });
    }

    /// Moves frames from the tap into the guest's receive buffers until the tap is empty or
    /// the guest has too few buffers left (it notifies the receive queue when it adds some).
    /// Without mergeable buffers each frame takes one buffer chain (Linux then posts chains of
    /// 64 KiB and more); with them a frame spreads over as many chains as it needs, and the
    /// device first gathers enough for the largest frame, since it learns a frame's size only
    /// by reading it.
    fn receive(&mut self) {
        let Net {
            tap,
            queues,
            iovs,
            counters,
            mergeable,
            chains,
            ..
        } = self;
        let Some([rx, _]) = queues.as_mut() else {
            return;
        };
        let want = if *mergeable { MAX_RX_FRAME } else { 1 };
        let mut delivered = false;
        let mut popped = 0;
        loop {
            iovs.clear();
            chains.clear();
            let mut room = 0;
            while room < want {
                let Some(chain) = rx.queue.pop_descriptor_chain(&rx.mem) else {
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                let start = iovs.len();
                let bufs = chain
                    .filter(|d| d.is_write_only())
                    .map(|d| (d.addr(), d.len() as usize));
                let ok = guest_iovecs(&rx.mem, bufs, Permissions::Write, iovs).is_ok();
                let len: usize = iovs[start..].iter().map(|v| v.iov_len).sum();
                if !ok || len < VNET_HDR_LEN {
                    iovs.truncate(start);
                    if !chains.is_empty() {
                        // Returned empty once the chains before it are settled.
                        rx.queue.go_to_previous_position();
                        break;
                    }
                    // Unusable buffer: return it empty and drop nothing from the tap.
                    counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    let _ = rx.queue.add_used(&rx.mem, head, 0);
                    delivered = true;
                    continue;
                }
                chains.push((head, len));
                room += len;
            }
            if room < want || chains.is_empty() {
                // Too few buffers for a frame: give back what was taken, ask to be told when
                // there are more, and look once more if some arrived meanwhile (only if this
                // pass took nothing, or a driver that never posts enough would spin us).
                // Notifications are enabled before the chains go back: with EVENT_IDX that
                // sets avail_event past them, so the driver's next buffer notifies; after the
                // rewind it would name a slot the driver has already passed, and the driver
                // would never notify again.
                let more = rx.more_after_enable(popped);
                for _ in 0..chains.len() {
                    rx.queue.go_to_previous_position();
                }
                if chains.is_empty() && more {
                    popped = 0;
                    continue;
                }
                break;
            }
            // SAFETY: the iovecs point into guest memory checked writable by `guest_iovecs`,
            // which `rx.mem` keeps mapped during the call.
            match unsafe { tap.readv(iovs) } {
                Ok(n) => {
                    let mut left = n;
                    let mut used = 0;
                    for &(head, len) in chains.iter() {
                        if used > 0 && left == 0 {
                            break;
                        }
                        let take = left.min(len);
                        let _ = rx.queue.add_used(&rx.mem, head, take as u32);
                        left -= take;
                        used += 1;
                    }
                    // The chains the frame did not reach go back for the next one.
                    for _ in used..chains.len() {
                        rx.queue.go_to_previous_position();
                    }
                    write_num_buffers(iovs, used as u16);
                    counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    delivered = true;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The chains make more pieces than one readv takes (IOV_MAX): unusable.
                    // Return them empty so the queue moves on, rather than retrying forever.
                    for &(head, _) in chains.iter() {
                        let _ = rx.queue.add_used(&rx.mem, head, 0);
                    }
                    counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    delivered = true;
                }
                Err(e) => {
                    // Empty (or failing) tap: give the buffers back for the next frame.
                    for _ in 0..chains.len() {
                        rx.queue.go_to_previous_position();
                    }
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!("virtio-net: reading tap {}: {e}", tap.name());
                    }
                    break;
                }
            }
        }
        if delivered && rx.queue.needs_notification(&rx.mem).unwrap_or(true) {
            rx.interrupt.notify_queue(RX as u16);
        }
    }
}

/// Sets `num_buffers` (bytes 10–11 of the header) in the frame just read into `iovs`.
fn write_num_buffers(iovs: &[libc::iovec], n: u16) {
    let bytes = n.to_le_bytes();
    let mut at = 0usize;
    for v in iovs {
        for (i, &b) in bytes.iter().enumerate() {
            let pos = 10 + i;
            if pos >= at && pos < at + v.iov_len {
                // SAFETY: inside a guest buffer that `guest_iovecs` checked writable and that
                // is still mapped (the device holds the memory).
                unsafe { *v.iov_base.cast::<u8>().add(pos - at) = b };
            }
        }
        at += v.iov_len;
        if at >= VNET_HDR_LEN {
            return;
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let f = a.features;
        let mut offload = 0;
        if f & 1 << VIRTIO_NET_F_GUEST_CSUM != 0 {
            offload |= TUN_F_CSUM;
            if f & 1 << VIRTIO_NET_F_GUEST_TSO4 != 0 {
                offload |= TUN_F_TSO4;
            }
            if f & 1 << VIRTIO_NET_F_GUEST_TSO6 != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        self.tap
            .set_offload(offload)
            .map_err(|e| ActivateError::Device(format!("tap offloads: {e}")))?;
        self.mergeable = f & 1 << VIRTIO_NET_F_MRG_RXBUF != 0;
        let mut q = a.into_queues(2)?;
        let tx = q.pop().expect("two queues");
        let rx = q.pop().expect("two queues");
        self.queues = Some([rx, tx]);
        // Frames that arrived before the driver was ready.
        self.receive();
        Ok(())
    }

    fn reset(&mut self) {
        self.queues = None;
        let _ = self.tap.set_offload(0);
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            _ => {}
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn process_backend(&mut self, _index: usize) {
        // Consume the edge, then read the tap dry (or until the guest runs out of buffers).
        let mut events = [EpollEvent::default(); 1];
        let _ = self.epoll.wait(0, &mut events);
        self.receive();
    }

    fn pci_class(&self) -> (u8, u8, u8) {
        // Network controller, Ethernet.
        (0x02, 0x00, 0x00)
    }

    fn queue_positions(&self) -> Vec<Option<QueuePosition>> {
        match &self.queues {
            Some(qs) => qs.iter().map(|q| Some(q.position())).collect(),
            None => vec![None, None],
        }
    }

    fn save_state(&self) -> Result<serde_json::Value, StateError> {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        encode("virtio-net", &NetState { mac })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        let s: NetState = decode("virtio-net", state)?;
        // A clone may get another address. The configuration space shows it, but a driver
        // reads the address once, when it probes: the guest keeps sending from the old one
        // until it is told otherwise (`ip link set address`, or a reboot).
        if s.mac != self.config[..6] {
            tracing::warn!(
                "virtio-net {}: restored with MAC {} instead of {}; the guest keeps using the \
                 old address until it changes it",
                self.tap.name(),
                mac_text(&self.config[..6]),
                mac_text(&s.mac)
            );
        }
        Ok(())
    }
}

fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
