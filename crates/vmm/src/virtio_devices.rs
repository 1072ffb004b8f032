//! Plugging the configured virtio devices into a VM: each becomes a virtio-pci function on the
//! PCI root bus, with its queue notifications served by the event loop (or, on the emulator,
//! first by the notifying vCPU: see [`Notifications`]).

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::pci::{PciDevice, PciRoot};
use hypervisor::{BackendKind, GuestMemoryMmap};
use virtio::balloon::Balloon;
use virtio::block::Block;
use virtio::net::{Net, Tap};
use virtio::pci::{Notifications, VirtioPci};
use virtio::rng::Rng;
use virtio::vsock::Vsock;
use virtio::VirtioDevice;

use crate::config::VmConfig;
use crate::event_loop::EventLoop;
use crate::VmmError;

/// Plugs the virtio devices of `config` into `pci`: the disks, then the network interfaces
/// (each image and tap opened first, so one that cannot be used fails before the guest
/// starts), then the entropy source, the vsock device and the balloon.
pub(crate) fn attach_devices(
    config: &VmConfig,
    backend: BackendKind,
    vm: &Arc<dyn hypervisor::Vm>,
    mem: &GuestMemoryMmap,
    pci: &Mutex<PciRoot>,
    events: &mut EventLoop,
) -> Result<Vec<Arc<Mutex<VirtioPci>>>, VmmError> {
    let mut bus = Plug {
        vm,
        mem,
        pci,
        events,
        deterministic: config.deterministic,
        emu: backend == BackendKind::Emu,
        plugged: Vec::new(),
    };
    for disk in &config.disks {
        let block = Block::new(&disk.path, disk.read_only, disk.serial.as_deref())
            .map_err(VmmError::Disk)?;
        bus.attach(Arc::new(Mutex::new(block)), true)?;
    }
    for net in &config.nets {
        let tap = Tap::open(&net.tap).map_err(VmmError::Tap)?;
        let dev = Net::new(tap, net.mac().0).map_err(VmmError::EventLoop)?;
        bus.attach(Arc::new(Mutex::new(dev)), false)?;
    }
    if config.rng {
        bus.attach(Arc::new(Mutex::new(Rng::new())), false)?;
    }
    // The socket is listened on from here until the device is dropped with the VM.
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(v.cid, &v.uds).map_err(VmmError::Vsock)?;
        bus.attach(Arc::new(Mutex::new(vsock)), false)?;
    }
    if let Some(b) = &config.balloon {
        let balloon = Balloon::new(
            config.memory.bytes,
            b.size.bytes,
            b.deflate_on_oom,
            b.control.as_deref(),
        )
        .map_err(VmmError::Balloon)?;
        bus.attach(Arc::new(Mutex::new(balloon)), false)?;
    }
    Ok(bus.plugged)
}

/// Where devices are plugged in.
struct Plug<'a> {
    vm: &'a Arc<dyn hypervisor::Vm>,
    mem: &'a GuestMemoryMmap,
    pci: &'a Mutex<PciRoot>,
    events: &'a mut EventLoop,
    /// Serve every queue notification on the notifying vCPU's thread, at a fixed point of the
    /// instruction stream, instead of on the event loop whenever it gets to it.
    deterministic: bool,
    /// The vCPUs are the emulator's, which see every notifying write (on KVM they are I/O
    /// events, served by the event loop without leaving the kernel).
    emu: bool,
    /// The transports plugged in so far.
    plugged: Vec<Arc<Mutex<VirtioPci>>>,
}

impl Plug<'_> {
    /// Plugs one virtio device into the PCI bus and its queues and back end into the event
    /// loop. `now`: on the emulator, the notifying vCPU serves what the device can do at once
    /// ([`VirtioDevice::process_queue_now`]: disks, whose reads from the host's page cache
    /// then complete before the guest's next instruction); other devices do better on the
    /// event loop beside the vCPU (a network device's transmissions run the host's network
    /// stack).
    fn attach(&mut self, device: Arc<Mutex<dyn VirtioDevice>>, now: bool) -> Result<(), VmmError> {
        let serve = if self.deterministic {
            Notifications::Vcpu
        } else if self.emu && now {
            Notifications::VcpuFirst
        } else {
            Notifications::EventLoop
        };
        let (vm, mem, pci, events) = (self.vm, self.mem, self.pci, &mut *self.events);
        let transport = VirtioPci::new(device.clone(), mem.clone(), vm)
            .map_err(VmmError::Virtio)?
            .with_notifications(serve);
        let queue_events = transport.queue_events();
        for (index, evt) in queue_events.iter().enumerate() {
            let (evts, dev) = (queue_events.clone(), device.clone());
            events
                .add(
                    evt.as_raw_fd(),
                    Box::new(move || {
                        // Several notifications since the last run are served by one pass.
                        if evts[index].read().is_ok() {
                            dev.lock()
                                .expect("virtio device lock poisoned")
                                .process_queue(index);
                        }
                    }),
                )
                .map_err(VmmError::EventLoop)?;
        }
        let backend_fds = device
            .lock()
            .expect("virtio device lock poisoned")
            .backend_fds();
        for (index, fd) in backend_fds.into_iter().enumerate() {
            let dev = device.clone();
            events
                .add(
                    fd,
                    Box::new(move || {
                        dev.lock()
                            .expect("virtio device lock poisoned")
                            .process_backend(index)
                    }),
                )
                .map_err(VmmError::EventLoop)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        let function: Arc<Mutex<dyn PciDevice>> = transport.clone();
        pci.lock()
            .expect("PCI root lock poisoned")
            .add_device(function)
            .map_err(VmmError::Pci)?;
        self.plugged.push(transport);
        Ok(())
    }
}
