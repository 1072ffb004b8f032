//! Save and restore of the virtio-pci transport, the PCI root bus and every device, as the
//! VMM does it: a guest drives a device through the bus, the machine is saved while no vCPU
//! runs and the event loop is parked, and a new machine built from the same configuration
//! over a copy of guest memory is restored from it and goes on.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypervisor::GuestMemoryMmap;
use hypervisor::MsiMessage;
use support::{copy_memory, memory, Machine, Ring, Snapshot, DEVICE_CFG, MSIX_TABLE, NOTIFY};
use virtio::balloon::Balloon;
use virtio::block::Block;
use virtio::net::{FrameIo, Net, SeqPacket, TUN_F_CSUM, TUN_F_TSO4};
use virtio::pci::{Notifications, VirtioPciState};
use virtio::rng::Rng;
use virtio::vsock::Vsock;
use virtio::{features, StateError, VirtioDevice};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress};

const SECTOR: usize = 512;
/// Request buffers live from here on (rings are below, 0x4000 per queue).
const BUFFERS: u64 = 0x4_0000;

fn msg(data: u32) -> MsiMessage {
    MsiMessage {
        addr: 0xfee0_0000,
        data,
    }
}

fn shared<D: VirtioDevice + 'static>(d: D) -> Arc<Mutex<dyn VirtioDevice>> {
    Arc::new(Mutex::new(d))
}

/// A temporary file or directory, removed when dropped.
struct Temp(PathBuf);

