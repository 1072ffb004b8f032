//! The virtio-pci transport (`virtio::pci::VirtioPci`) around a virtio-blk device: random
//! sequences of configuration-space and BAR accesses, BAR moves, a well-behaved driver's
//! set-up, requests and event-loop turns, mixed freely.
//!
//! The VM is the emulator back end's (`emu::backend::EmuHypervisor`, no /dev/kvm needed),
//! behind a proxy that records I/O event registrations and MSI triggers. Guest memory is the
//! shared guarded memory of `ferrovisor_fuzz::virtio_kit` (not mapped into the VM: the
//! transport and the device reach it through vm-memory only).
//!
//! Input: byte 0 the image size in sectors - 1 (mod 128), byte 1 bit 0 a read-only disk, then
//! ops (at most 512), each an op byte (mod 9) and its operands:
//! - 0 BAR read: offset (u16), size code (1, 2, 4, 8 bytes; bit 4: BAR 1, which is unused);
//! - 1 BAR write: offset, size code, value (u64; its low bytes);
//! - 2 config read: register (u8); 3 config write: register, offset (mod 4), size code, value
//!   (u32);
//! - 4 BAR moved (as the PCI root reports it): 0 unmapped, else the BAR at `value << 15`;
//! - 5 driver set-up: reset, ACKNOWLEDGE|DRIVER, features (u32 low, u32 high), FEATURES_OK,
//!   queue size (u16), flags (bit 0 MSI-X on and two table entries programmed and unmasked,
//!   bit 1 enable the queue, bit 2 DRIVER_OK), config and queue MSI-X vectors (u16 each); the
//!   rings go at the harness's addresses;
//! - 6 submit a request (when the harness's set-up is live): type (IN, OUT, FLUSH, GET_ID,
//!   DISCARD, WRITE_ZEROES or unknown, mod 7), sector (u8), sectors (mod 5), flags (bit 0:
//!   notify through the BAR, bit 1: discard/write-zeroes unmap);
//! - 7 an event-loop turn: every signalled queue event is read and the queue processed;
//! - 8 MSI-X: entry (u8 mod 3, entry 2 does not exist), mask (bit 0), function mask (bit 1),
//!   enable (bit 2).
//!
//! Checks after every op: nothing panics; vendor and device IDs, the MSI-X table size, the
//! number of queues stay put; DRIVER_OK never shows without FEATURES_OK; I/O events are
//! registered exactly at the notification addresses of the BAR's current place (none when
//! unmapped). After an event-loop turn that served the harness's requests: the used ring
//! returns each head in order with a valid status byte; without EVENT_IDX the ISR has bit 0
//! set and the queue's MSI-X vector fired once if it is valid, enabled and unmasked (else its
//! pending bit is set, or nothing happens with MSI-X off).
//!
//! Queues the harness did not set up itself are processed too (their rings may be anything:
//! an available index far ahead once hung the device, see fuzz/README.md).
#![no_main]

use std::collections::BTreeSet;
use std::io;
use std::num::Wrapping;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::pci::PciDevice;
use ferrovisor_fuzz::virtio_kit::{fill, image, memory, trace, Input};
use hypervisor::GuestMemoryMmap;
use hypervisor::{Hypervisor, MemoryRegion, MsiMessage, MsiVector, Vcpu, Vm};
use libfuzzer_sys::fuzz_target;
use virtio::block::Block;
use virtio::pci::VirtioPci;
use virtio::VirtioDevice;
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// BAR 0 layout (from the capabilities the transport offers; checked at start).
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
const BAR_SIZE: u64 = 0x8000;

/// Common configuration fields (virtio 1.2, 4.1.4.3).
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;
const EVENT_IDX: u64 = 1 << 29;
const INDIRECT_DESC: u64 = 1 << 28;

/// The harness driver's rings and buffers in guest memory.
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x1400;
const TABLES: u64 = 0x2000;
const HEADERS: u64 = 0x2400;
const STATUS: u64 = 0x2500;
const BUFFERS: u64 = 0x9000;
/// Requests in flight at most (and slots for them).
const SLOTS: u16 = 16;
const NO_VECTOR: u16 = 0xffff;

fuzz_target!(|data: &[u8]| run(data));

