//! Saving and restoring vCPU and VM state through KVM's `KVM_GET_*`/`KVM_SET_*` ioctls.
//!
//! The order of the ioctls follows what they do inside KVM:
//! - Save reads the MP state first: `KVM_GET_MP_STATE` processes pending INIT/SIPI events,
//!   which can change the registers and the local APIC read after it.
//! - Restore sets the TSC frequency and CPUID first (MSR, XSAVE and special-register checks
//!   depend on the guest's CPUID), registers before special registers, special registers
//!   (`apic_base`) before the local APIC, the local APIC before the MSRs (the TSC deadline MSR
//!   is only taken while the APIC timer is in deadline mode), and the events last
//!   (`KVM_SET_REGS` and `KVM_SET_SREGS` drop pending exceptions and interrupts, which the
//!   events put back).

use std::io;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_lapic_state, kvm_msr_entry, kvm_pit_state2, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::state::{
    ClockState, CpuidState, DebugRegsState, EventsState, FpuSave, FpuState, IoapicState,
    KvmVcpuState, KvmVmState, MsrState, PicState, PitChannelState, PitState, RegsState, SregsState,
    XcrState,
};
use super::{os_error, KvmVcpu};
use crate::{BackendKind, HypervisorError, Result, SavedState};

/// What the saved-state envelopes are called in errors.
const VCPU: &str = "vCPU";
const VM: &str = "VM";

/// Size of the local APIC register page in `kvm_lapic_state`.
const LAPIC_BYTES: usize = 1024;
/// Size of the legacy `kvm_xsave` area (`KVM_GET_XSAVE`).
const XSAVE_LEGACY_BYTES: usize = std::mem::size_of::<kvm_xsave>();

fn save_err(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> HypervisorError {
    move |e| HypervisorError::SaveState(what, os_error(e))
}

fn restore_err(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> HypervisorError {
    move |e| HypervisorError::RestoreState(what, os_error(e))
}

fn bad_state(what: &'static str, why: String) -> HypervisorError {
    HypervisorError::BadState { what, why }
}

/// The MSRs a vCPU snapshot tries to read: KVM's MSR index list, then the feature MSRs not
/// already in it, without duplicates.
pub(super) fn saved_msr_list(kvm: &Kvm) -> io::Result<Arc<[u32]>> {
    let mut list: Vec<u32> = kvm
        .get_msr_index_list()
        .map_err(os_error)?
        .as_slice()
        .to_vec();
    if kvm.check_extension(Cap::GetMsrFeatures) {
        let features = kvm.get_msr_feature_index_list().map_err(os_error)?;
        for &index in features.as_slice() {
            if !list.contains(&index) {
                list.push(index);
            }
        }
    }
    Ok(list.into())
}

/// Reads the MSRs of `list` that KVM lets user space read; skips the others.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<MsrState>> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| HypervisorError::SaveState("MSR", io::Error::other("too many MSRs")))?;
        // KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read.
        let read = fd.get_msrs(&mut msrs).map_err(save_err("MSR"))?;
        saved.extend(msrs.as_slice()[..read].iter().map(MsrState::from));
        // Skip the unreadable one, if any, and go on after it.
        let next = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[next..];
    }
    Ok(saved)
}

/// Sets `entries`, failing if KVM takes fewer than all of them.
pub(super) fn set_msr_entries(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    for (n, chunk) in entries.chunks(KVM_MAX_MSR_ENTRIES).enumerate() {
        let msrs = Msrs::from_entries(chunk).map_err(|_| {
            HypervisorError::VcpuState("set MSRs", io::Error::from_raw_os_error(libc::E2BIG))
        })?;
        let set = fd
            .set_msrs(&msrs)
            .map_err(|e| HypervisorError::VcpuState("set MSRs", os_error(e)))?;
        if set != chunk.len() {
            return Err(HypervisorError::SetMsrs {
                set: n * KVM_MAX_MSR_ENTRIES + set,
                total: entries.len(),
                rejected: chunk[set].index,
            });
        }
    }
    Ok(())
}

/// The XSAVE area size KVM uses for this process's vCPUs (`KVM_CAP_XSAVE2`; larger than the
/// legacy 4 KiB only with dynamically enabled features such as AMX).
fn xsave_bytes(vm: &VmFd) -> usize {
    usize::try_from(vm.check_extension_int(Cap::Xsave2))
        .unwrap_or(0)
        .max(XSAVE_LEGACY_BYTES)
}

