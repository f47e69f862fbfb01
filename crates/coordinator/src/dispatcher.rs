//! Relays the transactional outbox to the bus. A row is removed only after
//! the bus confirmed delivery, so a crash between commit and publish loses
//! nothing; claims are leased so that replicas never publish a row at once.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use lethe_bus::{Bus, PublishError, TaskMessage, ENVELOPE_VERSION};
use lethe_store::{OutboxItem, StateStore};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::metrics::{PUBLISH_FAILURES_TOTAL, TASKS_DISPATCHED_TOTAL};
use crate::Settings;

pub struct Dispatcher {
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) wake: Arc<Notify>,
    pub(crate) settings: Settings,
    pub(crate) owner: String,
    /// Per system, the identifier types its tasks carry (absent: all).
    pub(crate) identifier_types: std::collections::HashMap<String, Vec<String>>,
}

impl Dispatcher {
    pub async fn run(self) {
        let mut backoff = delays(self.settings.poll_interval);
        loop {
            match self.relay_once().await {
                Ok(0) => {
                    backoff = delays(self.settings.poll_interval);
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.settings.poll_interval) => {}
                    }
                }
                Ok(_) => backoff = delays(self.settings.poll_interval),
                Err(e) => {
                    let delay = backoff.next().unwrap_or(self.settings.poll_interval);
                    tracing::warn!(error = %e, ?delay, "outbox relay failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Claims one batch, publishes it and records the publication. Returns
    /// how many tasks were published.
    pub async fn relay_once(&self) -> Result<usize, String> {
        let now = self.clock.now();
        let items = self
            .store
            .claim_outbox(
                &self.owner,
                self.settings.dispatch_batch,
                self.settings.max_in_flight,
                self.settings.lease,
                now,
            )
            .await
            .map_err(|e| e.to_string())?;
        if items.is_empty() {
            return Ok(0);
        }
        let messages: Vec<TaskMessage> =
            items.iter().map(|i| message(i, self.identifier_types.get(&i.system), now)).collect();
        // What was delivered is recorded as published; only what was not
        // goes back to the outbox (published again, it would be run twice).
        let published = self.publish_holding(&messages, &items).await;
        let (items, failure) = match published {
            Ok(()) => (items, None),
            Err(e) => {
                metrics::counter!(PUBLISH_FAILURES_TOTAL).increment(1);
                let failed: std::collections::HashSet<usize> = e.failed.iter().copied().collect();
                let (kept, sent): (Vec<_>, Vec<_>) =
                    items.into_iter().enumerate().partition(|(i, _)| failed.contains(i));
                let ids: Vec<i64> = kept.iter().map(|(_, item)| item.outbox_id).collect();
                if let Err(release) = self.store.release_outbox(&self.owner, &ids).await {
                    tracing::warn!(error = %release, "could not release outbox claims; they expire with their lease");
                }
                (sent.into_iter().map(|(_, item)| item).collect::<Vec<_>>(), Some(e))
            }
        };
        if !items.is_empty() {
            let recorded = self.store.mark_published(&self.owner, &items, self.clock.now()).await;
            recorded.map_err(|e| e.to_string())?;
        }
        for item in &items {
            metrics::counter!(TASKS_DISPATCHED_TOTAL, "system" => item.system.clone()).increment(1);
            let span = tracing::info_span!(
                "task.published",
                request = %item.request_id,
                task = %item.task_id,
                system = %item.system,
                attempt = item.attempt,
            );
            lethe_bus::trace::link(&span, item.request_id);
            span.in_scope(|| tracing::debug!("task published"));
        }
        match failure {
            None => Ok(items.len()),
            Some(e) => Err(format!("publish: {e}")),
        }
    }
}

impl Dispatcher {
    /// Publishes `messages`, extending the claim on their rows every third
    /// of the lease while the bus takes its time (a broker that is slow to
    /// acknowledge, a full send queue): the lease must not run out under a
    /// publish still in progress, or another replica would publish the
    /// same rows at the same time.
    async fn publish_holding(
        &self,
        messages: &[TaskMessage],
        items: &[OutboxItem],
    ) -> Result<(), PublishError> {
        let ids: Vec<i64> = items.iter().map(|i| i.outbox_id).collect();
        let publish = self.bus.publish_tasks(messages);
        tokio::pin!(publish);
        let every = (self.settings.lease / 3).max(std::time::Duration::from_millis(100));
        loop {
            tokio::select! {
                result = &mut publish => return result,
                () = tokio::time::sleep(every) => {
                    let until = self.clock.now() + chrono::Duration::from_std(self.settings.lease).unwrap_or_default();
                    if let Err(e) = self.store.extend_outbox_claims(&self.owner, &ids, until).await {
                        tracing::warn!(error = %e, "could not extend the claim on outbox rows being published");
                    }
                }
            }
        }
    }
}

/// The task message of `item`. It carries the subject's identifiers of the
/// types its system uses, as configured now ([`SystemInfo::task_identifier_types`]),
/// and no others (all of them where the connector cannot tell): a
/// vendor's worker is not given a phone number it has no use for.
///
/// [`SystemInfo::task_identifier_types`]: crate::SystemInfo::task_identifier_types
fn message(
    item: &OutboxItem,
    types: Option<&Vec<String>>,
    now: chrono::DateTime<chrono::Utc>,
) -> TaskMessage {
    let identifiers = match types {
        Some(types) => {
            item.identifiers.iter().filter(|i| types.iter().any(|t| t == i.kind.as_str())).cloned().collect()
        }
        None => item.identifiers.clone(),
    };
    TaskMessage {
        version: ENVELOPE_VERSION,
        task_id: item.task_id,
        request_id: item.request_id,
        system: item.system.clone(),
        action: item.action,
        attempt: item.attempt,
        regulation: item.regulation,
        due_at: item.due_at,
        identifiers,
        categories: item.categories.iter().map(|c| c.directive(now)).collect(),
        issued_at: now,
        job: item.job.clone(),
    }
}

/// The delays of the coordinator's own retry loops: exponential from
/// `base`, capped at 10 s, never giving up (the same `backon` policy the
/// connector runtime uses, without a retry limit).
pub(crate) fn delays(base: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(Duration::from_secs(10).max(base))
        .without_max_times()
        .build()
}
