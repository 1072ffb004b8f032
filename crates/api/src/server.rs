//! The per-VM API server: a unix socket, an accept thread and one short-lived thread per
//! connection, each of which reads one request (bounded in size and time), routes it, calls the
//! handler and writes the reply.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::http::{self, ReadError};
use crate::router;
use crate::types::{ApiError, ApiRequest, ApiResponse};

/// Carries out one request. It runs on a connection thread, possibly on several at once.
pub type Handler = Box<dyn Fn(ApiRequest) -> Result<ApiResponse, ApiError> + Send + Sync>;

/// A request on its way to the VMM thread, with where to send the reply (see [`channel_handler`]).
#[derive(Debug)]
pub struct ApiCall {
    /// The request.
    pub request: ApiRequest,
    /// Where the reply goes; dropping it unanswered makes the client see a 503.
    pub reply: mpsc::Sender<Result<ApiResponse, ApiError>>,
}

/// A [`Handler`] that hands each request to a VMM thread waiting on an mpsc `Receiver`: it sends
/// `wrap(ApiCall)` down `tx`, calls `wake` (say, to write an eventfd the VMM's epoll loop
/// watches; it is called after the send, so the wake-up never comes before the message), and
/// waits for the reply. A closed channel, or a reply sender dropped unanswered, becomes a 503.
pub fn channel_handler<M: Send + 'static>(
    tx: mpsc::Sender<M>,
    wrap: impl Fn(ApiCall) -> M + Send + Sync + 'static,
    wake: impl Fn() + Send + Sync + 'static,
) -> Handler {
    Box::new(move |request| {
        let (reply, answer) = mpsc::channel();
        tx.send(wrap(ApiCall { request, reply })).map_err(|_| {
            ApiError::unavailable("the VMM is gone (it has exited or is shutting down)")
        })?;
        wake();
        answer.recv().unwrap_or_else(|_| {
            Err(ApiError::unavailable(
                "the VMM stopped before answering: check that it is still running",
            ))
        })
    })
}