/// An `Xsave` buffer of `bytes` (a multiple of 4, at least the legacy size).
fn xsave_buffer(bytes: usize) -> io::Result<Xsave> {
    Xsave::new((bytes - XSAVE_LEGACY_BYTES).div_ceil(4))
        .map_err(|_| io::Error::other("XSAVE area too large"))
}

fn save_fpu(v: &KvmVcpu) -> Result<FpuSave> {
    if !v.vm.check_extension(Cap::Xsave) {
        let fpu = v.fd.get_fpu().map_err(save_err("FPU"))?;
        return Ok(FpuSave::Fpu(Box::new(FpuState::from(&fpu))));
    }
    let bytes = xsave_bytes(&v.vm);
    let words: Vec<u32> = if bytes == XSAVE_LEGACY_BYTES {
        v.fd.get_xsave().map_err(save_err("XSAVE"))?.region.to_vec()
    } else {
        let mut xsave = xsave_buffer(bytes).map_err(|e| HypervisorError::SaveState("XSAVE", e))?;
        // SAFETY: `xsave` holds the KVM_CAP_XSAVE2 size just queried, the most KVM writes.
        unsafe { v.fd.get_xsave2(&mut xsave) }.map_err(save_err("XSAVE"))?;
        let fam = xsave.as_fam_struct_ref();
        let mut words = fam.xsave.region.to_vec();
        words.extend_from_slice(xsave.as_slice());
        words
    };
    Ok(FpuSave::Xsave(
        words.iter().flat_map(|w| w.to_le_bytes()).collect(),
    ))
}

/// Checks that this host can take the saved FPU state; returns its XSAVE area size.
fn check_fpu(v: &KvmVcpu, fpu: &FpuSave) -> Result<usize> {
    let FpuSave::Xsave(area) = fpu else {
        return Ok(0);
    };
    if !v.vm.check_extension(Cap::Xsave) {
        return Err(HypervisorError::RestoreState(
            "XSAVE",
            io::Error::other("KVM lacks KVM_CAP_XSAVE"),
        ));
    }
    let host_bytes = xsave_bytes(&v.vm);
    if area.len() < XSAVE_LEGACY_BYTES || area.len() % 4 != 0 || area.len() > host_bytes {
        return Err(bad_state(
            VCPU,
            format!(
                "the XSAVE area is {} bytes; this host takes a multiple of 4 from {} to {}",
                area.len(),
                XSAVE_LEGACY_BYTES,
                host_bytes
            ),
        ));
    }
    Ok(host_bytes)
}

fn restore_fpu(v: &KvmVcpu, fpu: &FpuSave) -> Result<()> {
    let area = match fpu {
        FpuSave::Fpu(f) => return v.fd.set_fpu(&f.as_ref().into()).map_err(restore_err("FPU")),
        FpuSave::Xsave(area) => area,
    };
    let host_bytes = check_fpu(v, fpu)?;
    let mut words = area
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if host_bytes == XSAVE_LEGACY_BYTES {
        let mut xsave = kvm_xsave::default();
        xsave.region.iter_mut().zip(words).for_each(|(r, w)| *r = w);
        // SAFETY: without dynamically enabled XSAVE features (KVM_CAP_XSAVE2 reports the legacy
        // size), KVM reads exactly the legacy `kvm_xsave` passed here.
        return unsafe { v.fd.set_xsave(&xsave) }.map_err(restore_err("XSAVE"));
    }
    let mut xsave =
        xsave_buffer(host_bytes).map_err(|e| HypervisorError::RestoreState("XSAVE", e))?;
    // SAFETY: only the fixed `region` array is written; the length the wrapper relies on is
    // left alone.
    let fam = unsafe { xsave.as_mut_fam_struct() };
    fam.xsave
        .region
        .iter_mut()
        .zip(words.by_ref())
        .for_each(|(r, w)| *r = w);
    xsave
        .as_mut_slice()
        .iter_mut()
        .zip(words)
        .for_each(|(r, w)| *r = w);
    // SAFETY: `xsave` holds the KVM_CAP_XSAVE2 size just queried, the most KVM reads.
    unsafe { v.fd.set_xsave2(&xsave) }.map_err(restore_err("XSAVE"))
}

