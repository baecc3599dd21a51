//! What the worker reads and writes in PostgreSQL. An event's row is keyed by a digest
//! of what makes it the same event (member_id, code, ts, data), so a redelivery or a
//! duplicate POST finds the row and is not processed twice; entity writes are upserts.

use b24_shared::db::DbPool;
use b24_shared::event::redact;
use b24_shared::{Envelope, EnvelopeKind, Secret};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {}", b24_shared::db::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] b24_shared::db::PoolError),
}

/// A stored portal, as verification needs it.
#[derive(Debug, Clone)]
pub struct PortalRow {
    pub member_id: String,
    pub domain: String,
    pub client_endpoint: String,
    pub application_token: Option<Secret>,
    pub status: String,
}

/// One row to upsert into `entities`.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityWrite {
    pub kind: String,
    pub entity_id: String,
    pub data: Value,
}

/// The app's payment state, kept on the portal row.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentState {
    pub app_status: String,
    pub payment_expired: bool,
    pub days_left: Option<i32>,
}

/// Where an event stands before processing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventState {
    /// Not finished before: process it (`attempts` counts this delivery).
    Open { attempts: i32 },
    /// Already processed (`done` or `ignored`): ack and move on.
    Finished,
}

/// The identity of an event: the same member_id, code, ts and data are the same event
/// however often it arrives. Widget and install calls have no `ts`: each call is its
/// own, so their envelope id is their identity.
pub fn dedup_key(env: &Envelope) -> String {
    let mut h = Sha256::new();
    match env.kind {
        EnvelopeKind::Event => {
            let p = &env.payload;
            h.update(b"event\0");
            h.update(
                env.member_id
                    .as_ref()
                    .map(|m| m.as_str())
                    .unwrap_or("")
                    .as_bytes(),
            );
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

    /// Finds the portal by member_id, or by domain for events documented without one.
    pub async fn portal(
        &self,
        member_id: Option<&str>,
        domain: Option<&str>,
    ) -> Result<Option<PortalRow>, StoreError> {
        let client = self.pool.get().await?;
        let row = match (member_id, domain) {
            (Some(m), _) => {
                client
                    .query_opt(
                        "SELECT member_id, domain, client_endpoint, application_token, status
                           FROM portals WHERE member_id = $1",
                        &[&m],
                    )
                    .await?
            }
            (None, Some(d)) => {
                client
                    .query_opt(
                        "SELECT member_id, domain, client_endpoint, application_token, status
                           FROM portals WHERE lower(domain) = lower($1)
                          ORDER BY updated_at DESC LIMIT 1",
                        &[&d],
                    )
                    .await?
            }
            (None, None) => None,
        };
        Ok(row.map(|r| PortalRow {
            member_id: r.get(0),
            domain: r.get(1),
            client_endpoint: r.get(2),
            application_token: r.get::<_, Option<String>>(3).map(Secret::new),
            status: r.get(4),
        }))
    }

    /// Records a delivery of the event and says whether it still needs processing.
    pub async fn begin(&self, key: &str, env: &Envelope) -> Result<EventState, StoreError> {
        let client = self.pool.get().await?;
        let member = env.member_id.as_ref().map(|m| m.as_str().to_string());
        let row = client
            .query_one(
                "INSERT INTO events (dedup_key, envelope_id, member_id, kind, event, status,
                                     attempts, payload, received_at)
                 VALUES ($1, $2, $3, $4, $5, 'processing', 1, $6, $7)
                 ON CONFLICT (dedup_key) DO UPDATE
                   SET attempts = CASE WHEN events.status IN ('done', 'ignored')
                                       THEN events.attempts ELSE events.attempts + 1 END,
                       status = CASE WHEN events.status IN ('done', 'ignored')
                                     THEN events.status ELSE 'processing' END,
                       updated_at = now()
                 RETURNING status, attempts",
                &[
                    &key,
                    &env.id,
                    &member,
                    &env.kind.as_str(),
                    &env.event,
                    &redact(&env.payload),
                    &env.received_at,
                ],
            )
            .await?;
        let status: String = row.get(0);
        Ok(match status.as_str() {
            "done" | "ignored" => EventState::Finished,
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
                &[&key, &uuid::Uuid::now_v7(), &reason, &code, &payload],
            )
            .await?;
        Ok(())
    }

    /// Sets the event's final or interim status with the last error.
    pub async fn settle(
        &self,
        key: &str,
        status: &str,
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
                &[&key, &status, &code, &reason],
            )
            .await?;
        Ok(())
    }

    /// Stores what the event fetched and marks it done, in one transaction.
    pub async fn complete(
        &self,
        key: &str,
        member_id: &str,
        writes: &[EntityWrite],
        payment: Option<&PaymentState>,
    ) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for w in writes {
            tx.execute(
                "INSERT INTO entities (member_id, kind, entity_id, data, fetched_at)
                 VALUES ($1, $2, $3, $4, now())
                 ON CONFLICT (member_id, kind, entity_id)
                 DO UPDATE SET data = EXCLUDED.data, fetched_at = now()",
                &[&member_id, &w.kind, &w.entity_id, &w.data],
            )
            .await?;
        }
        if let Some(p) = payment {
            tx.execute(
                "UPDATE portals SET app_status = $2, payment_expired = $3, days_left = $4,
                        updated_at = now()
                  WHERE member_id = $1",
                &[&member_id, &p.app_status, &p.payment_expired, &p.days_left],
            )
            .await?;
        }
        tx.execute(
            "UPDATE events SET status = 'done', member_id = coalesce(member_id, $2),
                    updated_at = now() WHERE dedup_key = $1",
            &[&key, &member_id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates or replaces the portal after a verified installation.
    pub async fn install(&self, p: &Installation) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO portals (member_id, domain, client_endpoint, server_endpoint,
                                      access_token, refresh_token, expires_at,
                                      application_token, status)
                 VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7), $8, 'installed')
                 ON CONFLICT (member_id) DO UPDATE SET
                     domain = EXCLUDED.domain,
                     client_endpoint = EXCLUDED.client_endpoint,
                     server_endpoint = coalesce(EXCLUDED.server_endpoint, portals.server_endpoint),
                     access_token = EXCLUDED.access_token,
                     refresh_token = EXCLUDED.refresh_token,
                     expires_at = EXCLUDED.expires_at,
                     application_token = coalesce(EXCLUDED.application_token, portals.application_token),
                     status = 'installed',
                     updated_at = now()",
                &[
                    &p.member_id,
                    &p.domain,
                    &p.client_endpoint,
                    &p.server_endpoint,
                    &p.access_token.expose(),
                    &p.refresh_token.expose(),
                    &(p.expires_in as f64),
                    &p.application_token.as_ref().map(|t| t.expose().to_string()),
                ],
            )
            .await?;
        Ok(())
    }

    /// Marks the portal uninstalled and erases its tokens.
    pub async fn uninstall(&self, member_id: &str) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE portals SET status = 'uninstalled', access_token = NULL,
                        refresh_token = NULL, expires_at = NULL, updated_at = now()
                  WHERE member_id = $1",
                &[&member_id],
            )
            .await?;
        Ok(())
    }
}

/// A verified installation to store.
#[derive(Debug, Clone)]
pub struct Installation {
    pub member_id: String,
    pub domain: String,
    pub client_endpoint: String,
    pub server_endpoint: Option<String>,
    pub access_token: Secret,
    pub refresh_token: Secret,
    pub expires_in: i64,
    pub application_token: Option<Secret>,
}
