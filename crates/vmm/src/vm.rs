//! Building one VM from a [`VmConfig`] — memory, kernel, boot structures, devices, vCPUs — and
//! running it until something stops it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arch::boot::{BootCpuState, EntryProtocol};
use arch::linux::InitrdRegion;
use devices::acpi::{AcpiPm, ACPI_PM_PORT_LEN, ACPI_SLEEP_CONTROL_PORT};
use devices::bus::Bus;
use devices::legacy::i8042::{I8042_DATA_PORT, I8042_PORT_LEN};
use devices::legacy::rtc::{RTC_INDEX_PORT, RTC_PORT_LEN};
use devices::legacy::serial::{COM1_BASE, COM1_IRQ, SERIAL_PORT_LEN};
use devices::legacy::{Rtc, Serial, I8042};
use devices::pci::{PciRoot, PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN};
use devices::{GuestEvent, GuestEventSink, InterruptLine};
use hypervisor::{BackendKind, Fpu, Hypervisor, IrqLine, MemoryRegion, Vcpu};
use virtio::pci::VirtioPci;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;

use crate::config::{ConfigError, VmConfig};
use crate::console::ConsoleTarget;
use crate::event_loop::{EventLoop, RunningLoop};
use crate::snapshot::{self, DeviceStates, Snapshot};
use crate::vcpu::{self, VcpuContext};
use crate::{ResetCause, VmEvent, VmmError};

/// Adapts a hypervisor interrupt line to the devices' interface.
struct Irq(Arc<dyn IrqLine>);

impl InterruptLine for Irq {
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Turns device requests (power off, reset) into VM events.
struct EventSink {
    events: Sender<VmEvent>,
    /// Raised before the event is sent, so the vCPU whose I/O asked for it stops at once
    /// instead of entering the guest again and waiting for a kick.
    stop: Arc<AtomicBool>,
}

impl GuestEventSink for EventSink {
    fn notify(&self, event: GuestEvent) {
        let event = match event {
            GuestEvent::PowerOff => VmEvent::PowerOff,
            GuestEvent::Reset => VmEvent::Reset(ResetCause::Device),
        };
        self.stop.store(true, Ordering::Release);
        let _ = self.events.send(event);
    }
}

/// A built VM. Field order is drop order: the device loop and the vCPUs go before the
/// hypervisor VM, and that before the memory it maps.
pub struct Vm {
    /// The device event loop: stopped first, so no device touches guest memory after.
    device_loop: RunningLoop,
    /// The vCPU threads while the VM runs; each gives its vCPU back when joined.
    threads: Vec<JoinHandle<Box<dyn Vcpu>>>,
    /// The vCPUs while the VM does not run (built, or paused), by ID.
    vcpus: Vec<Box<dyn Vcpu>>,
    vm: Arc<dyn hypervisor::Vm>,
    mem: GuestMemoryMmap,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    /// PCI bus 0; devices plugged in here get their BARs mapped on `mmio_bus`. The pio bus
    /// holds it too, for the configuration ports.
    pci: Arc<Mutex<PciRoot>>,
    serial: Arc<Mutex<Serial>>,
    rtc: Arc<Mutex<Rtc>>,
    i8042: Arc<Mutex<I8042>>,
    /// The virtio-pci functions, in the order they were plugged in.
    virtio: Vec<Arc<Mutex<VirtioPci>>>,
    events: Sender<VmEvent>,
    stop: Arc<AtomicBool>,
    config: VmConfig,
    backend: BackendKind,
    state: RunState,
}

/// How a VM starts: booting a kernel, or from a snapshot.
pub enum Start<'a> {
    Boot,
    Restore {
        dir: &'a Path,
        snapshot: &'a Snapshot,
        /// How far to move the guest clock forward on top of the saved time.
        advance_clock_ns: u64,
    },
}

/// Where a built VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Built, vCPUs not started yet.
    Created,
    Running,
    Paused,
}

fn open(path: &Path, what: &'static str) -> Result<File, VmmError> {
    let err = |source| VmmError::OpenFile {
        what,
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(err(io::Error::other("not a regular file")));
    }
    Ok(file)
}

/// Checks that the kernel and initrd can be opened, so a wrong path is reported first.
pub fn check_files(config: &VmConfig) -> Result<(), VmmError> {
    open(&config.kernel, "kernel")?;
    if let Some(initrd) = &config.initrd {
        open(initrd, "initrd")?;
    }
    Ok(())
}

