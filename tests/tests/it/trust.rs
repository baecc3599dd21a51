//! Issue 10, as an attacker would try it: a non-admin user of the portal, another
//! application installed on it, and anyone on the network, each sending whatever body
//! they like. A portal's identity is proved, never asserted.

use b24_tests::fixtures;
use b24_tests::pipeline::{Pipeline, SEED_APP_TOKEN, SEED_MEMBER, TEST_TOKEN_KEY};
use b24_tests::portal::{CallKind, PortalConfig, SimPortal, UserId, UserSpec};
use b24_tests::spawn::eventually;
use serde_json::{json, Value};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

/// What an attacker would want to change in the portal's row.
#[derive(Debug, PartialEq)]
struct Row {
    domain: String,
    client_endpoint: String,
    application_token_sha256: Option<String>,
    status: String,
    tokens: (Option<String>, Option<String>),
}

async fn row(p: &Pipeline, member_id: &str) -> Row {
    let r = p
        .db_client()
        .await
        .query_one(
            "SELECT domain, client_endpoint, application_token_sha256, status
               FROM portals WHERE member_id = $1",
            &[&member_id],
        )
        .await
        .expect("the portal has a row");
    Row {
        domain: r.get(0),
        client_endpoint: r.get(1),
        application_token_sha256: r.get(2),
        status: r.get(3),
        tokens: p.stored_tokens(member_id).await,
    }
}

/// The install page as Bitrix24 posts it for this portal, with these tokens.
fn install_page(p: &Pipeline, auth_id: &str, refresh_id: &str) -> Value {
    let mut page = p.seed(&fixtures::install());
    page["AUTH_ID"] = json!(auth_id);
    page["REFRESH_ID"] = json!(refresh_id);
    page
}

/// `ONAPPINSTALL` for this portal carrying these tokens and this application_token.
fn install_event(p: &Pipeline, (access, refresh): (String, String), app_token: &str) -> Value {
    let mut e = p.install_event(&p.portal.member_id(), &p.portal.domain());
    e["auth"]["access_token"] = json!(access);
    e["auth"]["refresh_token"] = json!(refresh);
    e["auth"]["application_token"] = json!(app_token);
    e
}

const ATTACKER_TOKEN: &str = "a77ac4e7a77ac4e7a77ac4e7a77ac4e7";

#[tokio::test]
async fn a_non_admin_user_can_neither_install_nor_take_the_portal_over() {
    let p = Pipeline::start("t-admin", 1, &[]).await;
    p.install_via_portal().await;
    let member = p.portal.member_id();
    let before = row(&p, &member).await;

    // Every user of the portal gets AUTH_ID/REFRESH_ID in widget calls.
    let user = p.portal.add_user(UserSpec::employee());
    let (auth_id, refresh_id) = p.portal.issue_tokens_for(user);
    let mut page = install_page(&p, &auth_id, &refresh_id);
    page["APPLICATION_TOKEN"] = json!(ATTACKER_TOKEN);
    p.post("/install", &page).await;
    let forged = install_event(&p, p.portal.issue_tokens_for(user), ATTACKER_TOKEN);
    p.post("/events", &forged).await;

    assert!(
        p.wait_verification_failures("install", "INSTALLER_NOT_ADMIN", 1)
            .await
    );
    assert!(
        p.wait_verification_failures("ONAPPINSTALL", "INSTALLER_NOT_ADMIN", 1)
            .await
    );
    assert_eq!(
        row(&p, &member).await,
        before,
        "the portal's row is untouched"
    );

    // The genuine portal's events still arrive and are stored.
    p.portal.add_requisite(41).await;
    p.expect_events("ONCRMREQUISITEADD", "done", 1, WITHIN)
        .await;
    assert!(p.entity(&member, "requisite", "41").await.is_some());
    p.finish().await;
}

