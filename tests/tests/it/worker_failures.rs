use b24_tests::fixtures;
use b24_tests::pipeline::{Pipeline, SEED_MEMBER};
use b24_tests::portal::CallKind;
use b24_tests::spawn::eventually;
use serde_json::json;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

fn rest_calls(p: &Pipeline) -> usize {
    p.portal
        .calls()
        .iter()
        .filter(|c| c.kind != CallKind::OAuth)
        .count()
}

#[tokio::test]
async fn forged_application_token_is_refused_at_the_edge_and_not_queued() {
    let p = Pipeline::start("w-edge", 1, &[]).await;
    p.install_seed_portal().await;
    let mut forged = fixtures::requisite_add();
    forged["auth"]["application_token"] = json!("00000000000000000000000000000000");
    let a = p.ingress.post_form("/events", &forged).await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body.contains("application_token"), "{}", a.body);
    assert!(
        !a.body.contains("0000000000"),
        "token not echoed: {}",
        a.body
    );
    // The genuine event still goes through.
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(p.wait_events("ONCRMREQUISITEADD", "done", 1, WITHIN).await);
    let (n, _) = p.event_count_and_attempts("ONCRMREQUISITEADD").await;
    assert_eq!(n, 1, "the forged one never reached the worker");
    p.finish().await;
}

