//! Everything the simulated portal remembers, behind one mutex: tokens, the leaky
//! bucket, per-method operating time, bindings, the offline event queue, the switches
//! tests flip, and the record of calls.

use super::{ApiError, Call, PortalConfig};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bitrix24 keeps one-minute baskets of operating time, each for ten minutes.
pub const BASKET_SPAN: Duration = Duration::from_secs(60);
pub const BASKET_LIFE: Duration = Duration::from_secs(600);

/// A token as Bitrix24 writes them: 32 lowercase letters and digits.
pub fn random_token() -> String {
    Alphanumeric
        .sample_string(&mut rand::rng(), 32)
        .to_ascii_lowercase()
}

/// The leaky bucket Bitrix24 counts HTTP requests with: each request adds one, the
/// level drains continuously at `rate` per second, and a request that would lift the
/// level above `capacity` is refused without being counted.
#[derive(Debug)]
pub struct Bucket {
    pub level: f64,
    pub last: Instant,
    pub rate: f64,
    pub capacity: f64,
}

impl Bucket {
    pub fn new(rate: f64, capacity: f64, now: Instant) -> Self {
        Self {
            level: 0.0,
            last: now,
            rate,
            capacity,
        }
    }

    pub fn drain(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        let rate = if self.rate.is_finite() {
            self.rate.max(0.0)
        } else {
            0.0
        };
        self.level = (self.level - dt * rate).max(0.0);
        if now > self.last {
            self.last = now;
        }
    }

    /// Counts one request; `false` (and nothing counted) when the bucket is full.
    pub fn try_add(&mut self, now: Instant) -> bool {
        self.drain(now);
        // The epsilon keeps 50 requests in a burst of 50 from failing on rounding.
        if self.level + 1.0 > self.capacity + 1e-9 {
            return false;
        }
        self.level += 1.0;
        true
    }
}

/// One minute of a method's operating time.
#[derive(Debug, Clone, Copy)]
pub struct Basket {
    pub opened: Instant,
    pub expires: Instant,
    pub secs: f64,
}

/// A method's operating time over the last ten minutes, in one-minute baskets.
#[derive(Debug, Default)]
pub struct Operating {
    pub baskets: VecDeque<Basket>,
}

impl Operating {
    pub fn prune(&mut self, now: Instant) {
        while self.baskets.front().is_some_and(|b| b.expires <= now) {
            self.baskets.pop_front();
        }
    }

    pub fn total(&self) -> f64 {
        self.baskets.iter().map(|b| b.secs).sum()
    }

    pub fn add(&mut self, now: Instant, secs: f64) {
        match self.baskets.back_mut() {
            Some(b) if now < b.opened + BASKET_SPAN => b.secs += secs,
            _ => self.baskets.push_back(Basket {
                opened: now,
                expires: now + BASKET_LIFE,
                secs,
            }),
        }
    }

    /// When the oldest basket leaves the sum (`time.operating_reset_at`).
    pub fn reset_at(&self, now: Instant) -> Instant {
        self.baskets
            .front()
            .map_or(now + BASKET_LIFE, |b| b.expires)
    }
}

#[derive(Debug, Clone)]
pub struct AccessToken {
    pub issued: Instant,
    /// Forced by `expire_access_tokens`.
    pub expired: bool,
    /// Killed by a refresh of the pair it was issued with.
    pub revoked: bool,
}

#[derive(Debug, Clone)]
pub struct RefreshToken {
    pub access: String,
    pub used: bool,
}

/// What an injected failure answers.
#[derive(Debug, Clone)]
pub enum Failure {
    /// A Bitrix24 error body with this status and code.
    Error { status: u16, code: String },
    /// This exact body (an HTML error page from a proxy, say).
    Raw { status: u16, body: String },
    /// The connection is closed without an answer.
    Drop,
}

#[derive(Debug, Clone)]
pub struct EventBinding {
    pub event: String,
    pub handler: String,
    pub auth_type: String,
    pub offline: bool,
    pub auth_connector: String,
}

#[derive(Debug, Clone)]
pub struct PlacementBinding {
    pub placement: String,
    pub handler: String,
    pub title: String,
    pub description: String,
    pub options: Value,
}

