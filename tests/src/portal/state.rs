//! Everything the simulated portal remembers, behind one mutex: users, applications
//! (ours and others), tokens (each for one user through one application), the leaky
//! bucket, per-method operating time, bindings, the offline event queues, the switches
//! tests flip, and the record of calls.

use super::lifecycle::Delivery;
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

/// Who a token speaks for: a user of the portal, through one application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: u64,
    pub client_id: String,
}

#[derive(Debug, Clone)]
pub struct AccessToken {
    pub issued: Instant,
    /// Forced by `expire_access_tokens`.
    pub expired: bool,
    /// Killed by a refresh of the pair it was issued with, or by an uninstall.
    pub revoked: bool,
    pub user: u64,
    pub client_id: String,
}

#[derive(Debug, Clone)]
pub struct RefreshToken {
    pub access: String,
    pub used: bool,
    pub user: u64,
    pub client_id: String,
}

/// A user of the portal. User 1 is the administrator who owns the portal.
#[derive(Debug, Clone)]
pub struct User {
    pub id: u64,
    pub name: String,
    pub last_name: String,
    /// A portal administrator: `user.admin` is true, admin-only methods work.
    pub admin: bool,
    /// An employee; `false` is an extranet user (a guest from outside the company).
    pub intranet: bool,
    /// May read CRM records.
    pub crm_read: bool,
}

/// An application on the portal: ours (the first one) or another one, whose tokens an
/// attacker might hold.
#[derive(Debug, Clone)]
pub struct App {
    pub client_id: String,
    pub client_secret: String,
    /// What `app.info` answers for it (`INSTALLED` and `VERSION` follow the lifecycle).
    pub info: Map<String, Value>,
    pub application_token: String,
    /// `BX24.installFinish()` has been called: events are delivered, widgets shown.
    pub installed: bool,
    /// Deleted from the portal: its tokens are dead and the OAuth server refuses it.
    pub removed: bool,
    /// The paid period is over: REST and refresh answer `PAYMENT_REQUIRED`.
    pub payment_required: bool,
}

impl App {
    pub fn new(client_id: &str, client_secret: &str, local_id: u64, language: &str) -> Self {
        // A local application as `app.info` describes one
        // (api-reference/common/system/app-info.md): STATUS `L`, no paid period, so
        // `DAYS` is null. It is not INSTALLED until its installer calls installFinish
        // (settings/app-installation/installation-finish.md).
        let info = json!({
            "ID": local_id,
            "CODE": client_id,
            "VERSION": 1,
            "STATUS": "L",
            "INSTALLED": false,
            "PAYMENT_EXPIRED": "N",
            "DAYS": null,
            "LANGUAGE_ID": language,
            "LICENSE": format!("{language}_project"),
            "LICENSE_TYPE": "project",
            "LICENSE_FAMILY": "project",
        });
        Self {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            info: info.as_object().cloned().unwrap_or_default(),
            application_token: random_token(),
            installed: false,
            removed: false,
            payment_required: false,
        }
    }

    pub fn set_installed(&mut self, installed: bool) {
        self.installed = installed;
        self.info.insert("INSTALLED".into(), json!(installed));
    }

    /// `VERSION` as `app.info` writes it: a number when it is one (local apps count
    /// versions 1, 2, 3...), the string otherwise.
    pub fn set_version(&mut self, version: &str) {
        let v = version
            .parse::<u64>()
            .map_or_else(|_| json!(version), |n| json!(n));
        self.info.insert("VERSION".into(), v);
    }

    pub fn version(&self) -> String {
        match self.info.get("VERSION") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        }
    }

    pub fn status(&self) -> Value {
        self.info.get("STATUS").cloned().unwrap_or(json!("L"))
    }
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
    /// `event_handler_id` in what is delivered.
    pub id: u64,
    /// The application that bound it.
    pub client_id: String,
    pub event: String,
    pub handler: String,
    /// `"0"`: the user whose action raised the event; otherwise that user's id.
    pub auth_type: String,
    pub offline: bool,
    pub auth_connector: String,
    pub options: Value,
}

#[derive(Debug, Clone)]
pub struct PlacementBinding {
    pub client_id: String,
    pub placement: String,
    pub handler: String,
    pub title: String,
    pub description: String,
    pub options: Value,
    pub lang_all: Value,
    pub user_id: u64,
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
    /// The application whose offline binding recorded it.
    pub client_id: String,
    /// The binding's `auth_connector`: each source has a queue of its own
    /// (api-reference/events/offline-events.md, "How to Avoid Cycles").
    pub connector: String,
}

impl OfflineRecord {
    /// A record as `event.offline.get` hands it out
    /// (api-reference/events/event-offline-get.md).
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

