//! The route table: which method on which path becomes which [`ApiRequest`], and how its body is
//! parsed. The server routes through it and the OpenAPI test checks `docs/openapi.json` against it.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::types::{ApiError, ApiErrorKind, ApiRequest, RestoreConfig, ShutdownConfig};

/// Every endpoint's path starts with this.
pub const API_PREFIX: &str = "/api/v1";

/// The HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Read something; no body.
    Get,
    /// Carry out an action, or set something; an optional JSON body.
    Put,
}

impl Method {
    /// The method as HTTP spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One endpoint: a method on a path, and how its body becomes an [`ApiRequest`].
#[derive(Clone, Copy)]
pub struct Route {
    /// The method.
    pub method: Method,
    /// The full path, [`API_PREFIX`] included.
    pub path: &'static str,
    /// Does the request carry a body that must be there?
    pub body_required: bool,
    parse: fn(&Route, &[u8]) -> Result<ApiRequest, ApiError>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

impl Route {
    /// Parses `body` into this endpoint's request; a 400 [`ApiError`] says what is wrong.
    pub fn parse(&self, body: &[u8]) -> Result<ApiRequest, ApiError> {
        (self.parse)(self, body)
    }
}

const fn route(
    method: Method,
    path: &'static str,
    body_required: bool,
    parse: fn(&Route, &[u8]) -> Result<ApiRequest, ApiError>,
) -> Route {
    Route {
        method,
        path,
        body_required,
        parse,
    }
}

static ROUTES: [Route; 10] = [
    route(Method::Get, "/api/v1/vmm/ping", false, |r, b| {
        no_body(r, b, ApiRequest::Ping)
    }),
    route(Method::Get, "/api/v1/vm/info", false, |r, b| {
        no_body(r, b, ApiRequest::Info)
    }),
    route(Method::Put, "/api/v1/vm/config", true, parse_config),
    route(Method::Put, "/api/v1/vm/start", false, |r, b| {
        no_body(r, b, ApiRequest::Start)
    }),
    route(Method::Put, "/api/v1/vm/pause", false, |r, b| {
        no_body(r, b, ApiRequest::Pause)
    }),
    route(Method::Put, "/api/v1/vm/resume", false, |r, b| {
        no_body(r, b, ApiRequest::Resume)
    }),
    route(Method::Put, "/api/v1/vm/shutdown", false, |r, b| {
        let config = if is_blank(b) {
            ShutdownConfig::default()
        } else {
            json_body(r, b, "{\"timeout_s\": 10}")?
        };
        Ok(ApiRequest::Shutdown(config))
    }),
    route(Method::Put, "/api/v1/vm/kill", false, |r, b| {
        no_body(r, b, ApiRequest::Kill)
    }),
    route(Method::Put, "/api/v1/vm/snapshot", true, |r, b| {
        json_body(r, b, "{\"dir\": \"/path/to/dir\", \"diff\": false}").map(ApiRequest::Snapshot)
    }),
    route(Method::Put, "/api/v1/vm/restore", true, |r, b| {
        json_body::<RestoreConfig>(r, b, "{\"dir\": \"/path/to/dir\", \"resume\": true}")
            .map(ApiRequest::Restore)
    }),
];

/// The route table: every endpoint the server knows.
pub fn routes() -> &'static [Route] {
    &ROUTES
}

/// Finds the route for `method` (as sent) on `path` (without its query string). A path the API
/// does not have is a 404; a known path with another method is a 405 whose error carries the
/// allowed methods in the second tuple field.
pub fn find_route(method: &str, path: &str) -> Result<&'static Route, (ApiError, Vec<Method>)> {
    let on_path: Vec<&Route> = ROUTES.iter().filter(|r| r.path == path).collect();
    if on_path.is_empty() {
        let hint = if path.starts_with(API_PREFIX) {
            "see docs/api.md for the endpoints"
        } else {
            "the API lives under /api/v1 (e.g. GET /api/v1/vm/info)"
        };
        return Err((
            ApiError::new(
                ApiErrorKind::NotFound,
                format!("no endpoint at {path}: {hint}"),
            ),
            Vec::new(),
        ));
    }
    if let Some(r) = on_path.iter().find(|r| r.method.as_str() == method) {
        return Ok(r);
    }
    let allowed: Vec<Method> = on_path.iter().map(|r| r.method).collect();
    let names: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
    Err((
        ApiError::new(
            ApiErrorKind::MethodNotAllowed,
            format!("{path} does not take {method}: use {}", names.join(" or ")),
        ),
        allowed,
    ))
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// Whether `body` is an empty JSON object, the only body an action without parameters
/// accepts besides none. (Not a field-less struct: serde reads those from `[]` too.)
fn is_empty_object(body: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<serde_json::Value>(body),
        Ok(serde_json::Value::Object(o)) if o.is_empty()
    )
}