/// The guest-physical window PCI BARs are placed in.
fn pci_window() -> std::ops::Range<u64> {
    arch::layout::PCI_MMIO_START.0..arch::layout::PCI_MMIO_END.0
}

/// Loads the kernel, initrd and command line into `mem` and writes the boot structures (page
/// tables, ACPI tables, boot_params or PVH start info); the boot vCPU's entry state.
fn load_guest(config: &VmConfig, mem: &GuestMemoryMmap) -> Result<BootCpuState, VmmError> {
    let mut kernel_file = open(&config.kernel, "kernel")?;
    let mut initrd_file = config
        .initrd
        .as_deref()
        .map(|p| open(p, "initrd"))
        .transpose()?;
    let mem_bytes = config.memory.bytes;
    let kernel =
        arch::linux::load_kernel(mem, mem_bytes, &mut kernel_file).map_err(VmmError::Boot)?;
    if let Some(max) = kernel
        .setup_header
        .map(|h| h.cmdline_size as usize)
        .filter(|&m| m > 0)
    {
        if config.cmdline.len() > max {
            return Err(VmmError::Config(ConfigError::CmdlineTooLong {
                len: config.cmdline.len(),
                max,
            }));
        }
    }
    let initrd = match initrd_file.as_mut() {
        Some(file) => {
            let len_bytes = file
                .metadata()
                .map_err(|source| VmmError::OpenFile {
                    what: "initrd",
                    path: config.initrd.clone().unwrap_or_default(),
                    source,
                })?
                .len();
            let addr =
                arch::linux::place_initrd(mem_bytes, &kernel, len_bytes).map_err(VmmError::Boot)?;
            mem.read_exact_volatile_from(addr, file, len_bytes as usize)
                .map_err(VmmError::GuestMemory)?;
            Some(InitrdRegion { addr, len_bytes })
        }
        None => None,
    };
    let cmdline = CString::new(config.cmdline.as_str())
        .map_err(|_| VmmError::Config(ConfigError::CmdlineNul))?;
    arch::linux::write_cmdline(mem, &cmdline).map_err(VmmError::Boot)?;
    arch::boot::write_boot_tables(mem).map_err(VmmError::BootTables)?;
    let window = pci_window();
    let acpi = arch::acpi::AcpiConfig {
        pci_mmio: Some(arch::acpi::PciMmioWindow {
            start: vm_memory::GuestAddress(window.start),
            len_bytes: window.end - window.start,
        }),
        ..arch::acpi::AcpiConfig::new(config.cpus as u8)
    };
    let rsdp = arch::acpi::create_acpi_tables(mem, &acpi).map_err(VmmError::Acpi)?;
    let e820 = arch::e820::e820_map(mem_bytes);
    let info = match kernel.protocol {
        EntryProtocol::Linux64 => arch::linux::write_boot_params(
            mem,
            &kernel,
            cmdline.as_bytes().len(),
            initrd,
            &e820,
            rsdp,
        ),
        EntryProtocol::Pvh => arch::linux::write_pvh_start_info(mem, initrd, &e820, rsdp),
    }
    .map_err(VmmError::Boot)?;
    Ok(arch::boot::entry_state(kernel.protocol, kernel.entry, info))
}

/// Guest RAM mapped privately (copy-on-write) from a snapshot's memory file: nothing is read
/// until the guest touches it, so this takes the same time for any memory size.
fn map_memory_file(
    dir: &Path,
    layout: &snapshot::MemoryLayout,
    regions: &[(vm_memory::GuestAddress, usize)],
) -> Result<GuestMemoryMmap, VmmError> {
    let matches = layout.regions.len() == regions.len()
        && layout
            .regions
            .iter()
            .zip(regions)
            .all(|(l, (addr, len))| l.guest_addr == addr.0 && l.len == *len as u64);
    if !matches {
        return Err(VmmError::Snapshot(snapshot::SnapshotError::Parse {
            path: dir.join(snapshot::STATE_FILE),
            why: "its memory regions do not match its configured memory size".into(),
        }));
    }
    let file = Arc::new(snapshot::open_memory(dir, layout).map_err(VmmError::Snapshot)?);
    let mut mapped = Vec::with_capacity(regions.len());
    for r in &layout.regions {
        let mapping = vm_memory::MmapRegion::build(
            Some(vm_memory::FileOffset::from_arc(file.clone(), r.file_offset)),
            r.len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| VmmError::MapSnapshotMemory(e.to_string()))?;
        let region =
            vm_memory::GuestRegionMmap::new(mapping, vm_memory::GuestAddress(r.guest_addr))
                .ok_or_else(|| VmmError::MapSnapshotMemory("region overflows".into()))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| VmmError::MapSnapshotMemory(e.to_string()))
}

