//! Loading a kernel and initrd, and the information block each entry protocol hands it:
//! `boot_params` (the zero page) for the Linux protocol, `hvm_start_info` for PVH.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use hypervisor::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::EntryProtocol;
use crate::e820::E820Entry;
use crate::layout::{CMDLINE_START, HIMEM_START, MMIO_HOLE_START, PVH_INFO_START, ZERO_PAGE_START};

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` for a boot loader with no assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `xloadflags`: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags`: the initrd may live above 4 GiB.
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// Offset of the 64-bit entry in the loaded protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 introduced `xloadflags`, needed to know there is a 64-bit entry.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// `initrd_addr_max` of kernels that predate the field.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    #[error("not a kernel: expected a bzImage or an ELF vmlinux ({0})")]
    NotAKernel(String),
    #[error(
        "the bzImage uses boot protocol {0:#x}; Ferrovisor needs 2.12 or newer with a 64-bit entry"
    )]
    NoLongModeEntry(u16),
    #[error("the kernel needs {needed_mib} MiB of memory to start; give the guest more memory")]
    KernelTooBig { needed_mib: u64 },
    #[error("the initrd ({size_mib} MiB) does not fit in guest memory below {limit:#x} above the kernel; give the guest more memory or use a smaller initrd")]
    InitrdTooBig { size_mib: u64, limit: u64 },
    #[error("cannot write the {0} to guest memory")]
    WriteGuest(&'static str),
}

/// Where and how the kernel was loaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub protocol: EntryProtocol,
    pub entry: GuestAddress,
    /// First byte after the loaded image (and, for a bzImage, its in-place decompression).
    pub end: GuestAddress,
    /// The bzImage setup header (Linux protocol only).
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// The highest address the kernel accepts for the end of the initrd.
    fn initrd_addr_max(&self) -> u64 {
        match self.setup_header {
            Some(h) if h.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0 => u64::MAX,
            Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
            Some(_) => DEFAULT_INITRD_ADDR_MAX,
            None => u64::MAX,
        }
    }
}

fn low_ram_end(mem_size_bytes: u64) -> u64 {
    mem_size_bytes.min(MMIO_HOLE_START.0)
}

/// Loads a bzImage or ELF vmlinux into guest memory at 1 MiB.
///
/// An ELF with a PVH note is entered through PVH; any other ELF through the Linux 64-bit entry
/// at its entry address; a bzImage through its 64-bit entry point.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_size_bytes: u64,
    kernel: &mut File,
) -> Result<LoadedKernel, LinuxBootError> {
    let mut magic = [0u8; 4];
    kernel
        .read_exact(&mut magic)
        .map_err(|_| LinuxBootError::NotAKernel("the file is too short".into()))?;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(LinuxBootError::ReadKernel)?;
    let file_len = kernel.metadata().map_err(LinuxBootError::ReadKernel)?.len();

    if magic == ELF_MAGIC {
        if HIMEM_START.0 + file_len > low_ram_end(mem_size_bytes) {
            return Err(LinuxBootError::KernelTooBig {
                needed_mib: (HIMEM_START.0 + file_len).div_ceil(1 << 20),
            });
        }
        let loaded = Elf::load(mem, None, kernel, Some(HIMEM_START))
            .map_err(|e| LinuxBootError::NotAKernel(format!("ELF loader: {e}")))?;
        let (protocol, entry) = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (EntryProtocol::Pvh, addr),
            _ => (EntryProtocol::Linux64, loaded.kernel_load),
        };
        return Ok(LoadedKernel {
            protocol,
            entry,
            end: GuestAddress(loaded.kernel_end),
            setup_header: None,
        });
    }

    // A bzImage: check the header before loading so the errors say what is wrong.
    let mut header = [0u8; 0x1f1 + std::mem::size_of::<setup_header>()];
    kernel.read_exact(&mut header).map_err(|_| {
        LinuxBootError::NotAKernel("no ELF magic and too short for a bzImage".into())
    })?;
    let hdr_magic =
        u32::from_le_bytes([header[0x202], header[0x203], header[0x204], header[0x205]]);
    if hdr_magic != HDRS_MAGIC {
        return Err(LinuxBootError::NotAKernel(
            "neither ELF magic nor the bzImage \"HdrS\" signature".into(),
        ));
    }
    let version = u16::from_le_bytes([header[0x206], header[0x207]]);
    let xloadflags = u16::from_le_bytes([header[0x236], header[0x237]]);
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxBootError::NoLongModeEntry(version));
    }
    let init_size = u64::from(u32::from_le_bytes([
        header[0x260],
        header[0x261],
        header[0x262],
        header[0x263],
    ]));
    let needed = HIMEM_START.0 + init_size.max(file_len);
    if needed > low_ram_end(mem_size_bytes) {
        return Err(LinuxBootError::KernelTooBig {
            needed_mib: needed.div_ceil(1 << 20),
        });
    }
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(LinuxBootError::ReadKernel)?;
    let loaded = BzImage::load(mem, Some(HIMEM_START), kernel, Some(HIMEM_START))
        .map_err(|e| LinuxBootError::NotAKernel(format!("bzImage loader: {e}")))?;
    Ok(LoadedKernel {
        protocol: EntryProtocol::Linux64,
        entry: GuestAddress(loaded.kernel_load.0 + STARTUP_64_OFFSET),
        end: GuestAddress(
            loaded.kernel_load.0 + init_size.max(loaded.kernel_end - loaded.kernel_load.0),
        ),
        setup_header: loaded.setup_header,
    })
}