impl Temp {
    fn path(tag: &str) -> Temp {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        Temp(std::env::temp_dir().join(format!(
            "fv-snapshot-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        )))
    }

    fn image(tag: &str, sectors: usize) -> Temp {
        let t = Temp::path(tag);
        std::fs::write(&t.0, vec![0u8; sectors * SECTOR]).unwrap();
        t
    }

    fn dir(tag: &str) -> Temp {
        let t = Temp::path(tag);
        std::fs::create_dir_all(&t.0).unwrap();
        t
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn block(img: &Temp) -> Arc<Mutex<dyn VirtioDevice>> {
    shared(Block::new(&img.0, false, Some("disk0")).unwrap())
}

/// A guest's virtio-blk driver: one queue of 16 on vector 1, requests written in order.
struct BlkDriver {
    ring: Ring,
    next_buf: u64,
}

impl BlkDriver {
    fn start(m: &Machine) -> BlkDriver {
        m.enumerate();
        m.program_msix(0, 0x40, false);
        m.program_msix(1, 0x41, false);
        let ring = Ring::new(0, 16);
        m.start(features::VERSION_1, &[(&ring, 1)]);
        BlkDriver {
            ring,
            next_buf: BUFFERS,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next_buf;
        self.next_buf += len.next_multiple_of(0x100);
        at
    }

    /// Makes a write of one sector of `fill` at `sector` available; returns its head and
    /// status byte address.
    fn write(&mut self, mem: &GuestMemoryMmap, sector: u64, fill: u8) -> (u16, u64) {
        let hdr = self.alloc(16);
        let data = self.alloc(SECTOR as u64);
        let status = self.alloc(1);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        mem.write_slice(&[fill; SECTOR], GuestAddress(data))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let head = self.ring.push(
            mem,
            &[
                (hdr, 16, false),
                (data, SECTOR as u32, false),
                (status, 1, true),
            ],
        );
        (head, status)
    }

    /// Makes a flush available; returns its head and status byte address.
    fn flush(&mut self, mem: &GuestMemoryMmap) -> (u16, u64) {
        let hdr = self.alloc(16);
        let status = self.alloc(1);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let head = self.ring.push(mem, &[(hdr, 16, false), (status, 1, true)]);
        (head, status)
    }
}

fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

#[test]
fn a_restored_disk_serves_every_request_once_from_the_saved_ring_positions() {
    let img = Temp::image("blk", 64);
    let a = Machine::new(memory(), block(&img));
    let mut drv = BlkDriver::start(&a);
    for i in 0..3u8 {
        let (head, st) = drv.write(&a.mem, u64::from(i), 0x10 + i);
        a.kick(0);
        a.serve_events();
        assert_eq!(drv.ring.pop_used(&a.mem), Some((head, 1)));
        assert_eq!(status(&a.mem, st), VIRTIO_BLK_S_OK as u8);
    }
    assert_eq!(a.vm.fired(1).len(), 3);
    // The fourth request is notified, but the snapshot comes before the event loop serves it:
    // the notification stays behind in the old process's queue event.
    let (pending, pending_status) = drv.write(&a.mem, 3, 0x13);
    a.kick(0);
    let snap = a.snapshot();
    let saved: VirtioPciState = serde_json::from_str(&snap.pci).unwrap();
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (3, 3)
    );
    assert_eq!(
        saved.isr, 1,
        "the used-buffer interrupt was never acknowledged"
    );
    let (a_bar, mem) = (a.config_read(4), copy_memory(&a.mem));
    // The old process goes away (with its lock on the image).
    drop(a);

    let disk = Block::new(&img.0, false, Some("disk0")).unwrap();
    let served = disk.counters();
    let b = Machine::new(mem, shared(disk));
    assert_eq!(
        b.config_read(4),
        0xc000_0000,
        "placed where the VMM puts it"
    );
    b.restore(&snap).unwrap();

    // The BAR where the guest had moved it, mapped, with the notification I/O events there.
    assert_eq!(b.config_read(4), a_bar);
    assert_eq!(b.config_read(1) & 0x7, 0x6);
    assert_eq!(
        b.read(0x12, 2),
        1,
        "num_queues, through the restored mapping"
    );
    assert_eq!(b.vm.ioevents(), [support::BAR + NOTIFY]);
    // MSI-X messages programmed again; the interrupt the guest may not have seen, raised again.
    assert_eq!(*b.vm.vector(0).programmed.lock().unwrap(), [msg(0x40)]);
    assert_eq!(*b.vm.vector(1).programmed.lock().unwrap(), [msg(0x41)]);
    assert_eq!(b.vm.fired(1), [msg(0x41)]);
    assert!(b.vm.fired(0).is_empty());

    // The pending request is served once, the next one after it.
    b.serve_events();
    assert_eq!(drv.ring.pop_used(&b.mem), Some((pending, 1)));
    assert_eq!(status(&b.mem, pending_status), VIRTIO_BLK_S_OK as u8);
    let (head, st) = drv.write(&b.mem, 4, 0x14);
    b.kick(0);
    b.serve_events();
    assert_eq!(drv.ring.pop_used(&b.mem), Some((head, 1)));
    assert_eq!(status(&b.mem, st), VIRTIO_BLK_S_OK as u8);
    assert_eq!(drv.ring.pop_used(&b.mem), None);
    assert_eq!(
        served.requests.load(Ordering::SeqCst),
        2,
        "nothing replayed, nothing lost"
    );
    assert_eq!(drv.ring.used_idx(&b.mem), 5);
    assert_eq!(
        b.vm.fired(1).len(),
        3,
        "one re-raised, two for the requests"
    );

    let disk = std::fs::read(&img.0).unwrap();
    for i in 0..5 {
        assert!(disk[i * SECTOR..(i + 1) * SECTOR]
            .iter()
            .all(|&x| x == 0x10 + i as u8));
    }
    let again = b.pci.lock().unwrap().save_state().unwrap();
    assert_eq!(
        (again.queues[0].next_avail, again.queues[0].next_used),
        (5, 5)
    );
}

#[test]
fn inline_notifications_serve_the_pending_request_at_resume_without_io_events() {
    let img = Temp::image("blk-inline", 8);
    let a = Machine::inline(memory(), block(&img));
    let mut drv = BlkDriver::start(&a);
    assert!(a.vm.ioevents().is_empty());
    // Made available; the vCPU was stopped before it wrote the notification.
    let (head, _) = drv.write(&a.mem, 0, 1);
    let snap = a.snapshot();
    let mem = copy_memory(&a.mem);
    drop(a);

    let b = Machine::inline(mem, block(&img));
    b.restore(&snap).unwrap();
    assert!(b.vm.ioevents().is_empty());
    assert_eq!(drv.ring.pop_used(&b.mem), Some((head, 1)));
}

#[test]
fn vcpu_first_notifications_serve_at_the_kick_and_leave_what_must_wait_to_the_event_loop() {
    let img = Temp::image("blk-vcpu-first", 8);
    let m = Machine::build(memory(), block(&img), Notifications::VcpuFirst);
    let mut drv = BlkDriver::start(&m);
    assert!(
        m.vm.ioevents().is_empty(),
        "the kicks must reach the transport"
    );
    let event = m.pci.lock().unwrap().queue_events()[0].try_clone().unwrap();
    // DRIVER_OK had the event loop look at the queue once; that look is not the test's.
    let _ = event.read();

    // A write into the page cache: answered before the kick returns, the event untouched.
    let (head, st) = drv.write(&m.mem, 1, 0x51);
    m.kick(0);
    assert_eq!(drv.ring.pop_used(&m.mem), Some((head, 1)));
    assert_eq!(status(&m.mem, st), VIRTIO_BLK_S_OK as u8);
    assert_eq!(m.vm.fired(1).len(), 1);
    assert!(
        event.read().is_err(),
        "the event loop was woken for nothing"
    );

    // A flush waits for the disk: the kick passes it to the event loop.
    let (head, st) = drv.flush(&m.mem);
    m.kick(0);
    assert_eq!(drv.ring.pop_used(&m.mem), None);
    assert_eq!(event.read().unwrap(), 1);
    m.device.lock().unwrap().process_queue(0);
    assert_eq!(drv.ring.pop_used(&m.mem), Some((head, 1)));
    assert_eq!(status(&m.mem, st), VIRTIO_BLK_S_OK as u8);
    assert_eq!(m.vm.fired(1).len(), 2);

    // While the event loop holds the device (a request that waits), a kick does not wait for
    // it: the event carries the notification.
    let (head, _) = drv.write(&m.mem, 2, 0x52);
    {
        let _busy = m.device.lock().unwrap();
        m.kick(0);
    }
    assert_eq!(drv.ring.pop_used(&m.mem), None);
    m.serve_events();
    assert_eq!(drv.ring.pop_used(&m.mem), Some((head, 1)));
    let data = std::fs::read(&img.0).unwrap();
    assert!(data[SECTOR..2 * SECTOR].iter().all(|&b| b == 0x51));
    assert!(data[2 * SECTOR..3 * SECTOR].iter().all(|&b| b == 0x52));
}

#[test]
fn a_masked_pending_interrupt_stays_pending_and_fires_when_unmasked() {
    let img = Temp::image("blk-masked", 8);
    let a = Machine::new(memory(), block(&img));
    let mut drv = BlkDriver::start(&a);
    a.program_msix(1, 0x41, true);
    drv.write(&a.mem, 0, 1);
    a.kick(0);
    a.serve_events();
    assert!(a.vm.fired(1).is_empty());
    assert_eq!(a.pba(), 0b10);
    let snap = a.snapshot();
    let mem = copy_memory(&a.mem);
    drop(a);

    let b = Machine::new(mem, block(&img));
    b.restore(&snap).unwrap();
    assert!(b.vm.fired(1).is_empty(), "still masked");
    assert_eq!(b.pba(), 0b10);
    b.write(MSIX_TABLE + 16 + 12, 0, 4);
    assert_eq!(b.vm.fired(1), [msg(0x41)]);
    assert_eq!(b.pba(), 0);
}

#[test]
fn a_disk_of_another_size_or_serial_is_refused() {
    let img = Temp::image("blk-small", 8);
    let a = Machine::new(memory(), block(&img));
    BlkDriver::start(&a);
    let snap = a.snapshot();
    let mem = copy_memory(&a.mem);
    drop(a);

    let bigger = Temp::image("blk-big", 16);
    let b = Machine::new(copy_memory(&mem), block(&bigger));
    let err = b.restore(&snap).unwrap_err();
    assert_eq!(
        err,
        "the saved disk capacity in sectors is 8; this device's is 16"
    );
    // Nothing started: the driver's set-up is not there.
    assert_eq!(b.read(support::DEVICE_STATUS, 1), 0);

    let renamed = Machine::new(
        copy_memory(&mem),
        shared(Block::new(&img.0, false, Some("disk1")).unwrap()),
    );
    let err = renamed.restore(&snap).unwrap_err();
    assert_eq!(
        err,
        "the saved disk serial is \"disk0\"; this device's is \"disk1\""
    );
    drop(renamed);
    let read_only = Machine::new(
        mem,
        shared(Block::new(&img.0, true, Some("disk0")).unwrap()),
    );
    assert_eq!(
        read_only.restore(&snap).unwrap_err(),
        "the saved read-only setting is false; this device's is true"
    );
}

#[test]
fn a_state_of_another_device_type_is_refused() {
    let img = Temp::image("blk-type", 8);
    let a = Machine::new(memory(), block(&img));
    BlkDriver::start(&a);
    let snap = a.snapshot();
    let mem = copy_memory(&a.mem);
    drop(a);

    let b = Machine::new(mem, shared(Rng::new()));
    // The bus sees another function in the slot.
    let err = b.restore(&snap).unwrap_err();
    assert_eq!(
        err,
        "slot 1: the saved function is 1af4:1042, this one is 1af4:1044"
    );
    // The function itself refuses it too.
    let state: VirtioPciState = serde_json::from_str(&snap.pci).unwrap();
    let err = b.pci.lock().unwrap().restore_state(&state).unwrap_err();
    assert!(matches!(err, StateError::DeviceType { .. }));
    assert_eq!(
        err.to_string(),
        "the saved state is of a virtio-blk device; this is a virtio-rng device"
    );
    // And so does a device handed another's own state directly.
    let err = Rng::new().restore_state(&state.device).unwrap_err();
    assert!(
        matches!(err, StateError::Malformed("virtio-rng", _)),
        "{err}"
    );
}

#[test]
fn a_state_that_does_not_parse_or_does_not_fit_is_refused() {
    let img = Temp::image("blk-bad", 8);
    let a = Machine::new(memory(), block(&img));
    BlkDriver::start(&a);
    let snap = a.snapshot();
    assert!(serde_json::from_str::<VirtioPciState>(&snap.pci[..snap.pci.len() / 2]).is_err());
    assert!(serde_json::from_str::<VirtioPciState>("{\"device_type\": 2}").is_err());

    let good: VirtioPciState = serde_json::from_str(&snap.pci).unwrap();
    // A function the driver has already set up is not restored into.
    let err = a.pci.lock().unwrap().restore_state(&good).unwrap_err();
    assert!(matches!(err, StateError::InUse), "{err}");
    let mem = copy_memory(&a.mem);
    drop(a);
    let fresh = || Machine::new(copy_memory(&mem), block(&img));

    let mut bad = good.clone();
    bad.device = serde_json::json!({ "capacity_sectors": "many" });
    {
        let b = fresh();
        let err = b.pci.lock().unwrap().restore_state(&bad).unwrap_err();
        assert!(
            matches!(err, StateError::Malformed("virtio-blk", _)),
            "{err}"
        );
        assert_eq!(b.pci.lock().unwrap().save_state().unwrap().status, 0);
    }

    let mut bad = good.clone();
    bad.queues[0].msix_vector = 7;
    let err = fresh().pci.lock().unwrap().restore_state(&bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the saved state is invalid: MSI-X vector 7 is beyond the table"
    );

    let mut bad = good.clone();
    bad.queues[0].size = 3;
    let err = fresh().pci.lock().unwrap().restore_state(&bad).unwrap_err();
    assert!(matches!(err, StateError::Start(_)), "{err}");

    let mut bad = good.clone();
    bad.msix.table.pop();
    assert!(matches!(
        fresh().pci.lock().unwrap().restore_state(&bad),
        Err(StateError::Invalid(_))
    ));

    // The state itself was fine.
    fresh().restore(&snap).unwrap();
}

#[test]
fn vsock_tells_the_guest_to_reset_its_connections_and_shows_the_new_cid() {
    let dir = Temp::dir("vsock");
    let a = Machine::new(
        memory(),
        shared(Vsock::new(3, &dir.0.join("a.sock")).unwrap()),
    );
    a.enumerate();
    for e in 0..4 {
        a.program_msix(e, 0x40 + e as u32, false);
    }
    let rings: Vec<Ring> = (0..3).map(|i| Ring::new(i, 16)).collect();
    a.start(
        features::VERSION_1,
        &[(&rings[0], 1), (&rings[1], 2), (&rings[2], 3)],
    );
    let mut event = rings[2].clone();
    // Linux fills the event queue when it probes.
    let bufs = [BUFFERS, BUFFERS + 0x100];
    for &at in &bufs {
        a.mem.write_obj(0xffff_ffffu32, GuestAddress(at)).unwrap();
        event.push(&a.mem, &[(at, 4, true)]);
    }
    a.kick(2);
    a.serve_events();
    assert_eq!(event.used_idx(&a.mem), 0, "no event before a restore");
    let snap = a.snapshot();

    // A clone: another socket, another CID.
    let b = Machine::new(
        copy_memory(&a.mem),
        shared(Vsock::new(7, &dir.0.join("b.sock")).unwrap()),
    );
    b.restore(&snap).unwrap();
    b.serve_events();
    assert_eq!(event.pop_used(&b.mem), Some((0, 4)));
    let id: u32 = b.mem.read_obj(GuestAddress(bufs[0])).unwrap();
    assert_eq!(id, virtio::vsock::EVENT_TRANSPORT_RESET);
    assert_eq!(b.vm.fired(3), [msg(0x43)]);
    assert_eq!(b.read(DEVICE_CFG, 8), 7, "the guest reads the new CID");
    // Once.
    b.kick(2);
    b.serve_events();
    assert_eq!(event.pop_used(&b.mem), None);
}

#[test]
fn a_restored_vsock_goes_on_with_the_host_ports_after_those_handed_out_before() {
    use virtio::VirtioDevice;
    let dir = Temp::dir("vsock-ports");
    let port_in = |state: &serde_json::Value| state["next_host_port"].as_u64();
    let a = Vsock::new(3, &dir.0.join("a.sock")).unwrap();
    let mut state = a.save_state().unwrap();
    assert_eq!(
        port_in(&state),
        Some(1 << 30),
        "a fresh device starts the range"
    );
    // As if 5 host connections had been made before the snapshot.
    state["next_host_port"] = serde_json::json!((1u64 << 30) + 5);
    let mut b = Vsock::new(3, &dir.0.join("b.sock")).unwrap();
    b.restore_state(&state).unwrap();
    assert_eq!(port_in(&b.save_state().unwrap()), Some((1 << 30) + 5));
    // A state written before the field existed restores with the range's start.
    let mut c = Vsock::new(3, &dir.0.join("c.sock")).unwrap();
    c.restore_state(&serde_json::json!({"guest_cid": 3}))
        .unwrap();
    assert_eq!(port_in(&c.save_state().unwrap()), Some(1 << 30));
}

/// A frame channel that records the offloads set on it.
struct Recording {
    io: SeqPacket,
    offload: Arc<AtomicU32>,
}

impl std::os::unix::io::AsRawFd for Recording {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.io.as_raw_fd()
    }
}

impl FrameIo for Recording {
    unsafe fn readv(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.io.readv(iovs) }
    }
    unsafe fn writev(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.io.writev(iovs) }
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        self.offload.store(flags, Ordering::SeqCst);
        Ok(())
    }
    fn name(&self) -> &str {
        "recording"
    }
}

fn net(mac: u8) -> (Arc<Mutex<dyn VirtioDevice>>, SeqPacket, Arc<AtomicU32>) {
    let (dev_end, peer) = SeqPacket::pair("snap").unwrap();
    let offload = Arc::new(AtomicU32::new(0xdead));
    let io = Recording {
        io: dev_end,
        offload: offload.clone(),
    };
    let dev = Net::with_io(Box::new(io), [2, 0, 0, 0, 0, mac]).unwrap();
    (shared(dev), peer, offload)
}

#[test]
fn net_comes_back_with_its_offloads_and_goes_on_transmitting() {
    let (dev, peer, offload) = net(1);
    let a = Machine::new(memory(), dev);
    a.enumerate();
    a.program_msix(1, 0x41, false);
    a.program_msix(2, 0x42, false);
    let rx = Ring::new(0, 16);
    let mut tx = Ring::new(1, 16);
    let f = features::VERSION_1
        | 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_MAC;
    a.start(f, &[(&rx, 1), (&tx, 2)]);
    assert_eq!(offload.load(Ordering::SeqCst), TUN_F_CSUM | TUN_F_TSO4);
    let frame = |n: u8| {
        let mut v = vec![0u8; virtio::net::VNET_HDR_LEN + 60];
        v[virtio::net::VNET_HDR_LEN] = n;
        v
    };
    let send = |m: &Machine, tx: &mut Ring, n: u8| {
        let at = BUFFERS + 0x1000 * u64::from(n);
        m.mem.write_slice(&frame(n), GuestAddress(at)).unwrap();
        tx.push(&m.mem, &[(at, frame(n).len() as u32, false)]);
        m.kick(1);
        m.serve_events();
    };
    send(&a, &mut tx, 1);
    let mut buf = [0u8; 256];
    assert_eq!(peer.recv(&mut buf).unwrap(), frame(1).len());
    let snap = a.snapshot();

    let (dev, peer, offload) = net(9);
    let b = Machine::new(copy_memory(&a.mem), dev);
    b.restore(&snap).unwrap();
    assert_eq!(offload.load(Ordering::SeqCst), TUN_F_CSUM | TUN_F_TSO4);
    // A clone's address is accepted; the configuration space shows it.
    assert_eq!(b.read(DEVICE_CFG + 5, 1), 9);
    send(&b, &mut tx, 2);
    assert_eq!(peer.recv(&mut buf).unwrap(), frame(2).len());
    assert_eq!(
        buf[virtio::net::VNET_HDR_LEN],
        2,
        "the new frame, not a replay"
    );
    assert!(peer.recv(&mut buf).is_err(), "exactly one frame");
    assert_eq!(tx.used_idx(&b.mem), 2);
}

#[test]
fn balloon_keeps_its_target_actual_size_statistics_and_held_buffer() {
    use virtio::balloon::feature::STATS_VQ;
    let mem_bytes = support::MEM_SIZE as u64;
    let a_dev = Balloon::new(mem_bytes, 0, false, None).unwrap();
    let handle = a_dev.handle();
    let a = Machine::new(memory(), shared(a_dev));
    a.enumerate();
    let rings: Vec<Ring> = (0..3).map(|i| Ring::new(i, 16)).collect();
    a.start(
        features::VERSION_1 | STATS_VQ,
        &[(&rings[0], 1), (&rings[1], 2), (&rings[2], 3)],
    );
    handle.set_target(64 << 12).unwrap();
    a.device.lock().unwrap().process_backend(0);
    a.write(DEVICE_CFG + 4, 16, 4); // actual
                                    // The driver posts its statistics: free_memory (tag 4) = 12345.
    let mut stats_ring = rings[2].clone();
    let mut entry = [0u8; 10];
    entry[..2].copy_from_slice(&4u16.to_le_bytes());
    entry[2..].copy_from_slice(&12345u64.to_le_bytes());
    a.mem.write_slice(&entry, GuestAddress(BUFFERS)).unwrap();
    let head = stats_ring.push(&a.mem, &[(BUFFERS, 10, false)]);
    a.kick(2);
    a.serve_events();
    assert_eq!(
        stats_ring.used_idx(&a.mem),
        0,
        "the device holds the buffer"
    );
    let snap = a.snapshot();

    let b_dev = Balloon::new(mem_bytes, 0, false, None).unwrap();
    let b_handle = b_dev.handle();
    let b = Machine::new(copy_memory(&a.mem), shared(b_dev));
    b.restore(&snap).unwrap();
    assert_eq!(b_handle.target_bytes(), 64 << 12);
    assert_eq!(b_handle.actual_bytes(), 16 << 12);
    assert_eq!(b.read(DEVICE_CFG, 4), 64);
    assert_eq!(b_handle.latest_stats().get("free_memory"), Some(12345));
    // Asking for fresh statistics returns the held buffer to the driver.
    let (_, fresh) = b_handle.request_stats(Duration::ZERO);
    assert!(!fresh);
    b.device.lock().unwrap().process_backend(0);
    assert_eq!(stats_ring.pop_used(&b.mem), Some((head, 0)));

    // Another guest memory size is refused.
    let c = Machine::new(
        copy_memory(&a.mem),
        shared(Balloon::new(2 * mem_bytes, 0, false, None).unwrap()),
    );
    assert_eq!(
        c.restore(&snap).unwrap_err(),
        "the saved guest memory size in bytes is 1048576; this device's is 2097152"
    );
}

/// Every device, not started by a driver: saved, restored into a new one, saved again, the
/// same state.
#[test]
fn every_device_round_trips_before_the_driver_starts() {
    let img = Temp::image("rt", 8);
    let dir = Temp::dir("rt");
    type Maker<'a> = Box<dyn Fn() -> Arc<Mutex<dyn VirtioDevice>> + 'a>;
    let makers: Vec<Maker> = vec![
        Box::new(|| block(&img)),
        Box::new(|| net(1).0),
        Box::new(|| shared(Rng::new())),
        Box::new(|| {
            static N: AtomicU64 = AtomicU64::new(0);
            let name = format!("{}.sock", N.fetch_add(1, Ordering::Relaxed));
            shared(Vsock::new(3, &dir.0.join(name)).unwrap())
        }),
        Box::new(|| shared(Balloon::new(1 << 20, 4096, true, None).unwrap())),
    ];
    for make in &makers {
        let a = Machine::new(memory(), make());
        a.enumerate();
        a.program_msix(0, 0x40, false);
        let snap: Snapshot = a.snapshot();
        drop(a);
        let b = Machine::new(memory(), make());
        b.restore(&snap).unwrap();
        let again = b.snapshot();
        assert_eq!(again.pci, snap.pci);
        assert_eq!(again.root, snap.root);
    }
}
