//! Worker benchmarks against the simulated portal (2 req/s, burst 50), with the real
//! ingress, worker, RabbitMQ and PostgreSQL in this process:
//!
//! 1. budget: REST requests/s sustained for one portal with 1 and 4 worker replicas,
//!    batching off (one request per event), and the share of 503s.
//! 2. batching: 1,000 ONCRMDEALRECURRINGEXPOSE events (2,000 calls) for one portal:
//!    REST requests used and wall time.
//!
//! Usage: bench_worker [budget|batching|all] [--seconds N]   (default: all, 60 s)

use b24_tests::fixtures;
use b24_tests::pipeline::Pipeline;
use b24_tests::portal::CallKind;
use serde_json::Value;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("all");
    let seconds: u64 = match args.iter().position(|a| a == "--seconds") {
        Some(i) => args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(60),
        None => 60,
    };
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model()
    );
    if which == "budget" || which == "all" {
        for replicas in [1, 4] {
            budget(replicas, seconds).await;
        }
    }
    if which == "batching" || which == "all" {
        batching(1000).await;
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

async fn post_all(p: &Pipeline, events: Vec<Value>) {
    for chunk in events.chunks(64) {
        futures_util::future::join_all(chunk.iter().map(|e| p.post("/events", e))).await;
    }
}

/// Sustained request rate for one portal, batching off.
async fn budget(replicas: usize, seconds: u64) {
    let p = Pipeline::start("bench-budget", replicas, &[("WORKER_BATCH_MAX", "1")]).await;
    p.install_seed_portal().await;
    p.portal.clear_calls();
    // Enough work to keep the budget saturated for `seconds` after the burst.
    let events = 50 + 2 * seconds + 20;
    post_all(
        &p,
        (1..=events).map(fixtures::requisite_add_numbered).collect(),
    )
    .await;
    p.wait_events(
        "ONCRMREQUISITEADD",
        "done",
        events as i64,
        Duration::from_secs(seconds * 3 + 120),
    )
    .await;
    let calls: Vec<_> = p
        .portal
        .calls()
        .into_iter()
        .filter(|c| c.kind == CallKind::Rest)
        .collect();
    let ok: Vec<Instant> = calls
        .iter()
        .filter(|c| c.status == 200)
        .map(|c| c.at)
        .collect();
    let limited = calls
        .iter()
        .filter(|c| c.error.as_deref() == Some("QUERY_LIMIT_EXCEEDED"))
        .count();
    // Steady state: from the 60th successful request (the burst is spent) to the last.
    let (from, to) = (ok[59.min(ok.len() - 1)], ok[ok.len() - 1]);
    let window = to.duration_since(from).as_secs_f64();
    let steady = (ok.len() - 60) as f64 / window;
    println!(
        "budget: replicas={replicas} events={events} requests={} ok={} 503={} ({:.2}%) \
         steady={steady:.3} req/s over {window:.1} s = {:.1}% of the 2 req/s limit",
        calls.len(),
        ok.len(),
        limited,
        100.0 * limited as f64 / calls.len() as f64,
        100.0 * steady / 2.0
    );
    p.finish().await;
}

/// 1,000 events of two calls each, batching on.
async fn batching(events: u64) {
    let p = Pipeline::start("bench-batch", 1, &[]).await;
    p.install_seed_portal().await;
    p.portal.clear_calls();
    let started = Instant::now();
    post_all(
        &p,
        (0..events)
            .map(fixtures::deal_recurring_expose_numbered)
            .collect(),
    )
    .await;
    let posted = started.elapsed();
    let done = p
        .wait_events(
            "ONCRMDEALRECURRINGEXPOSE",
            "done",
            events as i64,
            Duration::from_secs(600),
        )
        .await;
    let wall = started.elapsed();
    let calls = p.portal.calls();
    let requests = calls.iter().filter(|c| c.kind == CallKind::Rest).count();
    let commands = calls
        .iter()
        .filter(|c| c.kind == CallKind::BatchCommand)
        .count();
    let limited = calls
        .iter()
        .filter(|c| c.error.as_deref() == Some("QUERY_LIMIT_EXCEEDED"))
        .count();
    // One request per call would need (calls - burst) / rate seconds at best.
    let unbatched = (2.0 * events as f64 - 50.0) / 2.0;
    println!(
        "batching: events={events} all_done={done} calls={} requests={requests} 503={limited} \
         wall={:.1} s (posting {:.1} s); one request per call would need >= {unbatched:.0} s, \
         {:.0}x longer",
        commands,
        wall.as_secs_f64(),
        posted.as_secs_f64(),
        unbatched / wall.as_secs_f64()
    );
    p.finish().await;
}
