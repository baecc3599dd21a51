//! The ingress's view of known portals, to refuse forged events at the edge: an event
//! of a known portal whose `application_token` differs gets 401 and is never published.
//! A short-lived cache keeps PostgreSQL off the hot path, and when the database is
//! unreachable (or not created yet) events are accepted: the worker verifies again,
//! and refusing would lose events Bitrix24 will not resend.

use b24_shared::db::{self, DbPool};
use b24_shared::Secret;
use prometheus::IntCounterVec;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a stored token is trusted.
const TTL: Duration = Duration::from_secs(30);
/// How long "no such portal" is trusted: briefly, since an install makes it one.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// After a database failure, how long the ingress stops asking.
const BACKOFF: Duration = Duration::from_secs(5);
/// A lookup slower than this is abandoned and the event accepted.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(300);
/// Entries kept at most; beyond that the cache is cleared (simplest bounded policy).
const MAX_ENTRIES: usize = 100_000;
/// Lookups of different portals that may run at once (each member_id maps to one).
const GATES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The token matches the stored one.
    Genuine,
    /// Unknown portal, portal without a stored token, or the database could not say.
    Unverified,
    /// A known portal's token differs.
    Forged,
}

pub struct PortalCache {
    pool: Option<DbPool>,
    entries: Mutex<HashMap<String, (Option<Secret>, Instant)>>,
    down_until: Mutex<Option<Instant>>,
    /// Requests that miss the cache together for one portal wait for one lookup
    /// instead of all asking the database (and, while it is down, all waiting for
    /// their own timeout).
    gates: [tokio::sync::Mutex<()>; GATES],
    gate_of: RandomState,
    lookups: IntCounterVec,
}

impl PortalCache {
    /// `lookups` counts reads of the table by outcome: `found`, `unknown`, `unreachable`.
    pub fn new(database_url: Option<&Secret>, lookups: IntCounterVec) -> Self {
        let pool = database_url.and_then(|url| match db::pool(url, 4) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "portal cache disabled");
                None
            }
        });
        Self {
            pool,
            entries: Mutex::new(HashMap::new()),
            down_until: Mutex::new(None),
            gates: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
            gate_of: RandomState::new(),
            lookups,
        }
    }

    pub async fn verify(&self, member_id: &str, token: &str) -> Verdict {
        let stored = match self.cached(member_id) {
            Some(s) => s,
            None => match self.fetch(member_id).await {
                Some(s) => s,
                None => return Verdict::Unverified,
            },
        };
        match stored {
            Some(t) if t.ct_eq(token) => Verdict::Genuine,
            Some(_) => Verdict::Forged,
            None => Verdict::Unverified,
        }
    }

    fn cached(&self, member_id: &str) -> Option<Option<Secret>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(member_id)
            .filter(|(t, at)| at.elapsed() < if t.is_some() { TTL } else { NEGATIVE_TTL })
            .map(|(t, _)| t.clone())
    }

    /// The stored token (`Some(None)`: no portal or no token), or `None` when the
    /// database could not answer.
    async fn fetch(&self, member_id: &str) -> Option<Option<Secret>> {
        let pool = self.pool.as_ref()?;
        let gate = (self.gate_of.hash_one(member_id) % GATES as u64) as usize;
        let _turn = self.gates[gate].lock().await;
        // Whoever held the gate before may have answered for us, or found the
        // database down.
        if let Some(stored) = self.cached(member_id) {
            return Some(stored);
        }
        if self.database_down() {
            return None;
        }
        let lookup = async {
            let client = pool.get().await.ok()?;
            client
                .query_opt(
                    "SELECT application_token FROM portals
                      WHERE member_id = $1 AND status <> 'uninstalled'",
                    &[&member_id],
                )
                .await
                .ok()
        };
        match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Some(row)) => {
                let outcome = if row.is_some() { "found" } else { "unknown" };
                self.lookups.with_label_values(&[outcome]).inc();
                let token = row.and_then(|r| r.get::<_, Option<String>>(0).map(Secret::new));
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                if entries.len() >= MAX_ENTRIES {
                    entries.clear();
                }
                entries.insert(member_id.to_string(), (token.clone(), Instant::now()));
                Some(token)
            }
            _ => {
                self.lookups.with_label_values(&["unreachable"]).inc();
                tracing::warn!(
                    "portals table unreachable; accepting events unverified for {BACKOFF:?}"
                );
                *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Instant::now() + BACKOFF);
                None
            }
        }
    }

    fn database_down(&self) -> bool {
        let down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down.is_some_and(|until| Instant::now() < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IngressMetrics;
    use b24_tests::pipeline::TestDb;
    use futures_util::future::join_all;

    fn lookups(metrics: &IngressMetrics, outcome: &str) -> u64 {
        metrics.portal_lookups.with_label_values(&[outcome]).get()
    }

    /// A database of its own holding one portal with a stored token.
    async fn database_with_portal(member_id: &str, token: &str) -> (TestDb, Secret) {
        let test_db = TestDb::new("portals");
        let url = Secret::new(test_db.url.clone());
        db::create_database_if_missing(&url).await.unwrap();
        let pool = db::pool(&url, 1).unwrap();
        db::migrate(&pool).await.unwrap();
        pool.get()
            .await
            .unwrap()
            .execute(
                "INSERT INTO portals (member_id, domain, client_endpoint, application_token)
                 VALUES ($1, 'p.bitrix24.com', 'https://p.bitrix24.com/rest/', $2)",
                &[&member_id, &token],
            )
            .await
            .unwrap();
        (test_db, url)
    }

    #[tokio::test]
    async fn requests_that_miss_together_share_one_lookup() {
        let (test_db, url) = database_with_portal("m1", "right").await;
        let metrics = IngressMetrics::default();
        let cache = PortalCache::new(Some(&url), metrics.portal_lookups.clone());

        let verdicts = join_all((0..32).map(|_| cache.verify("m1", "right"))).await;
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Genuine),
            "{verdicts:?}"
        );
        assert_eq!(cache.verify("m1", "forged").await, Verdict::Forged);
        assert_eq!(lookups(&metrics, "found"), 1, "33 verifications, one read");

        let unknown = join_all((0..32).map(|_| cache.verify("m2", "any"))).await;
        assert!(unknown.iter().all(|v| *v == Verdict::Unverified));
        assert_eq!(lookups(&metrics, "unknown"), 1);
        drop(cache);
        test_db.drop_db().await;
    }

    #[tokio::test]
    async fn a_missing_database_is_asked_once_then_left_alone() {
        // Named, never created.
        let url = Secret::new(TestDb::new("portals_missing").url);
        let metrics = IngressMetrics::default();
        let cache = PortalCache::new(Some(&url), metrics.portal_lookups.clone());

        let verdicts = join_all((0..32).map(|_| cache.verify("m1", "any"))).await;
        assert!(verdicts.iter().all(|v| *v == Verdict::Unverified));
        assert_eq!(lookups(&metrics, "unreachable"), 1);
        // Within the back-off, other portals do not ask either.
        assert_eq!(cache.verify("m2", "any").await, Verdict::Unverified);
        assert_eq!(lookups(&metrics, "unreachable"), 1);
    }
}
