//! The `kvm` back end: hardware-assisted virtualization through /dev/kvm.
//!
//! Uses KVM's in-kernel local APICs, I/O APIC, PIC and PIT; interrupts from devices arrive
//! through irqfds.

mod convert;
mod snapshot;
pub mod state;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::ptr;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_mp_state, kvm_pit_config, kvm_run, kvm_userspace_memory_region,
    CpuId, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    BackendKind, CpuidEntry, Fpu, Hypervisor, HypervisorError, IrqLine, MemoryRegion, MsiMessage,
    MsiVector, MsrEntry, Regs, Result, SavedState, Sregs, SystemEvent, Vcpu, VcpuExit, Vm,
};

/// Where KVM keeps the (unused by Linux, but required on Intel) TSS and identity-map pages:
/// three pages just below the top of the 32-bit MMIO hole, clear of the APICs and devices.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Capabilities the back end cannot work without.
const REQUIRED_CAPS: [(Cap, &str); 8] = [
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

fn os_error(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// /dev/kvm, opened.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens /dev/kvm and checks that it offers what Ferrovisor needs.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::OpenKvm(os_error(e)))?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(HypervisorError::KvmApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        Ok(KvmHypervisor { kvm })
    }

    /// Whether the host CPU has hardware virtualization (VT-x or AMD-V) behind /dev/kvm, as
    /// opposed to a software back end such as PVM that cannot run unmodified kernels.
    pub fn host_has_hardware_virtualization() -> bool {
        std::path::Path::new("/sys/module/kvm_intel").exists()
            || std::path::Path::new("/sys/module/kvm_amd").exists()
    }
}

impl Hypervisor for KvmHypervisor {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus() as u32
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::SupportedCpuid(os_error(e)))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(convert::cpuid_from_kvm)
            .collect())
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        // SAFETY: no memory is mapped.
        unsafe { self.create_vm_with_memory(&[], false) }
    }

    unsafe fn create_vm_with_memory(
        &self,
        memory: &[MemoryRegion],
        log_writes: bool,
    ) -> Result<Arc<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| HypervisorError::CreateVm(os_error(e)))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| HypervisorError::VmSetup("TSS address", os_error(e)))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| HypervisorError::VmSetup("identity map address", os_error(e)))?;
        // Memory slots before the interrupt controllers: the first slot change after
        // KVM_CREATE_IRQCHIP waits for a grace period (see the trait method).
        let mut slots = MemorySlots {
            regions: BTreeMap::new(),
            dirty_log: log_writes,
        };
        for region in memory {
            // SAFETY: the caller guarantees the host range is a valid mapping that outlives
            // the VM.
            unsafe { set_region(&fd, region, log_writes) }.map_err(|source| {
                HypervisorError::MapMemory {
                    addr: region.guest_addr.0,
                    source,
                }
            })?;
            if region.len_bytes > 0 {
                slots.regions.insert(region.slot, *region);
            }
        }
        fd.create_irq_chip()
            .map_err(|e| HypervisorError::VmSetup("interrupt controllers", os_error(e)))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| HypervisorError::VmSetup("PIT", os_error(e)))?;
        let msr_list = snapshot::saved_msr_list(&self.kvm)
            .map_err(|e| HypervisorError::VmSetup("MSR list", e))?;
        Ok(Arc::new(KvmVm {
            fd: Arc::new(fd),
            routes: Arc::new(Mutex::new(MsiRoutes {
                next_gsi: FIRST_MSI_GSI,
                msi: BTreeMap::new(),
            })),
            memory: Mutex::new(slots),
            msr_list,
        }))
    }
}

/// A KVM virtual machine.
///
/// Locks: `routes` and `memory` are never held together.
pub struct KvmVm {
    fd: Arc<VmFd>,
    routes: Arc<Mutex<MsiRoutes>>,
    /// The mapped RAM regions, to set them again with or without dirty logging.
    memory: Mutex<MemorySlots>,
    /// The MSRs a vCPU snapshot tries to read (KVM's MSR index and feature lists).
    msr_list: Arc<[u32]>,
}

