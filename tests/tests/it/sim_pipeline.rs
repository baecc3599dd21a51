//! The pipeline helpers that let the simulated portal drive the pipeline as Bitrix24
//! does: installing through the ingress's own install page, events delivered by the
//! portal, seed payloads rewritten to the portal's identity.

use b24_tests::fixtures;
use b24_tests::pipeline::{Pipeline, SEED_MEMBER};
use b24_tests::portal::{Outcome, PortalConfig};
use serde_json::json;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test]
async fn installing_through_the_portal_binds_the_install_events_and_events_then_flow() {
    let p = Pipeline::start_with("s-install", 1, PortalConfig::default(), &[]).await;
    let report = p.install_via_portal().await;
    let events = format!("http://{}/events", p.ingress.addr);
    assert_eq!(
        report.bound,
        [
            ("ONAPPINSTALL".to_string(), events.clone()),
            ("ONAPPUPDATE".to_string(), events.clone()),
        ],
        "the ingress's page binds both to its PUBLIC_URL"
    );
    assert!(report.deliveries[0].delivered(), "{report:?}");
    // The row holds the portal's own application_token (checked by install_via_portal);
    // the portal's events now reach the worker through the ingress.
    let delivered = p.portal.add_requisite(27).await;
    assert!(
        delivered
            .iter()
            .any(|d| matches!(d.outcome, Outcome::Delivered { status: 200, .. })),
        "{delivered:?}"
    );
    assert!(p.wait_events("ONCRMREQUISITEADD", "done", 1, WITHIN).await);
    let stored = p
        .entity(&p.portal.member_id(), "requisite", "27")
        .await
        .expect("requisite stored");
    assert_eq!(
        stored,
        p.portal
            .expected("crm.requisite.get", json!({"id": 27}))
            .unwrap()
    );
    p.finish().await;
}

#[tokio::test]
async fn seed_payloads_are_rewritten_to_the_portals_identity() {
    let p = Pipeline::start_with("s-seed", 1, PortalConfig::default(), &[]).await;
    let portal = &p.portal;

    let event = p.seed(&fixtures::requisite_add());
    let auth = &event["auth"];
    assert_eq!(auth["domain"], json!(portal.domain()));
    assert_eq!(auth["client_endpoint"], json!(portal.client_endpoint()));
    assert_eq!(auth["server_endpoint"], json!(portal.server_endpoint()));
    assert_eq!(auth["member_id"], json!(portal.member_id()));
    assert_eq!(auth["application_token"], json!(portal.application_token()));
    let seeded = fixtures::requisite_add();
    assert_ne!(auth["access_token"], seeded["auth"]["access_token"]);
    assert_eq!(event["data"], seeded["data"], "data untouched");

    // The payment seed keeps its documented shape: no tokens, no application token.
    let payment = p.seed(&fixtures::app_payment());
    assert_eq!(payment["auth"]["domain"], json!(portal.domain()));
    assert!(payment["auth"].get("application_token").is_none());
    assert!(payment["auth"].get("access_token").is_none());

    let widget = p.seed(&fixtures::placements()[1]);
    assert_eq!(widget["DOMAIN"], json!(portal.domain()));
    assert_eq!(widget["member_id"], json!(portal.member_id()));
    assert_eq!(widget["PROTOCOL"], "0");
    assert_eq!(
        widget["PLACEMENT_OPTIONS"],
        fixtures::placements()[1]["PLACEMENT_OPTIONS"]
    );

    // Posted after an install through the portal, a seeded event is the portal's own.
    p.install_via_portal().await;
    let event = p.seed(&fixtures::requisite_add());
    p.post("/events", &event).await;
    assert!(p.wait_events("ONCRMREQUISITEADD", "done", 1, WITHIN).await);
    p.finish().await;
}

#[tokio::test]
async fn the_older_install_helper_lets_the_portal_deliver_with_the_stored_token() {
    let p = Pipeline::start("s-legacy", 1, &[]).await;
    p.install_seed_portal().await;
    assert!(p.portal.is_installed());
    let delivered = p.portal.add_requisite(31).await;
    assert!(delivered.iter().any(|d| d.delivered()), "{delivered:?}");
    assert!(p.wait_events("ONCRMREQUISITEADD", "done", 1, WITHIN).await);
    assert!(p.entity(SEED_MEMBER, "requisite", "31").await.is_some());
    p.finish().await;
}
