//! Freestanding x86-64 test guests, built from `guests/` by `build.rs` with the system gcc.
//!
//! One program, linked once at 1 MiB, packaged two ways: as a bzImage (Linux boot protocol,
//! 64-bit entry at load address + 0x200) and as a PVH ELF (`XEN_ELFNOTE_PHYS32_ENTRY`). It checks
//! what the VMM gave it and reports on COM1; `guests/README.md` describes the output protocol.

use std::path::Path;

/// The test guest as a Linux bzImage.
pub fn bzimage() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/ftg-bzImage"))
}

/// The test guest as an ELF64 with a PVH entry note (also usable as a 64-bit ELF kernel:
/// its ELF entry point is the Linux 64-bit entry, which expects `rsi` = boot_params).
pub fn pvh_elf() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/ftg-pvh.elf"))
}

/// Guest load address (physical = virtual).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Every line the guest prints starts with this.
pub const LINE_PREFIX: &str = "ftg: ";

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn bzimage_header() {
        let b = std::fs::read(bzimage()).unwrap();
        assert_eq!(u16_at(&b, 0x1fe), 0xaa55);
        assert_eq!(u32_at(&b, 0x202), 0x5372_6448);
        assert_eq!(u16_at(&b, 0x206), 0x020f);
        assert_eq!(b[0x211] & 1, 1, "LOADED_HIGH");
        assert_eq!(u32_at(&b, 0x214), 0x10_0000);
        assert_eq!(u32_at(&b, 0x22c), 0x7fff_ffff);
        assert_eq!(u32_at(&b, 0x230), 0x20_0000);
        assert_eq!(u16_at(&b, 0x236) & 1, 1, "XLF_KERNEL_64");
        assert_eq!(u32_at(&b, 0x238), 4095);
        assert_eq!(u64_at(&b, 0x258), 0x10_0000);
        let setup = (usize::from(b[0x1f1]) + 1) * 512;
        let kernel = b.len() - setup;
        assert!(
            u32_at(&b, 0x260) as usize >= kernel,
            "init_size covers the image"
        );
        assert!(b.len() < 64 * 1024, "image stays small");
    }

    #[test]
    fn pvh_note() {
        let e = std::fs::read(pvh_elf()).unwrap();
        assert_eq!(&e[0..4], b"\x7fELF");
        assert_eq!(e[4], 2, "ELF64");
        assert_eq!(u16_at(&e, 0x12), 62, "x86-64");
        let phoff = u64_at(&e, 0x20) as usize;
        let (phentsize, phnum) = (u16_at(&e, 0x36) as usize, u16_at(&e, 0x38) as usize);
        let mut entry = None;
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            if u32_at(&e, ph) != 4 {
                continue; // PT_NOTE
            }
            let (off, size) = (u64_at(&e, ph + 8) as usize, u64_at(&e, ph + 0x20) as usize);
            let mut p = off;
            while p + 12 <= off + size {
                let (namesz, descsz, ty) = (u32_at(&e, p), u32_at(&e, p + 4), u32_at(&e, p + 8));
                let name = p + 12;
                let desc = name + (namesz as usize).div_ceil(4) * 4;
                if ty == 18 && &e[name..name + 4] == b"Xen\0" {
                    entry = Some(u32_at(&e, desc));
                }
                p = desc + (descsz as usize).div_ceil(4) * 4;
            }
        }
        let entry = entry.expect("XEN_ELFNOTE_PHYS32_ENTRY note");
        assert!(u64::from(entry) > LOAD_ADDR && entry < 0x20_0000);
    }
}
