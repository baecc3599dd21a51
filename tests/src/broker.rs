//! Probes of the real RabbitMQ: what is in a queue, and breaking connections the way
//! an operator or a network would (`rabbitmqctl close_connection`).

use b24_shared::amqp::Topology;
use b24_shared::Envelope;
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::collections::HashSet;
use std::process::Command;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn connect() -> anyhow::Result<Connection> {
    Ok(Connection::connect(&amqp_url(), ConnectionProperties::default()).await?)
}

/// Number of messages ready in `queue` (0 if it does not exist yet).
pub async fn ready_count(queue: &str) -> anyhow::Result<u32> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    let n = match ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => q.message_count(),
        Err(_) => 0,
    };
    let _ = conn.close(200, "done".into()).await;
    Ok(n)
}

/// Whether `queue` exists on the broker.
pub async fn queue_exists(queue: &str) -> anyhow::Result<bool> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    let exists = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "done".into()).await;
    Ok(exists)
}

/// Takes every message out of `queue` and parses each as an envelope.
pub async fn drain(queue: &str) -> anyhow::Result<Vec<Envelope>> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    let mut out = Vec::new();
    while let Some(msg) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        out.push(Envelope::from_json(&msg.delivery.data)?);
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// Drains `queue` and returns the ids in `acked` (events the ingress answered 200) that
/// were not in it: acknowledged events that were lost.
pub async fn lost_of(queue: &str, acked: &[String]) -> anyhow::Result<Vec<String>> {
    let queued: HashSet<String> = drain(queue)
        .await?
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    Ok(acked
        .iter()
        .filter(|id| !queued.contains(*id))
        .cloned()
        .collect())
}

/// Publishes raw bytes to `exchange` with a confirm (a poison message, say).
pub async fn publish_raw(exchange: &str, routing_key: &str, body: &[u8]) -> anyhow::Result<()> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            Default::default(),
            body,
            Default::default(),
        )
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "broker did not confirm");
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Deletes a test's queues and exchange.
pub async fn delete_topology(prefix: &str) -> anyhow::Result<()> {
    let topo = Topology::new(prefix);
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    let mut queues = vec![topo.work_queue(), topo.dead_letter_queue()];
    queues.extend((0..b24_shared::amqp::RETRY_DELAYS.len()).map(|i| topo.delay_queue(i)));
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(
            topo.exchange().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Closes, from the broker's side, every connection whose client-given name contains
/// `needle`. Returns how many were closed.
pub fn close_connections(needle: &str) -> anyhow::Result<usize> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "rabbitmqctl list_connections failed");
    let mut closed = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `<rabbit@host.1.2.3>\t[{"connection_name","b24-ingress/<prefix>"},…]`
        let Some((pid, props)) = line.split_once('\t') else {
            continue;
        };
        if !props.contains(needle) {
            continue;
        }
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid.trim(), "closed by test", "-q"])
            .status()?;
        if status.success() {
            closed += 1;
        }
    }
    Ok(closed)
}
