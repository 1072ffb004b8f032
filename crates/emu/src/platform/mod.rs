//! The platform pieces KVM provides in the kernel, in user space: local APIC, I/O APIC, PIT,
//! legacy PIC, kvm-clock and the time source they share.
