//! A simulated Bitrix24 portal, with its OAuth server on a listener of its own (as
//! oauth.bitrix.info is a host of its own), for tests of the pipeline. It answers the way
//! the real one does, quirks included, so resilience is tested honestly: the leaky bucket
//! (503 `QUERY_LIMIT_EXCEEDED`), per-method operating time (429 `OPERATION_TIME_LIMIT`),
//! single-use refresh tokens whose refresh also kills the access token issued with them
//! (401 `invalid_token`), expiry (401 `expired_token`), `batch` with per-command errors
//! and PHP's `[]` for an empty map, offline events with reservation and sources
//! (`auth_connector`), and switches for failures, slowness, a moved portal (302), an
//! unpaid application (`PAYMENT_REQUIRED`) and a closed portal (`PORTAL_DELETED`).
//!
//! Users and applications are real here: every token belongs to one user (user 1 is the
//! administrator; [`SimPortal::add_user`] adds employees without rights or CRM access,
//! and extranet users) through one application (ours, or another one installed on the
//! same portal, [`SimPortal::issue_tokens_for_app`]). `user.admin`, `app.info`, CRM reads
//! and admin-only methods answer for the token's user and application, and the OAuth
//! server refreshes a token only for the application it was issued to.
//!
//! Bitrix24's side of the lifecycle is simulated too ([`lifecycle`]): the portal opens
//! the application's installer as an administrator's browser would, registers the
//! `BX24.callBind` calls it finds there, sends `ONAPPINSTALL` after `installFinish`,
//! removes every binding on an update, and delivers events itself to what is bound
//! (form-encoded, as PHP's `http_build_query`), never resending one that failed.
//!
//! What a newcomer gets wrong: a `batch` is **one** HTTP request (one unit of the
//! bucket, one [`Call`] of kind [`CallKind::Rest`] with `batch_size`), while each of its
//! commands is its own [`Call`] of kind [`CallKind::BatchCommand`] and counts against
//! its method's operating time. Count HTTP requests with [`Call::is_http`]. And
//! parameter names are matched exactly as documented (`id`, not `ID`, for
//! `crm.deal.get`): see [`PARAMS`].
//!
//! ```no_run
//! # async fn demo() {
//! use b24_tests::portal::{PortalConfig, SimPortal};
//! let portal = SimPortal::start(PortalConfig::default()).await;
//! let (access, refresh) = portal.issue_tokens();
//! // hand portal.client_endpoint(), access, refresh, portal.application_token() to the
//! // worker as an install would, point B24_OAUTH_URL at portal.oauth_url(), then:
//! portal.expire_access_tokens();
//! portal.fail_next(3, 503, "QUERY_LIMIT_EXCEEDED");
//! assert!(portal.refresh_count() <= 1);
//! # let _ = (access, refresh);
//! # }
//! ```
//!
//! Methods: `app.info`, `user.admin`, `user.current`, `crm.deal.get`,
//! `crm.deal.recurring.get`, `crm.requisite.get`, `crm.item.get`, `crm.type.list`,
//! `event.bind`/`unbind`/`get`, `placement.bind`/`unbind`/`get`,
//! `event.offline.get`/`list`/`clear`/`error`, `batch`; on the OAuth server
//! `/oauth/token/` (`grant_type=refresh_token`) and `/rest/app.info`. Parameters arrive
//! as JSON (only with a JSON content type, as PHP reads them), as a PHP-style form body,
//! or in the query; the token as `auth` or `Authorization: Bearer`. Records are
//! synthetic and the same for the same id ([`data`]); [`SimPortal::set_missing`] makes
//! one not exist. Not simulated: `$result[...]` references between batch commands,
//! write methods, webhooks, scopes.

pub mod data;
mod filter;
pub mod lifecycle;
mod methods;
mod oauth;
mod params;
mod state;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_lifecycle;

