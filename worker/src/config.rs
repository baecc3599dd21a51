//! The worker's configuration, from the environment alone (DESIGN.md's table). Like
//! the shared parts, it reads through a lookup function so tests configure a worker
//! without touching the process environment.

use b24_shared::config::{
    millis, parse, process_env, AmqpConfig, ConfigError, Lookup, DEFAULT_DATABASE_URL,
};
use b24_shared::Secret;
use std::net::SocketAddr;
use std::time::Duration;

fn secs(env: Lookup, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
    parse(env, name, default, "a duration in seconds").map(Duration::from_secs)
}

/// Bitrix24's cloud portal domains and its authorization servers: the default
/// `B24_ALLOWED_HOSTS`. Only zones that hold portals: the site builder's domains
/// (`*.bitrix24.site`, `*.bitrix24.shop`) serve anyone's pages, not REST.
pub const BITRIX24_CLOUD_HOSTS: &str = "*.bitrix24.com,*.bitrix24.ru,*.bitrix24.de,*.bitrix24.eu,\
*.bitrix24.es,*.bitrix24.fr,*.bitrix24.it,*.bitrix24.pl,*.bitrix24.uk,*.bitrix24.ua,*.bitrix24.by,\
*.bitrix24.kz,*.bitrix24.com.br,*.bitrix24.in,*.bitrix24.cn,*.bitrix24.com.tr,*.bitrix24.id,\
*.bitrix24.vn,*.bitrix24.jp,oauth.bitrix.info,oauth.bitrix24.info,oauth.bitrix24.tech";

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp: AmqpConfig,
    /// Holds the database password, hence a [`Secret`].
    pub database_url: Secret,
    pub metrics_addr: SocketAddr,
    /// The ingress's public base URL: handlers given to `event.bind`/`placement.bind`.
    pub public_url: String,
    pub client_id: Option<Secret>,
    pub client_secret: Option<Secret>,
    pub oauth_url: String,
    pub allowed_hosts: crate::bitrix::AllowedHosts,
    /// Per-portal request budget shared by every replica (Bitrix24: 2/s, burst 50).
    pub rate_per_sec: f64,
    pub rate_burst: f64,
    /// Unacked deliveries one worker holds at most.
    pub prefetch: u16,
    /// PostgreSQL connections one worker opens at most; mind the server's
    /// `max_connections` across replicas.
    pub db_pool: usize,
    /// Timeout of one REST request.
    pub http_timeout: Duration,
    /// On SIGTERM, how long in-flight messages may take before the worker exits.
    pub shutdown_grace: Duration,
    /// Most commands the worker puts in one `batch` request (Bitrix24 allows 50).
    pub batch_max: usize,
    /// How long the worker waits for more events of a portal to fill a batch.
    pub batch_window: Duration,
    /// Attempts of one REST call (with backoff) before the message is requeued with delay.
    pub retry_attempts: u32,
    /// Time one REST call may spend in backoff before the message is requeued with delay.
    pub retry_max_elapsed: Duration,
    /// What `app.info` answers as `CODE` for this application (a local app's code is
    /// its client id): an installation whose tokens belong to another app is refused.
    pub app_code: Option<String>,
    /// Seals tokens at rest (see [`crate::crypto`]).
    pub token_key: Option<Secret>,
    /// Earlier keys, still accepted for opening while rows are re-sealed.
    pub token_keys_old: Option<Secret>,
    /// At most one `app.info` per portal this often for unauthenticated `ONAPPPAYMENT`.
    pub payment_debounce: Duration,
    /// How long events of a portal whose `application_token` has not arrived yet (the
    /// install page was processed, `ONAPPINSTALL` not yet) are retried.
    pub token_pending_max: Duration,
    /// How long `PORTAL_DELETED` must keep coming before the portal is marked deleted
    /// (self-hosted portals close temporarily).
    pub portal_deleted_grace: Duration,
    /// How often each installed portal's offline events are collected (`None`: never).
    pub reconcile_interval: Option<Duration>,
    /// Portals whose tokens were issued longer ago than this are refreshed by the
    /// reconciler, so a quiet portal's 180-day refresh token never lapses.
    pub idle_refresh_after: Duration,
    /// A call that would wait longer than this for its portal's budget goes back to a
    /// delay queue instead of holding a prefetch slot.
    pub max_limiter_wait: Duration,
    /// Messages of one portal this worker processes at once; more wait in a delay
    /// queue, so one portal cannot fill every prefetch slot.
    pub portal_in_flight: usize,
    /// Transient failures of one event are retried this long after it was received.
    pub retry_for: Duration,
}

