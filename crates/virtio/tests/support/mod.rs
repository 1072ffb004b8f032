//! Test support shared by the integration tests: a VM that records what the transport asks
//! of the hypervisor, a PCI machine (root bus, MMIO bus, one virtio-pci function) driven
//! through configuration ports and BAR accesses as a guest would, and the driver side of a
//! split virtqueue.
//!
//! Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::io;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::pci::{PciRoot, PciRootState};
use devices::BusDevice;
use hypervisor::GuestMemoryMmap;
use hypervisor::{HypervisorError, IrqLine, MemoryRegion, MsiMessage, MsiVector, Vcpu, Vm};
use virtio::pci::{Notifications, VirtioPci, VirtioPciState};
use virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// An MSI vector that records its messages and what it sent.
#[derive(Default)]
pub struct Vector {
    /// The message each trigger sent.
    pub fired: Mutex<Vec<MsiMessage>>,
    /// The message programmed now.
    pub msg: Mutex<MsiMessage>,
    /// Every `set_message` call.
    pub programmed: Mutex<Vec<MsiMessage>>,
}

impl MsiVector for Vector {
    fn set_message(&self, msg: MsiMessage) -> io::Result<()> {
        *self.msg.lock().unwrap() = msg;
        self.programmed.lock().unwrap().push(msg);
        Ok(())
    }
    fn trigger(&self) -> io::Result<()> {
        let m = *self.msg.lock().unwrap();
        self.fired.lock().unwrap().push(m);
        Ok(())
    }
}

/// A VM that only hands out recording MSI vectors and records I/O event registrations.
#[derive(Default)]
pub struct FakeVm {
    pub vectors: Mutex<Vec<Arc<Vector>>>,
    /// Addresses with an I/O event registered.
    pub ioevents: Mutex<Vec<u64>>,
}

impl FakeVm {
    pub fn vector(&self, i: usize) -> Arc<Vector> {
        self.vectors.lock().unwrap()[i].clone()
    }

    pub fn fired(&self, i: usize) -> Vec<MsiMessage> {
        self.vector(i).fired.lock().unwrap().clone()
    }

    pub fn ioevents(&self) -> Vec<u64> {
        let mut v = self.ioevents.lock().unwrap().clone();
        v.sort_unstable();
        v
    }
}

fn unsupported() -> io::Error {
    io::Error::from(io::ErrorKind::Unsupported)
}

impl Vm for FakeVm {
    unsafe fn map_memory(&self, _region: MemoryRegion) -> hypervisor::Result<()> {
        Ok(())
    }
    fn irq_line(&self, gsi: u32) -> hypervisor::Result<Arc<dyn IrqLine>> {
        Err(HypervisorError::IrqLine(gsi, unsupported()))
    }
    fn msi_vector(&self) -> hypervisor::Result<Arc<dyn MsiVector>> {
        let v = Arc::new(Vector::default());
        self.vectors.lock().unwrap().push(v.clone());
        Ok(v)
    }
    fn register_ioevent(&self, _evt: &EventFd, addr: u64) -> hypervisor::Result<()> {
        self.ioevents.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister_ioevent(&self, _evt: &EventFd, addr: u64) -> hypervisor::Result<()> {
        let mut v = self.ioevents.lock().unwrap();
        if let Some(i) = v.iter().position(|&a| a == addr) {
            v.remove(i);
        }
        Ok(())
    }
    fn create_vcpu(&self, _id: u32) -> hypervisor::Result<Box<dyn Vcpu>> {
        Err(HypervisorError::Run(unsupported()))
    }
}

pub const MEM_SIZE: usize = 1 << 20;
/// The PCI MMIO window.
pub const WINDOW: std::ops::Range<u64> = 0xc000_0000..0xd000_0000;
/// Where the driver moves BAR 0 (away from where the root placed it).
pub const BAR: u64 = 0xc800_0000;

/// Offsets in BAR 0 (`virtio::pci`'s layout).
pub const DEVICE_STATUS: u64 = 0x14;
pub const ISR: u64 = 0x1000;
pub const DEVICE_CFG: u64 = 0x2000;
pub const NOTIFY: u64 = 0x3000;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x6000;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A copy of `mem`: what a restored VM gets from the snapshot's memory file.
pub fn copy_memory(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
    let copy = memory();
    let mut buf = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    copy.write_slice(&buf, GuestAddress(0)).unwrap();
    copy
}

/// What a snapshot of a [`Machine`] holds besides memory, as the VMM would store it.
pub struct Snapshot {
    pub root: String,
    pub pci: String,
}

/// A guest's view of one virtio-pci function on a PCI root bus: configuration mechanism #1
/// through the root's ports, BAR accesses through the MMIO bus.
pub struct Machine {
    pub vm: Arc<FakeVm>,
    pub mem: GuestMemoryMmap,
    pub mmio: Arc<Bus>,
    pub root: Arc<Mutex<PciRoot>>,
    pub pci: Arc<Mutex<VirtioPci>>,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub slot: u8,
    pub msix_cap: usize,
}

impl Machine {
    /// `device` plugged into a new bus, as the VMM builds it (nothing programmed yet).
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Machine {
        Self::build(mem, device, Notifications::EventLoop)
    }

