//! Devices the guest reaches through port I/O or MMIO, and the bus that routes accesses to them;
//! the PCI root bus that PCI devices plug into.
//!
//! Nothing here knows which vCPU back end runs the guest: devices raise interrupts through
//! [`InterruptLine`] and report machine-level events (power off, reset) through
//! [`GuestEventSink`]; the `vmm` crate wires both to the hypervisor.

use std::io;

pub mod acpi;
pub mod bus;
pub mod legacy;
pub mod pci;

/// A device on a [`bus::Bus`]. `offset` is relative to the base the device was inserted at.
///
/// Both calls come from vCPU threads on the exit path: they must not block for long, must not
/// allocate in steady state, and must never panic on a value the guest controls.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data` (unfilled bytes read as 0).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// An interrupt input of the guest's interrupt controller, as seen by a device.
///
/// Edge-triggered: each call delivers one interrupt. On KVM this is an irqfd; on the emulator a
/// direct call into its I/O APIC.
pub trait InterruptLine: Send + Sync {
    /// Raise the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// A saved device state that cannot be put back: which device, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot restore the {device} state: {why}")]
pub struct StateError {
    pub device: &'static str,
    pub why: String,
}

impl StateError {
    pub fn new(device: &'static str, why: impl Into<String>) -> Self {
        StateError {
            device,
            why: why.into(),
        }
    }
}

/// What the guest asked of the machine as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// ACPI S5: the guest powered off.
    PowerOff,
    /// The guest reset the machine (i8042, ACPI reset register).
    Reset,
}

/// Receives [`GuestEvent`]s from devices; the VMM stops or restarts the vCPUs in response.
pub trait GuestEventSink: Send + Sync {
    /// Called from a vCPU thread; must return promptly.
    fn notify(&self, event: GuestEvent);
}

#[cfg(test)]
pub(crate) mod test_utils {
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::{GuestEvent, GuestEventSink, InterruptLine};

    /// Counts interrupts; optionally fails every trigger (after counting it).
    #[derive(Default)]
    pub(crate) struct CountingInterrupt {
        count: AtomicUsize,
        fail: bool,
    }

    impl CountingInterrupt {
        pub(crate) fn failing() -> Self {
            CountingInterrupt {
                count: AtomicUsize::new(0),
                fail: true,
            }
        }

        pub(crate) fn count(&self) -> usize {
            self.count.load(Ordering::SeqCst)
        }
    }

    impl InterruptLine for CountingInterrupt {
        fn trigger(&self) -> io::Result<()> {
            self.count.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(io::Error::other("test interrupt line failure"));
            }
            Ok(())
        }
    }

    /// Records every event it is notified of.
    #[derive(Default)]
    pub(crate) struct RecordingSink(Mutex<Vec<GuestEvent>>);

    impl RecordingSink {
        pub(crate) fn events(&self) -> Vec<GuestEvent> {
            self.0.lock().unwrap().clone()
        }
    }

    impl GuestEventSink for RecordingSink {
        fn notify(&self, event: GuestEvent) {
            self.0.lock().unwrap().push(event);
        }
    }
}
