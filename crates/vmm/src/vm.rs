//! Building one VM from a [`VmConfig`] — memory, kernel, boot structures, devices, vCPUs — and
//! running it until something stops it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use arch::boot::EntryProtocol;
use arch::linux::InitrdRegion;
use devices::acpi::{AcpiPm, ACPI_PM_PORT_LEN, ACPI_SLEEP_CONTROL_PORT};
use devices::bus::Bus;
use devices::legacy::i8042::{I8042_DATA_PORT, I8042_PORT_LEN};
use devices::legacy::rtc::{RTC_INDEX_PORT, RTC_PORT_LEN};
use devices::legacy::serial::{COM1_BASE, COM1_IRQ, SERIAL_PORT_LEN};
use devices::legacy::{Rtc, Serial, I8042};
use devices::pci::{PciRoot, PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN};
use devices::{GuestEvent, GuestEventSink, InterruptLine};
use hypervisor::{Fpu, Hypervisor, IrqLine, MemoryRegion, Vcpu};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;

use crate::config::VmConfig;
use crate::console::ConsoleTarget;
use crate::event_loop::{EventLoop, RunningLoop};
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

/// A built VM, ready to run. Field order is drop order: vCPUs and the VM go before the
/// memory they map.
pub struct Vm {
    /// The device event loop: stopped first, so no device touches guest memory after.
    _device_loop: RunningLoop,
    vcpus: Vec<Box<dyn Vcpu>>,
    _vm: Arc<dyn hypervisor::Vm>,
    _mem: GuestMemoryMmap,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    /// PCI bus 0; devices plugged in here get their BARs mapped on `mmio_bus`. The pio bus
    /// holds it too, for the configuration ports.
    _pci: Arc<Mutex<PciRoot>>,
    events: Sender<VmEvent>,
    stop: Arc<AtomicBool>,
}

