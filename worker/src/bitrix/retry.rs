//! Backoff for calls to Bitrix24, behind one small module: the `backoff` crate's
//! exponential policy with jitter, with every cap explicit (its default gives up only
//! after 15 minutes, far longer than a worker should hold a message).

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_interval: Duration,
    /// After this long in retries, the caller gives up and the worker requeues the
    /// message with a delay instead.
    pub max_elapsed: Duration,
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max_interval: Duration::from_secs(8),
            max_elapsed: Duration::from_secs(30),
            max_attempts: 6,
        }
    }
}

/// One call's retry state.
pub struct Retry {
    inner: ExponentialBackoff,
    attempts: u32,
    max_attempts: u32,
}

impl Retry {
    pub fn new(policy: RetryPolicy) -> Self {
        let inner = ExponentialBackoff {
            initial_interval: policy.initial,
            current_interval: policy.initial,
            randomization_factor: 0.5,
            multiplier: 2.0,
            max_interval: policy.max_interval,
            max_elapsed_time: Some(policy.max_elapsed),
            ..ExponentialBackoff::default()
        };
        Self {
            inner,
            attempts: 0,
            max_attempts: policy.max_attempts,
        }
    }

    /// The delay before the next attempt, or `None` when the budget is spent.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.attempts += 1;
        if self.attempts >= self.max_attempts {
            return None;
        }
        self.inner.next_backoff()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_and_stop_at_the_caps() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_millis(400),
            max_elapsed: Duration::from_secs(60),
            max_attempts: 5,
        };
        let mut r = Retry::new(policy);
        let delays: Vec<_> = std::iter::from_fn(|| r.next_delay()).collect();
        assert_eq!(delays.len(), 4, "{delays:?}");
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(150));
        assert!(
            delays.iter().all(|d| *d <= Duration::from_millis(600)),
            "{delays:?}"
        );
    }
}
