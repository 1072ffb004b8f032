//! The seam implementation: `EmuHypervisor` → `EmuVm` → `EmuVcpu`, each vCPU an interpreter
//! on its own thread, with the platform (local APICs, I/O APIC, PIT, PIC, kvm-clock) in user
//! space behind locks shared by the vCPU threads and the VMM's device threads.
//!
//! Lock order: a vCPU's `lapic` lock may be taken while holding nothing else, or while holding
//! the I/O APIC lock (delivery); never the reverse. The PIT and PIC locks are leaves.
//!
//! Snapshots (vCPU and VM state, the dirty-page log) are in `persist`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::Duration;

use hypervisor::{
    BackendKind, CpuidEntry, Fpu, Hypervisor, HypervisorError, IrqLine, MemoryRegion, MsiVector,
    MsrEntry, Regs, Result, SavedState, Segment, Sregs, Vcpu, VcpuExit, Vm,
};
use vmm_sys_util::eventfd::EventFd;

use crate::cpu::state::{CpuState, Dtr, Seg};
use crate::cpu::{Cpu, IoReq, Machine, RunExit};
use crate::memory::{PhysMem, RamRegion};
use crate::platform::clock::{self, HostClock, ManualClock, TimeSource};
use crate::platform::ioapic::IoApic;
use crate::platform::kvmclock;
use crate::platform::lapic::{ApicEffect, IpiRequest, LocalApic};
use crate::platform::msi::{DeliveryMode, MsiMessage};
use crate::platform::pic::Pic;
use crate::platform::pit::Pit;
use crate::turns::Turns;

mod persist;

const LAPIC_BASE: u64 = 0xfee0_0000;
const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Instructions per `Cpu::run` call between checks of timers and kicks.
const BUDGET: u64 = 20_000;
/// Longest sleep in HLT before re-checking (a backstop for a lost wake-up).
const MAX_HALT_SLEEP: Duration = Duration::from_millis(10);

/// The emulator back end.
#[derive(Default)]
pub struct EmuHypervisor {
    deterministic: bool,
}

/// Guest wall-clock time at boot in deterministic mode (2026-01-01T00:00:00Z).
const DETERMINISTIC_EPOCH_NS: u64 = 1_767_225_600_000_000_000;

impl EmuHypervisor {
    pub fn new() -> Self {
        EmuHypervisor {
            deterministic: false,
        }
    }

    /// Deterministic mode: guest time is the instruction count (1 ns per instruction, idle
    /// periods skipped to the next timer deadline) and the wall clock starts at a fixed date,
    /// so the same guest with the same input behaves identically on every run. One vCPU only.
    pub fn deterministic() -> Self {
        EmuHypervisor {
            deterministic: true,
        }
    }
}

impl Hypervisor for EmuHypervisor {
    fn kind(&self) -> BackendKind {
        BackendKind::Emu
    }

    fn max_vcpus(&self) -> u32 {
        254
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(crate::cpuid::supported())
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        let (clock, manual, host_clock): (Arc<dyn TimeSource>, _, _) = if self.deterministic {
            let m = Arc::new(ManualClock::new(0));
            (m.clone(), Some(m), None)
        } else {
            let h = Arc::new(HostClock::new());
            (h.clone(), None, Some(h))
        };
        Ok(Arc::new(EmuVm {
            shared: Arc::new(Shared {
                regions: Mutex::new(Vec::new()),
                mem: OnceLock::new(),
                vcpus: RwLock::new(Vec::new()),
                ioapic: Mutex::new(IoApic::new()),
                pit: Mutex::new(Pit::new()),
                pic: Mutex::new(Pic::new()),
                clock,
                manual,
                host_clock,
                idle_ns: AtomicU64::new(0),
                turns: self.deterministic.then(Turns::new),
                wall_clock_epoch_ns: AtomicU64::new(if self.deterministic {
                    DETERMINISTIC_EPOCH_NS
                } else {
                    hypervisor::host_wall_clock_ns()
                }),
                ioevents: RwLock::new(Vec::new()),
            }),
        }))
    }
}

/// State every vCPU thread and device thread of one VM can reach.
struct Shared {
    /// The mapped RAM regions with their slots, in mapping order.
    regions: Mutex<Vec<(u32, RamRegion)>>,
    /// Guest RAM, frozen when the first vCPU is created or dirty-page logging starts.
    mem: OnceLock<Arc<PhysMem>>,
    vcpus: RwLock<Vec<Arc<VcpuShared>>>,
    ioapic: Mutex<IoApic>,
    pit: Mutex<Pit>,
    pic: Mutex<Pic>,
    clock: Arc<dyn TimeSource>,
    /// Deterministic mode's clock, advanced from the instruction count.
    manual: Option<Arc<ManualClock>>,
    /// Otherwise: the host's monotonic clock (`clock` too), set forward on a restore.
    host_clock: Option<Arc<HostClock>>,
    /// Deterministic mode: guest time skipped while halted.
    idle_ns: AtomicU64,
    /// Deterministic mode: the vCPUs' turns, and the instructions they retired.
    turns: Option<Turns>,
    /// Wall-clock time at guest time zero, for the kvm-clock wall clock: the host's at VM
    /// creation (or the fixed date in deterministic mode); a restore puts back the saved VM's.
    wall_clock_epoch_ns: AtomicU64,
    /// MMIO addresses whose writes signal an event instead of exiting to the VMM (virtio
    /// queue notifications), as KVM's ioeventfds do.
    ioevents: RwLock<Vec<(u64, EventFd)>>,
}

