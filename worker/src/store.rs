//! The worker's own tables: `events` (one row per distinct inbound event) and
//! `entities` (what events pointed at, as Bitrix24 returned it). Portals have their own
//! module (`b24_shared::portals`).
//!
//! An event's row is keyed by a digest of what makes it the same event (member_id,
//! code, ts, data), so a redelivery or a duplicate POST finds the row and is not
//! processed twice; entity writes are upserts. jsonb cannot hold U+0000, which Bitrix24
//! answers may contain: such an entity keeps its exact text in `raw` (json) and has
//! U+FFFD in its place in `data`.

use b24_shared::db::DbPool;
use b24_shared::event::{redact, MemberId};
use b24_shared::{Envelope, EnvelopeKind};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {}", b24_shared::db::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] b24_shared::db::PoolError),
}

/// One row to upsert into `entities`.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityWrite {
    pub kind: String,
    pub entity_id: String,
    pub data: Value,
}

/// Where an event stands before processing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventState {
    /// Not finished before: process it (`attempts` counts this delivery).
    Open { attempts: i32 },
    /// Already processed (`done`, `ignored`, `denied`): ack and move on.
    Finished,
}

/// How an event's row ends or waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    Done,
    /// Not an event we handle.
    Ignored,
    /// A widget call whose user's own token Bitrix24 refused: recorded, not retried.
    Denied,
    /// In a delay queue, spending an attempt.
    Retrying,
    /// In a delay queue while its portal cannot be called (unpaid, reinstall...).
    Held,
    Dead,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Ignored => "ignored",
            Self::Denied => "denied",
            Self::Retrying => "retrying",
            Self::Held => "held",
            Self::Dead => "dead",
        }
    }
}

