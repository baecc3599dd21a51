//! The simulated portal against a real HTTP client: what the worker will meet.

use super::*;
use crate::http::{HttpClient, FORM, JSON};
use crate::phpform::http_build_query;

pub(super) async fn portal_with(tune: impl FnOnce(&mut PortalConfig)) -> (SimPortal, HttpClient) {
    let mut cfg = PortalConfig::default();
    tune(&mut cfg);
    let portal = SimPortal::start(cfg).await;
    let http = HttpClient::new(portal.addr());
    (portal, http)
}

/// A client of the portal's OAuth server (another port, as another host).
pub(super) fn oauth_http(portal: &SimPortal) -> HttpClient {
    HttpClient::new(portal.oauth_addr())
}

pub(super) fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

pub(super) async fn get(http: &HttpClient, path: &str) -> (u16, Value) {
    let a = http.get(path).await.expect("portal answers");
    (a.status.as_u16(), parse(&a.body))
}

pub(super) async fn post_json(http: &HttpClient, path: &str, body: Value) -> (u16, Value, String) {
    let a = http
        .post(path, Some(JSON), body.to_string())
        .await
        .expect("portal answers");
    (a.status.as_u16(), parse(&a.body), a.body)
}

pub(super) fn refresh_path(portal: &SimPortal, refresh: &str) -> String {
    format!(
        "/oauth/token/?grant_type=refresh_token&client_id={}&client_secret={}&refresh_token={refresh}",
        portal.client_id(),
        portal.client_secret()
    )
}

#[tokio::test]
async fn bucket_answers_503_beyond_the_burst_and_recovers_at_the_rate() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    let path = format!("/rest/app.info?auth={access}");

    let started = Instant::now();
    let mut ok = 0;
    for _ in 0..60 {
        let (status, body) = get(&http, &path).await;
        match status {
            200 => ok += 1,
            503 => assert_eq!(
                body,
                json!({"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"})
            ),
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    // Exactly the burst, plus whatever drained while the loop ran (nothing, usually).
    let drained = (started.elapsed().as_secs_f64() * 2.0).floor() as usize;
    assert!(
        (50..=50 + drained).contains(&ok),
        "{ok} admitted, {drained} drained"
    );
    let refused = portal.calls().iter().filter(|c| c.status == 503).count();
    assert_eq!(refused, 60 - ok);
    assert!(
        portal.bucket_level() <= 50.0,
        "refused requests are not counted"
    );

    // 1.25 s later at least 2.5 units have drained: two more requests fit. Over the
    // whole test no more than burst + rate × elapsed can ever have been admitted, so on
    // any machine that is not crawling the third is refused.
    tokio::time::sleep(Duration::from_millis(1250)).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(get(&http, &path).await.0);
    }
    let admitted = ok + statuses.iter().filter(|s| **s == 200).count();
    let ceiling = 50 + (started.elapsed().as_secs_f64() * 2.0).floor() as usize;
    assert!(
        admitted >= 52 && admitted <= ceiling,
        "{admitted} admitted, ceiling {ceiling}"
    );
    assert_eq!(statuses[..2], [200, 200]);
    if ceiling < 53 {
        assert_eq!(statuses[2], 503);
    }
}

#[tokio::test]
async fn refresh_is_single_use_and_kills_the_access_token_issued_with_it() {
    let (portal, http) = portal_with(|_| {}).await;
    let oauth = oauth_http(&portal);
    let (a1, r1) = portal.issue_tokens();
    let (other_access, _) = portal.issue_tokens();
    assert_eq!(
        get(&http, &format!("/rest/app.info?auth={a1}")).await.0,
        200
    );

    let (status, pair) = get(&oauth, &refresh_path(&portal, &r1)).await;
    assert_eq!(status, 200, "{pair}");
    assert_eq!(pair["member_id"], json!(portal.member_id()));
    assert_eq!(pair["expires_in"], 3600);
    // The authorization server's own domain and endpoint, never the portal's.
    assert_eq!(pair["domain"], json!(portal.oauth_domain()));
    assert_ne!(pair["domain"], json!(portal.domain()));
    assert_eq!(pair["server_endpoint"], json!(portal.server_endpoint()));
    assert_eq!(pair["client_endpoint"], json!(portal.client_endpoint()));
    assert_eq!(
        (pair["user_id"].clone(), pair["status"].clone()),
        (json!(1), json!("L"))
    );
    assert_eq!(pair["scope"], "crm,placement");
    // The portal itself has no token endpoint.
    assert_eq!(get(&http, &refresh_path(&portal, &r1)).await.0, 404);
    let a2 = pair["access_token"].as_str().unwrap_or_default().to_owned();
    let r2 = pair["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(a2.len() == 32 && r2.len() == 32 && a2 != a1 && r2 != r1);

    let (status, body) = get(&http, &format!("/rest/app.info?auth={a1}")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    assert_eq!(
        get(&http, &format!("/rest/app.info?auth={a2}")).await.0,
        200
    );
    assert_eq!(
        get(&http, &format!("/rest/app.info?auth={other_access}"))
            .await
            .0,
        200,
        "other pairs live on"
    );

    let (status, body) = get(&oauth, &refresh_path(&portal, &r1)).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "Invalid refresh token"})
    );
    assert_eq!(portal.refresh_count(), 1);

    let wrong = format!(
        "/oauth/token/?grant_type=refresh_token&client_id=x&client_secret=y&refresh_token={r2}"
    );
    let (status, body) = get(&oauth, &wrong).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );

    // A form POST works too, and r2 was not spent by the refused attempt.
    let form = format!(
        "grant_type=refresh_token&client_id={}&client_secret={}&refresh_token={r2}",
        portal.client_id(),
        portal.client_secret()
    );
    let a = oauth
        .post("/oauth/token/", Some(FORM), form)
        .await
        .expect("answers");
    assert_eq!(a.status.as_u16(), 200, "{}", a.body);
    assert_eq!(portal.refresh_count(), 2);
    let oauth_calls: Vec<_> = portal
        .calls()
        .into_iter()
        .filter(|c| c.kind == CallKind::OAuth)
        .collect();
    assert_eq!(oauth_calls.len(), 4);
    assert!(oauth_calls
        .iter()
        .all(|c| c.params.get("client_secret").is_none()));
}