#[tokio::test]
async fn another_applications_tokens_prove_nothing() {
    let p = Pipeline::start("t-otherapp", 1, &[]).await;
    p.install_via_portal().await;
    let member = p.portal.member_id();
    let before = row(&p, &member).await;
    // An administrator's tokens, but of another application installed on the portal.
    let tokens = p
        .portal
        .issue_tokens_for_app("local.other.app", UserId::ADMIN);
    p.post("/events", &install_event(&p, tokens, ATTACKER_TOKEN))
        .await;
    let (auth_id, refresh_id) = p
        .portal
        .issue_tokens_for_app("local.other.app", UserId::ADMIN);
    p.post("/install", &install_page(&p, &auth_id, &refresh_id))
        .await;
    assert!(
        p.wait_verification_failures("ONAPPINSTALL", "INSTALL_NOT_PROVEN", 1)
            .await
    );
    assert!(
        p.wait_verification_failures("install", "INSTALL_NOT_PROVEN", 1)
            .await
    );
    assert_eq!(row(&p, &member).await, before);
    p.finish().await;
}

#[tokio::test]
async fn an_administrator_of_another_portal_cannot_claim_this_ones_member_id_or_domain() {
    let p = Pipeline::start("t-claim", 1, &[]).await;
    p.install_via_portal().await;
    let member = p.portal.member_id();
    let before = row(&p, &member).await;
    // The attacker's own portal, with our application installed: genuine admin tokens.
    let theirs = SimPortal::start(PortalConfig::default()).await;
    let tokens = theirs.issue_tokens();
    // Their tokens, our member_id and domain.
    let mut claim = install_event(&p, tokens, ATTACKER_TOKEN);
    claim["auth"]["server_endpoint"] = json!(theirs.server_endpoint());
    p.post("/events", &claim).await;
    assert!(
        p.wait_verification_failures("ONAPPINSTALL", "INSTALL_NOT_PROVEN", 1)
            .await,
        "the authorization server answered for their portal, not ours"
    );
    // Their tokens and member_id, our domain (so a domain-only ONAPPPAYMENT would find
    // their row).
    let mut claim = install_event(&p, theirs.issue_tokens(), ATTACKER_TOKEN);
    claim["auth"]["member_id"] = json!(theirs.member_id());
    claim["auth"]["server_endpoint"] = json!(theirs.server_endpoint());
    p.post("/events", &claim).await;
    assert!(
        p.wait_verification_failures("ONAPPINSTALL", "INSTALL_HOST_MISMATCH", 1)
            .await
    );
    assert_eq!(row(&p, &member).await, before);
    let rows: i64 = p
        .db_client()
        .await
        .query_one("SELECT count(*) FROM portals", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "no row for the attacker's claims");
    p.finish().await;
}

#[tokio::test]
async fn the_install_page_never_sets_the_application_token() {
    let p = Pipeline::start("t-page", 1, &[]).await;
    let member = p.portal.member_id();
    // A genuine administrator's page, with an APPLICATION_TOKEN in its body.
    let (auth_id, refresh_id) = p.portal.issue_tokens();
    let mut page = install_page(&p, &auth_id, &refresh_id);
    page["APPLICATION_TOKEN"] = json!(ATTACKER_TOKEN);
    p.post("/install", &page).await;
    p.expect_events("INSTALL", "done", 1, WITHIN).await;
    let installed = row(&p, &member).await;
    assert_eq!(installed.status, "installed");
    assert_eq!(
        installed.application_token_sha256, None,
        "only ONAPPINSTALL brings it"
    );
    p.finish().await;
}

#[tokio::test]
async fn a_forged_uninstall_neither_erases_nor_marks_the_portal() {
    let p = Pipeline::start("t-uninstall", 1, &[]).await;
    p.install_seed_portal().await;
    let before = row(&p, SEED_MEMBER).await;
    let forged = json!({
        "event": "ONAPPUNINSTALL",
        "data": {"LANGUAGE_ID": "en", "CLEAN": "1"},
        "ts": "1741092999",
        "auth": {"domain": p.portal.domain(), "member_id": SEED_MEMBER,
                 "application_token": ATTACKER_TOKEN}
    });
    let a = p.ingress.post_form("/events", &forged).await;
    assert_eq!(a.status, 401, "refused at the edge: {}", a.body);
    // And when the edge could not check it, the worker drops it.
    p.publish_unchecked(&forged).await;
    assert!(
        p.wait_verification_failures("ONAPPUNINSTALL", "APPLICATION_TOKEN_MISMATCH", 1)
            .await
    );
    assert_eq!(row(&p, SEED_MEMBER).await, before);
    p.finish().await;
}