/// Chooses where the initrd goes: as high in low RAM as the kernel allows, page-aligned, above
/// the kernel.
pub fn place_initrd(
    mem_size_bytes: u64,
    kernel: &LoadedKernel,
    initrd_len_bytes: u64,
) -> Result<GuestAddress, LinuxBootError> {
    let limit = low_ram_end(mem_size_bytes).min(kernel.initrd_addr_max().saturating_add(1));
    let too_big = || LinuxBootError::InitrdTooBig {
        size_mib: initrd_len_bytes.div_ceil(1 << 20),
        limit,
    };
    let start = limit.checked_sub(initrd_len_bytes).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if start < kernel.end.0 {
        return Err(too_big());
    }
    Ok(GuestAddress(start))
}

/// The initrd as placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct InitrdRegion {
    pub addr: GuestAddress,
    pub len_bytes: u64,
}

/// Writes the command line (NUL-terminated) at its fixed address.
pub fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &std::ffi::CStr,
) -> Result<(), LinuxBootError> {
    mem.write_slice(cmdline.to_bytes_with_nul(), CMDLINE_START)
        .map_err(|_| LinuxBootError::WriteGuest("command line"))
}

/// Writes the zero page for the Linux 64-bit entry; returns its address (for rsi).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len_bytes: usize,
    initrd: Option<InitrdRegion>,
    e820: &[E820Entry],
    rsdp: GuestAddress,
) -> Result<GuestAddress, LinuxBootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline_len_bytes as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.ext_ramdisk_image = (initrd.addr.0 >> 32) as u32;
        params.hdr.ramdisk_size = initrd.len_bytes as u32;
        params.ext_ramdisk_size = (initrd.len_bytes >> 32) as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr.0,
            size: entry.len_bytes,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, ZERO_PAGE_START),
        mem,
    )
    .map_err(|_| LinuxBootError::WriteGuest("zero page"))?;
    Ok(ZERO_PAGE_START)
}