impl WorkerConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&process_env)
    }

    pub fn from_lookup(env: Lookup) -> Result<Self, ConfigError> {
        let hosts = env("B24_ALLOWED_HOSTS").unwrap_or_else(|| BITRIX24_CLOUD_HOSTS.to_string());
        let allowed_hosts = crate::bitrix::AllowedHosts::parse(&hosts).map_err(|_| {
            ConfigError::new(
                "B24_ALLOWED_HOSTS",
                "comma-separated host patterns such as *.bitrix24.com or http://127.0.0.1:*",
                hosts.clone(),
            )
        })?;
        let rate_per_sec: f64 = parse(env, "B24_RATE_PER_SEC", "2", "a positive number")?;
        let rate_burst: f64 = parse(env, "B24_RATE_BURST", "50", "a positive number")?;
        if !(rate_per_sec > 0.0 && rate_burst >= 1.0) {
            return Err(ConfigError::new(
                "B24_RATE_PER_SEC",
                "a rate above 0 and a burst of at least 1",
                format!("{rate_per_sec}/{rate_burst}"),
            ));
        }
        let batch_max: usize = parse(env, "WORKER_BATCH_MAX", "50", "a count from 1 to 50")?;
        if !(1..=50).contains(&batch_max) {
            return Err(ConfigError::new(
                "WORKER_BATCH_MAX",
                "a count from 1 to 50",
                batch_max.to_string(),
            ));
        }
        Ok(Self {
            amqp: AmqpConfig::from_lookup(env)?,
            database_url: Secret::new(
                env("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
            ),
            metrics_addr: parse(
                env,
                "WORKER_METRICS_ADDR",
                "0.0.0.0:9100",
                "a socket address",
            )?,
            public_url: env("PUBLIC_URL")
                .unwrap_or_else(|| "http://127.0.0.1:8080".into())
                .trim_end_matches('/')
                .to_string(),
            client_id: env("B24_CLIENT_ID").map(Secret::new),
            client_secret: env("B24_CLIENT_SECRET").map(Secret::new),
            oauth_url: env("B24_OAUTH_URL")
                .unwrap_or_else(|| "https://oauth.bitrix.info/oauth/token/".into()),
            allowed_hosts,
            rate_per_sec,
            rate_burst,
            prefetch: parse(env, "WORKER_PREFETCH", "64", "a count from 1 to 65535")?,
            db_pool: parse(env, "WORKER_DB_POOL", "8", "a count")?,
            http_timeout: millis(env, "B24_HTTP_TIMEOUT_MS", "30000")?,
            shutdown_grace: millis(env, "WORKER_SHUTDOWN_GRACE_MS", "30000")?,
            batch_max,
            batch_window: millis(env, "WORKER_BATCH_WINDOW_MS", "50")?,
            retry_attempts: parse(env, "B24_RETRY_ATTEMPTS", "6", "a count")?,
            retry_max_elapsed: millis(env, "B24_RETRY_MAX_ELAPSED_MS", "30000")?,
            app_code: env("B24_APP_CODE").or_else(|| env("B24_CLIENT_ID")),
            token_key: env("B24_TOKEN_KEY").map(Secret::new),
            token_keys_old: env("B24_TOKEN_KEYS_OLD").map(Secret::new),
            payment_debounce: secs(env, "WORKER_PAYMENT_DEBOUNCE_S", "300")?,
            token_pending_max: secs(env, "WORKER_TOKEN_PENDING_MAX_S", "900")?,
            portal_deleted_grace: secs(env, "WORKER_PORTAL_DELETED_GRACE_S", "86400")?,
            reconcile_interval: Some(secs(env, "WORKER_RECONCILE_INTERVAL_S", "60")?)
                .filter(|d| !d.is_zero()),
            idle_refresh_after: secs(env, "WORKER_IDLE_REFRESH_S", "2592000")?,
            max_limiter_wait: millis(env, "WORKER_MAX_LIMITER_WAIT_MS", "5000")?,
            portal_in_flight: parse(env, "WORKER_PORTAL_IN_FLIGHT", "50", "a count")?,
            retry_for: secs(env, "WORKER_RETRY_FOR_S", "86400")?,
        })
    }
}