/// The VM's memory slots as mapped, and whether KVM logs writes to them.
#[derive(Default)]
struct MemorySlots {
    regions: BTreeMap<u32, MemoryRegion>,
    dirty_log: bool,
}

/// GSIs 0–23 are the I/O APIC's pins (0–15 also the PICs'); MSI vectors get GSIs above.
const IOAPIC_PINS: u32 = 24;
const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

/// The MSI part of the VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole table,
/// so every change writes the default irqchip routes again together with all MSI routes.
struct MsiRoutes {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

impl MsiRoutes {
    fn table(&self) -> Vec<kvm_irq_routing_entry> {
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
            e
        };
        let mut t = Vec::new();
        // What KVM_CREATE_IRQCHIP sets up: PIC pins for the ISA IRQs (2 is the cascade), and
        // the I/O APIC's pins.
        for gsi in 0..16 {
            if gsi != 2 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                t.push(irqchip(gsi, chip, gsi % 8));
            }
        }
        for gsi in 0..IOAPIC_PINS {
            t.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, m) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.addr as u32;
            e.u.msi.address_hi = (m.addr >> 32) as u32;
            e.u.msi.data = m.data;
            t.push(e);
        }
        t
    }

    fn apply(&self, fd: &VmFd) -> io::Result<()> {
        let table = KvmIrqRouting::from_entries(&self.table())
            .map_err(|_| io::Error::other("too many GSI routes"))?;
        fd.set_gsi_routing(&table).map_err(os_error)
    }
}

/// An MSI vector: a GSI routed to the programmed message, raised through an irqfd.
struct KvmMsiVector {
    fd: Arc<VmFd>,
    routes: Arc<Mutex<MsiRoutes>>,
    gsi: u32,
    evt: EventFd,
}

impl MsiVector for KvmMsiVector {
    fn set_message(&self, msg: MsiMessage) -> io::Result<()> {
        let mut routes = self.routes.lock().expect("GSI routes lock poisoned");
        if routes.msi.insert(self.gsi, msg) != Some(msg) {
            routes.apply(&self.fd)?;
        }
        Ok(())
    }

    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

struct KvmIrqLine {
    evt: EventFd,
}

impl IrqLine for KvmIrqLine {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

impl Vm for KvmVm {
    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()> {
        let mut memory = self.memory.lock().expect("memory slots lock poisoned");
        // SAFETY: the caller guarantees the host range is a valid mapping that outlives the VM.
        unsafe { set_region(&self.fd, &region, memory.dirty_log) }.map_err(|source| {
            HypervisorError::MapMemory {
                addr: region.guest_addr.0,
                source,
            }
        })?;
        if region.len_bytes == 0 {
            memory.regions.remove(&region.slot);
        } else {
            memory.regions.insert(region.slot, region);
        }
        Ok(())
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| HypervisorError::IrqLine(gsi, e))?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(|e| HypervisorError::IrqLine(gsi, os_error(e)))?;
        Ok(Arc::new(KvmIrqLine { evt }))
    }

    fn msi_vector(&self) -> Result<Arc<dyn MsiVector>> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(HypervisorError::MsiVector)?;
        let gsi = {
            let mut routes = self.routes.lock().expect("GSI routes lock poisoned");
            let gsi = routes.next_gsi;
            routes.next_gsi += 1;
            gsi
        };
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(|e| HypervisorError::MsiVector(os_error(e)))?;
        Ok(Arc::new(KvmMsiVector {
            fd: self.fd.clone(),
            routes: self.routes.clone(),
            gsi,
            evt,
        }))
    }

    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| HypervisorError::IoEvent(addr, os_error(e)))
    }

    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| HypervisorError::IoEvent(addr, os_error(e)))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let mut fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| HypervisorError::CreateVcpu(id, os_error(e)))?;
        let run = fd.get_kvm_run() as *mut kvm_run;
        Ok(Box::new(KvmVcpu {
            fd,
            run,
            vm: self.fd.clone(),
            msr_list: self.msr_list.clone(),
        }))
    }

    fn save_state(&self) -> Result<SavedState> {
        snapshot::save_vm(&self.fd)
    }

    fn restore_state(&self, state: &SavedState, advance_clock_ns: u64) -> Result<()> {
        snapshot::restore_vm(&self.fd, state, advance_clock_ns)
    }

    fn start_dirty_log(&self) -> Result<()> {
        self.set_dirty_log(true)
    }

    fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>> {
        let memory = self.memory.lock().expect("memory slots lock poisoned");
        if !memory.dirty_log {
            return Err(HypervisorError::SaveState(
                "dirty page log",
                io::Error::new(io::ErrorKind::InvalidInput, "dirty page logging is off"),
            ));
        }
        memory
            .regions
            .values()
            .map(|r| {
                let len = usize::try_from(r.len_bytes).expect("a mapped region fits in memory");
                self.fd
                    .get_dirty_log(r.slot, len)
                    .map_err(|e| HypervisorError::SaveState("dirty page log", os_error(e)))
            })
            .collect()
    }

    fn stop_dirty_log(&self) -> Result<()> {
        self.set_dirty_log(false)
    }
}