fn no_body(route: &Route, body: &[u8], request: ApiRequest) -> Result<ApiRequest, ApiError> {
    if is_blank(body) || is_empty_object(body) {
        return Ok(request);
    }
    Err(ApiError::bad_request(format!(
        "{} {} takes no body: send none (or {{}})",
        route.method, route.path
    )))
}

fn json_body<T: DeserializeOwned>(
    route: &Route,
    body: &[u8],
    example: &str,
) -> Result<T, ApiError> {
    if is_blank(body) {
        return Err(ApiError::bad_request(format!(
            "{} {} needs a JSON body, such as {example}",
            route.method, route.path
        )));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid body for {} {}: {e}; send JSON such as {example}",
            route.method, route.path
        ))
    })
}

fn parse_config(route: &Route, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let example = "{\"kernel\": \"/path/to/vmlinux\", \"memory\": \"512M\"}";
    let config: Value = json_body(route, body, example)?;
    if !config.is_object() {
        return Err(ApiError::bad_request(format!(
            "the VM config must be a JSON object, such as {example}"
        )));
    }
    Ok(ApiRequest::Configure(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::SnapshotConfig;

    fn parse(method: &str, path: &str, body: &str) -> Result<ApiRequest, ApiError> {
        find_route(method, path)
            .map_err(|(e, _)| e)?
            .parse(body.as_bytes())
    }

    #[test]
    fn every_route_is_found_by_its_method_and_path() {
        for r in routes() {
            let found = find_route(r.method.as_str(), r.path).unwrap();
            assert_eq!((found.method, found.path), (r.method, r.path));
        }
    }

    #[test]
    fn routes_are_unique_and_prefixed() {
        let mut seen = std::collections::HashSet::new();
        for r in routes() {
            assert!(r.path.starts_with(API_PREFIX), "{r:?}");
            assert!(seen.insert((r.method, r.path)), "duplicate {r:?}");
        }
    }

    #[test]
    fn wrong_method_lists_the_allowed_one() {
        let (e, allowed) = find_route("POST", "/api/v1/vm/pause").unwrap_err();
        assert_eq!(e.status(), 405);
        assert_eq!(allowed, [Method::Put]);
        assert!(e.message.contains("use PUT"), "{}", e.message);
    }

    #[test]
    fn unknown_path_is_not_found() {
        let (e, _) = find_route("GET", "/vm/info").unwrap_err();
        assert_eq!(e.status(), 404);
        assert!(e.message.contains("/api/v1"), "{}", e.message);
    }

    #[test]
    fn action_accepts_no_body_or_empty_object_only() {
        assert_eq!(
            parse("PUT", "/api/v1/vm/pause", "").unwrap(),
            ApiRequest::Pause
        );
        assert_eq!(
            parse("PUT", "/api/v1/vm/pause", " {} ").unwrap(),
            ApiRequest::Pause
        );
        let e = parse("PUT", "/api/v1/vm/pause", "{\"now\": true}").unwrap_err();
        assert_eq!(e.status(), 400);
        // An empty array is not an empty object (found by the api_http fuzz target).
        for body in ["[]", " [ ] ", "null", "0"] {
            let e = parse("PUT", "/api/v1/vm/pause", body).unwrap_err();
            assert_eq!(e.status(), 400, "{body:?}");
        }
    }

    #[test]
    fn shutdown_body_is_optional() {
        let none = parse("PUT", "/api/v1/vm/shutdown", "").unwrap();
        assert_eq!(
            none,
            ApiRequest::Shutdown(ShutdownConfig { timeout_s: None })
        );
        let some = parse("PUT", "/api/v1/vm/shutdown", "{\"timeout_s\": 7}").unwrap();
        assert_eq!(
            some,
            ApiRequest::Shutdown(ShutdownConfig { timeout_s: Some(7) })
        );
    }

    #[test]
    fn snapshot_diff_defaults_to_false_and_unknown_fields_are_refused() {
        let r = parse("PUT", "/api/v1/vm/snapshot", "{\"dir\": \"/s\"}").unwrap();
        assert_eq!(
            r,
            ApiRequest::Snapshot(SnapshotConfig {
                dir: "/s".into(),
                diff: false
            })
        );
        let e = parse(
            "PUT",
            "/api/v1/vm/snapshot",
            "{\"dir\": \"/s\", \"dif\": true}",
        )
        .unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.message.contains("unknown field `dif`"), "{}", e.message);
    }

    #[test]
    fn wrong_field_type_is_a_bad_request() {
        let e = parse("PUT", "/api/v1/vm/shutdown", "{\"timeout_s\": \"soon\"}").unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn config_must_be_an_object() {
        let e = parse("PUT", "/api/v1/vm/config", "[1, 2]").unwrap_err();
        assert_eq!(e.status(), 400);
        let e = parse("PUT", "/api/v1/vm/config", "").unwrap_err();
        assert!(e.message.contains("needs a JSON body"), "{}", e.message);
    }
}
