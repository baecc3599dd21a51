//! The real `worker` binary, sent a real SIGTERM while it holds deliveries: it finishes
//! and acks them, exits cleanly, and every other event is still in the queue for the
//! next worker. Nothing is lost and nothing is stored twice.

use b24_tests::pipeline::Pipeline;
use b24_tests::{fixtures, spawn};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EVENTS: i64 = 30;

async fn count(p: &Pipeline, status: &str) -> i64 {
    p.db_client()
        .await
        .query_one(
            "SELECT count(*) FROM events WHERE event = 'ONCRMREQUISITEADD' AND status = $1",
            &[&status],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn sigterm_finishes_deliveries_in_hand_and_loses_none() {
    let mut p = Pipeline::start("w-sigterm-bin", 1, &[]).await;
    p.install_seed_portal().await;
    // From here on the binary is the only consumer.
    p.workers[0].stop().await;
    p.workers.clear();
    for id in 1..=EVENTS as u64 {
        p.post("/events", &fixtures::requisite_add_numbered(id))
            .await;
    }
    // Slow calls, few in hand at once: the signal lands mid-call with events waiting.
    p.portal.set_delay(Duration::from_millis(400));
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .envs(p.worker_env())
        .env("WORKER_PREFETCH", "4")
        .env("WORKER_BATCH_MAX", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker starts");

    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&p, "processing").await == 0 {
        assert!(Instant::now() < deadline, "the worker took deliveries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    spawn::sigterm(&child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "worker exits within its grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");

    // Every delivery it held was finished, none abandoned half-way.
    assert_eq!(
        count(&p, "processing").await,
        0,
        "no event left in processing"
    );
    let done_by_binary = count(&p, "done").await;
    assert!(
        (1..EVENTS).contains(&done_by_binary),
        "stopped mid-queue: {done_by_binary} of {EVENTS} done"
    );

    // The rest waited in the queue: a new worker stores them, each once.
    p.portal.set_delay(Duration::ZERO);
    p.add_worker().await;
    assert!(
        p.wait_events("ONCRMREQUISITEADD", "done", EVENTS, Duration::from_secs(60))
            .await,
        "all {EVENTS} events done"
    );
    let db = p.db_client().await;
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT entity_id) FROM entities WHERE kind = 'requisite'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), EVENTS);
    assert_eq!(row.get::<_, i64>(1), EVENTS);
    let fetched = p.calls_of("crm.requisite.get").len() as i64;
    assert_eq!(fetched, EVENTS, "each requisite fetched once: {fetched}");
    p.finish().await;
}
