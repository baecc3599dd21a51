//! Consuming the work queue. Each delivery is verified, deduplicated, handled and
//! settled: acked only after its outcome is committed to PostgreSQL, or after it was
//! durably moved to a delay queue or the dead-letter queue. Whatever fails in between
//! leaves the message unacked, so the broker redelivers it: nothing is lost, and the
//! `events` row makes sure nothing is stored twice.

use crate::bitrix::{Auth, Bitrix, ErrorClass};
use crate::handlers::{self, Failure, Plan, PlanAuth, Work};
use crate::metrics::{event_label, WorkerMetrics};
use crate::store::{dedup_key, EntityWrite, EventState, Installation, PaymentState, Store};
use b24_shared::amqp::{Publisher, Topology, RETRY_DELAYS};
use b24_shared::event::{InboundEvent, InstallCall};
use b24_shared::{Envelope, EnvelopeKind};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ATTEMPT_HEADER: &str = "x-attempt";

pub struct Ctx {
    pub store: Store,
    pub bitrix: Bitrix,
    pub batcher: Arc<crate::batch::Batcher>,
    pub publisher: Publisher,
    pub topology: Topology,
    pub metrics: WorkerMetrics,
    pub public_url: String,
}

/// How a message ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Stored,
    Duplicate,
    Ignored,
}

/// What is known of a message while it is processed, for settling and metrics.
struct Known {
    key: Option<String>,
    label: &'static str,
    member_id: Option<String>,
}

pub async fn handle_delivery(ctx: Arc<Ctx>, delivery: Delivery) {
    let started = Instant::now();
    ctx.metrics.in_flight.inc();
    let attempt = attempt_of(&delivery);
    let mut known = Known {
        key: None,
        label: "unknown",
        member_id: None,
    };
    let result = process(&ctx, &delivery.data, &mut known).await;
    let outcome = settle(&ctx, &delivery, attempt, &known, result).await;
    ctx.metrics
        .messages
        .with_label_values(&[known.label, outcome])
        .inc();
    ctx.metrics
        .processing
        .with_label_values(&[known.label])
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics.in_flight.dec();
}

fn attempt_of(delivery: &Delivery) -> usize {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPT_HEADER))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(*n),
            AMQPValue::LongInt(n) => Some(i64::from(*n)),
            AMQPValue::ShortInt(n) => Some(i64::from(*n)),
            _ => None,
        })
        .map(|n| n.clamp(0, 1000) as usize)
        .unwrap_or(0)
}

async fn process(ctx: &Ctx, body: &[u8], known: &mut Known) -> Result<Done, Failure> {
    let env = match Envelope::from_json(body) {
        Ok(e) => e,
        Err(e) => {
            let reason = format!("envelope is not valid: {}", first_line(&e.to_string()));
            if let Err(db) = ctx
                .store
                .record_malformed(body, "MALFORMED_ENVELOPE", &reason)
                .await
            {
                tracing::warn!(error = %db, "could not record a malformed envelope");
            }
            return Err(Failure::dead("MALFORMED_ENVELOPE", reason));
        }
    };
    known.label = event_label(env.kind.as_str(), &env.event);
    let key = dedup_key(&env);
    known.key = Some(key.clone());
    if ctx.store.begin(&key, &env).await? == EventState::Finished {
        tracing::debug!(id = %env.id, event = %env.event, "duplicate of a finished event");
        return Ok(Done::Duplicate);
    }
    let work = verify_and_plan(ctx, &env, known).await?;
    match work {
        Work::Ignore => {
            ctx.store.settle(&key, "ignored", None).await?;
            Ok(Done::Ignored)
        }
        Work::Uninstall { member_id } => {
            handlers::uninstall::run(&ctx.store, &member_id).await?;
            ctx.store.complete(&key, &member_id, &[], None).await?;
            Ok(Done::Stored)
        }
        Work::Install(req) => {
            let member_id = req.member_id.clone();
            handlers::install::run(&ctx.bitrix, &ctx.store, &ctx.public_url, req).await?;
            ctx.store.complete(&key, &member_id, &[], None).await?;
            Ok(Done::Stored)
        }
        Work::Plan(plan) => {
            let (writes, payment) = match plan.auth {
                // The app's own tokens: batch with the portal's other events.
                PlanAuth::Stored => {
                    let results = ctx.batcher.run(&plan).await?;
                    rows(&plan, &results)?
                }
                PlanAuth::UserThenStored(_) => execute(&ctx.bitrix, &plan).await?,
            };
            ctx.store
                .complete(&key, &plan.member_id, &writes, payment.as_ref())
                .await?;
            Ok(Done::Stored)
        }
    }
}