#[tokio::test]
async fn unauthenticated_payment_hints_cost_one_app_info_per_portal_per_window() {
    let p = Pipeline::start("t-pay", 1, &[("WORKER_PAYMENT_DEBOUNCE_S", "300")]).await;
    p.install_seed_portal().await;
    p.portal.clear_calls();
    // A loop of ONAPPPAYMENT with the victim's domain and random CODEs.
    for i in 0..20 {
        let mut hint = p.seed(&fixtures::app_payment());
        hint["data"]["CODE"] = json!(format!("attacker.code{i}"));
        hint["ts"] = json!((1_700_000_000 + i).to_string());
        p.post("/events", &hint).await;
    }
    p.expect_events("ONAPPPAYMENT", "done", 20, WITHIN).await;
    assert_eq!(p.calls_of("app.info").len(), 1, "one app.info for 20 hints");
    let apps: i64 = p
        .db_client()
        .await
        .query_one("SELECT count(*) FROM entities WHERE kind = 'app'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(apps, 1, "one app row per portal, whatever CODE says");
    p.finish().await;
}

#[tokio::test]
async fn a_widget_call_is_served_with_its_own_token_only() {
    let p = Pipeline::start("t-widget", 1, &[]).await;
    p.install_seed_portal().await;
    let (stored, _) = p.stored_tokens(SEED_MEMBER).await;
    p.portal.clear_calls();
    let mut call = p.seed(&fixtures::placements()[1]);
    call["AUTH_ID"] = json!("0000000000000000000000000000bad0");
    p.post("/placement", &call).await;
    p.expect_events("CRM_DEAL_DETAIL_ACTIVITY", "denied", 1, WITHIN)
        .await;
    let calls = p.calls_of("crm.item.get");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        calls[0].token.as_deref(),
        Some("0000000000000000000000000000bad0")
    );
    assert!(
        p.portal
            .calls()
            .iter()
            .all(|c| c.token.is_none() || c.token != stored),
        "the portal's stored token was never used for the widget"
    );
    assert!(p.entity(SEED_MEMBER, "crm_item:2", "3473").await.is_none());
    p.finish().await;
}

