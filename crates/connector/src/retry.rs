//! The retry policy the runtime applies to connector calls: exponential
//! backoff with jitter, capped, via `backon` (the maintained successor of
//! the unmaintained `backoff` crate, RUSTSEC-2025-0012).

use std::time::Duration;

use backon::ExponentialBuilder;
use serde::Deserialize;

/// How often and how patiently to retry a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay before the first retry, in milliseconds.
    #[serde(default = "RetryPolicy::default_initial_delay_ms")]
    pub initial_delay_ms: u64,
    /// Upper bound of any single delay, in milliseconds.
    #[serde(default = "RetryPolicy::default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Retries after the first try; 0 disables retrying.
    #[serde(default = "RetryPolicy::default_max_retries")]
    pub max_retries: usize,
}

impl RetryPolicy {
    const fn default_initial_delay_ms() -> u64 {
        200
    }
    const fn default_max_delay_ms() -> u64 {
        30_000
    }
    const fn default_max_retries() -> usize {
        4
    }

    /// A backoff schedule for one call.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.initial_delay_ms))
            .with_max_delay(Duration::from_millis(self.max_delay_ms.max(self.initial_delay_ms)))
            .with_max_times(self.max_retries)
            .with_jitter()
    }

    /// Retries without limit, for work that must eventually happen (e.g.
    /// publishing a result) and that only a shutdown interrupts.
    pub fn unbounded(&self) -> ExponentialBuilder {
        self.backoff().with_max_times(usize::MAX)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay_ms: Self::default_initial_delay_ms(),
            max_delay_ms: Self::default_max_delay_ms(),
            max_retries: Self::default_max_retries(),
        }
    }
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder;

    use super::*;

    /// Jitter differs between calls: tasks that failed together against a
    /// store that flapped do not all come back at the same instant.
    #[test]
    fn jitter_spreads_the_retries_of_different_calls() {
        let policy = RetryPolicy { initial_delay_ms: 1_000, max_delay_ms: 60_000, max_retries: 5 };
        let schedules: Vec<Vec<Duration>> = (0..4).map(|_| policy.backoff().build().collect()).collect();
        assert!(schedules.iter().all(|s| s.len() == 5), "{schedules:?}");
        assert!(
            schedules.windows(2).any(|w| w[0] != w[1]),
            "four calls, one schedule: the jitter is not random: {schedules:?}"
        );
        for s in &schedules {
            assert!(s[0] >= Duration::from_millis(1_000) && s[0] <= Duration::from_millis(2_000), "{s:?}");
        }
    }
}
