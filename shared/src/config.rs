//! Configuration from the environment alone, with defaults that work against a local
//! RabbitMQ and PostgreSQL (DESIGN.md's table). Every parser takes a lookup function so
//! tests can configure an app without touching the process environment, which is
//! shared by all tests running in parallel.

use crate::Secret;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}: expected {expected}, got `{got}`")]
pub struct ConfigError {
    name: &'static str,
    expected: &'static str,
    got: String,
}

/// Where RabbitMQ is and how our names in it are prefixed.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Holds the broker password, hence a [`Secret`].
    pub url: Secret,
    /// Prefixes every exchange and queue, so tests (and tenants) can share a broker.
    pub prefix: String,
}

#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub amqp: AmqpConfig,
    pub addr: SocketAddr,
    /// Largest accepted request body; Bitrix24 events are a few KiB.
    pub body_limit: usize,
    /// Connections beyond this wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A client that has not sent its headers by then is disconnected.
    pub header_read_timeout: Duration,
    /// How long a request waits for the broker's confirm before it gets a 503.
    pub confirm_timeout: Duration,
    /// On SIGTERM, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
    /// Where the worker keeps portals; the ingress reads their `application_token` to
    /// refuse forged events. `DATABASE_URL=off` disables the check.
    pub database_url: Option<Secret>,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/b24_pipeline";

pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl AmqpConfig {
    pub fn from_lookup(env: Lookup) -> Result<Self, ConfigError> {
        let url = env("AMQP_URL").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let prefix = env("AMQP_PREFIX").unwrap_or_else(|| "b24".into());
        let valid = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(ConfigError {
                name: "AMQP_PREFIX",
                expected: "1 to 64 characters of A-Z a-z 0-9 - _ .",
                got: prefix,
            });
        }
        Ok(Self {
            url: Secret::new(url),
            prefix,
        })
    }
}

impl IngressConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&process_env)
    }

    pub fn from_lookup(env: Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            amqp: AmqpConfig::from_lookup(env)?,
            addr: parse(
                env,
                "INGRESS_ADDR",
                "0.0.0.0:8080",
                "a socket address such as 0.0.0.0:8080",
            )?,
            body_limit: parse(env, "INGRESS_BODY_LIMIT", "65536", "a size in bytes")?,
            max_connections: parse(env, "INGRESS_MAX_CONNECTIONS", "4096", "a count")?,
            header_read_timeout: millis(env, "INGRESS_HEADER_TIMEOUT_MS", "10000")?,
            confirm_timeout: millis(env, "INGRESS_CONFIRM_TIMEOUT_MS", "5000")?,
            shutdown_grace: millis(env, "INGRESS_SHUTDOWN_GRACE_MS", "30000")?,
            database_url: match env("DATABASE_URL") {
                Some(off) if off == "off" => None,
                Some(url) => Some(Secret::new(url)),
                None => Some(Secret::new(DEFAULT_DATABASE_URL)),
            },
        })
    }
}

/// Bitrix24's cloud domains: the default `B24_ALLOWED_HOSTS`.
pub const BITRIX24_CLOUD_HOSTS: &str = "*.bitrix24.com,*.bitrix24.ru,*.bitrix24.de,*.bitrix24.eu,\
*.bitrix24.es,*.bitrix24.fr,*.bitrix24.it,*.bitrix24.pl,*.bitrix24.uk,*.bitrix24.ua,*.bitrix24.by,\
*.bitrix24.kz,*.bitrix24.com.br,*.bitrix24.in,*.bitrix24.cn,*.bitrix24.com.tr,*.bitrix24.id,\
*.bitrix24.vn,*.bitrix24.jp,*.bitrix24.site,*.bitrix24.shop,*.bitrix24.info,oauth.bitrix.info,oauth.bitrix24.tech";

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
}

impl WorkerConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&process_env)
    }

    pub fn from_lookup(env: Lookup) -> Result<Self, ConfigError> {
        let hosts = env("B24_ALLOWED_HOSTS").unwrap_or_else(|| BITRIX24_CLOUD_HOSTS.to_string());
        let allowed_hosts =
            crate::bitrix::AllowedHosts::parse(&hosts).map_err(|_| ConfigError {
                name: "B24_ALLOWED_HOSTS",
                expected:
                    "comma-separated host patterns such as *.bitrix24.com or http://127.0.0.1:*",
                got: hosts.clone(),
            })?;
        let rate_per_sec: f64 = parse(env, "B24_RATE_PER_SEC", "2", "a positive number")?;
        let rate_burst: f64 = parse(env, "B24_RATE_BURST", "50", "a positive number")?;
        if !(rate_per_sec > 0.0 && rate_burst >= 1.0) {
            return Err(ConfigError {
                name: "B24_RATE_PER_SEC",
                expected: "a rate above 0 and a burst of at least 1",
                got: format!("{rate_per_sec}/{rate_burst}"),
            });
        }
        let batch_max: usize = parse(env, "WORKER_BATCH_MAX", "50", "a count from 1 to 50")?;
        if !(1..=50).contains(&batch_max) {
            return Err(ConfigError {
                name: "WORKER_BATCH_MAX",
                expected: "a count from 1 to 50",
                got: batch_max.to_string(),
            });
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
        })
    }
}

fn parse<T: std::str::FromStr>(
    env: Lookup,
    name: &'static str,
    default: &str,
    expected: &'static str,
) -> Result<T, ConfigError> {
    let raw = env(name).unwrap_or_else(|| default.to_string());
    raw.trim().parse().map_err(|_| ConfigError {
        name,
        expected,
        got: raw,
    })
}

fn millis(env: Lookup, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
    parse(env, name, default, "a duration in milliseconds").map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = IngressConfig::from_lookup(&lookup(&[])).unwrap();
        assert_eq!(c.amqp.prefix, "b24");
        assert_eq!(c.amqp.url.expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.body_limit, 64 * 1024);
    }

    #[test]
    fn bad_values_name_the_variable_and_what_was_expected() {
        let err = IngressConfig::from_lookup(&lookup(&[("INGRESS_ADDR", "nowhere")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable INGRESS_ADDR: expected a socket address such as 0.0.0.0:8080, got `nowhere`"
        );
        let err = AmqpConfig::from_lookup(&lookup(&[("AMQP_PREFIX", "a b")])).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("environment variable AMQP_PREFIX"));
    }

    #[test]
    fn amqp_url_is_not_printed() {
        let c =
            AmqpConfig::from_lookup(&lookup(&[("AMQP_URL", "amqp://u:hunter2@h/%2f")])).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
