//! The scheduler: finds dispatched tasks that went silent past their
//! time-out and queues them again (or fails them once out of attempts).
//! Retryable failures are rescheduled by the ingest itself, with backoff.

use std::sync::Arc;

use lethe_store::StateStore;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::Settings;

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
                if e.requeued > 0 {
                    self.wake.notify_one();
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "time-out sweep failed; will try again"),
        }
    }
}
