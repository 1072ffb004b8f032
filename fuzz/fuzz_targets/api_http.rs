//! The control API's request reading and routing (`crates/api`: `http.rs`, `router.rs`) on
//! arbitrary bytes from a local client, through `api::read_request_for_fuzzing` (the server's
//! own `http::read_request`, on a real unix socket pair) and then `api::find_route` and
//! `Route::parse`, as the server's connection thread does.
//!
//! Input: byte 0 is a set of flags, the rest the bytes the client sends.
//! - bit 0 set and nothing above bit 2 (flags 1, 3, 5 or 7): the client keeps its end
//!   open instead of closing it after the bytes, and the server gets 1 ms (a request still
//!   incomplete then is a 408; any other 408 is retried with 5 s, the server's own limit,
//!   in case the machine was just slow). Only for streams up to 32 KiB; longer ones are
//!   always closed.
//! - bit 1: expand: bytes 1-2 (LE) are a number of filler bytes, times 32 if bit 2 is set
//!   (up to 64 KiB, or 2 MiB), byte 3 the filler, bytes 4-5 (LE, modulo the length of the
//!   rest) where in the rest (from byte 6) it goes, so headers and bodies can reach and pass
//!   `MAX_HEADER_BYTES` and `MAX_BODY_BYTES`. Streams over 32 KiB are written by a second
//!   thread.
//!
//! Reference (written here): `httparse` on the whole stream with the server's 32 headers
//! gives the request line and the end of the head `h`; then the documented rules: more than
//! 32 header lines, or a head over `MAX_HEADER_BYTES`, is 431 (a malformed head that long may
//! be 400 or 431, depending on where the 4 KiB reads stop); a bad or conflicting
//! `Content-Length` 400, `Transfer-Encoding` 411, a length over `MAX_BODY_BYTES` 413; the
//! body is exactly `Content-Length` bytes from `h` on; a stream that ends early is 400 (408
//! when the client keeps the connection open); an empty closed stream gets no answer.
//!
//! Checks: nothing panics; the outcome is the reference's (the method, the path without its
//! query string, the body); every error status is one of 400, 404, 405, 408, 411, 413, 431;
//! `100 Continue` is sent exactly when `Expect: 100-continue` asks for it and no body byte
//! came with the head; reading allocates at most `MAX_BODY_BYTES` plus a few times
//! `MAX_HEADER_BYTES`; `find_route` answers by the route table (404 for an unknown path, 405
//! with the allowed methods for a known one); a body that fails to parse is a 400, a missing
//! required body fails, a blank optional one does not; a parsed request is the route's kind,
//! an action without parameters had no body or `{}`, and the request survives a round trip
//! through its JSON and through the body a client would send for it (floats in the opaque
//! config and overrides exactly: the workspace parses floats with serde_json's
//! `float_roundtrip`).
//!
//! `API_FUZZ_TRACE=1` prints each input's outcome (to see what a reproducer does).
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Once;
use std::time::{Duration, Instant};

