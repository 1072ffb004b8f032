//! The host side's unix sockets: the listening socket host clients connect to (with its
//! stale-file handling and clean-up), non-blocking connects to the sockets guest connections
//! go to, and the `CONNECT <port>` line a host client opens with.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::VsockError;

/// Longest `CONNECT <port>` line accepted, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// The unix socket host clients connect to. Removed when dropped, if the file is still the
/// socket this process made.
pub struct Listener {
    pub socket: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, to recognise it at clean-up.
    id: (u64, u64),
}

impl Listener {
    /// Listens on `path`: its directory must exist; a socket file nobody listens on any more
    /// is replaced, a live one or any other kind of file is left alone and refused.
    pub fn bind(path: &Path) -> Result<Listener, VsockError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(VsockError::NoDirectory(path.to_owned()));
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotASocket(path.to_owned()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(VsockError::InUse(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!("vsock: removing the stale socket {}", path.display());
                    std::fs::remove_file(path).map_err(|source| VsockError::Listen {
                        path: path.to_owned(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(VsockError::Listen {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        }
        let err = |source| VsockError::Listen {
            path: path.to_owned(),
            source,
        };
        let socket = UnixListener::bind(path).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        let meta = std::fs::symlink_metadata(path).map_err(err)?;
        Ok(Listener {
            socket,
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where a guest connection to host port `port` goes: `<uds>_<port>`.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(uds.as_os_str());
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects to the unix socket at `path` without blocking: a listener whose backlog is full
/// refuses (`WouldBlock`) instead of stalling the event loop until it accepts.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket() takes no pointers; it returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created here and owned by nothing else; the stream closes
    // it, also when connecting fails below.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un and `len` does not exceed its size (the
    // path is shorter than sun_path and NUL-terminated by the zeroing); connect only reads it.
    let ret = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if ret != 0 {
        // Unix sockets never answer EINPROGRESS: a refusal or a full backlog ends it here.
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// What a host client's first line asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectLine {
    /// No complete line yet.
    Partial,
    /// `CONNECT <port>`; the line took this many bytes (newline included).
    Connect {
        port: u32,
        used: usize,
    },
    Invalid,
}

/// Parses the start of what a host client sent: `CONNECT <port>\n` (a `\r` before the
/// newline is accepted).
pub fn parse_connect_line(buf: &[u8]) -> ConnectLine {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_CONNECT_LINE {
            ConnectLine::Invalid
        } else {
            ConnectLine::Partial
        };
    };
    if nl >= MAX_CONNECT_LINE {
        return ConnectLine::Invalid;
    }
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    let port = line
        .strip_prefix(b"CONNECT ")
        .filter(|d| !d.is_empty() && d.len() <= 10 && d.iter().all(u8::is_ascii_digit))
        .and_then(|d| String::from_utf8(d.to_vec()).ok())
        .and_then(|d| d.parse::<u32>().ok());
    match port {
        Some(port) => ConnectLine::Connect { port, used: nl + 1 },
        None => ConnectLine::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fv-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn connect_lines() {
        assert_eq!(
            parse_connect_line(b"CONNECT 5000\nrest"),
            ConnectLine::Connect {
                port: 5000,
                used: 13
            }
        );
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967295\r\n"),
            ConnectLine::Connect {
                port: u32::MAX,
                used: 20
            }
        );
        assert_eq!(parse_connect_line(b"CONNECT 50"), ConnectLine::Partial);
        for bad in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT 1 2\n",
            b"connect 1\n",
            b"\n",
            &[b'1'; MAX_CONNECT_LINE],
        ] {
            assert_eq!(parse_connect_line(bad), ConnectLine::Invalid, "{bad:?}");
        }
    }

    #[test]
    fn port_paths_append_the_port() {
        assert_eq!(
            port_path(Path::new("/tmp/v.sock"), 1234),
            PathBuf::from("/tmp/v.sock_1234")
        );
    }

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_refused_and_ours_removed_at_the_end() {
        let d = temp_dir("bind");
        let path = d.join("v.sock");
        // Stale: the listener is gone, its file is not.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let l = Listener::bind(&path).unwrap();
        assert!(matches!(Listener::bind(&path), Err(VsockError::InUse(_))));
        drop(l);
        assert!(!path.exists(), "the socket file is removed on drop");

        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            Listener::bind(&path),
            Err(VsockError::NotASocket(_))
        ));
        assert!(path.exists());
        assert!(matches!(
            Listener::bind(&d.join("missing/v.sock")),
            Err(VsockError::NoDirectory(_))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn nonblocking_connects_reach_listeners_and_report_refusals() {
        let d = temp_dir("connect");
        let path = d.join("s_1");
        let l = UnixListener::bind(&path).unwrap();
        let s = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        std::io::Write::write_all(&mut &s, b"hi").unwrap();
        let mut b = [0u8; 2];
        std::io::Read::read_exact(&mut peer, &mut b).unwrap();
        assert_eq!(&b, b"hi");
        let e = connect_nonblocking(&d.join("nobody")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let long = d.join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
