//! A raw disk image file: opening and locking it, and the I/O a block request needs, straight
//! between the file and guest memory (preadv/pwritev on the guest's pages, no bounce buffer).
//! Reads and writes can also be asked to happen only if they need not wait for the disk
//! ([`Wait::No`]: `RWF_NOWAIT`), which the emulator's vCPUs use to serve what the host's page
//! cache holds.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::Permissions;

use hypervisor::GuestMemoryMmap;

use super::request::{Segment, SECTOR_SIZE};

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {path} is in use by another VM (it holds a lock on it); stop that VM, \
         or attach the image read-only to both"
    )]
    Locked { path: PathBuf },
    #[error("cannot lock disk image {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("disk image {path} is smaller than one sector (512 bytes)")]
    Empty { path: PathBuf },
}

pub struct Disk {
    file: File,
    /// Size in sectors (a partial last sector is not visible to the guest).
    sectors: u64,
    read_only: bool,
    /// The image lives in memory (tmpfs, a memfd): nothing it does waits for a disk, so
    /// [`Wait::No`] transfers are plain ones (such files refuse `RWF_NOWAIT` anyway).
    in_memory: bool,
    /// The file system refused a buffered write that must not wait (`EOPNOTSUPP`: ext4
    /// does, XFS and btrfs do not), so [`Wait::No`] writes are plain ones (see [`Wait`]).
    writes_wait: AtomicBool,
    /// Likewise for reads, which then always wait for the event loop: a read may need the
    /// disk.
    reads_wait: AtomicBool,
}

/// Whether an I/O may wait for the host (its disk, a lock, writeback).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    Yes,
    /// Only if it can complete without waiting for the disk; otherwise
    /// [`io::ErrorKind::WouldBlock`], having maybe moved part of the data (harmless: the caller
    /// repeats the whole request). A read must find its data in the page cache. A write goes
    /// into the page cache; where the file system cannot say whether it would wait (ext4), it
    /// is made anyway: a buffered write waits only when the host throttles writers with too
    /// much dirty data, never for the disk's latency.
    No,
}

/// Whether `file` lives in memory (tmpfs, which memfds also use, or ramfs).
fn in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the struct it is given when it succeeds.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: filled by the successful call above.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // `f_type` is not i64 on every architecture.
    let kind = st.f_type as i64;
    matches!(kind, TMPFS_MAGIC | RAMFS_MAGIC)
}

