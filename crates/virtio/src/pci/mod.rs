//! The virtio-pci transport (virtio 1.2, 4.1): a modern-only PCI function whose capabilities
//! point into one 32-bit memory BAR holding the common configuration, the ISR byte, the
//! device configuration, one notification address per queue and the MSI-X table and PBA.
//!
//! Queue notifications: each queue has an `EventFd`, registered with the hypervisor at its
//! notification address (KVM ioeventfd, or the emulator's equivalent), so the guest's write
//! never reaches this code; the VMM's event loop waits on the `EventFd`s
//! ([`VirtioPci::queue_events`]). A write that does arrive here (no registration) signals the
//! same `EventFd`. Interrupts: MSI-X only (no INTx pin), through [`hypervisor::MsiVector`]s.
//!
//! Snapshots ([`VirtioPci::save_state`], [`VirtioPci::restore_state`],
//! [`VirtioPci::resume_after_restore`]): the configuration space, BAR placement included, is
//! saved and restored with the PCI root bus ([`devices::pci::PciRoot::save_state`]), which
//! also maps the BAR again and so registers the queue notifications; everything else the
//! driver programmed is here.

mod common;
mod msix;

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use devices::pci::{BarKind, PciConfiguration, PciDevice, PciError, PciIds};
use hypervisor::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::state::{device_name, same};
use crate::{
    features, status, Activation, QueuePosition, StateError, VirtioDevice, VirtioInterrupt,
};
use common::{CommonConfig, QueueSetup, StatusChange, COMMON_CFG_LEN, NO_VECTOR};
use msix::Msix;
pub use msix::MsixState;

/// Red Hat's (Qumranet's) vendor ID, which virtio devices use; modern device IDs are
/// 0x1040 + the virtio device type.
const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_MODERN_DEVICE_BASE: u16 = 0x1040;
/// Revision 1: a modern device (no legacy interface).
const VIRTIO_PCI_REVISION: u8 = 1;

/// BAR 0's layout. Each region sits on its own page so that a guest mapping one gets none of
/// the others.
const BAR: usize = 0;
const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 1;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Queue `i` is notified at `NOTIFY_OFFSET + i * NOTIFY_MULTIPLIER`.
const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_LEN: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Enough vectors for one per queue and one for configuration changes, up to this many.
const MAX_VECTORS: usize = 64;

