//! The portal's side of the lifecycle against a real HTTP receiver: installers opened,
//! their binds registered, events delivered (and lost when the handler fails).

use super::lifecycle::{js_literal, scan_page, BindCall};
use super::tests::{call, oauth_http, portal_with, refresh_path};
use super::*;
use crate::http::HttpClient;
use params::php_decode;
use std::sync::Mutex as StdMutex;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    query: Value,
    content_type: String,
    body: Value,
}

/// An HTTP server standing in for the application: records every request and answers
/// with what the test set (a page for `/install`, 200 elsewhere by default).
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    got: Arc<StdMutex<Vec<Got>>>,
    answers: Arc<StdMutex<Vec<(String, u16, String)>>>,
    delay: Arc<StdMutex<Duration>>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let r = Receiver {
            addr: listener.local_addr().expect("addr"),
            got: Arc::default(),
            answers: Arc::default(),
            delay: Arc::default(),
        };
        let me = r.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| me.clone().answer(req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        r
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests to `path` answer `status` with `body`.
    fn answer_with(&self, path: &str, status: u16, body: &str) {
        let mut a = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        a.retain(|(p, _, _)| p != path);
        a.push((path.to_owned(), status, body.to_owned()));
    }

    fn got(&self, path: &str) -> Vec<Got> {
        self.got
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|g| g.path == path)
            .cloned()
            .collect()
    }

    async fn answer(
        self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
        let path = req.uri().path().to_owned();
        let query = req
            .uri()
            .query()
            .map(php_decode)
            .map_or(json!({}), |q| q.to_json());
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body = php_decode(&String::from_utf8_lossy(&body)).to_json();
        self.got
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Got {
                path: path.clone(),
                query,
                content_type,
                body,
            });
        let delay = *self.delay.lock().unwrap_or_else(|e| e.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let (status, body) = self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(p, _, _)| *p == path)
            .map_or((200, "{\"ok\":true}".to_owned()), |(_, s, b)| {
                (*s, b.clone())
            });
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        Ok(resp)
    }
}

const LIBRARY: &str = r#"<script src="https://api.bitrix24.com/api/v1/"></script>"#;

/// An installer page like the ingress's: binds the given events to `handler`, then
/// finishes.
fn installer(events: &[&str], handler: &str) -> String {
    let binds: String = events
        .iter()
        .map(|e| format!("BX24.callBind('{e}','{handler}',0,function(){{}});"))
        .collect();
    format!(
        "<!DOCTYPE html><html><head>{LIBRARY}</head><body><script>BX24.init(function(){{{binds}BX24.installFinish();}});</script></body></html>"
    )
}

/// A portal whose application installed itself with `events` bound to the receiver's
/// `/events`.
async fn installed(events: &[&str]) -> (SimPortal, HttpClient, Receiver, InstallReport) {
    installed_with(events, |_| {}).await
}

async fn installed_with(
    events: &[&str],
    tune: impl FnOnce(&mut PortalConfig),
) -> (SimPortal, HttpClient, Receiver, InstallReport) {
    let (portal, http) = portal_with(tune).await;
    let app = Receiver::start().await;
    app.answer_with("/install", 200, &installer(events, &app.url("/events")));
    let report = portal.install_app(&app.url("/install")).await;
    assert!(report.finished, "{report:?}");
    (portal, http, app, report)
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    k.sort();
    k
}