/// Verification comes first: unknown portals and forged tokens never reach Bitrix24.
async fn verify_and_plan(ctx: &Ctx, env: &Envelope, known: &mut Known) -> Result<Work, Failure> {
    let malformed =
        |e: b24_shared::event::InboundError| Failure::dead("MALFORMED_PAYLOAD", e.to_string());
    match env.kind {
        EnvelopeKind::Install => {
            let call = InstallCall::parse(&env.payload).map_err(malformed)?;
            known.member_id = Some(call.member_id.to_string());
            Ok(Work::Install(Installation::from_page(&call)))
        }
        EnvelopeKind::Event => {
            let event = InboundEvent::parse(&env.payload).map_err(malformed)?;
            if event.event.as_str() == "ONAPPINSTALL" {
                known.member_id = event.auth.member_id.as_ref().map(|m| m.to_string());
                return Ok(Work::Install(Installation::from_event(&event)?));
            }
            let portal = ctx
                .store
                .portal(
                    event.auth.member_id.as_ref().map(|m| m.as_str()),
                    event.auth.domain.as_deref(),
                )
                .await?
                .ok_or_else(|| {
                    Failure::dead("UNKNOWN_PORTAL", "no installed portal for this event")
                })?;
            known.member_id = Some(portal.member_id.clone());
            match (&event.auth.application_token, &portal.application_token) {
                (Some(given), Some(stored)) => {
                    if !stored.ct_eq(given.expose()) {
                        return Err(Failure::dead(
                            "APPLICATION_TOKEN_MISMATCH",
                            "application_token does not match the portal's",
                        ));
                    }
                }
                (Some(_), None) => {
                    return Err(Failure::dead(
                        "APPLICATION_TOKEN_UNKNOWN",
                        "portal has no stored application_token to verify against",
                    ))
                }
                // ONAPPPAYMENT carries no token: its handler trusts only app.info's
                // answer, fetched with the stored tokens.
                (None, _) if event.event.as_str() == "ONAPPPAYMENT" => {}
                (None, _) => {
                    return Err(Failure::dead(
                        "APPLICATION_TOKEN_MISSING",
                        "event has no auth[application_token]",
                    ))
                }
            }
            let member = portal.member_id.as_str();
            match event.event.as_str() {
                "ONAPPUNINSTALL" => Ok(Work::Uninstall {
                    member_id: portal.member_id.clone(),
                }),
                _ if portal.status != "installed" => Err(Failure::dead(
                    "NOT_INSTALLED",
                    format!("portal is {}", portal.status),
                )),
                "ONCRMDEALRECURRINGEXPOSE" => Ok(Work::Plan(handlers::deal_recurring::plan(
                    member,
                    &event.data,
                )?)),
                "ONCRMREQUISITEADD" => {
                    Ok(Work::Plan(handlers::requisite::plan(member, &event.data)?))
                }
                "ONAPPPAYMENT" => Ok(Work::Plan(handlers::payment::plan(member, &event.data)?)),
                _ => Ok(Work::Ignore),
            }
        }
        EnvelopeKind::Placement => {
            let member = env
                .member_id
                .as_ref()
                .ok_or_else(|| Failure::dead("MALFORMED_PAYLOAD", "placement without member_id"))?;
            let portal = ctx
                .store
                .portal(Some(member.as_str()), None)
                .await?
                .ok_or_else(|| {
                    Failure::dead("UNKNOWN_PORTAL", "no installed portal for this call")
                })?;
            known.member_id = Some(portal.member_id.clone());
            if portal.status != "installed" {
                return Err(Failure::dead(
                    "NOT_INSTALLED",
                    format!("portal is {}", portal.status),
                ));
            }
            handlers::placement::work(&portal.member_id, &env.payload)
        }
    }
}

/// Turns a plan's results (one per fetch, in order) into rows.
fn rows(
    plan: &Plan,
    results: &[serde_json::Value],
) -> Result<(Vec<EntityWrite>, Option<PaymentState>), Failure> {
    let mut writes = Vec::with_capacity(results.len());
    let mut payment = None;
    for (fetch, result) in plan.fetches.iter().zip(results) {
        if plan.payment && fetch.method == "app.info" {
            payment = handlers::payment_state(result);
        }
        writes.push(fetch.entity(result)?);
    }
    Ok((writes, payment))
}

