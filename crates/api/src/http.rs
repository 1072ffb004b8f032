//! Just enough HTTP/1.1 for the API, on top of `httparse`: read one request with size and time
//! limits, write one response, and (for the client) read one response. Every connection carries
//! one exchange and is then closed (`Connection: close`), so there is no pipelining to handle.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::types::{ApiError, ApiErrorKind};

/// The most header bytes (request line included) the server reads before answering 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The largest request body the server accepts before answering 413 (1 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The largest response body the client accepts.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
const MAX_HEADERS: usize = 32;

/// A request as read off the socket, before routing.
#[derive(Debug)]
pub(crate) struct RawRequest {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// Why no request could be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the connection before sending anything: nothing to answer.
    Closed,
    /// The socket failed; the peer cannot be answered.
    Io,
    /// The request is unacceptable; answer with this error.
    Reply(ApiError),
}

impl From<ApiError> for ReadError {
    fn from(e: ApiError) -> Self {
        ReadError::Reply(e)
    }
}

fn timeout_error() -> ApiError {
    ApiError::new(
        ApiErrorKind::RequestTimeout,
        "the request did not arrive in time: send the whole request at once",
    )
}

/// Reads into `buf` with whatever time is left before `deadline`. Returns the bytes read (0 at
/// end of stream).
fn read_some(
    stream: &mut UnixStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<usize, ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timeout_error().into());
    }
    stream
        .set_read_timeout(Some(left))
        .map_err(|_| ReadError::Io)?;
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timeout_error().into())
            }
            Err(_) => return Err(ReadError::Io),
        }
    }
}

/// Reads one request from `stream`, which must arrive whole before `deadline`. Headers are capped
/// at [`MAX_HEADER_BYTES`] and the body at [`MAX_BODY_BYTES`]; the body must be framed by
/// `Content-Length`. Answers `Expect: 100-continue` itself.
pub(crate) fn read_request(
    stream: &mut UnixStream,
    deadline: Instant,
) -> Result<RawRequest, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = read_some(stream, &mut chunk, deadline)?;
        if n == 0 {
            if buf.is_empty() {
                return Err(ReadError::Closed);
            }
            return Err(ApiError::bad_request(
                "the connection closed in the middle of the request headers",
            )
            .into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEADER_BYTES {
                    return Err(headers_too_large().into());
                }
            }
            Ok(httparse::Status::Complete(head_len)) => {
                if head_len > MAX_HEADER_BYTES {
                    return Err(headers_too_large().into());
                }
                let method = req.method.unwrap_or_default().to_string();
                let target = req.path.unwrap_or_default();
                let path = target.split(['?', '#']).next().unwrap_or_default().to_string();
                let framing = body_framing(req.headers)?;
                let body_start = buf.split_off(head_len);
                let body = read_body(stream, body_start, framing, deadline)?;
                return Ok(RawRequest { method, path, body });
            }
            Err(httparse::Error::TooManyHeaders) => return Err(headers_too_large().into()),
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "malformed HTTP request ({e}): send an HTTP/1.1 request such as `GET /api/v1/vm/info`"
                ))
                .into())
            }
        }
    }
}

fn headers_too_large() -> ApiError {
    ApiError::new(
        ApiErrorKind::HeadersTooLarge,
        format!(
            "the request headers are over {} KiB or {MAX_HEADERS} lines: send fewer",
            MAX_HEADER_BYTES / 1024
        ),
    )
}

struct Framing {
    content_length: usize,
    expect_continue: bool,
}

fn body_framing(headers: &[httparse::Header<'_>]) -> Result<Framing, ApiError> {
    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("the Content-Length header is not a number")
                })?;
            if content_length.is_some_and(|old| old != v) {
                return Err(ApiError::bad_request(
                    "the request has two different Content-Length headers",
                ));
            }
            content_length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError::new(
                ApiErrorKind::LengthRequired,
                "chunked request bodies are not supported: send the body with a Content-Length",
            ));
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY_BYTES as u64 {
        return Err(body_too_large(content_length));
    }
    Ok(Framing {
        // Cannot truncate: bounded by MAX_BODY_BYTES just above.
        content_length: content_length as usize,
        expect_continue,
    })
}

fn body_too_large(len: u64) -> ApiError {
    ApiError::new(
        ApiErrorKind::PayloadTooLarge,
        format!(
            "the request body is {len} bytes, over the {} KiB limit: send a smaller body",
            MAX_BODY_BYTES / 1024
        ),
    )
}

