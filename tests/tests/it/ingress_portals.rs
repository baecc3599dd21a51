//! The edge's check of the portal an event claims, against the `portals` table the
//! worker keeps: unknown portals are refused (install events aside, and portals being
//! installed), forged tokens get 401, and a changed token is read again before a 401.

use b24_shared::{db, Secret};
use b24_tests::fixtures;
use b24_tests::pipeline::TestDb;
use b24_tests::spawn::{eventually, TestIngress};
use http::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const KNOWN: &str = "a223c6b3710f85df22e9377d6c4f7553";
const TOKEN: &str = "51856fefc120afa4b628cc82d3935cce";
const UNKNOWN: &str = "0000aaaabbbbccccddddeeeeffff0000";

/// A migrated database of its own, as the worker would have made it.
async fn portals_db(tag: &str) -> (TestDb, tokio_postgres::Client) {
    let test_db = TestDb::new(tag);
    let url = Secret::new(test_db.url.clone());
    db::create_database_if_missing(&url).await.unwrap();
    db::migrate(&db::pool(&url, 1).unwrap()).await.unwrap();
    let client = test_db.client().await;
    (test_db, client)
}

/// A portals row as the worker writes it, installed `installed_ago` ago.
async fn store_portal(
    db: &tokio_postgres::Client,
    member_id: &str,
    application_token: Option<&str>,
    status: &str,
    installed_ago: Duration,
) {
    db.execute(
        "INSERT INTO portals (member_id, domain, client_endpoint, application_token_sha256,
                              status, installed_at)
         VALUES ($1, $1 || '.bitrix24.com', 'https://' || $1 || '.bitrix24.com/rest/', $2, $3,
                 now() - make_interval(secs => $4))",
        &[
            &member_id,
            &application_token.map(b24_shared::portals::token_digest),
            &status,
            &installed_ago.as_secs_f64(),
        ],
    )
    .await
    .unwrap();
}

async fn set_token(db: &tokio_postgres::Client, member_id: &str, token: &str) {
    db.execute(
        "UPDATE portals SET application_token_sha256 = $2 WHERE member_id = $1",
        &[&member_id, &b24_shared::portals::token_digest(token)],
    )
    .await
    .unwrap();
}

fn event_of(mut event: Value, member_id: &str, token: Option<&str>) -> Value {
    event["auth"]["member_id"] = json!(member_id);
    match token {
        Some(t) => event["auth"]["application_token"] = json!(t),
        None => {
            event["auth"]
                .as_object_mut()
                .unwrap()
                .remove("application_token");
        }
    }
    event
}

fn placement_of(member_id: &str) -> Value {
    let mut call = fixtures::placements()[1].clone();
    call["member_id"] = json!(member_id);
    call
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn events_of_unknown_portals_are_refused_and_install_events_pass() {
    let (test_db, db) = portals_db("unknown").await;
    store_portal(&db, KNOWN, Some(TOKEN), "installed", HOUR).await;
    let gone = "1111aaaabbbbccccddddeeeeffff1111";
    store_portal(&db, gone, Some(TOKEN), "uninstalled", HOUR).await;
    let tokenless = "2222aaaabbbbccccddddeeeeffff2222";
    store_portal(&db, tokenless, None, "installed", HOUR).await;
    let ingress = TestIngress::spawn("unknown", &[("DATABASE_URL", &test_db.url)]).await;

    // Refused: no row, an uninstalled row, a row without a token long after its
    // installation, and the same for a widget call.
    for member in [UNKNOWN, gone, tokenless] {
        for event in [
            fixtures::requisite_add(),
            fixtures::deal_recurring_expose(),
            json!({"event": "ONAPPUNINSTALL", "data": {"CLEAN": "0"}, "auth": {}}),
        ] {
            let a = ingress
                .post_form("/events", &event_of(event, member, Some(TOKEN)))
                .await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{member}: {}", a.body);
            assert!(a.body.contains("not installed"), "{}", a.body);
            assert_eq!(a.body.trim_end().lines().count(), 1);
        }
        let a = ingress.post_form("/placement", &placement_of(member)).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{member}: {}", a.body);
    }

    // Passed on for the worker to verify: installation events, the install page, and
    // ONAPPPAYMENT (no token, maybe no member_id).
    let install = event_of(fixtures::app_install(), UNKNOWN, Some("new-token"));
    let update = event_of(fixtures::app_update(), UNKNOWN, Some("new-token"));
    let mut page = fixtures::install();
    page["member_id"] = json!(UNKNOWN);
    for (path, body) in [
        ("/events", &install),
        ("/events", &update),
        ("/events", &fixtures::app_payment()),
        ("/install", &page),
        ("/placement", &placement_of(KNOWN)),
        (
            "/events",
            &event_of(fixtures::requisite_add(), KNOWN, Some(TOKEN)),
        ),
    ] {
        let a = ingress.post_form(path, body).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.body);
    }

    // A widget call always carries the user's AUTH_ID; one without it is refused.
    let mut no_auth = placement_of(KNOWN);
    no_auth.as_object_mut().unwrap().remove("AUTH_ID");
    let a = ingress.post_form("/placement", &no_auth).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("AUTH_ID"), "{}", a.body);

    // An event of a known portal without its token is as good as a forged one.
    let a = ingress
        .post_form("/events", &event_of(fixtures::requisite_add(), KNOWN, None))
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);

    let queued: BTreeSet<String> = ingress
        .work_messages()
        .await
        .into_iter()
        .map(|e| e.event)
        .collect();
    let expected: BTreeSet<String> = [
        "ONAPPINSTALL",
        "ONAPPUPDATE",
        "ONAPPPAYMENT",
        "INSTALL",
        "CRM_DEAL_DETAIL_ACTIVITY",
        "ONCRMREQUISITEADD",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(queued, expected);
    let m = ingress.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"b24_ingress_rejections_total{reason="unknown_portal"}"#
        ),
        12,
        "{m}"
    );
    ingress.finish().await;
    test_db.drop_db().await;
}

