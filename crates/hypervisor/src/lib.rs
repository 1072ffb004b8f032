//! The seam between the VMM and whatever runs guest instructions.
//!
//! A [`Hypervisor`] creates [`Vm`]s; a `Vm` owns guest memory mappings, the interrupt
//! controller and [`Vcpu`]s; a `Vcpu` runs until the guest does something the VMM must handle,
//! described by a [`VcpuExit`]. The `kvm` back end implements these on `/dev/kvm`; the
//! emulator back end implements the same traits in user space. Nothing above this crate names
//! a KVM type.

pub mod kvm;
pub mod x86_64;

use std::io;
use std::sync::Arc;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as the VMM maps it: vm-memory's mmap regions with a dirty bitmap, which marks
/// every page the VMM's own code (devices, boot loading) writes through vm-memory, for diff
/// snapshots; pages the vCPUs write are tracked by the back end ([`Vm::take_dirty_log`]).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

pub use x86_64::{CpuidEntry, DescriptorTable, Fpu, MsrEntry, Regs, Segment, Sregs};

/// Which back end runs the vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Hardware-assisted, through /dev/kvm.
    Kvm,
    /// Ferrovisor's own x86-64 emulator.
    Emu,
}

/// Errors of the seam. Each variant names the operation; the OS error is the source.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] io::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks the required capability {0}")]
    MissingCapability(&'static str),
    #[error("cannot create the VM")]
    CreateVm(#[source] io::Error),
    #[error("cannot set up the VM's {0}")]
    VmSetup(&'static str, #[source] io::Error),
    #[error("cannot map guest memory at {addr:#x}")]
    MapMemory {
        addr: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u32, #[source] io::Error),
    #[error("cannot read the supported CPUID")]
    SupportedCpuid(#[source] io::Error),
    #[error("cannot {0} on the vCPU")]
    VcpuState(&'static str, #[source] io::Error),
    #[error("the saved compiled code {path} is not used: {why}")]
    SavedCode { path: String, why: String },
    #[error("KVM accepted only {set} of {total} MSRs (first rejected: {rejected:#x})")]
    SetMsrs {
        set: usize,
        total: usize,
        rejected: u32,
    },
    #[error("cannot set up interrupt line for GSI {0}")]
    IrqLine(u32, #[source] io::Error),
    #[error("cannot set up an MSI vector")]
    MsiVector(#[source] io::Error),
    #[error("cannot register an I/O event at {0:#x}")]
    IoEvent(u64, #[source] io::Error),
    #[error("running the vCPU failed")]
    Run(#[source] io::Error),
    #[error("cannot save the {0} state")]
    SaveState(&'static str, #[source] io::Error),
    #[error("cannot restore the {0} state")]
    RestoreState(&'static str, #[source] io::Error),
    #[error("the saved state is from the {found:?} back end; this is the {expected:?} back end")]
    StateBackend {
        expected: BackendKind,
        found: BackendKind,
    },
    #[error("the saved {what} state is not valid: {why}")]
    BadState { what: &'static str, why: String },
    #[error("this back end cannot {0}")]
    Unsupported(&'static str),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// A back end: the thing that creates VMs.
pub trait Hypervisor: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// The most vCPUs one VM may have.
    fn max_vcpus(&self) -> u32;
    /// The CPUID leaves this back end can present to a guest, before per-vCPU fix-ups.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
    /// Creates a VM with its interrupt controllers and timers (local APICs, I/O APIC, PIC, PIT).
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// Creates a VM as [`create_vm`](Hypervisor::create_vm) does, with `memory` already
    /// mapped as guest RAM and, if `log_writes`, its record of written pages started (see
    /// [`Vm::start_dirty_log`]).
    ///
    /// What a VMM should use: on KVM the first memory-slot change after the in-kernel
    /// interrupt controllers exist waits for a kernel grace period (about 6 ms measured under
    /// PVM, more than the rest of a snapshot restore), while slots set before them cost
    /// about 0.2 ms.
    ///
    /// # Safety
    /// As for [`Vm::map_memory`], for every region of `memory`.
    unsafe fn create_vm_with_memory(
        &self,
        memory: &[MemoryRegion],
        log_writes: bool,
    ) -> Result<Arc<dyn Vm>> {
        let vm = self.create_vm()?;
        for region in memory {
            // SAFETY: the caller guarantees what `map_memory` needs for every region.
            unsafe { vm.map_memory(*region) }?;
        }
        if log_writes {
            vm.start_dirty_log()?;
        }
        Ok(vm)
    }
}

/// Saved state of a vCPU or a VM, in its back end's own terms (KVM: what its `KVM_GET_*`
/// ioctls return; emu: the emulator's registers and platform devices). Serializable, so a
/// snapshot can store it; restorable only on the same kind of back end.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    pub backend: BackendKind,
    pub state: serde_json::Value,
}

impl SavedState {
    /// Wraps a back end's own serializable state.
    pub fn new<T: serde::Serialize>(
        backend: BackendKind,
        what: &'static str,
        state: &T,
    ) -> Result<SavedState> {
        let state = serde_json::to_value(state)
            .map_err(|e| HypervisorError::SaveState(what, io::Error::other(e)))?;
        Ok(SavedState { backend, state })
    }

    /// The back end's own state, checking that it came from `backend`.
    pub fn decode<T: serde::de::DeserializeOwned>(
        &self,
        backend: BackendKind,
        what: &'static str,
    ) -> Result<T> {
        if self.backend != backend {
            return Err(HypervisorError::StateBackend {
                expected: backend,
                found: self.backend,
            });
        }
        T::deserialize(&self.state).map_err(|e| HypervisorError::BadState {
            what,
            why: e.to_string(),
        })
    }
}

/// One guest RAM region to map.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRegion {
    pub slot: u32,
    pub guest_addr: GuestAddress,
    pub len_bytes: u64,
    /// Start of the host mapping backing this region.
    pub host_addr: u64,
}

/// Raises one edge-triggered interrupt on a guest interrupt input (a GSI).
pub trait IrqLine: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// A message-signalled interrupt as a PCI device sends it: a write of `data` to `addr`
/// (`0xfeeX_XXXX` on x86: destination APIC in the address, vector and delivery mode in the data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// One MSI vector of a device (an MSI-X table entry): the VMM programs the message the guest
/// wrote into it, and device back ends trigger it from any thread. KVM routes a GSI to the
/// message and raises it through an irqfd; the emulator delivers it to its local APICs.
pub trait MsiVector: Send + Sync {
    /// Sets the message the next [`trigger`](MsiVector::trigger)s send.
    fn set_message(&self, msg: MsiMessage) -> io::Result<()>;
    /// Sends the message once.
    fn trigger(&self) -> io::Result<()>;
}

/// A virtual machine: memory, interrupt controllers, vCPUs.
pub trait Vm: Send + Sync {
    /// Makes `region` guest RAM.
    ///
    /// # Safety
    /// `region.host_addr .. + len_bytes` must be a valid, writable host mapping that outlives
    /// the VM: the guest (and the back end) read and write it directly.
    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()>;
    /// An interrupt line wired to `gsi` of the VM's interrupt controllers.
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>>;
    /// A new MSI vector, not yet programmed (triggering it before `set_message` is harmless).
    fn msi_vector(&self) -> Result<Arc<dyn MsiVector>>;
    /// Signals `evt` on every guest write to the MMIO address `addr` (any size), instead of
    /// a vCPU exit: how virtio queue notifications reach the device back ends without going
    /// through the vCPU threads' exit path.
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<()>;
    /// Undoes [`register_ioevent`](Vm::register_ioevent) (the address moved, or the device
    /// went away).
    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<()>;
    /// Creates vCPU `id` (also its initial APIC ID).
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// The guest's wall-clock time now, in nanoseconds since the Unix epoch: what devices that
    /// show the date (the CMOS RTC) read. The host's wall clock unless the back end keeps its
    /// own guest time, as the emulator's deterministic mode does.
    fn wall_clock_ns(&self) -> u64 {
        host_wall_clock_ns()
    }
    /// The VM-wide state outside the vCPUs: interrupt controllers (PIC, I/O APIC), PIT,
    /// guest clock. Called only while no vCPU runs (every vCPU thread stopped after the
    /// completing `run` described at [`Vcpu::save_state`]).
    fn save_state(&self) -> Result<SavedState> {
        Err(HypervisorError::Unsupported("save VM state"))
    }
    /// Puts back what [`save_state`](Vm::save_state) returned, on a VM built the same way
    /// (same memory layout) whose vCPUs are all created but not yet run or restored.
    /// `advance_clock_ns` moves the guest clock forward by that much on top of the saved
    /// time (0: the guest sees no time pass while it was saved).
    fn restore_state(&self, state: &SavedState, advance_clock_ns: u64) -> Result<()> {
        let _ = (state, advance_clock_ns);
        Err(HypervisorError::Unsupported("restore VM state"))
    }
    /// Starts recording which guest RAM pages the vCPUs write (for diff snapshots). Writes
    /// the VMM's own device threads make are not included: the VMM tracks those itself.
    fn start_dirty_log(&self) -> Result<()> {
        Err(HypervisorError::Unsupported("track dirty pages"))
    }
    /// The pages written since [`start_dirty_log`](Vm::start_dirty_log) or the previous
    /// call, and starts a new record: one bitmap per mapped region in slot order, bit `i` of
    /// word `i / 64` for the 4 KiB page at region offset `i * 4096`. Called only while no
    /// vCPU runs.
    fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>> {
        Err(HypervisorError::Unsupported("track dirty pages"))
    }
    /// Stops recording written pages.
    fn stop_dirty_log(&self) -> Result<()> {
        Err(HypervisorError::Unsupported("track dirty pages"))
    }
}

/// The host's wall-clock time in nanoseconds since the Unix epoch (0 if the host clock is set
/// before it).
pub fn host_wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What made a vCPU stop running guest code.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `in` from `port`: fill `data`.
    IoIn { port: u16, data: &'a mut [u8] },
    /// `out` of `data` to `port`.
    IoOut { port: u16, data: &'a [u8] },
    /// A read of an address with no RAM: fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// A write to an address with no RAM.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// The guest halted and the back end does not handle HLT itself.
    Halt,
    /// Triple fault: the CPU shut down; a PC resets.
    Shutdown,
    /// The back end reports a machine-level event (PSCI-style reset/shutdown, guest crash).
    SystemEvent(SystemEvent),
    /// The run was interrupted by [`kick_current_thread`] or a signal; nothing to emulate.
    Interrupted,
    /// The back end could not run the guest further (KVM: internal or emulation error).
    InternalError { suberror: u32, data: Vec<u64> },
    /// Entering the guest failed (invalid guest state).
    FailEntry { reason: u64 },
    /// An exit this VMM does not handle.
    Unhandled(u32),
}

/// Machine-level events a back end may report from a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemEvent {
    Shutdown,
    Reset,
    Crash,
}

/// A virtual CPU. Lives on, and is only used from, its own thread.
pub trait Vcpu: Send {
    /// Runs guest code until the next exit. Returns [`VcpuExit::Interrupted`] promptly if
    /// [`kick_current_thread`] ran on this thread (from a signal handler) since the last run.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    fn regs(&self) -> Result<Regs>;
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    fn sregs(&self) -> Result<Sregs>;
    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()>;
    fn set_fpu(&mut self, fpu: &Fpu) -> Result<()>;
    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()>;
    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()>;
    /// Wires the local APIC's LINT0 to ExtINT and LINT1 to NMI, as firmware does on a PC.
    fn setup_lapic_lints(&mut self) -> Result<()>;
    /// Sets the vCPU runnable (the bootstrap processor) or waiting for a STARTUP IPI.
    fn set_runnable(&mut self, runnable: bool) -> Result<()>;
    /// Everything needed to resume this vCPU elsewhere: registers, special registers,
    /// FPU/XSAVE, XCRs, MSRs, CPUID, local APIC, MP state, pending events.
    ///
    /// The caller first completes any half-done exit: after handling an exit it calls
    /// [`kick_current_thread`] and then [`run`](Vcpu::run), which finishes the instruction
    /// that exited (an `in` gets its data) and returns [`VcpuExit::Interrupted`] without
    /// running further guest code.
    fn save_state(&self) -> Result<SavedState> {
        Err(HypervisorError::Unsupported("save vCPU state"))
    }
    /// Puts back what [`save_state`](Vcpu::save_state) returned, on a freshly created vCPU
    /// with the same ID (instead of the boot setup: CPUID, MSRs, LINTs, registers).
    fn restore_state(&mut self, state: &SavedState) -> Result<()> {
        let _ = state;
        Err(HypervisorError::Unsupported("restore vCPU state"))
    }
    /// Writes what the back end compiled for this vCPU (the emulator's blocks) to `out`, for
    /// VMs restored from the same snapshot to share instead of each compiling its own.
    /// False, with nothing written, for a back end that compiles nothing.
    fn save_code(&self, out: &mut std::fs::File) -> Result<bool> {
        let _ = out;
        Ok(false)
    }
    /// Uses code a [`save_code`](Vcpu::save_code) wrote (`path` names it in errors), on a
    /// vCPU that has not run yet. The back end checks each piece before running it; on an
    /// error the vCPU is as it was and compiles its own.
    fn adopt_code(&mut self, file: &std::fs::File, path: &std::path::Path) -> Result<()> {
        let _ = (file, path);
        Ok(())
    }
}

/// Makes the vCPU of the calling thread return [`VcpuExit::Interrupted`] from its current or
/// next [`Vcpu::run`]. Async-signal-safe: meant to be called from the VMM's kick-signal
/// handler on a vCPU thread.
pub fn kick_current_thread() {
    KICKED.with(|k| k.set(true));
    kvm::kick_current_thread();
}

thread_local! {
    /// Set by [`kick_current_thread`]; back ends that run guest code in user space poll it.
    /// Const-initialised, so the signal handler never allocates.
    static KICKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Returns and clears this thread's kick flag (for user-space back ends).
pub fn take_kick() -> bool {
    KICKED.with(|k| k.replace(false))
}

/// Whether this thread was kicked, without clearing the flag.
pub fn kicked() -> bool {
    KICKED.with(|k| k.get())
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::host_wall_clock_ns;

    #[test]
    fn host_wall_clock_is_unix_time() {
        let unix_ns = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        };
        let before = unix_ns();
        let now = u128::from(host_wall_clock_ns());
        let after = unix_ns();
        assert!(
            (before..=after).contains(&now),
            "{before} <= {now} <= {after}"
        );
    }
}