#[derive(Debug, Clone)]
pub struct OfflineRecord {
    pub id: u64,
    /// Order by `TIMESTAMP_X`: raised when a repeat of the same change updates it.
    pub seq: u64,
    pub timestamp: String,
    pub event: String,
    pub data: Value,
    pub additional: Value,
    pub message_id: String,
    /// Empty while unreserved.
    pub process_id: String,
    pub error: bool,
}

impl OfflineRecord {
    pub fn to_json(&self) -> Value {
        json!({
            "ID": self.id.to_string(),
            "TIMESTAMP_X": self.timestamp,
            "EVENT_NAME": self.event,
            "EVENT_DATA": self.data,
            "EVENT_ADDITIONAL": self.additional,
            "MESSAGE_ID": self.message_id,
        })
    }
}

pub struct State {
    pub cfg: PortalConfig,
    pub client_endpoint: String,
    pub application_token: String,
    /// Instant and wall clock taken together, to turn instants into Unix times.
    pub epoch: (Instant, f64),
    pub access: HashMap<String, AccessToken>,
    pub refresh: HashMap<String, RefreshToken>,
    pub refreshes: usize,
    pub bucket: Bucket,
    pub operating: HashMap<String, Operating>,
    pub fail_next: VecDeque<Failure>,
    pub fail_oauth: VecDeque<Failure>,
    pub fail_method: HashMap<String, VecDeque<ApiError>>,
    pub delay: Duration,
    pub redirect: Option<String>,
    pub missing: HashSet<(String, u64)>,
    pub app_info: Map<String, Value>,
    pub events: Vec<EventBinding>,
    pub placements: Vec<PlacementBinding>,
    pub offline: Vec<OfflineRecord>,
    pub offline_seq: u64,
    pub calls: Vec<Call>,
}

impl State {
    pub fn new(cfg: PortalConfig, client_endpoint: String, now: Instant) -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let app_info = json!({
            "ID": 5,
            "CODE": "b24.pipeline",
            "VERSION": 1,
            "STATUS": "S",
            "INSTALLED": true,
            "PAYMENT_EXPIRED": "N",
            "DAYS": 28,
            "LANGUAGE_ID": "en",
            "LICENSE": "en_project",
            "LICENSE_TYPE": "project",
            "LICENSE_FAMILY": "project",
        });
        Self {
            bucket: Bucket::new(cfg.rate_per_sec, cfg.burst, now),
            cfg,
            client_endpoint,
            application_token: random_token(),
            epoch: (now, wall),
            access: HashMap::new(),
            refresh: HashMap::new(),
            refreshes: 0,
            operating: HashMap::new(),
            fail_next: VecDeque::new(),
            fail_oauth: VecDeque::new(),
            fail_method: HashMap::new(),
            delay: Duration::ZERO,
            redirect: None,
            missing: HashSet::new(),
            app_info: app_info.as_object().cloned().unwrap_or_default(),
            events: Vec::new(),
            placements: Vec::new(),
            offline: Vec::new(),
            offline_seq: 0,
            calls: Vec::new(),
        }
    }

    /// Unix time (seconds, fractional) of an instant.
    pub fn unix(&self, at: Instant) -> f64 {
        let (base, wall) = self.epoch;
        match at.checked_duration_since(base) {
            Some(d) => wall + d.as_secs_f64(),
            None => wall - base.saturating_duration_since(at).as_secs_f64(),
        }
    }

    pub fn issue_pair(&mut self, now: Instant) -> (String, String) {
        let mut access = random_token();
        while self.access.contains_key(&access) {
            access = random_token();
        }
        let mut refresh = random_token();
        while self.refresh.contains_key(&refresh) {
            refresh = random_token();
        }
        self.access.insert(
            access.clone(),
            AccessToken {
                issued: now,
                expired: false,
                revoked: false,
            },
        );
        self.refresh.insert(
            refresh.clone(),
            RefreshToken {
                access: access.clone(),
                used: false,
            },
        );
        (access, refresh)
    }

    /// Who may call: the token must be known, not killed by a refresh, and not expired.
    pub fn check_access(&self, token: Option<&str>, now: Instant) -> Result<(), ApiError> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(ApiError::new(401, "NO_AUTH_FOUND"));
        };
        match self.access.get(token) {
            None => Err(ApiError::new(401, "invalid_token")),
            Some(t) if t.revoked => Err(ApiError::new(401, "invalid_token")),
            Some(t)
                if t.expired || now.saturating_duration_since(t.issued) >= self.cfg.token_ttl =>
            {
                Err(ApiError::new(401, "expired_token"))
            }
            Some(_) => Ok(()),
        }
    }

    /// The single-use refresh: the old refresh token and the access token issued with
    /// it both die, a new pair is born.
    pub fn refresh_pair(
        &mut self,
        refresh: &str,
        now: Instant,
    ) -> Result<(String, String), ApiError> {
        let old_access = match self.refresh.get_mut(refresh) {
            Some(r) if !r.used => {
                r.used = true;
                r.access.clone()
            }
            _ => {
                return Err(ApiError::with(
                    400,
                    "invalid_grant",
                    "Invalid refresh token",
                ))
            }
        };
        if let Some(a) = self.access.get_mut(&old_access) {
            a.revoked = true;
        }
        self.refreshes += 1;
        Ok(self.issue_pair(now))
    }

    pub fn operating_mut(&mut self, method: &str, now: Instant) -> &mut Operating {
        let op = self.operating.entry(method.to_owned()).or_default();
        op.prune(now);
        op
    }

    pub fn take_method_failure(&mut self, method: &str) -> Option<ApiError> {
        let queue = self.fail_method.get_mut(method)?;
        let f = queue.pop_front();
        if queue.is_empty() {
            self.fail_method.remove(method);
        }
        f
    }

    pub fn push_offline(&mut self, event: &str, data: Value, timestamp: String) -> String {
        let event = event.to_ascii_uppercase();
        let message_id = message_id(&event, &data);
        self.offline_seq += 1;
        let seq = self.offline_seq;
        // One record per changed object: a repeat of a change still waiting only moves
        // its timestamp (a reserved one is being processed, so a new record is added).
        if let Some(r) = self
            .offline
            .iter_mut()
            .find(|r| r.message_id == message_id && r.process_id.is_empty() && !r.error)
        {
            r.seq = seq;
            r.timestamp = timestamp;
            return message_id;
        }
        let id = self.offline.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        self.offline.push(OfflineRecord {
            id,
            seq,
            timestamp,
            event,
            data,
            additional: json!({ "user_id": "1" }),
            message_id: message_id.clone(),
            process_id: String::new(),
            error: false,
        });
        message_id
    }
}