    /// Likewise, serving queue notifications on the notifying thread.
    pub fn inline(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Machine {
        Self::build(mem, device, Notifications::Vcpu)
    }

    /// Likewise, serving queue notifications where `serve` says.
    pub fn build(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        serve: Notifications,
    ) -> Machine {
        let vm = Arc::new(FakeVm::default());
        let dyn_vm: Arc<dyn Vm> = vm.clone();
        let mmio = Arc::new(Bus::new());
        let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), WINDOW)));
        let transport = VirtioPci::new(device.clone(), mem.clone(), &dyn_vm)
            .unwrap()
            .with_notifications(serve);
        let pci = Arc::new(Mutex::new(transport));
        let slot = root.lock().unwrap().add_device(pci.clone()).unwrap();
        let mut m = Machine {
            vm,
            mem,
            mmio,
            root,
            pci,
            device,
            slot,
            msix_cap: 0,
        };
        // The MSI-X capability (ID 0x11) in the capability list.
        let byte = |m: &Machine, at: usize| (m.config_read(at / 4) >> (8 * (at % 4))) as u8;
        let mut at = usize::from(byte(&m, 0x34));
        while byte(&m, at) != 0x11 {
            at = usize::from(byte(&m, at + 1));
            assert_ne!(at, 0, "no MSI-X capability");
        }
        m.msix_cap = at;
        m
    }

    fn select(&self, reg: usize) {
        let address = 0x8000_0000 | (u32::from(self.slot) << 11) | ((reg as u32) << 2);
        self.root.lock().unwrap().write(0, &address.to_le_bytes());
    }

    pub fn config_read(&self, reg: usize) -> u32 {
        self.select(reg);
        let mut b = [0u8; 4];
        self.root.lock().unwrap().read(4, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn config_write(&self, reg: usize, value: u32) {
        self.select(reg);
        self.root.lock().unwrap().write(4, &value.to_le_bytes());
    }

    /// What firmware or the guest's PCI code does: BAR 0 moved to [`BAR`], memory decoding
    /// and bus mastering on.
    pub fn enumerate(&self) {
        self.config_write(4, BAR as u32);
        self.config_write(1, 0x6);
    }

    pub fn write(&self, offset: u64, value: u64, len: usize) {
        self.mmio
            .write(BAR + offset, &value.to_le_bytes()[..len])
            .unwrap();
    }

    pub fn read(&self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.mmio.read(BAR + offset, &mut b[..len]).unwrap();
        u64::from_le_bytes(b)
    }

    /// MSI-X on; table entry `entry` sends `data` to the boot CPU, masked or not.
    pub fn program_msix(&self, entry: u64, data: u32, masked: bool) {
        let at = MSIX_TABLE + 16 * entry;
        self.write(at, 0xfee0_0000, 4);
        self.write(at + 4, 0, 4);
        self.write(at + 8, u64::from(data), 4);
        self.write(at + 12, u64::from(masked), 4);
        let reg = self.msix_cap / 4;
        let value = self.config_read(reg) | 0x8000_0000;
        self.config_write(reg, value);
    }

    /// The MSI-X pending bits of entries 0..64.
    pub fn pba(&self) -> u64 {
        self.read(MSIX_PBA, 8)
    }

    /// The driver's set-up (virtio 1.2, 3.1.1): features `features`, then each of `rings`
    /// with its MSI-X vector, then DRIVER_OK; configuration changes on vector 0.
    pub fn start(&self, features: u64, rings: &[(&Ring, u16)]) {
        self.write(DEVICE_STATUS, 0, 1);
        self.write(DEVICE_STATUS, 3, 1);
        self.write(0x08, 0, 4);
        self.write(0x0c, features & 0xffff_ffff, 4);
        self.write(0x08, 1, 4);
        self.write(0x0c, features >> 32, 4);
        self.write(DEVICE_STATUS, 0xb, 1);
        assert_eq!(self.read(DEVICE_STATUS, 1), 0xb, "features accepted");
        self.write(0x10, 0, 2); // config_msix_vector
        for &(ring, vector) in rings {
            self.write(0x16, u64::from(ring.index), 2);
            self.write(0x18, u64::from(ring.size), 2);
            self.write(0x1a, u64::from(vector), 2);
            self.write(0x20, ring.desc(), 8);
            self.write(0x28, ring.avail(), 8);
            self.write(0x30, ring.used(), 8);
            self.write(0x1c, 1, 2);
        }
        self.write(DEVICE_STATUS, 0xf, 1);
        assert_eq!(self.read(DEVICE_STATUS, 1), 0xf, "device running");
    }

    /// The guest notifies queue `q` (the write reaches the transport: no hypervisor here to
    /// catch it at the I/O event).
    pub fn kick(&self, q: u16) {
        self.write(NOTIFY + 4 * u64::from(q), u64::from(q), 2);
    }

    /// One turn of the VMM's event loop over the queue events.
    pub fn serve_events(&self) {
        let events = self.pci.lock().unwrap().queue_events();
        for (i, evt) in events.iter().enumerate() {
            if evt.read().is_ok() {
                self.device.lock().unwrap().process_queue(i);
            }
        }
    }

    /// The root's and the function's state, through JSON as a snapshot file would carry
    /// them.
    pub fn snapshot(&self) -> Snapshot {
        let root = self.root.lock().unwrap().save_state();
        let pci = self.pci.lock().unwrap().save_state().unwrap();
        Snapshot {
            root: serde_json::to_string(&root).unwrap(),
            pci: serde_json::to_string(&pci).unwrap(),
        }
    }

    /// The VMM's restore, in its order: the bus, then the function, then the resume.
    pub fn restore(&self, snap: &Snapshot) -> Result<(), String> {
        let root: PciRootState = serde_json::from_str(&snap.root).unwrap();
        let pci: VirtioPciState = serde_json::from_str(&snap.pci).unwrap();
        self.root
            .lock()
            .unwrap()
            .restore_state(&root)
            .map_err(|e| error_chain(&e))?;
        let mut p = self.pci.lock().unwrap();
        p.restore_state(&pci).map_err(|e| error_chain(&e))?;
        p.resume_after_restore();
        Ok(())
    }
}

/// An error and its causes, as the binary prints them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The driver side of one split virtqueue: descriptor table at `base`, available ring at
/// `base + 0x1000`, used ring at `base + 0x2000`. Its indices are the driver's own state,
/// which a restored guest keeps (this struct moves to the restored machine with memory).
#[derive(Clone, Debug)]
pub struct Ring {
    pub index: u16,
    pub size: u16,
    pub base: u64,
    pub next_desc: u16,
    pub avail: u16,
    pub used_seen: u16,
}

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

impl Ring {
    /// Queue `index` of `size` entries, its rings at `index * 0x4000`.
    pub fn new(index: u16, size: u16) -> Ring {
        Ring {
            index,
            size,
            base: u64::from(index) * 0x4000,
            next_desc: 0,
            avail: 0,
            used_seen: 0,
        }
    }

    pub fn desc(&self) -> u64 {
        self.base
    }

    pub fn avail(&self) -> u64 {
        self.base + 0x1000
    }

    pub fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// Makes a chain of (address, length, device-writable) available; returns its head.
    pub fn push(&mut self, mem: &GuestMemoryMmap, chain: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == chain.len();
            let flags = if last { 0 } else { NEXT } | if w { WRITE } else { 0 };
            let at = self.base + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj((idx + 1) % self.size, GuestAddress(at + 14))
                .unwrap();
        }
        self.next_desc = (self.next_desc + chain.len() as u16) % self.size;
        let slot = u64::from(self.avail % self.size);
        mem.write_obj(head, GuestAddress(self.avail() + 4 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        mem.write_obj(self.avail, GuestAddress(self.avail() + 2))
            .unwrap();
        head
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used() + 2)).unwrap()
    }

    /// The next used element: (head, length).
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        if self.used_idx(mem) == self.used_seen {
            return None;
        }
        let at = self.used() + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }
}
