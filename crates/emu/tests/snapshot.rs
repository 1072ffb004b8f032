//! Snapshots of the emulator back end through the seam: a guest saved mid-run and restored
//! into a new VM continues exactly as the original (deterministic mode), guest time continues
//! from the saved time (host-clock mode), bad states are refused with clear errors, and the
//! dirty-page log reports exactly the pages the guest wrote.
#![cfg(target_arch = "x86_64")]

use std::sync::Arc;
use std::time::Duration;

use emu::backend::EmuHypervisor;
use emu::platform::clock::{tsc_to_ns, TSC_HZ};
use hypervisor::{
    BackendKind, DescriptorTable, Hypervisor, HypervisorError, MemoryRegion, SavedState, Segment,
    Vcpu, VcpuExit, Vm,
};
use iced_x86::code_asm::*;
use vm_memory::GuestAddress;

const RAM_LEN: usize = 8 << 20;
const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const CODE: u64 = 0x1_0000;
const HANDLER: u64 = 0x1_1000;
/// Guest data: the timer tick count, then a table the main loop fills.
const DATA: u64 = 0x2_0000;
const STACK_TOP: u64 = 0x8_0000;
const TIMER_VECTOR: u64 = 0x40;
/// A guest-physical address with no RAM: reads exit to the VMM.
const MMIO: u64 = 0xd000_0000;
const OUT_PORT: u16 = 0x500;
const IN_PORT: u16 = 0x501;

/// Anonymous host memory used as guest RAM; unmapped on drop (after the VM, see `Guest`).
struct Ram {
    ptr: *mut u8,
    len: usize,
}

impl Ram {
    fn new(len: usize) -> Ram {
        let p = emu::memory::map_anonymous(len).expect("cannot map guest RAM");
        Ram {
            ptr: p.as_ptr(),
            len,
        }
    }