/// The emulator's VM, recording what the transport asks of it.
struct RecordingVm {
    inner: Arc<dyn Vm>,
    ioevents: Mutex<BTreeSet<u64>>,
    vectors: Mutex<Vec<Arc<CountingVector>>>,
}

struct CountingVector {
    inner: Arc<dyn MsiVector>,
    fired: AtomicUsize,
}

impl MsiVector for CountingVector {
    fn set_message(&self, msg: MsiMessage) -> io::Result<()> {
        self.inner.set_message(msg)
    }

    fn trigger(&self) -> io::Result<()> {
        self.fired.fetch_add(1, Ordering::SeqCst);
        self.inner.trigger()
    }
}

impl Vm for RecordingVm {
    unsafe fn map_memory(&self, region: MemoryRegion) -> hypervisor::Result<()> {
        // SAFETY: forwarded as is; the caller upholds `map_memory`'s contract.
        unsafe { self.inner.map_memory(region) }
    }

    fn irq_line(&self, gsi: u32) -> hypervisor::Result<Arc<dyn hypervisor::IrqLine>> {
        self.inner.irq_line(gsi)
    }

    fn msi_vector(&self) -> hypervisor::Result<Arc<dyn MsiVector>> {
        let v = Arc::new(CountingVector {
            inner: self.inner.msi_vector()?,
            fired: AtomicUsize::new(0),
        });
        self.vectors.lock().unwrap().push(v.clone());
        Ok(v)
    }

    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> hypervisor::Result<()> {
        self.inner.register_ioevent(evt, addr)?;
        assert!(
            self.ioevents.lock().unwrap().insert(addr),
            "I/O event at {addr:#x} registered twice"
        );
        Ok(())
    }

    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> hypervisor::Result<()> {
        self.inner.unregister_ioevent(evt, addr)?;
        self.ioevents.lock().unwrap().remove(&addr);
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> hypervisor::Result<Box<dyn Vcpu>> {
        self.inner.create_vcpu(id)
    }
}

/// What the harness's driver set up and has in flight.
struct Driver {
    /// The queue the harness set up is live (so its rings are where the harness put them).
    live: bool,
    size: u16,
    event_idx: bool,
    indirect: bool,
    avail_idx: Wrapping<u16>,
    used_idx: Wrapping<u16>,
    /// Heads in flight, in order, with the writable bytes of their chains.
    in_flight: Vec<(u16, u32, u64)>,
}

struct Harness {
    pci: VirtioPci,
    vm: Arc<RecordingVm>,
    mem: &'static GuestMemoryMmap,
    msix_cap: usize,
    bar: Option<u64>,
    drv: Driver,
    read_only: bool,
}

fn size_of_code(c: u8) -> usize {
    [1, 2, 4, 8][usize::from(c & 3)]
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let sectors = u64::from(input.u8() % 128) + 1;
    let read_only = input.u8() & 1 != 0;
    image().reset(sectors * 512, 0x33);
    let block = Block::new(&image().path, read_only, Some("pci-fuzz")).expect("block device");
    let mem = memory();
    fill(mem, 0, &[]);
    let emu = emu::backend::EmuHypervisor::new()
        .create_vm()
        .expect("emulator VM");
    let vm = Arc::new(RecordingVm {
        inner: emu,
        ioevents: Mutex::default(),
        vectors: Mutex::default(),
    });
    let dyn_vm: Arc<dyn Vm> = vm.clone();
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(block));
    let pci = VirtioPci::new(device, mem.clone(), &dyn_vm).expect("transport");
    let mut h = Harness {
        msix_cap: 0,
        pci,
        vm,
        mem,
        bar: None,
        drv: Driver {
            live: false,
            size: 0,
            event_idx: false,
            indirect: false,
            avail_idx: Wrapping(0),
            used_idx: Wrapping(0),
            in_flight: Vec::new(),
        },
        read_only,
    };
    h.msix_cap = h.find_capability(0x11).expect("MSI-X capability");
    h.check_layout();
    h.check();

