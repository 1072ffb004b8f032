//! What travels over the API: the typed requests the VMM handles, the bodies they carry, the
//! replies it gives and the errors it returns.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One request from a client, parsed and checked for shape by the server. The VMM decides whether
/// it is allowed now (see [`ApiRequest::allowed_in`]) and carries it out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", content = "body", rename_all = "kebab-case")]
pub enum ApiRequest {
    /// `GET /api/v1/vmm/ping`: is the VMM alive and answering?
    Ping,
    /// `GET /api/v1/vm/info`: the VM's state, back end and config.
    Info,
    /// `PUT /api/v1/vm/config`: define the VM before boot. The config is opaque to this crate
    /// (always a JSON object); the VMM validates it.
    Configure(Value),
    /// `PUT /api/v1/vm/start`: boot the configured VM.
    Start,
    /// `PUT /api/v1/vm/pause`: stop the vCPUs.
    Pause,
    /// `PUT /api/v1/vm/resume`: restart the vCPUs of a paused VM.
    Resume,
    /// `PUT /api/v1/vm/shutdown`: Ctrl-Alt-Del on the guest keyboard, kill after a timeout.
    Shutdown(ShutdownConfig),
    /// `PUT /api/v1/vm/kill`: stop the VM at once.
    Kill,
    /// `PUT /api/v1/vm/snapshot`: save a paused VM to a directory.
    Snapshot(SnapshotConfig),
    /// `PUT /api/v1/vm/restore`: load a snapshot, before boot.
    Restore(RestoreConfig),
}

impl ApiRequest {
    /// Whether the intended state machine allows this request in `state`:
    ///
    /// ```text
    /// not-configured --config--> configured --start--> running <--pause/resume--> paused
    ///        |                        |                   |                          |
    ///        +------ restore ---------+                   +--- shutdown / kill ------+--> shutdown
    /// ```
    ///
    /// `ping` and `info` are always allowed; `config` may replace a config before boot; `restore`
    /// is allowed only before boot (it leaves the VM paused, or running with `resume`);
    /// `snapshot` needs a paused VM. A VMM may refuse more (say, a snapshot while a device is
    /// busy); it answers such refusals, and these, with [`ApiError::conflict`].
    pub fn allowed_in(&self, state: VmState) -> bool {
        use VmState::*;
        match self {
            ApiRequest::Ping | ApiRequest::Info => true,
            ApiRequest::Configure(_) | ApiRequest::Restore(_) => {
                matches!(state, NotConfigured | Configured)
            }
            ApiRequest::Start => state == Configured,
            ApiRequest::Pause => state == Running,
            ApiRequest::Resume | ApiRequest::Snapshot(_) => state == Paused,
            ApiRequest::Shutdown(_) | ApiRequest::Kill => matches!(state, Running | Paused),
        }
    }

    /// The request's name as `ferrovisor ctl` spells it, for messages such as "cannot pause: ...".
    pub fn name(&self) -> &'static str {
        match self {
            ApiRequest::Ping => "ping",
            ApiRequest::Info => "info",
            ApiRequest::Configure(_) => "config",
            ApiRequest::Start => "start",
            ApiRequest::Pause => "pause",
            ApiRequest::Resume => "resume",
            ApiRequest::Shutdown(_) => "shutdown",
            ApiRequest::Kill => "kill",
            ApiRequest::Snapshot(_) => "snapshot",
            ApiRequest::Restore(_) => "restore",
        }
    }
}

/// Body of `PUT /api/v1/vm/shutdown` (the body may be left out altogether).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Seconds to wait for the guest to power off after Ctrl-Alt-Del before killing it;
    /// `None` leaves the choice to the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// Body of `PUT /api/v1/vm/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Directory to write the snapshot into, as the VMM process sees it.
    pub dir: String,
    /// Save only the memory pages written since the last snapshot.
    #[serde(default)]
    pub diff: bool,
}

/// Body of `PUT /api/v1/vm/restore`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// Directory holding the snapshot, as the VMM process sees it.
    pub dir: String,
    /// Run the VM once restored (otherwise it stays paused).
    #[serde(default)]
    pub resume: bool,
    /// Settings to change on the way in (say, a disk's new path); opaque to this crate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<Value>,
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    /// The action was carried out: `204 No Content`.
    NoContent,
    /// Reply to [`ApiRequest::Ping`]: `200` with a [`PingResponse`] body.
    Ping(PingResponse),
    /// Reply to [`ApiRequest::Info`]: `200` with a [`VmInfo`] body.
    Info(VmInfo),
}

/// Body of the reply to `GET /api/v1/vmm/ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResponse {
    /// The VMM's version.
    pub version: String,
    /// The VMM's process id.
    pub pid: u32,
}

impl PingResponse {
    /// The reply for this process: the workspace version (shared by every crate) and its pid.
    pub fn current() -> Self {
        PingResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
        }
    }
}

/// Body of the reply to `GET /api/v1/vm/info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Where the VM is in its life.
    pub state: VmState,
    /// The vCPU back end, once the VM has one (`None` before boot when the config says `auto`).
    pub backend: Option<VmBackend>,
    /// The VM's config as the VMM holds it, once there is one; opaque to this crate.
    pub config: Option<Value>,
}

/// The VM's lifecycle state, as `GET /api/v1/vm/info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// No config yet: `PUT /vm/config` or `PUT /vm/restore` comes next.
    NotConfigured,
    /// Configured but not booted.
    Configured,
    /// vCPUs running.
    Running,
    /// vCPUs stopped; devices quiet.
    Paused,
    /// The VM has ended (powered off, shut down or killed); only `info` and `ping` remain.
    Shutdown,
}

