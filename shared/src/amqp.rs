//! RabbitMQ topology and confirmed publishing. Every name lives under `AMQP_PREFIX`.
//! A message counts as durable only when the broker acked it *and* did not return it
//! as unroutable: lapin reports a returned mandatory message as an `Ack` carrying it.

use crate::config::AmqpConfig;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Retry delays of the worker's delayed requeue, one delay queue each.
pub const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

/// How many times a quorum queue redelivers one message (a worker crashing on it each
/// time) before the broker moves it to the dead-letter queue.
pub const DELIVERY_LIMIT: i64 = 10;

/// Exchange and queue names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// Durable topic exchange the ingress publishes to (routing key `<kind>.<code>`).
    pub fn exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Quorum queue bound to every routing key: the worker consumes it.
    pub fn work_queue(&self) -> String {
        format!("{}.work", self.prefix)
    }

    /// Quorum queue of messages that will not be retried, with the reason in headers.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Delay queue for retry `attempt` (0-based, capped at the last delay). Messages
    /// wait there for its TTL, then the broker dead-letters them back to the exchange.
    pub fn delay_queue(&self, attempt: usize) -> String {
        let delay = RETRY_DELAYS[attempt.min(RETRY_DELAYS.len() - 1)];
        format!("{}.delay.{}s", self.prefix, delay.as_secs())
    }

    /// Declares everything, idempotently: safe for every process to call at start-up
    /// and after each reconnect.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange().as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;

        let mut dead_args = FieldTable::default();
        dead_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(self.dead_letter_queue().as_str().into(), durable, dead_args)
            .await?;

        let mut work_args = FieldTable::default();
        work_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        work_args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        work_args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.dead_letter_queue().as_str().into()),
        );
        channel
            .queue_declare(self.work_queue().as_str().into(), durable, work_args)
            .await?;
        channel
            .queue_bind(
                self.work_queue().as_str().into(),
                self.exchange().as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        for (attempt, delay) in RETRY_DELAYS.iter().enumerate() {
            let mut args = FieldTable::default();
            let ttl = delay.as_millis() as i64;
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.exchange().as_str().into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString("retry".into()),
            );
            channel
                .queue_declare(self.delay_queue(attempt).as_str().into(), durable, args)
                .await?;
        }
        Ok(())
    }
}

/// Largest AMQP frame we ask for unless `AMQP_URL` says otherwise. lapin keeps two
/// zero-filled buffers of 32 frames each, and RabbitMQ's default of 128 KiB makes
/// them 8 MiB of resident memory; our messages are about 1 KiB, and a larger one is
/// simply split into more frames.
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// Connects with lapin's auto-recovery: after a network error the connection, the
/// channels, their topology and confirm mode are re-established by lapin itself.
pub async fn connect(config: &AmqpConfig, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .enable_auto_recover();
    let mut uri: lapin::uri::AMQPUri = config
        .url
        .expose()
        .parse()
        // The parser's message names the part that is wrong; it may echo the URL,
        // which holds the password, so it is not passed on.
        .map_err(|_| {
            lapin::Error::from(std::io::Error::other("AMQP_URL is not a valid AMQP URI"))
        })?;
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
    }
    Connection::connect_uri(uri, props).await
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker is not connected")]
    NotConnected,
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("broker did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("message was unroutable: {0}")]
    Returned(String),
}

impl PublishError {
    /// Low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotConnected => "not_connected",
            Self::Broker(_) => "broker_error",
            Self::ConfirmTimeout(_) => "confirm_timeout",
            Self::Nacked => "nack",
            Self::Returned(_) => "unroutable",
        }
    }
}

/// A publisher with confirms that survives broker restarts and closed connections.
///
/// lapin's auto-recovery handles network errors; a supervisor task handles what it
/// cannot (recovery given up, the broker down at start-up, a channel closed by a
/// protocol error) by building a new connection with backoff. A publish never waits
/// for recovery: while the link is down it fails at once, so the HTTP caller can
/// answer 503 quickly.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: AmqpConfig,
    topology: Topology,
    confirm_timeout: Duration,
    link: Mutex<Option<Arc<Link>>>,
    broken: Notify,
    name: String,
}

