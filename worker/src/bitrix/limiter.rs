//! The per-portal request budget, shared by every worker replica through PostgreSQL:
//! GCRA with one row per portal and one atomic UPDATE per call. Each call reserves its
//! slot and then sleeps until the slot's time, so callers wait instead of failing, and
//! all replicas together stay inside the portal's leaky bucket. Time is the
//! database's `now()`, one clock for all replicas.

use b24_shared::db::{DbError, DbPool};
use std::time::Duration;

#[derive(Clone)]
pub struct Limiter {
    pool: DbPool,
    /// Seconds between requests at the sustained rate (1 / rate).
    interval: f64,
    /// How far ahead of the sustained rate a portal may run: the burst, less a margin
    /// for requests that leave our replicas in a different order than they reserved.
    tolerance: f64,
}

/// Slots of the burst kept in reserve (requests reordered in flight, clocks).
const BURST_MARGIN: f64 = 3.0;

impl Limiter {
    pub fn new(pool: DbPool, rate_per_sec: f64, burst: f64) -> Self {
        let interval = 1.0 / rate_per_sec;
        let tolerance = ((burst - 1.0 - BURST_MARGIN).max(0.0)) * interval;
        Self {
            pool,
            interval,
            tolerance,
        }
    }

    /// Reserves one request slot for the portal; returns how long to wait for it.
    pub async fn reserve(&self, member_id: &str) -> Result<Duration, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "INSERT INTO rate_limits AS r (member_id, tat)
                 VALUES ($1, clock_timestamp() + make_interval(secs => $2))
                 ON CONFLICT (member_id) DO UPDATE
                   SET tat = greatest(r.tat, clock_timestamp()) + make_interval(secs => $2)
                 RETURNING greatest(0, extract(epoch FROM
                   (tat - make_interval(secs => $2 + $3) - clock_timestamp())))::float8",
                &[&member_id, &self.interval, &self.tolerance],
            )
            .await?;
        let wait: f64 = row.get(0);
        Ok(Duration::from_secs_f64(wait.max(0.0)))
    }

    /// Reserves a slot and sleeps until it comes.
    pub async fn acquire(&self, member_id: &str) -> Result<Duration, DbError> {
        let wait = self.reserve(member_id).await?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(wait)
    }

    /// After a 503 QUERY_LIMIT_EXCEEDED: treat the portal's bucket as full for every
    /// replica, so all of them slow down, not just the one that was refused.
    pub async fn push_back(&self, member_id: &str, pause: Duration) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE rate_limits
                    SET tat = greatest(tat, clock_timestamp() + make_interval(secs => $2 + $3))
                  WHERE member_id = $1",
                &[&member_id, &self.tolerance, &pause.as_secs_f64()],
            )
            .await?;
        Ok(())
    }
}
