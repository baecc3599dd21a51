use b24_tests::fixtures;
use b24_tests::pipeline::{Pipeline, SEED_APP_TOKEN, SEED_MEMBER};
use b24_tests::portal::{CallKind, PortalConfig};
use serde_json::json;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test]
async fn install_verifies_tokens_stores_the_portal_and_binds_handlers() {
    let p = Pipeline::start("w-install", 1, &[]).await;
    p.install_seed_portal().await;
    let db = p.db_client().await;
    let row = db
        .query_one(
            "SELECT domain, client_endpoint, access_token IS NOT NULL, refresh_token IS NOT NULL,
                    application_token_sha256, status FROM portals WHERE member_id = $1",
            &[&SEED_MEMBER],
        )
        .await
        .unwrap();
    // The domain is the host of the endpoint the authorization server reported.
    assert_eq!(row.get::<_, String>(0), p.portal.domain());
    assert_eq!(row.get::<_, String>(1), p.portal.client_endpoint());
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    assert_eq!(
        row.get::<_, String>(4),
        b24_shared::portals::token_digest(SEED_APP_TOKEN)
    );
    assert_eq!(row.get::<_, String>(5), "installed");
    // Proved before anything was stored: a refresh with our client credentials at the
    // portal's authorization server, then user.admin and app.info with the new token.
    let calls = p.portal.calls();
    let proof: Vec<&str> = calls.iter().take(3).map(|c| c.method.as_str()).collect();
    assert_eq!(proof, ["oauth.token", "user.admin", "app.info"]);
    // The pair stored is the one the refresh returned, not the offered one.
    let (access, _) = p.stored_tokens(SEED_MEMBER).await;
    assert_eq!(calls[1].token, access);
    let handler = format!("http://{}/events", p.ingress.addr);
    let bound: Vec<String> = p
        .portal
        .event_bindings()
        .iter()
        .filter(|b| b["handler"] == handler.as_str())
        .map(|b| b["event"].as_str().unwrap_or("").to_ascii_uppercase())
        .collect();
    for e in [
        "ONCRMDEALRECURRINGEXPOSE",
        "ONCRMREQUISITEADD",
        "ONAPPPAYMENT",
        "ONAPPUNINSTALL",
        "ONAPPUPDATE",
    ] {
        assert!(bound.iter().any(|b| b == e), "{e} bound: {bound:?}");
    }
    // Six CRM types and one per smart-process type (the portal has type 183).
    let placements: Vec<String> = p
        .portal
        .placement_bindings()
        .iter()
        .map(|b| b["placement"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(placements.len(), 7, "{placements:?}");
    assert!(placements.contains(&"CRM_DYNAMIC_183_DETAIL_ACTIVITY".to_string()));
    p.finish().await;
}

#[tokio::test]
async fn deal_recurring_seed_stores_the_new_deal_and_its_template() {
    // The documentation's batch result_time entries carry no operating time; this
    // portal sends it, to check the worker keeps it when Bitrix24 does.
    let p = Pipeline::start_with(
        "w-deal",
        1,
        PortalConfig {
            member_id: SEED_MEMBER.into(),
            batch_operating: true,
            ..PortalConfig::default()
        },
        &[],
    )
    .await;
    p.install_seed_portal().await;
    p.portal.clear_calls();
    p.post("/events", &fixtures::deal_recurring_expose()).await;
    assert!(
        p.wait_events("ONCRMDEALRECURRINGEXPOSE", "done", 1, WITHIN)
            .await
    );

    let deal = p
        .entity(SEED_MEMBER, "deal", "6799")
        .await
        .expect("deal stored");
    assert_eq!(
        deal,
        p.portal
            .expected("crm.deal.get", json!({"id": 6799}))
            .unwrap()
    );
    let template = p
        .entity(SEED_MEMBER, "deal_recurring", "9")
        .await
        .expect("template stored");
    assert_eq!(
        template,
        p.portal
            .expected("crm.deal.recurring.get", json!({"id": 9}))
            .unwrap()
    );
    assert!(
        template["PARAMS"].is_object(),
        "PARAMS kept whole: {template}"
    );
    // Both calls of the event travel in one batch request.
    let calls = p.portal.calls();
    let commands: Vec<(String, serde_json::Value)> = calls
        .iter()
        .filter(|c| c.kind == CallKind::BatchCommand)
        .map(|c| (c.method.clone(), c.params.clone()))
        .collect();
    assert_eq!(
        commands,
        [
            ("crm.deal.get".to_string(), json!({"id": "6799"})),
            ("crm.deal.recurring.get".to_string(), json!({"id": "9"})),
        ],
        "exactly these calls"
    );
    let requests: Vec<&str> = calls
        .iter()
        .filter(|c| c.kind == CallKind::Rest)
        .map(|c| c.method.as_str())
        .collect();
    assert_eq!(requests, ["batch"]);
    // Each method's execution time, from the batch's result_time, is kept.
    let operating: f64 = p
        .db_client()
        .await
        .query_one(
            "SELECT operating FROM method_budgets WHERE member_id = $1 AND method = 'crm.deal.get'",
            &[&SEED_MEMBER],
        )
        .await
        .unwrap()
        .get(0);
    assert!(operating > 0.0);
    assert!(
        (operating - p.portal.operating("crm.deal.get")).abs() < 1e-6,
        "{operating}"
    );
    p.finish().await;
}

#[tokio::test]
async fn requisite_seed_stores_the_requisite() {
    let p = Pipeline::start("w-req", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal.clear_calls();
    p.post("/events", &fixtures::requisite_add()).await;
    assert!(p.wait_events("ONCRMREQUISITEADD", "done", 1, WITHIN).await);
    let r = p
        .entity(SEED_MEMBER, "requisite", "27")
        .await
        .expect("requisite stored");
    assert_eq!(
        r,
        p.portal
            .expected("crm.requisite.get", json!({"id": 27}))
            .unwrap()
    );
    assert_eq!(p.calls_of("crm.requisite.get").len(), 1);
    p.finish().await;
}

#[tokio::test]
async fn payment_without_tokens_uses_the_stored_ones() {
    let p = Pipeline::start("w-pay", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal
        .set_app_info(json!({"STATUS": "P", "PAYMENT_EXPIRED": "N", "DAYS": 28}));
    let (stored_token, _) = p.stored_tokens(SEED_MEMBER).await;
    let stored_token = stored_token.expect("the portal holds tokens");
    p.portal.clear_calls();
    // The seed names the portal by its domain alone, as Bitrix24 sends it.
    p.post("/events", &p.seed(&fixtures::app_payment())).await;
    assert!(p.wait_events("ONAPPPAYMENT", "done", 1, WITHIN).await);
    let calls = p.calls_of("app.info");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].token.as_deref(), Some(stored_token.as_str()));
    // One row per portal, keyed by the application's own code from app.info, not
    // by the event's CODE (anyone can send one).
    let app = p
        .entity(SEED_MEMBER, "app", &p.portal.client_id())
        .await
        .expect("app stored");
    assert_eq!(app["STATUS"], "P");
    let row = p
        .db_client()
        .await
        .query_one(
            "SELECT app_status, payment_expired, days_left FROM portals WHERE member_id = $1",
            &[&SEED_MEMBER],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("P"));
    assert_eq!(row.get::<_, Option<bool>>(1), Some(false));
    assert_eq!(row.get::<_, Option<i32>>(2), Some(28));
    p.finish().await;
}

#[tokio::test]
async fn every_placement_seed_fetches_its_crm_item() {
    let member = "da45a03b265edd8787f8a258d793cc5d";
    let p = Pipeline::start_with(
        "w-place",
        1,
        PortalConfig {
            member_id: member.into(),
            ..PortalConfig::default()
        },
        &[],
    )
    .await;
    p.install(member, &p.portal.domain()).await;
    let seeds: Vec<_> = fixtures::placements()
        .into_iter()
        .filter(|s| s["member_id"] == member)
        .collect();
    assert_eq!(seeds.len(), 6);
    // Each opened by the portal's administrator, with their own tokens: the worker
    // fetches as that user and never with the portal's.
    for s in &seeds {
        p.post("/placement", &p.seed(s)).await;
    }
    assert!(p.wait_placements(6).await);
    for (type_id, id) in [
        (1, 6591),
        (2, 3473),
        (3, 13037),
        (4, 2946),
        (7, 5),
        (183, 3),
    ] {
        let item = p
            .entity(member, &format!("crm_item:{type_id}"), &id.to_string())
            .await
            .unwrap_or_else(|| panic!("crm_item:{type_id}/{id} stored"));
        let expected = p
            .portal
            .expected("crm.item.get", json!({"entityTypeId": type_id, "id": id}))
            .unwrap();
        assert_eq!(item, expected["item"]);
    }
    p.finish().await;
}

trait PlacementWait {
    async fn wait_placements(&self, n: i64) -> bool;
}

impl PlacementWait for Pipeline {
    async fn wait_placements(&self, n: i64) -> bool {
        let db = self.db_client().await;
        b24_tests::spawn::eventually(WITHIN, || async {
            let row = db
                .query_one(
                    "SELECT count(*) FROM events WHERE kind = 'placement' AND status = 'done'",
                    &[],
                )
                .await
                .ok()?;
            (row.get::<_, i64>(0) >= n).then_some(())
        })
        .await
        .is_some()
    }
}
