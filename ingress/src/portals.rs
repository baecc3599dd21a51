//! The ingress's view of known portals, to refuse forged events at the edge: an event
//! of a known portal whose `application_token` differs gets 401 and is never published.
//! A short-lived cache keeps PostgreSQL off the hot path, and when the database is
//! unreachable (or not created yet) events are accepted: the worker verifies again,
//! and refusing would lose events Bitrix24 will not resend.

use b24_shared::db::{self, DbPool};
use b24_shared::Secret;
use std::collections::HashMap;
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
}

impl PortalCache {
    pub fn new(database_url: Option<&Secret>) -> Self {
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
        {
            let down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
            if down.is_some_and(|until| Instant::now() < until) {
                return None;
            }
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
                let token = row.and_then(|r| r.get::<_, Option<String>>(0).map(Secret::new));
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                if entries.len() >= MAX_ENTRIES {
                    entries.clear();
                }
                entries.insert(member_id.to_string(), (token.clone(), Instant::now()));
                Some(token)
            }
            _ => {
                tracing::warn!(
                    "portals table unreachable; accepting events unverified for {BACKOFF:?}"
                );
                *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Instant::now() + BACKOFF);
                None
            }
        }
    }
}
