use b24_tests::broker::close_connections;
use b24_tests::fixtures;
use b24_tests::http::FORM;
use b24_tests::phpform::http_build_query;
use b24_tests::spawn::{eventually, TestIngress};
use http::StatusCode;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct Tally {
    confirmed_ids: Vec<String>,
    unavailable: usize,
    other: Vec<String>,
}

/// Posts events on `workers` keep-alive loops until `stop` is set.
async fn load(ingress: &TestIngress, workers: usize, stop: Arc<AtomicBool>) -> Tally {
    let body = http_build_query(&fixtures::deal_recurring_expose());
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let http = ingress.http.clone();
        let body = body.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                match http.post("/events", Some(FORM), body.clone()).await {
                    Ok(a) if a.status == StatusCode::OK => {
                        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
                        t.confirmed_ids.push(v["id"].as_str().unwrap().to_string());
                    }
                    Ok(a) if a.status == StatusCode::SERVICE_UNAVAILABLE => {
                        assert_eq!(a.headers["retry-after"], "5");
                        t.unavailable += 1;
                    }
                    Ok(a) => t.other.push(format!("{} {}", a.status, a.body)),
                    Err(e) => t.other.push(e.to_string()),
                }
            }
            t
        }));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        all.confirmed_ids.extend(t.confirmed_ids);
        all.unavailable += t.unavailable;
        all.other.extend(t.other);
    }
    all
}

#[tokio::test]
async fn broker_connection_closed_under_load_gives_503s_never_a_false_200_and_recovers() {
    let ingress = TestIngress::spawn("outage", &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let stop = stop.clone();
        let ingress_ref = &ingress;
        async move { load(ingress_ref, 16, stop).await }
    };
    let breaker = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        // Close it a few times in a row so the outage spans many requests.
        let mut closed = 0;
        for _ in 0..3 {
            closed += close_connections(&format!("b24-ingress/{}", ingress.prefix)).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(
            closed >= 1,
            "the test found the ingress's broker connection"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
    };
    let (tally, ()) = tokio::join!(loader, breaker);

    assert!(
        tally.other.is_empty(),
        "only 200 or 503: {:?}",
        &tally.other[..tally.other.len().min(5)]
    );
    assert!(tally.unavailable > 0, "requests during the outage got 503");
    assert!(!tally.confirmed_ids.is_empty());

    // Every 200 is in the queue. (A 503 may be there too: the broker can store a
    // message whose confirm was lost with the connection; the worker deduplicates.)
    let queued: HashSet<String> = ingress
        .work_messages()
        .await
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    let missing: Vec<_> = tally
        .confirmed_ids
        .iter()
        .filter(|id| !queued.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events got 200 but are not in the queue",
        missing.len()
    );

    // Recovered without a restart: ready again and accepting.
    let ready = eventually(Duration::from_secs(20), || async {
        let a = ingress.http.get("/readyz").await.ok()?;
        a.status.is_success().then_some(())
    })
    .await;
    assert!(ready.is_some(), "ingress reconnected");
    let a = ingress
        .post_form("/events", &fixtures::requisite_add())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let m = ingress.metrics().await;
    // The series exists from the start at 0 (for the alerts); it must have counted.
    let unavailable: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix(r#"b24_ingress_rejections_total{reason="unavailable"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(unavailable > 0, "{m}");
    ingress.finish().await;
}

#[tokio::test]
async fn broker_unreachable_gives_503_with_retry_after_and_not_ready() {
    // Nothing listens on port 1: the ingress starts anyway and refuses honestly.
    let ingress = TestIngress::start(
        "down",
        &[("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
    )
    .await;
    let http = &ingress.http;
    let a = ingress
        .post_form("/events", &fixtures::requisite_add())
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert_eq!(a.headers["retry-after"], "5");
    assert!(a.body.contains("could not be made durable"), "{}", a.body);
    assert_eq!(
        http.get("/readyz").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(http.get("/healthz").await.unwrap().status, StatusCode::OK);
    ingress.finish().await;
}
