//! Bitrix24's side of an application's life: opening its installer as an
//! administrator's browser would, registering what the installer binds, sending the
//! lifecycle events (`ONAPPINSTALL`, `ONAPPUPDATE`, `ONAPPPAYMENT`, `ONAPPUNINSTALL`),
//! opening widgets, and delivering events to what is bound.
//!
//! Delivery follows api-reference/events/index.md: Bitrix24 POSTs
//! `application/x-www-form-urlencoded` (PHP's `http_build_query`) with `event`,
//! `event_handler_id`, `data`, `ts` and `auth`; "No retries. If your server does not
//! respond or returns an error, the Bitrix24 queue server will log the failure but will
//! not resend the event", so a refused, slow or non-2xx delivery is lost here too.
//! "Events will not be sent to the application until the installation is complete"
//! (api-reference/common/events/on-app-install.md): nothing is delivered or recorded
//! offline before `installFinish`.
//!
//! What a newcomer gets wrong: the installer page is not executed, it is read. A simple
//! pattern match stands in for the browser: it needs the Bitrix24 JS library loaded
//! from `https://api.bitrix24.com/api/v1/` (or protocol-relative), finds
//! `BX24.callBind('<EVENT>', '<handler URL>'[, <auth_type>])` calls whose arguments are
//! string literals in inline `<script>` elements, and `BX24.installFinish()`. A handler
//! computed in JavaScript (`location.href` and the like) is reported as unresolved and
//! not bound, since the simulator cannot run it.

use super::methods::iso_unix;
use super::params::PValue;
use super::state::{random_token, State};
use super::{ApiError, Inner, Reply, RestRequest, SimPortal, UserId};
use crate::phpform::http_build_query;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Request;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// What happened to one binding's share of an event, or to one widget call.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: String,
    /// The binding's `event_handler_id` (0 for a widget call).
    pub binding_id: u64,
    /// Where it was POSTed; `None` for an offline record.
    pub handler: Option<String>,
    /// What was POSTed (query fields included), before form encoding; for an offline
    /// record, its `EVENT_DATA`.
    pub payload: Value,
    pub outcome: Outcome,
}