#[tokio::test]
async fn expired_access_token_answers_401_expired_token_until_refreshed() {
    let (portal, http) = portal_with(|c| c.token_ttl = Duration::from_millis(300)).await;
    let (access, refresh) = portal.issue_tokens();
    portal.expire_access_tokens();
    let (status, body) = get(&http, &format!("/rest/app.info?auth={access}")).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"error": "expired_token", "error_description": "The access token provided has expired."})
    );

    let (_, pair) = get(&oauth_http(&portal), &refresh_path(&portal, &refresh)).await;
    let fresh = pair["access_token"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        get(&http, &format!("/rest/app.info?auth={fresh}")).await.0,
        200
    );

    // And by age: the configured lifetime.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (status, body) = get(&http, &format!("/rest/app.info?auth={fresh}")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("expired_token"))
    );
}

#[tokio::test]
async fn auth_is_read_from_body_query_or_bearer_header_and_its_absence_is_no_auth_found() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();

    let (status, body) = get(&http, "/rest/app.info").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("NO_AUTH_FOUND"))
    );
    let (status, body) = get(&http, "/rest/app.info?auth=nonsense").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );

    let (status, body, _) = post_json(
        &http,
        "/rest/crm.deal.get.json",
        json!({"id": 6799, "auth": access}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["result"], data::deal(6799));
    let time = &body["time"];
    assert!(
        time["operating"].is_number() && time["operating_reset_at"].is_u64(),
        "{time}"
    );
    assert!(time["date_start"]
        .as_str()
        .is_some_and(|d| d.ends_with("+03:00")));

    let form = http_build_query(&json!({"id": "9", "auth": access}));
    let a = http
        .post("/rest/crm.deal.recurring.get", Some(FORM), form)
        .await
        .expect("answers");
    assert_eq!(parse(&a.body)["result"]["DEAL_ID"], "6791");

    let req = Request::post(format!("http://{}/rest/crm.item.get", portal.addr()))
        .header(AUTHORIZATION, format!("Bearer {access}"))
        .header(CONTENT_TYPE, JSON)
        .body(Full::new(Bytes::from(
            json!({"entityTypeId": 2, "id": 5}).to_string(),
        )))
        .expect("request builds");
    let a = http.send(req).await.expect("answers");
    assert_eq!(parse(&a.body)["result"]["item"]["entityTypeId"], 2);

    // JSON without a JSON content type is not read, as PHP would not read it.
    let a = http
        .post("/rest/app.info", None, json!({"auth": access}).to_string())
        .await
        .expect("answers");
    assert_eq!(parse(&a.body)["error"], "NO_AUTH_FOUND");

    let recorded = portal.calls();
    let deal_call = recorded
        .iter()
        .find(|c| c.method == "crm.deal.get")
        .expect("recorded");
    assert_eq!(deal_call.params, json!({"id": 6799}));
    assert_eq!(deal_call.token.as_deref(), Some(access.as_str()));
}

#[tokio::test]
async fn entities_can_be_missing_and_unknown_methods_are_404() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    portal.set_missing("crm.deal.get", 404);
    portal.set_missing("crm.item.get", 7);

    let (status, body, _) = post_json(
        &http,
        "/rest/crm.deal.get",
        json!({"id": "404", "auth": access}),
    )
    .await;
    assert_eq!(
        (status, body),
        (400, json!({"error": "", "error_description": "Not found"}))
    );
    let (status, body, _) = post_json(
        &http,
        "/rest/crm.deal.get",
        json!({"id": "x", "auth": access}),
    )
    .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some("ID is not defined or invalid."))
    );
    let (status, body, _) = post_json(
        &http,
        "/rest/crm.item.get",
        json!({"entityTypeId": 3, "id": 7, "auth": access}),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("NOT_FOUND")));
    let (status, body, _) = post_json(
        &http,
        "/rest/crm.item.get",
        json!({"entityTypeId": 5, "id": 1, "auth": access}),
    )
    .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some("SPA not found"))
    );
    let (status, body, _) = post_json(&http, "/rest/crm.deal.list", json!({"auth": access})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("ERROR_METHOD_NOT_FOUND"))
    );

    assert_eq!(
        portal.expected("crm.requisite.get", json!({"id": 3})),
        Ok(data::requisite(3))
    );
    assert!(portal.expected("crm.deal.get", json!({"id": 404})).is_err());
    portal.set_app_info(json!({"STATUS": "P", "PAYMENT_EXPIRED": "Y", "DAYS": -3}));
    let (_, body) = get(&http, &format!("/rest/app.info?auth={access}")).await;
    assert_eq!(
        (
            body["result"]["STATUS"].as_str(),
            body["result"]["DAYS"].as_i64()
        ),
        (Some("P"), Some(-3))
    );
    assert_eq!(body["result"]["CODE"], json!(portal.client_id()));
}