#[tokio::test]
async fn install_opens_the_installer_registers_its_binds_and_sends_onappinstall() {
    let (portal, http) = portal_with(|_| {}).await;
    let app = Receiver::start().await;
    app.answer_with(
        "/install",
        200,
        &installer(&["ONAPPINSTALL", "ONAPPUPDATE"], &app.url("/events")),
    );
    assert!(!portal.is_installed());
    let report = portal.install_app(&app.url("/install")).await;
    assert!(report.library_loaded && report.finished, "{report:?}");
    assert_eq!(
        report.bound,
        [
            ("ONAPPINSTALL".to_string(), app.url("/events")),
            ("ONAPPUPDATE".to_string(), app.url("/events")),
        ]
    );

    // What the installer got: the frame's query and body (settings/oauth/simple-way.md).
    let opened = app.got("/install");
    assert_eq!(opened.len(), 1);
    let q = &opened[0].query;
    assert_eq!(
        (
            q["DOMAIN"].clone(),
            q["PROTOCOL"].clone(),
            q["LANG"].clone()
        ),
        (json!(portal.domain()), json!("0"), json!("en"))
    );
    assert_eq!(q["APP_SID"].as_str().map(str::len), Some(32));
    let b = &opened[0].body;
    assert_eq!(opened[0].content_type, "application/x-www-form-urlencoded");
    assert_eq!(
        keys(b),
        [
            "APPLICATION_SCOPE",
            "APPLICATION_TOKEN",
            "AUTH_EXPIRES",
            "AUTH_ID",
            "PLACEMENT",
            "PLACEMENT_OPTIONS",
            "REFRESH_ID",
            "SERVER_ENDPOINT",
            "member_id",
            "status"
        ]
    );
    assert_eq!(b["PLACEMENT"], "DEFAULT");
    assert_eq!(b["PLACEMENT_OPTIONS"], r#"{"any":"5/"}"#);
    assert_eq!(b["SERVER_ENDPOINT"], json!(portal.server_endpoint()));
    assert_eq!(b["member_id"], json!(portal.member_id()));
    assert_eq!(b["APPLICATION_TOKEN"], json!(portal.application_token()));
    let auth_id = b["AUTH_ID"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        call(&http, "user.admin", &auth_id, json!({})).await.1["result"],
        true
    );

    // The binds went through event.bind with the installer's token.
    let binds: Vec<_> = portal
        .calls()
        .into_iter()
        .filter(|c| c.method == "event.bind")
        .collect();
    assert_eq!(binds.len(), 2);
    assert_eq!(binds[0].token.as_deref(), Some(auth_id.as_str()));

    // Installed, and ONAPPINSTALL delivered to its binding, form-encoded.
    assert!(portal.is_installed());
    let info = portal.expected("app.info", json!({})).expect("app.info");
    assert_eq!(
        (info["INSTALLED"].clone(), info["VERSION"].clone()),
        (json!(true), json!(1))
    );
    let got = app.got("/events");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].content_type, "application/x-www-form-urlencoded");
    let e = &got[0].body;
    assert_eq!(e["event"], "ONAPPINSTALL");
    assert_eq!(
        e["data"],
        json!({"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"})
    );
    assert!(e["event_handler_id"]
        .as_str()
        .is_some_and(|id| id.parse::<u64>().is_ok()));
    assert!(e["ts"].as_str().is_some_and(|ts| ts.parse::<u64>().is_ok()));
    let auth = &e["auth"];
    assert_eq!(
        keys(auth),
        [
            "access_token",
            "application_token",
            "client_endpoint",
            "domain",
            "expires_in",
            "member_id",
            "refresh_token",
            "scope",
            "server_endpoint",
            "status"
        ]
    );
    assert_eq!(auth["application_token"], json!(portal.application_token()));
    assert_eq!(auth["server_endpoint"], json!(portal.server_endpoint()));
    assert_eq!(auth["client_endpoint"], json!(portal.client_endpoint()));
    assert_eq!(auth["status"], "L");
    let access = auth["access_token"].as_str().unwrap_or_default();
    assert_ne!(access, auth_id, "a fresh pair");
    assert_eq!(
        call(&http, "user.current", access, json!({})).await.1["result"]["ID"],
        "1"
    );
    let refresh = auth["refresh_token"].as_str().unwrap_or_default();
    assert_eq!(
        crate::portal::tests::get(&oauth_http(&portal), &refresh_path(&portal, refresh))
            .await
            .0,
        200
    );
    assert_eq!(report.deliveries.len(), 1);
    assert!(report.deliveries[0].delivered());
}

