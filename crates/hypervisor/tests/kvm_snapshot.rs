//! Snapshot support of the `kvm` back end on /dev/kvm: vCPU and VM state saved from one VM and
//! restored into another, damaged states refused, dirty page logging, the guest clock moved on
//! restore. Each test prints a `SKIPPED:` line and returns when /dev/kvm is missing or lacks an
//! ioctl it needs.

use hypervisor::kvm::state::{KvmVcpuState, KvmVmState};
use hypervisor::kvm::KvmHypervisor;
use hypervisor::{
    kick_current_thread, BackendKind, Hypervisor, HypervisorError, MemoryRegion, SavedState, Vcpu,
    VcpuExit, Vm,
};
use vm_memory::GuestAddress;

const PAGE: usize = 4096;

fn kvm(test: &str) -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIPPED: {test}: /dev/kvm is not usable: {e}");
            None
        }
    }
}

/// Whether `e` says KVM does not have the ioctl (as opposed to refusing its argument).
fn is_unsupported(e: &HypervisorError) -> bool {
    let io = match e {
        HypervisorError::SaveState(_, io)
        | HypervisorError::RestoreState(_, io)
        | HypervisorError::VcpuState(_, io)
        | HypervisorError::VmSetup(_, io) => io,
        HypervisorError::Unsupported(_) => return true,
        _ => return false,
    };
    matches!(
        io.raw_os_error(),
        Some(libc::ENOTTY | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// `r`'s value; `None` after printing a SKIPPED line if this host's KVM lacks the ioctl.
fn or_skip<T>(test: &str, what: &str, r: hypervisor::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if is_unsupported(&e) => {
            eprintln!("SKIPPED: {test}: this KVM cannot {what}: {e} ({e:?})");
            None
        }
        Err(e) => panic!("{what}: {e} ({e:?})"),
    }
}

/// Anonymous host memory for a guest; unmapped on drop (declare it before the VM, so the VM
/// is dropped first).
struct GuestRam {
    host: *mut u8,
    len: usize,
}

impl GuestRam {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping; the result is checked below.
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
        assert_ne!(host, libc::MAP_FAILED, "mmap guest RAM");
        GuestRam {
            host: host.cast(),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as `self`; the guest may write
        // it concurrently only while a vCPU runs, and tests read it between runs.
        unsafe { std::slice::from_raw_parts(self.host, self.len) }
    }

    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: in bounds of the mapping (checked above); no vCPU runs during the write.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.host.add(offset), data.len()) }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        let b = &self.bytes()[offset..offset + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn region(&self, slot: u32, guest_addr: u64) -> MemoryRegion {
        MemoryRegion {
            slot,
            guest_addr: GuestAddress(guest_addr),
            len_bytes: self.len as u64,
            host_addr: self.host as u64,
        }
    }

    fn map(&self, vm: &dyn Vm, slot: u32, guest_addr: u64) {
        // SAFETY: the mapping outlives the VM (see the type's doc).
        unsafe { vm.map_memory(self.region(slot, guest_addr)) }.expect("map guest memory");
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped; the VM using it is gone.
        unsafe { libc::munmap(self.host.cast(), self.len) };
    }
}

/// A vCPU set up like a VMM boots one (CPUID, LAPIC LINTs), in real mode at `rip` with flat
/// CS/DS/SS, ES based at `es_base`, and SSE enabled (CR4.OSFXSR).
fn real_mode_vcpu(hv: &KvmHypervisor, vm: &dyn Vm, rip: u64, es_base: u64) -> Box<dyn Vcpu> {
    let mut vcpu = vm.create_vcpu(0).expect("create a vCPU");
    vcpu.set_cpuid(&hv.supported_cpuid().expect("supported CPUID"))
        .expect("set CPUID");
    vcpu.setup_lapic_lints().expect("LAPIC LINTs");
    let mut sregs = vcpu.sregs().unwrap();
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    sregs.es.base = es_base;
    sregs.es.selector = (es_base >> 4) as u16;
    sregs.cr4 |= 1 << 9;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.regs().unwrap();
    regs.rip = rip;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    vcpu
}

/// Runs `vcpu` to its next port write; returns the port and the value written.
fn next_out(vcpu: &mut dyn Vcpu) -> (u16, u32) {
    match vcpu.run().expect("run the vCPU") {
        VcpuExit::IoOut { port, data } => {
            let mut v = [0u8; 4];
            v[..data.len()].copy_from_slice(data);
            (port, u32::from_le_bytes(v))
        }
        other => panic!("expected a port write, got {other:?}"),
    }
}

/// Real mode, at 0x1000: counts 1, 2, 3, ... in EBX; each step stores XMM0 (the previous
/// count) at 0x2010, the new count at 0x2000, loads it into XMM0 and writes it to port 0x80.
/// XMM0 carries state across the snapshot that only the XSAVE area holds. (SSE moves rather
/// than x87 arithmetic: on a software KVM such as PVM real mode runs in KVM's instruction
/// emulator, which moves SSE registers but has no x87 arithmetic.)
const COUNTER: [u8; 30] = [
    0x66, 0x31, 0xdb, // xor ebx, ebx
    0xf3, 0x0f, 0x7f, 0x06, 0x10, 0x20, // loop: movdqu [0x2010], xmm0
    0x66, 0x43, // inc ebx
    0x66, 0x89, 0x1e, 0x00, 0x20, // mov [0x2000], ebx
    0xf3, 0x0f, 0x6f, 0x06, 0x00, 0x20, // movdqu xmm0, [0x2000]
    0x66, 0x89, 0xd8, // mov eax, ebx
    0x66, 0xe7, 0x80, // out 0x80, eax
    0xeb, 0xe5, // jmp loop
];

/// Checks that the counter guest's next `n` writes are `first`, `first + 1`, ... with the
/// copies in memory agreeing.
fn expect_counts(vcpu: &mut dyn Vcpu, ram: &GuestRam, first: u32, n: u32) {
    for want in first..first + n {
        let (port, got) = next_out(vcpu);
        assert_eq!((port, got), (0x80, want), "count out of sequence");
        assert_eq!(ram.read_u32(0x2000), want, "EBX copy in memory");
        assert_eq!(
            ram.read_u32(0x2010),
            want - 1,
            "XMM0 copy of the previous count"
        );
    }
}

/// Saves and restores through the JSON text a snapshot file would hold.
fn through_json(state: &SavedState) -> SavedState {
    let text = serde_json::to_string(state).expect("state to JSON");
    serde_json::from_str(&text).expect("state from JSON")
}

#[test]
fn a_counting_guest_resumes_in_another_vm_with_the_next_number() {
    const TEST: &str = "kvm_snapshot counting guest";
    let Some(hv) = kvm(TEST) else { return };
    let ram1 = GuestRam::new(16 * PAGE);
    ram1.write(0x1000, &COUNTER);
    let vm1 = hv.create_vm().expect("create a VM");
    ram1.map(vm1.as_ref(), 0, 0);
    let mut vcpu1 = real_mode_vcpu(&hv, vm1.as_ref(), 0x1000, 0);
    expect_counts(vcpu1.as_mut(), &ram1, 1, 1000);

    // What the VMM does before a snapshot: complete the exit, return without running on.
    kick_current_thread();
    match vcpu1.run().expect("run after the kick") {
        VcpuExit::Interrupted => {}
        other => panic!("expected Interrupted after the kick, got {other:?}"),
    }
    let Some(vcpu_state) = or_skip(TEST, "save vCPU state", vcpu1.save_state()) else {
        return;
    };
    let Some(vm_state) = or_skip(TEST, "save VM state", vm1.save_state()) else {
        return;
    };
    let (vcpu_state, vm_state) = (through_json(&vcpu_state), through_json(&vm_state));
    let decoded: KvmVcpuState = vcpu_state.decode(BackendKind::Kvm, "vCPU").unwrap();
    assert_eq!(decoded.regs.rbx, 1000);
    assert!(!decoded.msrs.is_empty(), "no MSR could be read");
    assert!(
        !decoded.cpuid.is_empty(),
        "the CPUID set at boot was not saved"
    );
    eprintln!(
        "saved {} MSRs, {} CPUID entries, FPU as {}, TSC {:?} kHz",
        decoded.msrs.len(),
        decoded.cpuid.len(),
        match decoded.fpu {
            hypervisor::kvm::state::FpuSave::Xsave(ref a) => format!("XSAVE ({} bytes)", a.len()),
            hypervisor::kvm::state::FpuSave::Fpu(_) => "FPU".to_string(),
        },
        decoded.tsc_khz
    );

    // A second VM built the same way: memory copied, vCPU created, state put back.
    let ram2 = GuestRam::new(16 * PAGE);
    ram2.write(0, ram1.bytes());
    let vm2 = hv.create_vm().expect("create a second VM");
    ram2.map(vm2.as_ref(), 0, 0);
    let mut vcpu2 = vm2.create_vcpu(0).expect("create a vCPU");
    let Some(()) = or_skip(TEST, "restore VM state", vm2.restore_state(&vm_state, 0)) else {
        return;
    };
    let Some(()) = or_skip(TEST, "restore vCPU state", vcpu2.restore_state(&vcpu_state)) else {
        return;
    };
    expect_counts(vcpu2.as_mut(), &ram2, 1001, 1000);

    // The restored vCPU saves the same kind of state again.
    let again: KvmVcpuState = vcpu2
        .save_state()
        .unwrap()
        .decode(BackendKind::Kvm, "vCPU")
        .unwrap();
    assert_eq!(again.regs.rbx, 2000);
    assert_eq!(again.cpuid, decoded.cpuid, "CPUID changed across restore");
    assert_eq!(
        again.sregs, decoded.sregs,
        "special registers changed across restore"
    );
    assert_eq!(
        again.lapic, decoded.lapic,
        "local APIC changed across restore"
    );
    // Every MSR came back, with its value (but the TSC, which ran on).
    const IA32_TSC: u32 = 0x10;
    let without_tsc = |s: &KvmVcpuState| -> Vec<_> {
        s.msrs
            .iter()
            .filter(|m| m.index != IA32_TSC)
            .cloned()
            .collect()
    };
    assert_eq!(without_tsc(&again), without_tsc(&decoded));

    // The first VM is unaffected and goes on from where it stopped as well.
    expect_counts(vcpu1.as_mut(), &ram1, 1001, 10);
}

#[test]
fn a_state_from_the_other_back_end_or_a_damaged_state_is_refused() {
    const TEST: &str = "kvm_snapshot damaged state";
    let Some(hv) = kvm(TEST) else { return };
    let vm = hv.create_vm().expect("create a VM");
    let mut source = vm.create_vcpu(0).expect("create a vCPU");
    source
        .set_cpuid(&hv.supported_cpuid().unwrap())
        .expect("set CPUID");
    let Some(vcpu_state) = or_skip(TEST, "save vCPU state", source.save_state()) else {
        return;
    };
    let Some(vm_state) = or_skip(TEST, "save VM state", vm.save_state()) else {
        return;
    };
    drop(source);

    let target = hv.create_vm().expect("create a second VM");
    let mut vcpu = target.create_vcpu(0).expect("create a vCPU");
    let err_of = |r: hypervisor::Result<()>| r.expect_err("a bad state was accepted");

    // Another back end's state.
    let emu = |s: &SavedState| SavedState {
        backend: BackendKind::Emu,
        state: s.state.clone(),
    };
    let e = err_of(vcpu.restore_state(&emu(&vcpu_state)));
    assert!(
        matches!(
            e,
            HypervisorError::StateBackend {
                expected: BackendKind::Kvm,
                found: BackendKind::Emu
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("Emu"), "{e}");
    let e = err_of(target.restore_state(&emu(&vm_state), 0));
    assert!(matches!(e, HypervisorError::StateBackend { .. }), "{e:?}");

    // Damaged states: each edit must give BadState naming the problem.
    let damaged = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut s = vcpu_state.clone();
        edit(&mut s.state);
        s
    };
    let cases: Vec<(&str, SavedState, &str)> = vec![
        (
            "not an object",
            SavedState {
                backend: BackendKind::Kvm,
                state: serde_json::json!("garbage"),
            },
            "invalid type",
        ),
        (
            "field missing",
            damaged(&|v| {
                v.as_object_mut().unwrap().remove("msrs");
            }),
            "missing field `msrs`",
        ),
        (
            "unknown field",
            damaged(&|v| {
                v["regs"]["rzz"] = 1.into();
            }),
            "unknown field `rzz`",
        ),
        (
            "wrong type",
            damaged(&|v| v["regs"]["rip"] = "0x1000".into()),
            "invalid type",
        ),
        (
            "truncated local APIC page",
            damaged(&|v| {
                let hex = v["lapic"].as_str().unwrap()[..512].to_string();
                v["lapic"] = hex.into();
            }),
            "local APIC page is 256 bytes",
        ),
        (
            "bad hex",
            damaged(&|v| {
                let mut hex = v["lapic"].as_str().unwrap().to_string();
                hex.replace_range(0..2, "zz");
                v["lapic"] = hex.into();
            }),
            "not a hex digit",
        ),
    ];
    let mut cases = cases;
    if vcpu_state.state["fpu"]["xsave"].is_string() {
        cases.push((
            "truncated XSAVE area",
            damaged(&|v| {
                let hex = v["fpu"]["xsave"].as_str().unwrap()[..1000].to_string();
                v["fpu"]["xsave"] = hex.into();
            }),
            "XSAVE area is 500 bytes",
        ));
    }
    for (name, state, why) in &cases {
        let e = err_of(vcpu.restore_state(state));
        assert!(
            matches!(e, HypervisorError::BadState { what: "vCPU", .. }),
            "{name}: {e:?}"
        );
        assert!(e.to_string().contains(why), "{name}: {e}");
    }
    let mut clock_missing = vm_state.clone();
    clock_missing.state.as_object_mut().unwrap().remove("clock");
    let e = err_of(target.restore_state(&clock_missing, 0));
    assert!(e.to_string().contains("missing field `clock`"), "{e}");

    // Truncated JSON text never becomes a state at all.
    let text = serde_json::to_string(&vcpu_state).unwrap();
    assert!(serde_json::from_str::<SavedState>(&text[..text.len() / 2]).is_err());

    // An MSR this KVM does not have: restore names it.
    let bogus = damaged(&|v| {
        v["msrs"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"index": 0x4000_00ff_u32, "data": 0}));
    });
    let e = err_of(vcpu.restore_state(&bogus));
    match e {
        HypervisorError::SetMsrs {
            set,
            total,
            rejected,
        } => {
            assert_eq!(rejected, 0x4000_00ff);
            assert_eq!(set + 1, total);
        }
        other => panic!("expected SetMsrs, got {other:?}"),
    }

    // The intact state still restores.
    vcpu.restore_state(&vcpu_state)
        .expect("restore the intact vCPU state");
    target
        .restore_state(&vm_state, 0)
        .expect("restore the intact VM state");
}

