//! Builds the freestanding test guests in `guests/` (C + GNU assembly) with the system
//! gcc/ld/objcopy into OUT_DIR: `ftg-bzImage` (Linux boot protocol) and `ftg-pvh.elf` (PVH ELF).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const LOAD_ADDR: u64 = 0x10_0000;
const SOURCES: &[&str] = &[
    "ftg.h", "head.S", "main.c", "setup.S", "link.ld", "setup.ld",
];

const CFLAGS: &[&str] = &[
    "-m64",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-O2",
    "-fno-stack-protector",
    "-fno-builtin",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-jump-tables",
    "-Wall",
    "-Wextra",
];

fn tool(var: &str, default: &str) -> String {
    println!("cargo:rerun-if-env-changed={var}");
    env::var(var).unwrap_or_else(|_| default.to_string())
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("test-guests: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "test-guests: {cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn require(prog: &str, what: &str) {
    if Command::new(prog).arg("--version").output().is_err() {
        panic!(
            "test-guests: `{prog}` ({what}) was not found. The freestanding test guests are built \
             with the system C toolchain: install gcc and binutils (e.g. `apt-get install gcc \
             binutils`), or point {} at them.",
            "FTG_CC / FTG_LD / FTG_OBJCOPY / FTG_OBJDUMP"
        );
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// End of the loaded image (including .bss) from the ELF64 program headers.
fn image_end(elf: &[u8]) -> u64 {
    assert_eq!(&elf[0..4], b"\x7fELF", "test-guests: not an ELF file");
    let phoff = u64_at(elf, 0x20) as usize;
    let phentsize = u16_at(elf, 0x36) as usize;
    let phnum = u16_at(elf, 0x38) as usize;
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32_at(elf, ph) == 1) // PT_LOAD
        .map(|ph| u64_at(elf, ph + 0x18) + u64_at(elf, ph + 0x28)) // p_paddr + p_memsz
        .max()
        .expect("test-guests: no PT_LOAD segment")
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let src = manifest.join("../../guests");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=build.rs");
    for s in SOURCES {
        println!("cargo:rerun-if-changed={}", src.join(s).display());
    }

    let cc = tool("FTG_CC", "gcc");
    let ld = tool("FTG_LD", "ld");
    let objcopy = tool("FTG_OBJCOPY", "objcopy");
    let objdump = tool("FTG_OBJDUMP", "objdump");
    require(&cc, "C compiler");
    require(&ld, "linker");
    require(&objcopy, "objcopy");
    require(&objdump, "objdump");

    let obj = |name: &str| out.join(format!("ftg-{name}.o"));
    for (file, o) in [("head.S", "head"), ("main.c", "main"), ("setup.S", "setup")] {
        run(Command::new(&cc)
            .args(CFLAGS)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(src.join(file))
            .arg("-o")
            .arg(obj(o)));
    }

    let elf = out.join("ftg-pvh.elf");
    let ld_common = [
        "-m",
        "elf_x86_64",
        "-nostdlib",
        "-static",
        "--build-id=none",
    ];
    run(Command::new(&ld)
        .args(ld_common)
        .args(["-z", "max-page-size=0x1000", "-z", "noexecstack", "-T"])
        .arg(src.join("link.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(obj("head"))
        .arg(obj("main")));
    let setup_elf = out.join("ftg-setup.elf");
    run(Command::new(&ld)
        .args(ld_common)
        .arg("-T")
        .arg(src.join("setup.ld"))
        .arg("-o")
        .arg(&setup_elf)
        .arg(obj("setup")));

    // PVM's instruction emulator fails on int3 and cmpxchg16b (see DESIGN.md): refuse to ship them.
    let dis = Command::new(&objdump)
        .args(["-d", "--no-show-raw-insn"])
        .arg(&elf)
        .output()
        .expect("test-guests: objdump failed");
    assert!(dis.status.success(), "test-guests: objdump -d failed");
    let dis = String::from_utf8_lossy(&dis.stdout);
    for line in dis.lines() {
        let insn = line.split('\t').nth(1).unwrap_or("").trim();
        let mnemonic = insn.split_whitespace().next().unwrap_or("");
        if mnemonic == "int3" || mnemonic.starts_with("cmpxchg16b") {
            panic!(
                "test-guests: forbidden instruction in the guest (PVM cannot emulate it): {line}"
            );
        }
    }

    let bin = out.join("ftg.bin");
    let setup_bin = out.join("ftg-setup.bin");
    run(Command::new(&objcopy)
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&bin));
    run(Command::new(&objcopy)
        .args(["-O", "binary"])
        .arg(&setup_elf)
        .arg(&setup_bin));

    let elf_bytes = fs::read(&elf).unwrap();
    let kernel = fs::read(&bin).unwrap();
    let mut setup = fs::read(&setup_bin).unwrap();
    let setup_size = (usize::from(setup[0x1f1]) + 1) * 512;
    assert!(
        setup.len() <= setup_size,
        "test-guests: setup code overflows setup_sects"
    );
    setup.resize(setup_size, 0);
    assert_eq!(
        u32_at(&setup, 0x202),
        0x5372_6448,
        "test-guests: bad setup_header"
    );
    let init_size = image_end(&elf_bytes) - LOAD_ADDR;
    let init_size = (init_size + 4095) & !4095;
    let syssize = (kernel.len() as u32).div_ceil(16);
    setup[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    setup[0x260..0x264].copy_from_slice(&(init_size as u32).to_le_bytes());
    let mut bz = setup;
    bz.extend_from_slice(&kernel);
    write_if_changed(&out.join("ftg-bzImage"), &bz);
}

fn write_if_changed(path: &Path, data: &[u8]) {
    if fs::read(path).map(|d| d == data).unwrap_or(false) {
        return;
    }
    fs::write(path, data)
        .unwrap_or_else(|e| panic!("test-guests: writing {}: {e}", path.display()));
}
