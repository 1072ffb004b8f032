//! virtio-blk (virtio 1.2, 5.2) on a raw image file: reads, writes, flush (fdatasync),
//! discard and write-zeroes (hole punching), a serial string (GET_ID), read-only disks.
//!
//! Requests are served synchronously on the VMM's event loop, in the order the driver made
//! them available; each completes before the next starts, so a flush covers every write
//! completed before it. On the emulator the notifying vCPU serves them first, as long as the
//! host can do each without waiting (a read the page cache holds): the first that would wait,
//! and everything after it, goes to the event loop, so the order stays the same. Malformed requests are counted and answered (or, without a status
//! byte, returned untouched); nothing the guest writes reaches outside guest memory or the
//! image.

pub mod disk;
pub mod request;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hypervisor::GuestMemoryMmap;
use virtio_bindings::virtio_blk::*;
use vm_memory::Bytes;

use crate::state::{decode, encode, same};
use crate::{
    device_type, features, ActivateError, Activation, ActiveQueue, QueuePosition, StateError,
    VirtioDevice,
};
pub use disk::{Disk, DiskError, Wait};
use request::{Request, RequestType, SECTOR_SIZE};

/// Descriptors per queue.
const QUEUE_SIZE: u16 = 256;
/// Largest discard / write-zeroes request, in sectors, and ranges per request.
const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;
const MAX_DISCARD_RANGES: u32 = 1;
/// Length of the configuration space served (through `write_zeroes_may_unmap` and padding).
const CONFIG_LEN: usize = 60;

/// What happened to the requests of one disk.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub requests: AtomicU64,
    /// Chains that are not valid requests (bad layout, addresses outside guest memory).
    pub invalid: AtomicU64,
    /// Requests that failed: out of range, a write to a read-only disk, host I/O errors.
    pub failed: AtomicU64,
}

/// A disk's state for a snapshot: only what the guest has already seen of the
/// configuration, which the disk it is restored into must match (requests are served one at
/// a time on the event loop, so none is in flight at a snapshot).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockState {
    capacity_sectors: u64,
    read_only: bool,
    /// What GET_ID returns, zero-padded.
    serial: Vec<u8>,
}

pub struct Block {
    disk: Disk,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: [u8; CONFIG_LEN],
    offered: u64,
    active: Option<ActiveQueue>,
    counters: Arc<BlockCounters>,
}

impl Block {
    /// A disk backed by the image at `path`; `serial` is what GET_ID returns (at most 20
    /// bytes are used; the default is the image's file name).
    pub fn new(path: &Path, read_only: bool, serial: Option<&str>) -> Result<Block, DiskError> {
        let disk = Disk::open(path, read_only)?;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = serial.map(str::to_owned).unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);

        let mut offered = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if read_only {
            offered |= 1 << VIRTIO_BLK_F_RO;
        } else {
            offered |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &disk.sectors().to_le_bytes()); // capacity
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_RANGES.to_le_bytes()); // max_discard_seg
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_RANGES.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        Ok(Block {
            disk,
            id,
            config,
            offered,
            active: None,
            counters: Arc::default(),
        })
    }

    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Serves the available requests in order; with [`Wait::No`] only as long as each can be
    /// done without waiting. Returns whether none is left.
    fn process(&mut self, wait: Wait) -> bool {
        let Block {
            disk,
            id,
            active,
            counters,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return true;
        };
        a.serve_while(|mem, chain| {
            let descs = chain.map(|d| (d.addr(), d.len(), d.is_write_only()));
            serve(disk, id, mem, descs, counters, wait)
        })
        .1
    }
}

/// Serves one request; returns the number of bytes written into the chain (data + status),
/// or None if it would have to wait and `wait` is [`Wait::No`] (nothing is answered then).
fn serve(
    disk: &Disk,
    id: &[u8],
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = (vm_memory::GuestAddress, u32, bool)>,
    counters: &BlockCounters,
    wait: Wait,
) -> Option<u32> {
    let req = match request::parse(mem, descs) {
        Ok(r) => r,
        Err(e) => {
            counters.requests.fetch_add(1, Ordering::Relaxed);
            counters.invalid.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("virtio-blk: invalid request: {e}");
            return Some(0);
        }
    };
    let (status, written) = execute(disk, id, mem, &req, wait)?;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    if status != VIRTIO_BLK_S_OK {
        counters.failed.fetch_add(1, Ordering::Relaxed);
    }
    if mem.write_obj(status as u8, req.status).is_err() {
        counters.invalid.fetch_add(1, Ordering::Relaxed);
        return Some(0);
    }
    Some(written.saturating_add(1))
}