#[tokio::test]
async fn batch_with_one_failing_command_gives_result_and_result_error() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    portal.set_missing("crm.deal.get", 404);
    let cmd = json!({"a": "crm.deal.get?id=1", "b": "crm.deal.get?id=404", "c": "crm.deal.recurring.get?id=9"});
    let (status, body, _) = post_json(
        &http,
        "/rest/batch",
        json!({"halt": 0, "cmd": cmd, "auth": access}),
    )
    .await;
    assert_eq!(status, 200);
    let r = &body["result"];
    assert_eq!(r["result"]["a"], data::deal(1));
    assert_eq!(r["result"]["c"]["DEAL_ID"], "6791");
    assert!(r["result"].get("b").is_none());
    assert_eq!(
        r["result_error"],
        json!({"b": {"error": "", "error_description": "Not found"}})
    );
    assert_eq!(
        (r["result_total"].clone(), r["result_next"].clone()),
        (json!([]), json!([]))
    );
    // The documentation's result_time entries have no operating fields.
    let a_time = &r["result_time"]["a"];
    assert!(a_time["processing"].is_number() && a_time["date_start"].is_string());
    assert!(
        a_time.get("operating").is_none() && a_time.get("operating_reset_at").is_none(),
        "{a_time}"
    );
    assert!(
        body["time"].get("operating").is_none(),
        "batch itself is not counted"
    );

    // halt stops at the first error.
    let (_, body, _) = post_json(
        &http,
        "/rest/batch",
        json!({"halt": 1, "cmd": cmd, "auth": access}),
    )
    .await;
    let r = &body["result"];
    assert_eq!(r["result"], json!({"a": data::deal(1)}));
    assert!(r["result_error"].get("b").is_some() && r["result"].get("c").is_none());
}

