//! Virtio devices and the virtio-pci transport.
//!
//! A device back end implements [`VirtioDevice`]: what it offers (type, features, queue sizes,
//! configuration space) and what it does once the driver has set it up (`activate`, then
//! `process_queue` whenever the driver notifies a queue). The transport ([`pci::VirtioPci`])
//! owns everything the driver programs — feature negotiation, device status, queue addresses,
//! MSI-X — and hands the device its queues at `DRIVER_OK`. Nothing here knows which vCPU back
//! end runs the guest: notifications arrive as `EventFd`s, interrupts leave through
//! [`hypervisor::MsiVector`]s.
//!
//! Snapshots: [`pci::VirtioPci::save_state`] returns a [`pci::VirtioPciState`] holding the
//! transport's registers, each queue's set-up and position, MSI-X, and the device's own state
//! ([`VirtioDevice::save_state`]); [`pci::VirtioPci::restore_state`] puts it back into a
//! function built from the same configuration and restarts the device where it was.

use std::sync::Arc;

use hypervisor::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueT};

pub mod balloon;
pub mod block;
pub mod net;
pub mod pci;
pub mod rng;
pub mod state;
pub mod vsock;

pub use state::{QueuePosition, StateError};

/// Feature bits every device offers (virtio 1.2, section 6).
pub mod features {
    /// Descriptors may point to tables of descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// The used/available event fields suppress notifications and interrupts.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// A virtio 1.x ("modern") device; drivers that do not accept it are refused.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Device types (virtio 1.2, 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
}

/// How a device raises interrupts: implemented by the transport.
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers in the used ring of `queue`.
    fn notify_queue(&self, queue: u16);
    /// The device changed its configuration space.
    fn notify_config(&self);
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {want}")]
    QueueCount { want: usize, got: usize },
    #[error("{0}")]
    Device(String),
}

/// What the driver set up, handed to the device at `DRIVER_OK`.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    /// The queues, in index order; each valid and enabled by the driver (or not, if the driver
    /// left it unused: check `ready()`).
    pub queues: Vec<Queue>,
    /// The features both sides agreed on.
    pub features: u64,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl Activation {
    /// The first `want` queues, each of which the driver must have enabled.
    pub fn into_queues(self, want: usize) -> Result<Vec<ActiveQueue>, ActivateError> {
        let got = self.queues.iter().take(want).filter(|q| q.ready()).count();
        if got < want {
            return Err(ActivateError::QueueCount { want, got });
        }
        let (mem, interrupt) = (self.mem, self.interrupt);
        Ok(self
            .queues
            .into_iter()
            .take(want)
            .enumerate()
            .map(|(i, queue)| ActiveQueue {
                mem: mem.clone(),
                queue,
                index: i as u16,
                interrupt: interrupt.clone(),
            })
            .collect())
    }

    /// For devices with one queue: that queue, which the driver must have enabled.
    pub fn into_single_queue(self) -> Result<ActiveQueue, ActivateError> {
        let mut q = self.into_queues(1)?;
        Ok(q.remove(0))
    }
}

/// Reads `data.len()` bytes at `offset` of a device's configuration space `config`, as the
/// driver sees it: bytes past its end read 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at).copied())
            .unwrap_or(0);
    }
}