/// A stable id for (event, data): FNV-1a over both, as 32 hex digits.
fn message_id(event: &str, data: &Value) -> String {
    let text = format!("{event}\u{0}{data}");
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x8422_2325_cbf2_9ce4;
    for byte in text.bytes() {
        a = (a ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        b = (b ^ u64::from(byte))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(7);
    }
    format!("{a:016x}{b:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_admits_exactly_the_burst_then_drains_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2.0, 50.0, t0);
        assert_eq!((0..60).filter(|_| b.try_add(t0)).count(), 50);
        assert!(!b.try_add(t0 + Duration::from_millis(499)));
        assert!(b.try_add(t0 + Duration::from_millis(500)));
        assert!(!b.try_add(t0 + Duration::from_millis(500)));
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!((0..5).filter(|_| b.try_add(t1)).count(), 2);
        // A steady 2/s never overflows once it fits.
        let mut b = Bucket::new(2.0, 50.0, t0);
        let ok = (0..1000u64)
            .filter(|i| b.try_add(t0 + Duration::from_millis(i * 500)))
            .count();
        assert_eq!(ok, 1000);
    }

    #[test]
    fn operating_sums_baskets_and_forgets_them_after_ten_minutes() {
        let t0 = Instant::now();
        let mut op = Operating::default();
        op.add(t0, 1.0);
        op.add(t0 + Duration::from_secs(30), 1.0);
        op.add(t0 + Duration::from_secs(90), 1.0);
        assert_eq!(op.baskets.len(), 2);
        assert_eq!(op.total(), 3.0);
        assert_eq!(op.reset_at(t0), t0 + BASKET_LIFE);
        op.prune(t0 + BASKET_LIFE);
        assert_eq!(op.total(), 1.0);
    }
}