impl Disk {
    /// Opens `path` (read-only or read-write) and takes a lock on it: exclusive for a writable
    /// disk, shared for a read-only one, so no two VMs ever write the same image and no
    /// writer changes an image another VM reads.
    pub fn open(path: &Path, read_only: bool) -> Result<Disk, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let len = if meta.file_type().is_block_device() {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if r < 0 {
                return Err(open_err(io::Error::last_os_error()));
            }
            size
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(DiskError::NotAFile {
                path: path.to_owned(),
            });
        };
        let op = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DiskError::Locked {
                    path: path.to_owned(),
                }
            } else {
                DiskError::Lock {
                    path: path.to_owned(),
                    source: e,
                }
            });
        }
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Err(DiskError::Empty {
                path: path.to_owned(),
            });
        }
        let in_memory = in_memory(&file);
        Ok(Disk {
            file,
            sectors,
            read_only,
            in_memory,
            writes_wait: AtomicBool::new(false),
            reads_wait: AtomicBool::new(false),
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether `sector .. + len bytes` lies on the disk.
    pub fn in_range(&self, sector: u64, len: u64) -> bool {
        let Some(end) = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|s| s.checked_add(len))
        else {
            return false;
        };
        end <= self.sectors * SECTOR_SIZE
    }

    /// Reads from the disk at byte `offset` into the guest buffers `data`.
    pub fn read(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[Segment],
        wait: Wait,
    ) -> io::Result<()> {
        self.transfer(mem, offset, data, false, wait)
    }

    /// Writes the guest buffers `data` to the disk at byte `offset`.
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[Segment],
        wait: Wait,
    ) -> io::Result<()> {
        self.transfer(mem, offset, data, true, wait)
    }

    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        mut offset: u64,
        data: &[Segment],
        write: bool,
        wait: Wait,
    ) -> io::Result<()> {
        let refused = if write {
            &self.writes_wait
        } else {
            &self.reads_wait
        };
        let mut nowait = wait == Wait::No && !self.in_memory;
        if nowait && refused.load(Ordering::Relaxed) {
            if !write {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            nowait = false;
        }
        // Reading the disk writes guest memory, and the other way round.
        let access = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let mut iovs = Vec::with_capacity(data.len());
        crate::guest_iovecs(
            mem,
            data.iter().map(|s| (s.addr, s.len as usize)),
            access,
            &mut iovs,
        )?;
        let mut iovs = &mut iovs[..];
        while !iovs.is_empty() {
            let n = iovs.len().min(libc::UIO_MAXIOV as usize);
            let fd = self.file.as_raw_fd();
            let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
            // SAFETY: every iovec points into guest memory that `mem` keeps mapped for the
            // duration of the call (checked by `get_slices`); the kernel reads or writes at
            // most `iov_len` bytes of each.
            let done = unsafe {
                if write {
                    libc::pwritev2(fd, iovs.as_ptr(), n as libc::c_int, offset as i64, flags)
                } else {
                    libc::preadv2(fd, iovs.as_ptr(), n as libc::c_int, offset as i64, flags)
                }
            };
            if done < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EOPNOTSUPP) if nowait => {
                        refused.store(true, Ordering::Relaxed);
                        if !write {
                            return Err(io::ErrorKind::WouldBlock.into());
                        }
                        nowait = false;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            if done == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            if nowait && (done as usize) < iovs[..n].iter().map(|v| v.iov_len).sum() {
                // Part of it was at hand (a page cache miss further on): all of it waits.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            offset += done as u64;
            let mut left = done as usize;
            while let Some(first) = iovs.first_mut() {
                if left < first.iov_len {
                    // SAFETY: advancing inside the same buffer, by less than its length.
                    first.iov_base = unsafe { first.iov_base.cast::<u8>().add(left) }.cast();
                    first.iov_len -= left;
                    break;
                }
                left -= first.iov_len;
                iovs = &mut iovs[1..];
            }
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset` (the range reads as zeroes afterwards).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zeroes `len` bytes at `offset`, deallocating them if `unmap`.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // The file system cannot: write the zeroes.
                let zeroes = vec![0u8; 1 << 16];
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(zeroes.len() as u64) as usize;
                    std::os::unix::fs::FileExt::write_all_at(
                        &self.file,
                        &zeroes[..n],
                        offset + at,
                    )?;
                    at += n as u64;
                }
                Ok(())
            }
            r => r,
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_image_is_locked_against_a_second_open() {
        let dir = std::env::temp_dir().join(format!("fv-disk-lock-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 4096]).unwrap();
        let first = Disk::open(&dir, false).unwrap();
        assert_eq!(first.sectors(), 8);
        assert!(matches!(
            Disk::open(&dir, false),
            Err(DiskError::Locked { .. })
        ));
        assert!(matches!(
            Disk::open(&dir, true),
            Err(DiskError::Locked { .. })
        ));
        drop(first);
        let a = Disk::open(&dir, true).unwrap();
        let b = Disk::open(&dir, true).unwrap();
        assert!(matches!(
            Disk::open(&dir, false),
            Err(DiskError::Locked { .. })
        ));
        drop((a, b));
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn missing_and_empty_images_are_refused() {
        assert!(matches!(
            Disk::open(Path::new("/nonexistent/disk.img"), true),
            Err(DiskError::Open { .. })
        ));
        let p = std::env::temp_dir().join(format!("fv-disk-empty-{}", std::process::id()));
        std::fs::write(&p, b"abc").unwrap();
        assert!(matches!(Disk::open(&p, true), Err(DiskError::Empty { .. })));
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(
            Disk::open(Path::new("/tmp"), true),
            Err(DiskError::Open { .. } | DiskError::NotAFile { .. })
        ));
    }

    #[test]
    fn ranges_past_the_end_are_out() {
        let p = std::env::temp_dir().join(format!("fv-disk-range-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 1024]).unwrap();
        let d = Disk::open(&p, true).unwrap();
        assert!(d.in_range(0, 1024));
        assert!(d.in_range(1, 512));
        assert!(!d.in_range(1, 1024));
        assert!(!d.in_range(u64::MAX, 512));
        std::fs::remove_file(&p).unwrap();
    }
}
