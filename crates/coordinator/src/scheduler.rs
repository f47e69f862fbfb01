//! The scheduler: finds dispatched tasks that went silent past their
//! time-out and queues them again (or fails them once out of attempts),
//! starts follow-ups of tasks whose retention period ended, releases legal
//! holds that expired, raises due-date alerts and prunes the webhook
//! delivery log. Retryable failures are
//! rescheduled by the ingest itself, with backoff (the task's next dispatch
//! time, kept in the outbox). It reads time only from its clock, so tests
//! move time forward instead of sleeping.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lethe_store::StateStore;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::Settings;

/// Follow-ups queued per sweep.
const FOLLOW_UP_BATCH: u32 = 500;
/// Requests announced per due-date sweep.
const ALERT_BATCH: u32 = 500;
/// How long before its due date an unanswered request is announced as due
/// soon (and counted by the `lethe_requests_due_soon` gauge).
pub const DUE_SOON: Duration = Duration::from_secs(7 * 86_400);
/// Webhook delivery attempts removed per sweep.
const WEBHOOK_LOG_BATCH: u32 = 5_000;
/// How often the due dates are swept: alerts are about days, not seconds.
const ALERT_INTERVAL: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

pub struct Scheduler {
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) wake: Arc<Notify>,
    pub(crate) settings: Settings,
    /// When the due dates were last swept.
    pub(crate) alerts_swept: Mutex<Option<DateTime<Utc>>>,
}

/// Counts tasks queued again for `reason`, by system.
fn count_requeues(reason: &'static str, by_system: &lethe_store::BySystem) {
    for (system, &n) in by_system {
        metrics::counter!(crate::metrics::TASK_REQUEUES_TOTAL, "reason" => reason, "system" => system.clone())
            .increment(n);
    }
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
            Ok(e) if !e.requeued.is_empty() || e.failed > 0 => {
                let systems = e.systems.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
                let requeued: u64 = e.requeued.values().sum();
                tracing::warn!(requeued, failed = e.failed, %systems, "tasks timed out without a result");
                count_requeues("timeout", &e.requeued);
                metrics::counter!(crate::metrics::REQUESTS_FINISHED_TOTAL, "status" => "failed")
                    .increment(e.requests_failed);
                if requeued > 0 {
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
            Ok(queued) if queued.is_empty() => {}
            Ok(queued) => {
                let tasks: u64 = queued.values().sum();
                tracing::info!(tasks, "retention periods ended; follow-up erasures queued");
                count_requeues("follow_up", &queued);
                self.wake.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "follow-up sweep failed; will try again"),
        }
        self.due_dates(now).await;
        self.prune_webhook_log(now).await;
    }

    /// Removes webhook delivery attempts older than the log keeps them, a
    /// bounded batch per sweep (a backlog goes over several sweeps).
    async fn prune_webhook_log(&self, now: DateTime<Utc>) {
        let Some(keep) = self.settings.webhook_log_keep else { return };
        let Ok(keep) = chrono::Duration::from_std(keep) else { return };
        let Some(before) = now.checked_sub_signed(keep) else { return };
        match self.store.prune_webhook_deliveries(before, WEBHOOK_LOG_BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(attempts = n, "pruned the webhook delivery log"),
            Err(e) => tracing::warn!(error = %e, "webhook delivery log pruning failed; will try again"),
        }
    }

    /// Announces requests coming due or overdue: a warning per request in
    /// the log (its id, never its subject), an audit event that the
    /// dashboard and the trail show, and a counter.
    async fn due_dates(&self, now: DateTime<Utc>) {
        {
            let mut last = self.alerts_swept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| now - t < ALERT_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        match self.store.raise_due_alerts(now, DUE_SOON, ALERT_BATCH).await {
            Ok(alerts) => {
                for request in &alerts.overdue {
                    tracing::warn!(%request, "request is past its due date and not answered");
                }
                for request in &alerts.due_soon {
                    tracing::warn!(%request, due_within_days = DUE_SOON.as_secs() / 86_400, "request is due soon and not answered");
                }
                metrics::counter!(crate::metrics::DUE_DATE_ALERTS_TOTAL, "alert" => "overdue")
                    .increment(alerts.overdue.len() as u64);
                metrics::counter!(crate::metrics::DUE_DATE_ALERTS_TOTAL, "alert" => "due_soon")
                    .increment(alerts.due_soon.len() as u64);
                // A full batch: more are owed; sweep again on the next tick.
                if alerts.overdue.len() + alerts.due_soon.len() >= ALERT_BATCH as usize {
                    *self.alerts_swept.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                }
            }
            Err(e) => {
                *self.alerts_swept.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                tracing::warn!(error = %e, "due-date sweep failed; will try again");
            }
        }
    }
}