    fn write(&self, offset: u64, bytes: &[u8]) {
        assert!(offset as usize + bytes.len() <= self.len);
        // SAFETY: inside the mapping (checked above); no vCPU runs while tests copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.add(offset as usize),
                bytes.len(),
            )
        };
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        assert!(offset as usize + len <= self.len);
        let mut v = vec![0; len];
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(offset as usize), v.as_mut_ptr(), len)
        };
        v
    }

    fn u32_at(&self, offset: u64) -> u32 {
        u32::from_le_bytes(self.read(offset, 4).try_into().unwrap())
    }

    fn put_u64(&self, offset: u64, v: u64) {
        self.write(offset, &v.to_le_bytes());
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, with its length; the VM using it is gone.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM with its RAM regions and vCPU 0. Fields drop in order: the vCPU and the VM before
/// the RAM they point into.
struct Guest {
    vcpu: Box<dyn Vcpu>,
    vm: Arc<dyn Vm>,
    ram: Vec<(u32, u64, Ram)>,
}

impl Guest {
    /// A VM with the regions `(slot, guest address, length)`, mapped in the order given.
    fn with_regions(hv: &EmuHypervisor, regions: &[(u32, u64, usize)]) -> Guest {
        let vm = hv.create_vm().unwrap();
        let mut ram = Vec::new();
        for &(slot, gpa, len) in regions {
            let r = Ram::new(len);
            // SAFETY: `r` is a live mapping of `len` bytes that the Guest keeps until after
            // the VM is dropped.
            unsafe {
                vm.map_memory(MemoryRegion {
                    slot,
                    guest_addr: GuestAddress(gpa),
                    len_bytes: len as u64,
                    host_addr: r.ptr as u64,
                })
            }
            .unwrap();
            ram.push((slot, gpa, r));
        }
        let vcpu = vm.create_vcpu(0).unwrap();
        Guest { vcpu, vm, ram }
    }

    fn new(hv: &EmuHypervisor) -> Guest {
        Self::with_regions(hv, &[(0, 0, RAM_LEN)])
    }

    /// The first region (guest address 0).
    fn ram(&self) -> &Ram {
        &self.ram[0].2
    }

    /// Kicks and runs once, as the VMM does before a save: the last exit is completed and
    /// nothing more runs.
    fn settle(&mut self) {
        hypervisor::kick_current_thread();
        match self.vcpu.run().unwrap() {
            VcpuExit::Interrupted => {}
            other => panic!("a kicked run returned {other:?}"),
        }
    }

    /// vCPU and VM state, each through a JSON text round trip, as a snapshot file holds them.
    fn save(&self) -> (SavedState, SavedState) {
        let through_json = |s: SavedState| {
            let text = serde_json::to_string(&s).unwrap();
            serde_json::from_str::<SavedState>(&text).unwrap()
        };
        (
            through_json(self.vcpu.save_state().unwrap()),
            through_json(self.vm.save_state().unwrap()),
        )
    }

    /// A new VM like this one with a copy of its RAM and the given states restored.
    fn restored(
        &self,
        hv: &EmuHypervisor,
        vcpu: &SavedState,
        vm: &SavedState,
        advance_clock_ns: u64,
    ) -> Guest {
        let regions: Vec<_> = self.ram.iter().map(|(s, g, r)| (*s, *g, r.len)).collect();
        let mut g = Guest::with_regions(hv, &regions);
        for ((_, _, from), (_, _, to)) in self.ram.iter().zip(&g.ram) {
            to.write(0, &from.read(0, from.len));
        }
        g.vm.restore_state(vm, advance_clock_ns).unwrap();
        g.vcpu.restore_state(vcpu).unwrap();
        g
    }
}

fn seg32(selector: u16, type_: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        dpl: 0,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// 32-bit protected mode, paging off, flat segments (GDT: code 0x08, data 0x10), the IDT at
/// `IDT`, RIP at `CODE`, interrupts off.
fn setup_protected_mode(g: &mut Guest) {
    let ram = g.ram();
    ram.put_u64(GDT + 8, 0x00cf_9b00_0000_ffff);
    ram.put_u64(GDT + 16, 0x00cf_9300_0000_ffff);
    let mut sr = g.vcpu.sregs().unwrap();
    sr.cs = seg32(0x08, 0xb);
    for s in [&mut sr.ds, &mut sr.es, &mut sr.fs, &mut sr.gs, &mut sr.ss] {
        *s = seg32(0x10, 0x3);
    }
    sr.gdt = DescriptorTable {
        base: GDT,
        limit: 0x17,
    };
    sr.idt = DescriptorTable {
        base: IDT,
        limit: 0x7ff,
    };
    sr.cr0 = 0x11;
    sr.cr4 = 0;
    sr.efer = 0;
    g.vcpu.set_sregs(&sr).unwrap();
    let mut r = g.vcpu.regs().unwrap();
    r.rip = CODE;
    r.rsp = STACK_TOP;
    r.rflags = 2;
    g.vcpu.set_regs(&r).unwrap();
}

fn assemble32(
    base: u64,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    body(&mut a).unwrap();
    a.assemble(base).unwrap()
}

/// The main test guest: arms the LAPIC timer (one-shot, re-armed by its handler with varying
/// counts), then loops forever: some arithmetic and the TSC folded into an accumulator, an
/// `out` of the loop count mixed with the tick count, an `in` and an MMIO read folded into
/// the accumulator, which is also stored in a table in RAM.
fn load_busy_guest(g: &mut Guest) {
    setup_protected_mode(g);
    let main = assemble32(CODE, |a| {
        a.mov(dword_ptr(0xfee0_00f0u64), 0x1ff)?; // SVR: enabled
        a.mov(dword_ptr(0xfee0_03e0u64), 0xb)?; // divide by 1
        a.mov(dword_ptr(0xfee0_0320u64), TIMER_VECTOR as i32)?; // one-shot
        a.mov(dword_ptr(0xfee0_0380u64), 3000)?; // 3 µs
        a.sti()?;
        a.xor(ecx, ecx)?;
        a.xor(ebx, ebx)?;
        let mut top = a.create_label();
        let mut inner = a.create_label();
        a.set_label(&mut top)?;
        a.inc(ecx)?;
        a.mov(esi, 300)?;
        a.set_label(&mut inner)?;
        a.add(ebx, ecx)?;
        a.rol(ebx, 3)?;
        a.dec(esi)?;
        a.jnz(inner)?;
        a.rdtsc()?;
        a.add(ebx, eax)?;
        a.mov(eax, ecx)?;
        a.xor(eax, dword_ptr(DATA))?;
        a.mov(edx, u32::from(OUT_PORT))?;
        a.out(dx, eax)?;
        a.mov(edx, u32::from(IN_PORT))?;
        a.in_(eax, dx)?;
        a.add(ebx, eax)?;
        a.add(ebx, dword_ptr(MMIO))?;
        a.mov(eax, ecx)?;
        a.and(eax, 0xff)?;
        a.mov(dword_ptr(eax * 4 + (DATA + 0x100)), ebx)?;
        a.jmp(top)?;
        Ok(())
    });
    let handler = assemble32(HANDLER, |a| {
        a.push(eax)?;
        a.inc(dword_ptr(DATA))?;
        a.mov(eax, dword_ptr(DATA))?;
        a.and(eax, 0x7ff)?;
        a.add(eax, 1000)?;
        a.mov(dword_ptr(0xfee0_0380u64), eax)?; // re-arm
        a.mov(dword_ptr(0xfee0_00b0u64), 0)?; // EOI
        a.pop(eax)?;
        a.iretd()?;
        Ok(())
    });
    let ram = g.ram();
    ram.write(CODE, &main);
    ram.write(HANDLER, &handler);
    let gate = (HANDLER & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((HANDLER >> 16) << 48);
    ram.put_u64(IDT + 8 * TIMER_VECTOR, gate);
}

/// One device access the guest made, as the VMM saw it (reads: the value it supplied).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Access {
    Out(u16, u32),
    In(u16, u32),
    MmioRead(u64, u32),
}

/// The VMM's answer to the `n`th access: some function of `n` only.
fn answer(n: usize) -> u32 {
    (n as u32).wrapping_mul(0x9e37_79b9) ^ 0x5555
}

/// Runs until the log holds `until` accesses (each run returns one exit; the read exits are
/// answered in place, as the VMM does).
fn drive(g: &mut Guest, log: &mut Vec<Access>, until: usize) {
    while log.len() < until {
        let n = log.len();
        match g.vcpu.run().unwrap() {
            VcpuExit::IoOut { port, data } => {
                let mut b = [0; 4];
                b[..data.len()].copy_from_slice(data);
                log.push(Access::Out(port, u32::from_le_bytes(b)));
            }
            VcpuExit::IoIn { port, data } => {
                let v = answer(n);
                let bytes = v.to_le_bytes();
                data.copy_from_slice(&bytes[..data.len()]);
                log.push(Access::In(port, v));
            }
            VcpuExit::MmioRead { addr, data } => {
                let v = answer(n);
                let bytes = v.to_le_bytes();
                data.copy_from_slice(&bytes[..data.len()]);
                log.push(Access::MmioRead(addr, v));
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

/// Everything observable at the end of a run: the complete vCPU and VM states and the RAM.
fn final_state(g: &mut Guest) -> (SavedState, SavedState, Vec<u8>) {
    g.settle();
    let (vcpu, vm) = g.save();
    (vcpu, vm, g.ram().read(0, RAM_LEN))
}

/// The reference: one uninterrupted deterministic run of `total` accesses.
fn reference_run(total: usize) -> (Vec<Access>, (SavedState, SavedState, Vec<u8>)) {
    let hv = EmuHypervisor::deterministic();
    let mut g = Guest::new(&hv);
    load_busy_guest(&mut g);
    let mut log = Vec::new();
    drive(&mut g, &mut log, total);
    let end = final_state(&mut g);
    (log, end)
}

/// Runs `first` accesses, saves (completing the last exit first if `settle`), restores into
/// a new VM and runs to `total`: the accesses and the final state must match the reference.
fn check_round_trip(first: usize, total: usize, settle: bool) {
    let (ref_log, ref_end) = reference_run(total);
    let ticks = u32::from_le_bytes(ref_end.2[DATA as usize..][..4].try_into().unwrap());
    assert!(ticks > 20, "the timer fired only {ticks} times");

    let hv = EmuHypervisor::deterministic();
    let mut g = Guest::new(&hv);
    load_busy_guest(&mut g);
    let mut log = Vec::new();
    drive(&mut g, &mut log, first);
    if settle {
        g.settle();
    }
    let (vcpu, vm) = g.save();
    let mut r = g.restored(&hv, &vcpu, &vm, 0);
    drop(g);
    drive(&mut r, &mut log, total);
    assert!(log == ref_log, "the accesses differ after the restore");
    let end = final_state(&mut r);
    assert_eq!(end.0, ref_end.0, "vCPU state");
    assert_eq!(end.1, ref_end.1, "VM state");
    assert!(end.2 == ref_end.2, "RAM differs");
}

#[test]
fn deterministic_round_trip_after_an_out_exit_continues_exactly() {
    // Accesses go out, in, MMIO read: number 301 (index 300) is an `out`.
    check_round_trip(301, 900, true);
}

#[test]
fn deterministic_round_trip_after_an_in_exit_continues_exactly() {
    // Index 301: an `in`, answered by the VMM, completed by the kicked run, then saved.
    check_round_trip(302, 900, true);
}

#[test]
fn deterministic_round_trip_after_an_mmio_read_continues_exactly() {
    check_round_trip(303, 900, true);
}

#[test]
fn save_before_completing_a_read_exit_is_exact_too() {
    check_round_trip(302, 900, false);
    check_round_trip(303, 900, false);
}

#[test]
fn restored_vm_keeps_taking_timer_interrupts() {
    let hv = EmuHypervisor::deterministic();
    let mut g = Guest::new(&hv);
    load_busy_guest(&mut g);
    let mut log = Vec::new();
    drive(&mut g, &mut log, 300);
    g.settle();
    let before = g.ram().u32_at(DATA);
    let (vcpu, vm) = g.save();
    let mut r = g.restored(&hv, &vcpu, &vm, 0);
    drive(&mut r, &mut log, 600);
    let after = r.ram().u32_at(DATA);
    assert!(after > before + 10, "ticks {before} -> {after}");
}

/// A guest that reports its TSC forever: `out` of the low half, then of the high half.
fn load_tsc_guest(g: &mut Guest) {
    setup_protected_mode(g);
    let code = assemble32(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.rdtsc()?;
        a.mov(ecx, edx)?;
        a.mov(edx, u32::from(OUT_PORT))?;
        a.out(dx, eax)?;
        a.mov(eax, ecx)?;
        a.out(dx, eax)?;
        a.jmp(top)?;
        Ok(())
    });
    g.ram().write(CODE, &code);
}

fn read_tsc(g: &mut Guest) -> u64 {
    let mut log = Vec::new();
    drive(g, &mut log, 2);
    match (&log[0], &log[1]) {
        (Access::Out(_, lo), Access::Out(_, hi)) => u64::from(*hi) << 32 | u64::from(*lo),
        other => panic!("unexpected accesses {other:?}"),
    }
}

#[test]
fn guest_time_continues_from_the_saved_time_plus_the_advance() {
    let hv = EmuHypervisor::new();
    let mut g = Guest::new(&hv);
    load_tsc_guest(&mut g);
    let t1 = read_tsc(&mut g);
    std::thread::sleep(Duration::from_millis(30));
    g.settle();
    let (vcpu, vm) = g.save();
    // The new VM's host clock has run for a while before the restore; guest time must not
    // come from it.
    let advance = 2_000_000_000;
    let regions: Vec<_> = g.ram.iter().map(|(s, a, r)| (*s, *a, r.len)).collect();
    let mut r = Guest::with_regions(&hv, &regions);
    r.ram().write(0, &g.ram().read(0, RAM_LEN));
    std::thread::sleep(Duration::from_millis(300));
    r.vm.restore_state(&vm, advance).unwrap();
    r.vcpu.restore_state(&vcpu).unwrap();
    let t2 = read_tsc(&mut r);
    let elapsed = tsc_to_ns(t2.wrapping_sub(t1));
    assert!(
        (advance + 30_000_000..advance + 250_000_000).contains(&elapsed),
        "guest time moved {elapsed} ns across the save (advance {advance} ns)"
    );
}

#[test]
fn guest_time_stands_still_across_a_save_without_advance() {
    let hv = EmuHypervisor::new();
    let mut g = Guest::new(&hv);
    load_tsc_guest(&mut g);
    let t1 = read_tsc(&mut g);
    g.settle();
    let (vcpu, vm) = g.save();
    std::thread::sleep(Duration::from_millis(20));
    let regions: Vec<_> = g.ram.iter().map(|(s, a, r)| (*s, *a, r.len)).collect();
    let mut r = Guest::with_regions(&hv, &regions);
    r.ram().write(0, &g.ram().read(0, RAM_LEN));
    // The time the new VM exists before the restore does not count either.
    std::thread::sleep(Duration::from_millis(300));
    r.vm.restore_state(&vm, 0).unwrap();
    r.vcpu.restore_state(&vcpu).unwrap();
    let t2 = read_tsc(&mut r);
    assert!(t2 > t1, "guest time went backwards: {t1} -> {t2}");
    let elapsed = tsc_to_ns(t2 - t1);
    assert!(
        elapsed < 250_000_000,
        "guest time moved {elapsed} ns across the save (nothing asked for)"
    );
}

#[test]
fn deterministic_restore_advances_the_clock_by_the_advance() {
    let hv = EmuHypervisor::deterministic();
    let mut g = Guest::new(&hv);
    load_tsc_guest(&mut g);
    let t1 = read_tsc(&mut g);
    g.settle();
    let (vcpu, vm) = g.save();
    let mut r = g.restored(&hv, &vcpu, &vm, 5_000_000);
    let t2 = read_tsc(&mut r);
    let mut more = g.restored(&hv, &vcpu, &vm, 0);
    let t3 = read_tsc(&mut more);
    // The same instructions ran after the save; only the advance differs.
    assert_eq!(t2 - t3, 5_000_000 * (TSC_HZ / 1_000_000_000));
    assert!(t3 > t1);
}

fn saved_pair(hv: &EmuHypervisor) -> (SavedState, SavedState) {
    let mut g = Guest::new(hv);
    load_tsc_guest(&mut g);
    read_tsc(&mut g);
    g.settle();
    g.save()
}

fn expect_bad_state(r: hypervisor::Result<()>, what: &str, why_contains: &str) {
    match r {
        Err(e @ HypervisorError::BadState { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(what) && msg.contains(why_contains),
                "message {msg:?} lacks {what:?} / {why_contains:?}"
            );
        }
        other => panic!("expected a bad {what} state error, got {other:?}"),
    }
}

#[test]
fn a_state_from_another_back_end_is_refused() {
    let hv = EmuHypervisor::deterministic();
    let (vcpu, vm) = saved_pair(&hv);
    let g = Guest::new(&hv);
    let mut g = g;
    let kvm = |s: &SavedState| SavedState {
        backend: BackendKind::Kvm,
        state: s.state.clone(),
    };
    match g.vm.restore_state(&kvm(&vm), 0) {
        Err(HypervisorError::StateBackend { expected, found }) => {
            assert_eq!((expected, found), (BackendKind::Emu, BackendKind::Kvm));
        }
        other => panic!("expected a back-end mismatch, got {other:?}"),
    }
    match g.vcpu.restore_state(&kvm(&vcpu)) {
        Err(e @ HypervisorError::StateBackend { .. }) => {
            assert!(e.to_string().contains("Kvm"), "{e}");
        }
        other => panic!("expected a back-end mismatch, got {other:?}"),
    }
}

#[test]
fn corrupted_states_are_refused() {
    let hv = EmuHypervisor::deterministic();
    let (vcpu, vm) = saved_pair(&hv);
    let mut g = Guest::new(&hv);
    let edit = |s: &SavedState, f: &dyn Fn(&mut serde_json::Value)| {
        let mut s = s.clone();
        f(&mut s.state);
        s
    };
    // A missing field, a field of the wrong type, an unknown field, not even an object.
    let no_cpu = edit(&vcpu, &|v| {
        v.as_object_mut().unwrap().remove("cpu");
    });
    expect_bad_state(g.vcpu.restore_state(&no_cpu), "vCPU", "cpu");
    let bad_type = edit(&vcpu, &|v| v["tsc_offset"] = serde_json::json!("soon"));
    expect_bad_state(g.vcpu.restore_state(&bad_type), "vCPU", "expected i64");
    let extra = edit(&vm, &|v| v["surprise"] = serde_json::json!(1));
    expect_bad_state(g.vm.restore_state(&extra, 0), "VM", "surprise");
    let bad_clock = edit(&vm, &|v| v["clock"]["mode"] = serde_json::json!("sundial"));
    expect_bad_state(g.vm.restore_state(&bad_clock, 0), "VM", "sundial");
    let garbage = edit(&vm, &|v| *v = serde_json::json!([1, 2, 3]));
    expect_bad_state(g.vm.restore_state(&garbage, 0), "VM", "");
    // A state for another vCPU, or a VM with another number of vCPUs.
    let other_id = edit(&vcpu, &|v| v["id"] = serde_json::json!(1));
    expect_bad_state(g.vcpu.restore_state(&other_id), "vCPU", "vCPU 1");
    let two = edit(&vm, &|v| v["vcpus"] = serde_json::json!(2));
    expect_bad_state(g.vm.restore_state(&two, 0), "VM", "2 vCPUs");
    // Nothing half-restored: the good states still go in.
    g.vm.restore_state(&vm, 0).unwrap();
    g.vcpu.restore_state(&vcpu).unwrap();
}

#[test]
fn deterministic_and_host_clock_states_do_not_mix() {
    let det = EmuHypervisor::deterministic();
    let host = EmuHypervisor::new();
    let (det_vcpu, det_vm) = saved_pair(&det);
    let (host_vcpu, host_vm) = saved_pair(&host);

    let mut g = Guest::new(&host);
    expect_bad_state(
        g.vm.restore_state(&det_vm, 0),
        "VM",
        "saved by a deterministic VM; this VM is not deterministic",
    );
    expect_bad_state(
        g.vcpu.restore_state(&det_vcpu),
        "vCPU",
        "saved by a deterministic VM",
    );
    let mut g = Guest::new(&det);
    expect_bad_state(
        g.vm.restore_state(&host_vm, 0),
        "VM",
        "saved by a non-deterministic VM; this VM is deterministic",
    );
    expect_bad_state(
        g.vcpu.restore_state(&host_vcpu),
        "vCPU",
        "saved by a non-deterministic VM",
    );
}

// ---------------------------------------------------------------------------------------------
// Dirty-page log
// ---------------------------------------------------------------------------------------------

/// Pages set in a log, as (region index, page index) pairs.
fn dirty_pages(log: &[Vec<u64>]) -> Vec<(usize, u64)> {
    let mut pages = Vec::new();
    for (r, words) in log.iter().enumerate() {
        for (w, bits) in words.iter().enumerate() {
            for b in 0..64 {
                if bits & (1 << b) != 0 {
                    pages.push((r, w as u64 * 64 + b));
                }
            }
        }
    }
    pages
}

fn run_to_out(g: &mut Guest) {
    match g.vcpu.run().unwrap() {
        VcpuExit::IoOut { .. } => {}
        other => panic!("unexpected exit {other:?}"),
    }
}

const HIGH: u64 = 0x1000_0000;
const HIGH_LEN: usize = 1 << 20;

#[test]
fn dirty_log_reports_exactly_the_written_pages() {
    let hv = EmuHypervisor::new();
    // Slot 1 mapped first: the log is in slot order all the same.
    let mut g = Guest::with_regions(&hv, &[(1, HIGH, HIGH_LEN), (0, 0, RAM_LEN)]);
    let low = 1;
    setup_protected_mode(&mut g);
    let code = assemble32(CODE, |a| {
        a.mov(edx, u32::from(OUT_PORT))?;
        // Before logging starts.
        a.mov(dword_ptr(0x60_0000u64), eax)?;
        a.out(dx, eax)?;
        // Logged: a plain store, a string store over three pages, a locked operation, a
        // store to the other region, and the kvm-clock page the back end writes.
        a.mov(dword_ptr(0x20_0000u64), eax)?;
        a.mov(edi, 0x30_0ff0)?;
        a.mov(ecx, 1030)?;
        a.cld()?;
        a.rep().stosd()?;
        a.mov(ebx, 0x40_0010)?;
        a.lock().xadd(dword_ptr(ebx), eax)?;
        a.mov(dword_ptr(HIGH + 0x3008), eax)?;
        a.mov(ecx, 0x4b56_4d01)?; // MSR_KVM_SYSTEM_TIME_NEW
        a.mov(eax, 0x50_0001)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(edx, u32::from(OUT_PORT))?;
        // Reads and code fetches do not count.
        a.mov(eax, dword_ptr(0x70_0000u64))?;
        a.out(dx, eax)?;
        // After a take: the same page again.
        a.mov(dword_ptr(0x20_0000u64), eax)?;
        a.out(dx, eax)?;
        Ok(())
    });
    g.ram[low].2.write(CODE, &code);

    run_to_out(&mut g);
    g.vm.start_dirty_log().unwrap();
    run_to_out(&mut g);
    let log = g.vm.take_dirty_log().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].len(), RAM_LEN / 4096 / 64, "slot 0 comes first");
    assert_eq!(log[1].len(), HIGH_LEN / 4096 / 64);
    assert_eq!(
        dirty_pages(&log),
        vec![
            (0, 0x200),
            (0, 0x300),
            (0, 0x301),
            (0, 0x302),
            (0, 0x400),
            (0, 0x500),
            (1, 3)
        ]
    );
    // Nothing ran since: an empty record.
    let again = g.vm.take_dirty_log().unwrap();
    assert_eq!(dirty_pages(&again), vec![]);
    // A page written (and its write permission cached) before the take is caught again.
    run_to_out(&mut g);
    assert_eq!(
        dirty_pages(&g.vm.take_dirty_log().unwrap()),
        vec![(0, 0x200)]
    );
    g.vm.stop_dirty_log().unwrap();
    assert!(g.vm.take_dirty_log().is_err(), "no log once stopped");
}

#[test]
fn dirty_log_includes_page_table_accessed_and_dirty_bits() {
    const PML4: u64 = 0x7_0000;
    let hv = EmuHypervisor::new();
    let mut g = Guest::new(&hv);
    let ram = g.ram();
    // Identity map of the first 1 GiB with 2 MiB pages, accessed/dirty bits clear.
    ram.put_u64(PML4, (PML4 + 0x1000) | 3);
    ram.put_u64(PML4 + 0x1000, (PML4 + 0x2000) | 3);
    for i in 0..512u64 {
        ram.put_u64(PML4 + 0x2000 + 8 * i, (i << 21) | 0x83);
    }
    ram.put_u64(GDT + 8, 0x00af_9b00_0000_ffff);
    ram.put_u64(GDT + 16, 0x00cf_9300_0000_ffff);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(edx, u32::from(OUT_PORT)).unwrap();
    a.mov(rax, qword_ptr(0x40_0000)).unwrap();
    a.mov(qword_ptr(0x60_0000), rax).unwrap();
    a.out(dx, eax).unwrap();
    ram.write(CODE, &a.assemble(CODE).unwrap());
    let mut sr = g.vcpu.sregs().unwrap();
    sr.cs = Segment {
        l: true,
        db: false,
        ..seg32(0x08, 0xb)
    };
    for s in [&mut sr.ds, &mut sr.es, &mut sr.fs, &mut sr.gs, &mut sr.ss] {
        *s = seg32(0x10, 0x3);
    }
    sr.gdt = DescriptorTable {
        base: GDT,
        limit: 0x17,
    };
    sr.cr3 = PML4;
    sr.cr4 = 0x20;
    sr.efer = 0x500;
    sr.cr0 = 0x8000_0011;
    g.vcpu.set_sregs(&sr).unwrap();
    let mut r = g.vcpu.regs().unwrap();
    r.rip = CODE;
    r.rflags = 2;
    g.vcpu.set_regs(&r).unwrap();

    g.vm.start_dirty_log().unwrap();
    run_to_out(&mut g);
    // The three table pages (accessed bits; the PD's dirty bit) and the stored-to page.
    assert_eq!(
        dirty_pages(&g.vm.take_dirty_log().unwrap()),
        vec![(0, 0x70), (0, 0x71), (0, 0x72), (0, 0x600)]
    );
    let pde = u64::from_le_bytes(g.ram().read(PML4 + 0x2000 + 8 * 3, 8).try_into().unwrap());
    assert_eq!(pde & 0x60, 0x60, "the walker set A and D");
}

#[test]
fn taking_a_dirty_log_before_starting_one_fails() {
    let hv = EmuHypervisor::new();
    let g = Guest::new(&hv);
    let e = g.vm.take_dirty_log().unwrap_err();
    assert!(e.to_string().contains("dirty-page log"), "{e}");
}