fn read_body(
    stream: &mut UnixStream,
    mut body: Vec<u8>,
    framing: Framing,
    deadline: Instant,
) -> Result<Vec<u8>, ReadError> {
    let want = framing.content_length;
    if body.len() >= want {
        body.truncate(want);
        return Ok(body);
    }
    if framing.expect_continue && body.is_empty() {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|_| ReadError::Io)?;
    }
    body.reserve(want - body.len());
    let mut chunk = [0u8; 16 * 1024];
    while body.len() < want {
        let room = (want - body.len()).min(chunk.len());
        let n = read_some(stream, &mut chunk[..room], deadline)?;
        if n == 0 {
            return Err(ApiError::bad_request(format!(
                "the connection closed after {} of the {want} body bytes announced by Content-Length",
                body.len()
            ))
            .into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(body)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes one response and flushes it. `body` is JSON; a 204 must have none.
pub(crate) fn write_response(
    stream: &mut impl Write,
    status: u16,
    extra_headers: &[(&str, String)],
    body: Option<&str>,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: ferrovisor\r\nConnection: close\r\n",
        reason(status)
    );
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        out.push_str("\r\n");
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// A response as the client reads it.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Reads one response (skipping any `1xx`), framed by `Content-Length` or by the end of the
/// stream. The stream's read timeout bounds each read.
pub(crate) fn read_response(stream: &mut impl Read) -> io::Result<RawResponse> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let parsed = resp
            .parse(&buf)
            .map_err(|e| bad(format!("malformed HTTP response: {e}")))?;
        if let httparse::Status::Complete(head_len) = parsed {
            let status = resp.code.unwrap_or_default();
            let mut content_length = None;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    let v = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|s| s.trim().parse::<usize>().ok())
                        .ok_or_else(|| bad("bad Content-Length in the response".into()))?;
                    content_length = Some(v);
                }
            }
            let mut rest = buf.split_off(head_len);
            if (100..200).contains(&status) {
                buf = rest;
                continue;
            }
            let want = match (status, content_length) {
                (204 | 304, _) => 0,
                (_, Some(n)) => n,
                (_, None) => MAX_RESPONSE_BYTES,
            };
            if want > MAX_RESPONSE_BYTES {
                return Err(bad(format!(
                    "the response body is too large ({want} bytes)"
                )));
            }
            while rest.len() < want {
                let n = read_retrying(stream, &mut chunk)?;
                if n == 0 {
                    if content_length.is_some() {
                        return Err(bad(
                            "the connection closed in the middle of the response".into()
                        ));
                    }
                    break;
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            rest.truncate(want);
            return Ok(RawResponse { status, body: rest });
        }
        if buf.len() > MAX_HEADER_BYTES {
            return Err(bad("the response headers are too large".into()));
        }
        let n = read_retrying(stream, &mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection without answering",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn read_retrying(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_with_body_has_length_and_type() {
        let mut out = Vec::new();
        write_response(&mut out, 200, &[], Some("{}")).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 2\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{}"), "{text}");
    }

    #[test]
    fn no_content_response_has_no_length() {
        let mut out = Vec::new();
        write_response(&mut out, 204, &[], None).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("Content-Length"), "{text}");
        let parsed = read_response(&mut text.as_bytes()).unwrap();
        assert_eq!((parsed.status, parsed.body.len()), (204, 0));
    }

    #[test]
    fn client_skips_continue_and_reads_to_length() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 409 Conflict\r\nContent-Length: 4\r\n\r\nabcdEXTRA";
        let parsed = read_response(&mut &wire[..]).unwrap();
        assert_eq!(parsed.status, 409);
        assert_eq!(parsed.body, b"abcd");
    }

    #[test]
    fn client_reads_unframed_body_to_end_of_stream() {
        let wire = b"HTTP/1.1 500 Internal Server Error\r\n\r\n{\"error\":\"x\"}";
        let parsed = read_response(&mut &wire[..]).unwrap();
        assert_eq!(parsed.body, b"{\"error\":\"x\"}");
    }

    #[test]
    fn oversized_content_length_is_refused_before_reading() {
        let headers = [httparse::Header {
            name: "Content-Length",
            value: b"1048577",
        }];
        let e = body_framing(&headers).err().unwrap();
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn chunked_body_asks_for_a_length() {
        let headers = [httparse::Header {
            name: "Transfer-Encoding",
            value: b"chunked",
        }];
        assert_eq!(body_framing(&headers).err().unwrap().status(), 411);
    }
}