fn open(path: &std::path::Path, what: &'static str) -> Result<File, VmmError> {
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

impl Vm {
    pub fn build(
        hv: &dyn Hypervisor,
        config: &VmConfig,
        events: Sender<VmEvent>,
        console: &ConsoleTarget,
    ) -> Result<Vm, VmmError> {
        let mut kernel_file = open(&config.kernel, "kernel")?;
        let mut initrd_file = config
            .initrd
            .as_deref()
            .map(|p| open(p, "initrd"))
            .transpose()?;

        let vm = hv.create_vm().map_err(VmmError::Hypervisor)?;
        let mem_bytes = config.memory.bytes;
        let regions: Vec<_> = arch::e820::ram_regions(mem_bytes)
            .into_iter()
            .map(|(addr, len)| (addr, len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&regions).map_err(VmmError::AllocateMemory)?;
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

        let kernel =
            arch::linux::load_kernel(&mem, mem_bytes, &mut kernel_file).map_err(VmmError::Boot)?;
        if let Some(max) = kernel
            .setup_header
            .map(|h| h.cmdline_size as usize)
            .filter(|&m| m > 0)
        {
            if config.cmdline.len() > max {
                return Err(VmmError::Config(
                    crate::config::ConfigError::CmdlineTooLong {
                        len: config.cmdline.len(),
                        max,
                    },
                ));
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
                let addr = arch::linux::place_initrd(mem_bytes, &kernel, len_bytes)
                    .map_err(VmmError::Boot)?;
                mem.read_exact_volatile_from(addr, file, len_bytes as usize)
                    .map_err(VmmError::GuestMemory)?;
                Some(InitrdRegion { addr, len_bytes })
            }
            None => None,
        };
        let cmdline = CString::new(config.cmdline.as_str())
            .map_err(|_| VmmError::Config(crate::config::ConfigError::CmdlineNul))?;
        arch::linux::write_cmdline(&mem, &cmdline).map_err(VmmError::Boot)?;
        arch::boot::write_boot_tables(&mem).map_err(VmmError::BootTables)?;
        let pci_window = arch::layout::PCI_MMIO_START.0..arch::layout::PCI_MMIO_END.0;
        let acpi = arch::acpi::AcpiConfig {
            pci_mmio: Some(arch::acpi::PciMmioWindow {
                start: vm_memory::GuestAddress(pci_window.start),
                len_bytes: pci_window.end - pci_window.start,
            }),
            ..arch::acpi::AcpiConfig::new(config.cpus as u8)
        };
        let rsdp = arch::acpi::create_acpi_tables(&mem, &acpi).map_err(VmmError::Acpi)?;
        let e820 = arch::e820::e820_map(mem_bytes);
        let info = match kernel.protocol {
            EntryProtocol::Linux64 => arch::linux::write_boot_params(
                &mem,
                &kernel,
                cmdline.as_bytes().len(),
                initrd,
                &e820,
                rsdp,
            ),
            EntryProtocol::Pvh => arch::linux::write_pvh_start_info(&mem, initrd, &e820, rsdp),
        }
        .map_err(VmmError::Boot)?;
        let boot_state = arch::boot::entry_state(kernel.protocol, kernel.entry, info);

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
        insert(
            Arc::new(Mutex::new(I8042::new(sink.clone()))),
            I8042_DATA_PORT,
            I8042_PORT_LEN,
        )?;
        // The RTC shows the guest's wall clock. It holds the VM weakly: the bus is dropped after
        // the guest memory, and the hypervisor VM must not outlive the memory it maps.
        let clock_vm = Arc::downgrade(&vm);
        let wall_clock = Box::new(move || {
            clock_vm
                .upgrade()
                .map_or_else(hypervisor::host_wall_clock_ns, |vm| vm.wall_clock_ns())
        });
        insert(
            Arc::new(Mutex::new(Rtc::new(wall_clock))),
            RTC_INDEX_PORT,
            RTC_PORT_LEN,
        )?;
        insert(
            Arc::new(Mutex::new(AcpiPm::new(sink))),
            ACPI_SLEEP_CONTROL_PORT,
            ACPI_PM_PORT_LEN,
        )?;
        let pci = Arc::new(Mutex::new(PciRoot::new(mmio_bus.clone(), pci_window)));
        insert(pci.clone(), PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN)?;
        let mut device_loop = EventLoop::new().map_err(VmmError::EventLoop)?;
        crate::virtio_devices::attach_devices(config, &vm, &mem, &pci, &mut device_loop)?;
        let input = serial.lock().expect("serial lock poisoned").input();
        *console.lock().expect("console target lock poisoned") = Some((serial, input));

        let supported = hv.supported_cpuid().map_err(VmmError::Hypervisor)?;
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for id in 0..config.cpus {
            let mut vcpu = vm.create_vcpu(id).map_err(VmmError::Hypervisor)?;
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
            vcpus.push(vcpu);
        }

        Ok(Vm {
            _device_loop: device_loop.start().map_err(VmmError::EventLoop)?,
            vcpus,
            _vm: vm,
            _mem: mem,
            pio_bus,
            mmio_bus,
            _pci: pci,
            events,
            stop,
        })
    }

    /// Starts the vCPUs and waits for the first event that ends this VM; stops and joins the
    /// vCPU threads before returning it.
    pub fn run(mut self, events: &Receiver<VmEvent>) -> Result<VmEvent, VmmError> {
        let stop = self.stop.clone();
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let ctx = VcpuContext {
                id: id as u32,
                pio_bus: self.pio_bus.clone(),
                mmio_bus: self.mmio_bus.clone(),
                stop: stop.clone(),
                events: self.events.clone(),
            };
            match vcpu::spawn(vcpu, ctx) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_all(&stop, threads);
                    return Err(VmmError::SpawnThread(e));
                }
            }
        }
        let event = events
            .recv()
            .expect("the VM holds a sender, so the channel stays open");
        stop_all(&stop, threads);
        Ok(event)
    }
}

fn stop_all(stop: &AtomicBool, threads: Vec<std::thread::JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for t in &threads {
        // A thread that already ended cannot be signalled; that is fine.
        let _ = t.kill(vcpu::kick_signal());
    }
    for t in threads {
        let _ = t.join();
    }
}