use api::{
    find_route, read_request_for_fuzzing, routes, ApiError, ApiRequest, Route, MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
};
use ferrovisor_fuzz::alloc_count::{measure, CountingAlloc};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Header lines the server accepts (`http.rs`, `MAX_HEADERS`).
const MAX_HEADERS: usize = 32;
/// The server reads the head in reads of this size.
const CHUNK: usize = 4096;
/// Every error status the request reader and the router may give.
const STATUSES: [u16; 7] = [400, 404, 405, 408, 411, 413, 431];
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Streams up to this long are written before the server reads (they fit in the socket
/// buffer); longer ones by a second thread while it reads.
const DIRECT_MAX: usize = 32 << 10;
/// Time to read a request the client closes after sending (never runs out), and one it
/// keeps open: the server waits that long for bytes that never come, then says 408.
const LONG: Duration = Duration::from_secs(5);
const SHORT: Duration = Duration::from_millis(1);

struct Input {
    stream: Vec<u8>,
    /// The client closes its end after the stream.
    eof: bool,
}

fn decode(data: &[u8]) -> Input {
    let Some((&flags, rest)) = data.split_first() else {
        return Input {
            stream: Vec::new(),
            eof: true,
        };
    };
    let stream = if flags & 2 == 0 {
        rest.to_vec()
    } else {
        let b = |i: usize| rest.get(i).copied().unwrap_or(0);
        let scale = if flags & 4 == 0 { 1 } else { 32 };
        let pad = usize::from(u16::from_le_bytes([b(0), b(1)])) * scale;
        let filler = b(2);
        let tail = rest.get(5..).unwrap_or_default();
        let at = usize::from(u16::from_le_bytes([b(3), b(4)])) % (tail.len() + 1);
        let mut s = Vec::with_capacity(tail.len() + pad);
        s.extend_from_slice(&tail[..at]);
        s.resize(at + pad, filler);
        s.extend_from_slice(&tail[at..]);
        s
    };
    let eof = !(flags & !6 == 1 && stream.len() <= DIRECT_MAX);
    Input { stream, eof }
}

/// What the server must do with a stream.
#[derive(Debug)]
enum Expect {
    /// No answer: the client sent nothing.
    Silence,
    /// The request, read whole.
    Request {
        method: String,
        path: String,
        head_len: usize,
        body: Vec<u8>,
    },
    /// An error with one of these statuses.
    Refuse(&'static [u16]),
}

struct Reference {
    expect: Expect,
    /// `100 Continue` must be sent.
    must_continue: bool,
    /// `100 Continue` may be sent.
    may_continue: bool,
}

fn refuse(statuses: &'static [u16]) -> Reference {
    Reference {
        expect: Expect::Refuse(statuses),
        must_continue: false,
        may_continue: false,
    }
}

fn reference(s: &[u8], eof: bool, threaded: bool) -> Reference {
    let incomplete: &'static [u16] = if eof { &[400] } else { &[408] };
    // The server stops reading a head once it has more than MAX_HEADER_BYTES, after a read of
    // at most CHUNK bytes: it never looks further than this.
    let seen = &s[..s.len().min(MAX_HEADER_BYTES + CHUNK)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(seen) {
        Err(httparse::Error::TooManyHeaders) => return refuse(&[431]),
        // The reads may stop past MAX_HEADER_BYTES before the bad byte.
        Err(_) if seen.len() > MAX_HEADER_BYTES => return refuse(&[400, 431]),
        Err(_) => return refuse(&[400]),
        Ok(httparse::Status::Partial) if seen.len() > MAX_HEADER_BYTES => return refuse(&[431]),
        Ok(httparse::Status::Partial) if s.is_empty() && eof => {
            return Reference {
                expect: Expect::Silence,
                must_continue: false,
                may_continue: false,
            }
        }
        Ok(httparse::Status::Partial) => return refuse(incomplete),
        Ok(httparse::Status::Complete(h)) => h,
    };
    if head_len > MAX_HEADER_BYTES {
        return refuse(&[431]);
    }
    // The framing rules, header by header in order.
    let mut length: Option<u64> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let Some(v) = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                else {
                    return refuse(&[400]);
                };
                if length.is_some_and(|old| old != v) {
                    return refuse(&[400]);
                }
                length = Some(v);
            }
            "transfer-encoding" => return refuse(&[411]),
            "expect" => expect_continue = h.value.eq_ignore_ascii_case(b"100-continue"),
            _ => {}
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY_BYTES as u64 {
        return refuse(&[413]);
    }
    let length = length as usize;
    // The server has read whole chunks (or the whole stream) when it sees the head complete;
    // it says 100 Continue when that read held no body byte. A second thread writing makes
    // the reads any length.
    let read_at_head = s.len().min(head_len.div_ceil(CHUNK) * CHUNK);
    let asks = expect_continue && length > 0;
    let must_continue = asks && !threaded && read_at_head == head_len;
    let may_continue = asks && (threaded || read_at_head == head_len);
    let rest = &s[head_len..];
    if rest.len() < length {
        return Reference {
            expect: Expect::Refuse(incomplete),
            must_continue,
            may_continue,
        };
    }
    let target = req.path.unwrap_or_default();
    Reference {
        expect: Expect::Request {
            method: req.method.unwrap_or_default().to_string(),
            path: target
                .split(['?', '#'])
                .next()
                .unwrap_or_default()
                .to_string(),
            head_len,
            body: rest[..length].to_vec(),
        },
        must_continue,
        may_continue,
    }
}

/// The result of reading a request.
type Outcome = Result<(String, String, Vec<u8>), Option<ApiError>>;

/// Runs the server's reader on `input` with `time` to read the request; its result, the bytes
/// it wrote back and the most memory it had allocated at once.
fn serve(input: &Input, time: Duration) -> (Outcome, Vec<u8>, usize) {
    let (client, mut server) = UnixStream::pair().expect("socketpair");
    let threaded = input.stream.len() > DIRECT_MAX;
    let deadline = Instant::now() + time;
    let (got, peak) = if threaded {
        std::thread::scope(|scope| {
            let writer = &client;
            scope.spawn(move || {
                // Fails with EPIPE once the server has stopped reading (SIGPIPE is ignored).
                let _ = (&*writer).write_all(&input.stream);
                let _ = writer.shutdown(Shutdown::Write);
            });
            let r = measure(|| read_request_for_fuzzing(&mut server, deadline));
            // Unblocks the writer if the server stopped reading before the end.
            let _ = server.shutdown(Shutdown::Read);
            r
        })
    } else {
        (&client)
            .write_all(&input.stream)
            .expect("write to the socket pair");
        if input.eof {
            client.shutdown(Shutdown::Write).expect("shutdown");
        }
        measure(|| read_request_for_fuzzing(&mut server, deadline))
    };
    // What the server wrote, read while its end is still open (closing a socket with unread
    // bytes resets the connection).
    let mut back = Vec::new();
    client.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 256];
    loop {
        match (&client).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the server's bytes: {e}"),
        }
    }
    drop(server);
    (got, back, peak)
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// The body a client sends for `req` (exhaustive: a new request must be added here).
fn client_body(req: &ApiRequest) -> Vec<u8> {
    let json = match req {
        ApiRequest::Configure(v) => serde_json::to_vec(v),
        ApiRequest::Shutdown(c) => serde_json::to_vec(c),
        ApiRequest::Snapshot(c) => serde_json::to_vec(c),
        ApiRequest::Restore(c) => serde_json::to_vec(c),
        ApiRequest::Ping
        | ApiRequest::Info
        | ApiRequest::Start
        | ApiRequest::Pause
        | ApiRequest::Resume
        | ApiRequest::Kill => return Vec::new(),
    };
    json.expect("a request's body encodes")
}

fn check_route(method: &str, path: &str, body: &[u8]) {
    let on_path: Vec<&Route> = routes().iter().filter(|r| r.path == path).collect();
    let route = match find_route(method, path) {
        Ok(r) => {
            assert!(
                r.path == path && r.method.as_str() == method,
                "{method} {path} routed to {r:?}"
            );
            r
        }
        Err((e, allowed)) => {
            assert!(STATUSES.contains(&e.status()), "status {}", e.status());
            if on_path.is_empty() {
                assert_eq!(e.status(), 404, "{method} {path}: {e}");
                assert!(allowed.is_empty(), "{method} {path}: allowed {allowed:?}");
            } else {
                assert_eq!(e.status(), 405, "{method} {path}: {e}");
                assert!(on_path.iter().all(|r| r.method.as_str() != method));
                let want: Vec<_> = on_path.iter().map(|r| r.method).collect();
                assert_eq!(allowed, want, "{method} {path}: allowed methods");
            }
            return;
        }
    };
    let req = match route.parse(body) {
        Ok(req) => req,
        Err(e) => {
            assert_eq!(e.status(), 400, "{route:?} {}: {e}", show(body));
            assert!(
                route.body_required || !is_blank(body),
                "{route:?} refused a blank optional body: {e}"
            );
            return;
        }
    };
    assert!(
        !(route.body_required && is_blank(body)),
        "{route:?} accepted a missing body: {req:?}"
    );
    let last = route.path.rsplit('/').next().unwrap_or_default();
    assert_eq!(req.name(), last, "{route:?} gave {req:?}");
    if matches!(
        req,
        ApiRequest::Ping
            | ApiRequest::Info
            | ApiRequest::Start
            | ApiRequest::Pause
            | ApiRequest::Resume
            | ApiRequest::Kill
    ) {
        let empty_object = serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v.as_object().is_some_and(|o| o.is_empty()));
        assert!(
            is_blank(body) || empty_object,
            "{route:?} took a body: {}",
            show(body)
        );
    }
    // Compared as JSON values: the config and overrides are opaque JSON.
    let value = |r: &ApiRequest| serde_json::to_value(r).expect("a request encodes");
    let json = serde_json::to_string(&req).expect("a request encodes");
    let back: ApiRequest = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("{req:?} encoded as {json} does not parse back: {e}"));
    assert!(
        value(&back) == value(&req),
        "{req:?} round trip through {json}: {back:?}"
    );
    let resent = client_body(&req);
    let again = route
        .parse(&resent)
        .unwrap_or_else(|e| panic!("{req:?} sent again as {} is refused: {e}", show(&resent)));
    assert!(
        value(&again) == value(&req),
        "{req:?} sent again as {}: {again:?}",
        show(&resent)
    );
}