#[tokio::test]
async fn batch_without_errors_writes_result_error_as_an_empty_array() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    // A PHP form body with a list of commands: the results come back as a list.
    let form = http_build_query(&json!({
        "halt": "0",
        "cmd": ["crm.deal.get?id=5", "crm.item.get?entityTypeId=2&id=5", "app.info"],
        "auth": access,
    }));
    let a = http
        .post("/rest/batch.json", Some(FORM), form)
        .await
        .expect("answers");
    assert_eq!(a.status.as_u16(), 200, "{}", a.body);
    assert!(a.body.contains(r#""result_error":[]"#), "{}", a.body);
    let r = &parse(&a.body)["result"];
    assert_eq!(r["result"][0]["ID"], "5");
    assert_eq!(r["result"][1]["item"]["id"], 5);
    assert_eq!(r["result"][2]["CODE"], json!(portal.client_id()));
    assert_eq!(r["result_time"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn batch_counts_once_in_the_bucket_and_each_command_is_recorded() {
    let (portal, http) = portal_with(|c| {
        c.burst = 3.0;
        c.rate_per_sec = 0.0;
    })
    .await;
    let (access, _) = portal.issue_tokens();
    let cmd: serde_json::Map<String, Value> = (0..50)
        .map(|i| (format!("d{i}"), json!(format!("crm.deal.get?id={}", i + 1))))
        .collect();
    let (status, body, _) =
        post_json(&http, "/rest/batch", json!({"cmd": cmd, "auth": access})).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["result"]["result"].as_object().map(|o| o.len()),
        Some(50)
    );
    assert!((portal.bucket_level() - 1.0).abs() < 1e-9);

    let calls = portal.calls();
    assert_eq!(calls.iter().filter(|c| c.is_http()).count(), 1);
    assert_eq!(calls[0].batch_size, Some(50));
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.kind == CallKind::BatchCommand)
            .count(),
        50
    );
    assert_eq!(calls[1].params, json!({"id": "1"}));

    let path = format!("/rest/app.info?auth={access}");
    assert_eq!(get(&http, &path).await.0, 200);
    assert_eq!(get(&http, &path).await.0, 200);
    assert_eq!(get(&http, &path).await.0, 503);
}

#[tokio::test]
async fn batch_refuses_nesting_and_commands_beyond_fifty() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    let mut cmd: Vec<Value> = (0..51)
        .map(|i| json!(format!("crm.requisite.get?id={}", i + 1)))
        .collect();
    cmd[1] = json!("batch?cmd[x]=app.info");
    let (status, body, _) =
        post_json(&http, "/rest/batch", json!({"cmd": cmd, "auth": access})).await;
    assert_eq!(status, 200);
    let errors = &body["result"]["result_error"];
    assert_eq!(errors["1"]["error"], "ERROR_BATCH_METHOD_NOT_ALLOWED");
    assert_eq!(errors["50"]["error"], "ERROR_BATCH_LENGTH_EXCEEDED");
    assert_eq!(
        body["result"]["result"].as_object().map(|o| o.len()),
        Some(49)
    );

    // A bad token fails the whole batch, before any command.
    let (status, body, _) = post_json(
        &http,
        "/rest/batch",
        json!({"cmd": ["app.info"], "auth": "gone"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
}

#[tokio::test]
async fn operating_budget_blocks_a_method_with_429_until_reset() {
    let (portal, http) = portal_with(|c| {
        c.operating_budget = Duration::from_millis(50);
        c.cost_per_call = Duration::from_millis(20);
    })
    .await;
    let (access, _) = portal.issue_tokens();
    let deal = format!("/rest/crm.deal.get?id=1&auth={access}");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(&http, &deal).await.0);
    }
    // 0.02, 0.04, 0.06: the call that crosses the limit runs, the next is refused.
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(
        get(
            &http,
            &format!("/rest/crm.requisite.get?id=1&auth={access}")
        )
        .await
        .0,
        200
    );

    portal.exhaust_method("crm.requisite.get", Duration::from_millis(200));
    let (status, body) = get(
        &http,
        &format!("/rest/crm.requisite.get?id=1&auth={access}"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("OPERATION_TIME_LIMIT"))
    );
    // Inside a batch it is the command that fails.
    let (status, body, _) = post_json(
        &http,
        "/rest/batch",
        json!({"cmd": {"r": "crm.requisite.get?id=1"}, "auth": access}),
    )
    .await;
    assert_eq!(
        (
            status,
            body["result"]["result_error"]["r"]["error"].as_str()
        ),
        (200, Some("OPERATION_TIME_LIMIT"))
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (status, body) = get(
        &http,
        &format!("/rest/crm.requisite.get?id=1&auth={access}"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn failure_switches_answer_as_asked_then_stop() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    let path = format!("/rest/app.info?auth={access}");

    portal.fail_next(2, 500, "INTERNAL_SERVER_ERROR");
    let (status, body) = get(&http, &path).await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (500, Some("Internal server error"))
    );
    assert_eq!(get(&http, &path).await.0, 500);
    assert_eq!(get(&http, &path).await.0, 200);

    portal.fail_next_raw(1, 502, "<html>Bad Gateway</html>");
    let a = http.get(&path).await.expect("answers");
    assert_eq!(
        (a.status.as_u16(), a.body.as_str()),
        (502, "<html>Bad Gateway</html>")
    );

    portal.drop_next(1);
    assert!(
        http.get(&path).await.is_err(),
        "connection closed without an answer"
    );
    assert_eq!(get(&http, &path).await.0, 200);

    portal.fail_method("crm.deal.get", 1, 500, "ERROR_UNEXPECTED_ANSWER");
    let (_, body, _) = post_json(
        &http,
        "/rest/batch",
        json!({"cmd": {"x": "crm.deal.get?id=1", "y": "crm.deal.get?id=2"}, "auth": access}),
    )
    .await;
    assert_eq!(
        body["result"]["result_error"]["x"]["error"],
        "ERROR_UNEXPECTED_ANSWER"
    );
    assert_eq!(body["result"]["result"]["y"]["ID"], "2");

    portal.set_delay(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(get(&http, &path).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    portal.set_delay(Duration::ZERO);

    portal.fail_next_oauth(1, 503, "INTERNAL_SERVER_ERROR");
    let (_, refresh) = portal.issue_tokens();
    let oauth = oauth_http(&portal);
    assert_eq!(get(&oauth, &refresh_path(&portal, &refresh)).await.0, 503);
    assert_eq!(get(&oauth, &refresh_path(&portal, &refresh)).await.0, 200);
}

#[tokio::test]
async fn a_moved_portal_redirects_and_serves_at_its_new_address() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, refresh) = portal.issue_tokens();
    let moved = format!("http://localhost:{}/rest/", portal.addr().port());
    portal.redirect_to(Some(moved.clone()));

    let a = http
        .get(&format!("/rest/crm.deal.get?id=3&auth={access}"))
        .await
        .expect("answers");
    assert_eq!(a.status.as_u16(), 302);
    let location = a
        .headers
        .get(LOCATION)
        .and_then(|l| l.to_str().ok())
        .unwrap_or_default();
    assert_eq!(location, format!("{moved}crm.deal.get?id=3&auth={access}"));

    let req = Request::get(format!(
        "http://{}/rest/crm.deal.get?id=3&auth={access}",
        portal.addr()
    ))
    .header(HOST, format!("localhost:{}", portal.addr().port()))
    .body(Full::new(Bytes::new()))
    .expect("request builds");
    let a = http.send(req).await.expect("answers");
    assert_eq!(
        (a.status.as_u16(), parse(&a.body)["result"]["ID"].clone()),
        (200, json!("3"))
    );

    let (_, pair) = get(&oauth_http(&portal), &refresh_path(&portal, &refresh)).await;
    assert_eq!(pair["client_endpoint"], json!(moved));
    portal.redirect_to(None);
    assert_eq!(
        get(&http, &format!("/rest/app.info?auth={access}")).await.0,
        401,
        "refreshed away"
    );
}

#[tokio::test]
async fn offline_events_are_reserved_under_a_process_id_until_cleared() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    let first = portal.push_offline("onCrmDealUpdate", json!({"FIELDS": {"ID": "1"}}));
    portal.push_offline("ONCRMDEALUPDATE", json!({"FIELDS": {"ID": "2"}}));
    assert_eq!(
        portal.push_offline("ONCRMDEALUPDATE", json!({"FIELDS": {"ID": "1"}})),
        first,
        "one record per object"
    );
    assert_eq!(portal.offline_queue().len(), 2);

    let call = |params: Value| {
        let http = http.clone();
        let access = access.clone();
        async move {
            let mut p = params;
            p["auth"] = json!(access);
            let (status, body, _) = post_json(&http, "/rest/event.offline.get", p).await;
            assert_eq!(status, 200, "{body}");
            body["result"].clone()
        }
    };
    let got = call(json!({"clear": 0, "limit": 10})).await;
    let pid = got["process_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(pid.len(), 32);
    assert_eq!(got["events"].as_array().map(Vec::len), Some(2));
    // The ID-2 record comes first: the repeat of ID 1 moved its timestamp.
    assert_eq!(got["events"][0]["EVENT_DATA"]["FIELDS"]["ID"], "2");
    assert_eq!(got["events"][1]["MESSAGE_ID"], json!(first));
    assert_eq!(
        call(json!({"clear": 0})).await["events"],
        json!([]),
        "reserved records are hidden"
    );
    assert_eq!(
        call(json!({"clear": 0, "process_id": pid})).await["events"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    let (_, body, _) = post_json(
        &http,
        "/rest/event.offline.error",
        json!({"process_id": pid, "message_id": [first], "auth": access}),
    )
    .await;
    assert_eq!(body["result"], true);
    let (_, body, _) = post_json(
        &http,
        "/rest/event.offline.clear",
        json!({"process_id": pid, "auth": access}),
    )
    .await;
    assert_eq!(body["result"], true);
    let queue = portal.offline_queue();
    assert_eq!(queue.len(), 1);
    assert_eq!(
        (queue[0]["MESSAGE_ID"].clone(), queue[0]["ERROR"].clone()),
        (json!(first), json!("1"))
    );
    let errored = call(json!({"error": 1})).await;
    assert_eq!(
        (
            errored["process_id"].clone(),
            errored["events"][0]["MESSAGE_ID"].clone()
        ),
        (Value::Null, json!(first))
    );
    assert!(
        portal.offline_queue().is_empty(),
        "clear=1 deletes what it hands out"
    );

    let (status, body, _) =
        post_json(&http, "/rest/event.offline.clear", json!({"auth": access})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("ERROR_ARGUMENT"))
    );
}

#[tokio::test]
async fn bindings_are_recorded_listed_and_refused_twice() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    let bind = json!({"event": "onCrmDealRecurringExpose", "handler": "http://app/events", "auth": access});
    assert_eq!(
        post_json(&http, "/rest/event.bind", bind.clone()).await.1["result"],
        true
    );
    let (status, body, _) = post_json(&http, "/rest/event.bind", bind).await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some("Handler already binded"))
    );
    let offline = json!({"event": "ONCRMDEALUPDATE", "event_type": "offline", "auth": access});
    assert_eq!(
        post_json(&http, "/rest/event.bind", offline).await.1["result"],
        true
    );
    let (_, body, _) = post_json(&http, "/rest/event.get", json!({"auth": access})).await;
    assert_eq!(
        body["result"][0],
        json!({"event": "ONCRMDEALRECURRINGEXPOSE", "handler": "http://app/events", "auth_type": "0", "offline": 0})
    );
    assert_eq!(body["result"][1]["offline"], 1);
    let (status, body, _) = post_json(
        &http,
        "/rest/event.bind",
        json!({"event": "ONCRMDEALADD", "auth": access}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("ERROR_ARGUMENT"))
    );
    let (status, body, _) = post_json(
        &http,
        "/rest/event.bind",
        json!({"event": "ONX", "handler": "http://app/events", "auth": access}),
    )
    .await;
    assert_eq!(
        (status, body),
        (
            400,
            json!({"error": "ERROR_EVENT_NOT_FOUND", "error_description": "Event not found"})
        )
    );

    let placement = json!({"PLACEMENT": "CRM_DEAL_DETAIL_ACTIVITY", "HANDLER": "http://app/placement", "TITLE": "Pipeline", "auth": access});
    assert_eq!(
        post_json(&http, "/rest/placement.bind", placement.clone())
            .await
            .1["result"],
        true
    );
    assert_eq!(
        post_json(&http, "/rest/placement.bind", placement).await.1["error"],
        "ERROR_CORE"
    );
    let listed = portal.placement_bindings();
    assert_eq!(
        (listed.len(), listed[0]["title"].clone()),
        (1, json!("Pipeline"))
    );
    assert_eq!(portal.event_bindings().len(), 2);
}

#[tokio::test]
async fn garbage_never_takes_the_portal_down() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    let bodies: Vec<(Option<&str>, Vec<u8>)> = vec![
        (Some(JSON), b"{not json".to_vec()),
        (Some(JSON), b"[1,2,3]".to_vec()),
        (
            Some(JSON),
            format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
        ),
        (
            Some(FORM),
            format!("cmd{}=1", "[a]".repeat(5000)).into_bytes(),
        ),
        (Some(FORM), vec![0xff, 0xfe, b'=', 0x00, b'&', b'[', b']']),
        (None, (0..=255u8).collect()),
        (
            Some(FORM),
            format!("cmd[a]=batch%3Fcmd[b]=x&cmd[]=&cmd[c][d]=1&halt=yes&auth={access}")
                .into_bytes(),
        ),
    ];
    for path in [
        "/rest/batch",
        "/rest/",
        "/rest/%00",
        "/x/rest/a/b/c",
        "/oauth/token/",
        "/nowhere",
    ] {
        for (ct, body) in &bodies {
            let a = http
                .post(path, *ct, body.clone())
                .await
                .expect("an answer, not a dropped connection");
            assert!(a.status.as_u16() >= 200, "{path}");
        }
    }
    assert_eq!(http.get("/healthz").await.expect("answers").body, "ok");
    assert!(portal.calls().len() >= bodies.len());
}

