//! Metrics of the Bitrix24 client, registered in the worker's registry.

use b24_shared::metrics::{counter_vec, histogram_vec, latency_buckets, register};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, Registry};
use std::time::Duration;

#[derive(Clone)]
pub struct B24Metrics {
    /// By method and HTTP status (`network` when no answer came).
    pub calls: IntCounterVec,
    pub call_seconds: HistogramVec,
    /// Time calls waited for the portal's shared budget.
    pub limiter_wait: Histogram,
    /// By class: `query_limit` (503), `time_limit` (429), `expired` (401).
    pub limit_hits: IntCounterVec,
    /// Token refreshes by outcome: `refreshed`, `reused` (another replica did it), `failed`, `invalid_grant`.
    pub refreshes: IntCounterVec,
    pub batch_size: Histogram,
}

impl B24Metrics {
    pub fn new(registry: &prometheus::Registry) -> Self {
        Self {
            calls: counter_vec(
                registry,
                "b24_rest_calls_total",
                "Bitrix24 REST requests by method and HTTP status",
                &["method", "status"],
            ),
            call_seconds: histogram_vec(
                registry,
                "b24_rest_call_seconds",
                "Bitrix24 REST request latency by method",
                &["method"],
                latency_buckets(),
            ),
            limiter_wait: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "b24_rest_limiter_wait_seconds",
                        "Time a call waited for the portal's shared request budget",
                    )
                    .buckets(vec![0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
                ),
            ),
            limit_hits: counter_vec(
                registry,
                "b24_rest_limit_hits_total",
                "Limit answers from Bitrix24: query_limit (503), time_limit (429), expired (401)",
                &["kind"],
            ),
            refreshes: counter_vec(
                registry,
                "b24_token_refreshes_total",
                "OAuth token refreshes by outcome",
                &["outcome"],
            ),
            batch_size: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("b24_rest_batch_size", "Commands per batch request")
                        .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0]),
                ),
            ),
        }
    }

    /// Metrics that go nowhere, for tools that make a few calls.
    pub fn unregistered() -> Self {
        Self::new(&Registry::new())
    }

    pub fn observe(&self, method: &str, status: &str, took: Duration) {
        self.calls.with_label_values(&[method, status]).inc();
        self.call_seconds
            .with_label_values(&[method])
            .observe(took.as_secs_f64());
    }
}
