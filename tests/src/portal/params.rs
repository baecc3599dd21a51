//! How the simulated portal reads parameters: the way PHP does, so a client that encodes
//! them wrongly fails here as it would against Bitrix24. Written independently of
//! `b24_shared::form` on purpose: a harness that shared the decoder under test would
//! share its bugs.
//!
//! Object keys keep their arrival order ([`PValue`]), because PHP arrays do and `batch`
//! runs its commands in that order.

use percent_encoding::percent_decode;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// PHP's `max_input_nesting_level`; deeper keys are dropped, as PHP drops them.
const MAX_DEPTH: usize = 64;
/// PHP's `max_input_vars`; pairs beyond it are ignored.
const MAX_VARS: usize = 10_000;

/// A JSON-like value whose objects keep their keys in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub enum PValue {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    List(Vec<PValue>),
    Map(Vec<(String, PValue)>),
}

impl PValue {
    pub fn empty_map() -> Self {
        PValue::Map(Vec::new())
    }

    pub fn to_json(&self) -> Value {
        match self {
            PValue::Null => Value::Null,
            PValue::Bool(b) => Value::Bool(*b),
            PValue::Num(n) => Value::Number(n.clone()),
            PValue::Str(s) => Value::String(s.clone()),
            PValue::List(l) => Value::Array(l.iter().map(PValue::to_json).collect()),
            PValue::Map(m) => {
                let mut o = Map::new();
                for (k, v) in m {
                    o.insert(k.clone(), v.to_json());
                }
                Value::Object(o)
            }
        }
    }