    for _ in 0..512 {
        if input.is_empty() {
            break;
        }
        let op = input.u8() % 9;
        match op {
            0 => {
                let offset = u64::from(input.u16());
                let code = input.u8();
                let mut buf = [0u8; 8];
                let n = size_of_code(code);
                let index = if code & 0x10 != 0 { 1 } else { 0 };
                h.pci.bar_read(index, offset, &mut buf[..n]);
            }
            1 => {
                let offset = u64::from(input.u16());
                let code = input.u8();
                let value = input.u64().to_le_bytes();
                let index = if code & 0x10 != 0 { 1 } else { 0 };
                h.bar_write_raw(index, offset, &value[..size_of_code(code)]);
            }
            2 => {
                let reg = usize::from(input.u8());
                h.pci.config_read(reg);
            }
            3 => {
                let reg = usize::from(input.u8());
                let offset = u64::from(input.u8() % 4);
                let n = size_of_code(input.u8()).min(4);
                let value = input.u32().to_le_bytes();
                h.config_write(reg, offset, &value[..n]);
            }
            4 => {
                let v = input.u16();
                let index = usize::from(v >> 13) % 6;
                let new = (v != 0).then(|| u64::from(v) << 15);
                let old = if index == 0 { h.bar } else { None };
                h.pci.bar_moved(index, old, new);
                if index == 0 {
                    h.bar = new;
                }
            }
            5 => {
                let lo = input.u32();
                let hi = input.u32();
                let size = input.u16();
                let flags = input.u8();
                let cfg_vec = input.u16();
                let q_vec = input.u16();
                h.setup(
                    u64::from(lo) | u64::from(hi) << 32,
                    size,
                    flags,
                    cfg_vec,
                    q_vec,
                );
            }
            6 => {
                let kind = input.u8();
                let sector = u64::from(input.u8());
                let n = u32::from(input.u8() % 5);
                let flags = input.u8();
                h.submit(kind, sector, n, flags);
            }
            7 => h.turn(),
            _ => {
                let entry = u64::from(input.u8() % 3);
                let f = input.u8();
                h.msix(entry, f);
            }
        }
        if trace() {
            eprintln!("op {op}: status {:#x}", h.status());
        }
        h.check();
    }
}

