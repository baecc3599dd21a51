//! Prometheus helpers. Each app instance owns its own `Registry` (never the global
//! default), so several apps in one test process do not collide.

use crate::event::{KnownEvent, KnownPlacement};
use crate::EnvelopeKind;
use prometheus::{Encoder, HistogramOpts, Opts, Registry, TextEncoder};

/// Renders a registry in the text exposition format, with its content type.
pub fn render(registry: &Registry) -> (String, Vec<u8>) {
    let encoder = TextEncoder::new();
    let mut buf = Vec::new();
    // Encoding into a Vec only fails on a malformed metric family, a programming error
    // that would show up as an empty scrape rather than a crashed process.
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    (encoder.format_type().to_string(), buf)
}

/// Registers a collector built by `make`; names are static, so a failure is a bug.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: prometheus::Result<C>,
) -> C {
    let collector = collector.expect("metric definition is valid");
    registry
        .register(Box::new(collector.clone()))
        .expect("metric registered once per registry");
    collector
}

pub fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::IntCounterVec {
    register(
        registry,
        prometheus::IntCounterVec::new(Opts::new(name, help), labels),
    )
}

pub fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::HistogramVec {
    register(
        registry,
        prometheus::HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels),
    )
}

/// Latency buckets from 0.5 ms to 10 s: publish confirms take about a millisecond
/// on a healthy broker and up to the confirm timeout on a sick one.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

/// The bounded `event` label of an envelope: a handled event's or placement's own
/// label ([`KnownEvent::label`], [`KnownPlacement::label`]), the rest grouped by kind,
/// as the worker labels the message it reads.
pub fn envelope_label(kind: EnvelopeKind, code: &str) -> &'static str {
    match kind {
        EnvelopeKind::Event => KnownEvent::from_code(code).map_or("other_event", KnownEvent::label),
        EnvelopeKind::Placement => {
            KnownPlacement::from_code(code).map_or("other_placement", KnownPlacement::label)
        }
        EnvelopeKind::Install => "install",
        EnvelopeKind::Offline => {
            KnownEvent::from_code(code).map_or("other_offline", KnownEvent::label)
        }
    }
}

/// Every value the `event` label takes, so counters and histograms can start at zero
/// for each (rate() then sees their first increase; a series born at its first
/// observation shows none).
pub fn event_labels() -> Vec<&'static str> {
    let mut labels: Vec<&'static str> = KnownEvent::ALL.iter().map(|e| e.label()).collect();
    labels.extend(KnownPlacement::STATIC.iter().map(|p| p.label()));
    labels.extend([
        KnownPlacement::Dynamic(0).label(),
        "other_event",
        "other_placement",
        "install",
        "other_offline",
    ]);
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_envelope_label_is_in_the_closed_set() {
        let samples = [
            (EnvelopeKind::Event, "ONCRMREQUISITEADD"),
            (EnvelopeKind::Event, "onAppInstall"),
            (EnvelopeKind::Event, "ONCRMDEALUPDATE"),
            (EnvelopeKind::Placement, "CRM_DEAL_DETAIL_ACTIVITY"),
            (EnvelopeKind::Placement, "CRM_DYNAMIC_183_DETAIL_ACTIVITY"),
            (EnvelopeKind::Placement, "SOMETHING_ELSE"),
            (EnvelopeKind::Install, "INSTALL"),
            (EnvelopeKind::Offline, "ONCRMREQUISITEADD"),
            (EnvelopeKind::Offline, "ONCRMDEALUPDATE"),
        ];
        let all = event_labels();
        for (kind, code) in samples {
            let label = envelope_label(kind, code);
            assert!(all.contains(&label), "{kind:?} {code}: {label}");
        }
        assert_eq!(
            envelope_label(EnvelopeKind::Event, "onAppInstall"),
            "ONAPPINSTALL"
        );
    }
}
