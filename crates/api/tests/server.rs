//! The server on a temporary socket with a fake VMM behind it, driven through the client, through
//! raw HTTP on a `UnixStream`, and through `ferrovisor ctl`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use api::{
    channel_handler, ApiCall, ApiError, ApiRequest, ApiResponse, Client, ClientError, CtlArgs,
    PingResponse, RestoreConfig, Server, ServerError, ServerOptions, ShutdownConfig,
    SnapshotConfig, VmBackend, VmInfo, VmState,
};
use clap::Parser;
use serde_json::{json, Value};

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("fv-api-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake VMM: follows the intended state machine and records every request it gets.
#[derive(Clone)]
struct FakeVmm {
    state: Arc<Mutex<VmState>>,
    config: Arc<Mutex<Option<Value>>>,
    seen: Arc<Mutex<Vec<ApiRequest>>>,
}

impl FakeVmm {
    fn new(state: VmState) -> Self {
        FakeVmm {
            state: Arc::new(Mutex::new(state)),
            config: Arc::new(Mutex::new(None)),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        self.seen.lock().unwrap().push(req.clone());
        let mut state = self.state.lock().unwrap();
        if !req.allowed_in(*state) {
            return Err(ApiError::not_allowed_in(&req, *state));
        }
        let next = match &req {
            ApiRequest::Ping => return Ok(ApiResponse::Ping(PingResponse::current())),
            ApiRequest::Info => {
                return Ok(ApiResponse::Info(VmInfo {
                    state: *state,
                    backend: (*state != VmState::NotConfigured).then_some(VmBackend::Emu),
                    config: self.config.lock().unwrap().clone(),
                }))
            }
            ApiRequest::Configure(c) => {
                *self.config.lock().unwrap() = Some(c.clone());
                VmState::Configured
            }
            ApiRequest::Start | ApiRequest::Resume => VmState::Running,
            ApiRequest::Pause | ApiRequest::Snapshot(_) => VmState::Paused,
            ApiRequest::Shutdown(_) | ApiRequest::Kill => VmState::Shutdown,
            ApiRequest::Restore(r) if r.resume => VmState::Running,
            ApiRequest::Restore(_) => VmState::Paused,
        };
        *state = next;
        Ok(ApiResponse::NoContent)
    }

    fn serve(&self, path: &Path, options: ServerOptions) -> Server {
        let vmm = self.clone();
        Server::start_with(path, Box::new(move |r| vmm.handle(r)), options).unwrap()
    }

    fn take_seen(&self) -> Vec<ApiRequest> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// A raw response: status, headers (lowercased names) and body.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.body))
    }

    fn error(&self) -> String {
        let v = self.json();
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no message in {v}"));
        assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
        msg.to_string()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn read_raw(stream: &mut UnixStream) -> Raw {
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_lowercase(), v.trim().to_string())
        })
        .collect();
    Raw {
        status,
        headers,
        body: body.to_string(),
    }
}

fn raw_bytes(sock: &Path, request: &[u8]) -> Raw {
    let mut stream = UnixStream::connect(sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    read_raw(&mut stream)
}

fn raw(sock: &Path, method: &str, path: &str, body: &str) -> Raw {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_bytes(sock, req.as_bytes())
}

#[test]
fn every_endpoint_reaches_the_handler_through_the_client() {
    let dir = TempDir::new("client");
    let vmm = FakeVmm::new(VmState::NotConfigured);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    let c = Client::new(server.path());

    let pong = c.ping().unwrap();
    assert_eq!(pong.pid, std::process::id());
    assert_eq!(c.info().unwrap().state, VmState::NotConfigured);
    let config = json!({"kernel": "/k", "memory": "64M"});
    c.configure(&config).unwrap();
    c.start().unwrap();
    c.pause().unwrap();
    c.snapshot("/snaps/1", true).unwrap();
    c.resume().unwrap();
    c.shutdown(Some(3)).unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.state, VmState::Shutdown);
    assert_eq!(info.config, Some(config.clone()));
    assert_eq!(
        vmm.take_seen(),
        [
            ApiRequest::Ping,
            ApiRequest::Info,
            ApiRequest::Configure(config),
            ApiRequest::Start,
            ApiRequest::Pause,
            ApiRequest::Snapshot(SnapshotConfig {
                dir: "/snaps/1".into(),
                diff: true
            }),
            ApiRequest::Resume,
            ApiRequest::Shutdown(ShutdownConfig { timeout_s: Some(3) }),
            ApiRequest::Info,
        ]
    );

    *vmm.state.lock().unwrap() = VmState::NotConfigured;
    let restore = RestoreConfig {
        dir: "/snaps/1".into(),
        resume: true,
        overrides: Some(json!({"disks": []})),
    };
    c.restore(&restore).unwrap();
    c.kill().unwrap();
    assert_eq!(
        vmm.take_seen(),
        [ApiRequest::Restore(restore), ApiRequest::Kill]
    );
}

