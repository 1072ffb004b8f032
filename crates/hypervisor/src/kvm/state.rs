//! What the `kvm` back end saves of a vCPU and of a VM, as plain serializable data.
//!
//! Each structure mirrors the KVM structure its `KVM_GET_*` ioctl fills, field by field, minus
//! padding and reserved words. Mirrors rather than kvm-bindings' own `serde` feature: that
//! feature stores each structure as opaque bytes and zero-pads or truncates a blob of the wrong
//! length without an error, and it does not cover `kvm_fpu`; a damaged snapshot must fail to
//! restore instead. Byte blobs (the local APIC page, the XSAVE area) are lowercase hex strings.
//!
//! Public so tests and inspection tools can read a saved state; the VMM handles it only as an
//! opaque [`SavedState`](crate::SavedState).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_msr_entry,
    kvm_pic_state, kvm_pit_channel_state, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
    kvm_xcr,
};
use serde::{Deserialize, Serialize};

/// Declares a serializable mirror of a flat KVM structure and the conversions both ways. Fields
/// of the KVM structure not listed (padding, reserved) are zero when converting back.
macro_rules! mirror {
    ($(#[$doc:meta])* $name:ident <=> $kvm:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(pub $field: $ty,)*
        }

        impl From<&$kvm> for $name {
            fn from(k: &$kvm) -> Self {
                $name { $($field: k.$field,)* }
            }
        }

        impl From<&$name> for $kvm {
            fn from(s: &$name) -> Self {
                #[allow(clippy::needless_update)]
                let k = $kvm { $($field: s.$field,)* ..Default::default() };
                k
            }
        }
    };
}

/// Everything [`KvmVcpu::save_state`](crate::Vcpu::save_state) keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmVcpuState {
    /// `KVM_GET_MP_STATE` (runnable, halted, waiting for INIT/SIPI, ...).
    pub mp_state: u32,
    pub regs: RegsState,
    pub sregs: SregsState,
    pub fpu: FpuSave,
    /// `KVM_GET_XCRS`; `None` where KVM lacks `KVM_CAP_XCRS`.
    pub xcrs: Option<Vec<XcrState>>,
    /// `KVM_GET_DEBUGREGS`; `None` where KVM lacks `KVM_CAP_DEBUGREGS`.
    pub debug_regs: Option<DebugRegsState>,
    /// `KVM_GET_LAPIC`: the 1 KiB local APIC register page.
    #[serde(with = "hex_bytes")]
    pub lapic: Vec<u8>,
    /// Every MSR of KVM's MSR index and feature lists that could be read, in list order.
    pub msrs: Vec<MsrState>,
    /// `KVM_GET_VCPU_EVENTS`; `None` where KVM lacks `KVM_CAP_VCPU_EVENTS`.
    pub events: Option<EventsState>,
    /// `KVM_GET_CPUID2`: the CPUID the vCPU was given (empty if it was never set).
    pub cpuid: Vec<CpuidState>,
    /// `KVM_GET_TSC_KHZ`; `None` where KVM lacks `KVM_CAP_GET_TSC_KHZ`.
    pub tsc_khz: Option<u32>,
}

/// The x87/SSE/AVX state: the XSAVE area where KVM has `KVM_CAP_XSAVE`, else the legacy FPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FpuSave {
    /// `KVM_GET_XSAVE` (or `KVM_GET_XSAVE2` when the area is larger than 4 KiB).
    Xsave(#[serde(with = "hex_bytes")] Vec<u8>),
    /// `KVM_GET_FPU`.
    Fpu(Box<FpuState>),
}

mirror! {
    /// `kvm_regs`.
    RegsState <=> kvm_regs {
        rax: u64, rbx: u64, rcx: u64, rdx: u64, rsi: u64, rdi: u64, rsp: u64, rbp: u64,
        r8: u64, r9: u64, r10: u64, r11: u64, r12: u64, r13: u64, r14: u64, r15: u64,
        rip: u64, rflags: u64,
    }
}

mirror! {
    /// `kvm_segment`.
    SegmentState <=> kvm_segment {
        base: u64, limit: u32, selector: u16, type_: u8, present: u8, dpl: u8, db: u8, s: u8,
        l: u8, g: u8, avl: u8, unusable: u8,
    }
}

mirror! {
    /// `kvm_dtable`.
    DtableState <=> kvm_dtable { base: u64, limit: u16 }
}

/// `kvm_sregs`, including the pending-interrupt bitmap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SregsState {
    pub cs: SegmentState,
    pub ds: SegmentState,
    pub es: SegmentState,
    pub fs: SegmentState,
    pub gs: SegmentState,
    pub ss: SegmentState,
    pub tr: SegmentState,
    pub ldt: SegmentState,
    pub gdt: DtableState,
    pub idt: DtableState,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