impl Harness {
    fn common_read(&mut self, field: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.pci.bar_read(0, COMMON + field, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn common_write(&mut self, field: u64, len: usize, value: u64) {
        self.bar_write_raw(0, COMMON + field, &value.to_le_bytes()[..len]);
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.pci.config_write(reg, offset, data);
    }

    /// A BAR write, then the harness's idea of whether its set-up is still live.
    fn bar_write_raw(&mut self, index: usize, offset: u64, data: &[u8]) {
        self.pci.bar_write(index, offset, data);
        let s = self.status();
        if s & DRIVER_OK == 0 || s & NEEDS_RESET != 0 {
            self.drv.live = false;
        }
    }

    fn status(&mut self) -> u8 {
        self.common_read(DEVICE_STATUS, 1) as u8
    }

    fn find_capability(&mut self, id: u8) -> Option<usize> {
        let mut at = (self.pci.config_read(0x34 / 4) & 0xff) as usize;
        for _ in 0..48 {
            if at == 0 {
                return None;
            }
            let reg = self.pci.config_read(at / 4) >> (8 * (at % 4));
            if reg as u8 == id {
                return Some(at);
            }
            at = ((reg >> 8) & 0xfc) as usize;
        }
        None
    }

    /// The BAR layout the harness assumes is the one the capabilities describe.
    fn check_layout(&mut self) {
        let byte =
            |pci: &mut VirtioPci, at: usize| (pci.config_read(at / 4) >> (8 * (at % 4))) as u8;
        let dword = |pci: &mut VirtioPci, at: usize| pci.config_read(at / 4);
        assert_eq!(self.pci.config().bar_size(0), Some(BAR_SIZE));
        let mut at = usize::from(byte(&mut self.pci, 0x34));
        let mut seen = Vec::new();
        while at != 0 {
            if byte(&mut self.pci, at) == 0x09 {
                let (cfg_type, bar) = (byte(&mut self.pci, at + 3), byte(&mut self.pci, at + 4));
                let offset = u64::from(dword(&mut self.pci, at + 8));
                assert_eq!(bar, 0, "virtio capability {cfg_type} in BAR {bar}");
                match cfg_type {
                    1 => assert_eq!(offset, COMMON),
                    2 => {
                        assert_eq!(offset, NOTIFY);
                        assert_eq!(dword(&mut self.pci, at + 16), 4, "notify multiplier");
                    }
                    3 => assert_eq!(offset, ISR),
                    _ => {}
                }
                seen.push(cfg_type);
            }
            at = usize::from(byte(&mut self.pci, at + 1));
        }
        seen.sort();
        assert_eq!(seen, [1, 2, 3, 4], "virtio capabilities");
        let cap = self.msix_cap;
        assert_eq!(
            u64::from(dword(&mut self.pci, cap + 4)),
            MSIX_TABLE,
            "MSI-X table, BIR 0"
        );
        assert_eq!(
            u64::from(dword(&mut self.pci, cap + 8)),
            MSIX_PBA,
            "MSI-X PBA, BIR 0"
        );
    }

    /// Invariants that hold after any op.
    fn check(&mut self) {
        assert_eq!(
            self.pci.config_read(0),
            0x1042_1af4,
            "vendor and device IDs"
        );
        let ctl = self.pci.config_read(self.msix_cap / 4) >> 16;
        assert_eq!(ctl & 0x7ff, 1, "MSI-X table size (two vectors)");
        assert_eq!(self.common_read(NUM_QUEUES, 2), 1, "number of queues");
        let s = self.status();
        assert!(
            s & DRIVER_OK == 0 || s & FEATURES_OK != 0,
            "DRIVER_OK without FEATURES_OK: {s:#x}"
        );
        let want: BTreeSet<u64> = self.bar.map(|b| b + NOTIFY).into_iter().collect();
        assert_eq!(
            *self.vm.ioevents.lock().unwrap(),
            want,
            "I/O events registered, BAR at {:x?}",
            self.bar
        );
    }

    /// What a driver does (virtio 1.2, 3.1.1), with the rings at the harness's addresses.
    fn setup(&mut self, features: u64, size: u16, flags: u8, cfg_vec: u16, q_vec: u16) {
        self.common_write(DEVICE_STATUS, 1, 0);
        self.drv.live = false;
        self.drv.in_flight.clear();
        // Fresh rings: both indices 0, as the device starts.
        fill(self.mem, 0, &[]);
        self.common_write(DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE | DRIVER));
        self.common_write(DRIVER_FEATURE_SELECT, 4, 0);
        self.common_write(DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.common_write(DRIVER_FEATURE_SELECT, 4, 1);
        self.common_write(DRIVER_FEATURE, 4, features >> 32);
        self.common_write(
            DEVICE_STATUS,
            1,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
        );
        if self.status() & FEATURES_OK == 0 {
            return;
        }
        self.common_write(CONFIG_MSIX_VECTOR, 2, u64::from(cfg_vec));
        self.common_write(QUEUE_SELECT, 2, 0);
        self.common_write(QUEUE_SIZE, 2, u64::from(size));
        self.common_write(QUEUE_MSIX_VECTOR, 2, u64::from(q_vec));
        for (field, addr) in [
            (QUEUE_DESC, DESC),
            (QUEUE_DRIVER, AVAIL),
            (QUEUE_DEVICE, USED),
        ] {
            self.common_write(field, 4, addr & 0xffff_ffff);
            self.common_write(field + 4, 4, addr >> 32);
        }
        if flags & 1 != 0 {
            for e in 0..2 {
                self.msix_entry(e, 0x20 + e as u32, false);
            }
            self.msix_control(true, false);
        }
        if flags & 2 != 0 {
            self.common_write(QUEUE_ENABLE, 2, 1);
        }
        if flags & 4 != 0 {
            let s = self.status();
            self.common_write(DEVICE_STATUS, 1, u64::from(s | DRIVER_OK));
            let s = self.status();
            if s & DRIVER_OK != 0 && s & NEEDS_RESET == 0 {
                self.drv = Driver {
                    live: true,
                    size,
                    event_idx: features & EVENT_IDX != 0,
                    indirect: features & INDIRECT_DESC != 0,
                    avail_idx: Wrapping(0),
                    used_idx: Wrapping(0),
                    in_flight: Vec::new(),
                };
            }
        }
    }

    fn msix_entry(&mut self, entry: u64, vector: u32, masked: bool) {
        let at = MSIX_TABLE + 16 * entry;
        self.pci.bar_write(0, at, &0xfee0_0000u32.to_le_bytes());
        self.pci.bar_write(0, at + 4, &0u32.to_le_bytes());
        self.pci.bar_write(0, at + 8, &vector.to_le_bytes());
        self.pci
            .bar_write(0, at + 12, &u32::from(masked).to_le_bytes());
    }

    fn msix_control(&mut self, enable: bool, function_mask: bool) {
        let ctl = (u16::from(enable) << 15) | (u16::from(function_mask) << 14);
        let at = self.msix_cap + 2;
        self.config_write(at / 4, (at % 4) as u64, &ctl.to_le_bytes());
    }

    fn msix(&mut self, entry: u64, f: u8) {
        self.msix_entry(entry, 0x30 + entry as u32, f & 1 != 0);
        self.msix_control(f & 4 != 0, f & 2 != 0);
    }

    /// Makes one request available: a header, data (if any) and a status byte, as a direct
    /// chain or (with INDIRECT_DESC) through an indirect table.
    fn submit(&mut self, kind: u8, sector: u64, sectors: u32, flags: u8) {
        let d = &self.drv;
        let direct_slots = (d.size / 3).min(SLOTS);
        let slots = if d.indirect {
            d.size.min(SLOTS)
        } else {
            direct_slots
        };
        if !d.live || slots == 0 || d.in_flight.len() >= usize::from(slots) {
            return;
        }
        let slot = d.avail_idx.0 % slots;
        let t = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            99,
        ][usize::from(kind % 7)];
        let hdr = HEADERS + 16 * u64::from(slot);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let buf = BUFFERS + 0x800 * u64::from(slot);
        let status = STATUS + u64::from(slot);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        // (address, length, device-writable)
        let mut chain = vec![(hdr, 16u32, false)];
        match t {
            VIRTIO_BLK_T_IN => chain.push((buf, sectors * 512, true)),
            VIRTIO_BLK_T_OUT => chain.push((buf, sectors * 512, false)),
            VIRTIO_BLK_T_GET_ID => chain.push((buf, 20, true)),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let mut r = [0u8; 16];
                r[0..8].copy_from_slice(&sector.to_le_bytes());
                r[8..12].copy_from_slice(&sectors.to_le_bytes());
                r[12] = (flags >> 1) & 1;
                self.mem.write_slice(&r, GuestAddress(buf)).unwrap();
                chain.push((buf, 16, false));
            }
            _ => {}
        }
        chain.push((status, 1, true));
        let writable: u64 = chain.iter().filter(|c| c.2).map(|c| u64::from(c.1)).sum();
        let head = if self.drv.indirect {
            let table = TABLES + 0x40 * u64::from(slot);
            self.put_chain(table, 0, &chain);
            let head = slot;
            let len = 16 * chain.len() as u32;
            self.put_desc(DESC + 16 * u64::from(head), table, len, 4, 0);
            head
        } else {
            let first = 3 * slot;
            self.put_chain(DESC, first, &chain);
            first
        };
        let size = u64::from(self.drv.size);
        let at = AVAIL + 4 + 2 * (u64::from(self.drv.avail_idx.0) % size);
        self.mem.write_obj(head.to_le(), GuestAddress(at)).unwrap();
        self.drv.avail_idx += 1;
        self.mem
            .write_obj(self.drv.avail_idx.0.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
        self.drv.in_flight.push((head, t, writable));
        if flags & 1 != 0 {
            // The guest's notification: queue 0, at the notification address.
            self.bar_write_raw(0, NOTIFY, &0u16.to_le_bytes());
        }
    }

    fn put_chain(&self, table: u64, first: u16, chain: &[(u64, u32, bool)]) {
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let i = first + i as u16;
            let last = i == first + chain.len() as u16 - 1;
            let flags = if last { 0 } else { 1 } | if w { 2 } else { 0 };
            self.put_desc(table + 16 * u64::from(i), addr, len, flags, i + 1);
        }
    }