/// A REST call with `token`: (status, body).
pub(super) async fn call(
    http: &HttpClient,
    method: &str,
    token: &str,
    mut params: Value,
) -> (u16, Value) {
    params["auth"] = json!(token);
    let (status, body, _) = post_json(http, &format!("/rest/{method}"), params).await;
    (status, body)
}

#[tokio::test]
async fn parameter_names_are_matched_exactly_as_documented() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, refresh) = portal.issue_tokens();
    // crm.deal.get reads `id`; `ID` is a parameter it does not read.
    let (status, body) = call(&http, "crm.deal.get", &access, json!({"ID": 5})).await;
    assert_eq!(
        (status, body),
        (
            400,
            json!({"error": "", "error_description": "ID is not defined or invalid."})
        )
    );
    assert_eq!(
        call(&http, "crm.deal.get", &access, json!({"id": 5}))
            .await
            .1["result"]["ID"],
        "5"
    );
    let (status, body) = call(
        &http,
        "crm.item.get",
        &access,
        json!({"entitytypeid": 2, "id": 5}),
    )
    .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some("SPA not found"))
    );
    let (status, body) = call(&http, "crm.requisite.get", &access, json!({"Id": 3})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(
        &http,
        "event.bind",
        &access,
        json!({"EVENT": "ONCRMDEALADD", "HANDLER": "http://app/events"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("ERROR_ARGUMENT"))
    );
    // Inside a batch too.
    let (_, body) = call(
        &http,
        "batch",
        &access,
        json!({"cmd": {"a": "crm.deal.get?ID=1", "b": "crm.deal.get?id=1"}}),
    )
    .await;
    assert_eq!(
        body["result"]["result_error"]["a"]["error_description"],
        "ID is not defined or invalid."
    );
    assert_eq!(body["result"]["result"]["b"]["ID"], "1");
    // The OAuth server reads its parameters by name too.
    let shouting = format!(
        "/oauth/token/?GRANT_TYPE=refresh_token&client_id={}&client_secret={}&refresh_token={refresh}",
        portal.client_id(),
        portal.client_secret()
    );
    let (status, body) = get(&oauth_http(&portal), &shouting).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn placement_bind_answers_its_documented_errors_with_http_200() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    let (status, body) = call(
        &http,
        "placement.bind",
        &access,
        json!({"placement": "CRM_DEAL_DETAIL_ACTIVITY", "HANDLER": "http://app/placement"}),
    )
    .await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"error": "ERROR_ARGUMENT", "error_description": "Argument 'PLACEMENT' is null or empty", "argument": "PLACEMENT"})
        )
    );
    let (status, body) = call(
        &http,
        "placement.bind",
        &access,
        json!({"PLACEMENT": "CRM_DEAL_DETAIL_ACTIVITY", "HANDLER": "http://app/placement", "USER_ID": 1}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (200, Some("ERROR_PLACEMENT_USER_MODE"))
    );
    let recorded = portal.calls();
    assert_eq!(
        (recorded[0].status, recorded[0].error.as_deref()),
        (200, Some("ERROR_ARGUMENT"))
    );
    // A widget of a smart process the portal does not have.
    let (status, body) = call(
        &http,
        "placement.bind",
        &access,
        json!({"PLACEMENT": "CRM_DYNAMIC_1038_DETAIL_ACTIVITY", "HANDLER": "http://app/placement"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("ERROR_PLACEMENT_NOT_FOUND"))
    );
    portal.add_smart_process(1038);
    let (status, body) = call(
        &http,
        "placement.bind",
        &access,
        json!({"PLACEMENT": "CRM_DYNAMIC_1038_DETAIL_ACTIVITY", "HANDLER": "http://app/placement"}),
    )
    .await;
    assert_eq!((status, body["result"].clone()), (200, json!(true)));
    // In a batch an error with status 200 is still an error.
    let (_, body) = call(
        &http,
        "batch",
        &access,
        json!({"cmd": {"p": "placement.bind?HANDLER=http%3A%2F%2Fapp%2Fp"}}),
    )
    .await;
    assert_eq!(
        body["result"]["result_error"]["p"]["error"],
        "ERROR_ARGUMENT"
    );
    // placement.unbind counts two per removed handler, as documented.
    let (status, body) = call(
        &http,
        "placement.unbind",
        &access,
        json!({"PLACEMENT": "CRM_DYNAMIC_1038_DETAIL_ACTIVITY"}),
    )
    .await;
    assert_eq!((status, body["result"].clone()), (200, json!({"count": 2})));
    let (status, body) = call(&http, "placement.unbind", &access, json!({})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("ERROR_ARGUMENT"))
    );
}

