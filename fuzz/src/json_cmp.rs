//! Comparing JSON values that went through serde_json.
//!
//! serde_json's default float parser may read the shortest decimal form it wrote of an `f64`
//! back as a neighbouring `f64`: the parser targets found one unit in the last place
//! (`5.971697858821402e141` came back as `5.9716978588214016e141`) and then two
//! (`9.571697858821401e142` as `9.571697858821399e142`, in a VM config sent to the API). So the
//! workspace enables serde_json's `float_roundtrip` feature, which parses every float to the
//! nearest `f64`, and [`same`] is exact again. It stays a function so the targets keep one
//! place to say how parsed JSON compares.

use serde_json::Value;

/// `a == b`: floats included, bit for bit (see the module comment).
pub fn same(a: &Value, b: &Value) -> bool {
    a == b
}
