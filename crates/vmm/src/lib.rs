//! The virtual machine monitor: builds a VM from a [`config::VmConfig`] on a vCPU back end and
//! runs it to the end, with its serial console on the terminal.
//!
//! Threads: the caller's thread builds the VM and waits for events; one thread per vCPU; one
//! console thread copying stdin to the guest; one thread waiting for termination signals.

pub mod config;
mod console;
pub mod controller;
mod event_loop;
pub mod snapshot;
mod vcpu;
mod virtio_devices;
mod vm;

use std::path::PathBuf;
use std::sync::mpsc::Sender;

use config::{Backend, ConfigError, VmConfig};
use hypervisor::kvm::KvmHypervisor;
use hypervisor::{Hypervisor, HypervisorError};

/// Exit code for bad input from the user.
pub const EXIT_USAGE: i32 = 2;
/// Exit code when the guest reset the machine and `--on-reboot exit` is in force.
pub const EXIT_GUEST_RESET: i32 = 3;
/// Exit code when a vCPU failed.
pub const EXIT_VCPU_FAILED: i32 = 4;
/// Exit code for an error of Ferrovisor itself.
pub const EXIT_INTERNAL: i32 = 1;

/// What made the guest reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetCause {
    /// The guest wrote a reset command to the i8042 or the ACPI reset register.
    Device,
    /// Triple fault: the CPU shut down.
    TripleFault,
    /// The hypervisor reported a reset.
    Hypervisor,
}

/// Events that end a VM run, sent to the thread that waits on the VM.
#[derive(Debug)]
pub enum VmEvent {
    PowerOff,
    Reset(ResetCause),
    VcpuFailed {
        id: u32,
        reason: String,
        /// Register dump of the failed vCPU.
        state: String,
    },
    /// A termination signal (SIGTERM, SIGINT, SIGHUP) reached the VMM.
    Signal(i32),
    /// The user typed Ctrl-A x on the console.
    ConsoleQuit,
    /// A control API request, answered by the VMM's main thread.
    Api(Box<api::ApiCall>),
    /// The control API killed the VM.
    Killed,
}

/// How `run` ended: the event that ended the last VM.
pub type Outcome = VmEvent;