struct Link {
    connection: Connection,
    channel: Channel,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

impl Publisher {
    /// Starts the publisher and its supervisor. Returns at once: the first connection
    /// is made in the background, so a process can start while the broker is down.
    pub fn start(
        config: AmqpConfig,
        confirm_timeout: Duration,
        name: &str,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let publisher = Self {
            inner: Arc::new(Inner {
                topology: Topology::new(config.prefix.clone()),
                config,
                confirm_timeout,
                link: Mutex::new(None),
                broken: Notify::new(),
                name: name.to_string(),
            }),
        };
        tokio::spawn(publisher.clone().supervise(shutdown));
        publisher
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Waits until the publisher is connected, up to `within`.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.is_connected() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// True when a publish would be attempted now (for `/readyz`).
    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|l| l.usable())
    }

    fn current(&self) -> Option<Arc<Link>> {
        self.inner
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes one persistent, mandatory message to the exchange and waits for the
    /// broker's confirm. `Ok` means the message is in a durable queue.
    pub async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        message_id: &str,
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let exchange = self.inner.topology.exchange();
        self.publish_to(&exchange, routing_key, body, message_id, headers)
            .await
    }

    /// Publishes straight to a queue through the default exchange (retries, dead
    /// letters), with the same guarantees as [`Publisher::publish`].
    pub async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
        message_id: &str,
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        self.publish_to("", queue, body, message_id, headers).await
    }

    async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        message_id: &str,
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let link = self
            .current()
            .filter(|l| l.usable())
            .ok_or(PublishError::NotConnected)?;
        let timeout = self.inner.confirm_timeout;
        let attempt = async {
            let confirm = link
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type(ShortString::from("application/json"))
                        .with_message_id(message_id.into())
                        .with_headers(headers),
                )
                .await?;
            confirm.await
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Err(_) => Err(PublishError::ConfirmTimeout(timeout)),
            Ok(Err(e)) => Err(PublishError::Broker(e)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                Err(PublishError::Returned(returned.reply_text.to_string()))
            }
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            // confirm_select is issued on every channel we create; this would mean
            // the broker never enabled it, so nothing is known to be durable.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        };
        if matches!(
            result,
            Err(PublishError::Broker(_) | PublishError::ConfirmTimeout(_))
        ) {
            self.inner.broken.notify_one();
        }
        result
    }

    /// Closes the broker connection; later publishes fail with `NotConnected`.
    pub async fn close(&self) {
        let link = self
            .inner
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(link) = link {
            let _ = link.connection.close(200, "shutting down".into()).await;
        }
    }

    async fn open(&self) -> Result<Link, lapin::Error> {
        let connection = connect(&self.inner.config, &self.inner.name).await?;
        let channel = connection.create_channel().await?;
        self.inner.topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Link {
            connection,
            channel,
        })
    }

    async fn supervise(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut delay = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                break;
            }
            let healthy = self.current().is_some_and(|l| {
                // Reconnecting is lapin's auto-recovery at work: leave it alone.
                l.usable()
                    || l.connection.status().reconnecting()
                    || l.channel.status().reconnecting()
            });
            if !healthy {
                match self.open().await {
                    Ok(link) => {
                        tracing::info!(prefix = %self.inner.topology.prefix, "connected to the broker");
                        let old = self
                            .inner
                            .link
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .replace(Arc::new(link));
                        if let Some(old) = old {
                            // Best effort: the old connection is already broken.
                            let _ = old.connection.close(200, "replaced".into()).await;
                        }
                        delay = Duration::from_millis(100);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?delay, "cannot connect to the broker");
                        delay = (delay * 2).min(Duration::from_secs(5));
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = self.inner.broken.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
        self.close().await;
    }
}
