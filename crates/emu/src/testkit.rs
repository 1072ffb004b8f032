//! Helpers for testing the emulator without a VMM: a device-less [`TestMachine`] and
//! [`FlatCpu`], a CPU already in 64-bit long mode over its own RAM with identity-mapped page
//! tables, a flat GDT, a TSS and an IDT whose handlers stop the CPU, so a test can place code
//! bytes anywhere in RAM, set registers, run a few instructions and look at the result.
//!
//! ```no_run
//! use emu::testkit::FlatCpu;
//! let mut c = FlatCpu::new();
//! c.load_code(0x10_0000, &[0x48, 0x01, 0xc8]); // add rax, rcx
//! let mut r = c.regs();
//! r.gpr[0] = 1;
//! r.gpr[1] = 2;
//! c.set_regs(&r);
//! c.step(1);
//! assert_eq!(c.regs().gpr[0], 3);
//! ```

use std::sync::Arc;

use crate::cpu::state::{cr0, cr4, efer, flags, Dtr, Seg, CS, DS, ES, FS, GS, RSP, SS};
use crate::cpu::{Cpu, Machine, RunExit};
use crate::memory::{PhysMem, RamRegion};

/// A platform with no devices: ports read all-ones, MMIO and MSRs are not handled here, CPUID
/// describes a small fixed SSE2-capable 64-bit CPU, the TSC is a counter that advances on every
/// read, and there are never interrupts.
#[derive(Debug, Default)]
pub struct TestMachine {
    /// The value the next `rdtsc` returns (then advanced by 1000).
    pub tsc: u64,
}

impl TestMachine {
    pub fn new() -> Self {
        Self::default()
    }
}

/// "GenuineIntel" as CPUID leaf 0 returns it in EBX, EDX, ECX.
const VENDOR: [u32; 3] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e];

impl Machine for TestMachine {
    fn pio_read(&mut self, _port: u16, size: u8) -> Option<u32> {
        Some(match size {
            1 => 0xff,
            2 => 0xffff,
            _ => 0xffff_ffff,
        })
    }

    fn pio_write(&mut self, _port: u16, _size: u8, _value: u32) -> bool {
        true
    }

    fn mmio_read(&mut self, _gpa: u64, _size: u8) -> Option<u64> {
        None
    }

    fn mmio_write(&mut self, _gpa: u64, _size: u8, _value: u64) -> bool {
        false
    }

    fn rdmsr(&mut self, _index: u32) -> Option<u64> {
        None
    }

    fn wrmsr(&mut self, _index: u32, _value: u64) -> Option<bool> {
        None
    }

    fn rdtsc(&mut self) -> u64 {
        let t = self.tsc;
        self.tsc += 1000;
        t
    }

    fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
        match leaf {
            0 => [1, VENDOR[0], VENDOR[2], VENDOR[1]],
            // Family 6, model 0x0f, stepping 1. EDX: FPU TSC MSR PAE CX8 APIC SEP MTRR PGE
            // CMOV PAT CLFSH MMX FXSR SSE SSE2. ECX: CX16.
            1 => [0x0000_06f1, 0x0000_0800, 1 << 13, 0x0789_eb71],
            0x8000_0000 => [0x8000_0001, 0, 0, 0],
            // ECX: LAHF/SAHF in long mode. EDX: SYSCALL, NX, LM.
            0x8000_0001 => [0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29)],
            _ => [0; 4],
        }
    }

    fn take_interrupt(&mut self) -> Option<u8> {
        None
    }

    fn interrupt_pending(&self) -> bool {
        false
    }

    fn halt(&mut self) {}
}

/// Where [`FlatCpu`] keeps its system structures. Everything below [`layout::FREE`] belongs to
/// the kit; tests may use any RAM from there up.
pub mod layout {
    /// The GDT (see the selector constants).
    pub const GDT: u64 = 0x1000;
    /// The 64-bit IDT: 256 16-byte gates.
    pub const IDT: u64 = 0x2000;
    /// Exception handler stubs: vector `v`'s handler is a `hlt` at `HANDLERS + 16 * v`.
    pub const HANDLERS: u64 = 0x3000;
    /// The 64-bit TSS (RSP0 = [`KERNEL_STACK_TOP`]).
    pub const TSS: u64 = 0x4000;
    /// Stack used when an exception interrupts CPL 3 code.
    pub const KERNEL_STACK_TOP: u64 = 0x8000;
    /// PML4; the PDPT follows at `+0x1000` and the page directories after it.
    pub const PML4: u64 = 0x1_0000;
    /// The first address the kit does not use.
    pub const FREE: u64 = 0x10_0000;

