//! Logging set-up for both binaries: `RUST_LOG` filters (default `info`), and
//! `LOG_FORMAT=json` switches to one JSON object per line for deployments.
//! What a newcomer gets wrong: `RUST_LOG=debug` is not only our own debug lines.
//! tokio-postgres logs every query's parameters (tokens among them) at debug, and
//! lapin, hyper, h2 and reqwest log frames, headers, URLs or bodies at debug and trace.
//! Those crates are pinned to `info` whatever `RUST_LOG` says; an operator who needs
//! one of them louder names it in `RUST_LOG_DEPENDENCIES` (say `lapin=debug`), knowing
//! that its output may then hold tokens.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

/// Crates (log targets, matched as prefixes) held at `info` at most.
pub const PINNED: &[&str] = &[
    "tokio_postgres",
    "postgres_protocol",
    "deadpool_postgres",
    "lapin",
    "amq_protocol",
    "hyper",
    "h2",
    "reqwest",
    "rustls",
    "tower",
];

/// The ceiling put on every log line on top of `RUST_LOG`: the [`PINNED`] crates at
/// `info`, unless `overrides` (`RUST_LOG_DEPENDENCIES`, `target=level,…`) lifts one.
/// Everything else is left to `RUST_LOG`.
pub fn dependency_ceiling(overrides: Option<&str>) -> Targets {
    let mut ceiling = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(PINNED.iter().map(|t| (*t, LevelFilter::INFO)));
    if let Some(spec) = overrides.filter(|s| !s.trim().is_empty()) {
        match spec.parse::<Targets>() {
            Ok(lifted) => {
                for (target, level) in lifted.iter() {
                    ceiling = ceiling.with_target(target, level);
                }
            }
            // Not yet able to log: the subscriber is being built.
            Err(e) => eprintln!("RUST_LOG_DEPENDENCIES ignored: {e}"),
        }
    }
    ceiling
}

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ceiling = dependency_ceiling(std::env::var("RUST_LOG_DEPENDENCIES").ok().as_deref());
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Both filters must let a line through: RUST_LOG cannot lift the ceiling, not even
    // with a more specific target or a span filter.
    let registry = tracing_subscriber::registry().with(filter).with(ceiling);
    // try_init: tests start several apps in one process and only the first may install.
    let layer = fmt::layer().with_target(false).log_internal_errors(true);
    let _ = if json {
        registry.with(layer.json().flatten_event(true)).try_init()
    } else {
        registry.with(layer).try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn dependencies_that_log_secrets_stay_at_info() {
        let ceiling = dependency_ceiling(None);
        for target in [
            "tokio_postgres::query",
            "lapin::channel",
            "hyper::proto::h1",
            "hyper_util::client",
            "reqwest::connect",
            "amq_protocol_tcp",
            "h2::codec",
        ] {
            assert!(!ceiling.would_enable(target, &Level::DEBUG), "{target}");
            assert!(ceiling.would_enable(target, &Level::INFO), "{target}");
        }
        assert!(ceiling.would_enable("b24_worker::consumer", &Level::TRACE));
        assert!(ceiling.would_enable("b24_ingress", &Level::DEBUG));
    }

    #[test]
    fn an_operator_lifts_one_crate_on_purpose() {
        let ceiling = dependency_ceiling(Some("lapin=debug"));
        assert!(ceiling.would_enable("lapin::channel", &Level::DEBUG));
        assert!(!ceiling.would_enable("lapin::channel", &Level::TRACE));
        assert!(!ceiling.would_enable("tokio_postgres::query", &Level::DEBUG));
        // Nonsense leaves the pins as they are.
        let ceiling = dependency_ceiling(Some("lapin=loud"));
        assert!(!ceiling.would_enable("lapin::channel", &Level::DEBUG));
    }
}