#[tokio::test]
async fn batch_result_time_carries_operating_only_when_switched_on() {
    let (portal, http) = portal_with(|c| c.batch_operating = true).await;
    let (access, _) = portal.issue_tokens();
    let (_, body) = call(
        &http,
        "batch",
        &access,
        json!({"cmd": {"a": "crm.deal.get?id=1"}}),
    )
    .await;
    let t = &body["result"]["result_time"]["a"];
    assert!(
        t["operating"].is_number() && t["operating_reset_at"].is_u64(),
        "{t}"
    );
    // A single call always has them.
    let (_, body) = call(&http, "crm.deal.get", &access, json!({"id": 1})).await;
    assert!(body["time"]["operating"].is_number());
}

#[tokio::test]
async fn app_info_answers_as_a_local_application_of_the_tokens_app() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, _) = portal.issue_tokens();
    let (_, body) = call(&http, "app.info", &access, json!({})).await;
    let info = &body["result"];
    assert_eq!(info["CODE"], json!(portal.client_id()));
    assert_eq!(
        (
            info["STATUS"].clone(),
            info["DAYS"].clone(),
            info["INSTALLED"].clone()
        ),
        (json!("L"), Value::Null, json!(false)),
        "{info}"
    );
    assert_eq!(info["VERSION"], 1);
    portal.mark_installed("0123456789abcdef0123456789abcdef");
    assert_eq!(
        call(&http, "app.info", &access, json!({})).await.1["result"]["INSTALLED"],
        true
    );
    assert_eq!(
        portal.application_token(),
        "0123456789abcdef0123456789abcdef"
    );
    // Another application's token speaks for that application.
    let (theirs, _) = portal.issue_tokens_for_app("local.other.app", UserId::ADMIN);
    let (_, body) = call(&http, "app.info", &theirs, json!({})).await;
    assert_eq!(body["result"]["CODE"], "local.other.app");
    assert_ne!(body["result"]["ID"], info["ID"]);
}

