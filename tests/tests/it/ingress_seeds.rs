use b24_shared::EnvelopeKind;
use b24_tests::fixtures;
use b24_tests::http::{FORM, JSON};
use b24_tests::phpform::{http_build_query, stringify};
use b24_tests::spawn::TestIngress;
use http::StatusCode;
use serde_json::Value;

fn expected_kind(path: &str) -> EnvelopeKind {
    match path {
        "/events" => EnvelopeKind::Event,
        "/placement" => EnvelopeKind::Placement,
        _ => EnvelopeKind::Install,
    }
}

fn expected_code(path: &str, payload: &Value) -> String {
    match path {
        "/events" => payload["event"].as_str().unwrap().to_ascii_uppercase(),
        "/placement" => payload["PLACEMENT"].as_str().unwrap().to_string(),
        _ => "INSTALL".to_string(),
    }
}

fn expected_member(path: &str, payload: &Value) -> Option<String> {
    let m = if path == "/events" {
        &payload["auth"]["member_id"]
    } else {
        &payload["member_id"]
    };
    m.as_str().map(str::to_string)
}

/// What the queue holds of a decoded payload: all of it but the OAuth tokens its
/// handler does not use (only installation calls keep theirs; widget calls keep AUTH_ID).
fn queued(path: &str, decoded: &Value) -> Value {
    let mut v = decoded.clone();
    match path {
        "/events" => {
            let code = expected_code(path, decoded);
            if !["ONAPPINSTALL", "ONAPPUPDATE"].contains(&code.as_str()) {
                if let Some(auth) = v["auth"].as_object_mut() {
                    auth.remove("access_token");
                    auth.remove("refresh_token");
                }
            }
        }
        "/placement" => {
            v.as_object_mut().unwrap().remove("REFRESH_ID");
        }
        _ => {}
    }
    v
}

#[tokio::test]
async fn every_seed_payload_lands_in_the_work_queue_as_its_envelope_form_and_json() {
    let ingress = TestIngress::spawn("seeds", &[]).await;
    let seeds = fixtures::all_seeds();
    let mut sent = Vec::new();
    for (path, payload) in &seeds {
        for (ct, body, decoded) in [
            (FORM, http_build_query(payload), stringify(payload)),
            (JSON, payload.to_string(), payload.clone()),
        ] {
            let a = ingress.http.post(path, Some(ct), body).await.unwrap();
            assert_eq!(a.status, StatusCode::OK, "{path} {ct}: {}", a.body);
            sent.push((*path, decoded));
        }
    }
    let got = ingress.work_messages().await;
    assert_eq!(got.len(), sent.len(), "one message per accepted request");
    // One channel, confirms in order: the queue holds them in the order they were sent.
    for (env, (path, decoded)) in got.iter().zip(&sent) {
        assert_eq!(env.kind, expected_kind(path));
        assert_eq!(env.event, expected_code(path, decoded));
        assert_eq!(
            env.member_id.as_ref().map(|m| m.as_str().to_string()),
            expected_member(path, decoded)
        );
        assert_eq!(
            env.payload,
            queued(path, decoded),
            "{path}: payload kept whole but for the tokens its handler does not use"
        );
        assert_eq!(env.id.get_version_num(), 7);
    }
    // The payment seed has no member_id: its portal is known by domain.
    let payment = got.iter().find(|e| e.event == "ONAPPPAYMENT").unwrap();
    assert_eq!(payment.domain.as_deref(), Some("some-domain.bitrix24.com"));
    ingress.finish().await;
}

#[tokio::test]
async fn placement_answers_an_escaped_html_page_after_queueing() {
    let ingress = TestIngress::spawn("placement", &[]).await;
    let mut call = fixtures::placements()[1].clone();
    call["DOMAIN"] = Value::String("<script>alert(1)</script>.bitrix24.com".into());
    let a = ingress.post_form("/placement", &call).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(a.body.contains("CRM_DEAL_DETAIL_ACTIVITY"));
    assert!(a.body.contains("#3473"));
    assert!(!a.body.contains("<script>alert"), "{}", a.body);
    assert!(a.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert_eq!(ingress.work_messages().await.len(), 1);
    ingress.finish().await;
}

#[tokio::test]
async fn install_page_finishes_installation_after_queueing() {
    let ingress = TestIngress::spawn("install", &[]).await;
    // Bitrix24 puts DOMAIN, PROTOCOL, LANG and APP_SID in the query string.
    let mut body = fixtures::install();
    let obj = body.as_object_mut().unwrap();
    for k in ["DOMAIN", "PROTOCOL", "LANG", "APP_SID"] {
        obj.remove(k);
    }
    let a = ingress
        .post_form(
            "/install?DOMAIN=some-domain.bitrix24.com&PROTOCOL=1&LANG=en&APP_SID=abc",
            &body,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(a.body.contains("BX24.installFinish()"));
    let got = ingress.work_messages().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].kind, EnvelopeKind::Install);
    assert_eq!(got[0].payload["DOMAIN"], "some-domain.bitrix24.com");
    assert_eq!(got[0].payload["AUTH_ID"], body["AUTH_ID"]);
    ingress.finish().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let ingress = TestIngress::spawn("health", &[]).await;
    assert_eq!(
        ingress.http.get("/healthz").await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        ingress.http.get("/readyz").await.unwrap().status,
        StatusCode::OK
    );
    ingress
        .post_form("/events", &fixtures::requisite_add())
        .await;
    ingress
        .http
        .post("/events", Some("text/plain"), "x")
        .await
        .unwrap();
    let m = ingress.metrics().await;
    assert!(
        m.contains(r#"b24_ingress_requests_total{route="events",status="200"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"b24_ingress_requests_total{route="events",status="415"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"b24_ingress_rejections_total{reason="content_type"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"b24_ingress_publish_confirm_seconds_count{outcome="confirmed"} 1"#),
        "{m}"
    );
    assert!(
        !m.contains("s6p6eclrvim6da22ft9ch94ekreb52lv"),
        "no token in metrics"
    );
    ingress.finish().await;
}

#[tokio::test]
async fn events_are_accepted_when_the_portals_database_is_unreachable() {
    // The worker verifies again; refusing would lose an event Bitrix24 never resends.
    let ingress = TestIngress::spawn(
        "dbdown",
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere")],
    )
    .await;
    let a = ingress
        .post_form("/events", &fixtures::requisite_add())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(ingress.work_messages().await.len(), 1);
    ingress.finish().await;
}