    /// As `event.offline.list` shows it, with `PROCESS_ID` and `ERROR`
    /// (api-reference/events/event-offline-list.md).
    pub fn to_list_json(&self) -> Value {
        let mut v = self.to_json();
        if let Some(o) = v.as_object_mut() {
            o.insert("PROCESS_ID".into(), json!(self.process_id));
            o.insert("ERROR".into(), json!(if self.error { "1" } else { "0" }));
        }
        v
    }
}

/// A smart process (custom CRM type) as `crm.type.list` lists it.
#[derive(Debug, Clone)]
pub struct SmartProcess {
    pub id: u64,
    pub entity_type_id: u64,
    pub title: String,
    pub created: String,
}

pub struct State {
    pub cfg: PortalConfig,
    pub client_endpoint: String,
    /// The OAuth server's `/rest/`, what events carry as `auth[server_endpoint]`.
    pub server_endpoint: String,
    /// The OAuth server's own host, the `domain` of its answers.
    pub oauth_domain: String,
    /// Instant and wall clock taken together, to turn instants into Unix times.
    pub epoch: (Instant, f64),
    pub users: Vec<User>,
    /// Ours first.
    pub apps: Vec<App>,
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
    /// Every REST call answers 500 `PORTAL_DELETED`.
    pub portal_deleted: bool,
    pub missing: HashSet<(String, u64)>,
    pub smart_processes: Vec<SmartProcess>,
    pub events: Vec<EventBinding>,
    pub binding_seq: u64,
    pub placements: Vec<PlacementBinding>,
    pub offline: Vec<OfflineRecord>,
    pub offline_seq: u64,
    /// When each `ONOFFLINEEVENT` binding was last notified.
    pub offline_notified: HashMap<u64, Instant>,
    /// Every event delivery and widget call the portal made.
    pub deliveries: Vec<Delivery>,
    pub calls: Vec<Call>,
}