/// Real mode, at 0x1000: writes a byte to 0x3000, 0x9000 and ES:0x2000, writes port 0x80,
/// writes a byte to 0x5000, writes port 0x81, then spins.
const WRITER: [u8; 27] = [
    0xc6, 0x06, 0x00, 0x30, 0x11, // mov byte [0x3000], 0x11
    0xc6, 0x06, 0x00, 0x90, 0x22, // mov byte [0x9000], 0x22
    0x26, 0xc6, 0x06, 0x00, 0x20, 0x33, // mov byte es:[0x2000], 0x33
    0xe6, 0x80, // out 0x80, al
    0xc6, 0x06, 0x00, 0x50, 0x44, // mov byte [0x5000], 0x44
    0xe6, 0x81, // out 0x81, al
    0xeb, 0xfe, // jmp $
];

fn dirty_pages(bitmap: &[u64]) -> Vec<usize> {
    (0..bitmap.len() * 64)
        .filter(|&i| bitmap[i / 64] & (1 << (i % 64)) != 0)
        .collect()
}

#[test]
fn the_dirty_log_reports_the_pages_the_guest_wrote() {
    const TEST: &str = "kvm_snapshot dirty log";
    let Some(hv) = kvm(TEST) else { return };
    let low = GuestRam::new(16 * PAGE);
    let high = GuestRam::new(16 * PAGE);
    low.write(0x1000, &WRITER);
    let vm = hv.create_vm().expect("create a VM");
    // Slot order, not mapping order, decides the bitmap order.
    high.map(vm.as_ref(), 1, 0x10000);
    low.map(vm.as_ref(), 0, 0);
    let mut vcpu = real_mode_vcpu(&hv, vm.as_ref(), 0x1000, 0x10000);

    assert!(vm.take_dirty_log().is_err(), "a log before start_dirty_log");
    let Some(()) = or_skip(TEST, "log dirty pages", vm.start_dirty_log()) else {
        return;
    };
    assert_eq!(next_out(vcpu.as_mut()).0, 0x80);
    let Some(log) = or_skip(TEST, "read the dirty log", vm.take_dirty_log()) else {
        return;
    };
    assert_eq!(log.len(), 2, "one bitmap per region");
    assert_eq!(log[0].len(), 1, "16 pages fit one word");
    let (low_dirty, high_dirty) = (dirty_pages(&log[0]), dirty_pages(&log[1]));
    eprintln!("dirty after the first writes: low {low_dirty:?}, high {high_dirty:?}");
    for page in [3, 9] {
        assert!(low_dirty.contains(&page), "low page {page} not reported");
    }
    assert!(high_dirty.contains(&2), "high page 2 not reported");
    // Only the code page (read, maybe marked by the CPU's accessed-bit updates) may come extra.
    assert!(
        low_dirty.iter().all(|p| [1, 3, 9].contains(p)),
        "untouched low pages reported: {low_dirty:?}"
    );
    assert_eq!(high_dirty, vec![2], "untouched high pages reported");

    let log = vm.take_dirty_log().expect("second dirty log");
    assert!(
        log.iter().all(|b| b.iter().all(|&w| w == 0)),
        "pages reported with no guest writes: {log:?}"
    );

    assert_eq!(next_out(vcpu.as_mut()).0, 0x81);
    let log = vm.take_dirty_log().expect("third dirty log");
    let low_dirty = dirty_pages(&log[0]);
    assert!(low_dirty.contains(&5), "page 5 not reported: {low_dirty:?}");
    assert!(
        low_dirty.iter().all(|p| [1, 5].contains(p)),
        "stale or untouched pages reported: {low_dirty:?}"
    );
    assert!(dirty_pages(&log[1]).is_empty(), "{log:?}");

    vm.stop_dirty_log().expect("stop the dirty log");
    assert!(vm.take_dirty_log().is_err(), "a log after stop_dirty_log");
    assert_eq!(low.bytes()[0x3000], 0x11);
    assert_eq!(high.bytes()[0x2000], 0x33);
}

