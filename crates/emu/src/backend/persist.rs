//! Snapshots of the emulator back end: the state of a vCPU ([`EmuVcpuState`]) and of the
//! VM around it ([`EmuVmState`]), as plain serde data inside [`SavedState`], and the
//! dirty-page log.
//!
//! Guest time: every timer deadline (LAPIC, PIT) and the guest TSC are on the VM's guest
//! time line (`Shared::now_ns`), so saving that time and making the restored VM's clock
//! continue from it (plus the caller's `advance_clock_ns`) keeps every deadline and the
//! TSC/kvm-clock relation as the guest left them. In deterministic mode the clock is the
//! instruction count plus skipped idle time; the whole of it is saved, so a restored VM runs
//! on exactly as the original would have.

use std::sync::atomic::Ordering;

use hypervisor::{BackendKind, CpuidEntry, HypervisorError, Result, SavedState};
use serde::{Deserialize, Serialize};

use super::{EmuVcpu, EmuVm, MpState};
use crate::cpu::CpuSnapshot;
use crate::platform::ioapic::{IoApic, IoApicState};
use crate::platform::lapic::{LocalApic, LocalApicState};
use crate::platform::pic::{Pic, PicState};
use crate::platform::pit::{Pit, PitState};

const VCPU: &str = "vCPU";
const VM: &str = "VM";

/// Everything one emulated vCPU holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmuVcpuState {
    /// The vCPU (and initial APIC) ID.
    pub id: u32,
    /// Saved from a deterministic VM.
    pub deterministic: bool,
    /// Registers, interpreter state, and the answer to a device read not yet consumed.
    pub cpu: CpuSnapshot,
    pub mp: MpStateSaved,
    pub lapic: LocalApicState,
    pub cpuid: Vec<CpuidEntryState>,
    /// Guest TSC minus the TSC of guest time (`clock::ns_to_tsc(now_ns)`).
    pub tsc_offset: i64,
    /// Deterministic mode: TSC reads since the clock last moved.
    pub tsc_reads: u64,
    /// Deterministic mode with several vCPUs: this vCPU holds the turn.
    pub holding_turn: bool,
}

/// [`MpState`] in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MpStateSaved {
    Runnable,
    WaitForSipi,
}

impl From<MpState> for MpStateSaved {
    fn from(m: MpState) -> Self {
        match m {
            MpState::Runnable => MpStateSaved::Runnable,
            MpState::WaitForSipi => MpStateSaved::WaitForSipi,
        }
    }
}

impl From<MpStateSaved> for MpState {
    fn from(m: MpStateSaved) -> Self {
        match m {
            MpStateSaved::Runnable => MpState::Runnable,
            MpStateSaved::WaitForSipi => MpState::WaitForSipi,
        }
    }
}