impl State {
    pub fn new(
        cfg: PortalConfig,
        client_endpoint: String,
        server_endpoint: String,
        oauth_domain: String,
        now: Instant,
    ) -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let ours = App::new(&cfg.client_id, &cfg.client_secret, 5, &cfg.language);
        let admin = User {
            id: 1,
            name: "John".into(),
            last_name: "Smith".into(),
            admin: true,
            intranet: true,
            crm_read: true,
        };
        let mut s = Self {
            bucket: Bucket::new(cfg.rate_per_sec, cfg.burst, now),
            client_endpoint,
            server_endpoint,
            oauth_domain,
            epoch: (now, wall),
            users: vec![admin],
            apps: vec![ours],
            access: HashMap::new(),
            refresh: HashMap::new(),
            refreshes: 0,
            operating: HashMap::new(),
            fail_next: VecDeque::new(),
            fail_oauth: VecDeque::new(),
            fail_method: HashMap::new(),
            delay: Duration::ZERO,
            redirect: None,
            portal_deleted: false,
            missing: HashSet::new(),
            smart_processes: Vec::new(),
            events: Vec::new(),
            binding_seq: 0,
            placements: Vec::new(),
            offline: Vec::new(),
            offline_seq: 0,
            offline_notified: HashMap::new(),
            deliveries: Vec::new(),
            calls: Vec::new(),
            cfg,
        };
        for t in s.cfg.smart_processes.clone() {
            s.add_smart_process(t);
        }
        s
    }

    /// Our application.
    pub fn ours(&self) -> &App {
        &self.apps[0]
    }

    pub fn ours_mut(&mut self) -> &mut App {
        &mut self.apps[0]
    }

    pub fn our_client_id(&self) -> String {
        self.apps[0].client_id.clone()
    }

    pub fn app(&self, client_id: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.client_id == client_id)
    }

    /// Another application, installed on the portal, registered on first mention.
    pub fn other_app(&mut self, client_id: &str) -> &mut App {
        if self.app(client_id).is_none() {
            let local_id = 100 + self.apps.len() as u64;
            let mut app = App::new(client_id, &random_token(), local_id, &self.cfg.language);
            app.set_installed(true);
            self.apps.push(app);
        }
        let i = self
            .apps
            .iter()
            .position(|a| a.client_id == client_id)
            .unwrap_or(0);
        &mut self.apps[i]
    }

    pub fn user(&self, id: u64) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    pub fn add_smart_process(&mut self, entity_type_id: u64) -> u64 {
        if let Some(sp) = self
            .smart_processes
            .iter()
            .find(|s| s.entity_type_id == entity_type_id)
        {
            return sp.id;
        }
        let id = self.smart_processes.iter().map(|s| s.id).max().unwrap_or(0) + 1;
        let created = super::methods::iso_unix(self.unix(Instant::now()).floor());
        self.smart_processes.push(SmartProcess {
            id,
            entity_type_id,
            title: format!("Smart process {entity_type_id}"),
            created,
        });
        id
    }

    pub fn smart_process_exists(&self, entity_type_id: u64) -> bool {
        self.smart_processes
            .iter()
            .any(|s| s.entity_type_id == entity_type_id)
    }

    /// Unix time (seconds, fractional) of an instant.
    pub fn unix(&self, at: Instant) -> f64 {
        let (base, wall) = self.epoch;
        match at.checked_duration_since(base) {
            Some(d) => wall + d.as_secs_f64(),
            None => wall - base.saturating_duration_since(at).as_secs_f64(),
        }
    }

    /// A pair for the administrator through our application.
    pub fn issue_pair(&mut self, now: Instant) -> (String, String) {
        let ours = self.our_client_id();
        self.issue_pair_for(1, &ours, now)
    }

    pub fn issue_pair_for(&mut self, user: u64, client_id: &str, now: Instant) -> (String, String) {
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
                user,
                client_id: client_id.to_owned(),
            },
        );
        self.refresh.insert(
            refresh.clone(),
            RefreshToken {
                access: access.clone(),
                used: false,
                user,
                client_id: client_id.to_owned(),
            },
        );
        (access, refresh)
    }

    /// Who may call: the token must be known, not killed by a refresh or an uninstall,
    /// and not expired.
    pub fn check_access(&self, token: Option<&str>, now: Instant) -> Result<Caller, ApiError> {
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
            Some(t) => Ok(Caller {
                user: t.user,
                client_id: t.client_id.clone(),
            }),
        }
    }

    /// The single-use refresh: the old refresh token and the access token issued with
    /// it both die, a new pair is born for the same user and application. A refresh
    /// token issued to another application is refused as RFC 6749 5.2 says
    /// (`invalid_grant`: "issued to another client"), and is not spent.
    pub fn refresh_pair(
        &mut self,
        refresh: &str,
        client_id: &str,
        now: Instant,
    ) -> Result<(String, String, u64), ApiError> {
        let invalid = || ApiError::with(400, "invalid_grant", "Invalid refresh token");
        let (old_access, user) = match self.refresh.get_mut(refresh) {
            Some(r) if !r.used && r.client_id == client_id => {
                r.used = true;
                (r.access.clone(), r.user)
            }
            _ => return Err(invalid()),
        };
        if let Some(a) = self.access.get_mut(&old_access) {
            a.revoked = true;
        }
        self.refreshes += 1;
        let (access, refresh) = self.issue_pair_for(user, client_id, now);
        Ok((access, refresh, user))
    }

    /// Every token of an application dies (it was deleted from the portal).
    pub fn revoke_tokens_of(&mut self, client_id: &str) {
        for t in self
            .access
            .values_mut()
            .filter(|t| t.client_id == client_id)
        {
            t.revoked = true;
        }
        for t in self
            .refresh
            .values_mut()
            .filter(|t| t.client_id == client_id)
        {
            t.used = true;
        }
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

    pub fn next_binding_id(&mut self) -> u64 {
        self.binding_seq += 1;
        // Handler ids on a real portal are table ids, far from 1.
        680 + self.binding_seq
    }

    /// Records a change in an application's offline queue (one per changed object and
    /// source): a repeat of a change still waiting only moves its timestamp, as
    /// api-reference/events/offline-events.md says ("If the same deal is modified 1000
    /// times, only one record with the timestamp of the last change will remain"). A
    /// reserved record is being processed, so a repeat then adds a new one.
    pub fn record_offline(
        &mut self,
        client_id: &str,
        connector: &str,
        event: &str,
        data: Value,
        additional: Value,
        timestamp: String,
    ) -> String {
        let event = event.to_ascii_uppercase();
        let message_id = message_id(&event, &data, connector);
        self.offline_seq += 1;
        let seq = self.offline_seq;
        if let Some(r) = self.offline.iter_mut().find(|r| {
            r.client_id == client_id
                && r.message_id == message_id
                && r.process_id.is_empty()
                && !r.error
        }) {
            r.seq = seq;
            r.timestamp = timestamp;
            r.additional = additional;
            return message_id;
        }
        let id = self.offline.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        self.offline.push(OfflineRecord {
            id,
            seq,
            timestamp,
            event,
            data,
            additional,
            message_id: message_id.clone(),
            process_id: String::new(),
            error: false,
            client_id: client_id.to_owned(),
            connector: connector.to_owned(),
        });
        message_id
    }

    pub fn push_offline(&mut self, event: &str, data: Value, timestamp: String) -> String {
        let ours = self.our_client_id();
        self.record_offline(&ours, "", event, data, json!({ "user_id": "1" }), timestamp)
    }
}

/// A stable id for (event, data, source): FNV-1a over them, as 32 hex digits.
fn message_id(event: &str, data: &Value, connector: &str) -> String {
    let text = if connector.is_empty() {
        format!("{event}\u{0}{data}")
    } else {
        format!("{event}\u{0}{data}\u{0}{connector}")
    };
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
