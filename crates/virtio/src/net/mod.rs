//! virtio-net (virtio 1.2, 5.1) on a tap interface: one receive and one transmit queue, the
//! guest's MAC address, and checksum and TCP segmentation offloads in both directions, so
//! frames of up to 64 KiB cross the tap instead of 1500-byte ones.
//!
//! Frames keep their `virtio_net_hdr_v1` across the tap (`IFF_VNET_HDR`), so the device copies
//! nothing itself: transmit is one `writev` from the guest's buffers, receive one `readv` into
//! them. The tap sits in an epoll set of the device's own, edge-triggered, whose descriptor the
//! VMM's event loop watches: the device reads the tap until it is empty or the guest has no
//! receive buffers left, and reads again when the guest adds some.

pub mod tap;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Permissions;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::{
    device_type, features, guest_iovecs, ActivateError, Activation, ActiveQueue, VirtioDevice,
};
pub use tap::{Tap, TapError};
use tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Largest frame the guest may send: a 64 KiB TSO frame with its Ethernet header, plus the
/// virtio-net header.
const MAX_TX_LEN: usize = 65_562 + VNET_HDR_LEN;
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
    /// Frames read from the tap that could not be delivered (receive buffers outside guest
    /// memory).
    pub rx_dropped: AtomicU64,
}

pub struct Net {
    tap: Tap,
    epoll: Epoll,
    config: [u8; CONFIG_LEN],
    offered: u64,
    queues: Option<[ActiveQueue; 2]>,
    iovs: Vec<libc::iovec>,
    counters: Arc<NetCounters>,
}

// SAFETY: `iovs` is scratch space rebuilt for every frame; the raw pointers it holds between
// uses are never dereferenced, so moving the device to another thread is sound.
unsafe impl Send for Net {}

impl Net {
    /// A network interface on the tap `tap` with address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> io::Result<Net> {
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
            | 1 << VIRTIO_NET_F_GUEST_TSO6;
        Ok(Net {
            tap,
            epoll,
            config,
            offered,
            queues: None,
            iovs: Vec::with_capacity(64),
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
    /// the guest has no buffers left (it notifies the receive queue when it adds some).
    fn receive(&mut self) {
        let Net {
            tap,
            queues,
            iovs,
            counters,
            ..
        } = self;
        let Some([rx, _]) = queues.as_mut() else {
            return;
        };
        let mut delivered = false;
        let mut popped = 0;
        loop {
            let Some(chain) = rx.queue.pop_descriptor_chain(&rx.mem) else {
                // Out of buffers: ask to be told when there are more, and look once more in
                // case some arrived meanwhile.
                if rx.more_after_enable(popped) {
                    popped = 0;
                    continue;
                }
                break;
            };
            popped += 1;
            let head = chain.head_index();
            iovs.clear();
            let bufs = chain
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize));
            let ok = guest_iovecs(&rx.mem, bufs, Permissions::Write, iovs).is_ok();
            let room: usize = iovs.iter().map(|v| v.iov_len).sum();
            if !ok || room < VNET_HDR_LEN {
                // Unusable buffer: return it empty and drop nothing from the tap.
                counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                let _ = rx.queue.add_used(&rx.mem, head, 0);
                delivered = true;
                continue;
            }
            // SAFETY: the iovecs point into guest memory checked writable by `guest_iovecs`,
            // which `rx.mem` keeps mapped during the call.
            match unsafe { tap.readv(iovs) } {
                Ok(n) => {
                    // num_buffers (the last header field) is 1: no merged buffers.
                    let hdr_end = write_num_buffers(iovs);
                    if !hdr_end {
                        counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    let _ = rx.queue.add_used(&rx.mem, head, n as u32);
                    delivered = true;
                }
                Err(e) => {
                    // Empty (or failing) tap: give the buffer back for the next frame.
                    rx.queue.go_to_previous_position();
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

/// Sets `num_buffers` (bytes 10–11 of the header) to 1 in the frame just read into `iovs`.
fn write_num_buffers(iovs: &[libc::iovec]) -> bool {
    let one = 1u16.to_le_bytes();
    let mut at = 0usize;
    for v in iovs {
        for (i, &b) in one.iter().enumerate() {
            let pos = 10 + i;
            if pos >= at && pos < at + v.iov_len {
                // SAFETY: inside a guest buffer that `guest_iovecs` checked writable and that
                // is still mapped (the device holds the memory).
                unsafe { *v.iov_base.cast::<u8>().add(pos - at) = b };
            }
        }
        at += v.iov_len;
        if at >= VNET_HDR_LEN {
            return true;
        }
    }
    false
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
}
