//! The real `ingress` binary, sent a real SIGTERM under load: every event that got a
//! 200 is in the queue, and the process exits cleanly.

use b24_shared::amqp::Topology;
use b24_tests::{broker, spawn};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BODY: &str = "event=ONCRMREQUISITEADD&data%5BFIELDS%5D%5BID%5D=27&ts=1466439714\
&auth%5Bdomain%5D=some-domain.bitrix24.com&auth%5Bmember_id%5D=a223c6b3710f85df22e9377d6c4f7553\
&auth%5Bapplication_token%5D=51856fefc120afa4b628cc82d3935cce";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn sigterm_under_load_keeps_every_acknowledged_event() {
    let prefix = spawn::unique_prefix("sigterm-bin");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ingress"))
        .env("AMQP_PREFIX", &prefix)
        .env("AMQP_URL", broker::amqp_url())
        .env("INGRESS_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ingress starts");
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let base = format!("http://127.0.0.1:{port}");

    // Ready: connected to the broker.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = http::Request::get(format!("{base}/readyz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(r) = client.request(req).await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "ingress ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = client.clone();
        let url = format!("{base}/events");
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            for _ in 0..100_000 {
                let req = http::Request::post(&url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from_static(BODY.as_bytes())))
                    .unwrap();
                let Ok(resp) = client.request(req).await else {
                    break;
                };
                let status = resp.status();
                let Ok(body) = resp.into_body().collect().await else {
                    break;
                };
                if status == 200 {
                    let v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap();
                    ok.push(v["id"].as_str().unwrap().to_string());
                } else {
                    assert!(!status.is_success());
                }
            }
            ok
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    spawn::sigterm(&child);
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");

    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(acked.len() > 10, "the load ran: {}", acked.len());

    let lost = broker::lost_of(&Topology::new(prefix.as_str()).work_queue(), &acked)
        .await
        .unwrap();
    broker::delete_topology(&prefix).await.unwrap();
    assert_eq!(
        lost.len(),
        0,
        "{} of {} acknowledged events lost",
        lost.len(),
        acked.len()
    );
}
