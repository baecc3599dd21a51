//! `ONCRMDEALRECURRINGEXPOSE`: a deal was created from a recurring template. Fetch the
//! new deal (`DEAL_ID`) and the template's settings row (`ID`, PARAMS kept whole).

use super::{Failure, Fetch, Plan};
use b24_shared::event::DealRecurringExpose;
use serde_json::{json, Value};

pub fn plan(member_id: &str, data: &Value) -> Result<Plan, Failure> {
    let e = DealRecurringExpose::from_data(data)
        .map_err(|err| Failure::dead("MALFORMED_PAYLOAD", err.to_string()))?;
    Ok(Plan::stored(
        member_id,
        vec![
            Fetch {
                method: "crm.deal.get",
                params: json!({ "id": e.deal_id }),
                kind: "deal".into(),
                entity_id: e.deal_id.to_string(),
                pick: None,
            },
            Fetch {
                method: "crm.deal.recurring.get",
                params: json!({ "id": e.id }),
                kind: "deal_recurring".into(),
                entity_id: e.id.to_string(),
                pick: None,
            },
        ],
    ))
}
