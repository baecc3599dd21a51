//! `ONCRMDEALRECURRINGEXPOSE`: a deal was created from a recurring template. Fetch the
//! new deal (`DEAL_ID`) and the template's settings row (`ID`, PARAMS kept whole).

use super::{Failure, Fetch};
use b24_shared::event::DealRecurringExpose;
use serde_json::{json, Value};

pub fn fetches(data: &Value) -> Result<Vec<Fetch>, Failure> {
    let e = DealRecurringExpose::from_data(data)
        .map_err(|err| Failure::dead("MALFORMED_PAYLOAD", err.to_string()))?;
    Ok(vec![
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
    ])
}
