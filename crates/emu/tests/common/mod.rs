//! What the randomized block tests share: a small deterministic generator and the registers
//! their random instructions use.
#![allow(dead_code)] // each test file uses part of it

use iced_x86::code_asm::*;

/// Xorshift: the same sequence on every run, so a failing case can be found again.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Registers random instructions use (RSP and R10..R15 are left for the tests' own purposes).
pub const REGS64: [AsmRegister64; 8] = [rax, rcx, rdx, rbx, rsi, rdi, r8, r9];
pub const REGS32: [AsmRegister32; 8] = [eax, ecx, edx, ebx, esi, edi, r8d, r9d];
pub const REGS16: [AsmRegister16; 8] = [ax, cx, dx, bx, si, di, r8w, r9w];
pub const REGS8: [AsmRegister8; 8] = [al, cl, dl, bl, sil, dil, r8b, r9b];

/// A random register value: small and extreme values make carries, overflows and zero
/// results likely.
pub fn random_value(r: &mut Rng) -> u64 {
    match r.below(4) {
        0 => r.below(4),
        1 => u64::MAX - r.below(4),
        2 => 1 << r.below(64),
        _ => r.next(),
    }
}
