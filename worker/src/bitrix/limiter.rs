//! The per-portal request budget, shared by every worker replica through PostgreSQL:
//! GCRA with one row per portal and one call of `b24_reserve_slot` (migration 0002)
//! per request. Time is the database's clock, one for all replicas.
//!
//! Two things a newcomer would not expect. A slot is reserved only when it comes within
//! `max_wait`: a longer wait means the portal is saturated, and the message goes back to
//! a delay queue instead of holding a prefetch slot while it sleeps. And the budget
//! learns: a `QUERY_LIMIT_EXCEEDED` it did not foresee ([`Limiter::limit_hit`]) slows
//! that portal for every replica to what it really allows, and granted slots let it
//! drift back to the configured rate.

use b24_shared::db::{DbError, DbPool};
use b24_shared::event::MemberId;
use std::time::Duration;

#[derive(Clone)]
pub struct Limiter {
    pool: DbPool,
    /// Seconds between requests at the configured rate (1 / rate).
    interval: f64,
    burst: f64,
    max_wait: Duration,
}

/// Slots of the burst kept in reserve (requests reordered in flight, clocks).
const BURST_MARGIN: f64 = 3.0;

/// What a reservation found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Slot {
    /// Reserved: go after this wait.
    After(Duration),
    /// Not reserved: the next slot is this far away, beyond `max_wait`.
    Saturated(Duration),
}

impl Limiter {
    pub fn new(pool: DbPool, rate_per_sec: f64, burst: f64, max_wait: Duration) -> Self {
        Self {
            pool,
            interval: 1.0 / rate_per_sec,
            burst,
            max_wait,
        }
    }

    /// Reserves one request slot for the portal if it comes within `max_wait`.
    pub async fn reserve(&self, member_id: &MemberId) -> Result<Slot, DbError> {
        self.reserve_within(member_id, self.max_wait).await
    }

    /// Reserves a slot however far away it is and sleeps until it comes: for work
    /// that holds no message (installations, the reconciler), where waiting is cheaper
    /// than starting over.
    pub async fn acquire_patiently(&self, member_id: &MemberId) -> Result<Duration, DbError> {
        match self.reserve_within(member_id, Duration::MAX).await? {
            Slot::After(wait) | Slot::Saturated(wait) => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Ok(wait)
            }
        }
    }

    async fn reserve_within(
        &self,
        member_id: &MemberId,
        max_wait: Duration,
    ) -> Result<Slot, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT wait, granted FROM b24_reserve_slot($1, $2, $3, $4, $5)",
                &[
                    member_id,
                    &self.interval,
                    &self.burst,
                    &BURST_MARGIN,
                    &max_wait.as_secs_f64().min(1e9),
                ],
            )
            .await?;
        let wait = Duration::from_secs_f64(row.get::<_, f64>(0).max(0.0));
        Ok(if row.get::<_, bool>(1) {
            Slot::After(wait)
        } else {
            Slot::Saturated(wait)
        })
    }

    /// Reserves a slot and sleeps until it comes; `Saturated` is returned untouched.
    pub async fn acquire(&self, member_id: &MemberId) -> Result<Slot, DbError> {
        let slot = self.reserve(member_id).await?;
        if let Slot::After(wait) = slot {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        Ok(slot)
    }

    /// After a 503 `QUERY_LIMIT_EXCEEDED`: the portal's bucket is full for every
    /// replica for `pause`, and its rate and burst are learned down.
    pub async fn limit_hit(&self, member_id: &MemberId, pause: Duration) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "SELECT b24_limit_hit($1, $2, $3, $4, $5)",
                &[
                    member_id,
                    &self.interval,
                    &self.burst,
                    &BURST_MARGIN,
                    &pause.as_secs_f64(),
                ],
            )
            .await?;
        Ok(())
    }
}