#[tokio::test]
async fn users_have_their_own_tokens_and_rights() {
    let (portal, http) = portal_with(|_| {}).await;
    let (admin, _) = portal.issue_tokens();
    let employee = portal.add_user(UserSpec::employee());
    let no_crm = portal.add_user(UserSpec::employee().without_crm());
    let guest = portal.add_user(UserSpec::extranet());
    let second_admin = portal.add_user(UserSpec::admin());
    assert_eq!(
        (employee, no_crm, guest, second_admin),
        (UserId(2), UserId(3), UserId(4), UserId(5))
    );
    let (e, _) = portal.issue_tokens_for(employee);
    let (n, _) = portal.issue_tokens_for(no_crm);
    let (g, _) = portal.issue_tokens_for(guest);
    let (a2, _) = portal.issue_tokens_for(second_admin);

    for (token, admin_flag, id) in [
        (&admin, true, "1"),
        (&e, false, "2"),
        (&g, false, "4"),
        (&a2, true, "5"),
    ] {
        assert_eq!(
            call(&http, "user.admin", token, json!({})).await.1["result"],
            admin_flag
        );
        assert_eq!(
            call(&http, "user.current", token, json!({})).await.1["result"]["ID"],
            id
        );
    }
    assert_eq!(
        call(&http, "user.current", &g, json!({})).await.1["result"]["UF_DEPARTMENT"],
        json!([])
    );

    // CRM reads: the employee reads, the one without CRM access gets ACCESS_DENIED,
    // the extranet user 403 (crm-item-get.md's error table).
    let item = json!({"entityTypeId": 2, "id": 5});
    assert_eq!(call(&http, "crm.item.get", &e, item.clone()).await.0, 200);
    assert_eq!(
        call(&http, "crm.item.get", &n, item.clone()).await,
        (
            400,
            json!({"error": "ACCESS_DENIED", "error_description": "You do not have permission to view this item"})
        )
    );
    assert_eq!(
        call(&http, "crm.item.get", &g, item).await,
        (
            403,
            json!({"error": "allowed_only_intranet_user", "error_description": "Action is allowed only to intranet users"})
        )
    );
    for (method, denied) in [
        ("crm.deal.get", "Access denied"),
        ("crm.deal.recurring.get", "Access denied"),
        ("crm.requisite.get", "Access denied."),
    ] {
        for token in [&n, &g] {
            assert_eq!(
                call(&http, method, token, json!({"id": 9})).await,
                (400, json!({"error": "", "error_description": denied})),
                "{method}"
            );
        }
        assert_eq!(
            call(&http, method, &e, json!({"id": 9})).await.0,
            200,
            "{method}"
        );
    }
    assert_eq!(
        portal.expected_as(no_crm, "crm.deal.get", json!({"id": 9})),
        Err(ApiError::with(400, "", "Access denied"))
    );

    // Administrators only.
    for (method, params) in [
        (
            "placement.bind",
            json!({"PLACEMENT": "CRM_DEAL_DETAIL_ACTIVITY", "HANDLER": "http://x/p"}),
        ),
        ("placement.get", json!({})),
        ("event.offline.get", json!({})),
        ("event.offline.list", json!({})),
        ("event.offline.clear", json!({"process_id": "x"})),
    ] {
        assert_eq!(
            call(&http, method, &e, params).await,
            (
                403,
                json!({"error": "ACCESS_DENIED", "error_description": "Access denied!"})
            ),
            "{method}"
        );
    }
    let (status, body) = call(
        &http,
        "event.bind",
        &e,
        json!({"event": "ONCRMDEALUPDATE", "event_type": "offline"}),
    )
    .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (
            403,
            Some("Access denied! Offline events binding requires administrator access rights")
        )
    );
    let (status, body) = call(
        &http,
        "event.bind",
        &e,
        json!({"event": "ONCRMDEALUPDATE", "handler": "http://x/e", "auth_type": 1}),
    )
    .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (
            403,
            Some(
                "Access denied! Event binding with AUTH_TYPE requires administrator access rights"
            )
        )
    );
    // A user's own handler is bound on their behalf and only they see it.
    assert_eq!(
        call(
            &http,
            "event.bind",
            &e,
            json!({"event": "ONCRMDEALUPDATE", "handler": "http://x/e"})
        )
        .await
        .1["result"],
        true
    );
    assert_eq!(
        call(
            &http,
            "event.bind",
            &admin,
            json!({"event": "ONCRMDEALADD", "handler": "http://x/a"})
        )
        .await
        .1["result"],
        true
    );
    let mine = call(&http, "event.get", &e, json!({})).await.1["result"].clone();
    assert_eq!(
        mine,
        json!([{"event": "ONCRMDEALUPDATE", "handler": "http://x/e", "auth_type": "2", "offline": 0}])
    );
    assert_eq!(
        portal.event_bindings().len(),
        2,
        "the administrator sees both"
    );
    let (status, _) = call(
        &http,
        "event.unbind",
        &e,
        json!({"event": "ONCRMDEALADD", "auth_type": 0}),
    )
    .await;
    assert_eq!(status, 403);
    let (_, body) = call(&http, "event.unbind", &e, json!({})).await;
    assert_eq!(
        body["result"],
        json!({"count": 1}),
        "only their own handler"
    );
    assert_eq!(portal.event_bindings().len(), 1);

    // crm.type.list: CRM administrators; extranet users 403.
    assert_eq!(
        call(&http, "crm.type.list", &e, json!({})).await,
        (
            400,
            json!({"error": "ACCESS_DENIED", "error_description": "Access denied"})
        )
    );
    assert_eq!(call(&http, "crm.type.list", &g, json!({})).await.0, 403);
    assert_eq!(call(&http, "crm.type.list", &a2, json!({})).await.0, 200);
}