impl Vm {
    /// Builds the VM `config` describes, booting its kernel or resuming a snapshot.
    pub fn build(
        hv: &dyn Hypervisor,
        config: &VmConfig,
        start: Start<'_>,
        events: Sender<VmEvent>,
        console: &ConsoleTarget,
    ) -> Result<Vm, VmmError> {
        let vm = hv.create_vm().map_err(VmmError::Hypervisor)?;
        let regions: Vec<_> = arch::e820::ram_regions(config.memory.bytes)
            .into_iter()
            .map(|(addr, len)| (addr, len as usize))
            .collect();
        let mem = match &start {
            Start::Boot => {
                GuestMemoryMmap::from_ranges(&regions).map_err(VmmError::AllocateMemory)?
            }
            Start::Restore { dir, snapshot, .. } => {
                if snapshot.backend != hv.kind() {
                    return Err(VmmError::Snapshot(snapshot::SnapshotError::Backend {
                        expected: hv.kind(),
                        found: snapshot.backend,
                        found_lower: backend_name(snapshot.backend),
                    }));
                }
                map_memory_file(dir, &snapshot.memory, &regions)?
            }
        };
        for (slot, region) in mem.iter().enumerate() {
            let host_addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(VmmError::GuestMemory)? as u64;
            let region = MemoryRegion {
                slot: slot as u32,
                guest_addr: region.start_addr(),
                len_bytes: region.len(),
                host_addr,
            };
            // SAFETY: the mapping belongs to `mem`, which `Vm` keeps alive (and drops after
            // the hypervisor VM).
            unsafe { vm.map_memory(region) }.map_err(VmmError::Hypervisor)?;
        }
        let boot_state = match start {
            Start::Boot => Some(load_guest(config, &mem)?),
            Start::Restore { .. } => None,
        };

        let pio_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let stop = Arc::new(AtomicBool::new(false));
        let sink: Arc<dyn GuestEventSink> = Arc::new(EventSink {
            events: events.clone(),
            stop: stop.clone(),
        });
        let com1_irq = vm.irq_line(COM1_IRQ).map_err(VmmError::Hypervisor)?;
        let serial = Arc::new(Mutex::new(Serial::new(
            Arc::new(Irq(com1_irq)),
            Box::new(io::stdout()),
        )));
        let insert = |dev, base: u16, len| {
            pio_bus
                .insert(dev, u64::from(base), len)
                .map_err(VmmError::Bus)
        };
        insert(serial.clone(), COM1_BASE, SERIAL_PORT_LEN)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(sink.clone())));
        insert(i8042.clone(), I8042_DATA_PORT, I8042_PORT_LEN)?;
        // The RTC shows the guest's wall clock. It holds the VM weakly: the bus is dropped after
        // the guest memory, and the hypervisor VM must not outlive the memory it maps.
        let clock_vm = Arc::downgrade(&vm);
        let wall_clock = Box::new(move || {
            clock_vm
                .upgrade()
                .map_or_else(hypervisor::host_wall_clock_ns, |vm| vm.wall_clock_ns())
        });
        let rtc = Arc::new(Mutex::new(Rtc::new(wall_clock)));
        insert(rtc.clone(), RTC_INDEX_PORT, RTC_PORT_LEN)?;
        insert(
            Arc::new(Mutex::new(AcpiPm::new(sink))),
            ACPI_SLEEP_CONTROL_PORT,
            ACPI_PM_PORT_LEN,
        )?;
        let pci = Arc::new(Mutex::new(PciRoot::new(mmio_bus.clone(), pci_window())));
        insert(pci.clone(), PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN)?;
        let mut device_loop = EventLoop::new().map_err(VmmError::EventLoop)?;
        let virtio =
            crate::virtio_devices::attach_devices(config, &vm, &mem, &pci, &mut device_loop)?;
        let input = serial.lock().expect("serial lock poisoned").input();
        *console.lock().expect("console target lock poisoned") = Some((serial.clone(), input));

        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for id in 0..config.cpus {
            vcpus.push(vm.create_vcpu(id).map_err(VmmError::Hypervisor)?);
        }
        match (&start, boot_state) {
            (Start::Boot, Some(boot_state)) => {
                let supported = hv.supported_cpuid().map_err(VmmError::Hypervisor)?;
                for (id, vcpu) in vcpus.iter_mut().enumerate() {
                    let id = id as u32;
                    let mut setup = || -> hypervisor::Result<()> {
                        vcpu.set_cpuid(&arch::cpuid::vcpu_cpuid(&supported, id, config.cpus))?;
                        vcpu.set_msrs(&arch::msr::boot_msrs())?;
                        vcpu.setup_lapic_lints()?;
                        vcpu.set_fpu(&Fpu::default())?;
                        if id == 0 {
                            vcpu.set_sregs(&boot_state.sregs)?;
                            vcpu.set_regs(&boot_state.regs)?;
                        }
                        Ok(())
                    };
                    setup().map_err(VmmError::Hypervisor)?;
                }
            }
            (
                Start::Restore {
                    snapshot,
                    advance_clock_ns,
                    ..
                },
                _,
            ) => {
                if snapshot.vcpus.len() != vcpus.len() {
                    return Err(VmmError::RestoreState(format!(
                        "the snapshot has {} vCPU states for {} vCPUs",
                        snapshot.vcpus.len(),
                        vcpus.len()
                    )));
                }
                vm.restore_state(&snapshot.vm, *advance_clock_ns)
                    .map_err(VmmError::Hypervisor)?;
                for (vcpu, state) in vcpus.iter_mut().zip(&snapshot.vcpus) {
                    vcpu.restore_state(state).map_err(VmmError::Hypervisor)?;
                }
                restore_devices(&snapshot.devices, &serial, &rtc, &i8042, &pci, &virtio)?;
            }
            (Start::Boot, None) => unreachable!("a booted VM has a boot state"),
        }

        if let Start::Restore { .. } = start {
            // Queue notifications pending in the old process's eventfds are gone: look at
            // every queue once, and re-raise interrupts the guest had not seen.
            for t in &virtio {
                t.lock()
                    .expect("virtio transport lock poisoned")
                    .resume_after_restore();
            }
        }
        let device_loop = device_loop.start().map_err(VmmError::EventLoop)?;
        Ok(Vm {
            device_loop,
            threads: Vec::new(),
            vcpus,
            backend: hv.kind(),
            vm,
            mem,
            pio_bus,
            mmio_bus,
            pci,
            serial,
            rtc,
            i8042,
            virtio,
            events,
            stop,
            config: config.clone(),
            state: RunState::Created,
        })
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Starts (or restarts after a pause) the vCPU threads and the device loop.
    pub fn start(&mut self) -> Result<(), VmmError> {
        if self.state == RunState::Running {
            return Ok(());
        }
        if self.state == RunState::Paused {
            self.device_loop.resume();
        }
        self.stop.store(false, Ordering::Release);
        for (id, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let ctx = VcpuContext {
                id: id as u32,
                pio_bus: self.pio_bus.clone(),
                mmio_bus: self.mmio_bus.clone(),
                stop: self.stop.clone(),
                events: self.events.clone(),
            };
            match vcpu::spawn(vcpu, ctx) {
                Ok(t) => self.threads.push(t),
                Err(e) => {
                    // The vCPUs not started yet are lost with the VM; stop the others.
                    self.stop_vcpus();
                    return Err(VmmError::SpawnThread(e));
                }
            }
        }
        self.state = RunState::Running;
        Ok(())
    }

    /// Stops the vCPUs between two instructions and parks the device loop: guest memory and
    /// every device hold still until [`start`](Vm::start).
    pub fn pause(&mut self) -> Result<(), VmmError> {
        if self.state != RunState::Running {
            return Ok(());
        }
        self.stop_vcpus();
        self.device_loop.pause().map_err(VmmError::EventLoop)?;
        self.state = RunState::Paused;
        Ok(())
    }

    /// Stops and joins the vCPU threads, taking their vCPUs back.
    fn stop_vcpus(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in &self.threads {
            // A thread that already ended cannot be signalled; that is fine.
            let _ = t.kill(vcpu::kick_signal());
        }
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(vcpu) => self.vcpus.push(vcpu),
                Err(_) => tracing::error!("a vCPU thread panicked"),
            }
        }
    }

    /// Writes a snapshot of this paused VM into `dir`.
    pub fn snapshot(&mut self, dir: &Path) -> Result<(), VmmError> {
        if self.vcpus.len() != self.config.cpus as usize {
            return Err(VmmError::RestoreState(
                "a vCPU thread failed; the VM cannot be saved".into(),
            ));
        }
        let created_unix_ns = hypervisor::host_wall_clock_ns();
        let vm_state = self.vm.save_state().map_err(VmmError::Hypervisor)?;
        let vcpu_states = self
            .vcpus
            .iter()
            .map(|v| v.save_state())
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmmError::Hypervisor)?;
        let devices = self.save_devices()?;
        let memory = snapshot::MemoryLayout::packed(
            format!("{}{created_unix_ns}", snapshot::MEMORY_FILE_PREFIX),
            self.mem.iter().map(|r| (r.start_addr().0, r.len())),
        );
        let host_regions = self
            .mem
            .iter()
            .map(|r| {
                r.get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map(|host| snapshot::HostRegion {
                        host,
                        len: r.len() as usize,
                    })
                    .map_err(VmmError::GuestMemory)
            })
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: the regions are `self.mem`'s mappings, alive while `self` is; no vCPU runs
        // (they are all parked in `self.vcpus`) and the device loop is parked, so nothing
        // writes guest memory while it is copied.
        unsafe { snapshot::write_memory(dir, &memory, &host_regions) }
            .map_err(VmmError::Snapshot)?;
        let snap = Snapshot {
            ferrovisor_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix_ns,
            backend: self.backend,
            config: self.config.clone(),
            memory,
            vm: vm_state,
            vcpus: vcpu_states,
            devices,
        };
        snapshot::write_state(dir, &snap).map_err(VmmError::Snapshot)?;
        snapshot::remove_stale_memory(dir, &snap.memory.file).map_err(VmmError::Snapshot)?;
        Ok(())
    }

    fn save_devices(&self) -> Result<DeviceStates, VmmError> {
        let to_value = |v: Result<serde_json::Value, String>| v.map_err(VmmError::SaveState);
        let virtio = self
            .virtio
            .iter()
            .map(|t| {
                let state = t
                    .lock()
                    .expect("virtio transport lock poisoned")
                    .save_state()
                    .map_err(|e| e.to_string())?;
                serde_json::to_value(state).map_err(|e| e.to_string())
            })
            .map(to_value)
            .collect::<Result<Vec<_>, _>>()?;
        let pci = to_value(
            serde_json::to_value(
                self.pci
                    .lock()
                    .expect("PCI root lock poisoned")
                    .save_state(),
            )
            .map_err(|e| e.to_string()),
        )?;
        Ok(DeviceStates {
            serial: self
                .serial
                .lock()
                .expect("serial lock poisoned")
                .save_state(),
            rtc: self.rtc.lock().expect("rtc lock poisoned").save_state(),
            i8042: self.i8042.lock().expect("i8042 lock poisoned").save_state(),
            pci,
            virtio,
        })
    }
}