#[tokio::test]
async fn forged_application_token_is_counted_and_dropped_without_a_rest_call() {
    let p = Pipeline::start("w-forged", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal.clear_calls();
    let mut forged = fixtures::requisite_add();
    forged["auth"]["application_token"] = json!("00000000000000000000000000000000");
    p.publish_unchecked(&forged).await;
    // Neither stored nor dead-lettered: forged traffic cannot fill either.
    p.expect_dropped("ONCRMREQUISITEADD", "APPLICATION_TOKEN_MISMATCH")
        .await;
    assert_eq!(rest_calls(&p), 0, "no REST call for a forged event");
    p.finish().await;
}

#[tokio::test]
async fn an_unknown_portals_event_is_counted_and_dropped() {
    let p = Pipeline::start("w-unknown", 1, &[]).await;
    // The ingress refuses it when the database says the portal is unknown; one that
    // could not ask (database down) passes it on, and the worker must catch it.
    p.publish_unchecked(&fixtures::requisite_add()).await;
    p.expect_dropped("ONCRMREQUISITEADD", "UNKNOWN_PORTAL")
        .await;
    assert_eq!(rest_calls(&p), 0);
    p.finish().await;
}

#[tokio::test]
async fn a_dead_letter_replayed_once_the_cause_is_fixed_is_stored() {
    let p = Pipeline::start("w-replay", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal.set_missing("crm.requisite.get", 27);
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(p.wait_events("ONCRMREQUISITEADD", "dead", 1, WITHIN).await);
    // The operator fixes the cause, then replays the dead letter.
    p.portal.clear_missing();
    let moved = b24_worker::dlq::replay(&p.amqp_config(), 100)
        .await
        .unwrap();
    assert_eq!(moved, 1);
    assert!(p.wait_events("ONCRMREQUISITEADD", "done", 1, WITHIN).await);
    assert!(p.entity(SEED_MEMBER, "requisite", "27").await.is_some());
    assert!(p.dead_letters().await.is_empty());
    p.finish().await;
}

#[tokio::test]
async fn malformed_envelope_is_dead_lettered_with_its_reason() {
    let p = Pipeline::start("w-malformed", 1, &[]).await;
    let conn = b24_tests::broker::connect().await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        p.ingress.topology.exchange().as_str().into(),
        "event.garbage".into(),
        Default::default(),
        b"{\"not\": \"an envelope\"",
        Default::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let dead = eventually(WITHIN, || async {
        let d = p.dead_letters().await;
        (!d.is_empty()).then_some(d)
    })
    .await
    .expect("dead-lettered");
    assert_eq!(dead[0]["error_code"], "MALFORMED_ENVELOPE");
    assert!(dead[0]["reason"]
        .as_str()
        .unwrap()
        .contains("envelope is not valid"));
    let (status, code, _) = p.last_event("UNKNOWN").await;
    assert_eq!(
        (status.as_str(), code.as_deref()),
        ("dead", Some("MALFORMED_ENVELOPE"))
    );
    p.finish().await;
}

#[tokio::test]
async fn a_500_is_retried_and_then_succeeds() {
    let p = Pipeline::start("w-500", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal.fail_next(2, 500, "INTERNAL_SERVER_ERROR");
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(p.wait_events("ONCRMREQUISITEADD", "done", 1, WITHIN).await);
    let calls = p.calls_of("crm.requisite.get");
    assert_eq!(calls.len(), 3, "two 500s, then success");
    assert_eq!(calls[0].status, 500);
    assert_eq!(calls[2].status, 200);
    p.finish().await;
}

#[tokio::test]
async fn query_limit_exceeded_backs_off_and_then_succeeds() {
    let p = Pipeline::start("w-qle", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal.fail_next(2, 503, "QUERY_LIMIT_EXCEEDED");
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(p.wait_events("ONCRMREQUISITEADD", "done", 1, WITHIN).await);
    let (_, attempts) = p.event_count_and_attempts("ONCRMREQUISITEADD").await;
    assert_eq!(
        attempts, 1,
        "served within the first delivery, no delayed requeue"
    );
    let calls = p.calls_of("crm.requisite.get");
    assert_eq!(calls.len(), 3, "two 503s, then success");
    assert_eq!(calls[2].status, 200);
    p.finish().await;
}

#[tokio::test]
async fn persistent_500s_go_through_the_delay_queue_and_then_succeed() {
    // One attempt per delivery: the first delivery fails and waits in the 5 s queue.
    let p = Pipeline::start("w-delay", 1, &[("B24_RETRY_ATTEMPTS", "1")]).await;
    p.install_seed_portal().await;
    p.portal.fail_next(1, 500, "INTERNAL_SERVER_ERROR");
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "retrying", 1, WITHIN)
            .await
    );
    assert!(p.wait_events("ONCRMREQUISITEADD", "done", 1, WITHIN).await);
    let (_, attempts) = p.event_count_and_attempts("ONCRMREQUISITEADD").await;
    assert_eq!(attempts, 2);
    p.finish().await;
}

#[tokio::test]
async fn a_permanent_error_is_dead_lettered_with_its_code() {
    let p = Pipeline::start("w-perm", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal.fail_next(1, 403, "ACCESS_DENIED");
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(p.wait_events("ONCRMREQUISITEADD", "dead", 1, WITHIN).await);
    let (_, code, reason) = p.last_event("ONCRMREQUISITEADD").await;
    assert_eq!(code.as_deref(), Some("ACCESS_DENIED"));
    assert!(reason.unwrap().contains("403"));
    assert_eq!(p.calls_of("crm.requisite.get").len(), 1, "not retried");
    p.finish().await;
}

#[tokio::test]
async fn a_duplicate_event_is_processed_once() {
    let p = Pipeline::start("w-dup", 1, &[]).await;
    p.install_seed_portal().await;
    p.post("/events", &fixtures::deal_recurring_expose()).await;
    assert!(
        p.wait_events("ONCRMDEALRECURRINGEXPOSE", "done", 1, WITHIN)
            .await
    );
    p.post("/events", &fixtures::deal_recurring_expose()).await;
    let m = eventually(WITHIN, || async {
        let m = worker_metrics(&p).await?;
        m.contains(
            r#"b24_worker_messages_total{event="ONCRMDEALRECURRINGEXPOSE",outcome="duplicate"} 1"#,
        )
        .then_some(())
    })
    .await;
    assert!(m.is_some(), "second delivery counted as duplicate");
    assert_eq!(p.calls_of("crm.deal.get").len(), 1);
    let (n, _) = p.event_count_and_attempts("ONCRMDEALRECURRINGEXPOSE").await;
    assert_eq!(n, 1);
    p.finish().await;
}

/// Waits until a worker has begun the event (its row says `processing`).
async fn wait_processing(p: &Pipeline, event: &str) -> bool {
    let db = p.db_client().await;
    eventually(WITHIN, || async {
        db.query_opt(
            "SELECT 1 FROM events WHERE event = $1 AND status = 'processing'",
            &[&event],
        )
        .await
        .ok()?
    })
    .await
    .is_some()
}

async fn worker_metrics(p: &Pipeline) -> Option<String> {
    let http = b24_tests::http::HttpClient::new(p.workers[0].metrics_addr);
    Some(http.get("/metrics").await.ok()?.body)
}

#[tokio::test]
async fn a_worker_killed_mid_message_causes_redelivery_but_no_duplicate_rows() {
    let mut p = Pipeline::start("w-kill", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal.set_delay(Duration::from_millis(1500));
    p.post("/events", &fixtures::deal_recurring_expose()).await;
    // Wait until the worker is inside the first REST call, then kill it.
    assert!(wait_processing(&p, "ONCRMDEALRECURRINGEXPOSE").await);
    p.workers[0].kill().await;
    p.portal.set_delay(Duration::ZERO);
    p.add_worker().await;
    assert!(
        p.wait_events("ONCRMDEALRECURRINGEXPOSE", "done", 1, WITHIN)
            .await
    );
    let (events, attempts) = p.event_count_and_attempts("ONCRMDEALRECURRINGEXPOSE").await;
    let entities: i64 = p
        .db_client()
        .await
        .query_one(
            "SELECT count(*) FROM entities WHERE kind IN ('deal', 'deal_recurring')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!((events, entities), (1, 2));
    assert!(attempts >= 2, "redelivered: {attempts} attempts");
    p.finish().await;
}

#[tokio::test]
async fn uninstall_marks_the_portal_and_erases_its_tokens() {
    let p = Pipeline::start("w-uninstall", 1, &[]).await;
    p.install_seed_portal().await;
    let uninstall = json!({
        "event": "ONAPPUNINSTALL",
        "data": {"LANGUAGE_ID": "en", "CLEAN": "0"},
        "ts": "1741092999",
        "auth": {"domain": p.portal.domain(), "member_id": SEED_MEMBER,
                 "application_token": "51856fefc120afa4b628cc82d3935cce"}
    });
    p.post("/events", &uninstall).await;
    assert!(p.wait_events("ONAPPUNINSTALL", "done", 1, WITHIN).await);
    let row = p
        .db_client()
        .await
        .query_one(
            "SELECT status, access_token, refresh_token FROM portals WHERE member_id = $1",
            &[&SEED_MEMBER],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "uninstalled");
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert_eq!(row.get::<_, Option<String>>(2), None);
    // Events after that are refused without calling Bitrix24, and not stored.
    p.portal.clear_calls();
    p.publish_unchecked(&fixtures::requisite_add()).await;
    p.expect_dropped("ONCRMREQUISITEADD", "APPLICATION_TOKEN_UNKNOWN")
        .await;
    assert_eq!(rest_calls(&p), 0);
    p.finish().await;
}

#[tokio::test]
async fn an_unhandled_event_is_recorded_and_acked() {
    let p = Pipeline::start("w-other", 1, &[]).await;
    p.install_seed_portal().await;
    let mut other = fixtures::requisite_add();
    other["event"] = json!("ONCRMCONTACTADD");
    p.post("/events", &other).await;
    assert!(p.wait_events("ONCRMCONTACTADD", "ignored", 1, WITHIN).await);
    // The counter moves just after the row is written: poll it too.
    let counted = eventually(WITHIN, || async {
        let m = worker_metrics(&p).await?;
        m.contains(r#"b24_worker_messages_total{event="other_event",outcome="ignored"} 1"#)
            .then_some(())
    })
    .await;
    assert!(counted.is_some(), "ignored event counted");
    p.finish().await;
}

#[tokio::test]
async fn sigterm_finishes_the_message_in_hand_before_exiting() {
    let mut p = Pipeline::start("w-term", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal.set_delay(Duration::from_millis(1500));
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(wait_processing(&p, "ONCRMREQUISITEADD").await);
    p.workers[0].stop().await;
    let (status, _, _) = p.last_event("ONCRMREQUISITEADD").await;
    assert_eq!(status, "done", "finished before exiting");
    assert_eq!(
        b24_tests::broker::ready_count(&p.ingress.topology.work_queue())
            .await
            .unwrap(),
        0,
        "acked, so nothing is redelivered"
    );
    p.finish().await;
}
