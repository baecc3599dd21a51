//! The least an HTTP-to-RabbitMQ ingress can do, for the ingress benchmark: hyper 1
//! with the ingress's connection settings, and for each POST the body read, one
//! envelope-sized message published through the ingress's own `Publisher` (lapin, one
//! channel, persistent, mandatory, confirm awaited), and an empty 200. No decoding, no
//! validation, no portal lookup, no metrics, no envelope built.
//!
//! Between the bare publisher (no HTTP at all) and the real ingress, it splits the
//! ingress's distance from the broker's ceiling into what the HTTP hop costs on this
//! machine and what the ingress's own code costs. It is a measuring tool, not a server:
//! it publishes for any POST and answers anything else with 200 and nothing published.
//!
//! Reads the ingress's own configuration (`IngressConfig`: `INGRESS_ADDR`, `AMQP_URL`,
//! `AMQP_PREFIX`, the header and confirm timeouts), and logs the address it listens on
//! as "listening on ADDR". Its queues are left for the caller to delete
//! (`bare_publisher --cleanup PREFIX`), as the bench script does after each step.

use anyhow::Context;
use b24_shared::amqp::Publisher;
use b24_shared::config::IngressConfig;
use b24_tests::bench::{self, Flags};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use lapin::types::FieldTable;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

const USAGE: &str = "usage: bare_relay [--threads N]
  --threads  runtime worker threads (default 0: one per core, as the ingress)
INGRESS_ADDR (port 0: a free one), AMQP_URL, AMQP_PREFIX and the timeouts as for the ingress.";

async fn relay(
    publisher: &Publisher,
    routing_key: &str,
    body: &[u8],
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    // Probes (the bench script's readiness check) publish nothing: the relay only
    // listens once its publisher is connected.
    if request.method() != hyper::Method::POST {
        return Response::new(Full::new(Bytes::from_static(b"ok\n")));
    }
    // Read the request as the ingress must before it can publish anything.
    let status = match request.into_body().collect().await {
        Err(_) => StatusCode::BAD_REQUEST,
        Ok(_) => {
            let id = uuid::Uuid::now_v7().to_string();
            match publisher
                .publish(routing_key, body, &id, FieldTable::default())
                .await
            {
                Ok(()) => StatusCode::OK,
                Err(_) => StatusCode::SERVICE_UNAVAILABLE,
            }
        }
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn main() -> anyhow::Result<()> {
    let flags =
        Flags::parse(std::env::args().skip(1), &["threads"], USAGE).unwrap_or_else(|e| e.exit());
    let config = IngressConfig::from_env()?;
    let threads: usize = flags.get("threads", 0)?;
    let runtime = if threads == 0 {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        bench::runtime(threads)?
    };
    runtime.block_on(async move {
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let publisher = Publisher::start(
            config.amqp,
            config.confirm_timeout,
            "b24-bare-relay",
            stop_rx,
        );
        anyhow::ensure!(
            publisher.wait_connected(Duration::from_secs(10)).await,
            "could not connect to the broker (AMQP_URL)"
        );
        // The same message the bare publisher sends: the ingress's envelope for the
        // load generator's event.
        let envelope = bench::deal_expose_envelope(100_000, bench::unix_now())?;
        let routing_key: Arc<str> = envelope.routing_key().into();
        let body: Arc<[u8]> = envelope.to_json().into();

        let listener = TcpListener::bind(config.addr)
            .await
            .context("binding INGRESS_ADDR")?;
        println!("bare_relay: listening on {}", listener.local_addr()?);
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .keep_alive(true);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (publisher, routing_key, body) =
                (publisher.clone(), routing_key.clone(), body.clone());
            let service = service_fn(move |request| {
                let (publisher, routing_key, body) =
                    (publisher.clone(), routing_key.clone(), body.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        relay(&publisher, &routing_key, &body, request).await,
                    )
                }
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    })
}
