//! The per-VM control API: HTTP/1.1 with JSON bodies on a unix socket.
//!
//! - [`ApiRequest`], [`ApiResponse`], [`ApiError`] and the body types: what travels over the
//!   API. The VMM depends on this crate, never the reverse; VM configs and overrides are opaque
//!   JSON here and the VMM validates them.
//! - [`routes`]: the route table (`docs/openapi.json` is checked against it by a test).
//! - [`Server`]: binds the socket, serves each connection on a thread of its own with size and
//!   time limits, and hands typed requests to a [`Handler`] (or to a VMM thread's channel via
//!   [`channel_handler`]).
//! - [`Client`] and [`ctl_main`]: the client library and `ferrovisor ctl`.
//!
//! ```no_run
//! use api::{ApiError, ApiRequest, ApiResponse, Client, PingResponse, Server};
//!
//! let server = Server::start(
//!     "/tmp/vm.sock",
//!     Box::new(|req| match req {
//!         ApiRequest::Ping => Ok(ApiResponse::Ping(PingResponse::current())),
//!         other => Err(ApiError::conflict(format!("cannot {} now", other.name()))),
//!     }),
//! )?;
//! let pong = Client::new(server.path()).ping()?;
//! assert_eq!(pong.pid, std::process::id());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod client;
mod ctl;
mod http;
mod router;
mod server;
mod types;

pub use client::{Client, ClientError, DEFAULT_TIMEOUT};
pub use ctl::{ctl_main, CtlArgs, CtlCommand, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, EXIT_USAGE};
pub use http::{MAX_BODY_BYTES, MAX_HEADER_BYTES};
pub use router::{find_route, routes, Method, Route, API_PREFIX};
pub use server::{channel_handler, ApiCall, Handler, Server, ServerError, ServerOptions};
pub use types::{
    ApiError, ApiErrorKind, ApiRequest, ApiResponse, PingResponse, RestoreConfig, ShutdownConfig,
    SnapshotConfig, VmBackend, VmInfo, VmState,
};

/// Reads one request off `stream` exactly as the server does (header and body limits,
/// `Content-Length` framing, `Expect: 100-continue`), for the fuzz target `fuzz/api_http`;
/// not part of the API. `Ok((method, path without query, body))`; `Err(Some(e))`: the server
/// answers `e`; `Err(None)`: it answers nothing (the peer sent nothing, or the socket failed).
#[doc(hidden)]
pub fn read_request_for_fuzzing(
    stream: &mut std::os::unix::net::UnixStream,
    deadline: std::time::Instant,
) -> Result<(String, String, Vec<u8>), Option<ApiError>> {
    match http::read_request(stream, deadline) {
        Ok(r) => Ok((r.method, r.path, r.body)),
        Err(http::ReadError::Reply(e)) => Err(Some(e)),
        Err(http::ReadError::Closed | http::ReadError::Io) => Err(None),
    }
}
