//! vCPU threads: each runs its vCPU until the VM stops, handling exits on the way.
//!
//! Stopping: the VMM sets the shared `stop` flag, then sends [`kick_signal`] to every vCPU
//! thread. The signal handler makes the current or next `run` return `Interrupted`, after
//! which the loop sees the flag. Flag first, signal second, so no kick is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use devices::bus::Bus;
use hypervisor::{SystemEvent, Vcpu, VcpuExit};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{ResetCause, VmEvent};

/// The real-time signal used to kick vCPU threads out of `run`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    hypervisor::kick_current_thread();
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What a vCPU thread needs besides its vCPU.
pub struct VcpuContext {
    pub id: u32,
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub stop: Arc<AtomicBool>,
    pub events: Sender<VmEvent>,
}

/// Starts a thread running `vcpu`; joining it gives the vCPU back, stopped between two runs
/// with any half-done exit completed (so its state can be saved, or it can run again).
pub fn spawn(vcpu: Box<dyn Vcpu>, ctx: VcpuContext) -> std::io::Result<JoinHandle<Box<dyn Vcpu>>> {
    thread::Builder::new()
        .name(format!("vcpu{}", ctx.id))
        .spawn(move || run_loop(vcpu, ctx))
}

/// Why the loop ended, if the VM must hear about it.
enum Stop {
    Event(VmEvent),
    Requested,
}

fn run_loop(mut vcpu: Box<dyn Vcpu>, ctx: VcpuContext) -> Box<dyn Vcpu> {
    let stop = loop {
        if ctx.stop.load(Ordering::Acquire) {
            break Stop::Requested;
        }
        if let Some(stop) = run_once(vcpu.as_mut(), &ctx) {
            break stop;
        }
    };
    if let Stop::Event(event) = stop {
        let event = match event {
            VmEvent::VcpuFailed { id, reason, .. } => VmEvent::VcpuFailed {
                id,
                reason,
                state: describe_state(vcpu.as_ref()),
            },
            other => other,
        };
        // The receiver only goes away once every vCPU thread is joined.
        let _ = ctx.events.send(event);
    }
    settle(vcpu.as_mut());
    vcpu
}

/// Completes the exit the vCPU last returned (an `in` gets its data, KVM finishes the
/// instruction) without running guest code further: what [`Vcpu::save_state`] expects.
fn settle(vcpu: &mut dyn Vcpu) {
    hypervisor::kick_current_thread();
    match vcpu.run() {
        Ok(VcpuExit::Interrupted) => {}
        Ok(exit) => tracing::warn!("vCPU: a kicked run returned {exit:?}, not Interrupted"),
        Err(e) => tracing::warn!("vCPU: cannot complete the last exit: {e}"),
    }
}

/// Runs the vCPU once and handles the exit; `Some` when this vCPU must stop.
fn run_once(vcpu: &mut dyn Vcpu, ctx: &VcpuContext) -> Option<Stop> {
    let failed = |reason: String| {
        Some(Stop::Event(VmEvent::VcpuFailed {
            id: ctx.id,
            reason,
            state: String::new(),
        }))
    };
    match vcpu.run() {
        Ok(VcpuExit::IoIn { port, data }) => {
            if ctx.pio_bus.read(u64::from(port), data).is_err() {
                // No device: the bus floats high, as on a PC.
                data.fill(0xff);
            }
        }
        Ok(VcpuExit::IoOut { port, data }) => {
            // Writes to ports without a device are dropped, as on a PC (Linux writes to 0x80
            // for I/O delays, for instance).
            let _ = ctx.pio_bus.write(u64::from(port), data);
        }
        Ok(VcpuExit::MmioRead { addr, data }) => {
            if ctx.mmio_bus.read(addr, data).is_err() {
                data.fill(0xff);
            }
        }
        Ok(VcpuExit::MmioWrite { addr, data }) => {
            let _ = ctx.mmio_bus.write(addr, data);
        }
        Ok(VcpuExit::Interrupted) => {}
        Ok(VcpuExit::Shutdown) => {
            return Some(Stop::Event(VmEvent::Reset(ResetCause::TripleFault)));
        }
        Ok(VcpuExit::SystemEvent(SystemEvent::Reset)) => {
            return Some(Stop::Event(VmEvent::Reset(ResetCause::Hypervisor)));
        }
        Ok(VcpuExit::SystemEvent(SystemEvent::Shutdown)) => {
            return Some(Stop::Event(VmEvent::PowerOff));
        }
        Ok(VcpuExit::SystemEvent(SystemEvent::Crash)) => {
            return failed("the hypervisor reported a guest crash".into());
        }
        Ok(VcpuExit::Halt) => {
            return failed("the vCPU halted and the hypervisor does not wake it".into());
        }
        Ok(VcpuExit::InternalError { suberror, data }) => {
            let what = match suberror {
                1 => "emulation failure",
                2 => "simultaneous exceptions",
                3 => "delivery event failure",
                4 => "unexpected exit reason",
                _ => "unknown suberror",
            };
            return failed(format!(
                "internal error {suberror} ({what}), data {data:x?}"
            ));
        }
        Ok(VcpuExit::FailEntry { reason }) => {
            return failed(format!(
                "KVM could not enter the guest (hardware entry failure reason {reason:#x})"
            ));
        }
        Ok(VcpuExit::Unhandled(reason)) => {
            return failed(format!("unhandled KVM exit reason {reason}"));
        }
        Err(e) => return failed(format!("{e}: {}", source_of(&e))),
    }
    None
}

fn source_of(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

/// Registers and segments for a failure report.
fn describe_state(vcpu: &dyn Vcpu) -> String {
    let regs = vcpu
        .regs()
        .map(|r| r.to_string())
        .unwrap_or_else(|e| format!("registers unavailable: {e}"));
    let sregs = vcpu
        .sregs()
        .map(|s| s.to_string())
        .unwrap_or_else(|e| format!("special registers unavailable: {e}"));
    format!("{regs}\n{sregs}")
}