#[tokio::test]
async fn a_portal_being_installed_gets_its_events_through() {
    let (test_db, db) = portals_db("installing").await;
    // Just installed, its ONAPPINSTALL (which brings the token) not processed yet.
    let fresh = "3333aaaabbbbccccddddeeeeffff3333";
    store_portal(&db, fresh, None, "installed", Duration::ZERO).await;
    // Just installed, and its token already stored: a forged event is refused at once.
    let settled = "4444aaaabbbbccccddddeeeeffff4444";
    store_portal(&db, settled, Some("its-token"), "installed", Duration::ZERO).await;
    // Installed long ago and never given a token: not being installed any more.
    let stale = "5555aaaabbbbccccddddeeeeffff5555";
    store_portal(&db, stale, None, "installed", HOUR).await;
    let ingress = TestIngress::spawn(
        "installing",
        &[
            ("DATABASE_URL", &test_db.url),
            ("INGRESS_INSTALL_GRACE_MS", "60000"),
        ],
    )
    .await;

    for (member, token) in [(fresh, "new-token"), (settled, "its-token")] {
        let a = ingress
            .post_form(
                "/events",
                &event_of(fixtures::requisite_add(), member, Some(token)),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{member}: {}", a.body);
        let a = ingress.post_form("/placement", &placement_of(member)).await;
        assert_eq!(a.status, StatusCode::OK, "{member}: {}", a.body);
    }
    let a = ingress
        .post_form(
            "/events",
            &event_of(fixtures::requisite_add(), settled, Some("forged")),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    let a = ingress
        .post_form(
            "/events",
            &event_of(fixtures::requisite_add(), stale, Some("new-token")),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert_eq!(ingress.work_messages().await.len(), 4);
    ingress.finish().await;
    test_db.drop_db().await;
}

#[tokio::test]
async fn a_changed_token_is_read_again_before_answering_401() {
    let (test_db, db) = portals_db("reread").await;
    store_portal(&db, KNOWN, Some("token-a"), "installed", HOUR).await;
    let ingress = TestIngress::spawn("reread", &[("DATABASE_URL", &test_db.url)]).await;
    let with = |token: &str| event_of(fixtures::requisite_add(), KNOWN, Some(token));

    let a = ingress.post_form("/events", &with("token-a")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    // A reinstall stores a new token; the cache still holds the old one.
    set_token(&db, KNOWN, "token-b").await;
    let accepted = eventually(Duration::from_secs(5), || async {
        let a = ingress.post_form("/events", &with("token-b")).await;
        (a.status == StatusCode::OK).then_some(())
    })
    .await;
    assert!(
        accepted.is_some(),
        "the new token is accepted within seconds, not after the cache's lifetime"
    );
    let a = ingress.post_form("/events", &with("token-a")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);

    // Forged tokens in a flood do not each cost a database read.
    let before = metric(
        &ingress.metrics().await,
        r#"b24_ingress_portal_lookups_total{outcome="found"}"#,
    );
    let flood = std::time::Instant::now();
    for _ in 0..50 {
        let a = ingress.post_form("/events", &with("forged")).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    }
    let seconds = flood.elapsed().as_secs();
    let after = metric(
        &ingress.metrics().await,
        r#"b24_ingress_portal_lookups_total{outcome="found"}"#,
    );
    assert!(
        after - before <= seconds + 1,
        "{} reads for 50 forged events in {seconds} s: at most one a second",
        after - before
    );
    ingress.finish().await;
    test_db.drop_db().await;
}
