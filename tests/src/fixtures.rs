//! The payloads from the Bitrix24 documentation pages the product was made from
//! (`tests/fixtures/`), exactly as documented.

use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn deal_recurring_expose() -> Value {
    load("deal_recurring_expose.json")
}

pub fn requisite_add() -> Value {
    load("requisite_add.json")
}

pub fn app_payment() -> Value {
    load("app_payment.json")
}

/// The requisite seed for another requisite id: distinct events for load tests.
pub fn requisite_add_numbered(id: u64) -> Value {
    let mut e = requisite_add();
    e["data"]["FIELDS"]["ID"] = Value::String(id.to_string());
    e
}

/// The recurring-deal seed for the `n`th new deal (templates 1 to 40 in turn):
/// distinct events of two calls each.
pub fn deal_recurring_expose_numbered(n: u64) -> Value {
    let mut e = deal_recurring_expose();
    e["data"]["FIELDS"]["DEAL_ID"] = Value::String((100_000 + n).to_string());
    e["data"]["FIELDS"]["ID"] = Value::String((n % 40 + 1).to_string());
    e
}

/// The seven widget calls of the CRM detail-activity placement page.
pub fn placements() -> Vec<Value> {
    match load("placements.json") {
        Value::Array(a) => a,
        other => panic!("placements.json is not an array: {other}"),
    }
}

pub fn install() -> Value {
    load("install.json")
}

/// `ONAPPINSTALL` as its documentation page shows it: a version such as `1.0.0`, and
/// in `auth` the endpoints, `member_id` and `application_token` but no OAuth tokens.
pub fn app_install() -> Value {
    load("app_install.json")
}

/// `ONAPPUPDATE` as its documentation page shows it: tokens, no endpoints.
pub fn app_update() -> Value {
    load("app_update.json")
}

/// Every seed event with the route it is POSTed to.
pub fn all_seeds() -> Vec<(&'static str, Value)> {
    let mut all = vec![
        ("/events", deal_recurring_expose()),
        ("/events", requisite_add()),
        ("/events", app_payment()),
        ("/install", install()),
    ];
    all.extend(placements().into_iter().map(|p| ("/placement", p)));
    all
}