pub(super) fn save_vcpu(v: &KvmVcpu) -> Result<SavedState> {
    let fd = &v.fd;
    let mp_state = fd.get_mp_state().map_err(save_err("MP"))?.mp_state;
    let regs = RegsState::from(&fd.get_regs().map_err(save_err("register"))?);
    let sregs = SregsState::from(&fd.get_sregs().map_err(save_err("special register"))?);
    let fpu = save_fpu(v)?;
    let xcrs = if v.vm.check_extension(Cap::Xcrs) {
        let x = fd.get_xcrs().map_err(save_err("XCR"))?;
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        Some(x.xcrs[..n].iter().map(XcrState::from).collect())
    } else {
        None
    };
    let debug_regs = if v.vm.check_extension(Cap::Debugregs) {
        Some(DebugRegsState::from(
            &fd.get_debug_regs().map_err(save_err("debug register"))?,
        ))
    } else {
        None
    };
    let lapic = fd
        .get_lapic()
        .map_err(save_err("local APIC"))?
        .regs
        .iter()
        .map(|&b| b as u8)
        .collect();
    let msrs = read_msrs(fd, &v.msr_list)?;
    let events = if v.vm.check_extension(Cap::VcpuEvents) {
        Some(EventsState::from(
            &fd.get_vcpu_events().map_err(save_err("vCPU event"))?,
        ))
    } else {
        None
    };
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(save_err("CPUID"))?
        .as_slice()
        .iter()
        .map(CpuidState::from)
        .collect();
    let tsc_khz = if v.vm.check_extension(Cap::GetTscKhz) {
        Some(fd.get_tsc_khz().map_err(save_err("TSC frequency"))?)
    } else {
        None
    };
    let state = KvmVcpuState {
        mp_state,
        regs,
        sregs,
        fpu,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
        cpuid,
        tsc_khz,
    };
    SavedState::new(BackendKind::Kvm, VCPU, &state)
}

/// Puts back the TSC frequency where KVM can scale the TSC; ignores it where it cannot (the
/// guest then runs at this host's frequency).
fn restore_tsc_khz(v: &KvmVcpu, khz: u32) -> Result<()> {
    if v.vm.check_extension(Cap::GetTscKhz) && v.fd.get_tsc_khz().ok() == Some(khz) {
        return Ok(());
    }
    match v.fd.set_tsc_khz(khz) {
        Ok(()) => Ok(()),
        Err(_) if !v.vm.check_extension(Cap::TscControl) => Ok(()),
        Err(e) => Err(HypervisorError::RestoreState("TSC frequency", os_error(e))),
    }
}

pub(super) fn restore_vcpu(v: &mut KvmVcpu, state: &SavedState) -> Result<()> {
    let s: KvmVcpuState = state.decode(BackendKind::Kvm, VCPU)?;
    // Check what can be checked before changing anything.
    check_fpu(v, &s.fpu)?;
    if s.lapic.len() != LAPIC_BYTES {
        return Err(bad_state(
            VCPU,
            format!(
                "the local APIC page is {} bytes, not {LAPIC_BYTES}",
                s.lapic.len()
            ),
        ));
    }
    let xcrs = match &s.xcrs {
        Some(saved) => {
            let mut x = kvm_xcrs::default();
            if saved.len() > x.xcrs.len() {
                return Err(bad_state(
                    VCPU,
                    format!("{} XCRs (at most 16)", saved.len()),
                ));
            }
            x.nr_xcrs = saved.len() as u32;
            for (k, s) in x.xcrs.iter_mut().zip(saved) {
                *k = s.into();
            }
            Some(x)
        }
        None => None,
    };
    let cpuid_entries: Vec<_> = s.cpuid.iter().map(Into::into).collect();
    let cpuid = CpuId::from_entries(&cpuid_entries)
        .map_err(|_| bad_state(VCPU, format!("{} CPUID entries", s.cpuid.len())))?;
    let mut lapic = kvm_lapic_state::default();
    for (k, &b) in lapic.regs.iter_mut().zip(&s.lapic) {
        *k = b as _;
    }
    let msrs: Vec<kvm_msr_entry> = s.msrs.iter().map(Into::into).collect();

    let fd = &v.fd;
    if let Some(khz) = s.tsc_khz {
        restore_tsc_khz(v, khz)?;
    }
    if !s.cpuid.is_empty() {
        fd.set_cpuid2(&cpuid).map_err(restore_err("CPUID"))?;
    }
    fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: s.mp_state,
    })
    .map_err(restore_err("MP"))?;
    fd.set_regs(&(&s.regs).into())
        .map_err(restore_err("register"))?;
    fd.set_sregs(&(&s.sregs).into())
        .map_err(restore_err("special register"))?;
    restore_fpu(v, &s.fpu)?;
    if let Some(x) = &xcrs {
        fd.set_xcrs(x).map_err(restore_err("XCR"))?;
    }
    if let Some(d) = &s.debug_regs {
        fd.set_debug_regs(&d.into())
            .map_err(restore_err("debug register"))?;
    }
    fd.set_lapic(&lapic).map_err(restore_err("local APIC"))?;
    set_msr_entries(fd, &msrs)?;
    if let Some(e) = &s.events {
        fd.set_vcpu_events(&e.into())
            .map_err(restore_err("vCPU event"))?;
    }
    Ok(())
}