#[tokio::test]
async fn tokens_belong_to_their_user_and_application() {
    let (portal, http) = portal_with(|_| {}).await;
    let oauth = oauth_http(&portal);
    let employee = portal.add_user(UserSpec::employee());
    let (_, r) = portal.issue_tokens_for(employee);
    let (_, pair) = get(&oauth, &refresh_path(&portal, &r)).await;
    assert_eq!(pair["user_id"], 2);
    let fresh = pair["access_token"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        call(&http, "user.admin", &fresh, json!({})).await.1["result"],
        false
    );

    // Another application's refresh token, refreshed with our credentials: refused as
    // issued to another client, and not spent.
    let (theirs, their_refresh) = portal.issue_tokens_for_app("local.other.app", UserId::ADMIN);
    let (status, body) = get(&oauth, &refresh_path(&portal, &their_refresh)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let secret = portal
        .client_secret_of("local.other.app")
        .expect("registered");
    let theirs_path = format!(
        "/oauth/token/?grant_type=refresh_token&client_id=local.other.app&client_secret={secret}&refresh_token={their_refresh}"
    );
    let (status, pair) = get(&oauth, &theirs_path).await;
    assert_eq!(status, 200, "{pair}");
    assert_eq!(
        pair["member_id"],
        json!(portal.member_id()),
        "the same portal"
    );
    // What another application binds is its own.
    let (their_new, _) = (
        pair["access_token"].as_str().unwrap_or_default().to_owned(),
        (),
    );
    assert_eq!(
        call(
            &http,
            "event.bind",
            &their_new,
            json!({"event": "ONAPPINSTALL", "handler": "http://evil/e"})
        )
        .await
        .1["result"],
        true
    );
    assert!(portal.event_bindings().is_empty());
    assert_eq!(portal.event_bindings_of("local.other.app").len(), 1);
    assert_eq!(
        call(&http, "app.info", &theirs, json!({})).await.0,
        401,
        "refreshed away"
    );
    // The authorization server's app.info names the token's application.
    let (_, info) = get(&oauth, &format!("/rest/app.info?auth={their_new}")).await;
    assert_eq!(info["result"]["CODE"], "local.other.app");
}

#[tokio::test]
async fn payment_required_stops_rest_and_refresh_until_lifted() {
    let (portal, http) = portal_with(|_| {}).await;
    let oauth = oauth_http(&portal);
    let (access, refresh) = portal.issue_tokens();
    portal.set_payment_required(true);
    assert_eq!(
        call(&http, "crm.deal.get", &access, json!({"id": 1})).await,
        (
            402,
            json!({"error": "PAYMENT_REQUIRED", "error_description": "Payment required"})
        )
    );
    let (status, body) = get(&oauth, &refresh_path(&portal, &refresh)).await;
    assert_eq!(
        (status, body),
        (
            401,
            json!({"error": "PAYMENT_REQUIRED", "error_description": "Payment required"})
        )
    );
    // The authorization server still tells the application's state.
    let (status, info) = get(&oauth, &format!("/rest/app.info?auth={access}")).await;
    assert_eq!(
        (status, info["result"]["PAYMENT_EXPIRED"].clone()),
        (200, json!("Y"))
    );
    // Another application on the portal is not affected.
    let (theirs, _) = portal.issue_tokens_for_app("local.other.app", UserId::ADMIN);
    assert_eq!(
        call(&http, "crm.deal.get", &theirs, json!({"id": 1}))
            .await
            .0,
        200
    );
    portal.set_payment_required(false);
    assert_eq!(
        call(&http, "crm.deal.get", &access, json!({"id": 1}))
            .await
            .0,
        200
    );
    assert_eq!(
        get(&oauth, &refresh_path(&portal, &refresh)).await.0,
        200,
        "the refused refresh did not spend the token"
    );
}

#[tokio::test]
async fn a_closed_portal_answers_portal_deleted_until_reopened() {
    let (portal, http) = portal_with(|_| {}).await;
    let (access, refresh) = portal.issue_tokens();
    portal.set_portal_deleted(true);
    assert_eq!(
        call(&http, "app.info", &access, json!({})).await,
        (
            500,
            json!({"error": "PORTAL_DELETED", "error_description": "Portal was deleted"})
        )
    );
    assert_eq!(
        call(&http, "batch", &access, json!({"cmd": ["app.info"]}))
            .await
            .0,
        500
    );
    assert_eq!(
        get(&oauth_http(&portal), &refresh_path(&portal, &refresh))
            .await
            .0,
        200,
        "the authorization server is another host"
    );
    portal.set_portal_deleted(false);
    let (fresh, _) = portal.issue_tokens();
    assert_eq!(call(&http, "app.info", &fresh, json!({})).await.0, 200);
}

#[tokio::test]
async fn crm_type_list_pages_the_portals_smart_processes() {
    let (portal, http) = portal_with(|c| c.smart_processes = vec![]).await;
    let (access, _) = portal.issue_tokens();
    let (_, body) = call(&http, "crm.type.list", &access, json!({})).await;
    assert_eq!(
        (body["result"]["types"].clone(), body["total"].clone()),
        (json!([]), json!(0))
    );
    // Without the type, its items and widget do not exist.
    assert_eq!(
        call(
            &http,
            "crm.item.get",
            &access,
            json!({"entityTypeId": 183, "id": 3})
        )
        .await
        .1["error_description"],
        "SPA not found"
    );
    for t in 0..60u64 {
        portal.add_smart_process(1000 + 2 * t);
    }
    let (_, first) = call(&http, "crm.type.list", &access, json!({})).await;
    assert_eq!(first["result"]["types"].as_array().map(Vec::len), Some(50));
    assert_eq!(
        (first["total"].clone(), first["next"].clone()),
        (json!(60), json!(50))
    );
    let t0 = &first["result"]["types"][0];
    assert_eq!(
        (t0["id"].clone(), t0["entityTypeId"].clone()),
        (json!(1), json!(1000))
    );
    let (_, second) = call(&http, "crm.type.list", &access, json!({"start": 50})).await;
    assert_eq!(second["result"]["types"].as_array().map(Vec::len), Some(10));
    assert!(second.get("next").is_none());
    let (_, one) = call(
        &http,
        "crm.type.list",
        &access,
        json!({"filter": {"entityTypeId": 1038}}),
    )
    .await;
    assert_eq!(one["result"]["types"][0]["entityTypeId"], 1038);
    assert_eq!(one["total"], 1);
    let (_, desc) = call(
        &http,
        "crm.type.list",
        &access,
        json!({"order": {"id": "DESC"}}),
    )
    .await;
    assert_eq!(desc["result"]["types"][0]["entityTypeId"], 1118);
    let (status, body) = call(
        &http,
        "crm.type.list",
        &access,
        json!({"filter": {"nope": 1}}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("INVALID_ARG_VALUE"))
    );
    // In a batch, the list's total and next arrive in result_total/result_next.
    let (_, b) = call(
        &http,
        "batch",
        &access,
        json!({"cmd": {"t": "crm.type.list"}}),
    )
    .await;
    assert_eq!(
        (
            b["result"]["result_total"]["t"].clone(),
            b["result"]["result_next"]["t"].clone()
        ),
        (json!(60), json!(50))
    );
    assert_eq!(
        call(
            &http,
            "crm.item.get",
            &access,
            json!({"entityTypeId": 1038, "id": 3})
        )
        .await
        .1["result"]["item"]["entityTypeId"],
        1038
    );
    assert_eq!(
        portal
            .expected("crm.type.list", json!({"filter": {"entityTypeId": 1000}}))
            .map(|r| r["types"][0]["id"].clone()),
        Ok(json!(1))
    );
}
