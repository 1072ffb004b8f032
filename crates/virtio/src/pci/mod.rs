//! The virtio-pci transport (virtio 1.2, 4.1): a modern-only PCI function whose capabilities
//! point into one 32-bit memory BAR holding the common configuration, the ISR byte, the
//! device configuration, one notification address per queue and the MSI-X table and PBA.
//!
//! Queue notifications: each queue has an `EventFd`, registered with the hypervisor at its
//! notification address (KVM ioeventfd, or the emulator's equivalent), so the guest's write
//! never reaches this code; the VMM's event loop waits on the `EventFd`s
//! ([`VirtioPci::queue_events`]). A write that does arrive here (no registration) signals the
//! same `EventFd`. Interrupts: MSI-X only (no INTx pin), through [`hypervisor::MsiVector`]s.

mod common;
mod msix;

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use devices::pci::{BarKind, PciConfiguration, PciDevice, PciError, PciIds};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::{features, status, Activation, VirtioDevice, VirtioInterrupt};
use common::{CommonConfig, StatusChange, COMMON_CFG_LEN, NO_VECTOR};
use msix::Msix;

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
    /// Serve queue notifications on the notifying vCPU's thread instead of the event loop
    /// (see [`VirtioPci::with_inline_notifications`]).
    inline: bool,
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
            inline: false,
        })
    }

    /// Serves each queue notification at once, on the vCPU thread that wrote it, before the
    /// guest's next instruction — instead of through an I/O event and the event loop. For the
    /// emulator's deterministic mode: requests and their completion interrupts then happen at
    /// the same point of the instruction stream on every run, so a guest driving only its own
    /// devices (disks, entropy) runs the same way each time. Host-side input (a tap, a socket)
    /// still arrives when it arrives.
    pub fn with_inline_notifications(mut self) -> Self {
        self.inline = true;
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
        let Some(vm) = self.vm.upgrade().filter(|_| !self.inline) else {
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

    /// `DRIVER_OK`: builds the queues the driver described and starts the device; on failure
    /// the device asks the driver for a reset.
    fn activate(&mut self) {
        let event_idx = self.common.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.common.queues.len());
        for (i, s) in self.common.queues.iter().enumerate() {
            let mut q = match Queue::new(s.max_size) {
                Ok(q) => q,
                Err(e) => return self.fail(&format!("queue {i}: {e:?}")),
            };
            if s.enabled {
                if let Err(e) = q.try_set_size(s.size) {
                    return self.fail(&format!("queue {i} size {}: {e:?}", s.size));
                }
                let set = q
                    .try_set_desc_table_address(GuestAddress(s.desc))
                    .and_then(|()| q.try_set_avail_ring_address(GuestAddress(s.driver)))
                    .and_then(|()| q.try_set_used_ring_address(GuestAddress(s.device)));
                if let Err(e) = set {
                    return self.fail(&format!("queue {i} addresses: {e:?}"));
                }
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return self.fail(&format!("queue {i} does not fit in guest memory"));
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
        let result = self
            .device
            .lock()
            .expect("virtio device lock poisoned")
            .activate(activation);
        match result {
            Ok(()) => {
                // Buffers the driver made available before DRIVER_OK are served now.
                for (q, evt) in self.queue_events.iter().enumerate() {
                    if self.inline {
                        self.device
                            .lock()
                            .expect("virtio device lock poisoned")
                            .process_queue(q);
                    } else {
                        let _ = evt.write(1);
                    }
                }
            }
            Err(e) => self.fail(&e.to_string()),
        }
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
                if self.inline {
                    if q < self.queue_events.len() {
                        self.device
                            .lock()
                            .expect("virtio device lock poisoned")
                            .process_queue(q);
                    }
                } else if let Some(evt) = self.queue_events.get(q) {
                    let _ = evt.write(1);
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