/// Carries out `req`; returns the status and the data bytes written to the guest, or None if
/// it would have to wait and `wait` is [`Wait::No`].
fn execute(
    disk: &Disk,
    id: &[u8],
    mem: &GuestMemoryMmap,
    req: &Request,
    wait: Wait,
) -> Option<(u32, u32)> {
    let len = req.data_len();
    let offset = req.sector.wrapping_mul(SECTOR_SIZE);
    // The status of an I/O; None if it would have waited.
    let io = |r: std::io::Result<()>| match r {
        Ok(()) => Some(VIRTIO_BLK_S_OK),
        Err(e) if wait == Wait::No && e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => {
            tracing::warn!("virtio-blk: I/O error: {e}");
            Some(VIRTIO_BLK_S_IOERR)
        }
    };
    // Flushing and deallocating always wait for the file system.
    let waits = matches!(
        req.kind,
        RequestType::Flush | RequestType::Discard | RequestType::WriteZeroes
    );
    if waits && wait == Wait::No {
        return None;
    }
    Some(match req.kind {
        RequestType::In | RequestType::Out => {
            if !len.is_multiple_of(SECTOR_SIZE) || !disk.in_range(req.sector, len) {
                return Some((VIRTIO_BLK_S_IOERR, 0));
            }
            if req.kind == RequestType::In {
                let s = io(disk.read(mem, offset, &req.data, wait))?;
                (s, if s == VIRTIO_BLK_S_OK { len as u32 } else { 0 })
            } else if disk.read_only() {
                (VIRTIO_BLK_S_IOERR, 0)
            } else {
                (io(disk.write(mem, offset, &req.data, wait))?, 0)
            }
        }
        RequestType::Flush => (io(disk.flush())?, 0),
        RequestType::GetId => get_id(id, mem, req),
        RequestType::Discard | RequestType::WriteZeroes => deallocate(disk, mem, req),
        RequestType::Unsupported(_) => (VIRTIO_BLK_S_UNSUPP, 0),
    })
}

/// Writes the serial string into the request's buffers.
fn get_id(id: &[u8], mem: &GuestMemoryMmap, req: &Request) -> (u32, u32) {
    let mut left = id;
    let mut written = 0u32;
    for seg in &req.data {
        let n = left.len().min(seg.len as usize);
        if mem.write_slice(&left[..n], seg.addr).is_err() {
            return (VIRTIO_BLK_S_IOERR, written);
        }
        written += n as u32;
        left = &left[n..];
    }
    (VIRTIO_BLK_S_OK, written)
}

/// Discards or writes zeroes over the ranges a request lists.
fn deallocate(disk: &Disk, mem: &GuestMemoryMmap, req: &Request) -> (u32, u32) {
    if disk.read_only() {
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    let Some(ranges) = request::ranges(mem, &req.data, MAX_DISCARD_RANGES as usize) else {
        return (VIRTIO_BLK_S_UNSUPP, 0);
    };
    for r in ranges {
        // Unknown flags, and "unmap" on a discard, are not for this device to guess
        // (virtio 1.2, 5.2.6.2).
        let allowed = if req.kind == RequestType::Discard {
            0
        } else {
            request::RANGE_UNMAP
        };
        if r.flags & !allowed != 0 {
            return (VIRTIO_BLK_S_UNSUPP, 0);
        }
        let bytes = u64::from(r.sectors) * SECTOR_SIZE;
        if r.sectors > MAX_DISCARD_SECTORS || !disk.in_range(r.sector, bytes) {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let at = r.sector * SECTOR_SIZE;
        let r = if req.kind == RequestType::Discard {
            // Advisory: a file system that cannot punch holes just keeps the data.
            match disk.discard(at, bytes) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                r => r,
            }
        } else {
            disk.write_zeroes(at, bytes, r.flags & request::RANGE_UNMAP != 0)
        };
        if let Err(e) = r {
            tracing::warn!("virtio-blk: I/O error: {e}");
            return (VIRTIO_BLK_S_IOERR, 0);
        }
    }
    (VIRTIO_BLK_S_OK, 0)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.active = Some(a.into_single_queue()?);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, index: usize) {
        if index == 0 {
            self.process(Wait::Yes);
        }
    }

    fn process_queue_now(&mut self, index: usize) -> bool {
        index != 0 || self.process(Wait::No)
    }

    fn pci_class(&self) -> (u8, u8, u8) {
        // Mass storage controller, "other".
        (0x01, 0x80, 0x00)
    }

    fn queue_positions(&self) -> Vec<Option<QueuePosition>> {
        vec![self.active.as_ref().map(ActiveQueue::position)]
    }

    fn save_state(&self) -> Result<serde_json::Value, StateError> {
        encode(
            "virtio-blk",
            &BlockState {
                capacity_sectors: self.disk.sectors(),
                read_only: self.disk.read_only(),
                serial: self.id.to_vec(),
            },
        )
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        let s: BlockState = decode("virtio-blk", state)?;
        same(
            "disk capacity in sectors",
            s.capacity_sectors,
            self.disk.sectors(),
        )?;
        same("read-only setting", s.read_only, self.disk.read_only())?;
        if s.serial != self.id {
            let serial = |b: &[u8]| String::from_utf8_lossy(b).trim_end_matches('\0').to_owned();
            return Err(StateError::Mismatch {
                what: "disk serial",
                saved: format!("{:?}", serial(&s.serial)),
                here: format!("{:?}", serial(&self.id)),
            });
        }
        Ok(())
    }
}