/// PCI capability IDs.
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
/// `cfg_type` of the virtio vendor capabilities.
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// The body (after ID and next pointer) of a `virtio_pci_cap`: length, type, BAR, id,
/// padding, offset, length; plus the notify multiplier for the notification capability.
fn virtio_cap(cfg_type: u8, offset: u64, len: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut b = vec![cap_len, cfg_type, BAR as u8, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

/// Why a virtio-pci function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("device has {0} queues; at most {max} are supported", max = MAX_VECTORS - 1)]
    TooManyQueues(usize),
    #[error("PCI configuration")]
    Pci(#[from] PciError),
    #[error("cannot create an MSI vector")]
    Msi(#[source] hypervisor::HypervisorError),
    #[error("cannot create a queue event")]
    Event(#[source] std::io::Error),
}

/// One queue of a [`VirtioPciState`]: what the driver programmed, and where the device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// The device's limit (checked on restore, not restored).
    pub max_size: u16,
    pub size: u16,
    /// The driver enabled the queue (`queue_enable`).
    pub ready: bool,
    pub msix_vector: u16,
    pub desc_table_addr: u64,
    pub avail_ring_addr: u64,
    pub used_ring_addr: u64,
    /// Where the device is in the rings; 0 for a queue the device does not serve (it never
    /// moved) and for every queue of a device that is not running.
    pub next_avail: u16,
    pub next_used: u16,
}

/// A virtio-pci function as saved for a snapshot, except for its configuration space (saved
/// with the PCI root bus).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    /// One of [`crate::device_type`].
    pub device_type: u32,
    /// What the device offered (for messages; a restore checks the negotiated features
    /// against what the new device offers).
    pub device_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    /// Device status; with `DRIVER_OK` (and not `DEVICE_NEEDS_RESET`) the device was running.
    pub status: u8,
    pub config_generation: u8,
    pub config_msix_vector: u16,
    pub queue_select: u16,
    pub queues: Vec<QueueState>,
    pub msix: MsixState,
    /// The interrupt status byte (bit 0: used buffers, bit 1: configuration change).
    pub isr: u8,
    /// The device's own state ([`VirtioDevice::save_state`]).
    pub device: serde_json::Value,
}

impl VirtioPciState {
    /// Whether the device was running.
    fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }
}

/// How the transport raises the device's interrupts.
struct PciInterrupt {
    msix: Mutex<Msix>,
    /// The interrupt status byte: bit 0 used-buffer, bit 1 configuration change; read-to-clear.
    isr: AtomicU8,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
}

impl PciInterrupt {
    fn msix(&self) -> std::sync::MutexGuard<'_, Msix> {
        self.msix.lock().expect("MSI-X lock poisoned")
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn notify_queue(&self, queue: u16) {
        self.isr.fetch_or(1, Ordering::AcqRel);
        let Some(v) = self.queue_vectors.get(usize::from(queue)) else {
            return;
        };
        let v = v.load(Ordering::Acquire);
        if v != NO_VECTOR {
            self.msix().trigger(v);
        }
    }

    fn notify_config(&self) {
        self.isr.fetch_or(2, Ordering::AcqRel);
        let v = self.config_vector.load(Ordering::Acquire);
        if v != NO_VECTOR {
            self.msix().trigger(v);
        }
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPci {
    config: PciConfiguration,
    msix_cap: usize,
    device: Arc<Mutex<dyn VirtioDevice>>,
    common: CommonConfig,
    interrupt: Arc<PciInterrupt>,
    queue_events: Arc<[EventFd]>,
    mem: GuestMemoryMmap,
    /// For (un)registering the queue events at the notification addresses.
    vm: Weak<dyn hypervisor::Vm>,
    /// Where the queue events are registered (the BAR's base), if anywhere.
    notify_base: Option<u64>,
    /// Where queue notifications are served.
    serve: Notifications,
}

/// Where a [`VirtioPci`] serves the queue notifications written to its BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notifications {
    /// On the event loop, through the queue events; on KVM they are I/O events, so the write
    /// never leaves the kernel. The default.
    EventLoop,
    /// On the notifying vCPU's thread as far as the device can without waiting on the host
    /// ([`VirtioDevice::process_queue_now`]), the rest on the event loop: for the emulator,
    /// whose vCPUs see every notification anyway (see [`VirtioPci::with_notifications`]).
    VcpuFirst,
    /// All on the notifying vCPU's thread, before the guest's next instruction (see
    /// [`VirtioPci::with_inline_notifications`]).
    Vcpu,
}

impl VirtioPci {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        vm: &Arc<dyn hypervisor::Vm>,
    ) -> Result<Self, TransportError> {
        let (dtype, queue_max, offered, class) = {
            let d = device.lock().expect("virtio device lock poisoned");
            (
                d.device_type(),
                d.queue_max_sizes().to_vec(),
                d.features() | features::VERSION_1,
                d.pci_class(),
            )
        };
        if queue_max.len() >= MAX_VECTORS {
            return Err(TransportError::TooManyQueues(queue_max.len()));
        }
        let nvec = queue_max.len() + 1;
        let ids = PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_MODERN_DEVICE_BASE + dtype as u16,
            revision: VIRTIO_PCI_REVISION,
            class: class.0,
            subclass: class.1,
            prog_if: class.2,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem_id: 0x40,
        };
        let mut config = PciConfiguration::new(ids);
        config.add_bar(BAR, BAR_SIZE, BarKind::Mem32)?;
        let notify_len = (queue_max.len() as u64 * u64::from(NOTIFY_MULTIPLIER)).max(4);
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_CFG_LEN, None),
        )?;
        config.add_capability(CAP_VENDOR, &virtio_cap(CFG_ISR, ISR_OFFSET, ISR_LEN, None))?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_DEVICE, DEVICE_OFFSET, DEVICE_LEN, None),
        )?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                notify_len.min(NOTIFY_LEN),
                Some(NOTIFY_MULTIPLIER),
            ),
        )?;
        let mut msix_body = Vec::with_capacity(10);
        msix_body.extend_from_slice(&((nvec - 1) as u16).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32 | BAR as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | BAR as u32).to_le_bytes());
        let msix_cap = usize::from(config.add_capability(CAP_MSIX, &msix_body)?);

        let vectors = (0..nvec)
            .map(|_| vm.msi_vector().map_err(TransportError::Msi))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = (0..queue_max.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::Event))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VirtioPci {
            config,
            msix_cap,
            device,
            common: CommonConfig::new(offered, &queue_max, nvec as u16),
            interrupt: Arc::new(PciInterrupt {
                msix: Mutex::new(Msix::new(vectors)),
                isr: AtomicU8::new(0),
                queue_vectors: queue_max
                    .iter()
                    .map(|_| AtomicU16::new(NO_VECTOR))
                    .collect(),
                config_vector: AtomicU16::new(NO_VECTOR),
            }),
            queue_events: queue_events.into(),
            mem,
            vm: Arc::downgrade(vm),
            notify_base: None,
            serve: Notifications::EventLoop,
        })
    }

    /// Serves each queue notification at once, on the vCPU thread that wrote it, before the
    /// guest's next instruction — instead of through an I/O event and the event loop. For the
    /// emulator's deterministic mode: requests and their completion interrupts then happen at
    /// the same point of the instruction stream on every run, so a guest driving only its own
    /// devices (disks, entropy) runs the same way each time. Host-side input (a tap, a socket)
    /// still arrives when it arrives.
    pub fn with_inline_notifications(self) -> Self {
        self.with_notifications(Notifications::Vcpu)
    }

    /// Serves queue notifications where `serve` says. [`Notifications::VcpuFirst`] is for
    /// the emulator, whose vCPU threads run the notifying write anyway: a disk read the host's
    /// page cache holds then completes before the guest's next instruction, and the guest
    /// takes its interrupt without going idle, instead of the request waking the event loop
    /// on another host CPU and its interrupt waking the halted vCPU back.
    pub fn with_notifications(mut self, serve: Notifications) -> Self {
        self.serve = serve;
        self
    }

    /// The device back end, for the event loop.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// One event per queue, signalled when the driver notifies it.
    pub fn queue_events(&self) -> Arc<[EventFd]> {
        self.queue_events.clone()
    }

    /// Registers the queue events at the notification addresses of a BAR based at `base`
    /// (and drops the registrations at the old base).
    fn move_notifications(&mut self, base: Option<u64>) {
        // Notifications the vCPU serves must reach `bar_write`.
        let events = self.serve == Notifications::EventLoop;
        let Some(vm) = self.vm.upgrade().filter(|_| events) else {
            return;
        };
        if let Some(old) = self.notify_base.take() {
            for (i, evt) in self.queue_events.iter().enumerate() {
                let _ = vm.unregister_ioevent(evt, notify_addr(old, i));
            }
        }
        if let Some(new) = base {
            for (i, evt) in self.queue_events.iter().enumerate() {
                if let Err(e) = vm.register_ioevent(evt, notify_addr(new, i)) {
                    // Notifications still arrive, through `bar_write`.
                    tracing::warn!("virtio-pci: queue {i} notifications take the slow path: {e}");
                }
            }
            self.notify_base = Some(new);
        }
    }

    fn reset(&mut self) {
        self.device
            .lock()
            .expect("virtio device lock poisoned")
            .reset();
        // MSI-X is PCI state, not virtio state: the driver keeps its vectors across a device
        // reset (only a function-level reset would clear them).
        self.interrupt.isr.store(0, Ordering::Release);
        self.sync_vectors();
    }

    fn sync_vectors(&self) {
        for (q, v) in self.common.queues.iter().zip(&self.interrupt.queue_vectors) {
            v.store(q.msix_vector, Ordering::Release);
        }
        self.interrupt
            .config_vector
            .store(self.common.config_msix_vector, Ordering::Release);
    }

    fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().expect("virtio device lock poisoned")
    }

    /// Whether the driver started the device and it runs.
    fn running(&self) -> bool {
        let s = self.common.status;
        s & status::DRIVER_OK != 0 && s & status::DEVICE_NEEDS_RESET == 0
    }

    /// `DRIVER_OK`: starts the device; on failure the device asks the driver for a reset.
    fn activate(&mut self) {
        if let Err(why) = self.start(None) {
            return self.fail(&why);
        }
        // Buffers the driver made available before DRIVER_OK are served now.
        self.notify_queues();
    }

    /// Builds the queues the driver described, at `positions` if given (a restore; else at
    /// the rings' start), and hands them to the device.
    fn start(&mut self, positions: Option<&[QueuePosition]>) -> Result<(), String> {
        let event_idx = self.common.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.common.queues.len());
        for (i, s) in self.common.queues.iter().enumerate() {
            let mut q = Queue::new(s.max_size).map_err(|e| format!("queue {i}: {e:?}"))?;
            if s.enabled {
                q.try_set_size(s.size)
                    .map_err(|e| format!("queue {i} size {}: {e:?}", s.size))?;
                q.try_set_desc_table_address(GuestAddress(s.desc))
                    .and_then(|()| q.try_set_avail_ring_address(GuestAddress(s.driver)))
                    .and_then(|()| q.try_set_used_ring_address(GuestAddress(s.device)))
                    .map_err(|e| format!("queue {i} addresses: {e:?}"))?;
                q.set_event_idx(event_idx);
                if let Some(p) = positions.and_then(|p| p.get(i)) {
                    q.set_next_avail(p.next_avail);
                    q.set_next_used(p.next_used);
                }
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(format!("queue {i} does not fit in guest memory"));
                }
            }
            queues.push(q);
        }
        self.sync_vectors();
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            features: self.common.driver_features,
            interrupt: self.interrupt.clone(),
        };
        self.lock_device()
            .activate(activation)
            .map_err(|e| e.to_string())
    }

    /// Has the device look at every queue: through the queue events (served by the event
    /// loop), or at once with inline notifications.
    fn notify_queues(&mut self) {
        for (q, evt) in self.queue_events.iter().enumerate() {
            if self.serve == Notifications::Vcpu {
                self.lock_device().process_queue(q);
            } else {
                let _ = evt.write(1);
            }
        }
    }

    /// The function's state for a snapshot, taken while no vCPU runs and the event loop is
    /// parked (between two of its calls into the device). The configuration space is not in
    /// it: save it with the PCI root bus ([`devices::pci::PciRoot::save_state`]).
    pub fn save_state(&self) -> Result<VirtioPciState, StateError> {
        let running = self.running();
        let (device_type, positions, device) = {
            let d = self.lock_device();
            let positions = if running {
                d.queue_positions()
            } else {
                Vec::new()
            };
            (d.device_type(), positions, d.save_state()?)
        };
        if running && positions.len() != self.common.queues.len() {
            return Err(StateError::Invalid(format!(
                "the {} device reports positions for {} of its {} queues",
                device_name(device_type),
                positions.len(),
                self.common.queues.len()
            )));
        }
        let c = &self.common;
        let queues = c
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let p = positions.get(i).copied().flatten().unwrap_or_default();
                QueueState {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.enabled,
                    msix_vector: q.msix_vector,
                    desc_table_addr: q.desc,
                    avail_ring_addr: q.driver,
                    used_ring_addr: q.device,
                    next_avail: p.next_avail,
                    next_used: p.next_used,
                }
            })
            .collect();
        Ok(VirtioPciState {
            device_type,
            device_features: c.device_features,
            device_feature_select: c.device_feature_select,
            driver_feature_select: c.driver_feature_select,
            driver_features: c.driver_features,
            status: c.status,
            config_generation: c.config_generation,
            config_msix_vector: c.config_msix_vector,
            queue_select: c.queue_select,
            queues,
            msix: self.interrupt.msix().save(),
            isr: self.interrupt.isr.load(Ordering::Acquire),
            device,
        })
    }

    /// Puts back what [`save_state`](Self::save_state) returned, on a function just built
    /// (by [`new`](Self::new), the driver has not touched it) around a device made from a
    /// compatible configuration, before any vCPU runs and with guest memory already restored.
    ///
    /// Checks first, changing nothing on failure: the device type, the queues and MSI-X table
    /// sizes, that the new device offers every feature the driver took, then the device's own
    /// state ([`VirtioDevice::restore_state`]). Then restores the registers, the MSI-X table
    /// (programming each vector's message), pending bits and ISR, and if the driver had
    /// started the device, activates it with its queues at the saved positions. Raises no
    /// interrupt and serves no queue: call [`resume_after_restore`](Self::resume_after_restore)
    /// for that once the vCPUs' and interrupt controllers' state is back.
    pub fn restore_state(&mut self, s: &VirtioPciState) -> Result<(), StateError> {
        self.check_state(s)?;
        self.lock_device().restore_state(&s.device)?;

        let c = &mut self.common;
        c.device_feature_select = s.device_feature_select;
        c.driver_feature_select = s.driver_feature_select;
        c.driver_features = s.driver_features;
        c.status = s.status;
        c.config_generation = s.config_generation;
        c.config_msix_vector = s.config_msix_vector;
        c.queue_select = s.queue_select;
        for (q, saved) in c.queues.iter_mut().zip(&s.queues) {
            *q = QueueSetup {
                max_size: q.max_size,
                size: saved.size,
                msix_vector: saved.msix_vector,
                enabled: saved.ready,
                desc: saved.desc_table_addr,
                driver: saved.avail_ring_addr,
                device: saved.used_ring_addr,
            };
        }
        self.interrupt.msix().restore(&s.msix);
        self.interrupt.isr.store(s.isr, Ordering::Release);
        self.sync_vectors();
        if s.running() {
            let positions: Vec<QueuePosition> = s
                .queues
                .iter()
                .map(|q| QueuePosition {
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                })
                .collect();
            if let Err(why) = self.start(Some(&positions)) {
                self.common.status |= status::DEVICE_NEEDS_RESET;
                return Err(StateError::Start(why));
            }
        }
        Ok(())
    }

    /// Whether `s` can be restored into this function.
    fn check_state(&self, s: &VirtioPciState) -> Result<(), StateError> {
        let c = &self.common;
        let here = self.lock_device().device_type();
        if s.device_type != here {
            return Err(StateError::DeviceType {
                saved: device_name(s.device_type),
                here: device_name(here),
            });
        }
        if c.status != 0 {
            return Err(StateError::InUse);
        }
        same("number of queues", s.queues.len(), c.queues.len())?;
        for (saved, q) in s.queues.iter().zip(&c.queues) {
            same("queue size limit", saved.max_size, q.max_size)?;
        }
        self.interrupt
            .msix()
            .check(&s.msix)
            .map_err(StateError::Invalid)?;
        let vector_ok = |v: u16| v == NO_VECTOR || v < c.msix_entries;
        if let Some(v) = std::iter::once(s.config_msix_vector)
            .chain(s.queues.iter().map(|q| q.msix_vector))
            .find(|&v| !vector_ok(v))
        {
            return Err(StateError::Invalid(format!(
                "MSI-X vector {v} is beyond the table"
            )));
        }
        if s.status & status::FEATURES_OK != 0 {
            if s.driver_features & features::VERSION_1 == 0 {
                return Err(StateError::Invalid(
                    "features accepted without VERSION_1".into(),
                ));
            }
            let missing = s.driver_features & !c.device_features;
            if missing != 0 {
                return Err(StateError::Mismatch {
                    what: "driver's features",
                    saved: format!("{:#x}", s.driver_features),
                    here: format!("{:#x} offered (lacks {missing:#x})", c.device_features),
                });
            }
        } else if s.status & status::DRIVER_OK != 0 {
            return Err(StateError::Invalid("DRIVER_OK without FEATURES_OK".into()));
        }
        Ok(())
    }

    /// After [`restore_state`](Self::restore_state), once the vCPUs' and the interrupt
    /// controllers' state is restored and before any vCPU runs: has a running device look at
    /// every queue once (the notifications pending at the snapshot stayed behind in the old
    /// process's queue events), through the queue events (served when the event loop starts)
    /// or at once with inline notifications; and re-raises the interrupts that were pending
    /// (ISR bits: every enabled queue's vector, the configuration vector; MSI-X pending bits
    /// of vectors no longer masked), so a guest that had not seen them yet does not wait
    /// forever. A spurious interrupt is harmless to a virtio driver; a lost one is not.
    pub fn resume_after_restore(&mut self) {
        let isr = self.interrupt.isr.load(Ordering::Acquire);
        if self.running() {
            self.notify_queues();
        }
        let mut vectors: Vec<u16> = Vec::new();
        if isr & 1 != 0 {
            vectors.extend(
                self.common
                    .queues
                    .iter()
                    .filter(|q| q.enabled)
                    .map(|q| q.msix_vector),
            );
        }
        if isr & 2 != 0 {
            vectors.push(self.common.config_msix_vector);
        }
        vectors.sort_unstable();
        vectors.dedup();
        let mut msix = self.interrupt.msix();
        for v in vectors.into_iter().filter(|&v| v != NO_VECTOR) {
            msix.trigger(v);
        }
        msix.send_pending();
    }

    #[cold]
    fn fail(&mut self, why: &str) {
        tracing::warn!("virtio-pci: the driver's set-up is invalid: {why}; device needs reset");
        self.common.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.notify_config();
    }
}

