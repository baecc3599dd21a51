//! Portal upkeep, the net under everything: Bitrix24 never resends an online event our
//! ingress missed (a deploy, an outage, DNS), but it keeps a record of every change for
//! the events we bound offline. Every `WORKER_RECONCILE_INTERVAL_S` one replica per
//! portal (a lease in PostgreSQL) collects them: `event.offline.get` with `clear=0`
//! reserves a page of records under a `process_id`, each is published as an envelope of
//! kind `offline` with a publisher confirm, and only after every confirm are they cleared
//! (`event.offline.clear`); records that cannot be taken are marked
//! `event.offline.error`. Nothing is cleared before it is durable: a pass that dies
//! midway leaves its `process_id` stored, and the next pass asks for those records
//! again (duplicates are caught by the events table).
//!
//! The same lease covers two other chores: refreshing the tokens of a quiet portal
//! before its 180-day refresh token lapses, and asking `app.info` of a portal held for
//! payment whether it has been paid.

use crate::bitrix::{Auth, Bitrix, ErrorClass};
use crate::handlers::payment_state;
use b24_shared::amqp::Publisher;
use b24_shared::event::MemberId;
use b24_shared::portals::{self, PortalStatus, Upkeep, UpkeepPolicy};
use b24_shared::{Envelope, EnvelopeKind};
use lapin::types::FieldTable;
use prometheus::IntCounterVec;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Records asked for per `event.offline.get` (the documented default).
const PAGE: usize = 50;
/// Portals claimed per round.
const CLAIM: i64 = 16;

pub struct Reconciler {
    pub bitrix: Bitrix,
    pub publisher: Publisher,
    pub policy: UpkeepPolicy,
    /// This replica's name in the lease.
    pub owner: String,
    /// Offline records by outcome: `published`, `error`.
    pub records: IntCounterVec,
    /// Upkeep chores by kind and outcome.
    pub chores: IntCounterVec,
}

