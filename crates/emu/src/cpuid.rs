//! The CPU model the emulator presents: it advertises exactly what is implemented, so a
//! guest never takes a path the emulator lacks. Modelled on QEMU's `qemu64` (an AMD family
//! 15 CPU with SSE2), minus what is not emulated (SSE3, CX16, SYSENTER, machine checks).

use hypervisor::CpuidEntry;

const fn bit(n: u32) -> u32 {
    1 << n
}

/// Leaf 1 EDX: FPU, DE, PSE, TSC, MSR, PAE, CX8, APIC, MTRR, PGE, CMOV, PAT, PSE36, CLFSH,
/// MMX, FXSR, SSE, SSE2.
const LEAF1_EDX: u32 = bit(0)
    | bit(2)
    | bit(3)
    | bit(4)
    | bit(5)
    | bit(6)
    | bit(8)
    | bit(9)
    | bit(12)
    | bit(13)
    | bit(15)
    | bit(16)
    | bit(17)
    | bit(19)
    | bit(23)
    | bit(24)
    | bit(25)
    | bit(26);
/// Leaf 1 ECX: hypervisor present (TSC-deadline and the topology bits are added per vCPU).
const LEAF1_ECX: u32 = bit(31);
/// 0x8000_0001 EDX: SYSCALL, NX, 1 GiB pages, RDTSCP, long mode. ECX: LAHF/SAHF in 64-bit.
const EXT1_EDX: u32 = bit(11) | bit(20) | bit(26) | bit(27) | bit(29);
const EXT1_ECX: u32 = bit(0);
/// Leaf 7 EDX: IBRS/IBPB (the SPEC_CTRL and PRED_CMD MSRs) and IA32_ARCH_CAPABILITIES.
///
/// The emulated CPU predicts no branches and executes nothing speculatively, so it is immune
/// to the branch-target-injection and data-sampling attacks that Linux otherwise mitigates at
/// a cost (retpoline thunks on every indirect call: ~9 % of the instructions a 4 KiB disk
/// read costs the guest). `ARCH_CAPABILITIES` says so in the architectural way: enhanced IBRS
/// and the "not affected" bits (see `system.rs`). Linux then picks "Enhanced IBRS" for
/// Spectre v2 and calls indirectly.
pub const LEAF7_EDX: u32 = bit(26) | bit(29);
/// kvm-clock via the new MSRs, no I/O delay needed, stable TSC bit honoured.
const KVM_FEATURES: u32 = bit(3) | bit(1) | bit(24);

fn regs(s: &[u8; 12]) -> [u32; 3] {
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// The leaves before per-vCPU fix-ups (APIC ID, topology), in the seam's format.
pub fn supported() -> Vec<CpuidEntry> {
    let e = |function, eax, ebx, ecx, edx| CpuidEntry {
        function,
        index: 0,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
    };
    // "AuthenticAMD" is returned in EBX, EDX, ECX order.
    let v = regs(b"AuthenticAMD");
    let brand = *b"Ferrovisor emulated x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    let mut out = vec![
        e(0, 0xb, v[0], v[2], v[1]),
        // Family 15, model 0x6b, stepping 1; CLFLUSH line 8 * 8 = 64 bytes.
        e(1, 0x0006_0fb1, 8 << 8, LEAF1_ECX, LEAF1_EDX),
        CpuidEntry {
            flags: hypervisor::x86_64::CPUID_FLAG_SIGNIFICANT_INDEX,
            ..e(7, 0, 0, 0, LEAF7_EDX)
        },
        e(0x8000_0000, 0x8000_0008, v[0], v[2], v[1]),
        e(0x8000_0001, 0x0006_0fb1, 0, EXT1_ECX, EXT1_EDX),
        // Invariant TSC.
        e(0x8000_0007, 0, 0, 0, bit(8)),
        // 40 physical, 48 linear address bits.
        e(0x8000_0008, 0x3028, 0, 0, 0),
        e(0x4000_0000, 0x4000_0001, 0, 0, 0),
        e(0x4000_0001, KVM_FEATURES, 0, 0, 0),
    ];
    for (i, chunk) in brand.chunks_exact(16).enumerate() {
        let w = |k: usize| u32::from_le_bytes([chunk[k], chunk[k + 1], chunk[k + 2], chunk[k + 3]]);
        out.push(e(0x8000_0002 + i as u32, w(0), w(4), w(8), w(12)));
    }
    out
}

/// Looks a leaf up in a vCPU's table the way a CPU answers: subleaf-indexed leaves match on
/// `index`; an unknown leaf above the basic range returns the highest basic leaf's values
/// (Intel behaviour), others zeros.
pub fn lookup(table: &[CpuidEntry], leaf: u32, subleaf: u32) -> [u32; 4] {
    let hit = table.iter().find(|e| {
        e.function == leaf
            && (e.flags & hypervisor::x86_64::CPUID_FLAG_SIGNIFICANT_INDEX == 0
                || e.index == subleaf)
    });
    match hit {
        Some(e) => [e.eax, e.ebx, e.ecx, e.edx],
        None => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_and_features_are_what_the_emulator_implements() {
        let t = supported();
        let l0 = lookup(&t, 0, 0);
        let mut vendor = Vec::new();
        for r in [l0[1], l0[3], l0[2]] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&vendor, b"AuthenticAMD");
        let l1 = lookup(&t, 1, 0);
        assert_ne!(l1[3] & bit(26), 0, "SSE2");
        assert_eq!(l1[2] & bit(0), 0, "no SSE3");
        assert_eq!(l1[2] & bit(13), 0, "no CX16");
        assert_eq!(l1[3] & bit(11), 0, "no SYSENTER");
        assert_ne!(lookup(&t, 0x8000_0001, 0)[3] & bit(29), 0, "long mode");
        let l7 = lookup(&t, 7, 0);
        assert_eq!(l7[3], LEAF7_EDX, "speculation control only");
        assert_eq!([l7[0], l7[1], l7[2]], [0; 3], "no other leaf 7 features");
        assert_eq!(lookup(&t, 7, 1), [0; 4], "no subleaf 1");
    }
}