fn get_irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(save_err("interrupt controller"))?;
    Ok(chip)
}

pub(super) fn save_vm(fd: &VmFd) -> Result<SavedState> {
    let master = get_irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?;
    let slave = get_irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?;
    let ioapic = get_irqchip(fd, KVM_IRQCHIP_IOAPIC)?;
    // SAFETY: KVM_GET_IRQCHIP filled the union member matching each `chip_id`; every bit
    // pattern is a valid value of these plain-integer structures.
    let (master, slave, ioapic) = unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
    let mut redirtbl = [0u64; 24];
    for (r, e) in redirtbl.iter_mut().zip(ioapic.redirtbl.iter()) {
        // SAFETY: both members of the redirection entry union cover the same 8 bytes; `bits`
        // reads them as one integer.
        *r = unsafe { e.bits };
    }
    let pit = fd.get_pit2().map_err(save_err("PIT"))?;
    let clock = fd.get_clock().map_err(save_err("clock"))?;
    let state = KvmVmState {
        pic_master: PicState::from(&master),
        pic_slave: PicState::from(&slave),
        ioapic: IoapicState {
            base_address: ioapic.base_address,
            ioregsel: ioapic.ioregsel,
            id: ioapic.id,
            irr: ioapic.irr,
            redirtbl,
        },
        pit: PitState {
            channels: pit.channels.each_ref().map(PitChannelState::from),
            flags: pit.flags,
        },
        clock: ClockState::from(&clock),
    };
    SavedState::new(BackendKind::Kvm, VM, &state)
}

pub(super) fn restore_vm(fd: &VmFd, state: &SavedState, advance_clock_ns: u64) -> Result<()> {
    let s: KvmVmState = state.decode(BackendKind::Kvm, VM)?;
    let clock_ns = s
        .clock
        .clock_ns
        .checked_add(advance_clock_ns)
        .ok_or_else(|| {
            bad_state(
                VM,
                format!(
                    "clock {} ns + {advance_clock_ns} ns overflows",
                    s.clock.clock_ns
                ),
            )
        })?;

    for (chip_id, pic) in [
        (KVM_IRQCHIP_PIC_MASTER, &s.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, &s.pic_slave),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        chip.chip.pic = pic.into();
        fd.set_irqchip(&chip)
            .map_err(restore_err("interrupt controller"))?;
    }
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    // SAFETY: writing the `ioapic` member of a zeroed union of plain-integer structures.
    let ioapic = unsafe { &mut chip.chip.ioapic };
    ioapic.base_address = s.ioapic.base_address;
    ioapic.ioregsel = s.ioapic.ioregsel;
    ioapic.id = s.ioapic.id;
    ioapic.irr = s.ioapic.irr;
    for (e, &bits) in ioapic.redirtbl.iter_mut().zip(&s.ioapic.redirtbl) {
        e.bits = bits;
    }
    fd.set_irqchip(&chip)
        .map_err(restore_err("interrupt controller"))?;

    let mut pit = kvm_pit_state2 {
        flags: s.pit.flags,
        ..Default::default()
    };
    for (k, c) in pit.channels.iter_mut().zip(&s.pit.channels) {
        *k = c.into();
    }
    fd.set_pit2(&pit).map_err(restore_err("PIT"))?;

    let clock = kvm_clock_data {
        clock: clock_ns,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(restore_err("clock"))
}
