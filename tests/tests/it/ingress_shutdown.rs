use b24_tests::fixtures;
use b24_tests::http::FORM;
use b24_tests::phpform::http_build_query;
use b24_tests::spawn::TestIngress;
use http::StatusCode;
use std::time::Duration;

/// SIGTERM under load: the app stops accepting, and every request that got a 200
/// before it exited is in the queue. Requests cut off get an error, never a 200.
#[tokio::test]
async fn shutdown_under_load_keeps_every_acknowledged_event() {
    let mut ingress = TestIngress::spawn("sigterm", &[]).await;
    let body = http_build_query(&fixtures::deal_recurring_expose());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let http = ingress.http.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut refused = 0usize;
            // Bounded: the loop ends when the server is gone (connection errors).
            for _ in 0..100_000 {
                match http.post("/events", Some(FORM), body.clone()).await {
                    Ok(a) if a.status == StatusCode::OK => {
                        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
                        ok.push(v["id"].as_str().unwrap().to_string());
                    }
                    Ok(a) => {
                        assert!(!a.status.is_success(), "{}", a.status);
                        refused += 1;
                    }
                    Err(_) => break,
                }
            }
            (ok, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stop = ingress.stop_handle().unwrap();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(40), ingress.join())
        .await
        .expect("drained within the grace period");

    let mut acked = Vec::new();
    for t in tasks {
        let (ok, _refused) = t.await.unwrap();
        acked.extend(ok);
    }
    assert!(acked.len() > 10, "the load ran: {} events", acked.len());
    let lost = b24_tests::broker::lost_of(&ingress.topology.work_queue(), &acked)
        .await
        .unwrap();
    assert_eq!(
        lost.len(),
        0,
        "{} of {} acknowledged events lost",
        lost.len(),
        acked.len()
    );
    ingress.finish().await;
}