/// Runs a plan's calls one by one and turns results into rows.
pub async fn execute(
    bitrix: &Bitrix,
    plan: &Plan,
) -> Result<(Vec<EntityWrite>, Option<PaymentState>), Failure> {
    let mut results = Vec::with_capacity(plan.fetches.len());
    for fetch in &plan.fetches {
        let answer = match &plan.auth {
            PlanAuth::Stored => {
                bitrix
                    .call(&plan.member_id, &Auth::Stored, fetch.method, &fetch.params)
                    .await?
            }
            PlanAuth::UserThenStored(token) => {
                let portal = bitrix
                    .load_portal(&plan.member_id)
                    .await?
                    .ok_or_else(|| Failure::dead("UNKNOWN_PORTAL", "portal vanished"))?;
                let user = Auth::Given {
                    endpoint: portal.endpoint,
                    token: token.clone(),
                };
                match bitrix
                    .call(&plan.member_id, &user, fetch.method, &fetch.params)
                    .await
                {
                    Ok(a) => a,
                    // The widget user's token expired or lacks rights: the app's do not.
                    Err(e)
                        if matches!(e.class, ErrorClass::NeedsRefresh | ErrorClass::Permanent) =>
                    {
                        tracing::debug!(code = %e.code, "user token refused; using the portal's");
                        bitrix
                            .call(&plan.member_id, &Auth::Stored, fetch.method, &fetch.params)
                            .await?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        results.push(answer.result);
    }
    rows(plan, &results)
}

/// Acks, requeues with delay, or dead-letters, and says which (for metrics).
async fn settle(
    ctx: &Ctx,
    delivery: &Delivery,
    attempt: usize,
    known: &Known,
    result: Result<Done, Failure>,
) -> &'static str {
    let failure = match result {
        Ok(done) => {
            ack(delivery).await;
            return match done {
                Done::Stored => "done",
                Done::Duplicate => "duplicate",
                Done::Ignored => "ignored",
            };
        }
        Err(f) => f,
    };
    let (dead, code, reason) = match &failure {
        Failure::Retry {
            code,
            reason,
            after,
        } if attempt < RETRY_DELAYS.len() => {
            let slot = delay_slot(attempt, *after);
            let mut headers = FieldTable::default();
            headers.insert(
                ATTEMPT_HEADER.into(),
                AMQPValue::LongLongInt(attempt as i64 + 1),
            );
            headers.insert(
                "x-last-error".into(),
                AMQPValue::LongString(code.as_str().into()),
            );
            let queue = ctx.topology.delay_queue(slot);
            let id = message_id(delivery);
            match ctx
                .publisher
                .publish_to_queue(&queue, &delivery.data, &id, headers)
                .await
            {
                Ok(()) => {
                    if let Some(key) = &known.key {
                        if let Err(e) = ctx
                            .store
                            .settle(key, "retrying", Some((code, reason)))
                            .await
                        {
                            tracing::warn!(error = %e, "could not record the retry");
                        }
                    }
                    tracing::info!(member_id = ?known.member_id, event = known.label, code, attempt, delay = ?RETRY_DELAYS[slot], "retrying later");
                    ctx.metrics.retries.with_label_values(&[known.label]).inc();
                    ack(delivery).await;
                    return "retry";
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not requeue with delay; redelivering");
                    requeue(delivery).await;
                    return "requeued";
                }
            }
        }
        Failure::Retry { code, reason, .. } => (
            true,
            code.clone(),
            format!("gave up after {} attempts: {reason}", attempt + 1),
        ),
        Failure::Dead { code, reason } => (true, code.clone(), reason.clone()),
    };
    debug_assert!(dead);
    let mut headers = FieldTable::default();
    headers.insert(
        "x-error-code".into(),
        AMQPValue::LongString(code.as_str().into()),
    );
    headers.insert(
        "x-reason".into(),
        AMQPValue::LongString(reason.as_str().into()),
    );
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(attempt as i64 + 1),
    );
    let id = message_id(delivery);
    match ctx
        .publisher
        .publish_to_queue(
            &ctx.topology.dead_letter_queue(),
            &delivery.data,
            &id,
            headers,
        )
        .await
    {
        Ok(()) => {
            if let Some(key) = &known.key {
                if let Err(e) = ctx.store.settle(key, "dead", Some((&code, &reason))).await {
                    tracing::warn!(error = %e, "could not record the dead letter");
                }
            }
            tracing::warn!(member_id = ?known.member_id, event = known.label, code = %code, reason = %reason, "dead-lettered");
            ctx.metrics
                .dead_letters
                .with_label_values(&[known.label, &code])
                .inc();
            ack(delivery).await;
            "dead"
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not dead-letter; redelivering");
            requeue(delivery).await;
            "requeued"
        }
    }
}

/// The delay queue for this attempt, or a later one if Bitrix24 asked for a longer wait.
fn delay_slot(attempt: usize, after: Option<Duration>) -> usize {
    let mut slot = attempt.min(RETRY_DELAYS.len() - 1);
    if let Some(after) = after {
        while slot + 1 < RETRY_DELAYS.len() && RETRY_DELAYS[slot] < after {
            slot += 1;
        }
    }
    slot
}

fn message_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(ShortString::to_string)
        .unwrap_or_default()
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The channel died: the broker redelivers, and the events row dedups.
        tracing::warn!(error = %e, "ack failed");
    }
}

async fn requeue(delivery: &Delivery) {
    // A short pause so a broker or database outage does not become a hot loop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_slot_follows_attempts_and_honours_longer_waits() {
        assert_eq!(delay_slot(0, None), 0);
        assert_eq!(delay_slot(2, None), 2);
        assert_eq!(delay_slot(9, None), RETRY_DELAYS.len() - 1);
        assert_eq!(delay_slot(0, Some(Duration::from_secs(60))), 2);
        assert_eq!(delay_slot(0, Some(Duration::from_secs(3))), 0);
    }
}
