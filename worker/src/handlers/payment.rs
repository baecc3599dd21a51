//! `ONAPPPAYMENT`: the app was paid for. The event carries no token (seed 002), so
//! nothing in it is trusted: it is only a hint to ask `app.info` with the stored
//! tokens, whose answer is stored (one `app` row per portal, the portal's payment
//! columns). Anyone can send such a hint with a victim's domain, so an unauthenticated
//! one causes at most one `app.info` per portal per `WORKER_PAYMENT_DEBOUNCE_S`. A paid
//! answer lifts `payment_required`, and the portal's held events resume.

use super::{payment_state, Done, Failure};
use crate::bitrix::{Auth, Bitrix, ErrorClass};
use crate::store::{EntityWrite, Store};
use b24_shared::event::MemberId;
use b24_shared::portals::{self, PortalStatus};
use serde_json::json;
use std::time::Duration;

/// The outcome, and the `app` row to store with it.
pub async fn run(
    bitrix: &Bitrix,
    store: &Store,
    member_id: &MemberId,
    authenticated: bool,
    debounce: Duration,
) -> Result<(Done, Vec<EntityWrite>), Failure> {
    let window = if authenticated {
        Duration::ZERO
    } else {
        debounce
    };
    {
        let client = store.pool().get().await?;
        if !portals::claim_app_check(&client, member_id, window).await? {
            tracing::debug!(%member_id, "app.info asked lately; payment hint debounced");
            return Ok((Done::Debounced, Vec::new()));
        }
    }
    let answer = match bitrix
        .call(member_id, &Auth::StoredPaymentCheck, "app.info", &json!({}))
        .await
    {
        Ok(a) => a,
        Err(e) if e.class == ErrorClass::PaymentRequired => {
            let client = store.pool().get().await?;
            portals::set_status(&client, member_id, PortalStatus::PaymentRequired).await?;
            tracing::info!(%member_id, "payment hint, but the app is still unpaid");
            return Ok((Done::Stored, Vec::new()));
        }
        Err(e) => return Err(e.into()),
    };
    let state = payment_state(&answer.result)
        .ok_or_else(|| Failure::dead("UNEXPECTED_RESULT", "app.info answer has no STATUS"))?;
    {
        let client = store.pool().get().await?;
        state.store(&client, member_id).await?;
    }
    // One row per portal: the app's own code, from Bitrix24's answer, not the event's.
    let code = answer
        .result
        .get("CODE")
        .and_then(|c| c.as_str())
        .unwrap_or("app")
        .to_string();
    let write = EntityWrite {
        kind: "app".into(),
        entity_id: code,
        data: answer.result,
    };
    Ok((Done::Stored, vec![write]))
}