pub use lifecycle::{Delivery, InstallReport, InstallSpec, Outcome, UpdateSpec};
pub use methods::PARAMS;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use methods::Timing;
use params::{php_decode, PValue};
use serde_json::{json, Value};
use state::{Caller, Failure, State, User};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bodies above this answer 413, as a front proxy would.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// How the portal behaves; defaults are those of Bitrix24 cloud plans below Enterprise.
#[derive(Debug, Clone)]
pub struct PortalConfig {
    /// Random 32 hex digits by default, so portals in parallel tests never collide.
    pub member_id: String,
    /// Empty: `127.0.0.1:PORT` once bound.
    pub domain: String,
    pub client_id: String,
    pub client_secret: String,
    /// Leaky bucket drain, requests per second (2).
    pub rate_per_sec: f64,
    /// Leaky bucket capacity (50).
    pub burst: f64,
    /// Access token lifetime (1 h).
    pub token_ttl: Duration,
    /// Operating time a method may use in ten minutes before it answers 429 (480 s).
    pub operating_budget: Duration,
    /// Operating time each executed method call spends (10 ms).
    pub cost_per_call: Duration,
    /// The portal's language (`LANG`, `LANGUAGE_ID`): `en`.
    pub language: String,
    /// Our application's scopes, as events and the OAuth server write them.
    pub scope: String,
    /// Smart processes (entity type ids) the portal has from the start: `[183]`, the
    /// type of seed 003's `CRM_DYNAMIC_183_DETAIL_ACTIVITY` widget.
    pub smart_processes: Vec<u64>,
    /// Put `operating`/`operating_reset_at` into a batch's `result_time` entries. The
    /// documentation's example has neither (settings/how-to-call-rest-api/batch.md), so
    /// by default they are absent.
    pub batch_operating: bool,
    /// Put `refresh_token` into the `auth` of every event linked to a user. By default
    /// only `ONAPPINSTALL`, `ONAPPUPDATE` and `ONOFFLINEEVENT` carry one, as
    /// api-reference/events/index.md says ("The refresh_token token does not come with
    /// every event"); the seed payloads of other events show one, hence the switch.
    pub refresh_token_in_events: bool,
    /// How long a handler may take to answer an event before the delivery counts as
    /// failed (and is lost). The documentation gives no figure: 5 s, strict.
    pub delivery_timeout: Duration,
}

impl Default for PortalConfig {
    fn default() -> Self {
        let hex: String = state::random_token()
            .bytes()
            .map(|b| format!("{:x}", b % 16))
            .collect();
        Self {
            member_id: hex,
            domain: String::new(),
            client_id: "local.b24pipeline.sim".into(),
            client_secret: "sim-client-secret".into(),
            rate_per_sec: 2.0,
            burst: 50.0,
            token_ttl: Duration::from_secs(3600),
            operating_budget: Duration::from_secs(480),
            cost_per_call: Duration::from_millis(10),
            language: "en".into(),
            scope: "crm,placement".into(),
            smart_processes: vec![183],
            batch_operating: false,
            refresh_token_in_events: false,
            delivery_timeout: Duration::from_secs(5),
        }
    }
}

/// A Bitrix24 error answer: HTTP status, `error`, `error_description` (and, for
/// `ERROR_ARGUMENT`, the `argument` it is about).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub description: String,
    pub argument: Option<String>,
}

impl ApiError {
    /// With the description Bitrix24 gives that code.
    pub fn new(status: u16, code: &str) -> Self {
        Self::with(status, code, describe(code))
    }

    pub fn with(status: u16, code: &str, description: &str) -> Self {
        Self {
            status,
            code: code.to_owned(),
            description: description.to_owned(),
            argument: None,
        }
    }

    pub fn body(&self) -> Value {
        let mut v = json!({ "error": self.code, "error_description": self.description });
        if let (Some(a), Some(o)) = (&self.argument, v.as_object_mut()) {
            o.insert("argument".into(), json!(a));
        }
        v
    }
}

/// The `error_description` Bitrix24 sends with a code (seed 004's table and the OAuth
/// server's codes); empty for codes it does not know.
pub fn describe(code: &str) -> &'static str {
    match code {
        "QUERY_LIMIT_EXCEEDED" => "Too many requests",
        "expired_token" => "The access token provided has expired.",
        "invalid_token" => "The access token provided is invalid.",
        "NO_AUTH_FOUND" => "Wrong authorization data",
        "INTERNAL_SERVER_ERROR" => "Internal server error",
        "ERROR_UNEXPECTED_ANSWER" => "Server returned an unexpected response",
        "OPERATION_TIME_LIMIT" => "Method is blocked due to operation time limit.",
        "ERROR_METHOD_NOT_FOUND" => "Method not found!",
        "ERROR_BATCH_LENGTH_EXCEEDED" => "Max batch length exceeded",
        "ERROR_BATCH_METHOD_NOT_ALLOWED" => "Method is not allowed for batch usage",
        "INVALID_REQUEST" => "Https required.",
        "OVERLOAD_LIMIT" => "REST API is blocked due to overload",
        "ACCESS_DENIED" => "REST API is available only on commercial plans",
        "INVALID_CREDENTIALS" => "Invalid request credentials",
        "ERROR_MANIFEST_IS_NOT_AVAILABLE" => "Manifest is not available",
        "insufficient_scope" => {
            "The request requires higher privileges than provided by the webhook token"
        }
        "user_access_error" => "The user does not have access to the application",
        "PORTAL_DELETED" => "Portal was deleted",
        "invalid_grant" => "Invalid refresh token",
        "invalid_client" => "Invalid client",
        "invalid_request" => "Invalid request",
        "PAYMENT_REQUIRED" => "Payment required",
        "allowed_only_intranet_user" => "Action is allowed only to intranet users",
        _ => "",
    }
}