#[tokio::test]
async fn events_that_arrive_before_the_application_token_wait_for_it() {
    let p = Pipeline::start("t-pending", 1, &[]).await;
    // The install page was processed; ONAPPINSTALL is not yet.
    let (auth_id, refresh_id) = p.portal.issue_tokens();
    p.post("/install", &install_page(&p, &auth_id, &refresh_id))
        .await;
    p.expect_events("INSTALL", "done", 1, WITHIN).await;
    let mut event = fixtures::requisite_add_numbered(7);
    event["auth"]["member_id"] = json!(p.portal.member_id());
    p.publish_unchecked(&event).await;
    let held = eventually(WITHIN, || async {
        (p.worker_counter(r#"b24_worker_messages_total{event="ONCRMREQUISITEADD",outcome="held"}"#)
            .await
            >= 1)
            .then_some(())
    })
    .await;
    assert!(held.is_some(), "held, not dead-lettered");
    // Now ONAPPINSTALL arrives with the portal's token.
    p.portal.mark_installed(SEED_APP_TOKEN);
    let install = install_event(&p, p.portal.issue_tokens(), SEED_APP_TOKEN);
    p.post("/events", &install).await;
    p.expect_events("ONCRMREQUISITEADD", "done", 1, WITHIN)
        .await;
    p.finish().await;
}

#[tokio::test]
async fn events_whose_application_token_never_comes_are_dead_lettered_after_the_wait() {
    let p = Pipeline::start("t-pending-max", 1, &[("WORKER_TOKEN_PENDING_MAX_S", "1")]).await;
    let (auth_id, refresh_id) = p.portal.issue_tokens();
    p.post("/install", &install_page(&p, &auth_id, &refresh_id))
        .await;
    p.expect_events("INSTALL", "done", 1, WITHIN).await;
    let mut event = fixtures::requisite_add_numbered(8);
    event["auth"]["member_id"] = json!(p.portal.member_id());
    p.publish_unchecked(&event).await;
    let dead = eventually(WITHIN, || async {
        let d = p.dead_letters().await;
        (!d.is_empty()).then_some(d)
    })
    .await
    .expect("dead-lettered once the wait is over");
    assert_eq!(dead[0]["error_code"], "APPLICATION_TOKEN_UNKNOWN");
    p.finish().await;
}

#[tokio::test]
async fn one_portals_flood_does_not_starve_another_portal() {
    // Few prefetch slots, a small per-portal cap, and a slow flooded portal whose
    // budget is ample (so only the cap, not the budget, can make room).
    let p = Pipeline::start_with(
        "t-flood",
        1,
        PortalConfig {
            member_id: SEED_MEMBER.into(),
            rate_per_sec: 100.0,
            burst: 100.0,
            ..PortalConfig::default()
        },
        &[
            ("WORKER_PREFETCH", "8"),
            ("WORKER_PORTAL_IN_FLIGHT", "2"),
            ("WORKER_BATCH_MAX", "1"),
            ("B24_RATE_PER_SEC", "100"),
            ("B24_RATE_BURST", "100"),
        ],
    )
    .await;
    p.install_seed_portal().await;
    let other = SimPortal::start(PortalConfig::default()).await;
    install_second_portal(&p, &other, 1).await;

    p.portal.set_delay(Duration::from_millis(700));
    for id in 1..=60 {
        p.post("/events", &fixtures::requisite_add_numbered(id))
            .await;
    }
    for id in 1001..=1005 {
        let mut e = fixtures::requisite_add_numbered(id);
        e["auth"]["member_id"] = json!(other.member_id());
        p.post("/events", &e).await;
    }
    let db = p.db_client().await;
    let other_member = other.member_id();
    let other_done = eventually(Duration::from_secs(20), || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM events WHERE member_id = $1
                   AND event = 'ONCRMREQUISITEADD' AND status = 'done'",
                &[&other_member],
            )
            .await
            .ok()?
            .get(0);
        (n == 5).then_some(())
    })
    .await;
    let flooded_done: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE member_id = $1
               AND event = 'ONCRMREQUISITEADD' AND status = 'done'",
            &[&SEED_MEMBER],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        other_done.is_some(),
        "the quiet portal's events were done while the flood was still being worked \
         ({flooded_done} of 60 done):\n{}",
        p.events_summary().await
    );
    // Without the cap the quiet portal's events wait behind the flood's first 60,
    // eight at a time.
    assert!(
        flooded_done <= 30,
        "the quiet portal waited behind the flood ({flooded_done} of 60 done first)"
    );
    p.portal.set_delay(Duration::ZERO);
    p.expect_events("ONCRMREQUISITEADD", "done", 65, Duration::from_secs(120))
        .await;
    p.finish().await;
}

/// Installs a second simulated portal on `p`'s pipeline (our app's admin tokens, the
/// seeds' application_token) and waits until it is stored.
async fn install_second_portal(p: &Pipeline, portal: &SimPortal, installs_before: i64) {
    portal.mark_installed(SEED_APP_TOKEN);
    let mut install = p.install_event(&portal.member_id(), &portal.domain());
    let (a, r) = portal.issue_tokens();
    install["auth"]["access_token"] = json!(a);
    install["auth"]["refresh_token"] = json!(r);
    install["auth"]["client_endpoint"] = json!(portal.client_endpoint());
    install["auth"]["server_endpoint"] = json!(portal.server_endpoint());
    p.post("/events", &install).await;
    p.expect_events("ONAPPINSTALL", "done", installs_before + 1, WITHIN)
        .await;
}

