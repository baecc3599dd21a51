//! The Bitrix24 client under the portal's limits, with several worker replicas.

use b24_tests::fixtures;
use b24_tests::pipeline::{Pipeline, SEED_MEMBER};
use b24_tests::portal::{CallKind, PortalConfig};
use serde_json::{json, Value};
use std::time::Duration;

/// HTTP requests to /rest/ and how many of them got 503 QUERY_LIMIT_EXCEEDED.
fn requests_and_503s(p: &Pipeline) -> (usize, usize) {
    let calls = p.portal.calls();
    let rest: Vec<_> = calls.iter().filter(|c| c.kind == CallKind::Rest).collect();
    let limited = rest
        .iter()
        .filter(|c| c.error.as_deref() == Some("QUERY_LIMIT_EXCEEDED"))
        .count();
    (rest.len(), limited)
}

async fn post_all(p: &Pipeline, events: impl IntoIterator<Item = Value>) {
    let events: Vec<Value> = events.into_iter().collect();
    for chunk in events.chunks(50) {
        let posts = chunk.iter().map(|e| p.post("/events", e));
        futures_util::future::join_all(posts).await;
    }
}

#[tokio::test]
async fn four_workers_process_500_events_inside_one_portals_budget() {
    let p = Pipeline::start("l-500", 4, &[]).await;
    p.install_seed_portal().await;
    p.portal.clear_calls();
    post_all(&p, (1..=500).map(fixtures::requisite_add_numbered)).await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "done", 500, Duration::from_secs(120))
            .await,
        "all 500 processed"
    );
    let (requests, limited) = requests_and_503s(&p);
    assert!(
        limited * 100 <= requests,
        "{limited} of {requests} requests got 503"
    );
    let commands = p.calls_of("crm.requisite.get").len();
    assert!(commands >= 500, "every requisite fetched: {commands}");
    p.finish().await;
}

#[tokio::test]
async fn the_shared_limiter_keeps_four_unbatched_workers_inside_the_bucket() {
    // Batching off, so every event is a request of its own; the portal is scaled to
    // 5/s with a burst of 20 to keep the test short (same shape as 2/s burst 50).
    let overrides = [
        ("WORKER_BATCH_MAX", "1"),
        ("B24_RATE_PER_SEC", "5"),
        ("B24_RATE_BURST", "20"),
    ];
    let portal = PortalConfig {
        member_id: SEED_MEMBER.into(),
        rate_per_sec: 5.0,
        burst: 20.0,
        ..PortalConfig::default()
    };
    let p = Pipeline::start_with("l-limiter", 4, portal, &overrides).await;
    p.install_seed_portal().await;
    p.portal.clear_calls();
    post_all(&p, (1..=120).map(fixtures::requisite_add_numbered)).await;
    p.expect_events("ONCRMREQUISITEADD", "done", 120, Duration::from_secs(90))
        .await;
    let (requests, limited) = requests_and_503s(&p);
    assert!(requests >= 120);
    assert!(
        limited * 100 <= requests,
        "{limited} of {requests} requests got 503"
    );
    p.finish().await;
}

#[tokio::test]
async fn eight_workers_meet_an_expired_token_with_exactly_one_refresh() {
    let p = Pipeline::start("l-refresh", 8, &[]).await;
    p.install_seed_portal().await;
    // The installation's proof was a refresh of its own.
    let before = p.portal.refresh_count();
    p.portal.expire_access_tokens();
    p.portal.clear_calls();
    post_all(&p, (1..=32).map(fixtures::requisite_add_numbered)).await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "done", 32, Duration::from_secs(60))
            .await
    );
    assert_eq!(p.portal.refresh_count() - before, 1, "exactly one refresh");
    let calls = p.portal.calls();
    let oauth: Vec<_> = calls.iter().filter(|c| c.kind == CallKind::OAuth).collect();
    assert_eq!(oauth.len(), 1, "one request to the OAuth server");
    assert!(calls
        .iter()
        .all(|c| c.error.as_deref() != Some("invalid_grant")));
    // After the refresh, every call succeeds.
    let refreshed_at = oauth[0].at;
    let late_failures = calls
        .iter()
        .filter(|c| c.kind == CallKind::Rest && c.at > refreshed_at && c.status != 200)
        .filter(|c| c.error.as_deref() != Some("invalid_token"))
        .count();
    assert_eq!(late_failures, 0);
    p.finish().await;
}

