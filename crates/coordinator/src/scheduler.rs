//! The scheduler: finds dispatched tasks that went silent past their
//! time-out and queues them again (or fails them once out of attempts),
//! starts follow-ups of tasks whose retention period ended, and releases
//! legal holds that expired. Retryable failures are rescheduled by the
//! ingest itself, with backoff. It reads time only from its clock, so tests
//! move time forward instead of sleeping.

use std::sync::Arc;

use lethe_store::StateStore;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::Settings;

/// Follow-ups queued per sweep.
const FOLLOW_UP_BATCH: u32 = 500;

pub struct Scheduler {
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) wake: Arc<Notify>,
    pub(crate) settings: Settings,
}

impl Scheduler {
    pub async fn run(self) {
        loop {
            tokio::time::sleep(self.settings.scheduler_interval).await;
            self.tick().await;
        }
    }

    /// One sweep; exposed so that tests with a manual clock can drive it.
    pub async fn tick(&self) {
        let now = self.clock.now();
        match self.store.expire_dispatched(self.settings.task_timeout, &self.settings.retry, now).await {
            Ok(e) if e.requeued + e.failed > 0 => {
                tracing::warn!(requeued = e.requeued, failed = e.failed, "tasks timed out without a result");
                metrics::counter!(crate::metrics::TASK_REQUEUES_TOTAL, "reason" => "timeout")
                    .increment(e.requeued);
                if e.requeued > 0 {
                    self.wake.notify_one();
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "time-out sweep failed; will try again"),
        }
        match self.store.expire_holds(now).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(holds = n, "legal holds expired and were released");
                self.wake.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "hold expiry sweep failed; will try again"),
        }
        match self.store.run_follow_ups(now, FOLLOW_UP_BATCH).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(tasks = n, "retention periods ended; follow-up erasures queued");
                metrics::counter!(crate::metrics::TASK_REQUEUES_TOTAL, "reason" => "follow_up").increment(n);
                self.wake.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "follow-up sweep failed; will try again"),
        }
    }
}
