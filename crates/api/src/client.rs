//! A blocking client for the per-VM API: one connection per request.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::http;
use crate::router::Method;
use crate::types::{PingResponse, RestoreConfig, ShutdownConfig, SnapshotConfig, VmInfo};

/// How long a request may take, end to end, unless [`Client::with_timeout`] says otherwise. Long
/// enough for a snapshot of a large guest; a VMM that hangs still cannot hang the caller forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("cannot connect to {path:?} (is the VMM running with --api-sock {path:?}?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The connection failed or timed out mid-request.
    #[error("the API request failed")]
    Io(#[source] io::Error),
    /// The server refused the request; `message` is its explanation.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The server's one-line message.
        message: String,
    },
    /// The server's reply was not what the API defines.
    #[error("unexpected reply from the VMM: {0}")]
    BadResponse(String),
}

impl ClientError {
    /// The HTTP status of a refusal by the server; `None` when there was no answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one VMM's API socket. Cheap to clone; each request opens its own connection, so
/// one client can be used from several threads.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the API socket at `path`, with [`DEFAULT_TIMEOUT`]. Nothing is connected
    /// until a request is made.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client {
            path: path.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another time limit for each read and write of a request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `method` on `path` (for example `/api/v1/vm/info`) with an optional JSON body.
    /// Returns the reply's JSON body, `None` for `204 No Content`, or the server's refusal as
    /// [`ClientError::Api`].
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, ClientError> {
        self.request_with_timeout(method, path, body, self.timeout)
    }

    fn request_with_timeout(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Option<Value>, ClientError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(ClientError::Io)?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        let sent = stream
            .write_all(req.as_bytes())
            .and_then(|()| stream.flush());
        // The server may answer and close before reading the whole request (a 503 when it is
        // busy, a 413 for a body over the limit), so that our write fails: its answer, if it
        // gave one, says more than the broken pipe.
        let resp = match (sent, http::read_response(&mut stream)) {
            (_, Ok(resp)) => resp,
            (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(ClientError::Io(e)),
        };
        if !(200..300).contains(&resp.status) {
            return Err(ClientError::Api {
                status: resp.status,
                message: error_message(resp.status, &resp.body),
            });
        }
        if resp.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&resp.body)
            .map(Some)
            .map_err(|e| ClientError::BadResponse(format!("the body is not JSON ({e})")))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let value = self
            .request(Method::Get, path, None)?
            .ok_or_else(|| ClientError::BadResponse(format!("GET {path} returned no body")))?;
        serde_json::from_value(value)
            .map_err(|e| ClientError::BadResponse(format!("GET {path} returned {e}")))
    }

    fn put(&self, path: &str, body: Option<&Value>) -> Result<(), ClientError> {
        self.request(Method::Put, path, body).map(drop)
    }

    fn put_json(&self, path: &str, body: &impl serde::Serialize) -> Result<(), ClientError> {
        let body = serde_json::to_value(body)
            .map_err(|e| ClientError::BadResponse(format!("cannot encode the request: {e}")))?;
        self.put(path, Some(&body))
    }

    /// `GET /vmm/ping`: the VMM's version and pid.
    pub fn ping(&self) -> Result<PingResponse, ClientError> {
        self.get("/api/v1/vmm/ping")
    }

    /// `GET /vm/info`: the VM's state, back end and config.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        self.get("/api/v1/vm/info")
    }

    /// `PUT /vm/config`: defines the VM (a JSON object the VMM validates).
    pub fn configure(&self, config: &Value) -> Result<(), ClientError> {
        self.put("/api/v1/vm/config", Some(config))
    }

    /// `PUT /vm/start`: boots the configured VM.
    pub fn start(&self) -> Result<(), ClientError> {
        self.put("/api/v1/vm/start", None)
    }

    /// `PUT /vm/pause`.
    pub fn pause(&self) -> Result<(), ClientError> {
        self.put("/api/v1/vm/pause", None)
    }

    /// `PUT /vm/resume`.
    pub fn resume(&self) -> Result<(), ClientError> {
        self.put("/api/v1/vm/resume", None)
    }

    /// `PUT /vm/shutdown`: Ctrl-Alt-Del on the guest keyboard, then a kill after `timeout_s` seconds (the
    /// VMM's default when `None`). The client waits at least that long, plus a margin, for the
    /// answer.
    pub fn shutdown(&self, timeout_s: Option<u64>) -> Result<(), ClientError> {
        let body = serde_json::to_value(ShutdownConfig { timeout_s })
            .map_err(|e| ClientError::BadResponse(format!("cannot encode the request: {e}")))?;
        let wait = timeout_s
            .map(|s| Duration::from_secs(s.saturating_add(30)))
            .unwrap_or_default()
            .max(self.timeout);
        self.request_with_timeout(Method::Put, "/api/v1/vm/shutdown", Some(&body), wait)
            .map(drop)
    }

    /// `PUT /vm/kill`: stops the VM at once.
    pub fn kill(&self) -> Result<(), ClientError> {
        self.put("/api/v1/vm/kill", None)
    }

    /// `PUT /vm/snapshot`: saves the paused VM into `dir` (a path as the VMM sees it), only
    /// the pages written since the last snapshot with `diff`.
    pub fn snapshot(&self, dir: &str, diff: bool) -> Result<(), ClientError> {
        let body = SnapshotConfig {
            dir: dir.to_string(),
            diff,
        };
        self.put_json("/api/v1/vm/snapshot", &body)
    }

    /// `PUT /vm/restore`: loads a snapshot before boot.
    pub fn restore(&self, config: &RestoreConfig) -> Result<(), ClientError> {
        self.put_json("/api/v1/vm/restore", config)
    }
}

/// The server's message from an error body, or a stand-in when the body has none.
fn error_message(status: u16, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
        return b.error;
    }
    let text = String::from_utf8_lossy(body);
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        format!("the VMM answered HTTP {status} with no message")
    } else {
        format!("the VMM answered HTTP {status}: {line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_prefers_the_json_field() {
        assert_eq!(
            error_message(409, br#"{"error":"pause first"}"#),
            "pause first"
        );
        assert_eq!(
            error_message(502, b"bad gateway\nmore"),
            "the VMM answered HTTP 502: bad gateway"
        );
        assert_eq!(
            error_message(500, b""),
            "the VMM answered HTTP 500 with no message"
        );
    }

    #[test]
    fn connect_error_says_how_to_start_the_vmm() {
        let c = Client::new("/nonexistent/ferrovisor-api-test.sock");
        let e = c.ping().unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains("--api-sock"), "{e}");
        assert_eq!(e.status(), None);
    }
}
