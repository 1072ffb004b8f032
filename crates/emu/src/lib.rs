//! `emu`: Ferrovisor's x86-64 system emulator, a vCPU back end for hosts where hardware
//! virtualization is missing or unusable. It implements the same seam as `kvm`
//! (`hypervisor::{Hypervisor, Vm, Vcpu}`) so devices and boot code cannot tell them apart.

pub mod backend;
pub mod cpu;
pub mod cpuid;
pub mod memory;
pub mod platform;
pub mod testkit;
mod turns;
