//! docs/openapi.json against the implementation, both ways: the same routes and methods, the same
//! request and response fields, the same required fields.

use std::collections::BTreeSet;

use api::{routes, ApiRequest, Method, PingResponse, VmBackend, VmInfo, VmState, API_PREFIX};
use serde_json::{json, Value};

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Follows a `#/components/...` reference.
fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').unwrap();
            spec.pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {r}"))
        }
        None => v,
    }
}

fn spec_routes(spec: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), format!("{API_PREFIX}{path}")));
        }
    }
    out
}

fn operation<'a>(spec: &'a Value, method: Method, full_path: &str) -> &'a Value {
    let path = full_path.strip_prefix(API_PREFIX).unwrap();
    &spec["paths"][path][method.as_str().to_lowercase()]
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn string_set(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn server_url_carries_the_api_prefix() {
    let spec = spec();
    assert_eq!(
        spec["openapi"].as_str().unwrap().split('.').next(),
        Some("3")
    );
    let url = spec["servers"][0]["url"].as_str().unwrap();
    assert!(url.ends_with(API_PREFIX), "{url}");
}

#[test]
fn every_routed_endpoint_is_documented_and_every_documented_one_routed() {
    let spec = spec();
    let documented = spec_routes(&spec);
    let routed: BTreeSet<(String, String)> = routes()
        .iter()
        .map(|r| (r.method.as_str().to_string(), r.path.to_string()))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routed but not in openapi.json: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "in openapi.json but not routed: {unrouted:?}"
    );
}

#[test]
fn success_status_matches_method() {
    let spec = spec();
    for r in routes() {
        let op = operation(&spec, r.method, r.path);
        let ok = match r.method {
            Method::Get => "200",
            Method::Put => "204",
        };
        assert!(
            op["responses"].get(ok).is_some(),
            "{r:?} does not document {ok}"
        );
    }
}

#[test]
fn request_bodies_match_the_rust_types() {
    let spec = spec();
    for r in routes() {
        let op = operation(&spec, r.method, r.path);
        let Some(body) = op.get("requestBody") else {
            assert!(
                !r.body_required,
                "{r:?} needs a body the file does not describe"
            );
            // Routes without a documented body take none (or {}).
            r.parse(b"").unwrap();
            let with_field = r.parse(br#"{"unexpected": 1}"#).unwrap_err();
            assert_eq!(with_field.status(), 400, "{r:?}");
            continue;
        };
        let body = resolve(&spec, body);
        assert_eq!(
            body["required"].as_bool().unwrap_or(false),
            r.body_required,
            "{r:?}: requestBody.required differs from the router"
        );
        let schema = resolve(&spec, &body["content"]["application/json"]["schema"]);
        let example = schema
            .get("example")
            .unwrap_or_else(|| panic!("{r:?}: the body schema needs a full example"));
        let parsed = r
            .parse(example.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{r:?}: the file's example is refused: {e}"));

        if schema["additionalProperties"] == json!(true) {
            // An opaque object (the VM config): anything object-shaped passes through.
            assert_eq!(parsed, ApiRequest::Configure(example.clone()), "{r:?}");
            continue;
        }
        let documented = keys(&schema["properties"]);
        assert_eq!(
            keys(example),
            documented,
            "{r:?}: the example must use every property"
        );
        // The Rust type's fields, as it serialises a fully populated value.
        let rust_body = serde_json::to_value(&parsed).unwrap()["body"].clone();
        assert_eq!(keys(&rust_body), documented, "{r:?}: fields differ");

        let required = string_set(&schema["required"]);
        for field in &documented {
            let mut without = example.clone();
            without.as_object_mut().unwrap().remove(field);
            let result = r.parse(without.to_string().as_bytes());
            assert_eq!(
                result.is_err(),
                required.contains(field),
                "{r:?}: `{field}` is required in one of the file and the type but not the other"
            );
        }
        assert_eq!(schema["additionalProperties"], json!(false), "{r:?}");
        let mut extra = example.clone();
        extra["not_a_field"] = json!(1);
        assert_eq!(
            r.parse(extra.to_string().as_bytes()).unwrap_err().status(),
            400,
            "{r:?}: unknown fields must be refused"
        );
    }
}

fn response_schema<'a>(spec: &'a Value, method: Method, path: &str) -> &'a Value {
    let op = operation(spec, method, path);
    resolve(
        spec,
        &op["responses"]["200"]["content"]["application/json"]["schema"],
    )
}

#[test]
fn response_bodies_match_the_rust_types() {
    let spec = spec();
    let ping = response_schema(&spec, Method::Get, "/api/v1/vmm/ping");
    let rust = serde_json::to_value(PingResponse::current()).unwrap();
    assert_eq!(keys(&rust), keys(&ping["properties"]));
    assert_eq!(keys(&rust), string_set(&ping["required"]));

    let info = response_schema(&spec, Method::Get, "/api/v1/vm/info");
    let rust = serde_json::to_value(VmInfo {
        state: VmState::Running,
        backend: Some(VmBackend::Kvm),
        config: Some(json!({})),
    })
    .unwrap();
    assert_eq!(keys(&rust), keys(&info["properties"]));
    assert_eq!(keys(&rust), string_set(&info["required"]));
}

#[test]
fn enums_match_the_rust_types() {
    let spec = spec();
    let states = [
        VmState::NotConfigured,
        VmState::Configured,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
    ];
    let rust: BTreeSet<String> = states
        .iter()
        .map(|s| {
            serde_json::to_value(s)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let documented = string_set(&spec["components"]["schemas"]["VmState"]["enum"]);
    assert_eq!(rust, documented);

    let rust: BTreeSet<String> = [VmBackend::Kvm, VmBackend::Emu]
        .iter()
        .map(|b| {
            serde_json::to_value(b)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let info = &spec["components"]["schemas"]["VmInfo"];
    assert_eq!(rust, string_set(&info["properties"]["backend"]["enum"]));
}

#[test]
fn error_responses_use_the_error_body() {
    let spec = spec();
    for (name, response) in spec["components"]["responses"].as_object().unwrap() {
        let schema = resolve(&spec, &response["content"]["application/json"]["schema"]);
        assert_eq!(
            string_set(&schema["required"]),
            BTreeSet::from(["error".to_string()]),
            "{name}"
        );
    }
    let body: Value = serde_json::from_str(&api::ApiError::conflict("x").to_json()).unwrap();
    assert_eq!(keys(&body), BTreeSet::from(["error".to_string()]));
}
