//! The `filter` and `order` parameters of Bitrix24 list methods, over records the
//! simulated portal keeps as JSON objects. The operator goes before the field name
//! (`{">ID": 5, "@entityTypeId": [128, 130]}`), as api-reference/events/event-offline-get.md
//! and api-reference/crm/universal/user-defined-object-types/crm-type-list.md describe.
//! Only flat filters are understood: nested groups (`logic: OR`) are refused with a
//! description that says the simulator does not support them, so a test never passes
//! on a filter the simulator silently ignored.

use serde_json::{Map, Value};
use std::cmp::Ordering;

/// Operators, longest first so `>=` is not read as `>`.
const OPERATORS: &[&str] = &[
    "!=%", "!%=", "!@", "!=", "!%", "=%", "%=", ">=", "<=", "=", ">", "<", "@", "%", "!",
];

/// Why a filter or order was refused: a field the method does not filter by, a value
/// it cannot use, or something the simulator does not model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterError {
    Field(String),
    Value(String),
    Direction { field: String, got: String },
    Unsupported(String),
}

#[derive(Debug, Clone)]
struct Condition {
    op: &'static str,
    field: String,
    value: Value,
}

/// A parsed flat filter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    conditions: Vec<Condition>,
}

impl Filter {
    /// `allowed` are the field names the method filters by, matched exactly.
    pub fn parse(filter: Option<&Value>, allowed: &[&str]) -> Result<Self, FilterError> {
        let entries: Vec<(String, Value)> = match filter {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(Value::Object(o)) => o.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            // PHP's `[]` for an empty filter.
            Some(Value::Array(a)) if a.is_empty() => return Ok(Self::default()),
            Some(Value::String(s)) if s.is_empty() => return Ok(Self::default()),
            Some(other) => return Err(FilterError::Value(other.to_string())),
        };
        let mut conditions = Vec::new();
        for (key, value) in entries {
            if key.eq_ignore_ascii_case("logic") || value.is_object() {
                return Err(FilterError::Unsupported(key));
            }
            let op = OPERATORS
                .iter()
                .find(|op| key.starts_with(**op))
                .copied()
                .unwrap_or("=");
            let field = key.strip_prefix(op).unwrap_or(&key).to_owned();
            if !allowed.contains(&field.as_str()) {
                return Err(FilterError::Field(field));
            }
            conditions.push(Condition { op, field, value });
        }
        Ok(Self { conditions })
    }

    pub fn matches(&self, record: &Map<String, Value>) -> bool {
        self.conditions.iter().all(|c| {
            let have = record.get(&c.field).unwrap_or(&Value::Null);
            condition_holds(c.op, have, &c.value)
        })
    }
}

fn condition_holds(op: &str, have: &Value, want: &Value) -> bool {
    let list = |v: &Value| -> Vec<Value> {
        match v {
            Value::Array(a) => a.clone(),
            Value::Object(o) => o.values().cloned().collect(),
            other => vec![other.clone()],
        }
    };
    let like = |v: &Value| {
        let hay = text(have).to_lowercase();
        let needle = text(v).to_lowercase();
        match op {
            "%" | "!%" => hay.contains(&needle),
            _ => like_pattern(&hay, &needle),
        }
    };
    match op {
        "=" => {
            if want.is_array() {
                list(want)
                    .iter()
                    .any(|w| compare(have, w) == Some(Ordering::Equal))
            } else {
                compare(have, want) == Some(Ordering::Equal)
            }
        }
        "!" | "!=" => compare(have, want) != Some(Ordering::Equal),
        ">" => compare(have, want) == Some(Ordering::Greater),
        "<" => compare(have, want) == Some(Ordering::Less),
        ">=" => matches!(
            compare(have, want),
            Some(Ordering::Greater | Ordering::Equal)
        ),
        "<=" => matches!(compare(have, want), Some(Ordering::Less | Ordering::Equal)),
        "@" => list(want)
            .iter()
            .any(|w| compare(have, w) == Some(Ordering::Equal)),
        "!@" => !list(want)
            .iter()
            .any(|w| compare(have, w) == Some(Ordering::Equal)),
        "%" | "=%" | "%=" => like(want),
        "!%" | "!=%" | "!%=" => !like(want),
        _ => false,
    }
}