impl Delivery {
    /// Delivered with a 2xx answer.
    pub fn delivered(&self) -> bool {
        matches!(self.outcome, Outcome::Delivered { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler answered 2xx.
    Delivered { status: u16, body: String },
    /// Refused, timed out, or answered otherwise: the event is lost.
    Failed { status: Option<u16>, error: String },
    /// Written to the application's offline queue of this source.
    RecordedOffline {
        message_id: String,
        auth_connector: String,
    },
}

/// How [`SimPortal::install_app_with`] installs.
#[derive(Debug, Clone)]
pub struct InstallSpec {
    /// The administrator who opens the application (only administrators install).
    pub user: UserId,
    /// The version being installed (`app.info`'s `VERSION`, `ONAPPINSTALL`'s `VERSION`).
    pub version: String,
    pub language: String,
    /// Put `APPLICATION_TOKEN` into the installer's POST, as settings/oauth/simple-way.md
    /// and the widget pages list it ("The same value arrives in the application_token
    /// parameter for event handlers").
    pub send_application_token: bool,
}

impl Default for InstallSpec {
    fn default() -> Self {
        Self {
            user: UserId::ADMIN,
            version: "1".into(),
            language: "en".into(),
            send_application_token: true,
        }
    }
}

/// How [`SimPortal::update_app`] updates.
#[derive(Debug, Clone)]
pub struct UpdateSpec {
    /// The new version's installer.
    pub install_url: String,
    /// The administrator who opens the updated application.
    pub user: UserId,
    pub language: String,
    /// A new `application_token` comes with the update (default): the security page
    /// says to "Update the saved value during the OnAppUpdate event if Bitrix24 has
    /// provided a new application_token"
    /// (settings/cloud-and-on-premise/security-recommendations.md).
    pub new_application_token: bool,
    /// `ONAPPUPDATE` is linked to a user and carries tokens (default); otherwise its
    /// `auth` has none (api-reference/common/events/on-app-update.md shows them;
    /// _includes/auth-params-in-events.md: tokens are absent when no user is linked).
    pub linked_to_user: bool,
    pub send_application_token: bool,
}

impl UpdateSpec {
    pub fn new(install_url: impl Into<String>) -> Self {
        Self {
            install_url: install_url.into(),
            user: UserId::ADMIN,
            language: "en".into(),
            new_application_token: true,
            linked_to_user: true,
            send_application_token: true,
        }
    }
}

/// What opening an installer did.
#[derive(Debug, Clone, Default)]
pub struct InstallReport {
    /// The installer's HTTP status; `None` when it could not be reached.
    pub page_status: Option<u16>,
    pub page: String,
    /// Why less than a full installation happened, if it did.
    pub error: Option<String>,
    /// The page loads the Bitrix24 JS library (without it no `BX24` call runs).
    pub library_loaded: bool,
    /// `(EVENT, handler)` the page bound.
    pub bound: Vec<(String, String)>,
    /// `BX24.callBind` calls that failed, with Bitrix24's answer.
    pub bind_errors: Vec<(String, ApiError)>,
    /// `BX24.callBind` calls whose event or handler is not a string literal.
    pub unresolved: Vec<String>,
    /// `BX24.installFinish()` was called: the application is installed.
    pub finished: bool,
    /// The (AUTH_ID, REFRESH_ID) pair the installer was given.
    pub tokens: (String, String),
    /// The lifecycle events sent afterwards (`ONAPPINSTALL`, or `ONAPPUPDATE`; for a
    /// reinstall, the `ONAPPUNINSTALL` of the removed installation first).
    pub deliveries: Vec<Delivery>,
}

/// Whose `auth` an event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthKind {
    /// Tokens when linked to a user, and the application token.
    Standard,
    /// `ONAPPUNINSTALL`: no tokens (the application is gone), the application token.
    Uninstall,
    /// `ONAPPPAYMENT`: neither tokens nor application token (seed 002).
    Payment,
}

/// A POST the portal is about to make.
struct Post {
    event: String,
    binding_id: u64,
    handler: String,
    /// Fields that go into the query string (widgets, installers).
    query: Value,
    body: Value,
}

impl SimPortal {
    /// Bitrix24 raises `event` with `data` (as caused by `user`, or by an automation or
    /// agent when `None`): every online binding of our application gets a POST (with a
    /// fresh access token of the binding's `auth_type` user, else of `user`), every
    /// offline binding a record in its queue. Returns what happened per binding; empty
    /// while the application is not installed.
    pub async fn emit(&self, event: &str, data: Value, user: Option<UserId>) -> Vec<Delivery> {
        self.emit_inner(event, data, user, "", AuthKind::Standard)
            .await
    }

    /// [`SimPortal::emit`] for a change made by a REST call that carried
    /// `auth_connector`: offline bindings with that same `auth_connector` do not record
    /// it (api-reference/events/offline-events.md: "Bitrix24 will not record in the
    /// queue the change initiated by the application itself"); others do.
    pub async fn emit_from_connector(
        &self,
        event: &str,
        data: Value,
        user: Option<UserId>,
        auth_connector: &str,
    ) -> Vec<Delivery> {
        self.emit_inner(event, data, user, auth_connector, AuthKind::Standard)
            .await
    }

    /// A requisite was added by the administrator: `ONCRMREQUISITEADD` (seed 001).
    pub async fn add_requisite(&self, id: u64) -> Vec<Delivery> {
        let data = json!({ "FIELDS": { "ID": id.to_string() } });
        self.emit("ONCRMREQUISITEADD", data, Some(UserId::ADMIN))
            .await
    }

    /// A recurring template made a new deal: `ONCRMDEALRECURRINGEXPOSE` (seed 000).
    /// Templates are run by an agent, so no user is linked and `auth` has no tokens
    /// (api-reference/events/index.md: "Tokens are also not passed ... if the action was
    /// performed not by a user but by an automation rule, workflow, or agent").
    pub async fn expose_recurring_deal(
        &self,
        id: u64,
        recurring_deal_id: u64,
        deal_id: u64,
    ) -> Vec<Delivery> {
        let data = json!({ "FIELDS": {
            "ID": id.to_string(),
            "RECURRING_DEAL_ID": recurring_deal_id.to_string(),
            "DEAL_ID": deal_id.to_string(),
        }});
        self.emit("ONCRMDEALRECURRINGEXPOSE", data, None).await
    }

    /// Our application is paid for (30 days): `app.info` says `STATUS` `P`,
    /// `PAYMENT_EXPIRED` `N`, `DAYS` 30, `PAYMENT_REQUIRED` is lifted, and `ONAPPPAYMENT`
    /// is sent as seed 002 shows it: `auth` without tokens or application token.
    pub async fn pay_app(&self) -> Vec<Delivery> {
        let data = {
            let mut s = self.inner.state();
            let app = s.ours_mut();
            app.payment_required = false;
            app.info.insert("STATUS".into(), json!("P"));
            app.info.insert("PAYMENT_EXPIRED".into(), json!("N"));
            app.info.insert("DAYS".into(), json!(30));
            json!({
                "CODE": app.info.get("CODE").cloned().unwrap_or(Value::Null),
                "VERSION": app.info.get("VERSION").cloned().unwrap_or(json!(1)),
                "STATUS": "P",
                "PAYMENT_EXPIRED": "N",
                "DAYS": 30,
                "LANGUAGE_ID": app.info.get("LANGUAGE_ID").cloned().unwrap_or(json!("en")),
            })
        };
        self.emit_inner("ONAPPPAYMENT", data, None, "", AuthKind::Payment)
            .await
    }

    /// An administrator deletes our application (`clean`: "Clear application data"
    /// ticked). Its tokens die first ("When an application is uninstalled, all access
    /// permissions for the application to the API are revoked",
    /// api-reference/common/events/on-app-uninstall.md), then `ONAPPUNINSTALL` goes to
    /// its binding with `data` `LANGUAGE_ID`, `CLEAN` and an `auth` of `domain`,
    /// `server_endpoint`, `client_endpoint`, `member_id`, `application_token` only.
    /// Every binding and offline record of the application is gone afterwards.
    pub async fn uninstall_app(&self, clean: bool) -> Vec<Delivery> {
        let posts = {
            let mut s = self.inner.state();
            let language = s.cfg.language.clone();
            let data = json!({ "LANGUAGE_ID": language, "CLEAN": if clean { "1" } else { "0" } });
            let (posts, _) = plan(
                &mut s,
                "ONAPPUNINSTALL",
                &data,
                None,
                "",
                AuthKind::Uninstall,
            );
            let ours = s.our_client_id();
            s.revoke_tokens_of(&ours);
            s.events.retain(|b| b.client_id != ours);
            s.placements.retain(|b| b.client_id != ours);
            s.offline.retain(|r| r.client_id != ours);
            let app = s.ours_mut();
            app.removed = true;
            app.set_installed(false);
            posts
        };
        self.post_all(posts).await
    }

    /// An administrator opens our application for the first time: see
    /// [`SimPortal::install_app_with`] with the default [`InstallSpec`].
    pub async fn install_app(&self, install_url: &str) -> InstallReport {
        self.install_app_with(install_url, InstallSpec::default())
            .await
    }

    /// An administrator opens our application for the first time and Bitrix24 shows its
    /// installer (settings/app-installation/local-apps/installation-master.md): a POST to
    /// `install_url` with `DOMAIN`, `PROTOCOL`, `LANG`, `APP_SID` in the query and
    /// `AUTH_ID`, `AUTH_EXPIRES`, `REFRESH_ID`, `SERVER_ENDPOINT`, `APPLICATION_TOKEN`,
    /// `APPLICATION_SCOPE`, `member_id`, `status`, `PLACEMENT=DEFAULT`,
    /// `PLACEMENT_OPTIONS` in the body (settings/oauth/simple-way.md). The page is then
    /// "run" (see the module's note): its `BX24.callBind` calls are made as `event.bind`
    /// REST calls with the installer's token, and if it calls `BX24.installFinish()` the
    /// application is installed and `ONAPPINSTALL` (`VERSION`, `ACTIVE`, `INSTALLED`,
    /// `LANGUAGE_ID`; `auth` with the installing administrator's fresh tokens, refresh
    /// token included, and the application token) goes to its binding.
    ///
    /// Installing an installed application reinstalls it: the old installation is
    /// deleted first (its `ONAPPUNINSTALL` goes out) and the new one gets a new
    /// `application_token`.
    pub async fn install_app_with(&self, install_url: &str, spec: InstallSpec) -> InstallReport {
        let mut earlier = Vec::new();
        let admin = {
            let s = self.inner.state();
            s.user(spec.user.0).is_some_and(|u| u.admin)
        };
        if !admin {
            // Others see "The application is not fully installed yet. Please contact
            // your Bitrix24 administrator" (installation-finish.md).
            return InstallReport {
                error: Some(format!(
                    "user {} is not an administrator: only administrators install applications",
                    spec.user.0
                )),
                ..InstallReport::default()
            };
        }
        if self.is_installed() {
            earlier = self.uninstall_app(false).await;
        }
        {
            let mut s = self.inner.state();
            let app = s.ours_mut();
            if app.removed {
                app.removed = false;
                app.application_token = random_token();
            }
            app.set_installed(false);
            app.set_version(&spec.version);
            app.info
                .insert("LANGUAGE_ID".into(), json!(spec.language.clone()));
        }
        let mut report = self
            .run_installer(
                install_url,
                spec.user,
                &spec.language,
                spec.send_application_token,
            )
            .await;
        report.deliveries = earlier;
        if report.finished {
            let posts = {
                let mut s = self.inner.state();
                s.ours_mut().set_installed(true);
                let data = json!({
                    "VERSION": spec.version,
                    "ACTIVE": "Y",
                    "INSTALLED": "Y",
                    "LANGUAGE_ID": spec.language,
                });
                plan(
                    &mut s,
                    "ONAPPINSTALL",
                    &data,
                    Some(spec.user),
                    "",
                    AuthKind::Standard,
                )
                .0
            };
            report.deliveries.extend(self.post_all(posts).await);
        }
        report
    }

    /// Our application is updated to `new_version`. As api-reference/events/event-bind.md
    /// says, "When an application is deleted or updated, its actions will be removed.
    /// Therefore, they must be set from scratch in the installer of each version": every
    /// event binding (online and offline) and every widget of the application is
    /// removed; the application counts as not installed until the new version's
    /// installer (`spec.install_url`, opened as [`SimPortal::install_app_with`] opens
    /// one) calls `installFinish` (the documentation does not say; strict). Then
    /// `ONAPPUPDATE` (`VERSION`, `PREVIOUS_VERSION`, `LANGUAGE_ID`; `auth` with the
    /// application token, and tokens when [`UpdateSpec::linked_to_user`]) goes to its
    /// binding, if the new installer made one.
    pub async fn update_app(&self, new_version: &str, spec: UpdateSpec) -> InstallReport {
        let previous = {
            let mut s = self.inner.state();
            if !s.ours().installed {
                return InstallReport {
                    error: Some("the application is not installed: nothing to update".into()),
                    ..InstallReport::default()
                };
            }
            let ours = s.our_client_id();
            s.events.retain(|b| b.client_id != ours);
            s.placements.retain(|b| b.client_id != ours);
            let app = s.ours_mut();
            let previous = app.version();
            if spec.new_application_token {
                app.application_token = random_token();
            }
            app.set_installed(false);
            app.set_version(new_version);
            previous
        };
        let mut report = self
            .run_installer(
                &spec.install_url,
                spec.user,
                &spec.language,
                spec.send_application_token,
            )
            .await;
        if report.finished {
            let posts = {
                let mut s = self.inner.state();
                s.ours_mut().set_installed(true);
                let data = json!({
                    "VERSION": new_version,
                    "PREVIOUS_VERSION": previous,
                    "LANGUAGE_ID": spec.language,
                });
                let user = spec.linked_to_user.then_some(spec.user);
                plan(&mut s, "ONAPPUPDATE", &data, user, "", AuthKind::Standard).0
            };
            report.deliveries = self.post_all(posts).await;
        }
        report
    }

    /// `user` opens the widget `placement` (an item card, say, with
    /// `options = {"ID": "5"}`): every handler our application bound there gets the POST
    /// of api-reference/widgets/_includes/widget_data.md, with `user`'s own fresh tokens.
    /// Widgets are not shown before the installation is complete (empty then).
    pub async fn open_placement(
        &self,
        placement: &str,
        options: Value,
        user: UserId,
    ) -> Vec<Delivery> {
        let posts = {
            let mut s = self.inner.state();
            if !s.ours().installed || s.user(user.0).is_none() {
                return Vec::new();
            }
            let ours = s.our_client_id();
            let placement = placement.to_ascii_uppercase();
            let handlers: Vec<String> = s
                .placements
                .iter()
                .filter(|b| b.client_id == ours && b.placement == placement)
                .filter(|b| b.user_id == 0 || b.user_id == user.0)
                .map(|b| b.handler.clone())
                .collect();
            let options = options.to_string();
            handlers
                .into_iter()
                .map(|handler| {
                    let (query, mut body) = frame_call(&mut s, user, &placement);
                    body["PLACEMENT_OPTIONS"] = json!(options);
                    Post {
                        event: placement.clone(),
                        binding_id: 0,
                        handler,
                        query,
                        body,
                    }
                })
                .collect::<Vec<_>>()
        };
        self.post_all(posts).await
    }

    /// Every delivery so far (events, widget calls), oldest first.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner.state().deliveries.clone()
    }

    async fn emit_inner(
        &self,
        event: &str,
        data: Value,
        user: Option<UserId>,
        origin_connector: &str,
        kind: AuthKind,
    ) -> Vec<Delivery> {
        let (posts, offline) = {
            let mut s = self.inner.state();
            plan(&mut s, event, &data, user, origin_connector, kind)
        };
        let mut out = offline;
        out.extend(self.post_all(posts).await);
        out
    }

    async fn post_all(&self, posts: Vec<Post>) -> Vec<Delivery> {
        let timeout = self.inner.state().cfg.delivery_timeout;
        let mut out = Vec::with_capacity(posts.len());
        for p in posts {
            let answer = post_form(&self.inner, &p.handler, &p.query, &p.body, timeout).await;
            let outcome = match answer {
                Ok((status, body)) if (200..300).contains(&status) => {
                    Outcome::Delivered { status, body }
                }
                Ok((status, body)) => Outcome::Failed {
                    status: Some(status),
                    error: format!(
                        "HTTP {status}: {}",
                        body.chars().take(200).collect::<String>()
                    ),
                },
                Err(error) => Outcome::Failed {
                    status: None,
                    error,
                },
            };
            let mut payload = p.body;
            if let (Some(o), Value::Object(q)) = (payload.as_object_mut(), p.query) {
                o.extend(q);
            }
            let d = Delivery {
                event: p.event,
                binding_id: p.binding_id,
                handler: Some(p.handler),
                payload,
                outcome,
            };
            self.inner.state().deliveries.push(d.clone());
            out.push(d);
        }
        out
    }

    /// Opens an installer for `user` and "runs" the page it returns.
    async fn run_installer(
        &self,
        install_url: &str,
        user: UserId,
        language: &str,
        send_application_token: bool,
    ) -> InstallReport {
        let (query, body, tokens, timeout) = {
            let mut s = self.inner.state();
            let (mut query, mut body) = frame_call(&mut s, user, "DEFAULT");
            query["LANG"] = json!(language);
            // What the portal's router passes for the application's own page
            // (`/marketplace/app/<ID>/`), as in tests/fixtures/install.json.
            let app_id = s.ours().info.get("ID").cloned().unwrap_or(json!(0));
            body["PLACEMENT_OPTIONS"] = json!(json!({ "any": format!("{app_id}/") }).to_string());
            if !send_application_token {
                if let Some(o) = body.as_object_mut() {
                    o.remove("APPLICATION_TOKEN");
                }
            }
            let tokens = (
                body["AUTH_ID"].as_str().unwrap_or_default().to_owned(),
                body["REFRESH_ID"].as_str().unwrap_or_default().to_owned(),
            );
            (query, body, tokens, s.cfg.delivery_timeout)
        };
        let mut report = InstallReport {
            tokens,
            ..InstallReport::default()
        };
        let page = match post_form(&self.inner, install_url, &query, &body, timeout).await {
            Ok((status, page)) => {
                report.page_status = Some(status);
                report.page = page.clone();
                if !(200..300).contains(&status) {
                    report.error = Some(format!("the installer answered HTTP {status}"));
                    return report;
                }
                page
            }
            Err(e) => {
                report.error = Some(format!("the installer could not be opened: {e}"));
                return report;
            }
        };
        let scan = scan_page(&page);
        report.library_loaded = scan.library;
        report.unresolved = scan.unresolved;
        if !scan.library {
            report.error = Some(
                "the page does not load the Bitrix24 JS library (https://api.bitrix24.com/api/v1/): no BX24 call runs"
                    .into(),
            );
            return report;
        }
        for bind in scan.binds {
            let mut params = json!({ "event": bind.event, "handler": bind.handler });
            if let Some(a) = &bind.auth_type {
                params["auth_type"] = json!(a);
            }
            let answer = {
                let mut s = self.inner.state();
                call_as_browser(&mut s, &report.tokens.0, "event.bind", params)
            };
            match answer {
                Ok(_) => report
                    .bound
                    .push((bind.event.to_ascii_uppercase(), bind.handler)),
                Err(e) => report.bind_errors.push((bind.event, e)),
            }
        }
        report.finished = scan.finish;
        if !scan.finish {
            report.error = Some("the page does not call BX24.installFinish()".into());
        }
        report
    }
}

/// A REST call made by the Bitrix24 JS library in the user's browser: through the same
/// door as any other call (bucket, token, recorded).
fn call_as_browser(
    s: &mut State,
    token: &str,
    method: &str,
    params: Value,
) -> Result<Value, ApiError> {
    let host = s
        .client_endpoint
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("")
        .to_owned();
    let req = RestRequest {
        method: method.to_owned(),
        raw_method: method.to_owned(),
        host,
        path: format!("/rest/{method}"),
        query: None,
        token: Some(token.to_owned()),
        params: serde_json::from_value::<PValue>(params).unwrap_or_else(|_| PValue::empty_map()),
    };
    match super::rest(s, req) {
        Reply::Json(200, v) if v.get("error").is_none() => Ok(v["result"].clone()),
        Reply::Json(status, v) => Err(ApiError {
            argument: v.get("argument").and_then(Value::as_str).map(str::to_owned),
            ..ApiError::with(
                status,
                v["error"].as_str().unwrap_or_default(),
                v["error_description"].as_str().unwrap_or_default(),
            )
        }),
        Reply::Raw(status, body) => Err(ApiError::with(status, "", &body)),
        Reply::Redirect(to) => Err(ApiError::with(302, "", &to)),
        Reply::Drop => Err(ApiError::with(0, "", "connection dropped")),
    }
}

/// The query and body Bitrix24 sends to a page it shows in a frame (an installer, a
/// widget): api-reference/widgets/_includes/widget_data.md and
/// settings/oauth/simple-way.md, with `user`'s fresh tokens through our application.
fn frame_call(s: &mut State, user: UserId, placement: &str) -> (Value, Value) {
    let ours = s.our_client_id();
    let (access, refresh) = s.issue_pair_for(user.0, &ours, Instant::now());
    let app_sid: String = random_token()
        .bytes()
        .map(|b| format!("{:x}", b % 16))
        .collect();
    let query = json!({
        "DOMAIN": s.cfg.domain,
        // The simulator speaks plain HTTP: 0.
        "PROTOCOL": "0",
        "LANG": s.cfg.language,
        "APP_SID": app_sid,
    });
    let body = json!({
        "AUTH_ID": access,
        "AUTH_EXPIRES": s.cfg.token_ttl.as_secs().to_string(),
        "REFRESH_ID": refresh,
        "SERVER_ENDPOINT": s.server_endpoint,
        "APPLICATION_TOKEN": s.ours().application_token,
        "APPLICATION_SCOPE": s.cfg.scope,
        "member_id": s.cfg.member_id,
        "status": s.ours().status(),
        "PLACEMENT": placement,
    });
    (query, body)
}

/// The `auth` of an event, in the order of api-reference/events/index.md's example.
fn event_auth(s: &mut State, event: &str, user: Option<u64>, kind: AuthKind) -> Map<String, Value> {
    let ours = s.our_client_id();
    let mut auth = Map::new();
    if kind == AuthKind::Standard {
        if let Some(u) = user.filter(|u| s.user(*u).is_some()) {
            let (access, refresh) = s.issue_pair_for(u, &ours, Instant::now());
            auth.insert("access_token".into(), json!(access));
            auth.insert(
                "expires_in".into(),
                json!(s.cfg.token_ttl.as_secs().to_string()),
            );
            // "The refresh_token token does not come with every event. It is passed only
            // with events that require long-term access to Bitrix24, such as OnAppInstall
            // and onOfflineEvent" (api-reference/events/index.md); OnAppUpdate's page
            // shows one too.
            let long_term = matches!(event, "ONAPPINSTALL" | "ONAPPUPDATE" | "ONOFFLINEEVENT");
            if long_term || s.cfg.refresh_token_in_events {
                auth.insert("refresh_token".into(), json!(refresh));
            }
        }
        auth.insert("scope".into(), json!(s.cfg.scope));
    }
    auth.insert("domain".into(), json!(s.cfg.domain));
    auth.insert("server_endpoint".into(), json!(s.server_endpoint));
    if kind == AuthKind::Standard {
        auth.insert("status".into(), s.ours().status());
    }
    auth.insert("client_endpoint".into(), json!(s.client_endpoint));
    auth.insert("member_id".into(), json!(s.cfg.member_id));
    if kind != AuthKind::Payment {
        auth.insert(
            "application_token".into(),
            json!(s.ours().application_token),
        );
    }
    auth
}

/// Under the lock: the POSTs an event makes, and its offline records (made now).
fn plan(
    s: &mut State,
    event: &str,
    data: &Value,
    user: Option<UserId>,
    origin_connector: &str,
    kind: AuthKind,
) -> (Vec<Post>, Vec<Delivery>) {
    let event = event.to_ascii_uppercase();
    if !s.ours().installed {
        return (Vec::new(), Vec::new());
    }
    let ours = s.our_client_id();
    let bindings: Vec<_> = s
        .events
        .iter()
        .filter(|b| b.client_id == ours && b.event == event)
        .cloned()
        .collect();
    let now = Instant::now();
    let ts = (s.unix(now).floor() as u64).to_string();
    let mut posts = Vec::new();
    let mut offline = Vec::new();
    for b in bindings {
        if b.offline {
            if kind != AuthKind::Standard
                || (!origin_connector.is_empty() && b.auth_connector == origin_connector)
            {
                continue;
            }
            let additional = user.map_or(json!(false), |u| json!({ "user_id": u.0.to_string() }));
            let timestamp = iso_unix(s.unix(now));
            let message_id = s.record_offline(
                &ours,
                &b.auth_connector,
                &event,
                data.clone(),
                additional,
                timestamp,
            );
            offline.push(Delivery {
                event: event.clone(),
                binding_id: b.id,
                handler: None,
                payload: data.clone(),
                outcome: Outcome::RecordedOffline {
                    message_id,
                    auth_connector: b.auth_connector.clone(),
                },
            });
            continue;
        }
        // auth_type: "Identifier of the user under whom the event handler is
        // authorized. By default, the authorization of the user whose actions triggered
        // the event will be used" (api-reference/events/event-bind.md).
        let as_user = b
            .auth_type
            .parse::<u64>()
            .ok()
            .filter(|u| *u != 0)
            .or(user.map(|u| u.0));
        let auth = event_auth(s, &event, as_user, kind);
        posts.push(Post {
            event: event.clone(),
            binding_id: b.id,
            handler: b.handler.clone(),
            query: json!({}),
            body: json!({
                "event": event,
                "event_handler_id": b.id.to_string(),
                "data": data,
                "ts": ts,
                "auth": auth,
            }),
        });
    }
    s.deliveries.extend(offline.iter().cloned());
    if !offline.is_empty() {
        posts.extend(offline_notice(s, user));
    }
    (posts, offline)
}

/// `ONOFFLINEEVENT` to its online bindings when records were added, at most once per
/// binding's `options.minTimeout` seconds (default 1; api-reference/events/on-offline-event.md).
fn offline_notice(s: &mut State, user: Option<UserId>) -> Vec<Post> {
    let ours = s.our_client_id();
    let now = Instant::now();
    let due: Vec<_> = s
        .events
        .iter()
        .filter(|b| b.client_id == ours && b.event == "ONOFFLINEEVENT" && !b.offline)
        .filter(|b| {
            let min = b
                .options
                .get("minTimeout")
                .and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok()))
                .unwrap_or(1.0)
                .max(0.0);
            s.offline_notified
                .get(&b.id)
                .is_none_or(|at| now.duration_since(*at).as_secs_f64() >= min)
        })
        .cloned()
        .collect();
    let ts = (s.unix(now).floor() as u64).to_string();
    due.into_iter()
        .map(|b| {
            s.offline_notified.insert(b.id, now);
            let as_user = b
                .auth_type
                .parse::<u64>()
                .ok()
                .filter(|u| *u != 0)
                .or(user.map(|u| u.0));
            let auth = event_auth(s, "ONOFFLINEEVENT", as_user, AuthKind::Standard);
            Post {
                event: "ONOFFLINEEVENT".into(),
                binding_id: b.id,
                handler: b.handler.clone(),
                query: json!({}),
                body: json!({
                    "event": "ONOFFLINEEVENT",
                    "event_handler_id": b.id.to_string(),
                    "data": [],
                    "ts": ts,
                    "auth": auth,
                }),
            }
        })
        .collect()
}

