//! The ingress's view of the portals the worker installed, to refuse at the edge what
//! the worker would only throw away: events of a known portal whose
//! `application_token` differs (401), and events and widget calls of portals that are
//! not installed (403). A bounded LRU cache keeps PostgreSQL off the hot path.
//! What a newcomer gets wrong: every "no" must be one the database gave. When it cannot
//! answer (down, not created yet, too slow) events are accepted unverified and the
//! worker checks them; refusing would lose events Bitrix24 will not resend.

use b24_shared::db::{self, DbPool};
use b24_shared::Secret;
use lru::LruCache;
use prometheus::IntCounterVec;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a stored token is trusted.
const TTL: Duration = Duration::from_secs(30);
/// How long any other answer (unknown, being installed) is trusted: briefly, since an
/// installation changes it.
const SHORT_TTL: Duration = Duration::from_secs(1);
/// A token that does not match is read again before a 401 (a reinstall changes it),
/// but one portal's row at most this often: a flood of forged events costs no reads.
const REREAD_AFTER: Duration = Duration::from_secs(1);
/// After a database failure, how long the ingress stops asking.
const BACKOFF: Duration = Duration::from_secs(5);
/// A lookup slower than this is abandoned and the event accepted.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(300);
/// Portals remembered at most; the least recently used is forgotten first.
pub const CAPACITY: usize = 100_000;
/// Lookups of different portals that may run at once (each member_id maps to one).
const GATES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An installed portal, and the token (if one was asked about) is its own.
    Genuine,
    /// An installed portal, and the token is not its own (or missing).
    Forged,
    /// The database says there is no such installed portal, and none being installed.
    Unknown,
    /// Let through for the worker to verify: the database could not answer, or the
    /// portal is being installed and its token may not be stored yet.
    Unverified,
}

/// What the database says about one portal.
#[derive(Debug, Clone)]
struct Record {
    /// The SHA-256 of an installed portal's `application_token`; `None` for no row, a
    /// row that is uninstalled or deleted, or one without a token.
    token: Option<String>,
    /// Installed within the grace window and no token stored yet: its `ONAPPINSTALL`,
    /// which brings the token, may still be on its way through the worker. (A stored
    /// token is never overruled: right after an installation a forged event is as
    /// forged as ever.)
    installing: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    record: Record,
    read_at: Instant,
}

impl Entry {
    fn fresh(&self) -> bool {
        let ttl = if self.record.token.is_some() {
            TTL
        } else {
            SHORT_TTL
        };
        self.read_at.elapsed() < ttl
    }
}

pub struct PortalCache {
    pool: Option<DbPool>,
    install_grace: Duration,
    entries: Mutex<LruCache<String, Entry>>,
    down_until: Mutex<Option<Instant>>,
    /// Requests that miss the cache together for one portal wait for one lookup
    /// instead of all asking the database (and, while it is down, all waiting for
    /// their own timeout).
    gates: [tokio::sync::Mutex<()>; GATES],
    gate_of: RandomState,
    lookups: IntCounterVec,
}

