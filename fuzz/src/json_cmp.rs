//! Comparing JSON values where serde_json itself cannot round-trip exactly.
//!
//! Without its `float_roundtrip` feature (the workspace does not enable it), serde_json may
//! parse the shortest decimal form it wrote of an `f64` to a neighbouring `f64`, one unit in
//! the last place away (`5.971697858821402e141` comes back as `5.9716978588214016e141`). The
//! parser targets found that in opaque JSON (VM configs, restore overrides, saved states) at
//! once; no typed field of the API or of a snapshot is a float. [`same`] is `==` except that
//! two floats may be 1 ULP apart.

use serde_json::Value;

/// `a == b`, except that two floats compare equal when at most 1 ULP apart.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(f), Some(g)) if x.is_f64() && y.is_f64() => {
                f == g
                    || (f.is_sign_negative() == g.is_sign_negative()
                        && f.to_bits().abs_diff(g.to_bits()) <= 1)
            }
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, p)| y.get(k).is_some_and(|q| same(p, q)))
        }
        _ => a == b,
    }
}