#[tokio::test]
async fn a_429_on_one_method_pauses_that_method_only() {
    let p = Pipeline::start("l-429", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal
        .exhaust_method("crm.deal.get", Duration::from_secs(300));
    p.post("/events", &fixtures::deal_recurring_expose()).await;
    assert!(
        p.wait_events(
            "ONCRMDEALRECURRINGEXPOSE",
            "retrying",
            1,
            Duration::from_secs(30)
        )
        .await
    );
    let (_, code, _) = p.last_event("ONCRMDEALRECURRINGEXPOSE").await;
    assert_eq!(code.as_deref(), Some("OPERATION_TIME_LIMIT"));
    let db = p.db_client().await;
    let paused: bool = db
        .query_one(
            "SELECT paused_until > now() FROM method_budgets WHERE member_id = $1 AND method = 'crm.deal.get'",
            &[&SEED_MEMBER],
        )
        .await
        .unwrap()
        .get(0);
    assert!(paused);
    let deal_calls = p.calls_of("crm.deal.get").len();

    // Another deal event waits without calling; other methods go on.
    p.post("/events", &fixtures::deal_recurring_expose_numbered(1))
        .await;
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "done", 1, Duration::from_secs(30))
            .await
    );
    assert!(
        p.wait_events(
            "ONCRMDEALRECURRINGEXPOSE",
            "retrying",
            2,
            Duration::from_secs(30)
        )
        .await
    );
    assert_eq!(
        p.calls_of("crm.deal.get").len(),
        deal_calls,
        "paused method not called"
    );
    p.finish().await;
}

#[tokio::test]
async fn an_endpoint_outside_the_allowlist_is_never_called() {
    let p = Pipeline::start("l-ssrf", 1, &[]).await;
    // The same portal under another name, which the allowlist does not contain.
    let mut install = p.install_event(SEED_MEMBER, &p.portal.domain());
    install["auth"]["client_endpoint"] =
        json!(format!("http://localhost:{}/rest/", p.portal.addr().port()));
    p.post("/events", &install).await;
    // Refused before anything leaves: counted as a failed verification, not stored.
    assert!(
        p.wait_verification_failures("ONAPPINSTALL", "ENDPOINT_NOT_ALLOWED", 1)
            .await,
        "the install claim was counted and dropped"
    );
    assert!(p.portal.calls().is_empty(), "nothing was sent");
    assert_eq!(p.event_count_and_attempts("ONAPPINSTALL").await.0, 0);
    p.finish().await;
}

#[tokio::test]
async fn a_redirect_outside_the_allowlist_is_not_followed() {
    let p = Pipeline::start("l-redirect", 1, &[]).await;
    p.install_seed_portal().await;
    let elsewhere = format!("http://localhost:{}/rest/", p.portal.addr().port());
    p.portal.redirect_to(Some(elsewhere));
    p.portal.clear_calls();
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "dead", 1, Duration::from_secs(30))
            .await
    );
    let calls = p.portal.calls();
    assert_eq!(calls.len(), 1, "only the redirected request: {calls:?}");
    assert_eq!(calls[0].status, 302);
    p.finish().await;
}

#[tokio::test]
async fn a_redirect_inside_the_allowlist_is_followed_and_stored() {
    let p = Pipeline::start(
        "l-moved",
        1,
        &[("B24_ALLOWED_HOSTS", "http://127.0.0.1:*,http://localhost:*")],
    )
    .await;
    p.install_seed_portal().await;
    let moved = format!("http://localhost:{}/rest/", p.portal.addr().port());
    p.portal.redirect_to(Some(moved.clone()));
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "done", 1, Duration::from_secs(30))
            .await
    );
    let endpoint: String = p
        .db_client()
        .await
        .query_one(
            "SELECT client_endpoint FROM portals WHERE member_id = $1",
            &[&SEED_MEMBER],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(endpoint, moved);
    p.finish().await;
}

#[tokio::test]
async fn a_batch_with_failing_commands_settles_each_event_on_its_own() {
    let p = Pipeline::start("l-batch", 1, &[("WORKER_BATCH_WINDOW_MS", "500")]).await;
    p.install_seed_portal().await;
    p.portal.set_missing("crm.requisite.get", 2);
    p.portal.clear_calls();
    post_all(&p, (1..=4).map(fixtures::requisite_add_numbered)).await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "done", 3, Duration::from_secs(30))
            .await
    );
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "dead", 1, Duration::from_secs(30))
            .await
    );
    for id in [1, 3, 4] {
        assert!(p
            .entity(SEED_MEMBER, "requisite", &id.to_string())
            .await
            .is_some());
    }
    assert!(p.entity(SEED_MEMBER, "requisite", "2").await.is_none());
    let db = p.db_client().await;
    let row = db
        .query_one(
            "SELECT error_code, last_error FROM events WHERE status = 'dead'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("METHOD_ERROR")
    );
    let missing = p
        .portal
        .expected("crm.requisite.get", json!({"id": 2}))
        .unwrap_err();
    let last_error = row.get::<_, Option<String>>(1).unwrap();
    assert!(last_error.contains(&missing.description), "{last_error}");
    let batches: Vec<_> = p
        .portal
        .calls()
        .into_iter()
        .filter(|c| c.kind == CallKind::Rest)
        .collect();
    assert_eq!(batches.len(), 1, "one batch request");
    assert_eq!(batches[0].batch_size, Some(4));
    p.finish().await;
}