#[test]
fn every_endpoint_reaches_the_handler_through_raw_http() {
    let dir = TempDir::new("raw");
    let vmm = FakeVmm::new(VmState::NotConfigured);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    let sock = server.path();
    let cases: [(&str, &str, &str, u16, ApiRequest); 11] = [
        ("GET", "/api/v1/vmm/ping", "", 200, ApiRequest::Ping),
        (
            "GET",
            "/api/v1/vm/info?verbose=1",
            "",
            200,
            ApiRequest::Info,
        ),
        (
            "PUT",
            "/api/v1/vm/restore",
            r#"{"dir": "/s", "resume": false}"#,
            204,
            ApiRequest::Restore(RestoreConfig {
                dir: "/s".into(),
                resume: false,
                overrides: None,
            }),
        ),
        (
            "PUT",
            "/api/v1/vm/snapshot",
            r#"{"dir": "/s2"}"#,
            204,
            ApiRequest::Snapshot(SnapshotConfig {
                dir: "/s2".into(),
                diff: false,
            }),
        ),
        ("PUT", "/api/v1/vm/resume", "", 204, ApiRequest::Resume),
        ("PUT", "/api/v1/vm/pause", "{}", 204, ApiRequest::Pause),
        ("PUT", "/api/v1/vm/kill", "", 204, ApiRequest::Kill),
        (
            "PUT",
            "/api/v1/vm/shutdown",
            "",
            409,
            ApiRequest::Shutdown(ShutdownConfig::default()),
        ),
        (
            "PUT",
            "/api/v1/vm/config",
            r#"{"cpus": 1}"#,
            409,
            ApiRequest::Configure(json!({"cpus": 1})),
        ),
        ("PUT", "/api/v1/vm/start", "", 409, ApiRequest::Start),
        ("GET", "/api/v1/vm/info", "", 200, ApiRequest::Info),
    ];
    for (method, path, body, status, expected) in cases {
        let resp = raw(sock, method, path, body);
        assert_eq!(resp.status, status, "{method} {path}: {}", resp.body);
        match status {
            200 => {
                assert_eq!(resp.header("content-type"), Some("application/json"));
                resp.json();
            }
            204 => assert_eq!(resp.body, ""),
            _ => {
                resp.error();
            }
        }
        assert_eq!(vmm.take_seen(), [expected], "{method} {path}");
    }
    let info = raw(sock, "GET", "/api/v1/vm/info", "").json();
    assert_eq!(info["state"], "shutdown");
    assert_eq!(info["backend"], "emu");
    assert_eq!(info["config"], Value::Null);
}

