//! A [`FrameIo`] over one end of a non-blocking `socketpair(AF_UNIX, SOCK_SEQPACKET)`, for
//! tests and fuzzing: no tap, no root. The other end plays the host network.
//!
//! A SEQPACKET socket keeps record boundaries as a tap keeps frame boundaries: one `writev`
//! is one record, one receive returns at most one record. Receiving a record into buffers too
//! small for it copies what fits and discards the rest of the record (the next receive gets the
//! next record), as a tap does with a frame. The one difference is what the call returns: a
//! tap's `read` returns the frame's *full* length even when it copied less (`tun_put_user`
//! returns the total), while a plain `readv` on a socket returns the bytes copied. [`SeqPacket`]
//! receives with `MSG_TRUNC`, which for AF_UNIX datagram and seqpacket sockets makes `recvmsg`
//! return the record's full length, so the device sees exactly what it would see on a tap.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use super::FrameIo;

/// One end of a SEQPACKET socket pair.
pub struct SeqPacket {
    fd: OwnedFd,
    name: String,
    offload: AtomicU32,
}

impl SeqPacket {
    /// A connected pair, both ends non-blocking: `(device end, peer end)`.
    pub fn pair(name: &str) -> io::Result<(SeqPacket, SeqPacket)> {
        let mut fds = [0 as libc::c_int; 2];
        let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: socketpair writes two descriptors into the two-element array, which
        // outlives the call.
        if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = |fd, name: String| SeqPacket {
            // SAFETY: `fd` was just created by socketpair and is owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            name,
            offload: AtomicU32::new(0),
        };
        Ok((
            end(fds[0], name.to_string()),
            end(fds[1], format!("{name}-peer")),
        ))
    }

    /// Sends one record (the peer side: a frame for the guest, header first).
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is readable for its length during the call.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Receives one record into `buf`; returns its full length (more than `buf` if it was
    /// truncated). WouldBlock when there is none.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its length during the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The offloads last set with [`FrameIo::set_offload`].
    pub fn offload(&self) -> u32 {
        self.offload.load(Ordering::Relaxed)
    }

    fn msg(iovs: &[libc::iovec]) -> libc::msghdr {
        // SAFETY: msghdr is plain data for which all zeroes is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_ptr().cast_mut();
        msg.msg_iovlen = iovs.len() as _;
        msg
    }
}

impl FrameIo for SeqPacket {
    unsafe fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let mut msg = Self::msg(iovs);
        // SAFETY: `msg` names the caller's iovecs, which the caller guarantees writable for
        // the call; recvmsg does not keep them.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    unsafe fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let msg = Self::msg(iovs);
        // SAFETY: `msg` names the caller's iovecs, which the caller guarantees readable for
        // the call; MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.offload.store(flags, Ordering::Relaxed);
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for SeqPacket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
