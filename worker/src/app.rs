//! Building and running the worker: database (created and migrated), Bitrix24 client,
//! broker connections, the metrics endpoint, and the consume loop. Shutdown stops
//! consuming first, lets deliveries in hand finish within the grace period, then
//! closes; anything unfinished stays unacked and the broker redelivers it.

use crate::bitrix::limiter::Limiter;
use crate::bitrix::oauth::OAuthApp;
use crate::bitrix::retry::RetryPolicy;
use crate::bitrix::{Bitrix, RestClient};
use crate::config::WorkerConfig;
use crate::consumer::{handle_delivery, Ctx, PortalSlots};
use crate::crypto::{Opened, TokenCipher};
use crate::metrics::WorkerMetrics;
use crate::reconcile::Reconciler;
use crate::store::Store;
use crate::verify::Rules;
use b24_shared::amqp::{connect, Publisher, Topology};
use b24_shared::db::{self, DbPool};
use b24_shared::portals;
use b24_shared::portals::UpkeepPolicy;
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long an upkeep claim lasts when the replica holding it dies.
const LEASE: Duration = Duration::from_secs(300);

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

pub struct App {
    config: WorkerConfig,
    ctx: Arc<Ctx>,
    metrics_listener: TcpListener,
    metrics_addr: SocketAddr,
    publisher_stop: tokio::sync::watch::Sender<bool>,
}

impl App {
    pub async fn build(config: WorkerConfig) -> anyhow::Result<Self> {
        db::create_database_if_missing(&config.database_url).await?;
        let pool = db::pool(&config.database_url, config.db_pool.max(2))?;
        db::migrate(&pool).await?;

        let metrics = WorkerMetrics::default();
        let cipher = Arc::new(token_cipher(&config)?);
        reseal_tokens(&pool, &cipher).await?;
        let rest = RestClient::new(
            config.allowed_hosts.clone(),
            config.http_timeout,
            metrics.b24.clone(),
        );
        let oauth = match (&config.client_id, &config.client_secret) {
            (Some(id), Some(secret)) => Some(OAuthApp {
                fallback_url: url::Url::parse(&config.oauth_url)
                    .map_err(|_| anyhow::anyhow!("B24_OAUTH_URL is not a valid URL"))?,
                client_id: id.clone(),
                client_secret: secret.clone(),
            }),
            _ => {
                tracing::warn!(
                    "B24_CLIENT_ID/B24_CLIENT_SECRET unset: installations cannot be verified and tokens cannot be refreshed"
                );
                None
            }
        };
        let limiter = Limiter::new(
            pool.clone(),
            config.rate_per_sec,
            config.rate_burst,
            config.max_limiter_wait,
        );
        let policy = RetryPolicy {
            max_attempts: config.retry_attempts.max(1),
            max_elapsed: config.retry_max_elapsed,
            ..RetryPolicy::default()
        };
        let bitrix = Bitrix::new(
            rest,
            pool.clone(),
            limiter,
            oauth,
            cipher,
            policy,
            config.portal_deleted_grace,
        );

        let (publisher_stop, stop_rx) = tokio::sync::watch::channel(false);
        let publisher = Publisher::start(
            config.amqp.clone(),
            Duration::from_secs(10),
            &format!("b24-worker-publisher/{}", config.amqp.prefix),
            stop_rx,
        );
        let metrics_listener = TcpListener::bind(config.metrics_addr).await?;
        let metrics_addr = metrics_listener.local_addr()?;
        let batcher =
            crate::batch::Batcher::new(bitrix.clone(), config.batch_max, config.batch_window);
        let ctx = Arc::new(Ctx {
            store: Store::new(pool),
            bitrix,
            batcher,
            publisher,
            topology: Topology::new(config.amqp.prefix.clone()),
            metrics,
            public_url: config.public_url.clone(),
            app_code: config.app_code.clone(),
            rules: Rules {
                token_pending_max: config.token_pending_max,
            },
            payment_debounce: config.payment_debounce,
            retry_for: config.retry_for,
            slots: PortalSlots::new(config.portal_in_flight),
        });
        Ok(Self {
            config,
            ctx,
            metrics_listener,
            metrics_addr,
            publisher_stop,
        })
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let stop = CancellationToken::new();
        let ready = Arc::new(AtomicBool::new(false));
        let http = tokio::spawn(crate::http::serve(
            self.metrics_listener,
            self.ctx.metrics.clone(),
            ready.clone(),
            stop.clone(),
        ));
        let tracker = TaskTracker::new();
        let trigger = stop.clone();
        let signal = tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
        let upkeep = tokio::spawn(
            Reconciler {
                bitrix: self.ctx.bitrix.clone(),
                publisher: self.ctx.publisher.clone(),
                policy: UpkeepPolicy {
                    poll_every: self.config.reconcile_interval,
                    refresh_after: self.config.idle_refresh_after,
                    payment_check_every: self.config.payment_debounce,
                    lease: LEASE,
                },
                owner: format!("{}/{}", hostname(), uuid::Uuid::now_v7().simple()),
                records: self.ctx.metrics.offline_records.clone(),
                chores: self.ctx.metrics.upkeep.clone(),
            }
            .run(stop.clone()),
        );
        let conn = consume(&self.config, self.ctx.clone(), &tracker, &ready, &stop).await;
        signal.abort();
        ready.store(false, Ordering::Relaxed);
        tracker.close();
        tracing::info!(
            in_flight = tracker.len(),
            "shutting down: finishing deliveries in hand"
        );
        if tokio::time::timeout(self.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; unfinished deliveries will be redelivered");
        }
        if let Some((conn, channel)) = conn {
            let _ = channel.close(200, "shutting down".into()).await;
            let _ = conn.close(200, "shutting down".into()).await;
        }
        let _ = self.publisher_stop.send(true);
        self.ctx.publisher.close().await;
        let _ = upkeep.await;
        let _ = http.await;
    }
}