impl PortalCache {
    /// `lookups` counts reads of the table by outcome: `found`, `installing`,
    /// `unknown`, `unreachable`. `install_grace`: how long after an installation its
    /// portal's events pass unverified.
    pub fn new(
        database_url: Option<&Secret>,
        install_grace: Duration,
        capacity: usize,
        lookups: IntCounterVec,
    ) -> Self {
        let pool = database_url.and_then(|url| match db::pool(url, 4) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "portal check disabled");
                None
            }
        });
        Self {
            pool,
            install_grace,
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
            down_until: Mutex::new(None),
            gates: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
            gate_of: RandomState::new(),
            lookups,
        }
    }

    /// Checks an event's `application_token` (`None`: the event has none) against its
    /// portal's.
    pub async fn verify(&self, member_id: &str, token: Option<&str>) -> Verdict {
        let Some(entry) = self.entry(member_id, None).await else {
            return Verdict::Unverified;
        };
        let verdict = judge(&entry.record, token);
        if verdict != Verdict::Forged || entry.read_at.elapsed() < REREAD_AFTER {
            return verdict;
        }
        // A reinstall may have stored a new token since. If the database cannot be
        // asked now, the cached answer stands: no reinstall was stored meanwhile.
        match self.entry(member_id, Some(entry.read_at)).await {
            Some(newer) => judge(&newer.record, token),
            None => verdict,
        }
    }

    /// Whether the portal is installed (or being installed), for calls that carry no
    /// `application_token` to compare (widget calls).
    pub async fn installed(&self, member_id: &str) -> Verdict {
        match self.entry(member_id, None).await {
            None => Verdict::Unverified,
            Some(e) if e.record.token.is_some() => Verdict::Genuine,
            Some(e) if e.record.installing => Verdict::Unverified,
            Some(_) => Verdict::Unknown,
        }
    }

    /// The portal's entry, from the cache or the database; one read newer than
    /// `newer_than` if given. `None` when the database could not answer.
    async fn entry(&self, member_id: &str, newer_than: Option<Instant>) -> Option<Entry> {
        let usable = |e: &Entry| e.fresh() && newer_than.is_none_or(|t| e.read_at > t);
        if let Some(e) = self.cached(member_id).filter(usable) {
            return Some(e);
        }
        let pool = self.pool.as_ref()?;
        let gate = (self.gate_of.hash_one(member_id) % GATES as u64) as usize;
        let _turn = self.gates[gate].lock().await;
        // Whoever held the gate before may have read it for us, or found the
        // database down.
        if let Some(e) = self.cached(member_id).filter(usable) {
            return Some(e);
        }
        if self.database_down() {
            return None;
        }
        match tokio::time::timeout(LOOKUP_TIMEOUT, read(pool, member_id, self.install_grace)).await
        {
            Ok(Ok(record)) => {
                let outcome = match (&record.token, record.installing) {
                    (Some(_), _) => "found",
                    (None, true) => "installing",
                    (None, false) => "unknown",
                };
                self.lookups.with_label_values(&[outcome]).inc();
                let entry = Entry {
                    record,
                    read_at: Instant::now(),
                };
                self.entries
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .put(member_id.to_string(), entry.clone());
                Some(entry)
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

    fn cached(&self, member_id: &str) -> Option<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(member_id).cloned()
    }

    fn database_down(&self) -> bool {
        let down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        down.is_some_and(|until| Instant::now() < until)
    }
}

/// The one comparison of a stored token with an offered one, in constant time.
fn token_matches(stored_digest: &str, given: &str) -> bool {
    b24_shared::portals::token_matches(stored_digest, &Secret::new(given))
}

fn judge(record: &Record, token: Option<&str>) -> Verdict {
    match (&record.token, token) {
        (Some(stored), Some(given)) if token_matches(stored, given) => Verdict::Genuine,
        (Some(_), _) => Verdict::Forged,
        // Installed moments ago, its token not stored yet: the worker checks.
        (None, _) if record.installing => Verdict::Unverified,
        (None, _) => Verdict::Unknown,
    }
}

/// The ingress's one read of the `portals` table. A row counts as installed unless
/// it is `uninstalled` or `deleted` (a portal whose tokens need a reinstall still
/// sends genuine events); `installed_at` within `grace` means it is being installed.
/// (For a reinstall to get the window too, the worker's verified installation sets
/// `installed_at` and clears the previous installation's token, which Bitrix24 will
/// not send again.)
async fn read(
    pool: &DbPool,
    member_id: &str,
    grace: Duration,
) -> Result<Record, Box<dyn std::error::Error + Send + Sync>> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT application_token_sha256,
                    installed_at > now() - make_interval(secs => $2)
               FROM portals
              WHERE member_id = $1 AND status NOT IN ('uninstalled', 'deleted')",
            &[&member_id, &grace.as_secs_f64()],
        )
        .await?;
    Ok(match row {
        Some(row) => Record {
            token: row.get::<_, Option<String>>(0),
            installing: row.get::<_, Option<bool>>(1).unwrap_or(false),
        },
        None => Record {
            token: None,
            installing: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IngressMetrics;
    use b24_tests::pipeline::TestDb;
    use futures_util::future::join_all;

    const GRACE: Duration = Duration::from_secs(60);

    fn lookups(metrics: &IngressMetrics, outcome: &str) -> u64 {
        metrics.portal_lookups.with_label_values(&[outcome]).get()
    }

    /// A database of its own holding `portals` (member_id, token), installed an hour ago.
    async fn database_with(portals: &[(&str, &str)]) -> (TestDb, Secret) {
        let test_db = TestDb::new("portals");
        let url = Secret::new(test_db.url.clone());
        db::create_database_if_missing(&url).await.unwrap();
        let pool = db::pool(&url, 1).unwrap();
        db::migrate(&pool).await.unwrap();
        let client = pool.get().await.unwrap();
        for (member_id, token) in portals {
            client
                .execute(
                    "INSERT INTO portals (member_id, domain, client_endpoint,
                                          application_token_sha256, installed_at)
                     VALUES ($1, $1 || '.bitrix24.com', 'https://p.bitrix24.com/rest/', $2,
                             now() - interval '1 hour')",
                    &[member_id, &b24_shared::portals::token_digest(token)],
                )
                .await
                .unwrap();
        }
        (test_db, url)
    }

    #[tokio::test]
    async fn requests_that_miss_together_share_one_lookup() {
        let (test_db, url) = database_with(&[("m1", "right")]).await;
        let metrics = IngressMetrics::default();
        let cache = PortalCache::new(Some(&url), GRACE, CAPACITY, metrics.portal_lookups.clone());

        let verdicts = join_all((0..32).map(|_| cache.verify("m1", Some("right")))).await;
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Genuine),
            "{verdicts:?}"
        );
        assert_eq!(lookups(&metrics, "found"), 1, "32 verifications, one read");
        assert_eq!(cache.verify("m1", Some("forged")).await, Verdict::Forged);
        assert_eq!(cache.verify("m1", None).await, Verdict::Forged);
        // A mismatch reads the row again only if the cached one is a second old.
        assert!(lookups(&metrics, "found") <= 2);

        let unknown = join_all((0..32).map(|_| cache.verify("m2", Some("any")))).await;
        assert!(unknown.iter().all(|v| *v == Verdict::Unknown));
        assert_eq!(cache.installed("m2").await, Verdict::Unknown);
        assert_eq!(cache.installed("m1").await, Verdict::Genuine);
        assert_eq!(lookups(&metrics, "unknown"), 1);
        drop(cache);
        test_db.drop_db().await;
    }

    #[tokio::test]
    async fn a_missing_database_is_asked_once_then_left_alone() {
        // Named, never created.
        let url = Secret::new(TestDb::new("portals_missing").url.clone());
        let metrics = IngressMetrics::default();
        let cache = PortalCache::new(Some(&url), GRACE, CAPACITY, metrics.portal_lookups.clone());

        let verdicts = join_all((0..32).map(|_| cache.verify("m1", Some("any")))).await;
        assert!(verdicts.iter().all(|v| *v == Verdict::Unverified));
        assert_eq!(lookups(&metrics, "unreachable"), 1);
        // Within the back-off, other portals do not ask either.
        assert_eq!(cache.verify("m2", Some("any")).await, Verdict::Unverified);
        assert_eq!(cache.installed("m3").await, Verdict::Unverified);
        assert_eq!(lookups(&metrics, "unreachable"), 1);
    }

    #[tokio::test]
    async fn a_full_cache_forgets_the_least_recently_used_portal_only() {
        let portals: Vec<(String, String)> =
            (0..6).map(|i| (format!("m{i}"), format!("t{i}"))).collect();
        let rows: Vec<(&str, &str)> = portals
            .iter()
            .map(|(m, t)| (m.as_str(), t.as_str()))
            .collect();
        let (test_db, url) = database_with(&rows).await;
        let metrics = IngressMetrics::default();
        let cache = PortalCache::new(Some(&url), GRACE, 4, metrics.portal_lookups.clone());

        // m0 is busy; five other portals come and go around it.
        for (member, token) in &rows[1..] {
            assert_eq!(cache.verify("m0", Some("t0")).await, Verdict::Genuine);
            assert_eq!(cache.verify(member, Some(token)).await, Verdict::Genuine);
        }
        assert_eq!(cache.verify("m0", Some("t0")).await, Verdict::Genuine);
        assert_eq!(
            lookups(&metrics, "found"),
            6,
            "one read per portal: the busy one was never forgotten"
        );
        // m1 and m2 were the least recently used: read again.
        assert_eq!(cache.verify("m1", Some("t1")).await, Verdict::Genuine);
        assert_eq!(lookups(&metrics, "found"), 7);
        drop(cache);
        test_db.drop_db().await;
    }
}