fn notify_addr(base: u64, queue: usize) -> u64 {
    base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
        // The MSI-X message control word (bytes 2–3 of the capability's first dword): only
        // the enable and function-mask bits are writable; the table size stays.
        if reg == self.msix_cap / 4 {
            let mut ctl = [0u8; 2];
            self.config.read_bytes(self.msix_cap + 2, &mut ctl);
            let written = u16::from_le_bytes(ctl);
            let size = (self.interrupt.msix().len() - 1) as u16;
            let keep = msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK;
            self.config
                .write_bytes(self.msix_cap + 2, &((written & keep) | size).to_le_bytes());
            self.interrupt.msix().set_control(written);
        }
    }

    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if index != BAR {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_CFG_LEN => self.common.read(o - COMMON_OFFSET, data),
            o if (ISR_OFFSET..ISR_OFFSET + ISR_LEN).contains(&o) => {
                data[0] = self.interrupt.isr.swap(0, Ordering::AcqRel);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => self
                .device
                .lock()
                .expect("virtio device lock poisoned")
                .read_config(o - DEVICE_OFFSET, data),
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .interrupt
                .msix()
                .read_table(o - MSIX_TABLE_OFFSET, data),
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.interrupt.msix().read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]) {
        if index != BAR {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_CFG_LEN => {
                let change = self.common.write(o - COMMON_OFFSET, data);
                self.sync_vectors();
                match change {
                    Some(StatusChange::Reset) => self.reset(),
                    Some(StatusChange::DriverOk) => self.activate(),
                    None => {}
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => self
                .device
                .lock()
                .expect("virtio device lock poisoned")
                .write_config(o - DEVICE_OFFSET, data),
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(evt) = self.queue_events.get(q) {
                    let served = match self.serve {
                        Notifications::Vcpu => {
                            self.lock_device().process_queue(q);
                            true
                        }
                        // A device busy on the event loop (a request that had to wait) gets
                        // the notification there, after what it is doing: the vCPU does not
                        // wait for it.
                        Notifications::VcpuFirst => self
                            .device
                            .try_lock()
                            .is_ok_and(|mut d| d.process_queue_now(q)),
                        Notifications::EventLoop => false,
                    };
                    if !served {
                        let _ = evt.write(1);
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .interrupt
                .msix()
                .write_table(o - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, index: usize, _old: Option<u64>, new: Option<u64>) {
        if index == BAR {
            self.move_notifications(new);
        }
    }
}