#[test]
fn a_vm_created_with_its_memory_logs_writes_from_the_start_if_asked() {
    const TEST: &str = "kvm_snapshot create with memory";
    let Some(hv) = kvm(TEST) else { return };
    let low = GuestRam::new(16 * PAGE);
    let high = GuestRam::new(16 * PAGE);
    low.write(0x1000, &WRITER);
    let regions = [low.region(0, 0), high.region(1, 0x10000)];

    // SAFETY: both mappings outlive the VMs (see GuestRam's doc).
    let unlogged = unsafe { hv.create_vm_with_memory(&regions, false) }.expect("create a VM");
    let mut vcpu = real_mode_vcpu(&hv, unlogged.as_ref(), 0x1000, 0x10000);
    assert_eq!(
        next_out(vcpu.as_mut()).0,
        0x80,
        "the guest runs in the mapped memory"
    );
    assert!(unlogged.take_dirty_log().is_err(), "a log nobody started");
    drop(vcpu);
    drop(unlogged);

    // SAFETY: as above.
    let Some(vm) = or_skip(TEST, "log dirty pages", unsafe {
        hv.create_vm_with_memory(&regions, true)
    }) else {
        return;
    };
    let mut vcpu = real_mode_vcpu(&hv, vm.as_ref(), 0x1000, 0x10000);
    assert_eq!(next_out(vcpu.as_mut()).0, 0x80);
    let log = vm.take_dirty_log().expect("the log started with the VM");
    assert_eq!(log.len(), 2, "one bitmap per region");
    let (low_dirty, high_dirty) = (dirty_pages(&log[0]), dirty_pages(&log[1]));
    for page in [3, 9] {
        assert!(
            low_dirty.contains(&page),
            "low page {page} not reported: {low_dirty:?}"
        );
    }
    assert_eq!(high_dirty, vec![2], "high pages reported");
}