/// The identity of an event: the same member_id, code, ts and data are the same event
/// however often it arrives. An offline record is identified by its `MESSAGE_ID` and
/// `TIMESTAMP_X` (a repeat of a change moves the timestamp). Widget and install calls
/// have no `ts`: each call is its own, so their envelope id is their identity.
pub fn dedup_key(env: &Envelope) -> String {
    let mut h = Sha256::new();
    let member = env.member_id.as_ref().map(|m| m.as_str()).unwrap_or("");
    match env.kind {
        EnvelopeKind::Event => {
            let p = &env.payload;
            h.update(b"event\0");
            h.update(member.as_bytes());
            h.update(b"\0");
            h.update(env.domain.as_deref().unwrap_or("").as_bytes());
            h.update(b"\0");
            h.update(env.event.as_bytes());
            h.update(b"\0");
            h.update(scalar(&p["ts"]).as_bytes());
            h.update(b"\0");
            // serde_json's map is ordered by key, so this text is canonical.
            h.update(p["data"].to_string().as_bytes());
        }
        EnvelopeKind::Offline => {
            let p = &env.payload;
            h.update(b"offline\0");
            h.update(member.as_bytes());
            h.update(b"\0");
            h.update(scalar(&p["MESSAGE_ID"]).as_bytes());
            h.update(b"\0");
            h.update(scalar(&p["TIMESTAMP_X"]).as_bytes());
        }
        EnvelopeKind::Placement | EnvelopeKind::Install => {
            h.update(env.kind.as_str().as_bytes());
            h.update(b"\0");
            h.update(env.id.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A value jsonb can store: every U+0000 in a string or key replaced by U+FFFD.
/// Borrowed when there is none (the usual case).
pub fn jsonb_safe(v: &Value) -> Cow<'_, Value> {
    fn has_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(a) => a.iter().any(has_nul),
            Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    fn clean(v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(s.replace('\0', "\u{FFFD}")),
            Value::Array(a) => Value::Array(a.iter().map(clean).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (k.replace('\0', "\u{FFFD}"), clean(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    if has_nul(v) {
        Cow::Owned(clean(v))
    } else {
        Cow::Borrowed(v)
    }
}

#[derive(Clone)]
pub struct Store {
    pool: DbPool,
}

impl Store {
    pub fn new(pool: DbPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &DbPool {
        &self.pool
    }

    /// Records a delivery of a verified event and says whether it still needs
    /// processing.
    pub async fn begin(
        &self,
        key: &str,
        env: &Envelope,
        member_id: Option<&MemberId>,
    ) -> Result<EventState, StoreError> {
        let client = self.pool.get().await?;
        let payload = redact(&env.payload);
        let row = client
            .query_one(
                "INSERT INTO events (dedup_key, envelope_id, member_id, kind, event, status,
                                     attempts, payload, received_at)
                 VALUES ($1, $2, $3, $4, $5, 'processing', 1, $6, $7)
                 ON CONFLICT (dedup_key) DO UPDATE
                   SET attempts = CASE WHEN events.status IN ('done', 'ignored', 'denied')
                                       THEN events.attempts ELSE events.attempts + 1 END,
                       status = CASE WHEN events.status IN ('done', 'ignored', 'denied')
                                     THEN events.status ELSE 'processing' END,
                       updated_at = now()
                 RETURNING status, attempts",
                &[
                    &key,
                    &env.id,
                    &member_id,
                    &env.kind.as_str(),
                    &env.event,
                    &*jsonb_safe(&payload),
                    &env.received_at,
                ],
            )
            .await?;
        let status: String = row.get(0);
        Ok(match status.as_str() {
            "done" | "ignored" | "denied" => EventState::Finished,
            _ => EventState::Open {
                attempts: row.get(1),
            },
        })
    }

    /// Records an event that could not even be identified (malformed envelope).
    pub async fn record_malformed(
        &self,
        body: &[u8],
        code: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let key = hex::encode(Sha256::digest(body));
        let payload = serde_json::from_slice::<Value>(body)
            .map(|v| redact(&v))
            .unwrap_or_else(|_| Value::String("(not JSON)".into()));
        client
            .execute(
                "INSERT INTO events (dedup_key, envelope_id, kind, event, status, attempts,
                                     last_error, error_code, payload, received_at)
                 VALUES ($1, $2, 'unknown', 'UNKNOWN', 'dead', 1, $3, $4, $5, now())
                 ON CONFLICT (dedup_key) DO UPDATE SET attempts = events.attempts + 1,
                     updated_at = now()",
                &[
                    &key,
                    &uuid::Uuid::now_v7(),
                    &reason,
                    &code,
                    &*jsonb_safe(&payload),
                ],
            )
            .await?;
        Ok(())
    }

    /// Sets the event's final or interim status with the last error.
    pub async fn settle(
        &self,
        key: &str,
        status: EventStatus,
        error: Option<(&str, &str)>,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let (code, reason) = error.unzip();
        client
            .execute(
                "UPDATE events SET status = $2,
                        error_code = coalesce($3, error_code),
                        last_error = coalesce($4, last_error),
                        updated_at = now()
                  WHERE dedup_key = $1",
                &[&key, &status.as_str(), &code, &reason],
            )
            .await?;
        Ok(())
    }

    /// Stores what the event fetched and marks it done, in one transaction.
    pub async fn complete(
        &self,
        key: &str,
        member_id: &MemberId,
        writes: &[EntityWrite],
    ) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for w in writes {
            let safe = jsonb_safe(&w.data);
            let raw = matches!(safe, Cow::Owned(_)).then_some(&w.data);
            tx.execute(
                "INSERT INTO entities (member_id, kind, entity_id, data, raw, fetched_at)
                 VALUES ($1, $2, $3, $4, $5::json, now())
                 ON CONFLICT (member_id, kind, entity_id)
                 DO UPDATE SET data = EXCLUDED.data, raw = EXCLUDED.raw, fetched_at = now()",
                &[member_id, &w.kind, &w.entity_id, &*safe, &raw],
            )
            .await?;
        }
        tx.execute(
            "UPDATE events SET status = 'done', member_id = coalesce(member_id, $2),
                    updated_at = now() WHERE dedup_key = $1",
            &[&key, member_id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Were all these entities fetched after `at`? (An offline record of a change the
    /// online path already fetched needs no second fetch.)
    pub async fn fetched_after(
        &self,
        member_id: &MemberId,
        entities: &[(&str, &str)],
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        if entities.is_empty() {
            return Ok(false);
        }
        let client = self.pool.get().await?;
        let kinds: Vec<&str> = entities.iter().map(|(k, _)| *k).collect();
        let ids: Vec<&str> = entities.iter().map(|(_, i)| *i).collect();
        let row = client
            .query_one(
                "SELECT count(*) FROM entities e
                   JOIN unnest($2::text[], $3::text[]) AS w(kind, entity_id)
                     ON e.kind = w.kind AND e.entity_id = w.entity_id
                  WHERE e.member_id = $1 AND e.fetched_at >= $4",
                &[member_id, &kinds, &ids, &at],
            )
            .await?;
        Ok(row.get::<_, i64>(0) == entities.len() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_is_replaced_only_where_it_is() {
        let clean = json!({"a": "x", "b": [1, "y"]});
        assert!(matches!(jsonb_safe(&clean), Cow::Borrowed(_)));
        let dirty = json!({"a": "x\u{0}y", "k\u{0}": {"c": ["\u{0}"]}});
        assert_eq!(
            *jsonb_safe(&dirty),
            json!({"a": "x\u{FFFD}y", "k\u{FFFD}": {"c": ["\u{FFFD}"]}})
        );
    }
}