    fn put_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let m = self.mem;
        m.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        m.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        m.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    /// One turn of the VMM's event loop, then the checks on what it served.
    fn turn(&mut self) {
        let events = self.pci.queue_events();
        let mut signalled = false;
        for evt in events.iter() {
            signalled |= evt.read().is_ok();
        }
        if !signalled {
            return;
        }
        // What an interrupt for queue 0 must do.
        let select = self.common_read(QUEUE_SELECT, 2);
        self.common_write(QUEUE_SELECT, 2, 0);
        let vector = self.common_read(QUEUE_MSIX_VECTOR, 2) as u16;
        self.common_write(QUEUE_SELECT, 2, select);
        let ctl = self.pci.config_read(self.msix_cap / 4) >> 16;
        let (enabled, function_masked) = (ctl & 0x8000 != 0, ctl & 0x4000 != 0);
        let entry_masked = vector != NO_VECTOR && {
            let mut b = [0u8; 4];
            self.pci
                .bar_read(0, MSIX_TABLE + 16 * u64::from(vector) + 12, &mut b);
            u32::from_le_bytes(b) & 1 != 0
        };
        let fired_before: Vec<usize> = self.fired();
        let mut isr = [0u8];
        self.pci.bar_read(0, ISR, &mut isr);

        let device = self.pci.device();
        device.lock().unwrap().process_queue(0);

        if !self.drv.live {
            return;
        }
        let served = self.drv.in_flight.len();
        let size = self.drv.size;
        for (head, t, writable) in std::mem::take(&mut self.drv.in_flight) {
            let at = USED + 4 + 8 * u64::from(self.drv.used_idx.0 % size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            assert_eq!(id, u32::from(head), "used ring out of order");
            assert!(u64::from(len) <= writable && len >= 1, "used length {len}");
            let slot = if self.drv.indirect { head } else { head / 3 };
            let s: u8 = self
                .mem
                .read_obj(GuestAddress(STATUS + u64::from(slot)))
                .unwrap();
            let ok = VIRTIO_BLK_S_OK as u8;
            let want: &[u8] = match t {
                VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_GET_ID => &[ok],
                VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
                    if self.read_only =>
                {
                    &[VIRTIO_BLK_S_IOERR as u8]
                }
                99 => &[VIRTIO_BLK_S_UNSUPP as u8],
                // Ranges with flags the spec forbids (random here) are unsupported.
                VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                    &[ok, VIRTIO_BLK_S_IOERR as u8, VIRTIO_BLK_S_UNSUPP as u8]
                }
                _ => &[ok, VIRTIO_BLK_S_IOERR as u8],
            };
            if trace() {
                eprintln!("head {head}, type {t}: status {s}, used length {len}");
            }
            assert!(want.contains(&s), "status {s} for request type {t}");
            self.drv.used_idx += 1;
        }
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, self.drv.used_idx.0, "used index");
        if served == 0 || self.drv.event_idx {
            return;
        }
        let mut isr = [0u8];
        self.pci.bar_read(0, ISR, &mut isr);
        assert_eq!(isr[0] & 1, 1, "ISR after serving {served} requests");
        let fired = self.fired();
        let delta: Vec<usize> = fired
            .iter()
            .zip(&fired_before)
            .map(|(a, b)| a - b)
            .collect();
        let mut want = vec![0usize; delta.len()];
        let valid = usize::from(vector) < want.len();
        if valid && enabled && !function_masked && !entry_masked {
            want[usize::from(vector)] = 1;
        }
        assert_eq!(
            delta, want,
            "MSI triggers (queue vector {vector:#x}, enabled {enabled}, function mask \
             {function_masked}, entry mask {entry_masked})"
        );
        if valid && enabled && (function_masked || entry_masked) {
            let mut pba = [0u8];
            self.pci.bar_read(0, MSIX_PBA, &mut pba);
            assert_ne!(
                pba[0] & (1 << vector),
                0,
                "pending bit of masked vector {vector}"
            );
        }
    }

    fn fired(&self) -> Vec<usize> {
        self.vm
            .vectors
            .lock()
            .unwrap()
            .iter()
            .map(|v| v.fired.load(Ordering::SeqCst))
            .collect()
    }
}