#[test]
fn restoring_with_advance_clock_ns_moves_the_guest_clock_forward() {
    const TEST: &str = "kvm_snapshot clock";
    let Some(hv) = kvm(TEST) else { return };
    let clock_of = |vm: &dyn Vm| -> Option<u64> {
        let s = or_skip(TEST, "save VM state", vm.save_state())?;
        let state: KvmVmState = s.decode(BackendKind::Kvm, "VM").unwrap();
        Some(state.clock.clock_ns)
    };
    const SECOND: u64 = 1_000_000_000;
    let vm1 = hv.create_vm().expect("create a VM");
    // Move the first VM's clock far from any fresh VM's (which starts near 0).
    let Some(fresh) = clock_of(vm1.as_ref()) else {
        return;
    };
    let state = vm1.save_state().unwrap();
    let Some(()) = or_skip(
        TEST,
        "set the clock",
        vm1.restore_state(&state, 100 * SECOND),
    ) else {
        return;
    };
    let c0 = clock_of(vm1.as_ref()).unwrap();
    assert!(
        (fresh + 100 * SECOND..fresh + 101 * SECOND).contains(&c0),
        "clock {fresh} + 100 s gave {c0}"
    );
    let saved = vm1.save_state().unwrap();

    for advance in [0, 5 * SECOND] {
        let vm2 = hv.create_vm().expect("create a second VM");
        vm2.restore_state(&saved, advance)
            .expect("restore VM state");
        let c1 = clock_of(vm2.as_ref()).unwrap();
        assert!(
            (c0 + advance..c0 + advance + SECOND / 2).contains(&c1),
            "saved clock {c0} ns restored with +{advance} ns reads {c1} ns"
        );
    }
}
