//! Consuming the work queue. Each delivery is parsed once, verified, deduplicated,
//! handled and settled: acked only after its outcome is committed to PostgreSQL, or
//! after it was durably moved to a delay queue or the dead-letter queue. Whatever fails
//! in between leaves the message unacked, so the broker redelivers it: nothing is lost,
//! and the `events` row makes sure nothing is stored twice.
//!
//! Settling has five ways out (see [`Failure`]): done, retry (a delay queue, spending
//! an attempt), hold (a delay queue, not spending one: the portal cannot be called
//! now), dead (the dead-letter queue, only for malformed input and proven-permanent
//! answers), and drop (failed verification: counted, never stored).

use crate::batch::Batcher;
use crate::bitrix::{Auth, Bitrix, ErrorClass};
use crate::handlers::{self, install, Done, Failure, Plan, PlanAuth, Work};
use crate::metrics::WorkerMetrics;
use crate::store::{dedup_key, EntityWrite, EventState, EventStatus, Store};
use crate::verify::{self, Message, Rules};
use b24_shared::amqp::{Publisher, Topology, RETRY_DELAYS};
use b24_shared::event::MemberId;
use b24_shared::Envelope;
use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ATTEMPT_HEADER: &str = "x-attempt";

/// How long a message of a portal already at its in-flight cap waits before it is
/// delivered again.
const PORTAL_BUSY_WAIT: Duration = Duration::from_secs(5);

pub struct Ctx {
    pub store: Store,
    pub bitrix: Bitrix,
    pub batcher: Arc<Batcher>,
    pub publisher: Publisher,
    pub topology: Topology,
    pub metrics: WorkerMetrics,
    pub public_url: String,
    pub app_code: Option<String>,
    pub rules: Rules,
    pub payment_debounce: Duration,
    /// Transient failures are retried this long after the event was received, then
    /// dead-lettered (a day of 5xx for one event is not transient any more).
    pub retry_for: Duration,
    pub slots: Arc<PortalSlots>,
}

/// Messages of one portal in flight in this worker, capped, so one portal's flood
/// cannot fill every prefetch slot while other portals' events wait.
pub struct PortalSlots {
    cap: usize,
    held: Mutex<HashMap<MemberId, usize>>,
}

pub struct PortalSlot {
    slots: Arc<PortalSlots>,
    member_id: MemberId,
}

impl PortalSlots {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MemberId, usize>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for one message of the portal, or `None` when it holds `cap` already.
    pub fn enter(self: &Arc<Self>, member_id: &MemberId) -> Option<PortalSlot> {
        let mut held = self.lock();
        let n = held.entry(member_id.clone()).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PortalSlot {
            slots: self.clone(),
            member_id: member_id.clone(),
        })
    }
}

impl Drop for PortalSlot {
    fn drop(&mut self) {
        let mut held = self.slots.lock();
        if let Some(n) = held.get_mut(&self.member_id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.member_id);
            }
        }
    }
}

/// What is known of a message while it is processed, for settling and metrics.
struct Known {
    key: Option<String>,
    label: &'static str,
    member_id: Option<MemberId>,
    received_at: Option<DateTime<Utc>>,
}