impl VmState {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::NotConfigured => "not-configured",
            VmState::Configured => "configured",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The vCPU back end a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmBackend {
    /// Hardware-assisted, through /dev/kvm.
    Kvm,
    /// Ferrovisor's x86-64 emulator.
    Emu,
}

/// What kind of failure an [`ApiError`] is; it fixes the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiErrorKind {
    /// 400: malformed request, bad JSON, wrong field types, unknown fields, or a config the VMM
    /// rejects.
    BadRequest,
    /// 404: no endpoint at that path.
    NotFound,
    /// 405: the endpoint exists but not with that method.
    MethodNotAllowed,
    /// 408: the client did not send a whole request in time.
    RequestTimeout,
    /// 409: the request is valid but not in the VM's current state.
    Conflict,
    /// 411: a body without a `Content-Length`.
    LengthRequired,
    /// 413: body over [`crate::MAX_BODY_BYTES`].
    PayloadTooLarge,
    /// 431: request headers over [`crate::MAX_HEADER_BYTES`].
    HeadersTooLarge,
    /// 500: the VMM failed while carrying the request out.
    Internal,
    /// 503: the VMM is gone or cannot take requests (or the server is at its connection limit).
    Unavailable,
}

impl ApiErrorKind {
    /// The HTTP status code.
    pub fn status(self) -> u16 {
        match self {
            ApiErrorKind::BadRequest => 400,
            ApiErrorKind::NotFound => 404,
            ApiErrorKind::MethodNotAllowed => 405,
            ApiErrorKind::RequestTimeout => 408,
            ApiErrorKind::Conflict => 409,
            ApiErrorKind::LengthRequired => 411,
            ApiErrorKind::PayloadTooLarge => 413,
            ApiErrorKind::HeadersTooLarge => 431,
            ApiErrorKind::Internal => 500,
            ApiErrorKind::Unavailable => 503,
        }
    }
}

/// A failed request: an HTTP status and one line for a person, saying what to do. On the wire it
/// is the status plus the body `{"error": "<message>"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The kind of failure, which fixes the status.
    pub kind: ApiErrorKind,
    /// One line saying what went wrong and what to do about it.
    pub message: String,
}

impl ApiError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    /// 400: the request (or the config in it) is wrong and will stay wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::BadRequest, message)
    }

    /// 409: not allowed in the VM's current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Conflict, message)
    }

    /// 409 for `request` refused in `state`, with a message naming what would make it possible.
    pub fn not_allowed_in(request: &ApiRequest, state: VmState) -> Self {
        let hint = match request {
            ApiRequest::Configure(_) | ApiRequest::Restore(_) => "only before the VM starts",
            ApiRequest::Start => "only once the VM is configured and not yet started",
            ApiRequest::Pause => "only while the VM runs",
            ApiRequest::Resume => "only while the VM is paused",
            ApiRequest::Snapshot(_) => "only while the VM is paused: pause it first",
            ApiRequest::Shutdown(_) | ApiRequest::Kill => "only while the VM runs or is paused",
            ApiRequest::Ping | ApiRequest::Info => "at any time",
        };
        Self::conflict(format!(
            "cannot {} a VM that is {state}: allowed {hint}",
            request.name()
        ))
    }

    /// 500: the VMM failed while carrying the request out.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Internal, message)
    }

    /// 503: the VMM cannot take requests.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Unavailable, message)
    }

    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The JSON body: `{"error": "<message>"}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({ "error": self.message }).to_string()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_is_allowed_only_when_paused() {
        let req = ApiRequest::Snapshot(SnapshotConfig {
            dir: "d".into(),
            diff: false,
        });
        let allowed: Vec<_> = [
            VmState::NotConfigured,
            VmState::Configured,
            VmState::Running,
            VmState::Paused,
            VmState::Shutdown,
        ]
        .into_iter()
        .filter(|s| req.allowed_in(*s))
        .collect();
        assert_eq!(allowed, [VmState::Paused]);
    }

    #[test]
    fn shutdown_state_allows_only_queries() {
        assert!(ApiRequest::Info.allowed_in(VmState::Shutdown));
        assert!(ApiRequest::Ping.allowed_in(VmState::Shutdown));
        assert!(!ApiRequest::Kill.allowed_in(VmState::Shutdown));
        assert!(!ApiRequest::Start.allowed_in(VmState::Shutdown));
    }

    #[test]
    fn refusal_message_names_state_and_remedy() {
        let e = ApiError::not_allowed_in(
            &ApiRequest::Snapshot(SnapshotConfig {
                dir: "d".into(),
                diff: true,
            }),
            VmState::Running,
        );
        assert_eq!(e.status(), 409);
        assert_eq!(
            e.message,
            "cannot snapshot a VM that is running: allowed only while the VM is paused: pause it first"
        );
    }

    #[test]
    fn states_serialize_in_kebab_case() {
        let s = serde_json::to_string(&VmState::NotConfigured).unwrap();
        assert_eq!(s, "\"not-configured\"");
        for st in [VmState::Configured, VmState::Running, VmState::Shutdown] {
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
    }

    #[test]
    fn error_body_is_json_with_message() {
        let e = ApiError::bad_request("say \"why\"");
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v, serde_json::json!({"error": "say \"why\""}));
    }
}
