//! Operator commands for the dead-letter queue. `list` looks without taking (messages
//! are fetched unacked and returned when the channel closes); `replay` moves messages
//! back to the work exchange, acking each only after the broker confirmed its copy.

use b24_shared::amqp::{connect, Topology};
use b24_shared::config::AmqpConfig;
use b24_shared::event::redact;
use b24_shared::Envelope;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use serde_json::{json, Value};

pub fn parse_limit(args: &[&str]) -> anyhow::Result<usize> {
    match args {
        [] => Ok(usize::MAX),
        ["--limit", n] => n
            .parse()
            .map_err(|_| anyhow::anyhow!("--limit expects a number, got `{n}`")),
        other => anyhow::bail!("unexpected arguments: {}", other.join(" ")),
    }
}

fn header_str(headers: &Option<FieldTable>, key: &str) -> Option<String> {
    match headers.as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One dead letter as shown to an operator, credentials redacted.
pub fn describe(body: &[u8], headers: &Option<FieldTable>) -> Value {
    let (envelope, payload) = match Envelope::from_json(body) {
        Ok(e) => (
            json!({"id": e.id, "kind": e.kind, "event": e.event, "member_id": e.member_id,
                   "domain": e.domain, "received_at": e.received_at}),
            redact(&e.payload),
        ),
        Err(_) => (
            Value::Null,
            serde_json::from_slice::<Value>(body)
                .map(|v| redact(&v))
                .unwrap_or(Value::String("(not JSON)".into())),
        ),
    };
    json!({
        "envelope": envelope,
        "error_code": header_str(headers, "x-error-code"),
        "reason": header_str(headers, "x-reason"),
        "attempts": header_str(headers, "x-attempt"),
        "payload": payload,
    })
}

/// A channel on the dead-letter queue, for one command.
struct DeadLetters {
    conn: lapin::Connection,
    ch: lapin::Channel,
    topo: Topology,
}

impl DeadLetters {
    async fn open(amqp: &AmqpConfig) -> anyhow::Result<Self> {
        let topo = Topology::new(amqp.prefix.clone());
        let conn = connect(amqp, "b24-worker-dlq").await?;
        let ch = conn.create_channel().await?;
        topo.declare(&ch).await?;
        Ok(Self { conn, ch, topo })
    }

    /// The next dead letter, unacked.
    async fn next(&self) -> anyhow::Result<Option<lapin::message::BasicGetMessage>> {
        let queue = self.topo.dead_letter_queue();
        Ok(self
            .ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await?)
    }
}

/// Reads up to `limit` dead letters without removing them.
pub async fn peek(amqp: &AmqpConfig, limit: usize) -> anyhow::Result<Vec<Value>> {
    let dl = DeadLetters::open(amqp).await?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(msg) = dl.next().await? else {
            break;
        };
        out.push(describe(
            &msg.delivery.data,
            msg.delivery.properties.headers(),
        ));
    }
    // Closing without acking puts every message back.
    let _ = dl.conn.close(200, "listed".into()).await;
    Ok(out)
}

pub async fn list(amqp: &AmqpConfig, limit: usize) -> anyhow::Result<()> {
    let letters = peek(amqp, limit).await?;
    for l in &letters {
        println!("{l}");
    }
    eprintln!("{} dead letter(s)", letters.len());
    Ok(())
}

/// Moves up to `limit` dead letters back to the work exchange; returns how many.
pub async fn replay(amqp: &AmqpConfig, limit: usize) -> anyhow::Result<usize> {
    let dl = DeadLetters::open(amqp).await?;
    dl.ch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut moved = 0;
    while moved < limit {
        let Some(msg) = dl.next().await? else {
            break;
        };
        let routing_key = Envelope::from_json(&msg.delivery.data)
            .map(|e| e.routing_key())
            .unwrap_or_else(|_| "replay".into());
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = msg.delivery.properties.message_id() {
            props = props.with_message_id(id.clone());
        }
        // A fresh start: no attempt header, so retries begin again at the first delay.
        let confirm = dl
            .ch
            .basic_publish(
                dl.topo.exchange().as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &msg.delivery.data,
                props,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => {
                msg.delivery.ack(BasicAckOptions::default()).await?;
                moved += 1;
            }
            _ => anyhow::bail!(
                "broker did not confirm the replayed message; it stays in the dead-letter queue"
            ),
        }
    }
    let _ = dl.conn.close(200, "replayed".into()).await;
    Ok(moved)
}