/// Limits the server applies; [`ServerOptions::default`] suits a VMM.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Time a client has to send its whole request (headers and body) after connecting; one that
    /// takes longer gets a 408 and is disconnected. Also bounds each response write.
    pub request_timeout: Duration,
    /// Connections served at once; one more gets an immediate 503.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            request_timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A live server already listens on the path.
    #[error(
        "another process already serves the API on {0:?}: stop it, or pick another --api-sock path"
    )]
    InUse(PathBuf),
    /// The path exists and is not a socket; the server never deletes such a file.
    #[error("{0:?} exists and is not a socket: remove it, or pick another --api-sock path")]
    NotASocket(PathBuf),
    /// Could not inspect the path, or remove the stale socket there.
    #[error("cannot use {path:?} for the API socket")]
    Path {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot listen on {path:?}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The accept thread could not start.
    #[error("cannot start the API thread")]
    Spawn(#[source] io::Error),
}

/// A running API server. Dropping it stops accepting connections and removes the socket file
/// (if it is still the one the server created); requests already being served run to their end.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    /// Device and inode of the socket file the server created.
    file_id: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on the unix socket `path` with [`ServerOptions::default`] and serves requests with
    /// `handler` on threads of its own.
    pub fn start(path: impl AsRef<Path>, handler: Handler) -> Result<Server, ServerError> {
        Self::start_with(path, handler, ServerOptions::default())
    }

    /// [`Server::start`] with explicit limits.
    ///
    /// A socket file at `path` where nobody listens (left by a VMM that died) is replaced; a live
    /// server there, or a file that is not a socket, is an error. The socket is made
    /// owner-only (mode 0600): whoever can connect controls the VM.
    pub fn start_with(
        path: impl AsRef<Path>,
        handler: Handler,
        options: ServerOptions,
    ) -> Result<Server, ServerError> {
        let path = path.as_ref().to_path_buf();
        let listener = bind(&path)?;
        let meta = fs::metadata(&path).map_err(|source| ServerError::Path {
            path: path.clone(),
            source,
        })?;
        let file_id = (meta.dev(), meta.ino());
        // Best effort: a file system that ignores modes still works, as the umask left it.
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));

        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = thread::Builder::new()
            .name("api-server".into())
            .spawn(move || accept_loop(listener, handler, options, &stop_flag))
            .map_err(|e| {
                let _ = fs::remove_file(&path);
                ServerError::Spawn(e)
            })?;
        Ok(Server {
            path,
            file_id,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread with a connection of our own. If that fails (someone removed
        // the socket file), the thread stays blocked in accept: detach it rather than hang.
        let woke = UnixStream::connect(&self.path).is_ok();
        if let Some(t) = self.thread.take() {
            if woke {
                let _ = t.join();
            }
        }
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let path_error = |source| ServerError::Path {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServerError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::InUse(path.to_path_buf())),
            // Nobody listens: a stale socket left by a process that died.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                fs::remove_file(path).map_err(path_error)?
            }
            Err(e) => return Err(path_error(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(path_error(e)),
    }
    UnixListener::bind(path).map_err(|source| match source.kind() {
        // Another server won the race between our check and our bind.
        io::ErrorKind::AddrInUse => ServerError::InUse(path.to_path_buf()),
        _ => ServerError::Bind {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Decrements the live-connection count when a connection thread ends, however it ends.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: UnixListener,
    handler: Arc<Handler>,
    options: ServerOptions,
    stop: &AtomicBool,
) {
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(_) => {
                // Out of fds or similar: back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if live.fetch_add(1, Ordering::SeqCst) >= options.max_connections {
            live.fetch_sub(1, Ordering::SeqCst);
            refuse(
                &mut stream,
                "the API is serving too many connections: retry shortly",
            );
            continue;
        }
        let slot = ConnectionSlot(Arc::clone(&live));
        let handler = Arc::clone(&handler);
        let spawned = thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(stream, &handler, options.request_timeout);
            });
        if spawned.is_err() {
            // The closure (stream and slot) was dropped with the error; the client sees EOF.
            continue;
        }
    }
}

fn refuse(stream: &mut UnixStream, message: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let e = ApiError::unavailable(message);
    let _ = http::write_response(stream, e.status(), &[], Some(&e.to_json()));
}

fn write_error(stream: &mut UnixStream, e: &ApiError, headers: &[(&str, String)]) {
    let _ = http::write_response(stream, e.status(), headers, Some(&e.to_json()));
}

fn serve_connection(mut stream: UnixStream, handler: &Handler, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    if stream.set_write_timeout(Some(timeout)).is_err() {
        return;
    }
    let raw = match http::read_request(&mut stream, deadline) {
        Ok(r) => r,
        Err(ReadError::Closed | ReadError::Io) => return,
        Err(ReadError::Reply(e)) => return write_error(&mut stream, &e, &[]),
    };
    let route = match router::find_route(&raw.method, &raw.path) {
        Ok(r) => r,
        Err((e, allowed)) => {
            let mut headers = Vec::new();
            if !allowed.is_empty() {
                let names: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
                headers.push(("Allow", names.join(", ")));
            }
            return write_error(&mut stream, &e, &headers);
        }
    };
    let request = match route.parse(&raw.body) {
        Ok(r) => r,
        Err(e) => return write_error(&mut stream, &e, &[]),
    };
    let result = catch_unwind(AssertUnwindSafe(|| handler(request))).unwrap_or_else(|_| {
        Err(ApiError::internal(
            "the VMM failed while handling the request (a bug): see its log",
        ))
    });
    let _ = match result {
        Ok(ApiResponse::NoContent) => http::write_response(&mut stream, 204, &[], None),
        Ok(ApiResponse::Ping(p)) => write_json(&mut stream, &p),
        Ok(ApiResponse::Info(i)) => write_json(&mut stream, &i),
        Err(e) => {
            write_error(&mut stream, &e, &[]);
            Ok(())
        }
    };
}

fn write_json(stream: &mut UnixStream, value: &impl serde::Serialize) -> io::Result<()> {
    match serde_json::to_string(value) {
        Ok(body) => http::write_response(stream, 200, &[], Some(&body)),
        Err(e) => {
            let e = ApiError::internal(format!("cannot encode the reply as JSON: {e}"));
            http::write_response(stream, e.status(), &[], Some(&e.to_json()))
        }
    }
}
