//! A Linux tap interface with virtio-net headers: frames cross it with the same 12-byte
//! `virtio_net_hdr_v1` the guest uses, so checksum and segmentation offloads pass straight
//! through between the guest and the host's network stack.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

/// Length of the virtio-net header on the tap (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Offloads the tap may hand us (frames the guest can take without the host finishing them).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    #[error(
        "cannot attach to tap '{name}': {source}; create it first (ip tuntap add dev {name} \
         mode tap vnet_hdr user $USER) or run with CAP_NET_ADMIN"
    )]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap '{name}' does not take virtio-net headers")]
    VnetHdr {
        name: String,
        #[source]
        source: io::Error,
    },
}

pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Attaches to the tap `name`, creating it (for the life of this process) if it does not
    /// exist and the process may; non-blocking, with virtio-net headers.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back) one `struct ifreq`, which `req` is laid
        // out as and outlives the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(TapError::VnetHdr {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.set_offload(0).map_err(|source| TapError::VnetHdr {
            name: name.to_string(),
            source,
        })?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloaded frames (`TUN_F_*`) the tap may deliver.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is involved.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (header first) into `iovs`; WouldBlock when there is none.
    ///
    /// # Safety
    /// Every iovec must describe writable memory that stays valid during the call.
    pub unsafe fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the buffers; the count is the slice's length.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends one frame (header first) gathered from `iovs`.
    ///
    /// # Safety
    /// Every iovec must describe readable memory that stays valid during the call.
    pub unsafe fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the buffers; the count is the slice's length.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
