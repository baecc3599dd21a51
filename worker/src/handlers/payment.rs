//! `ONAPPPAYMENT`: the app was paid for. The event carries no tokens, so the stored
//! ones are used; `app.info` is the source of truth for the status stored.

use super::{Failure, Fetch, Plan};
use b24_shared::event::AppPayment;
use serde_json::{json, Value};

pub fn plan(member_id: &str, data: &Value) -> Result<Plan, Failure> {
    let e = AppPayment::from_data(data)
        .map_err(|err| Failure::dead("MALFORMED_PAYLOAD", err.to_string()))?;
    let mut plan = Plan::stored(
        member_id,
        vec![Fetch {
            method: "app.info",
            params: json!({}),
            kind: "app".into(),
            entity_id: e.code,
            pick: None,
        }],
    );
    plan.payment = true;
    Ok(plan)
}
