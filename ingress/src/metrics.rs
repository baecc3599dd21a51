//! The ingress's own Prometheus registry.

use b24_shared::metrics::{counter_vec, histogram_vec, latency_buckets, register};
use prometheus::{HistogramVec, IntCounterVec, IntGauge, Registry};

#[derive(Clone)]
pub struct IngressMetrics {
    pub registry: Registry,
    /// By route (`events`, `placement`, `install`, `healthz`, …) and HTTP status.
    pub requests: IntCounterVec,
    /// Calls made durable (the broker confirmed), by event: what came in, per event.
    pub events: IntCounterVec,
    /// Time from publish to the broker's confirm, by outcome.
    pub publish_confirm: HistogramVec,
    /// Refused requests by reason (`form`, `missing_field`, `too_large`, `unavailable`,
    /// `forged_token`, `unknown_portal`, `request_timeout`…), and connections refused by
    /// the per-address cap (`client_connections`).
    pub rejections: IntCounterVec,
    pub in_flight: IntGauge,
    pub open_connections: IntGauge,
    /// Reads of the `portals` table on a cache miss, by outcome (`found`, `unknown`,
    /// `installing`, `unreachable`).
    pub portal_lookups: IntCounterVec,
}

impl Default for IngressMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            requests: counter_vec(
                &registry,
                "b24_ingress_requests_total",
                "HTTP requests answered, by route and status",
                &["route", "status"],
            ),
            events: counter_vec(
                &registry,
                "b24_ingress_events_total",
                "Events, widget calls and installs queued (broker confirmed), by event",
                &["event"],
            ),
            publish_confirm: histogram_vec(
                &registry,
                "b24_ingress_publish_confirm_seconds",
                "Time from publishing a message to the broker's confirm",
                &["outcome"],
                latency_buckets(),
            ),
            rejections: counter_vec(
                &registry,
                "b24_ingress_rejections_total",
                "Requests (and connections) refused without publishing, by reason",
                &["reason"],
            ),
            in_flight: register(
                &registry,
                IntGauge::new("b24_ingress_requests_in_flight", "Requests being handled"),
            ),
            open_connections: register(
                &registry,
                IntGauge::new("b24_ingress_open_connections", "Open client connections"),
            ),
            portal_lookups: counter_vec(
                &registry,
                "b24_ingress_portal_lookups_total",
                "Reads of the portals table on a token cache miss, by outcome",
                &["outcome"],
            ),
            registry,
        };
        // The failures alerts watch exist at zero from the start: rate() sees the
        // first burst of 503s, not only the second (a series born at 8 has rate 0).
        for route in ["events", "placement", "install"] {
            metrics.requests.with_label_values(&[route, "503"]);
        }
        metrics.rejections.with_label_values(&["unavailable"]);
        for event in b24_shared::metrics::event_labels() {
            metrics.events.with_label_values(&[event]);
        }
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_counters_the_alerts_watch_start_at_zero() {
        let (_, text) = b24_shared::metrics::render(&IngressMetrics::default().registry);
        let text = String::from_utf8(text).unwrap();
        for line in [
            r#"b24_ingress_requests_total{route="events",status="503"} 0"#,
            r#"b24_ingress_requests_total{route="placement",status="503"} 0"#,
            r#"b24_ingress_requests_total{route="install",status="503"} 0"#,
            r#"b24_ingress_rejections_total{reason="unavailable"} 0"#,
            r#"b24_ingress_events_total{event="ONCRMREQUISITEADD"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
