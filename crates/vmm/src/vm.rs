//! Building one VM from a [`VmConfig`] — memory, kernel, boot structures, devices, vCPUs — and
//! running it until something stops it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arch::boot::{BootCpuState, EntryProtocol};
use arch::linux::InitrdRegion;
use devices::acpi::{AcpiPm, ACPI_PM_PORT_LEN, ACPI_SLEEP_CONTROL_PORT};
use devices::bus::Bus;
use devices::legacy::i8042::{I8042Error, I8042_DATA_PORT, I8042_KEYBOARD_IRQ, I8042_PORT_LEN};
use devices::legacy::rtc::{RTC_INDEX_PORT, RTC_PORT_LEN};
use devices::legacy::serial::{COM1_BASE, COM1_IRQ, SERIAL_PORT_LEN};
use devices::legacy::{Rtc, Serial, I8042};
use devices::pci::{PciRoot, PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN};
use devices::{GuestEvent, GuestEventSink, InterruptLine};
use hypervisor::GuestMemoryMmap;
use hypervisor::{BackendKind, Fpu, Hypervisor, IrqLine, MemoryRegion, Vcpu};
use virtio::pci::VirtioPci;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
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
    /// The snapshot directories this VM's memory matches as of the last snapshot or restore,
    /// base first: what a diff snapshot builds on. Empty until the first one.
    chain: Vec<PathBuf>,
    /// The back end logs the pages the vCPUs write (since the last snapshot or restore).
    dirty_logging: bool,
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

/// Gives each vCPU the compiled code saved with the snapshot, if any. A code file that cannot
/// be used (missing, of another build, writable by others) costs only speed and memory: the
/// vCPU compiles its own, and the restore goes on with a warning.
fn adopt_code(dir: &Path, snapshot: &Snapshot, vcpus: &mut [Box<dyn Vcpu>]) {
    for (vcpu, name) in vcpus.iter_mut().zip(&snapshot.code) {
        if name.is_empty() {
            continue;
        }
        let adopted = snapshot::open_code(dir, name)
            .map_err(|e| e.to_string())
            .and_then(|(file, path)| vcpu.adopt_code(&file, &path).map_err(|e| e.to_string()));
        if let Err(e) = adopted {
            tracing::warn!("{e}; the vCPU compiles its own code");
        }
    }
}

