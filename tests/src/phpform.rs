//! Encodes a JSON value the way PHP's `http_build_query` does, which is how Bitrix24
//! (a PHP application) writes the bodies it POSTs: `data[FIELDS][ID]=6799`.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

/// PHP's `urlencode`: everything but `A-Za-z0-9-_.` is escaped; space becomes `+`.
const PHP_URLENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b' ');

pub fn urlencode(s: &str) -> String {
    utf8_percent_encode(s, PHP_URLENCODE)
        .to_string()
        .replace(' ', "+")
}

pub fn http_build_query(v: &Value) -> String {
    let mut pairs = Vec::new();
    if let Value::Object(o) = v {
        for (k, v) in o {
            push(&mut pairs, urlencode(k), v);
        }
    }
    pairs.join("&")
}

fn push(pairs: &mut Vec<String>, key: String, v: &Value) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                push(pairs, format!("{key}%5B{}%5D", urlencode(k)), v);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                push(pairs, format!("{key}%5B{i}%5D"), v);
            }
        }
        Value::String(s) => pairs.push(format!("{key}={}", urlencode(s))),
        Value::Number(n) => pairs.push(format!("{key}={n}")),
        Value::Bool(b) => pairs.push(format!("{key}={}", u8::from(*b))),
        Value::Null => {}
    }
}

/// The value a form body decodes to: every scalar becomes a string.
pub fn stringify(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), stringify(v))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(stringify).collect()),
        Value::Number(n) => Value::String(n.to_string()),
        Value::Bool(b) => Value::String(u8::from(*b).to_string()),
        other => other.clone(),
    }
}
