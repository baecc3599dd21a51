//! Load generator for the ingress: N keep-alive HTTP/1.1 connections, one per task,
//! POST realistic form-encoded ONCRMDEALRECURRINGEXPOSE events to `/events`.
//!
//! Closed loop by default: each connection sends its next event when the previous
//! answer arrived, so N is the in-flight window and the result is the maximum rate.
//! With `--rate`, open loop: requests are due at a fixed total rate and latency is
//! measured from when each was *due*, not sent, so a stalled server shows up in the
//! percentiles instead of silently slowing the generator (coordinated omission).
//! With `--idle N`, it opens N connections, sends one event on each, holds them open
//! while the bench script reads the ingress's RSS, then checks they all still answer.

use anyhow::Context;
use b24_tests::bench::{self, DealExposeForm, Flags, Schedule, Tally, Window};
use b24_tests::http::FORM;
use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const USAGE: &str = "usage: loadgen [--target HOST:PORT] [--connections N] [--duration SECS] \
[--warmup SECS] [--rate REQ_PER_SEC] [--idle N] [--threads N]
  --target       ingress address (default 127.0.0.1:8080)
  --connections  keep-alive connections, i.e. requests in flight (default 32)
  --duration     measured seconds (default 10); with --idle, seconds to hold (default 10)
  --warmup       seconds run first and not counted (default 2)
  --rate         open loop: total requests/s spread over the connections
  --idle         open N idle connections instead of generating load
  --threads      runtime worker threads (default 1: leave the other core to the server)";

/// A request never waits longer than this: the ingress answers 503 after its confirm
/// timeout (5 s by default), so reaching it means the server is stuck.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Deal ids count up from here, so every event differs from the others.
const FIRST_DEAL_ID: u64 = 100_000;

type Sender = http1::SendRequest<Full<Bytes>>;

/// What every worker needs to build and send its requests.
struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    form: DealExposeForm,
    next_deal_id: AtomicU64,
}

impl Target {
    fn event_request(&self) -> Request<Full<Bytes>> {
        let deal_id = self.next_deal_id.fetch_add(1, Ordering::Relaxed);
        let body = self.form.body(deal_id, bench::unix_now());
        // hyper adds Content-Length from the body's exact size.
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from_static("/events");
        req.headers_mut().insert(HOST, self.host.clone());
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(FORM));
        req
    }

    fn healthz_request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = Uri::from_static("/healthz");
        req.headers_mut().insert(HOST, self.host.clone());
        req
    }

    /// One HTTP/1.1 connection of our own: hyper's pooled client could open more or
    /// fewer than asked, and the benchmark is about exactly N connections.
    async fn connect(&self) -> anyhow::Result<Sender> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        // The connection task does the socket I/O; its errors reach us via `sender`.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

/// Sends one request and reads the whole answer, which frees the connection for the
/// next one. Errors are named by a short reason for the failure tally.
async fn exchange(
    sender: &mut Sender,
    req: Request<Full<Bytes>>,
) -> Result<StatusCode, &'static str> {
    let attempt = async {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok::<_, hyper::Error>(status)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(_)) => Err("io"),
        Err(_) => Err("timeout"),
    }
}