impl KvmVm {
    /// Sets every mapped region again with dirty logging on or off. On failure the regions set
    /// so far are put back as they were.
    fn set_dirty_log(&self, on: bool) -> Result<()> {
        let mut memory = self.memory.lock().expect("memory slots lock poisoned");
        let regions: Vec<MemoryRegion> = memory.regions.values().copied().collect();
        for (i, region) in regions.iter().enumerate() {
            // SAFETY: each region was mapped through `map_memory`, whose caller guaranteed a
            // valid host mapping that outlives the VM; only the flags change.
            if let Err(e) = unsafe { set_region(&self.fd, region, on) } {
                for done in &regions[..i] {
                    // SAFETY: as above. Best effort: the first error is what gets reported.
                    let _ = unsafe { set_region(&self.fd, done, memory.dirty_log) };
                }
                return Err(HypervisorError::VmSetup("dirty page log", e));
            }
        }
        memory.dirty_log = on;
        Ok(())
    }
}

/// Sets (or with a zero length removes) one KVM memory slot.
///
/// # Safety
/// `region.host_addr .. + len_bytes` must be a valid, writable host mapping that outlives the VM.
unsafe fn set_region(fd: &VmFd, region: &MemoryRegion, dirty_log: bool) -> io::Result<()> {
    let mem = kvm_userspace_memory_region {
        slot: region.slot,
        flags: if dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: region.guest_addr.0,
        memory_size: region.len_bytes,
        userspace_addr: region.host_addr,
    };
    // SAFETY: the caller guarantees the host range is a valid mapping that outlives the VM,
    // which is what KVM needs to let the guest access it.
    unsafe { fd.set_user_memory_region(mem) }.map_err(os_error)
}

thread_local! {
    /// The `kvm_run` page of the vCPU that last ran on this thread, for the kick signal
    /// handler. Const-initialised: reading it from a signal handler never allocates.
    static CURRENT_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// See [`crate::kick_current_thread`].
pub(crate) fn kick_current_thread() {
    CURRENT_RUN.with(|current| {
        let run = current.get();
        if !run.is_null() {
            // SAFETY: `run` is the mmap'ed kvm_run of a vCPU owned by this thread; it is
            // cleared before that vCPU is dropped. A volatile byte store is what KVM reads
            // on entry to KVM_RUN.
            unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
        }
    });
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    /// `fd`'s kvm_run mapping; valid as long as `fd` lives.
    run: *mut kvm_run,
    /// The VM, for capability checks.
    vm: Arc<VmFd>,
    /// The MSRs [`save_state`](Vcpu::save_state) tries to read.
    msr_list: Arc<[u32]>,
}

// SAFETY: `run` points into the vCPU's own mmap, which moves with `fd` between threads; it is
// only dereferenced by the thread that currently owns the vCPU.
unsafe impl Send for KvmVcpu {}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        CURRENT_RUN.with(|current| {
            if current.get() == self.run {
                current.set(ptr::null_mut());
            }
        });
    }
}