#[tokio::test]
async fn the_browser_stand_in_binds_only_literal_urls_and_needs_the_library() {
    let (portal, _) = portal_with(|_| {}).await;
    let app = Receiver::start().await;
    // The handler computed in the browser, as the ingress's page did before.
    let computed = format!(
        "<html><head>{LIBRARY}</head><body><script>BX24.init(function(){{\
         var handler=new URL('events',location.href.split('?')[0]).href;\
         BX24.callBind('ONAPPINSTALL',handler,0,function(){{BX24.installFinish();}});}});</script></body></html>"
    );
    app.answer_with("/install", 200, &computed);
    let report = portal.install_app(&app.url("/install")).await;
    assert!(report.finished);
    assert!(report.bound.is_empty(), "{report:?}");
    assert_eq!(report.unresolved.len(), 1, "{report:?}");
    assert!(report.deliveries.is_empty(), "no binding, no ONAPPINSTALL");
    assert!(app.got("/events").is_empty());
    assert!(portal.event_bindings().is_empty());

    // Without the library nothing on the page runs.
    let (portal, _) = portal_with(|_| {}).await;
    let page = installer(&["ONAPPINSTALL"], &app.url("/events")).replace(LIBRARY, "");
    app.answer_with("/install", 200, &page);
    let report = portal.install_app(&app.url("/install")).await;
    assert!(!report.library_loaded && !report.finished && report.bound.is_empty());
    assert!(!portal.is_installed());

    // A page that binds but never finishes: bound, not installed, nothing delivered.
    let (portal, _) = portal_with(|_| {}).await;
    let page =
        installer(&["ONAPPINSTALL"], &app.url("/events")).replace("BX24.installFinish();", "");
    app.answer_with("/install", 200, &page);
    let report = portal.install_app(&app.url("/install")).await;
    assert_eq!(report.bound.len(), 1);
    assert!(!report.finished && !portal.is_installed());
    assert!(portal.add_requisite(1).await.is_empty());

    // An installer that fails, or is not there.
    let (portal, _) = portal_with(|_| {}).await;
    app.answer_with("/install", 503, "busy");
    let report = portal.install_app(&app.url("/install")).await;
    assert_eq!(report.page_status, Some(503));
    assert!(!report.finished);
    let report = portal.install_app("http://127.0.0.1:1/install").await;
    assert!(report.page_status.is_none() && report.error.is_some());

    // Only administrators install.
    let employee = portal.add_user(UserSpec::employee());
    let report = portal
        .install_app_with(
            &app.url("/install"),
            InstallSpec {
                user: employee,
                ..InstallSpec::default()
            },
        )
        .await;
    assert!(report.error.is_some_and(|e| e.contains("administrator")));
}

