//! The broker's ceiling for the ingress benchmark: lapin alone, publishing persistent,
//! mandatory messages with confirms to the ingress's own topology (declared under a
//! prefix of its own and deleted at the end), each message the size of the envelope the
//! ingress would publish, `--window` publishes awaiting their confirm at once on one
//! channel: as N HTTP connections each wait for their confirm on the ingress's channel.
//!
//! Also a chore for the bench script: `--cleanup PREFIX` deletes a prefix's queues and
//! exchange after each step.

use anyhow::Context;
use b24_shared::amqp::Topology;
use b24_tests::bench::{self, Flags, Schedule, Tally, Window};
use b24_tests::broker;
use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: bare_publisher [--window N] [--duration SECS] [--warmup SECS] \
[--rate MSGS_PER_SEC] [--prefix PREFIX] [--threads N]
       bare_publisher --cleanup PREFIX
  --window    publishes awaiting their confirm at once (default 32)
  --duration  measured seconds (default 10)
  --warmup    seconds run first and not counted (default 2)
  --rate      open loop: total messages/s spread over the window, latency from when due
  --prefix    AMQP prefix of its own topology (default a unique one); deleted at the end
  --threads   runtime worker threads (default 1)
  --cleanup   delete PREFIX's queues and exchange and exit
AMQP_URL as for the ingress.";

/// Same bound as the load generator's: a confirm this late means the broker is stuck.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// One of the `--window` publishers: publish, await the confirm, repeat.
async fn publisher(
    channel: Channel,
    exchange: String,
    routing_key: String,
    body: Arc<[u8]>,
    window: Window,
    mut schedule: Schedule,
) -> Tally {
    let mut tally = Tally::default();
    while let Some(started) = schedule.next(&window).await {
        // The properties the ingress sets, so the frames are the same size too.
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(uuid::Uuid::now_v7().to_string().into())
            .with_headers(FieldTable::default());
        let attempt = async {
            let confirm = channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await?;
            confirm.await
        };
        let outcome = tokio::time::timeout(CONFIRM_TIMEOUT, attempt).await;
        let done = Instant::now();
        let counted = window.counts(done);
        let failure = match outcome {
            Ok(Ok(Confirmation::Ack(None))) => {
                if counted {
                    tally.ok(done - started);
                }
                continue;
            }
            Ok(Ok(Confirmation::Ack(Some(_)))) => "returned",
            Ok(Ok(Confirmation::Nack(_))) => "nack",
            Ok(Ok(Confirmation::NotRequested)) => "unconfirmed",
            Ok(Err(_)) => "broker",
            Err(_) => "timeout",
        };
        if counted {
            tally.failed(failure);
        }
        if failure == "broker" {
            // The channel is gone: every further publish would fail at once.
            break;
        }
    }
    tally
}

async fn measure(
    connection: &Connection,
    topology: &Topology,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // One body for all: the broker does not look inside, only the size matters.
    let envelope = bench::deal_expose_envelope(100_000, bench::unix_now())?;
    let body: Arc<[u8]> = envelope.to_json().into();
    let pace = rate.map_or("as fast as confirmed".to_string(), |r| {
        format!("open loop at {r:.1} msgs/s")
    });
    println!(
        "bare_publisher: window {in_flight} on one channel, {pace}, {} byte messages, warmup {:.1} s, measuring {:.1} s",
        body.len(),
        warmup.as_secs_f64(),
        duration.as_secs_f64()
    );
    let window = Window::starting_now(warmup, duration);
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|i| {
            tokio::spawn(publisher(
                channel.clone(),
                topology.exchange(),
                envelope.routing_key(),
                body.clone(),
                window,
                Schedule::new(rate, i, in_flight, start),
            ))
        })
        .collect();
    let mut total = Tally::default();
    for task in join_all(tasks).await {
        total.merge(&task.context("a publisher task panicked")?);
    }
    println!(
        "{}",
        total.summary("bare_publisher", "msgs", window.measured())
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse(
        std::env::args().skip(1),
        &[
            "window", "duration", "warmup", "rate", "prefix", "threads", "cleanup",
        ],
        USAGE,
    )
    .unwrap_or_else(|e| e.exit());
    let in_flight: usize = flags.get("window", 32)?;
    let duration = flags.secs("duration", 10.0)?;
    let warmup = flags.secs("warmup", 2.0)?;
    let rate: Option<f64> = flags.opt("rate")?;
    let threads: usize = flags.get("threads", 1)?;
    let prefix: String = flags.get("prefix", b24_tests::spawn::unique_prefix("bare"))?;
    let cleanup_prefix: Option<String> = flags.opt("cleanup")?;
    anyhow::ensure!(in_flight > 0, "--window must be at least 1");
    anyhow::ensure!(
        rate.is_none_or(|r| r.is_finite() && r > 0.0),
        "--rate must be a positive number of messages per second"
    );

    bench::runtime(threads)?.block_on(async move {
        if let Some(prefix) = cleanup_prefix {
            broker::delete_topology(&prefix).await?;
            println!("bare_publisher: deleted the queues and exchange of {prefix}");
            return Ok(());
        }
        let connection = Connection::connect(
            &broker::amqp_url(),
            ConnectionProperties::default()
                .with_connection_name(format!("b24-bare-publisher/{prefix}").into()),
        )
        .await
        .context("connecting to the broker (AMQP_URL)")?;
        let topology = Topology::new(prefix.as_str());
        let result = measure(&connection, &topology, in_flight, warmup, duration, rate).await;
        // Delete even after a failed run: a benchmark must not leave a full queue behind.
        let _ = connection.close(200, "done".into()).await;
        broker::delete_topology(&prefix).await?;
        result
    })
}