/// One CPUID entry (the seam's [`CpuidEntry`] has no serde).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidEntryState {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&CpuidEntry> for CpuidEntryState {
    fn from(e: &CpuidEntry) -> Self {
        CpuidEntryState {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntryState> for CpuidEntry {
    fn from(e: &CpuidEntryState) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

/// The VM-wide platform state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmuVmState {
    /// How many vCPUs the VM had (the restored one must have as many).
    pub vcpus: u32,
    pub ioapic: IoApicState,
    pub pic: PicState,
    pub pit: PitState,
    /// Wall-clock time at guest time zero (what the kvm-clock wall clock reports).
    pub wall_clock_epoch_ns: u64,
    pub clock: GuestClockState,
}

/// The guest clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestClockState {
    /// Following the host's monotonic clock: guest time when saved.
    Host { now_ns: u64 },
    /// Deterministic: guest time, the part of it skipped while idle, whose turn it is and the
    /// instructions all vCPUs retired.
    Deterministic {
        now_ns: u64,
        idle_ns: u64,
        turn: u32,
        retired: u64,
    },
}

fn bad(what: &'static str, why: String) -> HypervisorError {
    HypervisorError::BadState { what, why }
}

/// The error for a state saved in the other clock mode.
fn mode_mismatch(what: &'static str, saved_deterministic: bool) -> HypervisorError {
    let why = if saved_deterministic {
        "it was saved by a deterministic VM; this VM is not deterministic".to_string()
    } else {
        "it was saved by a non-deterministic VM; this VM is deterministic".to_string()
    };
    bad(what, why)
}

impl EmuVcpu {
    /// See [`hypervisor::Vcpu::save_state`]. An answer to a read exit that `run` has not
    /// handed to the interpreter yet is saved with the rest, so the state is exact whether or
    /// not the caller completed the exit first.
    pub(super) fn save(&self) -> Result<SavedState> {
        let m = self.machine_ref();
        let mut cpu = self.cpu.snapshot();
        if let Some(response) = self.pending_response() {
            cpu.io_response = Some(response);
        }
        let state = EmuVcpuState {
            id: self.me.id,
            deterministic: self.shared.manual.is_some(),
            cpu,
            mp: self.mp.into(),
            lapic: self.me.lapic.lock().expect("lapic lock poisoned").state(),
            cpuid: m.cpuid.iter().map(CpuidEntryState::from).collect(),
            tsc_offset: m.tsc_offset,
            tsc_reads: m.tsc_reads,
            holding_turn: self.holding_turn,
        };
        SavedState::new(BackendKind::Emu, VCPU, &state)
    }

    /// See [`hypervisor::Vcpu::restore_state`].
    pub(super) fn restore(&mut self, saved: &SavedState) -> Result<()> {
        let state: EmuVcpuState = saved.decode(BackendKind::Emu, VCPU)?;
        let id = self.me.id;
        if state.id != id {
            return Err(bad(
                VCPU,
                format!("it is vCPU {}'s state; this is vCPU {id}", state.id),
            ));
        }
        if state.lapic.initial_id != id {
            return Err(bad(
                VCPU,
                format!(
                    "its local APIC has ID {}; vCPU {id}'s must have ID {id}",
                    state.lapic.initial_id
                ),
            ));
        }
        let deterministic = self.shared.manual.is_some();
        if state.deterministic != deterministic {
            return Err(mode_mismatch(VCPU, state.deterministic));
        }
        self.cpu.restore(state.cpu);
        self.pending = None;
        self.mp = state.mp.into();
        self.holding_turn = deterministic && state.holding_turn;
        *self.me.lapic.lock().expect("lapic lock poisoned") = LocalApic::from_state(state.lapic);
        let m = self.machine();
        m.cpuid = state.cpuid.iter().map(CpuidEntry::from).collect();
        m.tsc_offset = state.tsc_offset;
        m.tsc_reads = state.tsc_reads;
        // The LAPIC may hold pending interrupts: make the CPU look.
        self.me.irq_hint.store(true, Ordering::Release);
        Ok(())
    }
}

impl EmuVm {
    /// See [`hypervisor::Vm::save_state`].
    pub(super) fn save(&self) -> Result<SavedState> {
        let sh = &self.shared;
        let clock = match (&sh.manual, &sh.turns) {
            (Some(manual), Some(turns)) => {
                let (turn, retired) = turns.state();
                GuestClockState::Deterministic {
                    now_ns: crate::platform::clock::TimeSource::now_ns(manual.as_ref()),
                    idle_ns: sh.idle_ns.load(Ordering::Relaxed),
                    turn,
                    retired,
                }
            }
            _ => GuestClockState::Host {
                now_ns: sh.now_ns(),
            },
        };
        let state = EmuVmState {
            vcpus: sh.vcpu_count(),
            ioapic: sh.ioapic.lock().expect("ioapic lock poisoned").state(),
            pic: sh.pic.lock().expect("pic lock poisoned").state(),
            pit: sh.pit.lock().expect("pit lock poisoned").state(),
            wall_clock_epoch_ns: sh.wall_clock_epoch_ns(),
            clock,
        };
        SavedState::new(BackendKind::Emu, VM, &state)
    }

    /// See [`hypervisor::Vm::restore_state`]. Checks everything before changing anything.
    pub(super) fn restore(&self, saved: &SavedState, advance_clock_ns: u64) -> Result<()> {
        let state: EmuVmState = saved.decode(BackendKind::Emu, VM)?;
        let sh = &self.shared;
        let vcpus = sh.vcpu_count();
        if state.vcpus != vcpus {
            return Err(bad(
                VM,
                format!(
                    "it has {} vCPUs; this VM has {vcpus} (create them all before restoring)",
                    state.vcpus
                ),
            ));
        }
        match (state.clock, &sh.manual, &sh.turns, &sh.host_clock) {
            (GuestClockState::Host { now_ns }, None, _, Some(host)) => {
                host.set_now(now_ns.saturating_add(advance_clock_ns));
            }
            (
                GuestClockState::Deterministic {
                    now_ns,
                    idle_ns,
                    turn,
                    retired,
                },
                Some(manual),
                Some(turns),
                _,
            ) => {
                if turn >= vcpus {
                    return Err(bad(
                        VM,
                        format!("it is vCPU {turn}'s turn, but there are {vcpus} vCPUs"),
                    ));
                }
                // Guest time is retired instructions plus idle time: the advance counts as
                // idle time, so the clock stays on it as the vCPUs run on.
                manual.reset(now_ns.saturating_add(advance_clock_ns));
                sh.idle_ns
                    .store(idle_ns.saturating_add(advance_clock_ns), Ordering::Relaxed);
                turns.restore(turn, retired);
            }
            (GuestClockState::Host { .. }, ..) => return Err(mode_mismatch(VM, false)),
            (GuestClockState::Deterministic { .. }, ..) => return Err(mode_mismatch(VM, true)),
        }
        *sh.ioapic.lock().expect("ioapic lock poisoned") = IoApic::from_state(state.ioapic);
        *sh.pic.lock().expect("pic lock poisoned") = Pic::from_state(state.pic);
        *sh.pit.lock().expect("pit lock poisoned") = Pit::from_state(state.pit);
        sh.wall_clock_epoch_ns
            .store(state.wall_clock_epoch_ns, Ordering::Relaxed);
        Ok(())
    }

    /// See [`hypervisor::Vm::take_dirty_log`]: the record per region, in slot order.
    pub(super) fn take_dirty(&self) -> Result<Vec<Vec<u64>>> {
        let not_on = || {
            HypervisorError::SaveState(
                "dirty-page log",
                std::io::Error::other("dirty-page logging is not started"),
            )
        };
        let mem = self.shared.mem.get().ok_or_else(not_on)?;
        let mut by_gpa = mem.take_dirty_log().ok_or_else(not_on)?;
        let mut slots: Vec<(u32, u64)> = self
            .shared
            .regions
            .lock()
            .expect("regions lock poisoned")
            .iter()
            .map(|(slot, r)| (*slot, r.gpa))
            .collect();
        slots.sort_unstable();
        Ok(slots
            .iter()
            .map(|(_, gpa)| {
                by_gpa
                    .iter_mut()
                    .find(|(g, _)| g == gpa)
                    .map(|(_, bits)| std::mem::take(bits))
                    .unwrap_or_default()
            })
            .collect())
    }
}
