//! `ONCRMREQUISITEADD`: a requisite was added; fetch it.

use super::{Failure, Fetch};
use b24_shared::event::RequisiteAdd;
use serde_json::{json, Value};

pub fn fetches(data: &Value) -> Result<Vec<Fetch>, Failure> {
    let e = RequisiteAdd::from_data(data)
        .map_err(|err| Failure::dead("MALFORMED_PAYLOAD", err.to_string()))?;
    Ok(vec![Fetch {
        method: "crm.requisite.get",
        params: json!({ "id": e.id }),
        kind: "requisite".into(),
        entity_id: e.id.to_string(),
        pick: None,
    }])
}
