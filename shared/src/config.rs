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

impl ConfigError {
    pub fn new(name: &'static str, expected: &'static str, got: impl Into<String>) -> Self {
        Self {
            name,
            expected,
            got: got.into(),
        }
    }
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
    /// Connections one client address (an IPv6 /64) may hold; more are refused at
    /// once. Default: an eighth of `max_connections`. 0: no cap (behind a reverse
    /// proxy every connection comes from it).
    pub max_connections_per_client: usize,
    /// A client that has not sent its headers by then is disconnected; an idle
    /// keep-alive connection is closed after it too.
    pub header_read_timeout: Duration,
    /// The whole request, headers and body, must arrive within this from its first
    /// byte; a late body gets 408.
    pub request_timeout: Duration,
    /// How long a request waits for the broker's confirm before it gets a 503.
    pub confirm_timeout: Duration,
    /// On SIGTERM, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
    /// Where the worker keeps portals; the ingress reads their `application_token` to
    /// refuse forged events. `DATABASE_URL=off` disables the check.
    pub database_url: Option<Secret>,
    /// The ingress's public base URL (`PUBLIC_URL`, as the worker reads it), without a
    /// trailing slash: the install page binds `<public_url>/events`, never an address
    /// taken from the request.
    pub public_url: String,
    /// For this long after a portal's installation was stored, its events and widget
    /// calls pass unverified: the event that brings its token may still be queued.
    pub install_grace: Duration,
}

pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:8080";

/// `PUBLIC_URL`: an http(s) base URL, its trailing slashes trimmed.
pub fn public_url(env: Lookup) -> Result<String, ConfigError> {
    let raw = env("PUBLIC_URL").unwrap_or_else(|| DEFAULT_PUBLIC_URL.into());
    let url = raw.trim().trim_end_matches('/').to_string();
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !url.chars().any(char::is_whitespace) => Ok(url),
        _ => Err(ConfigError::new(
            "PUBLIC_URL",
            "an http:// or https:// base URL such as https://b24.example.com",
            raw,
        )),
    }
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
        let max_connections: usize = parse(env, "INGRESS_MAX_CONNECTIONS", "4096", "a count")?;
        // One address may hold an eighth of the slots unless told otherwise.
        let per_client_default = (max_connections / 8).max(1).to_string();
        Ok(Self {
            amqp: AmqpConfig::from_lookup(env)?,
            addr: parse(
                env,
                "INGRESS_ADDR",
                "0.0.0.0:8080",
                "a socket address such as 0.0.0.0:8080",
            )?,
            body_limit: parse(env, "INGRESS_BODY_LIMIT", "65536", "a size in bytes")?,
            max_connections,
            max_connections_per_client: parse(
                env,
                "INGRESS_MAX_CONNECTIONS_PER_CLIENT",
                &per_client_default,
                "a count (0 for no cap)",
            )?,
            header_read_timeout: millis(env, "INGRESS_HEADER_TIMEOUT_MS", "10000")?,
            request_timeout: millis(env, "INGRESS_REQUEST_TIMEOUT_MS", "10000")?,
            confirm_timeout: millis(env, "INGRESS_CONFIRM_TIMEOUT_MS", "5000")?,
            shutdown_grace: millis(env, "INGRESS_SHUTDOWN_GRACE_MS", "30000")?,
            database_url: match env("DATABASE_URL") {
                Some(off) if off == "off" => None,
                Some(url) => Some(Secret::new(url)),
                None => Some(Secret::new(DEFAULT_DATABASE_URL)),
            },
            public_url: public_url(env)?,
            install_grace: millis(env, "INGRESS_INSTALL_GRACE_MS", "120000")?,
        })
    }
}

pub fn parse<T: std::str::FromStr>(
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

pub fn millis(env: Lookup, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
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
        assert_eq!(c.public_url, "http://127.0.0.1:8080");
        assert_eq!(c.max_connections, 4096);
        assert_eq!(c.max_connections_per_client, 512);
        assert_eq!(c.request_timeout, Duration::from_secs(10));
    }

    #[test]
    fn public_url_loses_its_trailing_slash_and_must_be_http() {
        let c =
            IngressConfig::from_lookup(&lookup(&[("PUBLIC_URL", "https://b24.example.com/app/")]))
                .unwrap();
        assert_eq!(c.public_url, "https://b24.example.com/app");
        for bad in ["b24.example.com", "ftp://x", "https://", "https://a b"] {
            let err = IngressConfig::from_lookup(&lookup(&[("PUBLIC_URL", bad)])).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("environment variable PUBLIC_URL"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_per_client_cap_can_be_turned_off() {
        let c = IngressConfig::from_lookup(&lookup(&[("INGRESS_MAX_CONNECTIONS_PER_CLIENT", "0")]))
            .unwrap();
        assert_eq!(c.max_connections_per_client, 0);
        let c = IngressConfig::from_lookup(&lookup(&[("INGRESS_MAX_CONNECTIONS", "50")])).unwrap();
        assert_eq!(c.max_connections_per_client, 6, "an eighth of the slots");
        let c = IngressConfig::from_lookup(&lookup(&[("INGRESS_MAX_CONNECTIONS", "4")])).unwrap();
        assert_eq!(c.max_connections_per_client, 1);
        let err = IngressConfig::from_lookup(&lookup(&[("INGRESS_REQUEST_TIMEOUT_MS", "soon")]))
            .unwrap_err();
        assert!(
            err.to_string().contains("INGRESS_REQUEST_TIMEOUT_MS"),
            "{err}"
        );
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
