//! The platform pieces KVM provides in the kernel, in user space: local APIC, I/O APIC, PIT,
//! legacy PIC, kvm-clock and the time source they share.
//!
//! Every model here is a plain state machine: no threads, no I/O, no knowledge of the CPU. The
//! vCPU threads call them with the current time (`now_ns`, from a [`clock::TimeSource`]), so
//! given the same calls they behave the same, which deterministic mode relies on.

pub mod clock;
pub mod ioapic;
pub mod kvmclock;
pub mod lapic;
pub mod msi;
pub mod pic;
pub mod pit;
