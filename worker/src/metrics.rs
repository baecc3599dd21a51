//! The worker's Prometheus registry: its own metrics plus the Bitrix24 client's.

use crate::bitrix::B24Metrics;
use b24_shared::metrics::event_labels;
use b24_shared::metrics::{counter_vec, histogram_vec, register};
use chrono::{DateTime, Utc};
use prometheus::{HistogramVec, IntCounterVec, IntGauge, Registry};

#[derive(Clone)]
pub struct WorkerMetrics {
    pub registry: Registry,
    /// By event label and outcome: done, duplicate, ignored, debounced, denied, retry,
    /// held, dead, dropped, requeued.
    pub messages: IntCounterVec,
    pub processing: HistogramVec,
    /// From the ingress's `received_at` (the POST) to the stored row, by event: queue
    /// wait, delay queues and processing together, what a user of the data waits.
    pub end_to_end: HistogramVec,
    pub retries: IntCounterVec,
    /// By event label and error code.
    pub dead_letters: IntCounterVec,
    /// Messages that failed verification (unknown portal, forged token, unproved
    /// installation), by event label and reason: counted and dropped.
    pub verification_failures: IntCounterVec,
    pub in_flight: IntGauge,
    /// Offline-event records by outcome: `published`, `error`.
    pub offline_records: IntCounterVec,
    /// Upkeep chores (offline_poll, idle_refresh, payment_check) by outcome.
    pub upkeep: IntCounterVec,
    pub b24: B24Metrics,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            messages: counter_vec(
                &registry,
                "b24_worker_messages_total",
                "Messages settled, by event and outcome",
                &["event", "outcome"],
            ),
            processing: histogram_vec(
                &registry,
                "b24_worker_processing_seconds",
                "Time from delivery to settlement, by event",
                &["event"],
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
            ),
            end_to_end: histogram_vec(
                &registry,
                "b24_worker_end_to_end_seconds",
                "Time from the ingress receiving an event to its row being stored, by event",
                &["event"],
                vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1800.0, 3600.0,
                ],
            ),
            retries: counter_vec(
                &registry,
                "b24_worker_retries_total",
                "Messages sent to a delay queue, by event",
                &["event"],
            ),
            dead_letters: counter_vec(
                &registry,
                "b24_worker_dead_letters_total",
                "Messages dead-lettered, by event and error code",
                &["event", "code"],
            ),
            verification_failures: counter_vec(
                &registry,
                "b24_worker_verification_failures_total",
                "Messages dropped because they failed verification, by event and reason",
                &["event", "reason"],
            ),
            offline_records: counter_vec(
                &registry,
                "b24_worker_offline_records_total",
                "Offline-event records collected from Bitrix24, by outcome",
                &["outcome"],
            ),
            upkeep: counter_vec(
                &registry,
                "b24_worker_upkeep_total",
                "Portal upkeep chores (offline_poll, idle_refresh, payment_check) by outcome",
                &["chore", "outcome"],
            ),
            in_flight: register(
                &registry,
                IntGauge::new(
                    "b24_worker_messages_in_flight",
                    "Deliveries being processed",
                ),
            ),
            b24: B24Metrics::new(&registry),
            registry,
        };
        // What the dashboard's "done per minute" and delay panels read starts at zero
        // for every event, so the first events stored show as an increase.
        for event in event_labels() {
            metrics.messages.with_label_values(&[event, "done"]);
            metrics.end_to_end.with_label_values(&[event]);
        }
        metrics
    }
}

impl WorkerMetrics {
    /// Records an event stored now that the ingress received at `received_at` (a clock
    /// behind the ingress's counts as no delay rather than a negative one).
    pub fn observe_end_to_end(&self, event: &str, received_at: DateTime<Utc>) {
        let delay = (Utc::now() - received_at).to_std().unwrap_or_default();
        self.end_to_end
            .with_label_values(&[event])
            .observe(delay.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_counts_and_delays_start_at_zero_for_every_event() {
        let (_, text) = b24_shared::metrics::render(&WorkerMetrics::default().registry);
        let text = String::from_utf8(text).unwrap();
        for event in event_labels() {
            let done = format!(r#"b24_worker_messages_total{{event="{event}",outcome="done"}} 0"#);
            let delay = format!(r#"b24_worker_end_to_end_seconds_count{{event="{event}"}} 0"#);
            assert!(text.lines().any(|l| l == done), "{done}");
            assert!(text.lines().any(|l| l == delay), "{delay}");
        }
    }

    #[test]
    fn end_to_end_delay_counts_from_received_at() {
        let m = WorkerMetrics::default();
        m.observe_end_to_end(
            "ONCRMREQUISITEADD",
            Utc::now() - chrono::Duration::seconds(7),
        );
        // A clock ahead of ours gives no negative delay.
        m.observe_end_to_end("ONAPPPAYMENT", Utc::now() + chrono::Duration::seconds(7));
        let h = m.end_to_end.with_label_values(&["ONCRMREQUISITEADD"]);
        assert_eq!(h.get_sample_count(), 1);
        assert!(
            (7.0..8.0).contains(&h.get_sample_sum()),
            "{}",
            h.get_sample_sum()
        );
        let h = m.end_to_end.with_label_values(&["ONAPPPAYMENT"]);
        assert_eq!(h.get_sample_sum(), 0.0);
    }
}