/// Done requisite events of a portal.
async fn done_of(p: &Pipeline, member_id: &str) -> i64 {
    p.db_client()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE member_id = $1
               AND event = 'ONCRMREQUISITEADD' AND status = 'done'",
            &[&member_id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_saturated_portal_waits_in_the_delay_queue_not_in_prefetch_slots() {
    // Portals allow one request every two seconds after a burst of 20 (which the
    // installation spends); waits over one second go back to the delay queue. Few
    // prefetch slots, no per-portal cap to help.
    let p = Pipeline::start_with(
        "t-saturated",
        1,
        PortalConfig {
            member_id: SEED_MEMBER.into(),
            rate_per_sec: 0.5,
            burst: 20.0,
            ..PortalConfig::default()
        },
        &[
            ("WORKER_PREFETCH", "4"),
            ("WORKER_PORTAL_IN_FLIGHT", "1000"),
            ("WORKER_BATCH_MAX", "1"),
            ("B24_RATE_PER_SEC", "0.5"),
            ("B24_RATE_BURST", "20"),
            ("WORKER_MAX_LIMITER_WAIT_MS", "1000"),
        ],
    )
    .await;
    p.install_seed_portal().await;
    let other = SimPortal::start(PortalConfig::default()).await;
    install_second_portal(&p, &other, 1).await;
    for id in 1..=12 {
        p.post("/events", &fixtures::requisite_add_numbered(id))
            .await;
    }
    for id in 1001..=1002 {
        let mut e = fixtures::requisite_add_numbered(id);
        e["auth"]["member_id"] = json!(other.member_id());
        p.post("/events", &e).await;
    }
    let other_member = other.member_id();
    let other_done = eventually(Duration::from_secs(20), || async {
        (done_of(&p, &other_member).await == 2).then_some(())
    })
    .await;
    let saturated_done = done_of(&p, SEED_MEMBER).await;
    assert!(
        other_done.is_some(),
        "the other portal's events were served:\n{}",
        p.events_summary().await
    );
    // Sleeping in the limiter, the slow portal's messages would hold all four slots
    // until nearly all of its twelve were done (one per two seconds).
    assert!(
        saturated_done <= 6,
        "the other portal waited for the saturated one ({saturated_done} of 12 done first)"
    );
    p.expect_events("ONCRMREQUISITEADD", "done", 14, Duration::from_secs(120))
        .await;
    let (_, held) = p
        .db_client()
        .await
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE error_code = 'BUDGET_SATURATED')
               FROM events WHERE member_id = $1",
            &[&SEED_MEMBER],
        )
        .await
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
        .unwrap();
    assert!(held > 0, "some waited in the delay queue");
    p.finish().await;
}