    /// The entries of a map, or of a list keyed by index; nothing for a scalar.
    pub fn entries(&self) -> Vec<(String, PValue)> {
        match self {
            PValue::Map(m) => m.clone(),
            PValue::List(l) => l
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&PValue> {
        match self {
            PValue::Map(m) => m.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Sets `key` at the top level, replacing an earlier value (PHP: later wins).
    pub fn set(&mut self, key: String, value: PValue) {
        if let PValue::Map(m) = self {
            m.retain(|(k, _)| *k != key);
            m.push((key, value));
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<PValue> {
        if let PValue::Map(m) = self {
            let pos = m.iter().position(|(k, _)| k == key)?;
            let (_, v) = m.remove(pos);
            m.retain(|(k, _)| k != key);
            return Some(v);
        }
        None
    }

    /// The value as PHP would print it in a string context; `None` for arrays.
    pub fn as_text(&self) -> Option<String> {
        match self {
            PValue::Null => Some(String::new()),
            PValue::Bool(b) => Some(if *b { "1".into() } else { String::new() }),
            PValue::Num(n) => Some(n.to_string()),
            PValue::Str(s) => Some(s.clone()),
            PValue::List(_) | PValue::Map(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for PValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<PValue, E> {
                Ok(PValue::Null)
            }
            fn visit_none<E>(self) -> Result<PValue, E> {
                Ok(PValue::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<PValue, E> {
                Ok(PValue::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<PValue, E> {
                Ok(PValue::Num(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<PValue, E> {
                Ok(PValue::Num(n.into()))
            }
            fn visit_f64<E>(self, n: f64) -> Result<PValue, E> {
                Ok(serde_json::Number::from_f64(n).map_or(PValue::Null, PValue::Num))
            }
            fn visit_str<E>(self, s: &str) -> Result<PValue, E> {
                Ok(PValue::Str(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<PValue, E> {
                Ok(PValue::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PValue, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(PValue::List(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PValue, A::Error> {
                let mut out = PValue::empty_map();
                while let Some((k, v)) = map.next_entry::<String, PValue>()? {
                    out.set(k, v);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// PHP's `urldecode`: `+` is a space, `%XX` a byte; invalid UTF-8 is replaced.
fn urldecode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_decode(plus.as_bytes())
        .decode_utf8_lossy()
        .into_owned()
}

enum Seg {
    Key(String),
    Append,
}

/// Splits `a[b][]` into `a`, `b`, append. A `[` without its `]` makes the rest literal
/// (PHP turns that `[` into `_`, which this mirrors).
fn split_key(key: &str) -> Option<Vec<Seg>> {
    let (base, mut rest) = match key.find('[') {
        Some(i) if key[i..].contains(']') => (&key[..i], &key[i..]),
        Some(i) => return Some(vec![Seg::Key(format!("{}_{}", &key[..i], &key[i + 1..]))]),
        None => (key, ""),
    };
    if base.is_empty() {
        return None;
    }
    let mut segs = vec![Seg::Key(base.to_owned())];
    while let Some(stripped) = rest.strip_prefix('[') {
        let Some(end) = stripped.find(']') else { break };
        let inner = &stripped[..end];
        segs.push(if inner.is_empty() {
            Seg::Append
        } else {
            Seg::Key(inner.to_owned())
        });
        rest = &stripped[end + 1..];
        if segs.len() > MAX_DEPTH {
            return None;
        }
    }
    Some(segs)
}

fn next_index(m: &[(String, PValue)]) -> String {
    let max = m.iter().filter_map(|(k, _)| k.parse::<u64>().ok()).max();
    max.map_or(0, |n| n.saturating_add(1)).to_string()
}

fn insert(node: &mut PValue, segs: &[Seg], value: String) {
    let Some((first, rest)) = segs.split_first() else {
        return;
    };
    if !matches!(node, PValue::Map(_)) {
        *node = PValue::empty_map();
    }
    let PValue::Map(m) = node else { return };
    let key = match first {
        Seg::Key(k) => k.clone(),
        Seg::Append => next_index(m),
    };
    if rest.is_empty() {
        m.retain(|(k, _)| *k != key);
        m.push((key, PValue::Str(value)));
        return;
    }
    let pos = match m.iter().position(|(k, _)| *k == key) {
        Some(p) => p,
        None => {
            m.push((key, PValue::empty_map()));
            m.len() - 1
        }
    };
    insert(&mut m[pos].1, rest, value);
}

/// Decodes `a=1&b[c]=2&d[]=3` as PHP's `parse_str` does: a map of strings and maps.
pub fn php_decode(query: &str) -> PValue {
    let mut root = PValue::empty_map();
    for pair in query.split('&').filter(|p| !p.is_empty()).take(MAX_VARS) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = urldecode(k);
        if let Some(segs) = split_key(key.trim_start()) {
            insert(&mut root, &segs, urldecode(v));
        }
    }
    root
}

/// A map the way PHP's `json_encode` writes an array: `[]` when empty, a list when its
/// keys are exactly 0, 1, 2… in order, an object otherwise.
pub fn php_map(entries: Vec<(String, Value)>) -> Value {
    let is_list = entries
        .iter()
        .enumerate()
        .all(|(i, (k, _))| *k == i.to_string());
    if is_list {
        Value::Array(entries.into_iter().map(|(_, v)| v).collect())
    } else {
        Value::Object(entries.into_iter().collect())
    }
}

/// A top-level parameter, its name matched exactly as the method's documentation
/// spells it (`id` for `crm.deal.get`, `PLACEMENT` for `placement.bind`,
/// `entityTypeId` for `crm.item.get`): a name in another letter case is a parameter the
/// method does not read, as PHP's `$params['id']` does not read `ID`. The names each
/// method reads are listed in `methods::PARAMS`.
pub fn param<'a>(params: &'a Value, name: &str) -> Option<&'a Value> {
    params.as_object()?.get(name)
}

/// A parameter as text: strings as they are, numbers and booleans as PHP prints them.
pub fn text(params: &Value, name: &str) -> Option<String> {
    match param(params, name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "1".into() } else { String::new() }),
        _ => None,
    }
}

/// A positive integer id, given as a number or a string of digits.
pub fn positive_id(params: &Value, name: &str) -> Option<u64> {
    let v = match param(params, name)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }?;
    (v > 0).then_some(v)
}

/// PHP truthiness of a flag such as `halt` or `clear`; `default` when absent.
pub fn flag(params: &Value, name: &str, default: bool) -> bool {
    match param(params, name) {
        None | Some(Value::Null) => default,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => {
            let s = s.trim();
            !(s.is_empty()
                || s == "0"
                || s.eq_ignore_ascii_case("false")
                || s.eq_ignore_ascii_case("n"))
        }
        Some(_) => true,
    }
}

/// A list parameter (`id[]=1&id[]=2`, `{"id":[1,2]}` or a single value) as strings.
pub fn list(params: &Value, name: &str) -> Vec<String> {
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    match param(params, name) {
        Some(Value::Array(a)) => a.iter().filter_map(scalar).collect(),
        Some(Value::Object(o)) => o.values().filter_map(scalar).collect(),
        Some(v) => scalar(v).into_iter().collect(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_php_bracket_keys_in_order() {
        let v = php_decode("cmd[b]=crm.deal.get%3Fid%3D1&cmd[a]=app.info&x[]=1&x[]=2&y=a+b%26c");
        let cmd = v.get("cmd").map(PValue::entries).unwrap_or_default();
        let keys: Vec<_> = cmd.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a"]);
        assert_eq!(cmd[0].1, PValue::Str("crm.deal.get?id=1".into()));
        assert_eq!(v.to_json()["x"], json!({"0": "1", "1": "2"}));
        assert_eq!(v.to_json()["y"], json!("a b&c"));
    }

    #[test]
    fn malformed_keys_do_not_panic() {
        for q in [
            "[",
            "]",
            "a[",
            "a]b",
            "[]=1",
            "=",
            "&&",
            "a[][]]=1",
            "%ff%fe=%ff",
            "a[b=1",
        ] {
            let _ = php_decode(q).to_json();
        }
        let deep = format!("a{}=1", "[x]".repeat(200));
        assert_eq!(php_decode(&deep).to_json(), json!({}));
        assert_eq!(php_decode("a[b=1").to_json(), json!({"a_b": "1"}));
    }

    #[test]
    fn php_map_writes_empty_as_array_and_lists_as_arrays() {
        assert_eq!(php_map(vec![]), json!([]));
        assert_eq!(
            php_map(vec![("0".into(), json!(1)), ("1".into(), json!(2))]),
            json!([1, 2])
        );
        assert_eq!(php_map(vec![("1".into(), json!(2))]), json!({"1": 2}));
        assert_eq!(php_map(vec![("a".into(), json!(1))]), json!({"a": 1}));
    }

    #[test]
    fn json_keeps_key_order() {
        let v: PValue =
            serde_json::from_str(r#"{"cmd":{"z":"a","a":"b","m":"c"}}"#).expect("valid json");
        let keys: Vec<_> = v
            .get("cmd")
            .map(PValue::entries)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }
}
