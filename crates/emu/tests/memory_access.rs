//! Memory accesses through the handlers' fast path (a TLB hit goes straight to the host page)
//! against those that must take the general path: a misaligned access that crosses into the
//! next page reaches that page's own translation, not the host memory after the first page.

use emu::cpu::RunExit;
use emu::testkit::{layout, FlatCpu};

const CODE: u64 = layout::FREE;
/// The test kit's first page directory: entry 1 maps linear 2 MiB .. 4 MiB.
const PD0: u64 = layout::PML4 + 0x2000;
/// Where linear 2 MiB .. 4 MiB is moved to, so that the host page after linear 0x1ff000's is
/// not the one linear 0x200000 maps.
const MOVED: u64 = 0x60_0000;

/// Maps linear 2 MiB .. 4 MiB to physical `MOVED` (a 2 MiB page).
fn move_second_2m(fc: &FlatCpu) {
    let old = fc.read_u64(PD0 + 8);
    let flags = old & 0xfff;
    fc.write(PD0 + 8, &(MOVED | flags).to_le_bytes());
}

#[test]
fn misaligned_accesses_across_a_page_reach_each_page_translation() {
    for size in [2usize, 4, 8] {
        let mut fc = FlatCpu::new();
        move_second_2m(&fc);
        // mov [rbx], rax (fills the TLB entry of the first page for writes), then a `size`-byte
        // store and load at the first page's last byte, crossing into linear 0x200000.
        let (store, load): (&[u8], &[u8]) = match size {
            2 => (&[0x66, 0x89, 0x01], &[0x66, 0x8b, 0x11]), // mov [rcx], ax; mov dx, [rcx]
            4 => (&[0x89, 0x01], &[0x8b, 0x11]),             // mov [rcx], eax; mov edx, [rcx]
            _ => (&[0x48, 0x89, 0x01], &[0x48, 0x8b, 0x11]), // mov [rcx], rax; mov rdx, [rcx]
        };
        let mut code = vec![0x48, 0x89, 0x03];
        code.extend_from_slice(store);
        code.extend_from_slice(load);
        fc.load_code(CODE, &code);
        let value: u64 = 0x8877_6655_4433_2211;
        let mut r = fc.regs();
        r.gpr[0] = value;
        r.gpr[3] = 0x1f_f000; // rbx
        r.gpr[1] = 0x1f_ffff; // rcx
        fc.set_regs(&r);
        assert_eq!(fc.step(3), RunExit::Budget, "size {size}");
        assert_eq!(fc.exception(), None, "size {size}");
        let bytes = value.to_le_bytes();
        assert_eq!(fc.read(0x1f_ffff, 1), [bytes[0]], "size {size}: first byte");
        assert_eq!(
            fc.read(MOVED, size - 1),
            &bytes[1..size],
            "size {size}: the rest goes where linear 0x200000 maps"
        );
        assert_eq!(
            fc.read(0x20_0000, size - 1),
            vec![0; size - 1],
            "size {size}: nothing lands in the host page after the first"
        );
        let mask = if size == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * size)) - 1
        };
        assert_eq!(fc.regs().gpr[2] & mask, value & mask, "size {size}: load");
    }
}

#[test]
fn misaligned_accesses_inside_a_page_read_and_write_every_byte() {
    let mut fc = FlatCpu::new();
    // mov [rbx], rax; mov [rcx], eax (misaligned by one, inside the page); mov edx, [rcx]
    fc.load_code(CODE, &[0x48, 0x89, 0x03, 0x89, 0x01, 0x8b, 0x11]);
    let mut r = fc.regs();
    r.gpr[0] = 0xdead_beef_cafe_f00d;
    r.gpr[3] = 0x30_0000;
    r.gpr[1] = 0x30_0101;
    fc.set_regs(&r);
    assert_eq!(fc.step(3), RunExit::Budget);
    assert_eq!(fc.read(0x30_0101, 4), 0xcafe_f00du32.to_le_bytes());
    assert_eq!(fc.regs().gpr[2], 0xcafe_f00d);
}