/// Puts the saved device states back, before the device loop or any vCPU runs.
fn restore_devices(
    saved: &DeviceStates,
    serial: &Mutex<Serial>,
    rtc: &Mutex<Rtc>,
    i8042: &Mutex<I8042>,
    pci: &Mutex<PciRoot>,
    virtio: &[Arc<Mutex<VirtioPci>>],
) -> Result<(), VmmError> {
    let bad = |e: &dyn std::fmt::Display| VmmError::RestoreState(e.to_string());
    serial
        .lock()
        .expect("serial lock poisoned")
        .restore_state(&saved.serial)
        .map_err(|e| bad(&e))?;
    rtc.lock()
        .expect("rtc lock poisoned")
        .restore_state(&saved.rtc)
        .map_err(|e| bad(&e))?;
    i8042
        .lock()
        .expect("i8042 lock poisoned")
        .restore_state(&saved.i8042);
    if saved.virtio.len() != virtio.len() {
        return Err(VmmError::RestoreState(format!(
            "the snapshot has {} virtio devices; the configuration gives {}",
            saved.virtio.len(),
            virtio.len()
        )));
    }
    let pci_state = serde_json::from_value(saved.pci.clone()).map_err(|e| bad(&e))?;
    pci.lock()
        .expect("PCI root lock poisoned")
        .restore_state(&pci_state)
        .map_err(|e| bad(&e))?;
    for (t, state) in virtio.iter().zip(&saved.virtio) {
        let state = serde_json::from_value(state.clone()).map_err(|e| bad(&e))?;
        t.lock()
            .expect("virtio transport lock poisoned")
            .restore_state(&state)
            .map_err(|e| bad(&e))?;
    }
    Ok(())
}

pub(crate) fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Kvm => "kvm",
        BackendKind::Emu => "emu",
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
