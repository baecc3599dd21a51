//! Widget calls from `CRM_…_DETAIL_ACTIVITY` placements: fetch the CRM item the widget
//! was opened on with `crm.item.get`, as the user who opened it, with that user's own
//! `AUTH_ID` and nothing else. A widget call proves no more than its user's token: the
//! portal's stored tokens are never used for it (any user of the portal could otherwise
//! read any item through the app), and the call's DOMAIN is never used as an endpoint
//! (the stored portal's is).

use super::{Failure, Fetch, Plan, PlanAuth, Work};
use b24_shared::event::{KnownPlacement, PlacementCall};
use b24_shared::portals::Portal;
use serde_json::json;

pub fn work(portal: &Portal, call: &PlacementCall) -> Result<Work, Failure> {
    let Some(placement) = KnownPlacement::from_code(call.placement.as_str()) else {
        return Ok(Work::Ignore);
    };
    let type_id = placement.entity_type_id();
    let id = call
        .crm_item_id()
        .map_err(|err| Failure::dead("MALFORMED_PAYLOAD", err.to_string()))?;
    let token = call
        .auth_id
        .clone()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Failure::drop("AUTH_ID_MISSING", "widget call without AUTH_ID"))?;
    Ok(Work::Fetch(Plan {
        member_id: portal.member_id.clone(),
        auth: PlanAuth::User {
            endpoint: portal.client_endpoint.clone(),
            token,
        },
        fetches: vec![Fetch {
            method: "crm.item.get",
            params: json!({ "entityTypeId": type_id, "id": id }),
            kind: format!("crm_item:{type_id}"),
            entity_id: id.to_string(),
            pick: Some("item"),
        }],
        unless_fetched_after: None,
    }))
}
