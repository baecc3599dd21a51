/// The demo a new user runs shows every seed stored.
#[tokio::test]
async fn the_demo_stores_every_seed_and_says_where() {
    let (p, report) = b24_tests::demo::run().await;
    let text = report.render();
    let kinds: Vec<&str> = report.entities.iter().map(|(k, _, _)| k.as_str()).collect();
    for kind in [
        "app",
        "crm_item:1",
        "crm_item:2",
        "crm_item:3",
        "crm_item:4",
        "crm_item:7",
        "crm_item:31",
        "crm_item:183",
        "deal",
        "deal_recurring",
        "requisite",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing:\n{text}");
    }
    assert!(
        report.events.iter().all(|(_, s)| s == "done"),
        "every event done:\n{text}"
    );
    assert_eq!(report.portals.len(), 1);
    assert_eq!(report.portals[0].3.as_deref(), Some("P"));
    assert!(text.contains("/metrics"));
    p.finish().await;
}
