//! Every metric the Grafana dashboard and the Prometheus alerts query must exist in
//! what the binaries actually expose, or a panel stays empty and an alert never fires.

use b24_tests::fixtures;
use b24_tests::http::{HttpClient, FORM};
use b24_tests::pipeline::Pipeline;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

/// `b24_…` metric names referenced under deploy/ (histogram suffixes stripped).
fn referenced() -> BTreeSet<String> {
    let root = format!("{}/../deploy", env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![format!("{root}/prometheus/alerts.yml")];
    for entry in std::fs::read_dir(format!("{root}/grafana/dashboards")).unwrap() {
        files.push(entry.unwrap().path().display().to_string());
    }
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("b24_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_string());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_exposed() {
    let wanted = referenced();
    assert!(wanted.len() >= 10, "found the references: {wanted:?}");

    // Traffic that touches every family: accepted and refused requests, batches,
    // a retry, a dropped forgery, a dead letter (a poison message), an expired token
    // and its refresh.
    let p = Pipeline::start("metrics", 1, &[("B24_RETRY_ATTEMPTS", "1")]).await;
    p.install_seed_portal().await;
    p.post("/events", &fixtures::deal_recurring_expose()).await;
    // Settled first, so the injected 500 below hits the requisite, not this batch.
    assert!(
        p.wait_events(
            "ONCRMDEALRECURRINGEXPOSE",
            "done",
            1,
            Duration::from_secs(30)
        )
        .await
    );
    let _ = p.ingress.http.post("/events", Some(FORM), "event=").await;
    let mut forged = fixtures::requisite_add_numbered(1);
    forged["auth"]["application_token"] = json!("00000000000000000000000000000000");
    p.publish_unchecked(&forged).await;
    b24_tests::broker::publish_raw(
        &p.ingress.topology.exchange(),
        "event.garbage",
        b"{\"not\": \"an envelope\"",
    )
    .await
    .unwrap();
    p.portal.fail_next(1, 500, "INTERNAL_SERVER_ERROR");
    p.post("/events", &fixtures::requisite_add_numbered(2))
        .await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "retrying", 1, Duration::from_secs(30))
            .await
    );
    p.portal.expire_access_tokens();
    p.post("/events", &fixtures::requisite_add_numbered(3))
        .await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "done", 2, Duration::from_secs(30))
            .await
    );

    let exposed = format!(
        "{}\n{}",
        p.ingress.metrics().await,
        HttpClient::new(p.workers[0].metrics_addr)
            .get("/metrics")
            .await
            .unwrap()
            .body
    );
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|m| !exposed.contains(&format!("\n{m}")) && !exposed.starts_with(m.as_str()))
        .collect();
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}");
    p.finish().await;
}