#[test]
fn malformed_requests_get_400_with_a_message_and_never_reach_the_handler() {
    let dir = TempDir::new("400");
    let vmm = FakeVmm::new(VmState::Paused);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    let sock = server.path();
    for (path, body, needle) in [
        ("/api/v1/vm/snapshot", "{\"dir\": ", "invalid body"),
        ("/api/v1/vm/snapshot", r#"{"dir": 5}"#, "invalid type"),
        (
            "/api/v1/vm/snapshot",
            r#"{"dir": "/s", "dif": true}"#,
            "unknown field `dif`",
        ),
        ("/api/v1/vm/snapshot", "", "needs a JSON body"),
        ("/api/v1/vm/shutdown", r#"{"timeout_s": -1}"#, "invalid"),
        ("/api/v1/vm/config", "[]", "JSON object"),
        ("/api/v1/vm/pause", r#"{"force": true}"#, "takes no body"),
    ] {
        let resp = raw(sock, "PUT", path, body);
        assert_eq!(resp.status, 400, "{path} {body}");
        let msg = resp.error();
        assert!(msg.contains(needle), "{path} {body}: {msg}");
    }
    let resp = raw_bytes(sock, b"GET /api/v1/vm/info HTTP/1.1\r\nBad Header\r\n\r\n");
    assert_eq!(resp.status, 400);
    assert!(resp.error().contains("malformed HTTP"));
    assert_eq!(vmm.take_seen(), []);

    // An empty dir is well-formed: the VMM judges it.
    Client::new(sock).snapshot("", false).unwrap();
}

#[test]
fn unknown_path_gets_404_and_wrong_method_405_with_allow() {
    let dir = TempDir::new("404");
    let vmm = FakeVmm::new(VmState::Running);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    let resp = raw(server.path(), "GET", "/api/v1/vm/nothing", "");
    assert_eq!(resp.status, 404);
    assert!(resp.error().contains("/api/v1/vm/nothing"));
    let resp = raw(server.path(), "GET", "/vm/info", "");
    assert_eq!(resp.status, 404);
    assert!(resp.error().contains("/api/v1"));

    let resp = raw(server.path(), "POST", "/api/v1/vm/pause", "");
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("PUT"));
    assert!(resp.error().contains("use PUT"));
    let resp = raw(server.path(), "PUT", "/api/v1/vm/info", "");
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("GET"));
    assert_eq!(vmm.take_seen(), []);
}

#[test]
fn request_refused_in_current_state_is_409_through_client_and_raw() {
    let dir = TempDir::new("409");
    let vmm = FakeVmm::new(VmState::Running);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    let resp = raw(
        server.path(),
        "PUT",
        "/api/v1/vm/snapshot",
        r#"{"dir": "/s"}"#,
    );
    assert_eq!(resp.status, 409);
    assert!(resp.error().contains("pause it first"));

    let e = Client::new(server.path())
        .snapshot("/s", false)
        .unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.to_string().contains("pause it first"), "{e}");
}

#[test]
fn oversized_body_is_413_without_being_read() {
    let dir = TempDir::new("413");
    let vmm = FakeVmm::new(VmState::NotConfigured);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    let head = format!(
        "PUT /api/v1/vm/config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{{",
        api::MAX_BODY_BYTES + 1
    );
    let resp = raw_bytes(server.path(), head.as_bytes());
    assert_eq!(resp.status, 413);
    assert!(resp.error().contains("limit"));

    // Just under the limit is read in full and parsed.
    let pad = " ".repeat(api::MAX_BODY_BYTES - 20);
    let body = format!("{{\"a\": 1{pad}}}");
    assert!(body.len() <= api::MAX_BODY_BYTES);
    let resp = raw(server.path(), "PUT", "/api/v1/vm/config", &body);
    assert_eq!(resp.status, 204, "{}", resp.body);

    let huge_headers = format!(
        "GET /api/v1/vm/info HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert_eq!(
        raw_bytes(server.path(), huge_headers.as_bytes()).status,
        431
    );
    assert_eq!(vmm.take_seen().len(), 1);

    // The client reports the server's 413 even though the server stops reading mid-body.
    let huge = json!({ "blob": "x".repeat(4 * api::MAX_BODY_BYTES) });
    let e = Client::new(server.path()).configure(&huge).unwrap_err();
    assert_eq!(e.status(), Some(413), "{e}");
    assert_eq!(vmm.take_seen(), []);
}