impl Reconciler {
    /// Rounds until `stop`: claim what is due, do it, release.
    pub async fn run(self, stop: CancellationToken) {
        let tick = self.policy.poll_every.map_or(Duration::from_secs(30), |d| {
            (d / 4).clamp(Duration::from_millis(200), Duration::from_secs(30))
        });
        loop {
            // A round waits on Bitrix24 and the database: it is abandoned at shutdown
            // (its leases expire and its pending process_id is reused next time).
            let worked = tokio::select! {
                w = self.round() => w,
                () = stop.cancelled() => return,
            };
            let pause = if worked { Duration::ZERO } else { tick };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// One round; true when something was claimed (then the next round comes at once).
    async fn round(&self) -> bool {
        let claimed = match self.bitrix.pool().get().await {
            Ok(client) => portals::claim_upkeep(&client, &self.owner, &self.policy, CLAIM).await,
            Err(e) => {
                tracing::warn!(error = %e, "upkeep: database unreachable");
                return false;
            }
        };
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %b24_shared::db::describe(&e), "upkeep: cannot claim portals");
                return false;
            }
        };
        for u in &claimed {
            let polled = self.upkeep(u).await;
            if let Ok(client) = self.bitrix.pool().get().await {
                if let Err(e) =
                    portals::release_upkeep(&client, &u.member_id, &self.owner, polled).await
                {
                    tracing::warn!(error = %e, "upkeep: cannot release the lease");
                }
            }
        }
        !claimed.is_empty()
    }

    /// Does what is due for one portal; true when its offline events were collected.
    async fn upkeep(&self, u: &Upkeep) -> bool {
        if u.refresh_due {
            let outcome = match self.bitrix.refresh_now(&u.member_id).await {
                Ok(()) => "ok",
                Err(e) => {
                    tracing::warn!(member_id = %u.member_id, code = %e.code, "idle refresh failed");
                    "failed"
                }
            };
            self.chores
                .with_label_values(&["idle_refresh", outcome])
                .inc();
        }
        if u.payment_check_due && u.status == PortalStatus::PaymentRequired {
            let outcome = self.payment_check(&u.member_id).await;
            self.chores
                .with_label_values(&["payment_check", outcome])
                .inc();
        }
        if !u.poll_due {
            return false;
        }
        match self.collect(&u.member_id, u.process_id.clone()).await {
            Ok(n) => {
                self.chores.with_label_values(&["offline_poll", "ok"]).inc();
                if n > 0 {
                    tracing::info!(member_id = %u.member_id, records = n, "offline events collected");
                }
                true
            }
            Err(reason) => {
                self.chores
                    .with_label_values(&["offline_poll", "failed"])
                    .inc();
                tracing::warn!(member_id = %u.member_id, %reason, "offline events not collected; next round retries");
                false
            }
        }
    }

    /// `app.info` for a portal held for payment; a paid answer releases its events.
    async fn payment_check(&self, member_id: &MemberId) -> &'static str {
        match self
            .bitrix
            .call_patiently(member_id, &Auth::StoredPaymentCheck, "app.info", &json!({}))
            .await
        {
            Ok(answer) => {
                let Some(state) = payment_state(&answer.result) else {
                    return "failed";
                };
                let Ok(client) = self.bitrix.pool().get().await else {
                    return "failed";
                };
                match state.store(&client, member_id).await {
                    Ok(()) if !state.payment_expired => {
                        tracing::info!(%member_id, "app paid again; held events resume");
                        "paid"
                    }
                    Ok(()) => "unpaid",
                    Err(_) => "failed",
                }
            }
            Err(e) if e.class == ErrorClass::PaymentRequired => {
                if let Ok(client) = self.bitrix.pool().get().await {
                    let _ = client
                        .execute(
                            "UPDATE portals SET app_checked_at = now() WHERE member_id = $1",
                            &[member_id],
                        )
                        .await;
                }
                "unpaid"
            }
            Err(_) => "failed",
        }
    }

    /// Collects every offline record of the portal; returns how many were published.
    async fn collect(
        &self,
        member_id: &MemberId,
        mut process_id: Option<String>,
    ) -> Result<usize, String> {
        let mut total = 0;
        loop {
            let mut params = json!({ "clear": 0, "limit": PAGE });
            if let Some(pid) = &process_id {
                params["process_id"] = json!(pid);
            }
            let answer = self
                .bitrix
                .call_patiently(member_id, &Auth::Stored, "event.offline.get", &params)
                .await
                .map_err(|e| e.to_string())?;
            let records = answer
                .result
                .get("events")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let pid = answer
                .result
                .get("process_id")
                .and_then(Value::as_str)
                .map(str::to_string);
            if records.is_empty() {
                self.forget_process(member_id).await;
                return Ok(total);
            }
            let Some(pid) = pid else {
                return Err("event.offline.get reserved records without a process_id".into());
            };
            self.remember_process(member_id, &pid).await?;
            let (ok_ids, bad_messages) = self.publish(member_id, &records).await?;
            if !bad_messages.is_empty() {
                self.bitrix
                    .call_patiently(
                        member_id,
                        &Auth::Stored,
                        "event.offline.error",
                        &json!({ "process_id": pid, "message_id": bad_messages }),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if !ok_ids.is_empty() {
                self.bitrix
                    .call_patiently(
                        member_id,
                        &Auth::Stored,
                        "event.offline.clear",
                        &json!({ "process_id": pid, "id": ok_ids }),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
            }
            self.forget_process(member_id).await;
            process_id = None;
            total += ok_ids.len();
            if records.len() < PAGE {
                return Ok(total);
            }
        }
    }

    /// Publishes each record with a confirm. Returns the `ID`s now durable and the
    /// `MESSAGE_ID`s of records that cannot be taken (no event name). A broker failure
    /// stops the pass: nothing of it is cleared.
    async fn publish(
        &self,
        member_id: &MemberId,
        records: &[Value],
    ) -> Result<(Vec<String>, Vec<String>), String> {
        let mut ok = Vec::with_capacity(records.len());
        let mut bad = Vec::new();
        for record in records {
            let text = |k: &str| {
                record.get(k).and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
            };
            let (Some(id), Some(name)) = (text("ID"), text("EVENT_NAME")) else {
                if let Some(m) = text("MESSAGE_ID") {
                    bad.push(m);
                }
                self.records.with_label_values(&["error"]).inc();
                continue;
            };
            let env = Envelope::new(
                EnvelopeKind::Offline,
                name.to_ascii_uppercase(),
                Some(member_id.clone()),
                None,
                record.clone(),
            );
            self.publisher
                .publish(
                    &env.routing_key(),
                    &env.to_json(),
                    &env.id.to_string(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("publishing an offline record: {e}"))?;
            self.records.with_label_values(&["published"]).inc();
            ok.push(id);
        }
        Ok((ok, bad))
    }

    async fn remember_process(&self, member_id: &MemberId, pid: &str) -> Result<(), String> {
        let client = self.bitrix.pool().get().await.map_err(|e| e.to_string())?;
        portals::set_pending_process(&client, member_id, Some(pid))
            .await
            .map_err(|e| b24_shared::db::describe(&e))
    }

    async fn forget_process(&self, member_id: &MemberId) {
        if let Ok(client) = self.bitrix.pool().get().await {
            let _ = portals::set_pending_process(&client, member_id, None).await;
        }
    }
}