/// How a vCPU is waiting to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum MpState {
    Runnable,
    /// After INIT (or at power-on for APs): waiting for a STARTUP IPI.
    WaitForSipi,
}

/// The part of a vCPU other threads touch: its local APIC and its wake-up.
struct VcpuShared {
    id: u32,
    lapic: Mutex<LocalApic>,
    /// Something may be pending in the LAPIC (set by other threads; cleared by the owner).
    irq_hint: Arc<AtomicBool>,
    sleep: Mutex<()>,
    wake: Condvar,
}

impl VcpuShared {
    fn kick(&self) {
        let _g = self.sleep.lock().expect("vcpu sleep lock poisoned");
        self.wake.notify_all();
    }
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    fn wall_clock_epoch_ns(&self) -> u64 {
        self.wall_clock_epoch_ns.load(Ordering::Relaxed)
    }

    /// Guest RAM, frozen on first use (the first vCPU, or the dirty-page log).
    fn mem(&self) -> Arc<PhysMem> {
        self.mem
            .get_or_init(|| {
                let mut pm = PhysMem::default();
                for (_, r) in self.regions.lock().expect("regions lock poisoned").iter() {
                    pm.add(*r);
                }
                Arc::new(pm)
            })
            .clone()
    }

    /// The turn scheduler, when the vCPUs take turns (deterministic mode, several vCPUs).
    fn multi_turns(&self) -> Option<&Turns> {
        self.turns
            .as_ref()
            .filter(|_| self.vcpus.read().expect("vcpu list lock poisoned").len() > 1)
    }

    fn vcpu_count(&self) -> u32 {
        self.vcpus.read().expect("vcpu list lock poisoned").len() as u32
    }

    /// Delivers an interrupt message (from the I/O APIC or an MSI) to the LAPICs it names.
    fn deliver(&self, msg: &MsiMessage) {
        let vcpus = self.vcpus.read().expect("vcpu list lock poisoned");
        for v in vcpus.iter() {
            {
                let mut lapic = v.lapic.lock().expect("lapic lock poisoned");
                if !lapic.accepts(msg.dest, msg.logical) {
                    continue;
                }
                lapic.deliver(msg);
            }
            v.irq_hint.store(true, Ordering::Release);
            v.kick();
            if msg.delivery_mode == DeliveryMode::LowestPriority {
                // One recipient is enough; the first is as good as any.
                break;
            }
        }
    }

    fn route_ipi(&self, from: u32, ipi: IpiRequest) {
        if ipi.is_init_deassert() {
            return;
        }
        let vcpus = self.vcpus.read().expect("vcpu list lock poisoned");
        for v in vcpus.iter() {
            {
                let mut lapic = v.lapic.lock().expect("lapic lock poisoned");
                if !lapic.accepts_ipi(&ipi, v.id == from) {
                    continue;
                }
                lapic.deliver_ipi(&ipi);
            }
            v.irq_hint.store(true, Ordering::Release);
            v.kick();
        }
    }

    fn set_gsi(&self, gsi: u32) {
        let msg = self.ioapic.lock().expect("ioapic lock poisoned").pulse(gsi);
        if let Some(m) = msg {
            self.deliver(&m);
        }
    }

    fn eoi(&self, vector: u8) {
        let msgs = self
            .ioapic
            .lock()
            .expect("ioapic lock poisoned")
            .eoi(vector);
        for m in msgs {
            self.deliver(&m);
        }
    }
}

/// The emulator's VM.
pub struct EmuVm {
    shared: Arc<Shared>,
}

struct EmuIrq {
    shared: Arc<Shared>,
    gsi: u32,
}

impl IrqLine for EmuIrq {
    fn trigger(&self) -> io::Result<()> {
        self.shared.set_gsi(self.gsi);
        Ok(())
    }
}

/// An MSI vector: the programmed message, delivered straight to the local APICs.
struct EmuMsiVector {
    shared: Arc<Shared>,
    msg: Mutex<Option<MsiMessage>>,
}

impl MsiVector for EmuMsiVector {
    fn set_message(&self, msg: hypervisor::MsiMessage) -> io::Result<()> {
        // A message outside the interrupt window is a memory write on real hardware; it
        // interrupts nothing, so it is dropped here.
        *self.msg.lock().expect("MSI message lock poisoned") =
            MsiMessage::from_address_data(msg.addr, msg.data);
        Ok(())
    }

    fn trigger(&self) -> io::Result<()> {
        let msg = *self.msg.lock().expect("MSI message lock poisoned");
        if let Some(m) = msg {
            self.shared.deliver(&m);
        }
        Ok(())
    }
}

