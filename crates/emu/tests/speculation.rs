//! The emulated CPU's speculation controls: it predicts no branches and runs nothing
//! speculatively, says so through IA32_ARCH_CAPABILITIES (enhanced IBRS and the "not
//! affected" bits), and keeps SPEC_CTRL as the guest writes it (`cpuid::LEAF7_EDX`).

use emu::testkit::FlatCpu;

const CODE: u64 = 0x10_0000;
const RDMSR: [u8; 2] = [0x0f, 0x32];
const WRMSR: [u8; 2] = [0x0f, 0x30];

/// `mov ecx, index; rdmsr`: EDX:EAX after it, or the exception vector it raised.
fn rdmsr(c: &mut FlatCpu, index: u32) -> Result<u64, u8> {
    run(c, index, None)
}

/// `mov ecx, index; mov eax, lo; mov edx, hi; wrmsr`.
fn wrmsr(c: &mut FlatCpu, index: u32, value: u64) -> Result<u64, u8> {
    run(c, index, Some(value))
}

fn run(c: &mut FlatCpu, index: u32, value: Option<u64>) -> Result<u64, u8> {
    let mut code = vec![0xb9];
    code.extend(index.to_le_bytes());
    let v = value.unwrap_or(0);
    code.push(0xb8);
    code.extend((v as u32).to_le_bytes());
    code.push(0xba);
    code.extend(((v >> 32) as u32).to_le_bytes());
    code.extend(if value.is_some() { WRMSR } else { RDMSR });
    c.load_code(CODE, &code);
    c.step(4);
    if let Some(e) = c.exception() {
        return Err(e.vector);
    }
    let r = c.regs();
    Ok(r.gpr[0] & 0xffff_ffff | r.gpr[2] << 32)
}

#[test]
fn arch_capabilities_report_enhanced_ibrs_and_no_meltdown() {
    let mut c = FlatCpu::new();
    let caps = rdmsr(&mut c, 0x10a).expect("IA32_ARCH_CAPABILITIES is readable");
    assert_ne!(caps & 1, 0, "RDCL_NO");
    assert_ne!(caps & 2, 0, "IBRS_ALL");
    assert_eq!(
        caps & 4,
        0,
        "no RSBA: returns are not predicted from elsewhere"
    );
    let mut c = FlatCpu::new();
    assert_eq!(wrmsr(&mut c, 0x10a, caps), Err(13), "read-only");
}

#[test]
fn spec_ctrl_reads_back_what_was_written_and_refuses_reserved_bits() {
    let mut c = FlatCpu::new();
    assert_eq!(rdmsr(&mut c, 0x48), Ok(0));
    let mut c = FlatCpu::new();
    assert_eq!(wrmsr(&mut c, 0x48, 0b101), Ok(0b101));
    assert_eq!(rdmsr(&mut c, 0x48), Ok(0b101), "IBRS | SSBD kept");
    let mut c = FlatCpu::new();
    assert_eq!(wrmsr(&mut c, 0x48, 1 << 3), Err(13));
}

#[test]
fn pred_cmd_takes_ibpb_and_nothing_else() {
    let mut c = FlatCpu::new();
    assert!(wrmsr(&mut c, 0x49, 1).is_ok(), "IBPB");
    let mut c = FlatCpu::new();
    assert_eq!(wrmsr(&mut c, 0x49, 2), Err(13));
    let mut c = FlatCpu::new();
    assert_eq!(rdmsr(&mut c, 0x49), Err(13), "write-only");
}