#[tokio::test]
async fn events_reach_every_online_binding_and_a_failed_delivery_is_lost() {
    let (portal, http, app, _) = installed_with(&["ONAPPINSTALL"], |c| {
        c.delivery_timeout = Duration::from_secs(1)
    })
    .await;
    let (admin, _) = portal.issue_tokens();
    for handler in [app.url("/a"), app.url("/b")] {
        let (status, body) = call(
            &http,
            "event.bind",
            &admin,
            json!({"event": "ONCRMREQUISITEADD", "handler": handler}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let report = portal.add_requisite(27).await;
    assert_eq!(report.len(), 2);
    assert!(report.iter().all(|d| d.delivered()), "{report:?}");
    let got = app.got("/a");
    assert_eq!(got.len(), 1);
    let e = &got[0].body;
    assert_eq!(e["event"], "ONCRMREQUISITEADD");
    assert_eq!(e["data"], json!({"FIELDS": {"ID": "27"}}));
    // Linked to the administrator: an access token, but no refresh token
    // (api-reference/events/index.md).
    assert!(e["auth"]["access_token"].is_string());
    assert!(e["auth"].get("refresh_token").is_none(), "{e}");
    assert_eq!(
        e["auth"]["application_token"],
        json!(portal.application_token())
    );

    // A handler answering 503: the event is lost, never resent.
    app.answer_with("/a", 503, "down");
    let report = portal.add_requisite(28).await;
    let a = report
        .iter()
        .find(|d| d.handler.as_deref() == Some(app.url("/a").as_str()))
        .expect("a");
    assert!(
        matches!(
            a.outcome,
            Outcome::Failed {
                status: Some(503),
                ..
            }
        ),
        "{a:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(app.got("/a").len(), 2, "one attempt each, no retry");
    // Too slow: lost too.
    *app.delay.lock().unwrap_or_else(|e| e.into_inner()) = Duration::from_secs(2);
    let report = portal.add_requisite(29).await;
    assert!(report
        .iter()
        .all(|d| matches!(d.outcome, Outcome::Failed { status: None, .. })));
    *app.delay.lock().unwrap_or_else(|e| e.into_inner()) = Duration::ZERO;
    // Refused connections: lost.
    let (status, _) = call(
        &http,
        "event.bind",
        &admin,
        json!({"event": "ONCRMDEALRECURRINGEXPOSE", "handler": "http://127.0.0.1:1/events"}),
    )
    .await;
    assert_eq!(status, 200);
    let report = portal.expose_recurring_deal(9, 6791, 6799).await;
    assert!(matches!(
        report[0].outcome,
        Outcome::Failed { status: None, .. }
    ));
    // An agent's event: no tokens at all.
    let auth = &report[0].payload["auth"];
    assert!(
        auth.get("access_token").is_none() && auth.get("expires_in").is_none(),
        "{auth}"
    );
    assert_eq!(portal.deliveries().len(), 1 + 2 + 2 + 2 + 1);
}

#[tokio::test]
async fn the_binding_auth_type_decides_whose_token_an_event_carries() {
    let (portal, http, app, _) =
        installed_with(&["ONAPPINSTALL"], |c| c.refresh_token_in_events = true).await;
    let (admin, _) = portal.issue_tokens();
    let employee = portal.add_user(UserSpec::employee());
    call(
        &http,
        "event.bind",
        &admin,
        json!({"event": "ONCRMREQUISITEADD", "handler": app.url("/as-employee"), "auth_type": employee.0}),
    )
    .await;
    let report = portal
        .emit("ONCRMREQUISITEADD", json!({"FIELDS": {"ID": "5"}}), None)
        .await;
    let auth = &report[0].payload["auth"];
    assert!(auth["refresh_token"].is_string(), "the switch puts it in");
    let token = auth["access_token"].as_str().unwrap_or_default();
    assert_eq!(
        call(&http, "user.current", token, json!({})).await.1["result"]["ID"],
        "2"
    );
}

#[tokio::test]
async fn update_removes_every_binding_and_the_new_installer_sets_them_again() {
    let (portal, http, app, _) = installed(&["ONAPPINSTALL", "ONAPPUPDATE"]).await;
    let (admin, _) = portal.issue_tokens();
    call(
        &http,
        "event.bind",
        &admin,
        json!({"event": "ONCRMREQUISITEADD", "handler": app.url("/events")}),
    )
    .await;
    call(
        &http,
        "event.bind",
        &admin,
        json!({"event": "ONCRMREQUISITEADD", "event_type": "offline"}),
    )
    .await;
    call(
        &http,
        "placement.bind",
        &admin,
        json!({"PLACEMENT": "CRM_DEAL_DETAIL_ACTIVITY", "HANDLER": app.url("/placement")}),
    )
    .await;
    assert_eq!(portal.event_bindings().len(), 4);
    assert_eq!(portal.placement_bindings().len(), 1);
    let old_token = portal.application_token();

    // Version 2's installer binds only ONAPPUPDATE.
    app.answer_with(
        "/install2",
        200,
        &installer(&["ONAPPUPDATE"], &app.url("/events")),
    );
    let report = portal
        .update_app("2", UpdateSpec::new(app.url("/install2")))
        .await;
    assert!(report.finished, "{report:?}");
    let bound: Vec<_> = portal
        .event_bindings()
        .iter()
        .map(|b| b["event"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(bound, ["ONAPPUPDATE"]);
    assert!(portal.placement_bindings().is_empty());
    assert_ne!(
        portal.application_token(),
        old_token,
        "a new application_token"
    );
    assert_eq!(portal.app_version(), "2");

    let updates: Vec<_> = app
        .got("/events")
        .into_iter()
        .filter(|g| g.body["event"] == "ONAPPUPDATE")
        .collect();
    assert_eq!(updates.len(), 1);
    let e = &updates[0].body;
    assert_eq!(
        e["data"],
        json!({"VERSION": "2", "PREVIOUS_VERSION": "1", "LANGUAGE_ID": "en"})
    );
    assert_eq!(
        e["auth"]["application_token"],
        json!(portal.application_token())
    );
    assert!(e["auth"]["access_token"].is_string() && e["auth"]["refresh_token"].is_string());
    // The new installer got the new token too.
    assert_eq!(
        app.got("/install2")[0].body["APPLICATION_TOKEN"],
        json!(portal.application_token())
    );

    // Whatever was bound before the update is gone: nothing delivered, nothing recorded.
    assert!(portal.add_requisite(1).await.is_empty());

    // An update not linked to a user, keeping the token: no tokens in ONAPPUPDATE.
    let kept = portal.application_token();
    let spec = UpdateSpec {
        linked_to_user: false,
        new_application_token: false,
        ..UpdateSpec::new(app.url("/install2"))
    };
    let report = portal.update_app("3", spec).await;
    let auth = &report.deliveries[0].payload["auth"];
    assert!(
        auth.get("access_token").is_none() && auth.get("refresh_token").is_none(),
        "{auth}"
    );
    assert_eq!(auth["application_token"], json!(kept));
    assert_eq!(
        report.deliveries[0].payload["data"]["PREVIOUS_VERSION"],
        "2"
    );
}

#[tokio::test]
async fn an_update_whose_installer_never_finishes_leaves_the_app_uninstalled() {
    let (portal, _, app, _) =
        installed(&["ONAPPINSTALL", "ONAPPUPDATE", "ONCRMREQUISITEADD"]).await;
    let page = installer(&["ONAPPUPDATE", "ONCRMREQUISITEADD"], &app.url("/events"))
        .replace("BX24.installFinish();", "");
    app.answer_with("/install2", 200, &page);
    let report = portal
        .update_app("2", UpdateSpec::new(app.url("/install2")))
        .await;
    assert!(!report.finished && report.deliveries.is_empty());
    assert!(!portal.is_installed());
    assert!(
        portal.add_requisite(1).await.is_empty(),
        "not delivered until installFinish"
    );
}

#[tokio::test]
async fn uninstall_sends_only_the_application_token_and_kills_every_token() {
    let (portal, http, app, _) = installed(&["ONAPPINSTALL", "ONAPPUNINSTALL"]).await;
    let (access, refresh) = portal.issue_tokens();
    let token = portal.application_token();
    let report = portal.uninstall_app(true).await;
    assert_eq!(report.len(), 1);
    let e = &app
        .got("/events")
        .into_iter()
        .find(|g| g.body["event"] == "ONAPPUNINSTALL")
        .expect("ONAPPUNINSTALL delivered")
        .body;
    assert_eq!(e["data"], json!({"LANGUAGE_ID": "en", "CLEAN": "1"}));
    // api-reference/common/events/on-app-uninstall.md's auth: no tokens, no scope.
    assert_eq!(
        keys(&e["auth"]),
        [
            "application_token",
            "client_endpoint",
            "domain",
            "member_id",
            "server_endpoint"
        ]
    );
    assert_eq!(e["auth"]["application_token"], json!(token));
    assert_eq!(
        call(&http, "app.info", &access, json!({})).await.1["error"],
        "invalid_token"
    );
    let (status, body) =
        crate::portal::tests::get(&oauth_http(&portal), &refresh_path(&portal, &refresh)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    assert!(portal.event_bindings().is_empty() && !portal.is_installed());
    assert!(portal
        .emit("ONAPPUNINSTALL", json!({}), None)
        .await
        .is_empty());

    // Installing again gives a new application_token.
    app.answer_with(
        "/install",
        200,
        &installer(&["ONAPPINSTALL"], &app.url("/events")),
    );
    let report = portal.install_app(&app.url("/install")).await;
    assert!(report.finished);
    assert_ne!(portal.application_token(), token);
}

#[tokio::test]
async fn a_reinstall_removes_the_old_installation_first() {
    let (portal, _, app, _) = installed(&["ONAPPINSTALL", "ONAPPUNINSTALL"]).await;
    let first = portal.application_token();
    let report = portal.install_app(&app.url("/install")).await;
    let events: Vec<_> = report.deliveries.iter().map(|d| d.event.as_str()).collect();
    assert_eq!(events, ["ONAPPUNINSTALL", "ONAPPINSTALL"]);
    assert_eq!(
        report.deliveries[0].payload["auth"]["application_token"],
        json!(first)
    );
    assert_ne!(portal.application_token(), first);
    assert_eq!(portal.event_bindings().len(), 2, "bound once, not twice");
}

#[tokio::test]
async fn payment_sends_onapppayment_without_any_token() {
    let (portal, http, app, _) = installed(&["ONAPPINSTALL", "ONAPPPAYMENT"]).await;
    let (access, _) = portal.issue_tokens();
    portal.set_payment_required(true);
    assert_eq!(call(&http, "app.info", &access, json!({})).await.0, 402);
    let report = portal.pay_app().await;
    assert!(report[0].delivered());
    let e = &app
        .got("/events")
        .into_iter()
        .find(|g| g.body["event"] == "ONAPPPAYMENT")
        .expect("delivered")
        .body;
    // As seed 002: no tokens, no application token.
    assert_eq!(
        keys(&e["auth"]),
        ["client_endpoint", "domain", "member_id", "server_endpoint"]
    );
    assert_eq!(
        e["data"],
        json!({"CODE": portal.client_id(), "VERSION": "1", "STATUS": "P", "PAYMENT_EXPIRED": "N", "DAYS": "30", "LANGUAGE_ID": "en"})
    );
    let (status, info) = call(&http, "app.info", &access, json!({})).await;
    assert_eq!(
        (status, info["result"]["STATUS"].clone()),
        (200, json!("P"))
    );
}

#[tokio::test]
async fn offline_bindings_keep_one_record_per_object_and_source() {
    let (portal, http, app, _) = installed(&["ONAPPINSTALL"]).await;
    let (admin, _) = portal.issue_tokens();
    call(
        &http,
        "event.bind",
        &admin,
        json!({"event": "ONCRMREQUISITEADD", "event_type": "offline"}),
    )
    .await;
    call(
        &http,
        "event.bind",
        &admin,
        json!({"event": "ONCRMREQUISITEADD", "event_type": "offline", "auth_connector": "b24pipeline"}),
    )
    .await;
    call(
        &http,
        "event.bind",
        &admin,
        json!({"event": "ONOFFLINEEVENT", "handler": app.url("/notice"), "options": {"minTimeout": 30}}),
    )
    .await;
    // A change made by our own call with the connector: only the queue without a
    // source records it.
    let report = portal
        .emit_from_connector(
            "ONCRMREQUISITEADD",
            json!({"FIELDS": {"ID": "1"}}),
            Some(UserId::ADMIN),
            "b24pipeline",
        )
        .await;
    let recorded: Vec<_> = report
        .iter()
        .filter_map(|d| match &d.outcome {
            Outcome::RecordedOffline { auth_connector, .. } => Some(auth_connector.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(recorded, [""]);
    // The same object again, then another one, from a user: both queues.
    portal.add_requisite(1).await;
    portal.add_requisite(2).await;
    let queue = portal.offline_queue();
    assert_eq!(queue.len(), 1 + 2 + 1, "{queue:#?}");

    let get = |params: Value| {
        let http = http.clone();
        let admin = admin.clone();
        async move { call(&http, "event.offline.get", &admin, params).await }
    };
    let (_, plain) = get(json!({"clear": 0})).await;
    let ids: Vec<_> = plain["result"]["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["EVENT_DATA"]["FIELDS"]["ID"].clone())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ids, [json!("1"), json!("2")], "one record for object 1");
    assert_eq!(
        plain["result"]["events"][0]["EVENT_ADDITIONAL"],
        json!({"user_id": "1"})
    );
    let (_, sourced) = get(json!({"clear": 0, "auth_connector": "b24pipeline"})).await;
    assert_eq!(
        sourced["result"]["events"].as_array().map(Vec::len),
        Some(2)
    );
    // Filters and order, as documented (operator before the field name).
    let (_, list) = call(
        &http,
        "event.offline.list",
        &admin,
        json!({"filter": {"=ERROR": "0"}, "order": {"ID": "DESC"}}),
    )
    .await;
    assert_eq!(list["total"], 2, "{list}");
    assert!(list["result"][0]["PROCESS_ID"]
        .as_str()
        .is_some_and(|p| p.len() == 32));
    // One ONOFFLINEEVENT within minTimeout, with its tokens.
    let notices = app.got("/notice");
    assert_eq!(notices.len(), 1, "{notices:#?}");
    assert_eq!(notices[0].body["event"], "ONOFFLINEEVENT");
    assert!(notices[0].body["auth"]["refresh_token"].is_string());
}

#[tokio::test]
async fn opening_a_widget_posts_the_users_own_call() {
    let (portal, http, app, _) = installed(&["ONAPPINSTALL"]).await;
    let (admin, _) = portal.issue_tokens();
    call(
        &http,
        "placement.bind",
        &admin,
        json!({"PLACEMENT": "CRM_DYNAMIC_183_DETAIL_ACTIVITY", "HANDLER": app.url("/placement")}),
    )
    .await;
    let guest = portal.add_user(UserSpec::extranet());
    let report = portal
        .open_placement("CRM_DYNAMIC_183_DETAIL_ACTIVITY", json!({"ID": "3"}), guest)
        .await;
    assert!(report[0].delivered(), "{report:?}");
    let got = &app.got("/placement")[0];
    assert_eq!(got.query["DOMAIN"], json!(portal.domain()));
    assert_eq!(got.body["PLACEMENT"], "CRM_DYNAMIC_183_DETAIL_ACTIVITY");
    assert_eq!(got.body["PLACEMENT_OPTIONS"], r#"{"ID":"3"}"#);
    let token = got.body["AUTH_ID"].as_str().unwrap_or_default();
    assert_eq!(
        call(
            &http,
            "crm.item.get",
            token,
            json!({"entityTypeId": 183, "id": 3})
        )
        .await
        .0,
        403,
        "the widget's token is the extranet user's"
    );
    assert!(portal
        .open_placement("CRM_DEAL_DETAIL_ACTIVITY", json!({"ID": "1"}), guest)
        .await
        .is_empty());
}

#[test]
fn the_page_reader_takes_script_text_as_the_browser_does() {
    let page = "<p>BX24.callBind('ONCRMDEALADD','http://text/not/script')</p>\
         <SCRIPT SRC=\"//api.bitrix24.com/api/v1/?x=1&amp;y=2\"></SCRIPT>\
         <script>BX24.callBind( \"ONAPPINSTALL\" , 'http://h/ev\\u0065nts?a=1\\x26b=\\'2\\'' , 7 );\
         BX24.callBind('ONAPPUPDATE', \"http://h/a&amp;b\", function(){});\
         BX24.callBind('ONAPPTEST', url);BX24.installFinish();</script>";
    let scan = scan_page(page);
    assert!(scan.library && scan.finish);
    assert_eq!(
        scan.binds,
        [
            BindCall {
                event: "ONAPPINSTALL".into(),
                handler: "http://h/events?a=1&b='2'".into(),
                auth_type: Some("7".into()),
            },
            // Entities are not decoded inside <script>.
            BindCall {
                event: "ONAPPUPDATE".into(),
                handler: "http://h/a&amp;b".into(),
                auth_type: None,
            },
        ]
    );
    assert_eq!(scan.unresolved.len(), 1);
    assert_eq!(
        js_literal(r#"'\ud83d\ude00\u{1F600}\0'"#).map(|(s, _)| s),
        Some("😀😀\0".into())
    );
    assert_eq!(js_literal("'unterminated"), None);
    assert_eq!(js_literal("'a\nb'"), None);
    assert!(!scan_page("<script src=\"http://evil/api.bitrix24.com/api/v1/\"></script>").library);
}