impl Shared {
    /// Signals the I/O event registered at `gpa`, if any; whether one was.
    fn signal_ioevent(&self, gpa: u64) -> bool {
        let events = self.ioevents.read().expect("ioevent list lock poisoned");
        match events.iter().find(|(a, _)| *a == gpa) {
            Some((_, evt)) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("emu: cannot signal the I/O event at {gpa:#x}: {e}");
                }
                true
            }
            None => false,
        }
    }
}

impl Vm for EmuVm {
    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()> {
        if self.shared.mem.get().is_some() {
            return Err(HypervisorError::MapMemory {
                addr: region.guest_addr.0,
                source: io::Error::other(
                    "memory cannot change after vCPUs exist or dirty-page logging started",
                ),
            });
        }
        self.shared
            .regions
            .lock()
            .expect("regions lock poisoned")
            .push((
                region.slot,
                RamRegion {
                    gpa: region.guest_addr.0,
                    len: region.len_bytes,
                    host: region.host_addr as *mut u8,
                },
            ));
        Ok(())
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        Ok(Arc::new(EmuIrq {
            shared: self.shared.clone(),
            gsi,
        }))
    }

    fn msi_vector(&self) -> Result<Arc<dyn MsiVector>> {
        Ok(Arc::new(EmuMsiVector {
            shared: self.shared.clone(),
            msg: Mutex::new(None),
        }))
    }

    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<()> {
        let mut events = self
            .shared
            .ioevents
            .write()
            .expect("ioevent list lock poisoned");
        if events.iter().any(|(a, _)| *a == addr) {
            return Err(HypervisorError::IoEvent(
                addr,
                io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        let evt = evt
            .try_clone()
            .map_err(|e| HypervisorError::IoEvent(addr, e))?;
        events.push((addr, evt));
        Ok(())
    }

    fn unregister_ioevent(&self, _evt: &EventFd, addr: u64) -> Result<()> {
        let mut events = self
            .shared
            .ioevents
            .write()
            .expect("ioevent list lock poisoned");
        let before = events.len();
        events.retain(|(a, _)| *a != addr);
        if events.len() == before {
            return Err(HypervisorError::IoEvent(
                addr,
                io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let mem = self.shared.mem();
        let vs = Arc::new(VcpuShared {
            id,
            lapic: Mutex::new(LocalApic::new(id)),
            irq_hint: Arc::new(AtomicBool::new(false)),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let count = {
            let mut vcpus = self.shared.vcpus.write().expect("vcpu list lock poisoned");
            vcpus.push(vs.clone());
            vcpus.len()
        };
        // The MADT gives the I/O APIC the ID after the last CPU's; so does its ID register.
        *self.shared.ioapic.lock().expect("ioapic lock poisoned") = IoApic::with_id(count as u8);
        let machine = VcpuMachine {
            shared: self.shared.clone(),
            me: vs.clone(),
            cpuid: Vec::new(),
            tsc_offset: 0,
            tsc_reads: 0,
        };
        let mut cpu = Cpu::new(mem, Box::new(machine));
        if id != 0 {
            cpu.halted = false;
        }
        Ok(Box::new(EmuVcpu {
            cpu,
            me: vs,
            shared: self.shared.clone(),
            mp: if id == 0 {
                MpState::Runnable
            } else {
                MpState::WaitForSipi
            },
            io_buf: [0; 8],
            pending: None,
            holding_turn: false,
            started: std::time::Instant::now(),
            rip_samples: std::env::var_os("FERROVISOR_EMU_PROFILE")
                .map(|f| (std::path::PathBuf::from(f), HashMap::new())),
        }))
    }

    fn wall_clock_ns(&self) -> u64 {
        if self.shared.manual.is_some() {
            // Deterministic: the fixed boot date plus guest time, as the kvm-clock wall clock
            // gives it, so the RTC reads the same on every run.
            self.shared
                .wall_clock_epoch_ns()
                .saturating_add(self.shared.now_ns())
        } else {
            hypervisor::host_wall_clock_ns()
        }
    }

    fn save_state(&self) -> Result<SavedState> {
        self.save()
    }

    fn restore_state(&self, state: &SavedState, advance_clock_ns: u64) -> Result<()> {
        self.restore(state, advance_clock_ns)
    }

    fn start_dirty_log(&self) -> Result<()> {
        self.shared.mem().start_dirty_log();
        Ok(())
    }

    fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>> {
        self.take_dirty()
    }

    fn stop_dirty_log(&self) -> Result<()> {
        if let Some(mem) = self.shared.mem.get() {
            mem.stop_dirty_log();
        }
        Ok(())
    }
}

/// What a vCPU's interpreter sees of the platform.
struct VcpuMachine {
    shared: Arc<Shared>,
    me: Arc<VcpuShared>,
    cpuid: Vec<CpuidEntry>,
    tsc_offset: i64,
    /// Deterministic mode: TSC reads since the clock last moved.
    tsc_reads: u64,
}

impl VcpuMachine {
    fn now_ns(&self) -> u64 {
        self.shared.now_ns()
    }

    fn lapic_effect(&self, effect: ApicEffect) {
        match effect {
            ApicEffect::None => {}
            ApicEffect::Ipi(ipi) => self.shared.route_ipi(self.me.id, ipi),
            ApicEffect::Eoi(vector) => self.shared.eoi(vector),
        }
    }

    fn write_kvmclock(&self, gpa: u64) {
        let now = self.now_ns();
        let tsc = (clock::ns_to_tsc(now) as i64).wrapping_add(self.tsc_offset) as u64;
        let info = kvmclock::pvclock_vcpu_time_info(tsc, now, 2);
        if let Some(mem) = self.shared.mem.get() {
            mem.write_bytes(gpa, &info);
        }
    }
}

impl Machine for VcpuMachine {
    fn pio_read(&mut self, port: u16, _size: u8) -> Option<u32> {
        let now = self.now_ns();
        match port {
            0x40..=0x43 | 0x61 => Some(u32::from(
                self.shared
                    .pit
                    .lock()
                    .expect("pit lock poisoned")
                    .port_read(port, now),
            )),
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => Some(u32::from(
                self.shared
                    .pic
                    .lock()
                    .expect("pic lock poisoned")
                    .port_read(port),
            )),
            _ => None,
        }
    }

    fn pio_write(&mut self, port: u16, _size: u8, value: u32) -> bool {
        let now = self.now_ns();
        match port {
            0x40..=0x43 | 0x61 => {
                self.shared
                    .pit
                    .lock()
                    .expect("pit lock poisoned")
                    .port_write(port, value as u8, now);
                true
            }
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => {
                self.shared
                    .pic
                    .lock()
                    .expect("pic lock poisoned")
                    .port_write(port, value as u8);
                true
            }
            // POST codes and I/O delays: nothing listens.
            0x80 => true,
            _ => false,
        }
    }

    fn mmio_read(&mut self, gpa: u64, size: u8) -> Option<u64> {
        if gpa & !0xfff == LAPIC_BASE {
            let now = self.now_ns();
            let v = self
                .me
                .lapic
                .lock()
                .expect("lapic lock poisoned")
                .read((gpa & 0xff0) as u32, now);
            return Some(narrow(v, gpa, size));
        }
        if gpa & !0xfff == IOAPIC_BASE {
            let v = self
                .shared
                .ioapic
                .lock()
                .expect("ioapic lock poisoned")
                .read((gpa & 0xff) as u32);
            return Some(narrow(v, gpa, size));
        }
        None
    }

    fn mmio_write(&mut self, gpa: u64, _size: u8, value: u64) -> bool {
        if gpa & !0xfff == LAPIC_BASE {
            let now = self.now_ns();
            let effect = self.me.lapic.lock().expect("lapic lock poisoned").write(
                (gpa & 0xff0) as u32,
                value as u32,
                now,
            );
            self.me.irq_hint.store(true, Ordering::Release);
            self.lapic_effect(effect);
            return true;
        }
        if gpa & !0xfff == IOAPIC_BASE {
            let msg = self
                .shared
                .ioapic
                .lock()
                .expect("ioapic lock poisoned")
                .write((gpa & 0xff) as u32, value as u32);
            if let Some(m) = msg {
                self.shared.deliver(&m);
            }
            return true;
        }
        false
    }

    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        match index {
            0x10 => Some(self.rdtsc()),
            0x1b => Some(
                self.me
                    .lapic
                    .lock()
                    .expect("lapic lock poisoned")
                    .base_msr(),
            ),
            0x6e0 => Some(
                self.me
                    .lapic
                    .lock()
                    .expect("lapic lock poisoned")
                    .read_tsc_deadline(),
            ),
            kvmclock::MSR_KVM_SYSTEM_TIME_NEW | kvmclock::MSR_KVM_WALL_CLOCK_NEW => Some(0),
            _ => None,
        }
    }

    fn wrmsr(&mut self, index: u32, value: u64) -> Option<bool> {
        match index {
            0x10 => {
                let now_tsc = clock::ns_to_tsc(self.now_ns()) as i64;
                self.tsc_offset = (value as i64).wrapping_sub(now_tsc);
                Some(true)
            }
            0x1b => {
                self.me
                    .lapic
                    .lock()
                    .expect("lapic lock poisoned")
                    .set_base_msr(value);
                Some(true)
            }
            0x6e0 => {
                let now = self.now_ns();
                // The guest writes its TSC; the LAPIC counts host-derived TSC.
                let tsc = (value as i64).wrapping_sub(self.tsc_offset) as u64;
                self.me
                    .lapic
                    .lock()
                    .expect("lapic lock poisoned")
                    .write_tsc_deadline(tsc, now);
                Some(true)
            }
            kvmclock::MSR_KVM_SYSTEM_TIME_NEW | kvmclock::MSR_KVM_SYSTEM_TIME => {
                if value & 1 != 0 {
                    self.write_kvmclock(value & !1);
                }
                Some(true)
            }
            kvmclock::MSR_KVM_WALL_CLOCK_NEW | kvmclock::MSR_KVM_WALL_CLOCK => {
                // Wall clock at guest time zero (boot): host time now minus guest uptime.
                let boot = self.shared.wall_clock_epoch_ns();
                let wc =
                    kvmclock::wall_clock(boot / 1_000_000_000, (boot % 1_000_000_000) as u32, 2);
                if let Some(mem) = self.shared.mem.get() {
                    mem.write_bytes(value, &wc);
                }
                Some(true)
            }
            _ => None,
        }
    }

    fn rdtsc(&mut self) -> u64 {
        let mut tsc = clock::ns_to_tsc(self.now_ns());
        if self.shared.manual.is_some() {
            // Time moves in steps between instruction batches; successive reads within one
            // still advance, as code waiting on the TSC expects.
            self.tsc_reads += 1;
            tsc += self.tsc_reads;
        }
        (tsc as i64).wrapping_add(self.tsc_offset) as u64
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        crate::cpuid::lookup(&self.cpuid, leaf, subleaf)
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn take_interrupt(&mut self) -> Option<u8> {
        self.me.lapic.lock().expect("lapic lock poisoned").ack()
    }

    fn interrupt_hint(&self) -> Option<Arc<AtomicBool>> {
        Some(self.me.irq_hint.clone())
    }

    fn interrupt_pending(&self) -> bool {
        if !self.me.irq_hint.load(Ordering::Acquire) {
            return false;
        }
        let pending = self
            .me
            .lapic
            .lock()
            .expect("lapic lock poisoned")
            .pending_vector()
            .is_some();
        if !pending {
            self.me.irq_hint.store(false, Ordering::Release);
        }
        pending
    }

    fn halt(&mut self) {
        let now = self.now_ns();
        let deadline = self
            .me
            .lapic
            .lock()
            .expect("lapic lock poisoned")
            .next_deadline_ns();
        if let Some(manual) = &self.shared.manual {
            // Deterministic: idle time passes at once, up to the next timer (or 1 ms); while
            // other vCPUs take turns, by at most a turn's worth, so time does not race ahead of
            // a busy vCPU.
            let mut target = deadline.unwrap_or(now + 1_000_000).max(now + 1);
            if self.shared.multi_turns().is_some() {
                target = target.min(now + BUDGET);
            }
            self.shared
                .idle_ns
                .fetch_add(target - now, Ordering::Relaxed);
            manual.set(target);
            self.tsc_reads = 0;
            self.poll_timers();
            return;
        }
        let mut sleep = MAX_HALT_SLEEP;
        if let Some(d) = deadline {
            sleep = sleep.min(Duration::from_nanos(d.saturating_sub(now)));
        }
        let g = self.me.sleep.lock().expect("vcpu sleep lock poisoned");
        if !self.me.irq_hint.load(Ordering::Acquire) && !hypervisor::kicked() && !sleep.is_zero() {
            let _ = self.me.wake.wait_timeout(g, sleep);
        }
        self.poll_timers();
    }
}

impl VcpuMachine {
    /// Fires due timers of this vCPU (and, on the BSP, the PIT).
    fn poll_timers(&self) {
        let now = self.now_ns();
        let fired = self
            .me
            .lapic
            .lock()
            .expect("lapic lock poisoned")
            .poll_timer(now);
        if fired {
            self.me.irq_hint.store(true, Ordering::Release);
        }
        if self.me.id == 0 {
            let edge = self.shared.pit.lock().expect("pit lock poisoned").poll(now);
            if edge {
                // ISA IRQ 0 is wired to GSI 2 (MADT interrupt source override).
                self.shared.set_gsi(2);
            }
        }
    }
}

/// The bytes of a 32-bit register value a narrower access at `gpa` sees.
fn narrow(v: u32, gpa: u64, size: u8) -> u64 {
    let shift = (gpa & 3) * 8;
    let v = u64::from(v) >> shift;
    if size >= 4 {
        v
    } else {
        v & ((1u64 << (size * 8)) - 1)
    }
}

/// An emulated vCPU.
pub struct EmuVcpu {
    cpu: Cpu,
    me: Arc<VcpuShared>,
    shared: Arc<Shared>,
    mp: MpState,
    /// Data of the exit being handled by the VMM.
    io_buf: [u8; 8],
    /// The read exit the VMM is answering (its result is passed in on the next run).
    pending: Option<IoReq>,
    /// Deterministic mode with several vCPUs: this vCPU holds the turn (kept across device
    /// exits, so the VMM handles them in turn order too).
    holding_turn: bool,
    started: std::time::Instant,
    /// With FERROVISOR_EMU_PROFILE=FILE: guest RIP sampled every BUDGET instructions, written
    /// to FILE (one `count rip` line per address) when the vCPU is dropped.
    rip_samples: Option<(std::path::PathBuf, HashMap<u64, u64>)>,
}

impl EmuVcpu {
    fn machine(&mut self) -> &mut VcpuMachine {
        self.cpu
            .m
            .as_any_mut()
            .and_then(|a| a.downcast_mut::<VcpuMachine>())
            .expect("an EmuVcpu's machine is the VcpuMachine create_vcpu made")
    }

    fn machine_ref(&self) -> &VcpuMachine {
        self.cpu
            .m
            .as_any()
            .and_then(|a| a.downcast_ref::<VcpuMachine>())
            .expect("an EmuVcpu's machine is the VcpuMachine create_vcpu made")
    }

    /// INIT: the vCPU goes back to its reset state and waits for a STARTUP IPI.
    fn do_init(&mut self) {
        self.cpu.set_state(CpuState::default());
        self.cpu.halted = false;
        self.mp = MpState::WaitForSipi;
        self.me
            .lapic
            .lock()
            .expect("lapic lock poisoned")
            .init_reset();
    }

    /// STARTUP: real mode at vector << 12.
    fn do_sipi(&mut self, vector: u8) {
        let mut s = CpuState::default();
        s.seg[crate::cpu::state::CS] = Seg {
            selector: u16::from(vector) << 8,
            base: u64::from(vector) << 12,
            limit: 0xffff,
            attr: 0x9b,
        };
        s.rip = 0;
        self.cpu.set_state(s);
        self.cpu.halted = false;
        self.mp = MpState::Runnable;
    }

    /// Hands the VMM's answer to the last read exit to the interpreter.
    fn complete_io(&mut self) {
        if let Some(response) = self.pending_response() {
            self.cpu.io.response = Some(response);
        }
        self.pending = None;
        self.cpu.io.exit = None;
    }

    /// The VMM's answer to the read exit it is handling (in `io_buf`), if there is one.
    fn pending_response(&self) -> Option<(IoReq, u64)> {
        let req = self.pending?;
        let size = match req {
            IoReq::PioIn { size, .. } | IoReq::MmioRead { size, .. } => size as usize,
            _ => return None,
        };
        let mut v = 0u64;
        for (i, b) in self.io_buf.iter().enumerate().take(size) {
            v |= u64::from(*b) << (8 * i);
        }
        Some((req, v))
    }
}

impl EmuVcpu {
    /// Waits for this vCPU's turn if the vCPUs take turns; false if kicked meanwhile.
    fn begin_turn(&mut self) -> bool {
        if self.holding_turn {
            return true;
        }
        let shared = self.shared.clone();
        match shared.multi_turns() {
            Some(t) => {
                if !t.acquire(self.me.id) {
                    return false;
                }
                self.holding_turn = true;
                true
            }
            None => true,
        }
    }

    /// Passes the turn on, if this vCPU holds it.
    fn end_turn(&mut self) {
        if self.holding_turn {
            if let Some(t) = &self.shared.turns {
                t.pass(self.me.id, self.shared.vcpu_count());
            }
            self.holding_turn = false;
        }
    }
}

impl Vcpu for EmuVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        self.complete_io();
        loop {
            if hypervisor::take_kick() || !self.begin_turn() {
                // A vCPU holding the turn keeps it: when it runs again (after a pause, or
                // restored from a snapshot) the vCPUs go on in the same order as without
                // the interruption.
                hypervisor::take_kick();
                return Ok(VcpuExit::Interrupted);
            }
            let (init, sipi) = {
                let mut l = self.me.lapic.lock().expect("lapic lock poisoned");
                (l.take_init(), l.take_sipi())
            };
            if init {
                self.do_init();
            }
            if self.mp == MpState::WaitForSipi {
                if let Some(v) = sipi {
                    self.do_sipi(v);
                } else if self.holding_turn {
                    self.end_turn();
                    continue;
                } else {
                    let g = self.me.sleep.lock().expect("vcpu sleep lock poisoned");
                    if !self.me.irq_hint.load(Ordering::Acquire) && !hypervisor::kicked() {
                        let _ = self.me.wake.wait_timeout(g, MAX_HALT_SLEEP);
                    }
                    self.me.irq_hint.store(false, Ordering::Release);
                    continue;
                }
            }
            self.machine().poll_timers();
            let before = self.cpu.icount;
            let exit = self.cpu.run(BUDGET);
            if let (Some((_, samples)), RunExit::Budget) = (&mut self.rip_samples, &exit) {
                *samples.entry(self.cpu.s.rip).or_default() += 1;
            }
            if let Some(manual) = &self.shared.manual {
                let retired = match &self.shared.turns {
                    Some(t) => t.retire(self.cpu.icount - before),
                    None => self.cpu.icount,
                };
                let now = retired + self.shared.idle_ns.load(Ordering::Relaxed);
                manual.set(now);
                self.machine().tsc_reads = 0;
            }
            if !matches!(exit, RunExit::Io(_)) {
                self.end_turn();
            }
            match exit {
                RunExit::Budget | RunExit::Halted => continue,
                RunExit::Shutdown => return Ok(VcpuExit::Shutdown),
                RunExit::Dead if self.shared.multi_turns().is_some() => continue,
                RunExit::FetchFromMmio => {
                    // Reported as KVM reports its emulator giving up: an emulation failure.
                    return Ok(VcpuExit::InternalError {
                        suberror: 1,
                        data: vec![self.cpu.s.rip],
                    });
                }
                RunExit::Dead => {
                    // HLT with interrupts off: only INIT/SIPI (or a stop request) can wake it.
                    let g = self.me.sleep.lock().expect("vcpu sleep lock poisoned");
                    if !self.me.irq_hint.load(Ordering::Acquire) && !hypervisor::kicked() {
                        let _ = self.me.wake.wait_timeout(g, MAX_HALT_SLEEP);
                    }
                    self.me.irq_hint.store(false, Ordering::Release);
                    if self
                        .me
                        .lapic
                        .lock()
                        .expect("lapic lock poisoned")
                        .has_pending_event()
                    {
                        // INIT or SIPI: handled at the top of the loop.
                    }
                    continue;
                }
                RunExit::Io(req) => {
                    tracing::trace!(?req, "emu: device access exit");
                    return Ok(match req {
                        IoReq::PioIn { port, size } => {
                            self.pending = Some(req);
                            VcpuExit::IoIn {
                                port,
                                data: &mut self.io_buf[..size as usize],
                            }
                        }
                        IoReq::PioOut { port, size, value } => {
                            self.io_buf[..4].copy_from_slice(&value.to_le_bytes());
                            VcpuExit::IoOut {
                                port,
                                data: &self.io_buf[..size as usize],
                            }
                        }
                        IoReq::MmioRead { gpa, size } => {
                            self.pending = Some(req);
                            VcpuExit::MmioRead {
                                addr: gpa,
                                data: &mut self.io_buf[..size as usize],
                            }
                        }
                        IoReq::MmioWrite { gpa, .. } if self.shared.signal_ioevent(gpa) => {
                            self.cpu.io.exit = None;
                            continue;
                        }
                        IoReq::MmioWrite { gpa, size, value } => {
                            self.io_buf.copy_from_slice(&value.to_le_bytes());
                            VcpuExit::MmioWrite {
                                addr: gpa,
                                data: &self.io_buf[..size as usize],
                            }
                        }
                    });
                }
            }
        }
    }

    fn regs(&self) -> Result<Regs> {
        let s = &self.cpu.s;
        let g = &s.gpr;
        Ok(Regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: s.rip,
            rflags: s.rflags,
        })
    }

    fn set_regs(&mut self, r: &Regs) -> Result<()> {
        let s = &mut self.cpu.s;
        s.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        s.rip = r.rip;
        s.rflags = r.rflags | 2;
        Ok(())
    }

    fn sregs(&self) -> Result<Sregs> {
        let s = &self.cpu.s;
        let seg = |x: &Seg| Segment {
            base: x.base,
            limit: x.limit,
            selector: x.selector,
            type_: x.typ(),
            present: x.present(),
            dpl: x.dpl(),
            db: x.db(),
            s: x.attr & 0x10 != 0,
            l: x.long(),
            g: x.attr & 0x8000 != 0,
            avl: x.attr & 0x1000 != 0,
            unusable: !x.present(),
        };
        use crate::cpu::state::{CS, DS, ES, FS, GS, SS};
        Ok(Sregs {
            cs: seg(&s.seg[CS]),
            ds: seg(&s.seg[DS]),
            es: seg(&s.seg[ES]),
            fs: seg(&s.seg[FS]),
            gs: seg(&s.seg[GS]),
            ss: seg(&s.seg[SS]),
            tr: seg(&s.tr),
            ldt: seg(&s.ldtr),
            gdt: hypervisor::DescriptorTable {
                base: s.gdtr.base,
                limit: s.gdtr.limit,
            },
            idt: hypervisor::DescriptorTable {
                base: s.idtr.base,
                limit: s.idtr.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: 0,
            efer: s.efer,
            apic_base: self
                .me
                .lapic
                .lock()
                .expect("lapic lock poisoned")
                .base_msr(),
        })
    }

    fn set_sregs(&mut self, r: &Sregs) -> Result<()> {
        let seg = |x: &Segment| Seg {
            selector: x.selector,
            base: x.base,
            limit: x.limit,
            attr: u16::from(x.type_ & 0xf)
                | (u16::from(x.s) << 4)
                | (u16::from(x.dpl & 3) << 5)
                | (u16::from(x.present && !x.unusable) << 7)
                | (u16::from(x.avl) << 12)
                | (u16::from(x.l) << 13)
                | (u16::from(x.db) << 14)
                | (u16::from(x.g) << 15),
        };
        let this = self;
        use crate::cpu::state::{CS, DS, ES, FS, GS, SS};
        let s = &mut this.cpu.s;
        s.seg[CS] = seg(&r.cs);
        s.seg[DS] = seg(&r.ds);
        s.seg[ES] = seg(&r.es);
        s.seg[FS] = seg(&r.fs);
        s.seg[GS] = seg(&r.gs);
        s.seg[SS] = seg(&r.ss);
        s.tr = seg(&r.tr);
        s.ldtr = seg(&r.ldt);
        s.gdtr = Dtr {
            base: r.gdt.base,
            limit: r.gdt.limit,
        };
        s.idtr = Dtr {
            base: r.idt.base,
            limit: r.idt.limit,
        };
        s.cr0 = r.cr0;
        s.cr2 = r.cr2;
        s.cr3 = r.cr3;
        s.cr4 = r.cr4;
        s.efer = r.efer;
        this.me
            .lapic
            .lock()
            .expect("lapic lock poisoned")
            .set_base_msr(r.apic_base);
        this.cpu.flush_tlb();
        Ok(())
    }

    fn set_fpu(&mut self, fpu: &Fpu) -> Result<()> {
        let s = &mut self.cpu.s;
        s.fpu.fcw = fpu.fcw;
        s.fpu.mxcsr = fpu.mxcsr;
        Ok(())
    }

    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()> {
        self.machine().cpuid = entries.to_vec();
        Ok(())
    }

    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()> {
        for (i, m) in msrs.iter().enumerate() {
            if !self.cpu.set_msr(m.index, m.data) {
                return Err(HypervisorError::SetMsrs {
                    set: i,
                    total: msrs.len(),
                    rejected: m.index,
                });
            }
        }
        Ok(())
    }

    fn setup_lapic_lints(&mut self) -> Result<()> {
        let mut l = self.me.lapic.lock().expect("lapic lock poisoned");
        let now = self.shared.now_ns();
        // LINT0: ExtINT, LINT1: NMI, as firmware leaves them.
        let _ = l.write(0x350, 0x700, now);
        let _ = l.write(0x360, 0x400, now);
        Ok(())
    }

    fn set_runnable(&mut self, runnable: bool) -> Result<()> {
        self.mp = if runnable {
            MpState::Runnable
        } else {
            MpState::WaitForSipi
        };
        Ok(())
    }

    fn save_state(&self) -> Result<SavedState> {
        self.save()
    }

    fn restore_state(&mut self, state: &SavedState) -> Result<()> {
        self.restore(state)
    }

    fn save_code(&self, out: &mut std::fs::File) -> Result<bool> {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
        self.cpu
            .save_blocks(&mut out)
            .and_then(|()| std::io::Write::flush(&mut out))
            .map_err(|e| HypervisorError::VcpuState("save compiled blocks", e))?;
        Ok(true)
    }

    fn adopt_code(&mut self, file: &std::fs::File, path: &std::path::Path) -> Result<()> {
        self.cpu
            .adopt_blocks(file)
            .map_err(|e| HypervisorError::SavedCode {
                path: path.display().to_string(),
                why: e.to_string(),
            })
    }
}

impl Drop for EmuVcpu {
    /// With FERROVISOR_EMU_STATS set, reports how many instructions this vCPU retired and how
    /// fast (the benchmark reads this line).
    fn drop(&mut self) {
        if std::env::var_os("FERROVISOR_EMU_STATS").is_some() {
            let secs = self.started.elapsed().as_secs_f64();
            let (translated, code, runs, bails) = self.cpu.translation_stats();
            eprintln!(
                "emu: vCPU {} retired {} instructions in {:.3} s ({:.1} MIPS); {} blocks run, {} compiled, {} KiB of blocks, {} flushes; {} translated ({} KiB of host code), {} runs of them, {} stopped early",
                self.me.id,
                self.cpu.icount,
                secs,
                self.cpu.icount as f64 / secs.max(1e-9) / 1e6,
                self.cpu.blocks_run,
                self.cpu.blocks_compiled,
                self.cpu.compiled_bytes() >> 10,
                self.cpu.block_flushes(),
                translated,
                code >> 10,
                runs,
                bails,
            );
        }
        if let Some((path, samples)) = self.rip_samples.take() {
            let path = path.with_extension(format!("vcpu{}", self.me.id));
            let mut lines: Vec<_> = samples.into_iter().map(|(r, n)| (n, r)).collect();
            lines.sort_unstable_by(|a, b| b.cmp(a));
            let text: String = lines.iter().map(|(n, r)| format!("{n} {r:#x}\n")).collect();
            if let Err(e) = std::fs::write(&path, text) {
                eprintln!("emu: cannot write the RIP profile {}: {e}", path.display());
            }
        }
    }
}

// SAFETY: the interpreter state is owned by the vCPU; the machine's shared parts are behind
// locks and atomics; the raw host pointers in guest memory refer to the VM's mappings.
unsafe impl Send for EmuVcpu {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_wall_clock_starts_at_the_fixed_date() {
        let vm = EmuHypervisor::deterministic().create_vm().unwrap();
        // Guest time is zero until a vCPU runs, however much host time passes.
        assert_eq!(vm.wall_clock_ns(), DETERMINISTIC_EPOCH_NS);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(vm.wall_clock_ns(), DETERMINISTIC_EPOCH_NS);
    }

    #[test]
    fn wall_clock_is_the_hosts_otherwise() {
        let vm = EmuHypervisor::new().create_vm().unwrap();
        let before = hypervisor::host_wall_clock_ns();
        let now = vm.wall_clock_ns();
        let after = hypervisor::host_wall_clock_ns();
        assert!(
            (before..=after).contains(&now),
            "{before} <= {now} <= {after}"
        );
    }
}
