//! Per-vCPU CPUID: the back end's supported leaves with topology, APIC ID and paravirt leaves
//! made consistent with the VM's shape.

use hypervisor::x86_64::CPUID_FLAG_SIGNIFICANT_INDEX;
use hypervisor::CpuidEntry;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const FEATURES_ECX_TSC_DEADLINE: u32 = 1 << 24;
const FEATURES_ECX_HYPERVISOR: u32 = 1 << 31;
const FEATURES_EDX_HTT: u32 = 1 << 28;
/// kvm-clock through the new MSRs (0x4b564d00/01).
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// Topology level types in leaf 0xb/0x1f ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0" as the three registers of leaf 0x4000_0000.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Number of APIC-ID bits needed to number `count` CPUs.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn topology_leaf(function: u32, apic_id: u32, vcpus: u32) -> [CpuidEntry; 3] {
    let entry = |index, eax, ebx, ecx| CpuidEntry {
        function,
        index,
        flags: CPUID_FLAG_SIGNIFICANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
    };
    [
        // One thread per core.
        entry(0, 0, 1, LEVEL_TYPE_SMT << 8),
        // All vCPUs are cores of one package.
        entry(1, id_bits(vcpus), vcpus, (LEVEL_TYPE_CORE << 8) | 1),
        // Terminator: level type 0.
        entry(2, 0, 0, 2),
    ]
}

/// Returns the CPUID table for vCPU `vcpu_id` (whose APIC ID is its index) of a `vcpus`-vCPU
/// VM, derived from the back end's `supported` leaves.
pub fn vcpu_cpuid(supported: &[CpuidEntry], vcpu_id: u32, vcpus: u32) -> Vec<CpuidEntry> {
    let apic_id = vcpu_id;
    let mut out: Vec<CpuidEntry> = supported
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    let had_v2 = supported.iter().any(|e| e.function == LEAF_TOPOLOGY_V2);

    for e in out.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (vcpus.min(255) << 16);
                e.ecx |= FEATURES_ECX_HYPERVISOR | FEATURES_ECX_TSC_DEADLINE;
                if vcpus > 1 {
                    e.edx |= FEATURES_EDX_HTT;
                } else {
                    e.edx &= !FEATURES_EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing the cache
                // - 1; with one thread per core only a cache shared by all cores (the last
                // level, level 3) is shared.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level == 3 { vcpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((vcpus - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            _ => {}
        }
    }
    out.extend(topology_leaf(LEAF_TOPOLOGY, apic_id, vcpus));
    if had_v2 {
        out.extend(topology_leaf(LEAF_TOPOLOGY_V2, apic_id, vcpus));
    }

    if !out.iter().any(|e| e.function == LEAF_HYPERVISOR) {
        out.push(CpuidEntry {
            function: LEAF_HYPERVISOR,
            eax: LEAF_KVM_FEATURES,
            ..Default::default()
        });
    }
    if !out.iter().any(|e| e.function == LEAF_KVM_FEATURES) {
        out.push(CpuidEntry {
            function: LEAF_KVM_FEATURES,
            eax: KVM_FEATURE_CLOCKSOURCE2,
            ..Default::default()
        });
    }
    for e in out.iter_mut().filter(|e| e.function == LEAF_HYPERVISOR) {
        e.eax = e.eax.max(LEAF_KVM_FEATURES);
        [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(entries: &[CpuidEntry], function: u32, index: u32) -> CpuidEntry {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    fn host_like() -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            CpuidEntry {
                function: 1,
                ebx: 0x0708_0800,
                edx: FEATURES_EDX_HTT,
                ..Default::default()
            },
            CpuidEntry {
                function: 4,
                index: 3,
                eax: (3 << 5) | 0x0012_3456,
                ..Default::default()
            },
            CpuidEntry {
                function: 0xb,
                index: 0,
                ebx: 2,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn apic_id_and_count_are_per_vcpu() {
        let c = vcpu_cpuid(&host_like(), 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & FEATURES_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & FEATURES_EDX_HTT, 0);
    }

    #[test]
    fn single_vcpu_clears_htt() {
        let c = vcpu_cpuid(&host_like(), 0, 1);
        assert_eq!(find(&c, 1, 0).edx & FEATURES_EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_describes_one_package_of_n_cores() {
        let c = vcpu_cpuid(&host_like(), 2, 6);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.ebx, smt.edx), (1, 2));
        assert_eq!(core.eax, 3, "6 CPUs need 3 APIC ID bits");
        assert_eq!(core.ebx, 6);
        assert_eq!((core.ecx >> 8) & 0xff, LEVEL_TYPE_CORE);
        assert_eq!((find(&c, 0xb, 2).ecx >> 8) & 0xff, 0, "terminating level");
        assert_eq!(c.iter().filter(|e| e.function == 0xb).count(), 3);
    }

    #[test]
    fn last_level_cache_is_shared_by_all_cores() {
        let c = vcpu_cpuid(&host_like(), 0, 4);
        let l3 = find(&c, 4, 3);
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn kvm_paravirt_leaves_are_present() {
        let c = vcpu_cpuid(&host_like(), 0, 1);
        let sig = find(&c, LEAF_HYPERVISOR, 0);
        let mut name = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&name, b"KVMKVMKVM\0\0\0");
        assert_ne!(
            find(&c, LEAF_KVM_FEATURES, 0).eax & KVM_FEATURE_CLOCKSOURCE2,
            0
        );
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