/// Writes `hvm_start_info`, its memory map and module list for the PVH entry; returns its
/// address (for ebx).
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdRegion>,
    e820: &[E820Entry],
    rsdp: GuestAddress,
) -> Result<GuestAddress, LinuxBootError> {
    let memmap_addr = GuestAddress(PVH_INFO_START.0 + std::mem::size_of::<hvm_start_info>() as u64);
    let modlist_addr = GuestAddress(
        memmap_addr.0 + (e820.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
    );
    let mut info = hvm_start_info {
        magic: PVH_START_INFO_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START.0,
        rsdp_paddr: rsdp.0,
        memmap_paddr: memmap_addr.0,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&info, PVH_INFO_START);
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr.0,
            size: e.len_bytes,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    params.set_sections::<hvm_memmap_table_entry>(&memmap, memmap_addr);
    if let Some(initrd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr.0;
        params = BootParams::new::<hvm_start_info>(&info, PVH_INFO_START);
        params.set_sections::<hvm_memmap_table_entry>(&memmap, memmap_addr);
        let module = hvm_modlist_entry {
            paddr: initrd.addr.0,
            size: initrd.len_bytes,
            ..Default::default()
        };
        params.set_modules::<hvm_modlist_entry>(&[module], modlist_addr);
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|_| LinuxBootError::WriteGuest("PVH start info"))?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e820::e820_map;

    const MIB: u64 = 1 << 20;

    fn bz_kernel(initrd_addr_max: u32, xloadflags: u16) -> LoadedKernel {
        let hdr = setup_header {
            initrd_addr_max,
            xloadflags,
            ..Default::default()
        };
        LoadedKernel {
            protocol: EntryProtocol::Linux64,
            entry: GuestAddress(0x100200),
            end: GuestAddress(0x100000 + 20 * MIB),
            setup_header: Some(hdr),
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let k = bz_kernel(0x7fff_ffff, 0);
        let addr = place_initrd(128 * MIB, &k, 10 * MIB + 5).unwrap();
        assert_eq!(addr.0 % PAGE_SIZE, 0);
        assert!(addr.0 + 10 * MIB + 5 <= 128 * MIB);
        assert!(addr.0 + 10 * MIB + 5 > 128 * MIB - PAGE_SIZE);
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let k = bz_kernel(0x37ff_ffff, 0);
        let addr = place_initrd(2048 * MIB, &k, MIB).unwrap();
        assert!(addr.0 + MIB <= 0x3800_0000);
    }

    #[test]
    fn initrd_stays_below_the_mmio_hole() {
        let k = bz_kernel(0, XLF_CAN_BE_LOADED_ABOVE_4G);
        let addr = place_initrd(8192 * MIB, &k, MIB).unwrap();
        assert!(addr.0 + MIB <= MMIO_HOLE_START.0);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        let k = bz_kernel(0x7fff_ffff, 0);
        assert!(matches!(
            place_initrd(32 * MIB, &k, 16 * MIB),
            Err(LinuxBootError::InitrdTooBig { .. })
        ));
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_e820_and_rsdp() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = e820_map(64 * MIB);
        let initrd = InitrdRegion {
            addr: GuestAddress(0x300_0000),
            len_bytes: 0x1234,
        };
        let k = bz_kernel(0x7fff_ffff, XLF_KERNEL_64);
        let at =
            write_boot_params(&mem, &k, 42, Some(initrd), &map, GuestAddress(0xe0000)).unwrap();
        let p: boot_params = mem.read_obj(at).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START.0 as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries as usize, map.len());
        assert_eq!({ p.e820_table[3].addr }, map[3].addr.0);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
    }

    #[test]
    fn pvh_start_info_lists_memory_map_and_initrd_module() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = e820_map(64 * MIB);
        let initrd = InitrdRegion {
            addr: GuestAddress(0x300_0000),
            len_bytes: 0x1234,
        };
        let at = write_pvh_start_info(&mem, Some(initrd), &map, GuestAddress(0xe0000)).unwrap();
        let info: hvm_start_info = mem.read_obj(at).unwrap();
        assert_eq!(info.magic, PVH_START_INFO_MAGIC);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!(info.nr_modules, 1);
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!(first.size, map[0].len_bytes);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));
    }
}