#[tokio::test]
async fn tokens_are_sealed_at_rest_and_resealed_under_a_new_key() {
    let mut p = Pipeline::start("t-sealed", 1, &[]).await;
    p.install_seed_portal().await;
    let raw: (String, String) = {
        let r = p
            .db_client()
            .await
            .query_one(
                "SELECT access_token, refresh_token FROM portals WHERE member_id = $1",
                &[&SEED_MEMBER],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let (access, refresh) = p.stored_tokens(SEED_MEMBER).await;
    let (access, refresh) = (access.unwrap(), refresh.unwrap());
    assert!(
        raw.0.starts_with("v1.") && raw.1.starts_with("v1."),
        "{raw:?}"
    );
    assert!(!raw.0.contains(&access) && !raw.1.contains(&refresh));
    // The portal's calls use the real token.
    p.portal.clear_calls();
    p.post("/events", &fixtures::requisite_add()).await;
    p.expect_events("ONCRMREQUISITEADD", "done", 1, WITHIN)
        .await;
    assert!(p
        .portal
        .calls()
        .iter()
        .any(|c| c.kind == CallKind::Rest && c.token.as_deref() == Some(access.as_str())));

    // A row from before sealing existed, in clear text, and a key rotation.
    p.db_client()
        .await
        .execute(
            "UPDATE portals SET refresh_token = $2 WHERE member_id = $1",
            &[&SEED_MEMBER, &refresh],
        )
        .await
        .unwrap();
    for w in &mut p.workers {
        w.stop().await;
    }
    let new_key = "bmV3LWtleS1uZXcta2V5LW5ldy1rZXktbmV3LWtleS0=";
    p.set_worker_env("B24_TOKEN_KEY", new_key);
    p.set_worker_env("B24_TOKEN_KEYS_OLD", TEST_TOKEN_KEY);
    p.add_worker().await;
    let resealed = eventually(WITHIN, || async {
        let r = p
            .db_client()
            .await
            .query_one(
                "SELECT access_token, refresh_token FROM portals WHERE member_id = $1",
                &[&SEED_MEMBER],
            )
            .await
            .ok()?;
        let (a, r): (String, String) = (r.get(0), r.get(1));
        (a.starts_with("v1.") && r.starts_with("v1.") && a != raw.0).then_some((a, r))
    })
    .await
    .expect("re-sealed at start-up");
    let new_id = |s: &str| s.split('.').nth(1).unwrap_or("").to_string();
    assert_ne!(new_id(&resealed.0), new_id(&raw.0), "under the new key");
    assert_eq!(new_id(&resealed.0), new_id(&resealed.1));
    // And the portal still works with the new key only.
    p.post("/events", &fixtures::requisite_add_numbered(2))
        .await;
    p.expect_events("ONCRMREQUISITEADD", "done", 2, WITHIN)
        .await;
    p.finish().await;
}

#[tokio::test]
async fn a_nul_in_an_answer_is_stored_losslessly() {
    let p = Pipeline::start("t-nul", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal
        .set_app_info(json!({"LICENSE": "de_nul\u{0}license", "STATUS": "P"}));
    p.post("/events", &p.seed(&fixtures::app_payment())).await;
    p.expect_events("ONAPPPAYMENT", "done", 1, WITHIN).await;
    let r = p
        .db_client()
        .await
        .query_one(
            "SELECT data->>'LICENSE', raw::text FROM entities WHERE kind = 'app'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "de_nul\u{FFFD}license");
    let raw: String = r.get(1);
    let exact: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        exact["LICENSE"], "de_nul\u{0}license",
        "the exact answer is kept"
    );
    p.finish().await;
}

#[tokio::test]
async fn a_live_domain_belongs_to_one_portal() {
    let p = Pipeline::start("t-domain", 1, &[]).await;
    p.install_seed_portal().await;
    let db = p.db_client().await;
    // Whatever path tries it, the table refuses a second live row on the domain.
    let err = db
        .execute(
            "INSERT INTO portals (member_id, domain, client_endpoint, status)
             VALUES ('someone-else', upper($1), 'https://x/rest/', 'installed')",
            &[&p.portal.domain()],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("23505"), "{err}");
    // An uninstalled row does not hold it.
    db.execute(
        "UPDATE portals SET status = 'uninstalled' WHERE member_id = $1",
        &[&SEED_MEMBER],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO portals (member_id, domain, client_endpoint, status)
         VALUES ('someone-else', $1, 'https://x/rest/', 'installed')",
        &[&p.portal.domain()],
    )
    .await
    .unwrap();
    p.finish().await;
}

#[tokio::test]
async fn an_installation_interrupted_after_its_refresh_resumes_with_the_kept_pair() {
    // One attempt per call: the proof's user.admin fails once after the refresh has
    // consumed the offered token, and the claim comes back from the delay queue.
    let p = Pipeline::start("t-resume", 1, &[("B24_RETRY_ATTEMPTS", "1")]).await;
    p.portal
        .fail_method("user.admin", 1, 500, "INTERNAL_SERVER_ERROR");
    p.install_seed_portal().await;
    let refreshes: Vec<_> = p
        .portal
        .calls()
        .into_iter()
        .filter(|c| c.kind == CallKind::OAuth)
        .collect();
    assert_eq!(refreshes.len(), 1, "the offered token was refreshed once");
    assert_eq!(
        p.calls_of("user.admin").len(),
        2,
        "asked again after the 500"
    );
    let (access, _) = p.stored_tokens(SEED_MEMBER).await;
    assert_eq!(
        p.calls_of("user.admin")[1].token,
        access,
        "the retry used the pair the refresh returned"
    );
    let left: i64 = p
        .db_client()
        .await
        .query_one("SELECT count(*) FROM install_proofs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the kept pair is gone once stored");
    p.finish().await;
}