    /// Kernel code, 64-bit.
    pub const KERNEL_CS: u16 = 0x08;
    /// Kernel data/stack.
    pub const KERNEL_DS: u16 = 0x10;
    /// User data/stack (RPL 3).
    pub const USER_DS: u16 = 0x1b;
    /// User code, 64-bit (RPL 3).
    pub const USER_CS: u16 = 0x23;
    /// The TSS descriptor (16 bytes).
    pub const TSS_SEL: u16 = 0x28;
}

/// The general-purpose registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (encoding order).
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

/// An exception the CPU took and stopped on (its handler stub executed `hlt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExceptionInfo {
    pub vector: u8,
    /// The error code, for the vectors that push one.
    pub error_code: Option<u64>,
    /// RIP saved in the interrupt frame (the faulting instruction for faults).
    pub rip: u64,
    /// CR2 at the time (meaningful for #PF).
    pub cr2: u64,
}

/// An anonymous host mapping used as guest RAM.
struct HostRam {
    ptr: *mut u8,
    len: usize,
}

impl HostRam {
    fn new(len: usize) -> HostRam {
        let p = crate::memory::map_anonymous(len)
            .unwrap_or_else(|| panic!("testkit: cannot map {len} bytes of guest RAM"));
        HostRam {
            ptr: p.as_ptr(),
            len,
        }
    }
}

/// A CPU in 64-bit mode over `ram_size` bytes of RAM at guest physical address 0, identity
/// mapped (linear = physical) read/write/user with 2 MiB pages, with a flat GDT, a TSS and an
/// IDT whose every vector stops the CPU (see [`FlatCpu::exception`]). Interrupts are disabled
/// and there are no devices ([`TestMachine`]).
///
/// The RAM stays mapped as long as the `FlatCpu` lives; it is unmapped on drop unless some
/// clone of `cpu.mem` is still alive, in which case it is leaked rather than left dangling.
pub struct FlatCpu {
    /// The emulated CPU; free to inspect and change directly.
    pub cpu: Cpu,
    ram: HostRam,
}

/// Default RAM size of [`FlatCpu::new`].
pub const DEFAULT_RAM: usize = 64 << 20;

impl Default for FlatCpu {
    fn default() -> Self {
        Self::new()
    }
}

impl FlatCpu {
    /// 64 MiB of RAM, CPL 0, RIP at [`layout::FREE`], RSP at the top of RAM.
    pub fn new() -> FlatCpu {
        Self::with_ram(DEFAULT_RAM)
    }

    /// `ram_size` bytes of RAM (a multiple of 2 MiB, at least 2 MiB, at most 512 GiB).
    pub fn with_ram(ram_size: usize) -> FlatCpu {
        assert!(
            ram_size >= 2 << 20 && ram_size & ((2 << 20) - 1) == 0,
            "testkit: RAM must be a multiple of 2 MiB"
        );
        assert!(
            (ram_size as u64) <= 512 << 30,
            "testkit: at most 512 GiB of RAM"
        );
        let ram = HostRam::new(ram_size);
        let mut mem = PhysMem::default();
        mem.add(RamRegion {
            gpa: 0,
            len: ram_size as u64,
            host: ram.ptr,
        });
        let cpu = Cpu::new(Arc::new(mem), Box::new(TestMachine::new()));
        let mut c = FlatCpu { cpu, ram };
        c.build_tables();
        c.reset_state();
        c
    }