/// Consumes until `stop`, reconnecting whenever the broker goes away. Returns the
/// live connection and channel, which deliveries in hand still need to ack on
/// (dropping the channel would return them to the queue).
async fn consume(
    config: &WorkerConfig,
    ctx: Arc<Ctx>,
    tracker: &TaskTracker,
    ready: &AtomicBool,
    stop: &CancellationToken,
) -> Option<(lapin::Connection, lapin::Channel)> {
    let mut delay = Duration::from_millis(200);
    let name = format!("b24-worker/{}", config.amqp.prefix);
    while !stop.is_cancelled() {
        let session = async {
            let conn = connect(&config.amqp, &name).await?;
            let channel = conn.create_channel().await?;
            ctx.topology.declare(&channel).await?;
            channel
                .basic_qos(config.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    ctx.topology.work_queue().as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((conn, channel, consumer))
        };
        let (conn, channel, mut consumer) = match session.await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot consume from the broker");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return None,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        delay = Duration::from_millis(200);
        ready.store(true, Ordering::Relaxed);
        tracing::info!(queue = %ctx.topology.work_queue(), prefetch = config.prefetch, "consuming");
        loop {
            let next = tokio::select! {
                n = consumer.next() => n,
                () = stop.cancelled() => {
                    let tag = consumer.tag();
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    // Deliveries already handed out finish on this channel, so the
                    // connection stays open until they are done (see run).
                    return Some((conn, channel));
                }
            };
            match next {
                Some(Ok(delivery)) => {
                    tracker.spawn(handle_delivery(ctx.clone(), delivery));
                }
                Some(Err(e)) => {
                    ready.store(false, Ordering::Relaxed);
                    match channel.wait_for_recovery(e).await {
                        Ok(()) => {
                            ready.store(true, Ordering::Relaxed);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "consumer lost; reconnecting");
                            break;
                        }
                    }
                }
                None => {
                    ready.store(false, Ordering::Relaxed);
                    tracing::warn!("consumer stream ended; reconnecting");
                    break;
                }
            }
        }
        let _ = conn.close(200, "reconnecting".into()).await;
    }
    None
}

/// The key that seals tokens at rest; the worker does not start without one.
fn token_cipher(config: &WorkerConfig) -> anyhow::Result<TokenCipher> {
    let key = config.token_key.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "B24_TOKEN_KEY is not set: the worker seals portals' tokens at rest with it \
             (32 random bytes, base64: `openssl rand -base64 32`)"
        )
    })?;
    Ok(TokenCipher::new(key, config.token_keys_old.as_ref())?)
}

/// Seals tokens still in clear text (rows from before sealing) and re-seals those under
/// an old key, so after a rotation the old key can be dropped once every replica ran.
async fn reseal_tokens(pool: &DbPool, cipher: &TokenCipher) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let mut resealed = 0;
    for p in portals::with_tokens(&client).await? {
        let open = |t: &Option<portals::Sealed>| {
            t.as_ref().map(|t| cipher.open(&p.member_id, t)).transpose()
        };
        let (access, refresh) = match (open(&p.access_token), open(&p.refresh_token)) {
            (Ok(a), Ok(r)) => (a, r),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(member_id = %p.member_id, error = %e, "cannot open the portal's tokens");
                continue;
            }
        };
        let stale = |o: &Option<Opened>| matches!(o, Some(Opened::Stale(_)));
        if !stale(&access) && !stale(&refresh) {
            continue;
        }
        let seal = |o: Option<Opened>| o.map(|o| cipher.seal(&p.member_id, &o.secret()));
        portals::reseal(
            &client,
            &p.member_id,
            seal(access).as_ref(),
            seal(refresh).as_ref(),
        )
        .await?;
        resealed += 1;
    }
    if resealed > 0 {
        tracing::info!(portals = resealed, "re-sealed tokens under the current key");
    }
    Ok(())
}
