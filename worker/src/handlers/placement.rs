//! Widget calls from `CRM_…_DETAIL_ACTIVITY` placements: fetch the CRM item the widget
//! was opened on with `crm.item.get`, as the user who opened it, or with the portal's
//! tokens if that user's token is refused. The call's DOMAIN is never used as an
//! endpoint: the stored portal's endpoint is.

use super::{Failure, Fetch, Plan, PlanAuth, Work};
use b24_shared::event::PlacementCall;
use serde_json::{json, Value};

pub fn work(member_id: &str, payload: &Value) -> Result<Work, Failure> {
    let call = PlacementCall::parse(payload)
        .map_err(|err| Failure::dead("MALFORMED_PAYLOAD", err.to_string()))?;
    let Some(type_id) = call.crm_entity_type_id() else {
        return Ok(Work::Ignore);
    };
    let id = call
        .crm_item_id()
        .map_err(|err| Failure::dead("MALFORMED_PAYLOAD", err.to_string()))?;
    let auth = match call.auth_id {
        Some(token) if !token.is_empty() => PlanAuth::UserThenStored(token),
        _ => PlanAuth::Stored,
    };
    Ok(Work::Plan(Plan {
        member_id: member_id.to_string(),
        auth,
        fetches: vec![Fetch {
            method: "crm.item.get",
            params: json!({ "entityTypeId": type_id, "id": id }),
            kind: format!("crm_item:{type_id}"),
            entity_id: id.to_string(),
            pick: Some("item"),
        }],
        payment: false,
    }))
}