/// Guest RAM mapped privately (copy-on-write) from a snapshot's memory file: nothing is read
/// until the guest touches it, so this takes the same time for any memory size. For a diff
/// snapshot the base of its chain is mapped and each diff's pages are copied over it, oldest
/// first. Returns the memory and the chain's directories.
fn map_memory_file(
    dir: &Path,
    snapshot: &Snapshot,
    regions: &[(vm_memory::GuestAddress, usize)],
) -> Result<(GuestMemoryMmap, Vec<PathBuf>), VmmError> {
    let layout = &snapshot.memory;
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
    let chain = snapshot::memory_chain(dir, snapshot).map_err(VmmError::Snapshot)?;
    let (base_dir, base) = &chain[0];
    let file = Arc::new(snapshot::open_memory(base_dir, base).map_err(VmmError::Snapshot)?);
    let mut mapped = Vec::with_capacity(regions.len());
    for r in &base.regions {
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
    let mem = GuestMemoryMmap::from_regions(mapped)
        .map_err(|e| VmmError::MapSnapshotMemory(e.to_string()))?;
    for (diff_dir, diff) in &chain[1..] {
        apply_diff(&mem, diff_dir, diff)?;
    }
    let dirs = chain
        .iter()
        .map(|(d, _)| d.canonicalize().unwrap_or_else(|_| d.clone()))
        .collect();
    Ok((mem, dirs))
}

/// Copies a diff snapshot's pages over `mem`.
fn apply_diff(
    mem: &GuestMemoryMmap,
    dir: &Path,
    layout: &snapshot::MemoryLayout,
) -> Result<(), VmmError> {
    use std::os::unix::fs::FileExt;
    let file = snapshot::open_memory(dir, layout).map_err(VmmError::Snapshot)?;
    let runs = layout.diff.as_ref().map_or(&[][..], |d| &d.runs[..]);
    let page = 4096u64;
    for &(first, count) in runs {
        let (start, end) = (first * page, (first + count) * page);
        for (r, region) in layout.regions.iter().zip(mem.iter()) {
            let (lo, hi) = (start.max(r.file_offset), end.min(r.file_offset + r.len));
            if lo >= hi {
                continue;
            }
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(lo - r.file_offset))
                .map_err(VmmError::GuestMemory)?;
            // SAFETY: `host .. host + (hi - lo)` lies within the region's mapping (checked
            // above against its length), which no vCPU or device uses yet.
            let bytes = unsafe { std::slice::from_raw_parts_mut(host, (hi - lo) as usize) };
            file.read_exact_at(bytes, lo)
                .map_err(|source| VmmError::OpenFile {
                    what: "diff snapshot memory file",
                    path: dir.join(&layout.file),
                    source,
                })?;
        }
    }
    Ok(())
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
        let mut chain = Vec::new();
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
                let (mem, dirs) = map_memory_file(dir, snapshot, &regions)?;
                chain = dirs;
                mem
            }
        };
        let mut slots = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let host_addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(VmmError::GuestMemory)? as u64;
            slots.push(MemoryRegion {
                slot: slot as u32,
                guest_addr: region.start_addr(),
                len_bytes: region.len(),
                host_addr,
            });
        }
        // A restored VM records written pages from the start: the next snapshot may be a diff.
        let log_writes = !chain.is_empty();
        // SAFETY: the mappings belong to `mem`, which `Vm` keeps alive (and drops after the
        // hypervisor VM).
        let (vm, dirty_logging) = match unsafe { hv.create_vm_with_memory(&slots, log_writes) } {
            Ok(vm) => (vm, log_writes),
            Err(e) if log_writes => {
                tracing::warn!("cannot log dirty pages ({e}); diff snapshots are unavailable");
                // SAFETY: as above.
                let vm = unsafe { hv.create_vm_with_memory(&slots, false) };
                (vm.map_err(VmmError::Hypervisor)?, false)
            }
            Err(e) => return Err(VmmError::Hypervisor(e)),
        };
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
        // A PS/2 keyboard behind the i8042: the graceful-shutdown request is Ctrl-Alt-Del on it.
        let kbd_irq = vm
            .irq_line(I8042_KEYBOARD_IRQ)
            .map_err(VmmError::Hypervisor)?;
        let i8042 = Arc::new(Mutex::new(I8042::with_keyboard(
            sink.clone(),
            Arc::new(Irq(kbd_irq)),
        )));
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
        let virtio = crate::virtio_devices::attach_devices(
            config,
            hv.kind(),
            &vm,
            &mem,
            &pci,
            &mut device_loop,
        )?;
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
                    dir,
                    snapshot,
                    advance_clock_ns,
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
                adopt_code(dir, snapshot, &mut vcpus);
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
        let mut vm = Vm {
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
            chain: Vec::new(),
            dirty_logging,
        };
        if !chain.is_empty() {
            // The back end's record started with the VM (`create_vm_with_memory`), or could
            // not start and said so there: only the VMM's own record starts here.
            vm.reset_vmm_writes();
            vm.chain = chain;
        }
        Ok(vm)
    }

    /// Starts a new record of changed pages: guest memory now matches the snapshots `chain`.
    /// Called with no vCPU running.
    fn track_changes_since(&mut self, chain: Vec<PathBuf>) {
        let started = if self.dirty_logging {
            self.vm.take_dirty_log().map(drop)
        } else {
            self.vm.start_dirty_log()
        };
        match started {
            Ok(()) => self.dirty_logging = true,
            Err(e) => {
                tracing::warn!("cannot log dirty pages ({e}); diff snapshots are unavailable");
                self.dirty_logging = false;
            }
        }
        self.reset_vmm_writes();
        self.chain = chain;
    }

    /// Forgets which pages the VMM itself wrote (vm-memory's bitmaps of guest memory).
    fn reset_vmm_writes(&self) {
        for region in self.mem.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    /// Types Ctrl-Alt-Del on the guest's keyboard: the graceful-shutdown request (Linux
    /// signals its init, which powers off).
    pub fn request_shutdown(&self) -> Result<(), I8042Error> {
        self.i8042
            .lock()
            .expect("i8042 lock poisoned")
            .send_ctrl_alt_del()
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

    /// Writes a snapshot of this paused VM into `dir`: all of memory, or with `diff` only
    /// the pages changed since the last snapshot or restore (which it builds on).
    pub fn snapshot(&mut self, dir: &Path, diff: bool) -> Result<(), VmmError> {
        let canonical = |d: &Path| {
            std::fs::create_dir_all(d)
                .and_then(|()| d.canonicalize())
                .map_err(|source| VmmError::OpenFile {
                    what: "snapshot directory",
                    path: d.to_owned(),
                    source,
                })
        };
        let dir_abs = canonical(dir)?;
        if diff {
            if self.chain.is_empty() || !self.dirty_logging {
                return Err(VmmError::SnapshotRefused(
                    "a diff snapshot builds on an earlier snapshot of this VM (or the one it was restored from); take a full snapshot first".into(),
                ));
            }
            if self.chain.contains(&dir_abs) {
                return Err(VmmError::SnapshotRefused(format!(
                    "{dir:?} holds a snapshot this diff builds on; write the diff into a new directory"
                )));
            }
        }
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
        let mut memory = snapshot::MemoryLayout::packed(
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
                        anonymous: r.file_offset().is_none(),
                    })
                    .map_err(VmmError::GuestMemory)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if diff {
            let runs = snapshot::dirty_runs(&memory, &self.changed_pages()?);
            memory.diff = Some(snapshot::DiffMemory {
                parent: self.chain.last().expect("checked above").clone(),
                runs,
            });
        }
        // SAFETY: the regions are `self.mem`'s mappings, alive while `self` is; no vCPU runs
        // (they are all parked in `self.vcpus`) and the device loop is parked, so nothing
        // writes guest memory while it is copied.
        unsafe {
            match &memory.diff {
                Some(d) => snapshot::write_memory_runs(dir, &memory, &host_regions, &d.runs),
                None => snapshot::write_memory(dir, &memory, &host_regions),
            }
        }
        .map_err(VmmError::Snapshot)?;
        let code = self.save_code(dir, created_unix_ns)?;
        let snap = Snapshot {
            ferrovisor_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix_ns,
            backend: self.backend,
            config: self.config.clone(),
            memory,
            vm: vm_state,
            vcpus: vcpu_states,
            devices,
            code,
        };
        snapshot::write_state(dir, &snap).map_err(VmmError::Snapshot)?;
        snapshot::remove_stale_files(dir, &snap).map_err(VmmError::Snapshot)?;
        let mut chain = if diff { self.chain.clone() } else { Vec::new() };
        chain.push(dir_abs);
        self.track_changes_since(chain);
        Ok(())
    }

    /// Writes each vCPU's compiled code (the emulator's blocks) into `dir`, for VMs restored
    /// from the snapshot to share; the file names, one per vCPU ("" where there is none).
    fn save_code(&self, dir: &Path, created_unix_ns: u64) -> Result<Vec<String>, VmmError> {
        let mut names = Vec::with_capacity(self.vcpus.len());
        for (id, vcpu) in self.vcpus.iter().enumerate() {
            let name = format!("{}{created_unix_ns}-{id}", snapshot::CODE_FILE_PREFIX);
            let mut file = snapshot::create_code(dir, &name).map_err(VmmError::Snapshot)?;
            if vcpu.save_code(&mut file).map_err(VmmError::Hypervisor)? {
                names.push(name);
            } else {
                drop(file);
                let path = dir.join(&name);
                std::fs::remove_file(&path)
                    .map_err(snapshot::SnapshotError::io("remove", &path))
                    .map_err(VmmError::Snapshot)?;
                names.push(String::new());
            }
        }
        Ok(names)
    }

    /// Pages changed since the last snapshot or restore, per region: those the vCPUs wrote
    /// (the back end's log) and those the VMM wrote (vm-memory's bitmaps). Clears both.
    fn changed_pages(&self) -> Result<Vec<Vec<u64>>, VmmError> {
        let mut pages = self.vm.take_dirty_log().map_err(VmmError::Hypervisor)?;
        for (bits, region) in pages.iter_mut().zip(self.mem.iter()) {
            let vmm = std::ops::Deref::deref(region).bitmap().get_and_reset();
            if bits.len() < vmm.len() {
                bits.resize(vmm.len(), 0);
            }
            for (b, v) in bits.iter_mut().zip(vmm) {
                *b |= v;
            }
        }
        Ok(pages)
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
        // One guard for both: a second lock() in this expression would wait for the first.
        let i8042 = self.i8042.lock().expect("i8042 lock poisoned");
        Ok(DeviceStates {
            serial: self
                .serial
                .lock()
                .expect("serial lock poisoned")
                .save_state(),
            rtc: self.rtc.lock().expect("rtc lock poisoned").save_state(),
            i8042: i8042.save_state(),
            i8042_keyboard: i8042.save_keyboard_state(),
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
    {
        let mut i8042 = i8042.lock().expect("i8042 lock poisoned");
        i8042.restore_state(&saved.i8042);
        i8042
            .restore_keyboard_state(&saved.i8042_keyboard)
            .map_err(|e| bad(&e))?;
    }
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