impl VmEvent {
    /// The process exit code for this outcome (see docs/platform.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            VmEvent::PowerOff => 0,
            VmEvent::Reset(_) => EXIT_GUEST_RESET,
            VmEvent::VcpuFailed { .. } => EXIT_VCPU_FAILED,
            VmEvent::Signal(sig) => 128 + sig,
            // As if the user had pressed Ctrl-C in a terminal that was not in raw mode.
            VmEvent::ConsoleQuit => 128 + libc::SIGINT,
            // What was asked for happened.
            VmEvent::Killed => 0,
            // Not an outcome: requests are answered, not returned.
            VmEvent::Api(_) => EXIT_INTERNAL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the {what} {path:?}")]
    OpenFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hypervisor")]
    Hypervisor(#[source] HypervisorError),
    #[error("cannot allocate guest memory")]
    AllocateMemory(#[source] vm_memory::mmap::FromRangesError),
    #[error("cannot access guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot load the guest")]
    Boot(#[source] arch::linux::LinuxBootError),
    #[error("cannot write the boot page tables")]
    BootTables(#[source] arch::boot::BootError),
    #[error("cannot build the ACPI tables")]
    Acpi(#[source] arch::acpi::AcpiError),
    #[error("cannot place a device")]
    Bus(#[source] devices::bus::BusError),
    #[error("cannot start a thread")]
    SpawnThread(#[source] std::io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Disk(virtio::block::DiskError),
    #[error(transparent)]
    Tap(virtio::net::TapError),
    #[error(transparent)]
    Vsock(virtio::vsock::VsockError),
    #[error(transparent)]
    Balloon(virtio::balloon::BalloonError),
    #[error("cannot set up a virtio device")]
    Virtio(#[source] virtio::pci::TransportError),
    #[error("cannot plug a device into the PCI bus")]
    Pci(#[source] devices::pci::PciError),
    #[error("cannot set up the device event loop")]
    EventLoop(#[source] std::io::Error),
    #[error(transparent)]
    Snapshot(snapshot::SnapshotError),
    #[error("cannot map the snapshot's memory file: {0}")]
    MapSnapshotMemory(String),
    #[error("cannot save the VM: {0}")]
    SaveState(String),
    #[error("cannot take this snapshot: {0}")]
    SnapshotRefused(String),
    #[error("cannot restore the VM: {0}")]
    RestoreState(String),
    #[error("cannot serve the control API")]
    Api(#[source] api::ServerError),
}

impl VmmError {
    /// Whether the user can fix this (bad arguments, files, host limits): exit code 2.
    pub fn is_usage_error(&self) -> bool {
        use arch::linux::LinuxBootError as B;
        match self {
            VmmError::Config(_)
            | VmmError::OpenFile { .. }
            | VmmError::Disk(_)
            | VmmError::Tap(_) => true,
            VmmError::Hypervisor(e) => matches!(
                e,
                HypervisorError::OpenKvm(_)
                    | HypervisorError::KvmApiVersion(_)
                    | HypervisorError::MissingCapability(_)
                    | HypervisorError::StateBackend { .. }
                    | HypervisorError::BadState { .. }
            ),
            VmmError::Boot(e) => matches!(
                e,
                B::NotAKernel(_)
                    | B::NoLongModeEntry(_)
                    | B::KernelTooBig { .. }
                    | B::InitrdTooBig { .. }
                    | B::ReadKernel(_)
            ),
            VmmError::AllocateMemory(_) => true,
            VmmError::Vsock(e) => e.is_usage_error(),
            VmmError::Snapshot(_)
            | VmmError::RestoreState(_)
            | VmmError::SnapshotRefused(_)
            | VmmError::Api(_) => true,
            VmmError::Balloon(e) => e.is_usage_error(),
            _ => false,
        }
    }

    /// What the user can do about it, if there is a simple answer.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            VmmError::Hypervisor(HypervisorError::OpenKvm(e)) => Some(match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "KVM is not available: load kvm_intel or kvm_amd, or enable virtualization in the firmware"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "add your user to the kvm group (or run as root) to use /dev/kvm"
                }
                _ => "check that /dev/kvm works on this host",
            }),
            VmmError::OpenFile { .. } => Some("check the path"),
            VmmError::AllocateMemory(_) => Some("give the guest less memory"),
            _ => None,
        }
    }

    pub fn exit_code(&self) -> i32 {
        if self.is_usage_error() {
            EXIT_USAGE
        } else {
            EXIT_INTERNAL
        }
    }
}

/// The error and its causes on one line: "a: b: c".
pub fn error_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

/// Blocks the termination signals in this thread (and so in every thread it starts) and starts
/// a thread that waits for them and reports them as [`VmEvent::Signal`].
pub(crate) fn forward_termination_signals(events: Sender<VmEvent>) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise and fill it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; these calls only write to it and the signal mask of
    // this thread.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let ret = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if ret != 0 {
            return Err(std::io::Error::from_raw_os_error(ret));
        }
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and blocked in this thread; sigwait writes the
            // received signal number to `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0
                && events.send(VmEvent::Signal(sig)).is_err()
            {
                return;
            }
        })?;
    Ok(())
}

/// Boots the VM described by `config` and runs it until it powers off, resets (unless
/// restarting), fails, or a signal or the console ends it.
pub fn run(config: &VmConfig) -> Result<Outcome, VmmError> {
    controller::launch(controller::Launch {
        config: Some(config.clone()),
        ..Default::default()
    })
}

/// The back end for `backend`; `Auto` picks KVM only where hardware virtualization backs it,
/// and says which it chose and why on stderr.
pub(crate) fn choose_backend(backend: Backend) -> Result<Box<dyn Hypervisor>, VmmError> {
    match backend {
        Backend::Kvm => Ok(Box::new(
            KvmHypervisor::new().map_err(VmmError::Hypervisor)?,
        )),
        Backend::Emu => Ok(Box::new(emu::backend::EmuHypervisor::new())),
        Backend::Auto => {
            if KvmHypervisor::host_has_hardware_virtualization() {
                if let Ok(kvm) = KvmHypervisor::new() {
                    return Ok(Box::new(kvm));
                }
            }
            let why = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
                "KVM here is PVM, which cannot run unmodified kernels"
            } else {
                "no hardware virtualization behind /dev/kvm"
            };
            eprintln!("ferrovisor: using the emu back end ({why}); --backend kvm forces KVM");
            Ok(Box::new(emu::backend::EmuHypervisor::new()))
        }
    }
}