/// POSTs `body` form-encoded (and `query` into the URL's query string) to an `http://`
/// URL: `(status, body)` of the answer, or why there was none.
async fn post_form(
    inner: &Inner,
    url: &str,
    query: &Value,
    body: &Value,
    timeout: std::time::Duration,
) -> Result<(u16, String), String> {
    if !url.starts_with("http://") {
        return Err(format!(
            "only http:// URLs are reachable from the simulator: {url}"
        ));
    }
    let q = http_build_query(query);
    let full = if q.is_empty() {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&{q}")
    } else {
        format!("{url}?{q}")
    };
    let uri: hyper::Uri = full.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let mut req = Request::post(uri)
        .body(Full::new(Bytes::from(http_build_query(body))))
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    let exchange = async {
        let resp = inner.http.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// One `BX24.callBind` call read from a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindCall {
    pub event: String,
    pub handler: String,
    pub auth_type: Option<String>,
}

/// What the simulator reads from an installer page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageScan {
    pub library: bool,
    pub binds: Vec<BindCall>,
    pub unresolved: Vec<String>,
    pub finish: bool,
}

/// Reads a page as described in the module's note: the Bitrix24 library's `<script
/// src>`, and in inline scripts `BX24.callBind(...)` with string-literal arguments and
/// `BX24.installFinish()`. Script text is taken as the browser takes it: not
/// HTML-decoded (entities inside `<script>` stay literal).
pub fn scan_page(html: &str) -> PageScan {
    let mut scan = PageScan::default();
    let lower = html.to_ascii_lowercase();
    let mut at = 0;
    while let Some(found) = lower[at..].find("<script") {
        let start = at + found;
        let Some(tag_len) = lower[start..].find('>') else {
            break;
        };
        let tag = &html[start..start + tag_len + 1];
        let body_start = start + tag_len + 1;
        let Some(body_len) = lower[body_start..].find("</script") else {
            break;
        };
        let body = &html[body_start..body_start + body_len];
        at = body_start + body_len;
        match attribute(tag, "src") {
            Some(src) => {
                let src = html_unescape(&src);
                let src = src.trim();
                if src.starts_with("https://api.bitrix24.com/api/v1")
                    || src.starts_with("//api.bitrix24.com/api/v1")
                {
                    scan.library = true;
                }
            }
            None => read_script(body, &mut scan),
        }
    }
    scan
}