    /// Guest RAM size in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram.len as u64
    }

    fn put_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }

    fn build_tables(&mut self) {
        use layout::*;
        // Page tables: PML4[0] -> PDPT; PDPT[i] -> PD i; 2 MiB leaves.
        const P: u64 = 1;
        const W: u64 = 2;
        const U: u64 = 4;
        const PS: u64 = 0x80;
        let pdpt = PML4 + 0x1000;
        let n_2m = self.ram.len as u64 >> 21;
        let n_pd = n_2m.div_ceil(512);
        assert!(
            PML4 + 0x2000 + n_pd * 0x1000 <= FREE,
            "testkit: page tables do not fit below FREE"
        );
        self.put_u64(PML4, pdpt | P | W | U);
        for i in 0..n_pd {
            let pd = pdpt + 0x1000 * (i + 1);
            self.put_u64(pdpt + 8 * i, pd | P | W | U);
        }
        for j in 0..n_2m {
            let pd = pdpt + 0x1000 * (j / 512 + 1);
            self.put_u64(pd + 8 * (j % 512), (j << 21) | P | W | U | PS);
        }

        // GDT: null, kernel code64, kernel data, user data, user code64, TSS.
        let gdt: [u64; 5] = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00cf_f300_0000_ffff,
            0x00af_fb00_0000_ffff,
        ];
        for (i, d) in gdt.iter().enumerate() {
            self.put_u64(GDT + 8 * i as u64, *d);
        }
        let tss_lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | ((TSS >> 24) & 0xff) << 56;
        self.put_u64(GDT + u64::from(TSS_SEL), tss_lo);
        self.put_u64(GDT + u64::from(TSS_SEL) + 8, TSS >> 32);
        // TSS: RSP0.
        self.put_u64(TSS + 4, KERNEL_STACK_TOP);

        // IDT: interrupt gates, DPL 3 (so INT n works from user code), to `hlt` stubs.
        for v in 0..256u64 {
            let h = HANDLERS + 16 * v;
            let lo = (h & 0xffff)
                | (u64::from(KERNEL_CS) << 16)
                | (0x8e_u64 << 40)
                | (3 << 45)
                | ((h >> 16) & 0xffff) << 48;
            self.put_u64(IDT + 16 * v, lo);
            self.put_u64(IDT + 16 * v + 8, h >> 32);
            // hlt; jmp back to the hlt.
            self.write(h, &[0xf4, 0xeb, 0xfd]);
        }
    }

    /// Puts the CPU back in the initial state: CPL 0 long mode, IF = 0, registers zero, RIP at
    /// [`layout::FREE`], RSP at the top of RAM, XMM registers zero, not halted.
    pub fn reset_state(&mut self) {
        use layout::*;
        let s = &mut self.cpu.s;
        s.cr0 = cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG;
        s.cr4 = cr4::PAE | cr4::PGE | cr4::OSFXSR | cr4::OSXMMEXCPT;
        s.cr3 = PML4;
        s.efer = efer::SCE | efer::LME | efer::LMA | efer::NXE;
        s.gdtr = Dtr {
            base: GDT,
            limit: 0x37,
        };
        s.idtr = Dtr {
            base: IDT,
            limit: 0xfff,
        };
        s.tr = Seg {
            selector: TSS_SEL,
            base: TSS,
            limit: 0x67,
            attr: 0x8b,
        };
        s.gpr = [0; 16];
        s.gpr[RSP] = self.ram.len as u64;
        s.rip = FREE;
        s.rflags = flags::FIXED1;
        s.fpu = Default::default();
        self.cpu.halted = false;
        self.set_user_mode(false);
        self.cpu.flush_tlb();
    }

    /// Switches CS/SS (and the data segments) between CPL 0 and CPL 3 flat 64-bit segments.
    pub fn set_user_mode(&mut self, user: bool) {
        use layout::*;
        let (cs, ds) = if user {
            (USER_CS, USER_DS)
        } else {
            (KERNEL_CS, KERNEL_DS)
        };
        let dpl: u16 = if user { 3 << 5 } else { 0 };
        let code = Seg {
            selector: cs,
            base: 0,
            limit: 0xffff_ffff,
            attr: 0xa09b | dpl,
        };
        let data = Seg {
            selector: ds,
            base: 0,
            limit: 0xffff_ffff,
            attr: 0xc093 | dpl,
        };
        let s = &mut self.cpu.s;
        s.seg[CS] = code;
        for i in [ES, SS, DS, FS, GS] {
            s.seg[i] = data;
        }
    }

    /// Copies `bytes` to `addr` and points RIP at it.
    pub fn load_code(&mut self, addr: u64, bytes: &[u8]) {
        self.write(addr, bytes);
        self.cpu.s.rip = addr;
        self.cpu.halted = false;
    }

    /// Copies `bytes` into guest RAM at physical (= linear) address `addr`. (A plain copy: do
    /// not race it with vCPU threads running on the same RAM.)
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        let p = self.host_range(addr, bytes.len());
        // SAFETY: host_range checked that the whole range is this FlatCpu's RAM.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    }

    fn host_range(&self, addr: u64, len: usize) -> *mut u8 {
        match self.cpu.mem.host_ptr(addr, len as u64) {
            Some(p) => p,
            None => panic!("testkit: {len} bytes at {addr:#x} are outside RAM"),
        }
    }

    /// Reads `len` bytes of guest RAM at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_into(addr, &mut v);
        v
    }

    /// Reads guest RAM at `addr` into `buf`.
    pub fn read_into(&self, addr: u64, buf: &mut [u8]) {
        let p = self.host_range(addr, buf.len());
        // SAFETY: host_range checked that the whole range is this FlatCpu's RAM.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
    }

    /// Reads a little-endian u64 at `addr`.
    pub fn read_u64(&self, addr: u64) -> u64 {
        let mut b = [0; 8];
        self.read_into(addr, &mut b);
        u64::from_le_bytes(b)
    }

    /// Sets the GPRs, RIP and RFLAGS (bit 1 is forced on) and leaves the HLT state.
    pub fn set_regs(&mut self, r: &Regs) {
        self.cpu.s.gpr = r.gpr;
        self.cpu.s.rip = r.rip;
        self.cpu.s.rflags = r.rflags | flags::FIXED1;
        self.cpu.halted = false;
    }

    /// The GPRs, RIP and RFLAGS.
    pub fn regs(&self) -> Regs {
        Regs {
            gpr: self.cpu.s.gpr,
            rip: self.cpu.s.rip,
            rflags: self.cpu.s.rflags,
        }
    }

    /// XMM register `i`.
    pub fn xmm(&self, i: usize) -> [u8; 16] {
        self.cpu.s.fpu.xmm[i]
    }

    /// Sets XMM register `i`.
    pub fn set_xmm(&mut self, i: usize, v: [u8; 16]) {
        self.cpu.s.fpu.xmm[i] = v;
    }

    /// Runs up to `n` instructions. An exception counts as no instruction, but its handler's
    /// `hlt` counts as one: after `step(1)` on a faulting instruction, [`FlatCpu::exception`]
    /// tells what happened. A CPU stopped in a handler stays stopped (`RunExit::Dead`).
    pub fn step(&mut self, n: u64) -> RunExit {
        self.cpu.run(n)
    }

    /// If the CPU stopped in an exception handler stub: which exception, from the frame the CPU
    /// pushed. `None` while running normal code.
    pub fn exception(&self) -> Option<ExceptionInfo> {
        let rip = self.cpu.s.rip;
        let base = layout::HANDLERS;
        if !self.cpu.halted || rip <= base || rip > base + 16 * 256 || (rip - base) % 16 != 1 {
            return None;
        }
        let vector = ((rip - base) / 16) as u8;
        let has_code = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
        let sp = self.cpu.s.gpr[RSP];
        let (error_code, frame) = if has_code {
            (Some(self.read_u64(sp)), sp + 8)
        } else {
            (None, sp)
        };
        Some(ExceptionInfo {
            vector,
            error_code,
            rip: self.read_u64(frame),
            cr2: self.cpu.s.cr2,
        })
    }
}

impl Drop for FlatCpu {
    fn drop(&mut self) {
        // Only unmap when no one else can still reach the RAM through a clone of `cpu.mem`.
        if Arc::strong_count(&self.cpu.mem) == 1 {
            // Replace the CPU's view first so nothing references the mapping while it goes.
            self.cpu.mem = Arc::new(PhysMem::default());
            // SAFETY: the mapping was created by HostRam::new with this length, and the only
            // PhysMem that pointed into it has just been dropped.
            unsafe { libc::munmap(self.ram.ptr.cast(), self.ram.len) };
        }
    }
}

// SAFETY: the RAM mapping is owned by the FlatCpu and only accessed through PhysMem, whose
// accesses are atomic or volatile; the pointer is never aliased mutably outside it.
unsafe impl Send for HostRam {}
