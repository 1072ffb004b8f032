//! The `kvm` back end's interrupt and notification plumbing for virtio devices, on /dev/kvm:
//! MSI vectors (GSI routes rewritten with every message, raised through irqfds) and I/O
//! events (a guest's MMIO write signals an eventfd instead of exiting). SKIPPED without
//! /dev/kvm.

use hypervisor::kvm::KvmHypervisor;
use hypervisor::{Hypervisor, MemoryRegion, MsiMessage, VcpuExit};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

fn kvm() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIPPED kvm_msi_ioevent: /dev/kvm is not usable: {e}");
            None
        }
    }
}

#[test]
fn msi_vectors_take_messages_and_fire() {
    let Some(hv) = kvm() else { return };
    let vm = hv.create_vm().expect("create a VM");
    let vectors: Vec<_> = (0..4)
        .map(|_| vm.msi_vector().expect("MSI vector"))
        .collect();
    for (i, v) in vectors.iter().enumerate() {
        // Each message rewrites the whole routing table (irqchip routes + every MSI).
        v.set_message(MsiMessage {
            addr: 0xfee0_0000,
            data: 0x40 + i as u32,
        })
        .expect("KVM takes the GSI routing table");
        v.trigger().expect("irqfd write");
    }
    vectors[1]
        .set_message(MsiMessage {
            addr: 0xfee0_1000,
            data: 0x51,
        })
        .expect("reprogramming a vector");
}

#[test]
fn a_guest_write_to_an_io_event_address_signals_it_without_an_exit() {
    let Some(hv) = kvm() else { return };
    let vm = hv.create_vm().expect("create a VM");
    // Two pages of RAM at 0; the event address 0x8000 is not RAM.
    let len = 0x2000usize;
    // SAFETY: a fresh anonymous mapping; checked below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    // Real mode at 0x1000: mov byte [0x8000], 1; mov al, 0x42; out 0x80, al.
    let code: [u8; 9] = [0xc6, 0x06, 0x00, 0x80, 0x01, 0xb0, 0x42, 0xe6, 0x80];
    // SAFETY: the mapping is `len` bytes; the code goes at offset 0x1000, well inside it.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), host.cast::<u8>().add(0x1000), code.len())
    };
    // SAFETY: the mapping lives until the end of the test, after the VM is dropped.
    unsafe {
        vm.map_memory(MemoryRegion {
            slot: 0,
            guest_addr: GuestAddress(0),
            len_bytes: len as u64,
            host_addr: host as u64,
        })
    }
    .expect("map guest memory");
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_ioevent(&evt, 0x8000)
        .expect("register the I/O event");

    let mut vcpu = vm.create_vcpu(0).expect("create a vCPU");
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    let exit = vcpu.run().expect("run the vCPU");
    match exit {
        VcpuExit::IoOut { port: 0x80, data } => assert_eq!(data, &[0x42]),
        other => panic!("expected the OUT after the write, got {other:?} (the write exited?)"),
    }
    assert_eq!(evt.read().expect("the write signalled the event"), 1);
    drop(vcpu);
    vm.unregister_ioevent(&evt, 0x8000).expect("unregister");
    drop(vm);
    // SAFETY: unmapping what was mapped above; nothing refers to it any more.
    unsafe { libc::munmap(host, len) };
}