/// One connection's loop: send when the schedule says, count what completes inside
/// the window, reconnect after a broken connection.
async fn worker(target: Arc<Target>, window: Window, mut schedule: Schedule) -> Tally {
    let mut tally = Tally::default();
    let mut sender: Option<Sender> = None;
    while let Some(started) = schedule.next(&window).await {
        let conn = match sender.as_mut() {
            Some(s) => s,
            None => match target.connect().await {
                Ok(s) => sender.insert(s),
                Err(_) => {
                    if window.counts(Instant::now()) {
                        tally.failed("connect");
                    }
                    // Back off a little so a refused port does not become a busy loop.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let outcome = exchange(conn, target.event_request()).await;
        let done = Instant::now();
        if outcome.is_err() {
            sender = None;
        }
        if !window.counts(done) {
            continue;
        }
        match outcome {
            Ok(StatusCode::OK) => tally.ok(done - started),
            Ok(status) => tally.failed(status.as_str()),
            Err(reason) => tally.failed(reason),
        }
    }
    tally
}

async fn load(
    target: Arc<Target>,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    let window = Window::starting_now(warmup, duration);
    let start = Instant::now();
    match rate {
        Some(r) => println!(
            "loadgen: open loop at {r:.1} requests/s over {connections} connections to {}, \
             warmup {:.1} s, measuring {:.1} s",
            target.addr,
            warmup.as_secs_f64(),
            duration.as_secs_f64()
        ),
        None => println!(
            "loadgen: closed loop, {connections} connections to {}, warmup {:.1} s, measuring {:.1} s",
            target.addr,
            warmup.as_secs_f64(),
            duration.as_secs_f64()
        ),
    }
    let tasks: Vec<_> = (0..connections)
        .map(|i| {
            let schedule = Schedule::new(rate, i, connections, start);
            tokio::spawn(worker(target.clone(), window, schedule))
        })
        .collect();
    let mut total = Tally::default();
    for task in join_all(tasks).await {
        total.merge(&task.context("a load worker panicked")?);
    }
    println!("{}", total.summary("loadgen", "events", window.measured()));
    Ok(())
}

/// Opens `n` connections, each with one real event, holds them, then checks each
/// still answers on the same connection.
async fn idle(target: Arc<Target>, n: usize, hold: Duration) -> anyhow::Result<()> {
    // Batches keep the burst of connects within the listener's accept backlog.
    const BATCH: usize = 100;
    let mut open = Vec::with_capacity(n);
    let mut first = Tally::default();
    let mut refused = 0;
    for batch_start in (0..n).step_by(BATCH) {
        let batch = (batch_start..n.min(batch_start + BATCH)).map(|_| {
            let target = target.clone();
            async move {
                let mut sender = target.connect().await.ok()?;
                let started = Instant::now();
                let outcome = exchange(&mut sender, target.event_request()).await;
                Some((sender, outcome, started.elapsed()))
            }
        });
        for opened in join_all(batch).await {
            match opened {
                None => refused += 1,
                Some((sender, Ok(StatusCode::OK), latency)) => {
                    first.ok(latency);
                    open.push(sender);
                }
                Some((sender, Ok(status), _)) => {
                    first.failed(status.as_str());
                    open.push(sender);
                }
                Some((_, Err(reason), _)) => first.failed(reason),
            }
        }
    }
    println!(
        "loadgen: {} idle connections open ({} first events ok, {} failed, {refused} not connected); holding {:.1} s",
        open.len(),
        first.ok,
        first.failed_total(),
        hold.as_secs_f64()
    );
    tokio::time::sleep(hold).await;
    let answers = join_all(
        open.iter_mut()
            .map(|s| exchange(s, target.healthz_request())),
    )
    .await;
    let alive = answers
        .iter()
        .filter(|a| matches!(a, Ok(StatusCode::OK)))
        .count();
    println!(
        "loadgen: after {:.1} s, {alive} of {} connections still answered",
        hold.as_secs_f64(),
        open.len()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse(
        std::env::args().skip(1),
        &[
            "target",
            "connections",
            "duration",
            "warmup",
            "rate",
            "idle",
            "threads",
        ],
        USAGE,
    )
    .unwrap_or_else(|e| e.exit());
    let target_name: String = flags.get("target", "127.0.0.1:8080".to_string())?;
    let connections: usize = flags.get("connections", 32)?;
    let duration = flags.secs("duration", 10.0)?;
    let warmup = flags.secs("warmup", 2.0)?;
    let rate: Option<f64> = flags.opt("rate")?;
    let idle_connections: Option<usize> = flags.opt("idle")?;
    let threads: usize = flags.get("threads", 1)?;
    anyhow::ensure!(connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        rate.is_none_or(|r| r.is_finite() && r > 0.0),
        "--rate must be a positive number of requests per second"
    );

    let addr = target_name
        .to_socket_addrs()
        .with_context(|| format!("--target {target_name}"))?
        .next()
        .with_context(|| format!("--target {target_name} resolves to no address"))?;
    let target = Arc::new(Target {
        addr,
        host: HeaderValue::from_str(&target_name).context("--target is not a valid Host")?,
        form: DealExposeForm::default(),
        next_deal_id: AtomicU64::new(FIRST_DEAL_ID),
    });

    bench::runtime(threads)?.block_on(async move {
        match idle_connections {
            Some(n) => idle(target, n, duration).await,
            None => load(target, connections, warmup, duration, rate).await,
        }
    })
}