/// Host iovecs for guest buffers `(address, length)`, appended to `out`; `access` is what the
/// host will do to guest memory (`Write` when reading into the buffers). Fails if any byte is
/// outside guest memory. The iovecs stay valid while `mem` lives.
pub(crate) fn guest_iovecs(
    mem: &GuestMemoryMmap,
    bufs: impl IntoIterator<Item = (vm_memory::GuestAddress, usize)>,
    access: vm_memory::Permissions,
    out: &mut Vec<libc::iovec>,
) -> std::io::Result<()> {
    use vm_memory::GuestMemory;
    let bad = |e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    for (addr, len) in bufs {
        for slice in mem.get_slices(addr, len, access).map_err(bad)? {
            let slice = slice.map_err(bad)?;
            if access.allow(vm_memory::Permissions::Write) {
                // The device will write here behind vm-memory's back: record it for diff
                // snapshots as vm-memory's own writes are.
                vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, slice.len());
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// A queue the driver set up, with what serving it needs.
pub struct ActiveQueue {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    /// The queue's index, for its interrupt.
    pub index: u16,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl ActiveQueue {
    /// Where the device is in the queue, for a snapshot.
    pub fn position(&self) -> QueuePosition {
        QueuePosition::of(&self.queue)
    }

    /// Hands every available descriptor chain to `serve`, which returns how many bytes it
    /// wrote into the chain, returns each to the driver, and interrupts it if it asked to be.
    /// Returns the number of chains served.
    pub fn serve(
        &mut self,
        mut serve: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) -> usize {
        self.serve_while(|mem, chain| Some(serve(mem, chain))).0
    }

    /// Like [`serve`](Self::serve), but `serve` may decline a chain (None): it stays
    /// available, first in line, for the next pass, and this one stops there. Returns the
    /// chains served and whether the queue was left empty (nothing declined).
    pub fn serve_while(
        &mut self,
        mut serve: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
    ) -> (usize, bool) {
        let mut served = 0;
        let mut declined = false;
        loop {
            // With EVENT_IDX this asks for a notification when more arrives; the queue is
            // checked again after re-enabling, or a chain made available in between would wait
            // for the next notification.
            if self.queue.disable_notification(&self.mem).is_err() {
                break;
            }
            let mut popped = 0;
            while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                let Some(len) = serve(&self.mem, chain) else {
                    // Popping moved past it by one: step back, so the next pass pops it again.
                    let at = self.queue.next_avail().wrapping_sub(1);
                    self.queue.set_next_avail(at);
                    declined = true;
                    break;
                };
                if let Err(e) = self.queue.add_used(&self.mem, head, len) {
                    tracing::warn!("virtio: cannot return descriptor chain {head}: {e:?}");
                }
                popped += 1;
            }
            served += popped;
            // A declined chain is left for the next pass, which re-enables notifications.
            if declined || !self.more_after_enable(popped) {
                break;
            }
        }
        if served > 0 && self.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.notify_queue(self.index);
        }
        (served, !declined)
    }

    /// After popping `popped` chains until none was left: re-enables notifications and says
    /// whether to look again (the driver made more available meanwhile). A hostile driver can
    /// make the available index claim chains the queue refuses to hand out (an index more than
    /// a queue size ahead, a ring at address 0): then nothing was popped and looking again
    /// would spin forever, so the queue stays as it is until the driver notifies again.
    pub fn more_after_enable(&mut self, popped: usize) -> bool {
        matches!(self.queue.enable_notification(&self.mem), Ok(true)) && popped > 0
    }
}

/// A virtio device back end.
///
/// Calls come from vCPU threads (configuration space, activation, reset) and from the VMM's
/// event loop (`process_queue`), each under the lock the device lives behind. Nothing the
/// guest writes may panic it.
pub trait VirtioDevice: Send {
    /// One of [`device_type`].
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (including [`features::VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most of it is read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver finished set-up: start serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device: drop the queues and forget the negotiated features.
    fn reset(&mut self);
    /// The driver notified queue `index` (the event loop calls this when the queue's event
    /// fires). Ignored until the device is active.
    fn process_queue(&mut self, index: usize);
    /// The driver notified queue `index` and the notifying vCPU's thread asks to serve it
    /// at once, which saves the event loop's wake-up and the interrupt's trip back (on the
    /// emulator, where notifications reach the VMM through the vCPU). Serves what the host
    /// can do without waiting and returns true if that was everything; false leaves the rest
    /// to [`process_queue`](VirtioDevice::process_queue) on the event loop. The default
    /// serves nothing here: a device whose work could stall the guest (a disk read from the
    /// host's disk) or that does better beside the vCPU than on it (a network device's
    /// transmissions) keeps the event loop.
    fn process_queue_now(&mut self, _index: usize) -> bool {
        false
    }
    /// Host-side file descriptors of the device's back end (a tap, a listening socket, an
    /// epoll descriptor of its own for a changing set of connections) that the event loop
    /// watches for input; when the `i`-th becomes readable the loop calls
    /// [`process_backend`](VirtioDevice::process_backend)`(i)`. Asked once, before the guest
    /// starts; the descriptors must stay open while the device lives.
    fn backend_fds(&self) -> Vec<std::os::unix::io::RawFd> {
        Vec::new()
    }
    /// Back-end descriptor `index` is readable (level-triggered: consume what is there, or the
    /// loop calls again).
    fn process_backend(&mut self, _index: usize) {}
    /// PCI class code (class, subclass, programming interface) the device is listed under.
    fn pci_class(&self) -> (u8, u8, u8) {
        (0xff, 0, 0)
    }

    /// Snapshot: where the device is in each queue, in index order (`None` for one it does not
    /// serve), so the restored device goes on from there. Asked only of an active device,
    /// between two calls of the event loop. The transport refuses to save an active device
    /// that does not answer for every queue.
    fn queue_positions(&self) -> Vec<Option<QueuePosition>> {
        Vec::new()
    }

    /// Snapshot: the device's own state (the transport keeps the negotiated features, the
    /// queues and the interrupts). Called between two calls of the event loop, active or not.
    fn save_state(&self) -> Result<serde_json::Value, StateError> {
        Err(StateError::Unsupported(state::device_name(
            self.device_type(),
        )))
    }

    /// Puts back what [`save_state`](VirtioDevice::save_state) returned, on a device just built
    /// from a compatible configuration (else an error, with the device unchanged). The
    /// transport then activates the device if the driver had, with its queues at the saved
    /// positions, and later notifies every queue once
    /// ([`pci::VirtioPci::resume_after_restore`]).
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), StateError> {
        let _ = state;
        Err(StateError::Unsupported(state::device_name(
            self.device_type(),
        )))
    }
}
