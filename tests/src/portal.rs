//! A simulated Bitrix24 portal and OAuth server on 127.0.0.1:0, for tests of the worker.
//! It answers the way the real one does, quirks included, so resilience is tested
//! honestly: the leaky bucket (503 `QUERY_LIMIT_EXCEEDED`), per-method operating time
//! (429 `OPERATION_TIME_LIMIT`), single-use refresh tokens whose refresh also kills the
//! access token issued with them (401 `invalid_token`), expiry (401 `expired_token`),
//! `batch` with per-command errors and PHP's `[]` for an empty map, offline events with
//! reservation, and switches for failures, slowness and a moved portal (302).
//!
//! What a newcomer gets wrong: a `batch` is **one** HTTP request (one unit of the
//! bucket, one [`Call`] of kind [`CallKind::Rest`] with `batch_size`), while each of its
//! commands is its own [`Call`] of kind [`CallKind::BatchCommand`] and counts against
//! its method's operating time. Count HTTP requests with [`Call::is_http`].
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
//! Methods: `app.info`, `crm.deal.get`, `crm.deal.recurring.get`, `crm.requisite.get`,
//! `crm.item.get`, `event.bind`/`unbind`/`get`, `placement.bind`/`unbind`/`get`,
//! `event.offline.get`/`clear`/`error`, `batch`. Parameters arrive as JSON (only with a
//! JSON content type, as PHP reads them), as a PHP-style form body, or in the query;
//! the token as `auth` or `Authorization: Bearer`. Records are synthetic and the same
//! for the same id ([`data`]); [`SimPortal::set_missing`] makes one not exist.
//! Not simulated: `$result[...]` references between batch commands, list methods and
//! paging, webhooks, scopes.

pub mod data;
mod methods;
mod params;
mod state;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use methods::Timing;
use params::{php_decode, text, PValue};
use serde_json::{json, Value};
use state::{Failure, State};
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
        }
    }
}