fn read_script(js: &str, scan: &mut PageScan) {
    if js.contains("BX24.installFinish(") {
        scan.finish = true;
    }
    let mut rest = js;
    while let Some(i) = rest.find("BX24.callBind(") {
        rest = &rest[i + "BX24.callBind(".len()..];
        let mut cursor = rest.trim_start();
        let Some((event, used)) = js_literal(cursor) else {
            scan.unresolved.push(snippet(cursor));
            continue;
        };
        cursor = cursor[used..].trim_start();
        let Some(after_comma) = cursor.strip_prefix(',') else {
            scan.unresolved.push(snippet(rest));
            continue;
        };
        cursor = after_comma.trim_start();
        let Some((handler, used)) = js_literal(cursor) else {
            scan.unresolved.push(snippet(rest));
            continue;
        };
        cursor = cursor[used..].trim_start();
        let mut auth_type = None;
        if let Some(after) = cursor.strip_prefix(',') {
            let digits: String = after
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if !digits.is_empty() {
                auth_type = Some(digits);
            }
        }
        scan.binds.push(BindCall {
            event,
            handler,
            auth_type,
        });
    }
}

fn snippet(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The value of `name="..."` (or `'...'`, or unquoted) in a start tag.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(name) {
        let pos = from + i;
        from = pos + name.len();
        let before_ok = pos > 0 && lower.as_bytes()[pos - 1].is_ascii_whitespace();
        let after = lower[from..].trim_start();
        if !before_ok || !after.starts_with('=') {
            continue;
        }
        let value_start = tag.len() - after.len() + 1;
        let v = tag[value_start..].trim_start();
        return Some(match v.chars().next() {
            Some(q @ ('"' | '\'')) => v[1..].split(q).next().unwrap_or("").to_owned(),
            _ => v
                .split(|c: char| c.is_whitespace() || c == '>')
                .next()
                .unwrap_or("")
                .to_owned(),
        });
    }
    None
}

