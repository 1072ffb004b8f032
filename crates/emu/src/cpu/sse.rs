//! SSE/SSE2 and x87 instructions (the subset CPUID advertises), FXSAVE/FXRSTOR.

use iced_x86::Instruction;

use super::{Cpu, Exec};

/// `None` if `insn` is not an SSE/x87 instruction this module implements.
pub(crate) fn execute(_cpu: &mut Cpu, _insn: &Instruction) -> Option<Exec> {
    None
}