/// A Bitrix24 error answer: HTTP status, `error`, `error_description`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub description: String,
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
        }
    }

    pub fn body(&self) -> Value {
        json!({ "error": self.code, "error_description": self.description })
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

/// Handle to a running simulated portal; clones share it. The server stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct SimPortal {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    state: Mutex<State>,
    stop: CancellationToken,
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
    /// Binds 127.0.0.1:0 and serves; panics only if the loopback cannot be bound.
    pub async fn start(cfg: PortalConfig) -> SimPortal {
        Self::try_start(cfg)
            .await
            .expect("simulated portal binds 127.0.0.1:0")
    }

    pub async fn try_start(mut cfg: PortalConfig) -> std::io::Result<SimPortal> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        if cfg.domain.is_empty() {
            cfg.domain = addr.to_string();
        }
        let state = State::new(cfg, format!("http://{addr}/rest/"), Instant::now());
        let inner = Arc::new(Inner {
            addr,
            state: Mutex::new(state),
            stop: CancellationToken::new(),
        });
        tokio::spawn(serve(listener, Arc::downgrade(&inner), inner.stop.clone()));
        Ok(SimPortal { inner })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT/rest/`, what an install hands out as `client_endpoint`.
    pub fn client_endpoint(&self) -> String {
        format!("http://{}/rest/", self.inner.addr)
    }

    /// `http://127.0.0.1:PORT/oauth/token/`, for `B24_OAUTH_URL`.
    pub fn oauth_url(&self) -> String {
        format!("http://{}/oauth/token/", self.inner.addr)
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

    pub fn application_token(&self) -> String {
        self.inner.state().application_token.clone()
    }

    /// A fresh valid (access, refresh) pair, as an install hands out. Earlier pairs
    /// stay valid until refreshed or expired.
    pub fn issue_tokens(&self) -> (String, String) {
        self.inner.state().issue_pair(Instant::now())
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

    /// Overrides fields of the `app.info` answer (`STATUS`, `PAYMENT_EXPIRED`, `DAYS`…).
    pub fn set_app_info(&self, fields: Value) {
        if let Value::Object(o) = fields {
            self.inner.state().app_info.extend(o);
        }
    }

    /// Queues an offline event as Bitrix24 does for `event_type=offline` bindings; a
    /// repeat of the same (event, data) still waiting only moves its timestamp. Returns
    /// its `MESSAGE_ID`.
    pub fn push_offline(&self, event: &str, data: Value) -> String {
        let mut s = self.inner.state();
        let now = s.unix(Instant::now());
        s.push_offline(event, data, methods::iso_unix(now))
    }

    /// The offline queue as `event.offline.list` shows it (with `PROCESS_ID`, `ERROR`).
    pub fn offline_queue(&self) -> Vec<Value> {
        let s = self.inner.state();
        let mut records = s.offline.clone();
        records.sort_by_key(|r| (r.seq, r.id));
        records
            .iter()
            .map(|r| {
                let mut v = r.to_json();
                if let Some(o) = v.as_object_mut() {
                    o.insert("PROCESS_ID".into(), json!(r.process_id));
                    o.insert("ERROR".into(), json!(if r.error { "1" } else { "0" }));
                }
                v
            })
            .collect()
    }

    /// What `event.get` would answer.
    pub fn event_bindings(&self) -> Vec<Value> {
        self.pure_list("event.get")
    }

    /// What `placement.get` would answer.
    pub fn placement_bindings(&self) -> Vec<Value> {
        self.pure_list("placement.get")
    }

    fn pure_list(&self, method: &str) -> Vec<Value> {
        match methods::call(&mut self.inner.state(), method, &json!({})) {
            Ok(Value::Array(a)) => a,
            _ => Vec::new(),
        }
    }

    /// The `result` a read-only method (`app.info`, `crm.*.get`) gives for `params`
    /// now, without counting or recording anything: what the worker should have stored.
    pub fn expected(&self, method: &str, params: Value) -> Result<Value, ApiError> {
        let method = methods::normalize_method(method);
        if !methods::PURE.contains(&method.as_str()) {
            return Err(ApiError::new(404, "ERROR_METHOD_NOT_FOUND"));
        }
        methods::call(&mut self.inner.state(), &method, &params)
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

async fn serve(listener: TcpListener, portal: Weak<Inner>, stop: CancellationToken) {
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
            let service = service_fn(move |req| handle(portal.clone(), req));
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
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let Some(portal) = portal.upgrade() else {
        return Err(Dropped);
    };
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return respond(Reply::Raw(200, "ok".into()));
    }
    let is_oauth = path == "/oauth/token/" || path == "/oauth/token";
    let Some(rest_at) = path.find("/rest/").filter(|_| !is_oauth) else {
        if !is_oauth {
            return respond(Reply::Raw(404, "Not Found".into()));
        }
        let (parts, body) = req.into_parts();
        let reply = match read_body(body).await {
            Some(body) => {
                let params = request_params(&parts, &body);
                oauth(&mut portal.state(), params.to_json())
            }
            None => Reply::Raw(413, "Request Entity Too Large".into()),
        };
        return respond(reply);
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
    let token = params
        .remove("auth")
        .and_then(|a| a.as_text())
        .filter(|t| !t.is_empty())
        .or_else(|| {
            let header = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
            let (scheme, token) = header.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
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
/// failure), leaky bucket, token, then the method or the batch.
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
    if !s.bucket.try_add(now) {
        record(s, 503, Some("QUERY_LIMIT_EXCEEDED"), None);
        return ApiError::new(503, "QUERY_LIMIT_EXCEEDED").into();
    }
    if let Err(e) = s.check_access(req.token.as_deref(), now) {
        record(s, e.status, Some(&e.code), None);
        return e.into();
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
        let outcome = methods::batch(s, commands, halt, &token, now);
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

    let (result, timing) = methods::run(s, &req.method, &params, now);
    match result {
        Ok(v) => {
            record(s, 200, None, None);
            let time = timing.map_or(Value::Null, |t| t.to_json());
            Reply::Json(200, json!({ "result": v, "time": time }))
        }
        Err(e) => {
            record(s, e.status, Some(&e.code), None);
            e.into()
        }
    }
}

/// The OAuth server's `/oauth/token/` with `grant_type=refresh_token`.
fn oauth(s: &mut State, params: Value) -> Reply {
    let now = Instant::now();
    let refresh = text(&params, "refresh_token").unwrap_or_default();
    let reply = oauth_answer(s, &params, &refresh, now);
    let (status, error) = match &reply {
        Reply::Json(status, v) => (
            *status,
            v.get("error").and_then(Value::as_str).map(str::to_owned),
        ),
        Reply::Raw(status, _) => (*status, None),
        Reply::Redirect(_) => (302, None),
        Reply::Drop => (0, None),
    };
    let mut recorded = params;
    if let Some(o) = recorded.as_object_mut() {
        o.remove("client_secret");
    }
    s.calls.push(Call {
        kind: CallKind::OAuth,
        method: "oauth.token".into(),
        status,
        error,
        token: (!refresh.is_empty()).then_some(refresh),
        params: recorded,
        batch_size: None,
        at: now,
    });
    reply
}

fn oauth_answer(s: &mut State, params: &Value, refresh: &str, now: Instant) -> Reply {
    if let Some(f) = s.fail_oauth.pop_front() {
        return f.into();
    }
    let grant = text(params, "grant_type").unwrap_or_default();
    if grant.is_empty() {
        return ApiError::with(400, "invalid_request", "grant_type is required").into();
    }
    let client_id = text(params, "client_id").unwrap_or_default();
    let client_secret = text(params, "client_secret").unwrap_or_default();
    if client_id != s.cfg.client_id || client_secret != s.cfg.client_secret {
        return ApiError::with(401, "invalid_client", "Invalid client").into();
    }
    if grant != "refresh_token" {
        return ApiError::with(400, "invalid_grant", "Unsupported grant type").into();
    }
    if refresh.is_empty() {
        return ApiError::with(400, "invalid_request", "refresh_token is required").into();
    }
    match s.refresh_pair(refresh, now) {
        Ok((access, refresh)) => {
            let ttl = s.cfg.token_ttl.as_secs();
            let client_endpoint = s
                .redirect
                .clone()
                .unwrap_or_else(|| s.client_endpoint.clone());
            Reply::Json(
                200,
                json!({
                    "access_token": access,
                    "expires": s.unix(now).floor() as u64 + ttl,
                    "expires_in": ttl,
                    "scope": "crm,placement",
                    // As the real server: its own domain, not the portal's.
                    "domain": "oauth.bitrix.info",
                    "server_endpoint": "https://oauth.bitrix.info/rest/",
                    "status": s.app_info.get("STATUS").cloned().unwrap_or(json!("L")),
                    "client_endpoint": client_endpoint,
                    "member_id": s.cfg.member_id,
                    "user_id": 1,
                    "refresh_token": refresh,
                }),
            )
        }
        Err(e) => e.into(),
    }
}