#[test]
fn expect_continue_is_answered_before_the_body() {
    let dir = TempDir::new("expect");
    let vmm = FakeVmm::new(VmState::NotConfigured);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    let body = r#"{"kernel": "/k"}"#;
    let mut s = UnixStream::connect(server.path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "PUT /api/v1/vm/config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_raw(&mut s).status, 204);
}

#[test]
fn a_slow_client_does_not_block_another() {
    let dir = TempDir::new("slow");
    let vmm = FakeVmm::new(VmState::Running);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    // Connected, half a request line, then silence.
    let mut slow = UnixStream::connect(server.path()).unwrap();
    slow.write_all(b"GET /api/v1/vm/in").unwrap();
    thread::sleep(Duration::from_millis(50));

    let start = Instant::now();
    let info = Client::new(server.path()).info().unwrap();
    assert_eq!(info.state, VmState::Running);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    drop(slow);
}

#[test]
fn a_client_that_never_finishes_gets_408_after_the_timeout() {
    let dir = TempDir::new("408");
    let vmm = FakeVmm::new(VmState::Running);
    let options = ServerOptions {
        request_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let server = vmm.serve(&dir.sock(), options);
    let mut slow = UnixStream::connect(server.path()).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let start = Instant::now();
    // Trickling bytes does not extend the deadline.
    for b in b"PUT /api/v1/vm/pause HTTP/1.1\r\n" {
        if slow.write_all(&[*b]).is_err() || start.elapsed() > Duration::from_millis(600) {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    let resp = read_raw(&mut slow);
    assert_eq!(resp.status, 408);
    assert!(resp.error().contains("in time"));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(vmm.take_seen(), []);
}

#[test]
fn connections_over_the_limit_get_503() {
    let dir = TempDir::new("503");
    let vmm = FakeVmm::new(VmState::Running);
    let options = ServerOptions {
        max_connections: 1,
        ..ServerOptions::default()
    };
    let server = vmm.serve(&dir.sock(), options);
    let idle = UnixStream::connect(server.path()).unwrap();
    thread::sleep(Duration::from_millis(100));
    let e = Client::new(server.path()).ping().unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    drop(idle);
    // The slot frees once the idle connection's thread notices the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Client::new(server.path()).ping().is_err() {
        assert!(Instant::now() < deadline, "the slot was never freed");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_server_on_a_live_path_is_refused() {
    let dir = TempDir::new("inuse");
    let vmm = FakeVmm::new(VmState::Running);
    let first = vmm.serve(&dir.sock(), ServerOptions::default());
    let e = Server::start(first.path(), Box::new(|_| Ok(ApiResponse::NoContent))).unwrap_err();
    assert!(matches!(e, ServerError::InUse(_)), "{e:?}");
    assert!(e.to_string().contains("already serves"), "{e}");
    // The first server still answers.
    Client::new(first.path()).ping().unwrap();
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = TempDir::new("stale");
    drop(UnixListener::bind(dir.sock()).unwrap());
    assert!(
        dir.sock().exists(),
        "the stale socket file should be left behind"
    );
    let vmm = FakeVmm::new(VmState::Running);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    Client::new(server.path()).ping().unwrap();
}

#[test]
fn a_file_that_is_not_a_socket_is_never_deleted() {
    let dir = TempDir::new("notsock");
    std::fs::write(dir.sock(), "precious").unwrap();
    let e = Server::start(dir.sock(), Box::new(|_| Ok(ApiResponse::NoContent))).unwrap_err();
    assert!(matches!(e, ServerError::NotASocket(_)), "{e:?}");
    assert_eq!(std::fs::read_to_string(dir.sock()).unwrap(), "precious");
}

#[test]
fn dropping_the_server_removes_its_socket() {
    let dir = TempDir::new("drop");
    let vmm = FakeVmm::new(VmState::Running);
    let server = vmm.serve(&dir.sock(), ServerOptions::default());
    assert!(dir.sock().exists());
    drop(server);
    assert!(!dir.sock().exists());
    let e = Client::new(dir.sock()).ping().unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
}

#[test]
fn a_panicking_handler_gives_500_and_the_server_keeps_serving() {
    let dir = TempDir::new("panic");
    let server = Server::start(
        dir.sock(),
        Box::new(|req| match req {
            ApiRequest::Kill => panic!("fake VMM bug"),
            _ => Ok(ApiResponse::Ping(PingResponse::current())),
        }),
    )
    .unwrap();
    let e = Client::new(server.path()).kill().unwrap_err();
    assert_eq!(e.status(), Some(500));
    Client::new(server.path()).ping().unwrap();
}

#[test]
fn channel_handler_delivers_to_a_vmm_thread_and_503s_once_it_is_gone() {
    enum VmmEvent {
        Api(ApiCall),
    }
    let dir = TempDir::new("chan");
    let (tx, rx) = mpsc::channel();
    let wakes = Arc::new(AtomicUsize::new(0));
    let w = Arc::clone(&wakes);
    let handler = channel_handler(tx, VmmEvent::Api, move || {
        w.fetch_add(1, Ordering::SeqCst);
    });
    let server = Server::start(dir.sock(), handler).unwrap();
    let vmm = thread::spawn(move || {
        // Answer one request, drop the next one's reply unanswered, then exit.
        let VmmEvent::Api(call) = rx.recv().unwrap();
        assert_eq!(call.request, ApiRequest::Pause);
        call.reply.send(Ok(ApiResponse::NoContent)).unwrap();
        let VmmEvent::Api(call) = rx.recv().unwrap();
        drop(call);
    });
    let c = Client::new(server.path());
    c.pause().unwrap();
    assert_eq!(c.resume().unwrap_err().status(), Some(503));
    vmm.join().unwrap();
    let e = c.kill().unwrap_err();
    assert_eq!(e.status(), Some(503));
    assert!(e.to_string().contains("VMM is gone"), "{e}");
    assert_eq!(wakes.load(Ordering::SeqCst), 2);
}

#[derive(Parser)]
struct Ctl {
    #[command(flatten)]
    args: CtlArgs,
}

fn ctl(args: &[&str]) -> i32 {
    let argv = std::iter::once("ctl").chain(args.iter().copied());
    api::ctl_main(Ctl::try_parse_from(argv).unwrap().args)
}

#[test]
fn ctl_needs_a_socket_and_a_known_subcommand() {
    assert!(Ctl::try_parse_from(["ctl", "info"]).is_err());
    assert!(Ctl::try_parse_from(["ctl", "--sock", "/s", "reboot"]).is_err());
    assert!(Ctl::try_parse_from(["ctl", "--sock", "/s", "snapshot"]).is_err());
    let parsed = Ctl::try_parse_from(["ctl", "--sock", "/s", "restore", "/d", "--resume"]).unwrap();
    assert_eq!(parsed.args.sock, Path::new("/s"));
}

#[test]
fn ctl_exit_codes_follow_the_outcome() {
    let dir = TempDir::new("ctl");
    let sock = dir.sock();
    let s = sock.to_str().unwrap();
    assert_eq!(ctl(&["--sock", s, "ping"]), api::EXIT_FAILED, "no VMM yet");

    let vmm = FakeVmm::new(VmState::NotConfigured);
    let _server = vmm.serve(&sock, ServerOptions::default());
    let config = dir.0.join("vm.json");
    std::fs::write(&config, r#"{"kernel": "/k"}"#).unwrap();
    let bad = dir.0.join("bad.json");
    std::fs::write(&bad, "kernel = '/k'").unwrap();
    let c = config.to_str().unwrap();

    assert_eq!(
        ctl(&["--sock", s, "config", bad.to_str().unwrap()]),
        api::EXIT_USAGE
    );
    assert_eq!(ctl(&["--sock", s, "config", c]), api::EXIT_OK);
    assert_eq!(ctl(&["--sock", s, "start"]), api::EXIT_OK);
    assert_eq!(ctl(&["--sock", s, "snapshot", "snap"]), api::EXIT_REFUSED);
    assert_eq!(ctl(&["--sock", s, "pause"]), api::EXIT_OK);
    assert_eq!(
        ctl(&["--sock", s, "snapshot", "snap", "--diff"]),
        api::EXIT_OK
    );
    assert_eq!(ctl(&["--sock", s, "info"]), api::EXIT_OK);
    assert_eq!(
        ctl(&["--sock", s, "shutdown", "--timeout", "1"]),
        api::EXIT_OK
    );
    assert_eq!(ctl(&["--sock", s, "restore", "/snap"]), api::EXIT_REFUSED);
    let seen = vmm.take_seen();
    let cwd = std::env::current_dir().unwrap();
    assert!(seen.contains(&ApiRequest::Snapshot(SnapshotConfig {
        dir: cwd.join("snap").to_str().unwrap().into(),
        diff: true,
    })));
    assert!(seen.contains(&ApiRequest::Shutdown(ShutdownConfig { timeout_s: Some(1) })));
}
