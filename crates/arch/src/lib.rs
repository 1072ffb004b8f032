//! x86-64 platform setup shared by every vCPU back end: the memory layout, the e820 map, the
//! Linux and PVH boot state, ACPI tables and CPUID fix-ups.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod e820;
pub mod layout;
pub mod linux;
pub mod msr;