pub async fn handle_delivery(ctx: Arc<Ctx>, delivery: Delivery) {
    let started = Instant::now();
    ctx.metrics.in_flight.inc();
    let attempt = attempt_of(&delivery);
    let mut known = Known {
        key: None,
        label: "unknown",
        member_id: None,
        received_at: None,
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
    if let (Some(at), "done") = (known.received_at, outcome) {
        ctx.metrics.observe_end_to_end(known.label, at);
    }
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
        .map(|n| n.clamp(0, 100_000) as usize)
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
    known.received_at = Some(env.received_at);
    let msg =
        Message::parse(&env).map_err(|e| Failure::dead("MALFORMED_PAYLOAD", e.to_string()))?;
    known.label = msg.label();
    let verified = {
        let client = ctx.store.pool().get().await?;
        verify::verify(&client, &ctx.rules, &env, &msg).await?
    };
    known.member_id = verified.member_id.clone();
    let _slot = match &verified.member_id {
        Some(m) => Some(ctx.slots.enter(m).ok_or_else(|| {
            Failure::hold(
                "PORTAL_BUSY",
                "the portal's in-flight cap is reached",
                PORTAL_BUSY_WAIT,
            )
        })?),
        None => None,
    };
    let key = dedup_key(&env);
    // An installation is recorded once proved: a refused claim leaves no row.
    if !matches!(verified.work, Work::Install(_)) {
        if ctx
            .store
            .begin(&key, &env, known.member_id.as_ref())
            .await?
            == EventState::Finished
        {
            tracing::debug!(id = %env.id, event = %env.event, "duplicate of a finished event");
            return Ok(Done::Duplicate);
        }
        known.key = Some(key.clone());
    }
    let (done, writes) = run(ctx, verified.work).await?;
    if known.key.is_none() {
        ctx.store
            .begin(&key, &env, known.member_id.as_ref())
            .await?;
        known.key = Some(key.clone());
    }
    match (&done, &known.member_id) {
        (Done::Ignored, _) => ctx.store.settle(&key, EventStatus::Ignored, None).await?,
        (Done::Denied { code, reason }, _) => {
            ctx.store
                .settle(&key, EventStatus::Denied, Some((code, reason)))
                .await?
        }
        (_, Some(member)) => ctx.store.complete(&key, member, &writes).await?,
        (_, None) => ctx.store.settle(&key, EventStatus::Done, None).await?,
    }
    Ok(done)
}

/// Carries out verified work; returns how it finished and the rows to store.
async fn run(ctx: &Ctx, work: Work) -> Result<(Done, Vec<EntityWrite>), Failure> {
    let settings = install::Settings {
        public_url: &ctx.public_url,
        app_code: ctx.app_code.as_deref(),
    };
    match work {
        Work::Ignore => Ok((Done::Ignored, Vec::new())),
        Work::Uninstall { member_id, clean } => {
            let done = handlers::uninstall::run(ctx.store.pool(), &member_id, clean).await?;
            Ok((done, Vec::new()))
        }
        Work::Install(claim) => Ok((
            install::run(&ctx.bitrix, &settings, claim).await?,
            Vec::new(),
        )),
        Work::Rebind { member_id, version } => Ok((
            install::rebind(&ctx.bitrix, &ctx.public_url, &member_id, version.as_deref()).await?,
            Vec::new(),
        )),
        Work::Payment {
            member_id,
            authenticated,
        } => {
            handlers::payment::run(
                &ctx.bitrix,
                &ctx.store,
                &member_id,
                authenticated,
                ctx.payment_debounce,
            )
            .await
        }
        Work::Fetch(plan) => fetch(ctx, &plan).await,
    }
}

/// Runs a plan's calls and turns results into rows.
async fn fetch(ctx: &Ctx, plan: &Plan) -> Result<(Done, Vec<EntityWrite>), Failure> {
    if let Some(at) = plan.unless_fetched_after {
        let entities: Vec<(&str, &str)> = plan
            .fetches
            .iter()
            .map(|f| (f.kind.as_str(), f.entity_id.as_str()))
            .collect();
        if ctx
            .store
            .fetched_after(&plan.member_id, &entities, at)
            .await?
        {
            tracing::debug!(member_id = %plan.member_id, "offline record already fetched online");
            return Ok((Done::Stored, Vec::new()));
        }
    }
    let results = match &plan.auth {
        // The app's own tokens: batched with the portal's other events.
        PlanAuth::Stored => ctx.batcher.run(plan).await?,
        PlanAuth::User { endpoint, token } => {
            let endpoint = ctx.bitrix.rest.endpoint(endpoint)?;
            let auth = Auth::User {
                endpoint,
                token: token.clone(),
            };
            let mut results = Vec::with_capacity(plan.fetches.len());
            for f in &plan.fetches {
                match ctx
                    .bitrix
                    .call(&plan.member_id, &auth, f.method, &f.params)
                    .await
                {
                    Ok(a) => results.push(a.result),
                    // The user's token expired or lacks rights: recorded, not retried,
                    // and never replaced by the portal's tokens.
                    Err(e)
                        if matches!(
                            e.class,
                            ErrorClass::NeedsRefresh
                                | ErrorClass::Permanent
                                | ErrorClass::NotRetryable
                        ) =>
                    {
                        tracing::info!(member_id = %plan.member_id, code = %e.code, "widget user's token refused");
                        return Ok((
                            Done::Denied {
                                code: e.code.clone(),
                                reason: e.to_string(),
                            },
                            Vec::new(),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            results
        }
    };
    let writes = plan
        .fetches
        .iter()
        .zip(&results)
        .map(|(f, r)| f.entity(r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((Done::Stored, writes))
}

/// Acks, requeues with delay, dead-letters or drops, and says which (for metrics).
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
                Done::Debounced => "debounced",
                Done::Denied { .. } => "denied",
            };
        }
        Err(f) => f,
    };
    match failure {
        Failure::Drop { code, reason } => {
            ctx.metrics
                .verification_failures
                .with_label_values(&[known.label, &code])
                .inc();
            tracing::warn!(member_id = ?known.member_id.as_ref().map(MemberId::as_str), event = known.label, %code, %reason, "verification failed; dropped");
            ack(delivery).await;
            "dropped"
        }
        Failure::Hold {
            code,
            reason,
            after,
        } => {
            let slot = delay_slot(0, Some(after));
            match delay(ctx, delivery, slot, attempt, &code).await {
                Ok(()) => {
                    record(ctx, known, EventStatus::Held, &code, &reason).await;
                    tracing::info!(member_id = ?known.member_id.as_ref().map(MemberId::as_str), event = known.label, %code, delay = ?RETRY_DELAYS[slot], "held");
                    ack(delivery).await;
                    "held"
                }
                Err(()) => {
                    requeue(delivery).await;
                    "requeued"
                }
            }
        }
        Failure::Retry {
            code,
            reason,
            after,
        } if !too_old(ctx, known) => {
            let slot = delay_slot(attempt, after);
            match delay(ctx, delivery, slot, attempt + 1, &code).await {
                Ok(()) => {
                    record(ctx, known, EventStatus::Retrying, &code, &reason).await;
                    tracing::info!(member_id = ?known.member_id.as_ref().map(MemberId::as_str), event = known.label, %code, attempt, delay = ?RETRY_DELAYS[slot], "retrying later");
                    ctx.metrics.retries.with_label_values(&[known.label]).inc();
                    ack(delivery).await;
                    "retry"
                }
                Err(()) => {
                    requeue(delivery).await;
                    "requeued"
                }
            }
        }
        Failure::Retry { code, reason, .. } => {
            let reason = format!(
                "gave up after {} attempts over {:?}: {reason}",
                attempt + 1,
                ctx.retry_for
            );
            dead_letter(ctx, delivery, attempt, known, &code, &reason).await
        }
        Failure::Dead { code, reason } => {
            dead_letter(ctx, delivery, attempt, known, &code, &reason).await
        }
    }
}

fn too_old(ctx: &Ctx, known: &Known) -> bool {
    known.received_at.is_some_and(|at| {
        Utc::now()
            .signed_duration_since(at)
            .to_std()
            .is_ok_and(|age| age > ctx.retry_for)
    })
}

/// Publishes the delivery to delay queue `slot` with its attempt header.
async fn delay(
    ctx: &Ctx,
    delivery: &Delivery,
    slot: usize,
    attempt: usize,
    code: &str,
) -> Result<(), ()> {
    let mut headers = FieldTable::default();
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(attempt as i64),
    );
    headers.insert("x-last-error".into(), AMQPValue::LongString(code.into()));
    let queue = ctx.topology.delay_queue(slot);
    match ctx
        .publisher
        .publish_to_queue(&queue, &delivery.data, &message_id(delivery), headers)
        .await
    {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "could not requeue with delay; redelivering");
            Err(())
        }
    }
}

async fn record(ctx: &Ctx, known: &Known, status: EventStatus, code: &str, reason: &str) {
    if let Some(key) = &known.key {
        if let Err(e) = ctx.store.settle(key, status, Some((code, reason))).await {
            tracing::warn!(error = %e, "could not record the event's status");
        }
    }
}

async fn dead_letter(
    ctx: &Ctx,
    delivery: &Delivery,
    attempt: usize,
    known: &Known,
    code: &str,
    reason: &str,
) -> &'static str {
    let mut headers = FieldTable::default();
    headers.insert("x-error-code".into(), AMQPValue::LongString(code.into()));
    headers.insert("x-reason".into(), AMQPValue::LongString(reason.into()));
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(attempt as i64 + 1),
    );
    match ctx
        .publisher
        .publish_to_queue(
            &ctx.topology.dead_letter_queue(),
            &delivery.data,
            &message_id(delivery),
            headers,
        )
        .await
    {
        Ok(()) => {
            record(ctx, known, EventStatus::Dead, code, reason).await;
            tracing::warn!(member_id = ?known.member_id.as_ref().map(MemberId::as_str), event = known.label, %code, %reason, "dead-lettered");
            ctx.metrics
                .dead_letters
                .with_label_values(&[known.label, code])
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

/// The delay queue for this attempt, or a later one if the wait must be longer.
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

    #[test]
    fn a_portal_gets_at_most_its_cap_of_slots() {
        let slots = PortalSlots::new(2);
        let m = MemberId::parse("m1").unwrap();
        let other = MemberId::parse("m2").unwrap();
        let a = slots.enter(&m).unwrap();
        let _b = slots.enter(&m).unwrap();
        assert!(slots.enter(&m).is_none());
        assert!(
            slots.enter(&other).is_some(),
            "other portals are not affected"
        );
        drop(a);
        assert!(slots.enter(&m).is_some());
    }
}