fn show(s: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&s[..s.len().min(600)]).into_owned();
    if s.len() > 600 {
        format!("{shown:?}... ({} bytes)", s.len())
    } else {
        format!("{shown:?}")
    }
}

fuzz_target!(|data: &[u8]| {
    static IGNORE_SIGPIPE: Once = Once::new();
    // SAFETY: sets the disposition of SIGPIPE to ignored; nothing else in the process
    // handles it.
    IGNORE_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });

    let input = decode(data);
    let s = &input.stream;
    let threaded = s.len() > DIRECT_MAX;
    let want = reference(s, input.eof, threaded);
    let mut run = serve(&input, if input.eof { LONG } else { SHORT });
    let timed_out = |r: &Outcome| matches!(r, Err(Some(e)) if e.status() == 408);
    if timed_out(&run.0) && !matches!(want.expect, Expect::Refuse(&[408])) {
        // A slow machine, not a missing byte? Again with all the time the server gives.
        run = serve(&input, LONG);
    }
    let (got, back, peak) = run;
    if std::env::var_os("API_FUZZ_TRACE").is_some() {
        eprintln!(
            "api_http: {} bytes (eof {}): {:?}; wrote {}; peak {peak} bytes",
            s.len(),
            input.eof,
            got.as_ref().map(|_| "read"),
            show(&back)
        );
        if let Ok((m, p, body)) = &got {
            eprintln!("api_http: {m} {p}, body {}", show(body));
            eprintln!(
                "api_http: route: {:?}",
                find_route(m, p).map(|r| r.parse(body))
            );
        }
    }
    let ctx = || format!("stream {} (eof {})", show(s), input.eof);

    let limit = MAX_BODY_BYTES + 4 * MAX_HEADER_BYTES + (64 << 10);
    assert!(
        peak <= limit,
        "reading allocated {peak} bytes at once; {}",
        ctx()
    );

    let continued = match back.as_slice() {
        [] => false,
        b if b == CONTINUE => true,
        b => panic!("the server wrote {} while reading; {}", show(b), ctx()),
    };
    assert!(
        !want.must_continue || continued,
        "no 100 Continue; {}",
        ctx()
    );
    assert!(
        want.may_continue || !continued,
        "unasked 100 Continue; {}",
        ctx()
    );

    match (got, want.expect) {
        (Err(None), Expect::Silence) => {}
        (Err(Some(e)), Expect::Refuse(statuses)) => {
            assert!(STATUSES.contains(&e.status()), "status {}: {e}", e.status());
            assert!(
                statuses.contains(&e.status()),
                "{} ({e}), expected one of {statuses:?}; {}",
                e.status(),
                ctx()
            );
            assert!(!e.message.is_empty());
        }
        (
            Ok((method, path, body)),
            Expect::Request {
                method: want_method,
                path: want_path,
                head_len,
                body: want_body,
            },
        ) => {
            assert!(head_len <= MAX_HEADER_BYTES && body.len() <= MAX_BODY_BYTES);
            assert_eq!((&method, &path), (&want_method, &want_path), "{}", ctx());
            assert!(
                body == want_body,
                "body {} expected {}; {}",
                show(&body),
                show(&want_body),
                ctx()
            );
            check_route(&method, &path, &body);
        }
        (got, want) => panic!("read {got:?}, expected {want:?}; {}", ctx()),
    }
});