/// The character references an attribute value may hold.
fn html_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// A JavaScript string literal at the start of `s` (single or double quotes), decoded:
/// `(value, bytes consumed)`. `None` when `s` does not start with a complete one.
pub fn js_literal(s: &str) -> Option<(String, usize)> {
    let quote = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c == quote => return Some((out, i + c.len_utf8())),
            '\n' | '\r' => return None,
            '\\' => {
                let (_, e) = chars.next()?;
                match e {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'v' => out.push('\u{b}'),
                    '0' if !chars.peek().is_some_and(|(_, d)| d.is_ascii_digit()) => out.push('\0'),
                    'x' => {
                        let hex: String = (0..2)
                            .filter_map(|_| chars.next().map(|(_, h)| h))
                            .collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    'u' => {
                        let code = if chars.peek().is_some_and(|(_, b)| *b == '{') {
                            chars.next();
                            let hex: String = chars
                                .by_ref()
                                .map(|(_, h)| h)
                                .take_while(|h| *h != '}')
                                .collect();
                            u32::from_str_radix(&hex, 16).ok()?
                        } else {
                            let hex: String = (0..4)
                                .filter_map(|_| chars.next().map(|(_, h)| h))
                                .collect();
                            if hex.len() != 4 {
                                return None;
                            }
                            u32::from_str_radix(&hex, 16).ok()?
                        };
                        // A surrogate pair written as two \u escapes.
                        if (0xD800..0xDC00).contains(&code) {
                            let mut ahead = chars.clone();
                            let low = match (ahead.next(), ahead.next()) {
                                (Some((_, '\\')), Some((_, 'u'))) => {
                                    let hex: String = (0..4)
                                        .filter_map(|_| ahead.next().map(|(_, h)| h))
                                        .collect();
                                    u32::from_str_radix(&hex, 16).ok()
                                }
                                _ => None,
                            };
                            match low.filter(|l| (0xDC00..0xE000).contains(l)) {
                                Some(l) => {
                                    chars = ahead;
                                    let c = 0x10000 + ((code - 0xD800) << 10) + (l - 0xDC00);
                                    out.push(char::from_u32(c)?);
                                }
                                None => out.push('\u{FFFD}'),
                            }
                        } else {
                            out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
                        }
                    }
                    // A backslash before a line break continues the line.
                    '\n' => {}
                    '\r' => {
                        if chars.peek().is_some_and(|(_, n)| *n == '\n') {
                            chars.next();
                        }
                    }
                    other => out.push(other),
                }
            }
            c => out.push(c),
        }
    }
    None
}