impl From<&kvm_sregs> for SregsState {
    fn from(k: &kvm_sregs) -> Self {
        SregsState {
            cs: (&k.cs).into(),
            ds: (&k.ds).into(),
            es: (&k.es).into(),
            fs: (&k.fs).into(),
            gs: (&k.gs).into(),
            ss: (&k.ss).into(),
            tr: (&k.tr).into(),
            ldt: (&k.ldt).into(),
            gdt: (&k.gdt).into(),
            idt: (&k.idt).into(),
            cr0: k.cr0,
            cr2: k.cr2,
            cr3: k.cr3,
            cr4: k.cr4,
            cr8: k.cr8,
            efer: k.efer,
            apic_base: k.apic_base,
            interrupt_bitmap: k.interrupt_bitmap,
        }
    }
}

impl From<&SregsState> for kvm_sregs {
    fn from(s: &SregsState) -> Self {
        kvm_sregs {
            cs: (&s.cs).into(),
            ds: (&s.ds).into(),
            es: (&s.es).into(),
            fs: (&s.fs).into(),
            gs: (&s.gs).into(),
            ss: (&s.ss).into(),
            tr: (&s.tr).into(),
            ldt: (&s.ldt).into(),
            gdt: (&s.gdt).into(),
            idt: (&s.idt).into(),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

mirror! {
    /// `kvm_fpu`, for hosts without XSAVE.
    FpuState <=> kvm_fpu {
        fpr: [[u8; 16]; 8], fcw: u16, fsw: u16, ftwx: u8, last_opcode: u16, last_ip: u64,
        last_dp: u64, xmm: [[u8; 16]; 16], mxcsr: u32,
    }
}

mirror! {
    /// One `kvm_xcr` (extended control register, XCR0 in practice).
    XcrState <=> kvm_xcr { xcr: u32, value: u64 }
}

mirror! {
    /// `kvm_debugregs`.
    DebugRegsState <=> kvm_debugregs { db: [u64; 4], dr6: u64, dr7: u64, flags: u64 }
}

mirror! {
    /// One MSR.
    MsrState <=> kvm_msr_entry { index: u32, data: u64 }
}

mirror! {
    /// One `kvm_cpuid_entry2`.
    CpuidState <=> kvm_cpuid_entry2 {
        function: u32, index: u32, flags: u32, eax: u32, ebx: u32, ecx: u32, edx: u32,
    }
}

/// `kvm_vcpu_events`: exceptions, interrupts, NMIs and SMIs in flight, and which of these
/// fields KVM filled (`flags`, passed back unchanged on restore).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsState {
    pub exception_injected: u8,
    pub exception_nr: u8,
    pub exception_has_error_code: u8,
    pub exception_pending: u8,
    pub exception_error_code: u32,
    pub exception_has_payload: u8,
    pub exception_payload: u64,
    pub interrupt_injected: u8,
    pub interrupt_nr: u8,
    pub interrupt_soft: u8,
    pub interrupt_shadow: u8,
    pub nmi_injected: u8,
    pub nmi_pending: u8,
    pub nmi_masked: u8,
    pub sipi_vector: u32,
    pub flags: u32,
    pub smi_smm: u8,
    pub smi_pending: u8,
    pub smi_smm_inside_nmi: u8,
    pub smi_latched_init: u8,
    pub triple_fault_pending: u8,
}

impl From<&kvm_vcpu_events> for EventsState {
    fn from(k: &kvm_vcpu_events) -> Self {
        EventsState {
            exception_injected: k.exception.injected,
            exception_nr: k.exception.nr,
            exception_has_error_code: k.exception.has_error_code,
            exception_pending: k.exception.pending,
            exception_error_code: k.exception.error_code,
            exception_has_payload: k.exception_has_payload,
            exception_payload: k.exception_payload,
            interrupt_injected: k.interrupt.injected,
            interrupt_nr: k.interrupt.nr,
            interrupt_soft: k.interrupt.soft,
            interrupt_shadow: k.interrupt.shadow,
            nmi_injected: k.nmi.injected,
            nmi_pending: k.nmi.pending,
            nmi_masked: k.nmi.masked,
            sipi_vector: k.sipi_vector,
            flags: k.flags,
            smi_smm: k.smi.smm,
            smi_pending: k.smi.pending,
            smi_smm_inside_nmi: k.smi.smm_inside_nmi,
            smi_latched_init: k.smi.latched_init,
            triple_fault_pending: k.triple_fault.pending,
        }
    }
}

impl From<&EventsState> for kvm_vcpu_events {
    fn from(s: &EventsState) -> Self {
        let mut k = kvm_vcpu_events::default();
        k.exception.injected = s.exception_injected;
        k.exception.nr = s.exception_nr;
        k.exception.has_error_code = s.exception_has_error_code;
        k.exception.pending = s.exception_pending;
        k.exception.error_code = s.exception_error_code;
        k.exception_has_payload = s.exception_has_payload;
        k.exception_payload = s.exception_payload;
        k.interrupt.injected = s.interrupt_injected;
        k.interrupt.nr = s.interrupt_nr;
        k.interrupt.soft = s.interrupt_soft;
        k.interrupt.shadow = s.interrupt_shadow;
        k.nmi.injected = s.nmi_injected;
        k.nmi.pending = s.nmi_pending;
        k.nmi.masked = s.nmi_masked;
        k.sipi_vector = s.sipi_vector;
        k.flags = s.flags;
        k.smi.smm = s.smi_smm;
        k.smi.pending = s.smi_pending;
        k.smi.smm_inside_nmi = s.smi_smm_inside_nmi;
        k.smi.latched_init = s.smi_latched_init;
        k.triple_fault.pending = s.triple_fault_pending;
        k
    }
}

/// Everything [`KvmVm::save_state`](crate::Vm::save_state) keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmVmState {
    pub pic_master: PicState,
    pub pic_slave: PicState,
    pub ioapic: IoapicState,
    pub pit: PitState,
    pub clock: ClockState,
}

mirror! {
    /// `kvm_pic_state`: one 8259.
    PicState <=> kvm_pic_state {
        last_irr: u8, irr: u8, imr: u8, isr: u8, priority_add: u8, irq_base: u8,
        read_reg_select: u8, poll: u8, special_mask: u8, init_state: u8, auto_eoi: u8,
        rotate_on_auto_eoi: u8, special_fully_nested_mode: u8, init4: u8, elcr: u8,
        elcr_mask: u8,
    }
}

/// `kvm_ioapic_state`, the redirection table as raw 64-bit entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoapicState {
    pub base_address: u64,
    pub ioregsel: u32,
    pub id: u32,
    pub irr: u32,
    pub redirtbl: [u64; 24],
}