/// SQL LIKE with `%` as the only wildcard.
fn like_pattern(hay: &str, pattern: &str) -> bool {
    let parts: Vec<&str> = pattern.split('%').collect();
    if parts.len() == 1 {
        return hay == pattern;
    }
    let mut rest = hay;
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => if *b { "Y" } else { "N" }.into(),
        other => other.to_string(),
    }
}

/// Numbers (or strings of digits, as Bitrix24 writes ids) numerically, the rest as
/// text. `None` when one side is missing.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    if a.is_null() || b.is_null() {
        return (a.is_null() && b.is_null()).then_some(Ordering::Equal);
    }
    let num = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x.partial_cmp(&y),
        _ => Some(text(a).cmp(&text(b))),
    }
}

/// Sorts by `order` (`{"ID": "DESC"}`), then by `default` when `order` is absent.
pub fn sort(
    records: &mut [Map<String, Value>],
    order: Option<&Value>,
    allowed: &[&str],
    default: &[(&str, bool)],
) -> Result<(), FilterError> {
    let mut keys: Vec<(String, bool)> = Vec::new();
    match order {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(Value::Object(o)) => {
            for (field, dir) in o {
                if !allowed.contains(&field.as_str()) {
                    return Err(FilterError::Field(field.clone()));
                }
                let d = text(dir).to_ascii_uppercase();
                let desc = match d.as_str() {
                    "ASC" => false,
                    "DESC" => true,
                    _ => {
                        return Err(FilterError::Direction {
                            field: field.clone(),
                            got: text(dir),
                        })
                    }
                };
                keys.push((field.clone(), desc));
            }
        }
        Some(other) => return Err(FilterError::Value(other.to_string())),
    }
    if keys.is_empty() {
        keys = default.iter().map(|(f, d)| (f.to_string(), *d)).collect();
    }
    records.sort_by(|a, b| {
        for (field, desc) in &keys {
            let x = a.get(field).unwrap_or(&Value::Null);
            let y = b.get(field).unwrap_or(&Value::Null);
            let o = compare(x, y).unwrap_or(Ordering::Equal);
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn operators_go_before_the_field_name() {
        let r = rec(json!({"ID": "5", "EVENT_NAME": "ONCRMDEALUPDATE"}));
        let allowed = ["ID", "EVENT_NAME"];
        let f = |v: Value| Filter::parse(Some(&v), &allowed).map(|f| f.matches(&r));
        assert_eq!(f(json!({">ID": 4})), Ok(true));
        assert_eq!(f(json!({">ID": "5"})), Ok(false));
        assert_eq!(
            f(json!({">=ID": 5, "=EVENT_NAME": "ONCRMDEALUPDATE"})),
            Ok(true)
        );
        assert_eq!(f(json!({"@ID": [1, 5]})), Ok(true));
        assert_eq!(f(json!({"!@ID": ["5"]})), Ok(false));
        assert_eq!(f(json!({"%EVENT_NAME": "deal"})), Ok(true));
        assert_eq!(f(json!({"=%EVENT_NAME": "ONCRM%"})), Ok(true));
        assert_eq!(f(json!({"!ID": 5})), Ok(false));
        assert_eq!(f(json!({"id": 5})), Err(FilterError::Field("id".into())));
        assert!(matches!(
            f(json!({"logic": "OR", "0": {"ID": 1}})),
            Err(FilterError::Unsupported(_))
        ));
    }

    #[test]
    fn sort_by_order_or_default() {
        let mut v = vec![
            rec(json!({"ID": "2"})),
            rec(json!({"ID": "10"})),
            rec(json!({"ID": "1"})),
        ];
        sort(&mut v, None, &["ID"], &[("ID", false)]).unwrap();
        assert_eq!(v[2]["ID"], "10");
        sort(&mut v, Some(&json!({"ID": "desc"})), &["ID"], &[]).unwrap();
        assert_eq!(v[0]["ID"], "10");
        assert!(sort(&mut v, Some(&json!({"ID": "UP"})), &["ID"], &[]).is_err());
    }
}
