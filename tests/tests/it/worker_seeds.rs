use b24_tests::fixtures;
use b24_tests::pipeline::{Pipeline, SEED_DOMAIN, SEED_MEMBER};
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
                    application_token, status FROM portals WHERE member_id = $1",
            &[&SEED_MEMBER],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "some-domain.bitrix24.com");
    assert_eq!(row.get::<_, String>(1), p.portal.client_endpoint());
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    assert_eq!(row.get::<_, String>(4), "51856fefc120afa4b628cc82d3935cce");
    assert_eq!(row.get::<_, String>(5), "installed");
    // Verified with one authorized call before anything was stored.
    let first = &p.portal.calls()[0];
    assert_eq!(first.method, "app.info");
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
    ] {
        assert!(bound.iter().any(|b| b == e), "{e} bound: {bound:?}");
    }
    assert_eq!(p.portal.placement_bindings().len(), 6);
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
            domain: SEED_DOMAIN.into(),
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
    let stored_token: String = p
        .db_client()
        .await
        .query_one(
            "SELECT access_token FROM portals WHERE member_id = $1",
            &[&SEED_MEMBER],
        )
        .await
        .unwrap()
        .get(0);
    p.portal.clear_calls();
    p.post("/events", &fixtures::app_payment()).await;
    assert!(p.wait_events("ONAPPPAYMENT", "done", 1, WITHIN).await);
    let calls = p.calls_of("app.info");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].token.as_deref(), Some(stored_token.as_str()));
    let app = p
        .entity(SEED_MEMBER, "app", "bitrix.gds_company")
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
            domain: "xxx.bitrix24.com".into(),
            ..PortalConfig::default()
        },
        &[],
    )
    .await;
    p.install(member, "xxx.bitrix24.com").await;
    let seeds: Vec<_> = fixtures::placements()
        .into_iter()
        .filter(|s| s["member_id"] == member)
        .collect();
    assert_eq!(seeds.len(), 6);
    for s in &seeds {
        p.post("/placement", s).await;
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
