//! hypervisor (placeholder)