/// Where a recorded request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// An HTTP request to `/rest/...`, a `batch` included.
    Rest,
    /// A command inside a `batch` (no HTTP request of its own).
    BatchCommand,
    /// An HTTP request to the OAuth server.
    OAuth,
}

/// One recorded request or batch command.
#[derive(Debug, Clone)]
pub struct Call {
    pub kind: CallKind,
    /// Lowercase, without `.json`; `oauth.token` for the OAuth server.
    pub method: String,
    /// The HTTP status it got (for a batch command: the one it would have got alone).
    pub status: u16,
    /// The `error` code, if it failed (`Some("")` for CRM's empty code).
    pub error: Option<String>,
    /// The access token it carried (the refresh token, for OAuth).
    pub token: Option<String>,
    /// Its parameters, `auth` removed.
    pub params: Value,
    /// For a `batch`: how many commands it carried.
    pub batch_size: Option<usize>,
    pub at: Instant,
}

impl Call {
    /// An HTTP request (not a command inside a batch).
    pub fn is_http(&self) -> bool {
        self.kind != CallKind::BatchCommand
    }
}

/// A user of the simulated portal. User 1, [`UserId::ADMIN`], is the administrator
/// who owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserId(pub u64);

impl UserId {
    pub const ADMIN: UserId = UserId(1);
}

/// Who [`SimPortal::add_user`] adds. The default is an employee without administrator
/// rights who may read CRM records.
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub name: String,
    pub last_name: String,
    /// A portal administrator (`user.admin` answers true; admin-only methods work).
    pub admin: bool,
    /// An employee; `false` makes an extranet user, to whom `crm.item.get` and
    /// `crm.type.list` answer 403 `allowed_only_intranet_user`.
    pub intranet: bool,
    /// May read CRM records; `false` gets `ACCESS_DENIED` (`crm.item.get`) or
    /// "Access denied" (`crm.deal.get` and the other classic methods).
    pub crm_read: bool,
}

impl Default for UserSpec {
    fn default() -> Self {
        Self::employee()
    }
}

impl UserSpec {
    pub fn employee() -> Self {
        Self {
            name: "Mary".into(),
            last_name: "Jones".into(),
            admin: false,
            intranet: true,
            crm_read: true,
        }
    }

    pub fn admin() -> Self {
        Self {
            name: "Alice".into(),
            admin: true,
            ..Self::employee()
        }
    }

    /// An extranet user: not an employee, no CRM access.
    pub fn extranet() -> Self {
        Self {
            name: "Guest".into(),
            intranet: false,
            crm_read: false,
            ..Self::employee()
        }
    }

    /// The same user without CRM read access.
    pub fn without_crm(self) -> Self {
        Self {
            crm_read: false,
            ..self
        }
    }
}