mirror! {
    /// `kvm_pit_channel_state`. `count_load_time` is host time; KVM_SET_PIT2 reloads each
    /// channel's count from now, so it does not matter on restore.
    PitChannelState <=> kvm_pit_channel_state {
        count: u32, latched_count: u16, count_latched: u8, status_latched: u8, status: u8,
        read_state: u8, write_state: u8, write_latch: u8, rw_mode: u8, mode: u8, bcd: u8,
        gate: u8, count_load_time: i64,
    }
}

/// `kvm_pit_state2`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PitState {
    pub channels: [PitChannelState; 3],
    pub flags: u32,
}

/// `kvm_clock_data`: the guest's kvm-clock in nanoseconds, and KVM's flags about it (for
/// information: restore sets the clock alone).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockState {
    pub clock_ns: u64,
    pub flags: u32,
}

impl From<&kvm_clock_data> for ClockState {
    fn from(k: &kvm_clock_data) -> Self {
        ClockState {
            clock_ns: k.clock,
            flags: k.flags,
        }
    }
}

/// Serde adapter: a byte vector as a lowercase hex string.
mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() % 2 != 0 {
            return Err(D::Error::custom("odd number of hex digits"));
        }
        let digit = |c: u8| {
            char::from(c)
                .to_digit(16)
                .map(|d| d as u8)
                .ok_or_else(|| D::Error::custom(format!("{:?} is not a hex digit", char::from(c))))
        };
        text.as_bytes()
            .chunks_exact(2)
            .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_blobs_round_trip_and_reject_bad_digits() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Blob(#[serde(with = "hex_bytes")] Vec<u8>);
        let blob = Blob(vec![0x00, 0x7f, 0xa5, 0xff]);
        let json = serde_json::to_string(&blob).unwrap();
        assert_eq!(json, "\"007fa5ff\"");
        assert_eq!(serde_json::from_str::<Blob>(&json).unwrap(), blob);
        assert!(serde_json::from_str::<Blob>("\"007\"").is_err());
        assert!(serde_json::from_str::<Blob>("\"0g\"").is_err());
    }

    #[test]
    fn sregs_round_trip_through_kvm_keeps_every_field() {
        let mut k = kvm_sregs::default();
        k.cs.base = 0x1000;
        k.cs.selector = 0x10;
        k.cs.l = 1;
        k.tr.type_ = 11;
        k.gdt.limit = 0x27;
        k.cr0 = 0x8000_0011;
        k.efer = 0x500;
        k.apic_base = 0xfee0_0900;
        k.interrupt_bitmap[1] = 1 << 3;
        let back = kvm_sregs::from(&SregsState::from(&k));
        assert_eq!(back, k);
    }

    #[test]
    fn events_round_trip_through_kvm_keeps_every_field() {
        let mut k = kvm_vcpu_events::default();
        k.exception.nr = 14;
        k.exception.has_error_code = 1;
        k.exception.error_code = 2;
        k.exception_payload = 0xdead_b000;
        k.interrupt.shadow = 1;
        k.nmi.masked = 1;
        k.flags = 0x1d;
        k.smi.latched_init = 1;
        k.triple_fault.pending = 1;
        let back = kvm_vcpu_events::from(&EventsState::from(&k));
        assert_eq!(back, k);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let json = r#"{"xcr":0,"value":1,"extra":2}"#;
        assert!(serde_json::from_str::<XcrState>(json).is_err());
    }
}