impl KvmVcpu {
    fn state_err(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> HypervisorError {
        move |e| HypervisorError::VcpuState(what, os_error(e))
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        let run = self.run;
        CURRENT_RUN.with(|current| current.set(run));
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: `run` is this vCPU's kvm_run (see the field); clearing
                // immediate_exit re-arms the kick for the next run.
                unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 0) };
                crate::take_kick();
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => return Err(HypervisorError::Run(os_error(e))),
        };
        Ok(match exit {
            KvmExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
            KvmExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
            KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
            KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
            KvmExit::Hlt => VcpuExit::Halt,
            KvmExit::Shutdown => VcpuExit::Shutdown,
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::FailEntry(reason, _cpu) => VcpuExit::FailEntry { reason },
            KvmExit::SystemEvent(kind, _) => VcpuExit::SystemEvent(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
                _ => SystemEvent::Crash,
            }),
            KvmExit::InternalError => {
                // SAFETY: KVM filled the `internal` member of the exit union for
                // KVM_EXIT_INTERNAL_ERROR; `ndata` is clamped to the array length.
                let internal = unsafe { (*run).__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                VcpuExit::InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                }
            }
            // SAFETY: reading the exit reason KVM wrote before returning from KVM_RUN.
            _ => VcpuExit::Unhandled(unsafe { (*run).exit_reason }),
        })
    }

    fn regs(&self) -> Result<Regs> {
        let r = self
            .fd
            .get_regs()
            .map_err(Self::state_err("read registers"))?;
        Ok(convert::regs_from_kvm(&r))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(Self::state_err("set registers"))
    }

    fn sregs(&self) -> Result<Sregs> {
        let s = self
            .fd
            .get_sregs()
            .map_err(Self::state_err("read special registers"))?;
        Ok(convert::sregs_from_kvm(&s))
    }

    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()> {
        // Start from KVM's current state so fields we do not model (the pending-interrupt
        // bitmap) keep their values.
        let mut s = self
            .fd
            .get_sregs()
            .map_err(Self::state_err("read special registers"))?;
        convert::sregs_to_kvm(sregs, &mut s);
        self.fd
            .set_sregs(&s)
            .map_err(Self::state_err("set special registers"))
    }

    fn set_fpu(&mut self, fpu: &Fpu) -> Result<()> {
        let mut f = self.fd.get_fpu().map_err(Self::state_err("read FPU"))?;
        f.fcw = fpu.fcw;
        f.mxcsr = fpu.mxcsr;
        self.fd.set_fpu(&f).map_err(Self::state_err("set FPU"))
    }

    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()> {
        let kvm_entries: Vec<_> = entries.iter().map(convert::cpuid_to_kvm).collect();
        let cpuid = CpuId::from_entries(&kvm_entries).map_err(|_| {
            HypervisorError::VcpuState("set CPUID", io::Error::from_raw_os_error(libc::E2BIG))
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(Self::state_err("set CPUID"))
    }

    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<_> = msrs
            .iter()
            .map(|m| kvm_bindings::kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        snapshot::set_msr_entries(&self.fd, &entries)
    }

    fn setup_lapic_lints(&mut self) -> Result<()> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DELIVERY_MODE_EXTINT: u32 = 0x7 << 8;
        const DELIVERY_MODE_NMI: u32 = 0x4 << 8;
        const DELIVERY_MODE_MASK: u32 = 0x7 << 8;
        let mut lapic = self.fd.get_lapic().map_err(Self::state_err("read LAPIC"))?;
        for (reg, mode) in [
            (APIC_LVT0, DELIVERY_MODE_EXTINT),
            (APIC_LVT1, DELIVERY_MODE_NMI),
        ] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !DELIVERY_MODE_MASK) | mode;
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(Self::state_err("set LAPIC"))
    }

    fn set_runnable(&mut self, runnable: bool) -> Result<()> {
        let mp_state = kvm_mp_state {
            mp_state: if runnable {
                KVM_MP_STATE_RUNNABLE
            } else {
                KVM_MP_STATE_UNINITIALIZED
            },
        };
        self.fd
            .set_mp_state(mp_state)
            .map_err(Self::state_err("set MP state"))
    }

    fn save_state(&self) -> Result<SavedState> {
        snapshot::save_vcpu(self)
    }

    fn restore_state(&mut self, state: &SavedState) -> Result<()> {
        snapshot::restore_vcpu(self, state)
    }
}