/// Handle to a running simulated portal; clones share it. The server stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct SimPortal {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    oauth_addr: SocketAddr,
    /// `http://host:port` of the portal and of its OAuth server, the bases of the
    /// endpoints it hands out.
    base: String,
    oauth_base: String,
    state: Mutex<State>,
    stop: CancellationToken,
    /// Bitrix24's own outbound HTTP: events and installer pages.
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    /// The state, even if a panic elsewhere poisoned the lock: a harness must keep
    /// answering so the test reports the real failure.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SimPortal {
    /// Binds two ports on 127.0.0.1 (the portal, its OAuth server) and serves; panics
    /// only if the loopback cannot be bound.
    pub async fn start(cfg: PortalConfig) -> SimPortal {
        Self::try_start(cfg)
            .await
            .expect("simulated portal binds 127.0.0.1:0")
    }

    pub async fn try_start(cfg: PortalConfig) -> std::io::Result<SimPortal> {
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        Self::try_start_at(cfg, loopback, loopback, None).await
    }

    /// Binds `bind` for the portal and `oauth_bind` for its OAuth server, and hands out
    /// endpoints under `public_host` (with the bound ports), for a pipeline that
    /// reaches this machine by another name: workers in containers calling
    /// `host.containers.internal`, say.
    pub async fn try_start_at(
        mut cfg: PortalConfig,
        bind: SocketAddr,
        oauth_bind: SocketAddr,
        public_host: Option<&str>,
    ) -> std::io::Result<SimPortal> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let oauth_listener = TcpListener::bind(oauth_bind).await?;
        let oauth_addr = oauth_listener.local_addr()?;
        let authority = |a: SocketAddr| match public_host {
            Some(host) => format!("{host}:{}", a.port()),
            None => a.to_string(),
        };
        let (base, oauth_base) = (
            format!("http://{}", authority(addr)),
            format!("http://{}", authority(oauth_addr)),
        );
        if cfg.domain.is_empty() {
            cfg.domain = authority(addr);
        }
        let state = State::new(
            cfg,
            format!("{base}/rest/"),
            format!("{oauth_base}/rest/"),
            authority(oauth_addr),
            Instant::now(),
        );
        let inner = Arc::new(Inner {
            addr,
            oauth_addr,
            base,
            oauth_base,
            state: Mutex::new(state),
            stop: CancellationToken::new(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(serve(
            listener,
            weak.clone(),
            inner.stop.clone(),
            Server::Portal,
        ));
        tokio::spawn(serve(
            oauth_listener,
            weak,
            inner.stop.clone(),
            Server::OAuth,
        ));
        Ok(SimPortal { inner })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT/rest/`, what an install hands out as `client_endpoint`.
    pub fn client_endpoint(&self) -> String {
        format!("{}/rest/", self.inner.base)
    }

    /// The OAuth server's address: another port, as oauth.bitrix.info is another host.
    pub fn oauth_addr(&self) -> SocketAddr {
        self.inner.oauth_addr
    }

    /// `http://127.0.0.1:OPORT/oauth/token/`, for `B24_OAUTH_URL`: the token URL a
    /// client derives from [`SimPortal::server_endpoint`] (its origin + `/oauth/token/`).
    pub fn oauth_url(&self) -> String {
        format!("{}/oauth/token/", self.inner.oauth_base)
    }

    /// `http://127.0.0.1:OPORT/rest/`, the OAuth server's REST interface: what events
    /// carry as `auth[server_endpoint]` and installers get as `SERVER_ENDPOINT`.
    pub fn server_endpoint(&self) -> String {
        format!("{}/rest/", self.inner.oauth_base)
    }

    /// `127.0.0.1:OPORT`: the `domain` of the OAuth server's answers, which is its own
    /// and never the portal's (settings/oauth/index.md: "The domain of the
    /// authorization server").
    pub fn oauth_domain(&self) -> String {
        self.inner
            .oauth_base
            .trim_start_matches("http://")
            .to_string()
    }

    pub fn member_id(&self) -> String {
        self.inner.state().cfg.member_id.clone()
    }

    pub fn domain(&self) -> String {
        self.inner.state().cfg.domain.clone()
    }

    pub fn client_id(&self) -> String {
        self.inner.state().cfg.client_id.clone()
    }

    pub fn client_secret(&self) -> String {
        self.inner.state().cfg.client_secret.clone()
    }

    /// Our application's `application_token` now (a new one after an update or a
    /// reinstall, see [`UpdateSpec::new_application_token`]).
    pub fn application_token(&self) -> String {
        self.inner.state().ours().application_token.clone()
    }

    /// Is our application installed (its installer called `installFinish`)?
    pub fn is_installed(&self) -> bool {
        self.inner.state().ours().installed
    }

    /// Our application's version as `app.info` reports it.
    pub fn app_version(&self) -> String {
        self.inner.state().ours().version()
    }

    /// As if our application had been installed outside the simulator (by a test that
    /// posts its own `ONAPPINSTALL`): installed, with this `application_token`, so that
    /// events are delivered with the token the pipeline stored. Bindings are not made.
    pub fn mark_installed(&self, application_token: &str) {
        let mut s = self.inner.state();
        let app = s.ours_mut();
        app.removed = false;
        app.application_token = application_token.to_owned();
        app.set_installed(true);
    }

    /// A fresh valid (access, refresh) pair of the administrator (user 1) through our
    /// application, as an install hands out. Earlier pairs stay valid until refreshed
    /// or expired.
    pub fn issue_tokens(&self) -> (String, String) {
        self.inner.state().issue_pair(Instant::now())
    }

    /// Adds a user; returns its id (2, 3, ...).
    pub fn add_user(&self, spec: UserSpec) -> UserId {
        let mut s = self.inner.state();
        let id = s.users.iter().map(|u| u.id).max().unwrap_or(0) + 1;
        s.users.push(User {
            id,
            name: spec.name,
            last_name: spec.last_name,
            admin: spec.admin,
            intranet: spec.intranet,
            crm_read: spec.crm_read,
        });
        UserId(id)
    }

    /// A fresh pair of `user` through our application: what that user's widget calls
    /// carry as `AUTH_ID`/`REFRESH_ID`. Panics for a user that was never added.
    pub fn issue_tokens_for(&self, user: UserId) -> (String, String) {
        let mut s = self.inner.state();
        assert!(s.user(user.0).is_some(), "no user {}", user.0);
        let ours = s.our_client_id();
        s.issue_pair_for(user.0, &ours, Instant::now())
    }

    /// A fresh pair of `user` through another application installed on the same
    /// portal (registered on first use, with a secret only the simulator knows): a
    /// valid token of that portal that is not ours.
    pub fn issue_tokens_for_app(&self, client_id: &str, user: UserId) -> (String, String) {
        let mut s = self.inner.state();
        assert!(s.user(user.0).is_some(), "no user {}", user.0);
        assert!(
            client_id != s.our_client_id(),
            "{client_id} is our application: use issue_tokens_for"
        );
        s.other_app(client_id);
        s.issue_pair_for(user.0, client_id, Instant::now())
    }

    /// The secret of another application [`SimPortal::issue_tokens_for_app`] registered.
    pub fn client_secret_of(&self, client_id: &str) -> Option<String> {
        self.inner
            .state()
            .app(client_id)
            .map(|a| a.client_secret.clone())
    }

    /// Our application's paid period is over (`true`): every REST call with its tokens
    /// answers 402 `PAYMENT_REQUIRED` and the OAuth server refuses to refresh them, and
    /// `app.info` would say `PAYMENT_EXPIRED` `Y`. `false` lifts it (as a payment does).
    /// The 402 is `CRestServer::STATUS_PAYMENT_REQUIRED`
    /// (settings/cloud-and-on-premise/on-premise/custom-methods.md shows it answering
    /// `HTTP/1.1 402 Payment Required`); the OAuth server's status for it is not
    /// documented (settings/oauth/error-codes.md gives the code only): 401, strict.
    pub fn set_payment_required(&self, on: bool) {
        let mut s = self.inner.state();
        let app = s.ours_mut();
        app.payment_required = on;
        app.info
            .insert("PAYMENT_EXPIRED".into(), json!(if on { "Y" } else { "N" }));
    }

    /// The portal's public part is closed (`true`): every REST call answers 500
    /// `PORTAL_DELETED` (_includes/system-errors.md), until `false`. Self-hosted
    /// portals do this temporarily; the OAuth server is not affected.
    pub fn set_portal_deleted(&self, on: bool) {
        self.inner.state().portal_deleted = on;
    }

    /// Adds a smart process with this entity type id (its items, its
    /// `CRM_DYNAMIC_<id>_DETAIL_ACTIVITY` widget and its `ONCRMDYNAMICITEM*_<id>` events
    /// then exist); returns its type id (`crm.type.list`'s `id`).
    pub fn add_smart_process(&self, entity_type_id: u64) -> u64 {
        self.inner.state().add_smart_process(entity_type_id)
    }

    /// Every access token issued so far now answers 401 `expired_token`; their refresh
    /// tokens still work.
    pub fn expire_access_tokens(&self) {
        for t in self.inner.state().access.values_mut() {
            t.expired = true;
        }
    }

    /// The next `n` HTTP requests to `/rest/` answer `status` with `error` (and its
    /// usual description), before the bucket or the token is looked at.
    pub fn fail_next(&self, n: usize, status: u16, error: &str) {
        let f = Failure::Error {
            status,
            code: error.to_owned(),
        };
        self.inner
            .state()
            .fail_next
            .extend(std::iter::repeat_n(f, n));
    }

    /// The next `n` HTTP requests to `/rest/` answer `status` with this exact body (an
    /// HTML page from a proxy, say: not JSON).
    pub fn fail_next_raw(&self, n: usize, status: u16, body: &str) {
        let f = Failure::Raw {
            status,
            body: body.to_owned(),
        };
        self.inner
            .state()
            .fail_next
            .extend(std::iter::repeat_n(f, n));
    }

    /// The next `n` HTTP requests to `/rest/` get their connection closed, no answer.
    pub fn drop_next(&self, n: usize) {
        self.inner
            .state()
            .fail_next
            .extend(std::iter::repeat_n(Failure::Drop, n));
    }

    /// The next `n` calls of `method`, alone or inside a batch (there in
    /// `result_error`), fail with `status` and `error` after authorization.
    pub fn fail_method(&self, method: &str, n: usize, status: u16, error: &str) {
        let e = ApiError::new(status, error);
        let method = methods::normalize_method(method);
        self.inner
            .state()
            .fail_method
            .entry(method)
            .or_default()
            .extend(std::iter::repeat_n(e, n));
    }

    /// The next `n` requests to the OAuth server answer `status` with `error`.
    pub fn fail_next_oauth(&self, n: usize, status: u16, error: &str) {
        let f = Failure::Error {
            status,
            code: error.to_owned(),
        };
        self.inner
            .state()
            .fail_oauth
            .extend(std::iter::repeat_n(f, n));
    }

    /// Forgets every injected failure not yet used.
    pub fn clear_failures(&self) {
        let mut s = self.inner.state();
        s.fail_next.clear();
        s.fail_oauth.clear();
        s.fail_method.clear();
    }

    /// Every `/rest/` answer is held back this long (the work is done on arrival).
    pub fn set_delay(&self, d: Duration) {
        self.inner.state().delay = d;
    }

    /// `method` has spent its operating budget: it answers 429 `OPERATION_TIME_LIMIT`
    /// for `reset_in`, then works again.
    pub fn exhaust_method(&self, method: &str, reset_in: Duration) {
        let now = Instant::now();
        let mut s = self.inner.state();
        let spent = s.cfg.operating_budget.as_secs_f64() + 1.0;
        let op = s
            .operating
            .entry(methods::normalize_method(method))
            .or_default();
        op.baskets.clear();
        op.baskets.push_back(state::Basket {
            opened: now,
            expires: now + reset_in,
            secs: spent,
        });
    }

    /// The portal moved: `/rest/` requests answer 302 with `Location: <location><method>`
    /// (query kept), unless they already arrive at `location` (same `Host` and path
    /// prefix), which are served. Refreshes then report `location` as `client_endpoint`.
    /// To move the portal onto itself under another name, use
    /// `format!("http://localhost:{}/rest/", portal.addr().port())`. `None` undoes it.
    pub fn redirect_to(&self, location: Option<String>) {
        self.inner.state().redirect = location;
    }

    /// The entity `id` of `method` (`crm.deal.get`, `crm.deal.recurring.get`,
    /// `crm.requisite.get`, `crm.item.get` for any entity type) does not exist.
    pub fn set_missing(&self, method: &str, id: u64) {
        self.inner
            .state()
            .missing
            .insert((methods::normalize_method(method), id));
    }

    /// Every entity made missing by [`Self::set_missing`] exists again.
    pub fn clear_missing(&self) {
        self.inner.state().missing.clear();
    }

    /// Overrides fields of our application's `app.info` answer (`STATUS`,
    /// `PAYMENT_EXPIRED`, `DAYS`…); `STATUS` also goes into events and refreshes.
    pub fn set_app_info(&self, fields: Value) {
        if let Value::Object(o) = fields {
            self.inner.state().ours_mut().info.extend(o);
        }
    }

    /// Queues an offline event in our application's queue (no source), as Bitrix24 does
    /// for `event_type=offline` bindings, whether or not one exists; a repeat of the same
    /// (event, data) still waiting only moves its timestamp. Returns its `MESSAGE_ID`.
    /// [`SimPortal::emit`] records offline events only where they are bound.
    pub fn push_offline(&self, event: &str, data: Value) -> String {
        let mut s = self.inner.state();
        let now = s.unix(Instant::now());
        s.push_offline(event, data, methods::iso_unix(now))
    }

    /// Our application's offline queues (every source) as `event.offline.list` shows
    /// records (with `PROCESS_ID`, `ERROR`), in arrival order.
    pub fn offline_queue(&self) -> Vec<Value> {
        let s = self.inner.state();
        let ours = s.our_client_id();
        let mut records: Vec<_> = s
            .offline
            .iter()
            .filter(|r| r.client_id == ours)
            .cloned()
            .collect();
        records.sort_by_key(|r| (r.seq, r.id));
        records.iter().map(|r| r.to_list_json()).collect()
    }

    /// What `event.get` would answer our application's administrator.
    pub fn event_bindings(&self) -> Vec<Value> {
        self.pure_list("event.get")
    }

    /// What `event.get` would answer another application's administrator.
    pub fn event_bindings_of(&self, client_id: &str) -> Vec<Value> {
        let caller = Caller {
            user: 1,
            client_id: client_id.to_owned(),
        };
        match methods::call(&mut self.inner.state(), &caller, "event.get", &json!({})) {
            Ok(a) => a.result.as_array().cloned().unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// What `placement.get` would answer our application's administrator.
    pub fn placement_bindings(&self) -> Vec<Value> {
        self.pure_list("placement.get")
    }

    fn pure_list(&self, method: &str) -> Vec<Value> {
        let mut s = self.inner.state();
        let caller = admin_caller(&s);
        match methods::call(&mut s, &caller, method, &json!({})) {
            Ok(a) => a.result.as_array().cloned().unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// The `result` a read-only method (`app.info`, `user.*`, `crm.*.get`,
    /// `crm.type.list`) gives our administrator for `params` now, without counting or
    /// recording anything: what the worker should have stored.
    pub fn expected(&self, method: &str, params: Value) -> Result<Value, ApiError> {
        self.expected_as(UserId::ADMIN, method, params)
    }

    /// [`SimPortal::expected`] as another user of our application.
    pub fn expected_as(
        &self,
        user: UserId,
        method: &str,
        params: Value,
    ) -> Result<Value, ApiError> {
        let method = methods::normalize_method(method);
        if !methods::PURE.contains(&method.as_str()) {
            return Err(ApiError::new(404, "ERROR_METHOD_NOT_FOUND"));
        }
        let mut s = self.inner.state();
        let caller = Caller {
            user: user.0,
            client_id: s.our_client_id(),
        };
        methods::call(&mut s, &caller, &method, &params).map(|a| a.result)
    }

    /// Every request and batch command so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.state().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.inner.state().calls.clear();
    }

    /// Successful token refreshes so far.
    pub fn refresh_count(&self) -> usize {
        self.inner.state().refreshes
    }

    /// The leaky bucket's level now (0 ..= burst).
    pub fn bucket_level(&self) -> f64 {
        let mut s = self.inner.state();
        s.bucket.drain(Instant::now());
        s.bucket.level
    }

    /// Operating seconds `method` has spent in the last ten minutes.
    pub fn operating(&self, method: &str) -> f64 {
        let method = methods::normalize_method(method);
        self.inner
            .state()
            .operating_mut(&method, Instant::now())
            .total()
    }
}

/// Which host a listener plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Portal,
    OAuth,
}

async fn serve(
    listener: TcpListener,
    portal: Weak<Inner>,
    stop: CancellationToken,
    server: Server,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors, say: wait instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let portal = portal.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(portal.clone(), server, req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Returned to hyper to close a connection without an answer.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for Dropped {}

enum Reply {
    Json(u16, Value),
    Raw(u16, String),
    Redirect(String),
    Drop,
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Self {
        Reply::Json(e.status, e.body())
    }
}

impl From<Failure> for Reply {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Error { status, code } => ApiError::new(status, &code).into(),
            Failure::Raw { status, body } => Reply::Raw(status, body),
            Failure::Drop => Reply::Drop,
        }
    }
}

fn respond(reply: Reply) -> Result<Response<Full<Bytes>>, Dropped> {
    let (status, content_type, body, location) = match reply {
        Reply::Json(status, v) => (
            status,
            "application/json; charset=utf-8",
            serde_json::to_vec(&v).unwrap_or_default(),
            None,
        ),
        Reply::Raw(status, body) => (status, "text/html; charset=utf-8", body.into_bytes(), None),
        Reply::Redirect(to) => (302, "text/html; charset=utf-8", Vec::new(), Some(to)),
        Reply::Drop => return Err(Dropped),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(to) = location {
        match HeaderValue::from_str(&to) {
            Ok(v) => {
                resp.headers_mut().insert(LOCATION, v);
            }
            Err(_) => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    Ok(resp)
}

async fn handle(
    portal: Weak<Inner>,
    server: Server,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let Some(portal) = portal.upgrade() else {
        return Err(Dropped);
    };
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return respond(Reply::Raw(200, "ok".into()));
    }
    if server == Server::OAuth {
        return respond(oauth::handle(&portal, req).await);
    }
    // The portal serves the REST API only; tokens come from the OAuth server's host.
    let Some(rest_at) = path.find("/rest/") else {
        return respond(Reply::Raw(404, "Not Found".into()));
    };
    let raw_method = path[rest_at + "/rest/".len()..]
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_owned();
    let (parts, body) = req.into_parts();
    let Some(body) = read_body(body).await else {
        return respond(Reply::Raw(413, "Request Entity Too Large".into()));
    };
    let mut params = request_params(&parts, &body);
    let token = take_token(&mut params, &parts);
    let request = RestRequest {
        method: methods::normalize_method(&raw_method),
        raw_method,
        host: parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        path,
        query: parts.uri.query().map(str::to_owned),
        token,
        params,
    };
    let (reply, delay) = {
        let mut state = portal.state();
        let reply = rest(&mut state, request);
        (reply, state.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    respond(reply)
}

/// The access token: the `auth` parameter, else an `Authorization: Bearer` header.
fn take_token(params: &mut PValue, parts: &http::request::Parts) -> Option<String> {
    params
        .remove("auth")
        .and_then(|a| a.as_text())
        .filter(|t| !t.is_empty())
        .or_else(|| {
            let header = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
            let (scheme, token) = header.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        })
}

async fn read_body(body: Incoming) -> Option<Bytes> {
    Limited::new(body, MAX_BODY)
        .collect()
        .await
        .ok()
        .map(|c| c.to_bytes())
}

/// Query string, then the body over it (PHP's `$_REQUEST`): JSON only when the content
/// type says so, a PHP-style form otherwise.
fn request_params(parts: &http::request::Parts, body: &[u8]) -> PValue {
    let mut params = parts
        .uri
        .query()
        .map(php_decode)
        .unwrap_or_else(PValue::empty_map);
    if body.is_empty() {
        return params;
    }
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("");
    let from_body = if content_type.to_ascii_lowercase().contains("json") {
        serde_json::from_slice::<PValue>(body).ok()
    } else {
        Some(php_decode(&String::from_utf8_lossy(body)))
    };
    if let Some(PValue::Map(entries)) = from_body {
        for (k, v) in entries {
            params.set(k, v);
        }
    }
    params
}

struct RestRequest {
    method: String,
    raw_method: String,
    host: String,
    path: String,
    query: Option<String>,
    token: Option<String>,
    params: PValue,
}

/// Does a request already arrive where `location` points (same host, path under it)?
fn arrives_at(location: &str, host: &str, path: &str) -> bool {
    let rest = location.split_once("://").map_or(location, |(_, r)| r);
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    authority.eq_ignore_ascii_case(host) && path.starts_with(prefix)
}

/// One HTTP request to `/rest/`, in the order Bitrix24 checks: moved portal, (injected
/// failure), closed portal, leaky bucket, token, unpaid application, then the method or
/// the batch, as the token's user through the token's application.
fn rest(s: &mut State, req: RestRequest) -> Reply {
    let now = Instant::now();
    let params = req.params.to_json();
    let record = |s: &mut State, status: u16, error: Option<&str>, batch_size: Option<usize>| {
        s.calls.push(Call {
            kind: CallKind::Rest,
            method: req.method.clone(),
            status,
            error: error.map(str::to_owned),
            token: req.token.clone(),
            params: params.clone(),
            batch_size,
            at: now,
        });
    };

    if let Some(location) = s.redirect.clone() {
        if !arrives_at(&location, &req.host, &req.path) {
            record(s, 302, None, None);
            let query = req
                .query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            return Reply::Redirect(format!("{location}{}{query}", req.raw_method));
        }
    }
    if let Some(failure) = s.fail_next.pop_front() {
        match &failure {
            Failure::Error { status, code } => record(s, *status, Some(code), None),
            Failure::Raw { status, .. } => record(s, *status, None, None),
            Failure::Drop => record(s, 0, None, None),
        }
        return failure.into();
    }
    if s.portal_deleted {
        record(s, 500, Some("PORTAL_DELETED"), None);
        return ApiError::new(500, "PORTAL_DELETED").into();
    }
    if !s.bucket.try_add(now) {
        record(s, 503, Some("QUERY_LIMIT_EXCEEDED"), None);
        return ApiError::new(503, "QUERY_LIMIT_EXCEEDED").into();
    }
    let caller = match s.check_access(req.token.as_deref(), now) {
        Ok(c) => c,
        Err(e) => {
            record(s, e.status, Some(&e.code), None);
            return e.into();
        }
    };
    if s.app(&caller.client_id).is_some_and(|a| a.payment_required) {
        record(s, 402, Some("PAYMENT_REQUIRED"), None);
        return ApiError::new(402, "PAYMENT_REQUIRED").into();
    }
    let token = req.token.clone().unwrap_or_default();

    if req.method == "batch" {
        let commands = req
            .params
            .get("cmd")
            .map(PValue::entries)
            .unwrap_or_default();
        let size = commands.len();
        if let Some(e) = s.take_method_failure("batch") {
            record(s, e.status, Some(&e.code), Some(size));
            return e.into();
        }
        let halt = params::flag(&params, "halt", false);
        let outcome = methods::batch(s, &caller, commands, halt, &token, now);
        record(s, 200, None, Some(size));
        s.calls.extend(outcome.calls);
        let time = Timing {
            start: s.unix(now),
            processing: outcome.processing,
            operating: None,
        };
        return Reply::Json(
            200,
            json!({ "result": outcome.result, "time": time.to_json() }),
        );
    }

    let (result, timing) = methods::run(s, &caller, &req.method, &params, now);
    match result {
        Ok(a) => {
            record(s, 200, None, None);
            let time = timing.map_or(Value::Null, |t| t.to_json());
            let mut body = json!({ "result": a.result, "time": time });
            if let Some(o) = body.as_object_mut() {
                if let Some(total) = a.total {
                    o.insert("total".into(), json!(total));
                }
                if let Some(next) = a.next {
                    o.insert("next".into(), json!(next));
                }
            }
            Reply::Json(200, body)
        }
        Err(e) => {
            record(s, e.status, Some(&e.code), None);
            e.into()
        }
    }
}

/// Our administrator, the identity of the simulator's own look-ups.
fn admin_caller(s: &State) -> Caller {
    Caller {
        user: 1,
        client_id: s.our_client_id(),
    }
}
