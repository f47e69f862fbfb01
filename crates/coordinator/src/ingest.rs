//! Applies connector results. The store transaction comes first, the
//! acknowledgement after it, so a crash in between only replays results,
//! which the task state machine ignores.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lethe_bus::{Bus, Consumer, Delivery, Position, ResultMessage};
use lethe_connector::DEAD_LETTER_ATTEMPTS;
use lethe_core::{Identifier, MasterKey, Outcome, RequestId, RequestStatus, TaskState};
use lethe_store::{Applied, OutcomeReport, RetrySchedule, StateStore, StoreError};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::dispatcher::delays;
use crate::metrics::{
    DEAD_LETTERS_TOTAL, DISPATCH_TO_OUTCOME_SECONDS, OUTCOMES_TOTAL, REQUESTS_FINISHED_TOTAL,
    TASK_REQUEUES_TOTAL,
};

pub use lethe_core::outcome::{MAX_NAME_BYTES, MAX_REASON_BYTES};

/// Longest external job id accepted, in bytes.
pub const MAX_JOB_ID_BYTES: usize = 1024;

/// Times a batch of results is refused (otherwise than for unavailability)
/// before its results are applied one by one.
const BATCH_REFUSALS: u32 = 3;

/// Times one result is refused before it is dead-lettered (about half a
/// minute of backoff).
const RESULT_REFUSALS: u32 = 8;

/// The dead-letter reason of a result the state store refused every time.
pub const REFUSED: &str = "the state store refused to apply this result";

/// What a failure reason becomes when it holds one of the subject's
/// identifiers.
pub use lethe_core::identifier::{WITHHELD_REASON, WITHHELD_TEXT};

/// What a failure reason becomes when it cannot be screened: the request
/// it names is unknown or its key destroyed, so no identifiers can be
/// compared with it.
pub const UNSCREENED_REASON: &str =
    "[the connector's reason was withheld: the request's identifiers could not be read to screen it]";

/// What another text of a result becomes when it cannot be screened.
pub const UNSCREENED_TEXT: &str = "[withheld: the request's identifiers could not be read to screen it]";

/// The dead-letter reason of a result naming a task the store does not know.
pub const UNKNOWN_TASK: &str = "result refers to an unknown task";

/// The dead-letter reason of a result whose request, system or attempt is
/// not its task's.
pub const MISMATCHED: &str = "result does not match its task";

/// What a kept record's basis becomes in a result that is dead-lettered
/// because it answers no task of the request it names ([`UNKNOWN_TASK`],
/// [`MISMATCHED`]); such a letter is there to be looked at, not replayed.
pub const UNMATCHED_TEXT: &str =
    "[withheld: the result matches no task it names, so it could not be screened]";

/// What a failure reason becomes in a result that is dead-lettered because
/// it answers no task of the request it names: whose identifiers it might
/// hold is not known, so it is screened against none.
pub const UNMATCHED_REASON: &str =
    "[the connector's reason was withheld: the result matches no task it names, so it could not be screened]";

pub struct Ingest {
    pub(crate) store: Arc<dyn StateStore>,
    /// Opens a request's identifiers to screen what its results say.
    pub(crate) master: MasterKey,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) batch: usize,
    pub(crate) schedule: RetrySchedule,
    /// Tells the dispatcher that answered tasks made room under its bound.
    pub(crate) wake: Arc<Notify>,
}

impl Ingest {
    pub async fn run(self, mut consumer: Box<dyn Consumer<ResultMessage>>) {
        let source = consumer.source();
        while let Some(first) = consumer.recv().await {
            let mut batch = vec![first];
            while batch.len() < self.batch {
                match tokio::time::timeout(Duration::from_millis(2), consumer.recv()).await {
                    Ok(Some(d)) => batch.push(d),
                    _ => break,
                }
            }
            let positions: Vec<Position> = batch.iter().map(|d| d.position).collect();
            if !self.apply(batch, &source).await {
                // The bus closed before a dead letter was written: nothing
                // of the batch is acknowledged, so all of it comes again.
                tracing::warn!("the bus closed while results were being dead-lettered; left unacknowledged");
                return;
            }
            self.wake.notify_one();
            for p in positions {
                if let Err(e) = consumer.ack(p).await {
                    tracing::warn!(error = %e, "could not acknowledge a result");
                }
            }
        }
    }

    /// Applies a batch, retrying store failures and dead letters until
    /// they succeed: a result is never acknowledged before its effect is
    /// durable. `false` if the bus closed first.
    async fn apply(&self, batch: Vec<Delivery<ResultMessage>>, source: &str) -> bool {
        let mut results = Vec::with_capacity(batch.len());
        let mut durable = true;
        for d in batch {
            match d.message {
                Ok(m) => results.push(m),
                Err(bad) => durable &= self.dead_letter(source, &bad.raw, &bad.reason).await,
            }
        }
        if results.is_empty() {
            return durable;
        }
        let requests: Vec<RequestId> = results.iter().map(|m| m.request_id).collect();
        let sealed =
            until_ok("reading subjects to screen results", || self.store.sealed_subjects(&requests)).await;
        let mut subjects: HashMap<RequestId, Option<Vec<Identifier>>> = HashMap::new();
        for m in &mut results {
            let request = m.request_id;
            let subject = subjects
                .entry(request)
                .or_insert_with(|| sealed.get(&request).and_then(|s| s.open(&self.master, request)));
            screen(m, subject.as_deref());
        }
        let reports: Vec<OutcomeReport> = results
            .iter()
            .map(|m| OutcomeReport {
                task_id: m.task_id,
                attempt: m.attempt,
                outcome: m.outcome.clone(),
                request_id: Some(m.request_id),
                system: Some(m.system.clone()),
            })
            .collect();
        let applied = self.apply_all(&reports).await;
        for (msg, applied) in results.iter().zip(applied) {
            let Some(applied) = applied else {
                metrics::counter!(OUTCOMES_TOTAL, "result" => "refused").increment(1);
                durable &= self.dead_letter(source, &msg.encode(), REFUSED).await;
                continue;
            };
            match applied {
                Applied::Moved { request, task, request_status } => {
                    metrics::counter!(OUTCOMES_TOTAL, "result" => "applied").increment(1);
                    if let Some(issued) = msg.task_issued_at {
                        let seconds = (self.clock.now() - issued).num_milliseconds().max(0) as f64 / 1000.0;
                        metrics::histogram!(DISPATCH_TO_OUTCOME_SECONDS, "system" => msg.system.clone())
                            .record(seconds);
                    }
                    let span = tracing::info_span!("task.outcome", %request, task = %msg.task_id,
                        system = %msg.system, attempt = msg.attempt);
                    lethe_bus::trace::link(&span, request);
                    span.in_scope(|| {
                        if task == TaskState::Failed {
                            // Needs an operator: seen at the default WARN filter too.
                            tracing::warn!(state = %task, "task failed for good");
                        } else {
                            tracing::info!(state = %task, "task updated");
                        }
                    });
                    if task == TaskState::Pending {
                        // A retryable failure: queued for a later attempt.
                        metrics::counter!(TASK_REQUEUES_TOTAL, "reason" => "retryable_failure", "system" => msg.system.clone())
                            .increment(1);
                    }
                    if let Some(status) = request_status.filter(|s| s.is_final()) {
                        metrics::counter!(REQUESTS_FINISHED_TOTAL, "status" => status.as_str()).increment(1);
                        if status == RequestStatus::Failed {
                            tracing::warn!(%request, %status, "request finished");
                        } else {
                            tracing::info!(%request, %status, "request finished");
                        }
                    }
                }
                Applied::Ignored => {
                    metrics::counter!(OUTCOMES_TOTAL, "result" => "ignored").increment(1);
                    tracing::debug!(task = %msg.task_id, "duplicate or late outcome ignored");
                }
                Applied::UnknownTask => {
                    metrics::counter!(OUTCOMES_TOTAL, "result" => "unknown_task").increment(1);
                    let kept = unmatched(msg);
                    durable &= self.dead_letter(source, &kept.encode(), UNKNOWN_TASK).await;
                }
                Applied::Mismatch => {
                    // A connector's bug: its reason was screened against
                    // another subject, so it is kept out of the trail.
                    metrics::counter!(OUTCOMES_TOTAL, "result" => "mismatch").increment(1);
                    let kept = unmatched(msg);
                    durable &= self.dead_letter(source, &kept.encode(), MISMATCHED).await;
                }
            }
        }
        durable
    }

    /// Applies `reports`, waiting out a store that is unavailable. One the
    /// store refuses otherwise, again and again, is applied result by
    /// result, so that a result it can never apply (a poison message) is
    /// given up alone (`None`, to be dead-lettered, and replayable from
    /// there) instead of stopping every result behind it.
    async fn apply_all(&self, reports: &[OutcomeReport]) -> Vec<Option<Applied>> {
        let e = match self.apply_patiently(reports, BATCH_REFUSALS).await {
            Ok(applied) => return applied.into_iter().map(Some).collect(),
            Err(e) => e,
        };
        if reports.len() > 1 {
            tracing::warn!(error = %e, results = reports.len(), "the state store refused a batch of results; applying them one by one");
        }
        // Each once first, so that the others need not wait for the one at
        // fault; then again, patiently, those refused.
        let mut applied = Vec::with_capacity(reports.len());
        let mut refused = Vec::new();
        for (i, r) in reports.iter().enumerate() {
            match self.apply_patiently(std::slice::from_ref(r), 1).await {
                Ok(mut one) => applied.push(one.pop()),
                Err(_) => {
                    applied.push(None);
                    refused.push(i);
                }
            }
        }
        for i in refused {
            let r = &reports[i];
            match self.apply_patiently(std::slice::from_ref(r), RESULT_REFUSALS).await {
                Ok(mut one) => applied[i] = one.pop(),
                Err(e) => {
                    tracing::error!(error = %e, task = %r.task_id, "the state store refused a result every time; it is dead-lettered");
                }
            }
        }
        applied
    }

    /// Applies `reports`, retrying an unavailable store without end and
    /// other refusals up to `refusals` times, with backoff.
    async fn apply_patiently(
        &self,
        reports: &[OutcomeReport],
        refusals: u32,
    ) -> Result<Vec<Applied>, StoreError> {
        let mut backoff = delays(Duration::from_millis(100));
        let mut refused = 0;
        loop {
            match self.store.apply_outcomes(reports, &self.schedule, self.clock.now()).await {
                Ok(applied) => return Ok(applied),
                Err(e) if !e.is_transient() && refused + 1 >= refusals => return Err(e),
                Err(e) => {
                    refused += u32::from(!e.is_transient());
                    let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, ?delay, "applying outcomes failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Writes a dead letter, retrying with backoff (up to
    /// [`DEAD_LETTER_ATTEMPTS`], a few minutes) while the bus refuses it:
    /// a message is acknowledged only once it is there, or given up with an
    /// error once the bus has refused it that long (no right to the topic,
    /// a message over its size limit), rather than stop every result behind
    /// it. `false` if the bus closed.
    async fn dead_letter(&self, source: &str, raw: &[u8], reason: &str) -> bool {
        let mut backoff = delays(Duration::from_millis(100));
        for attempt in 1..=DEAD_LETTER_ATTEMPTS {
            match self.bus.dead_letter(source, raw, reason).await {
                Ok(()) => {
                    metrics::counter!(DEAD_LETTERS_TOTAL, "source" => "results").increment(1);
                    tracing::warn!(reason, "a result was dead-lettered");
                    return true;
                }
                Err(lethe_bus::BusError::Closed) => return false,
                Err(e) if attempt == DEAD_LETTER_ATTEMPTS => {
                    tracing::error!(error = %e, reason, "a result could not be dead-lettered; it is dropped");
                }
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, reason, retry_in = ?wait, "could not dead-letter a result; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        true
    }
}

/// The text a connector writes into a result (a failure's reason, a kept
/// record's basis, dataset and category names) is shown to operators,
/// written to the audit trail, which cannot be changed afterwards, and into
/// certificates. The protocol forbids identifiers in it; this holds a
/// connector to that. Every such text is cut to a length and loses its
/// control and invisible formatting characters, and each text that
/// mentions an identifier of the request's `subject`
/// ([`Identifier::appears_in`]) is withheld, as is all of it once the
/// request's key is destroyed (`None`: it can no longer be screened; the
/// request is final and the outcome late). The subjects of a batch are
/// read with one statement. The SDK's worker screens every text before it
/// sends it.
fn screen(m: &mut ResultMessage, subject: Option<&[Identifier]>) {
    if let Outcome::Accepted { job_id, .. } = &m.outcome {
        // It goes into the state store and back to the connector as it
        // is: one that cannot (a NUL byte, pages of text) fails the task.
        if job_id.is_empty() || job_id.len() > MAX_JOB_ID_BYTES || job_id.chars().any(char::is_control) {
            let reason = format!(
                "the connector's job id is empty, longer than {MAX_JOB_ID_BYTES} bytes or holds control characters"
            );
            m.outcome = Outcome::Failed { retryable: false, reason };
        }
    }
    let (request, task, system) = (m.request_id, m.task_id, m.system.clone());
    let reason = matches!(m.outcome, Outcome::Failed { .. });
    for (text, limit) in texts(&mut m.outcome) {
        // Control characters other than line breaks and tabs (a NUL byte,
        // which PostgreSQL refuses in text) are dropped, and so are
        // invisible ones (a direction override that would reorder what an
        // operator reads).
        text.retain(|c| {
            (!c.is_control() || c == '\n' || c == '\t') && !lethe_core::identifier::is_invisible(c)
        });
        lethe_core::outcome::cut(text, limit);
        match subject {
            Some(ids) if !ids.iter().any(|i| i.appears_in(text)) => {}
            Some(_) => {
                tracing::warn!(%request, %task, %system,
                    "a connector's result contained an identifier of the subject; that text is withheld");
                *text = if reason { WITHHELD_REASON } else { WITHHELD_TEXT }.to_owned();
            }
            None => *text = if reason { UNSCREENED_REASON } else { UNSCREENED_TEXT }.to_owned(),
        }
    }
}

/// The texts a connector writes into an outcome, each with the longest
/// length kept, in bytes.
fn texts(outcome: &mut Outcome) -> Vec<(&mut String, usize)> {
    let mut texts = Vec::new();
    match outcome {
        Outcome::Failed { reason, .. } => texts.push((reason, MAX_REASON_BYTES)),
        Outcome::Erased { datasets, .. } => {
            texts.extend(datasets.iter_mut().map(|d| (&mut d.dataset, MAX_NAME_BYTES)));
        }
        Outcome::RetainedInPart { datasets, retained, .. } => {
            texts.extend(datasets.iter_mut().map(|d| (&mut d.dataset, MAX_NAME_BYTES)));
            for r in retained {
                texts.push((&mut r.dataset, MAX_NAME_BYTES));
                texts.extend(r.category.as_mut().map(|c| (c, MAX_NAME_BYTES)));
                texts.push((&mut r.basis, MAX_REASON_BYTES));
            }
        }
        Outcome::NotFound { .. } | Outcome::Accepted { .. } => {}
    }
    texts
}

/// Runs `f` until it succeeds, backing off between failures: a result is
/// never acknowledged before its effect is durable, so the ingest waits
/// out a state store that is down rather than skip anything.
async fn until_ok<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff = delays(Duration::from_millis(100));
    loop {
        match f().await {
            Ok(value) => return value,
            Err(e) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, ?delay, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// A result that answers no task, as it is dead-lettered: whose
/// identifiers its texts might hold is not known, so none of them can be
/// screened, and every one a connector wrote (the system's name, a
/// failure's reason, dataset names, a kept record's category and basis,
/// the worker's name) is withheld. The counts, ids and job id stay.
fn unmatched(msg: &ResultMessage) -> ResultMessage {
    let mut kept = msg.clone();
    kept.system = UNMATCHED_TEXT.to_owned();
    if kept.worker.is_some() {
        kept.worker = Some(UNMATCHED_TEXT.to_owned());
    }
    if let Outcome::Failed { reason, .. } = &mut kept.outcome {
        *reason = UNMATCHED_REASON.to_owned();
    }
    if let Outcome::Erased { datasets, .. } | Outcome::RetainedInPart { datasets, .. } = &mut kept.outcome {
        for d in datasets {
            d.dataset = UNMATCHED_TEXT.to_owned();
        }
    }
    if let Outcome::RetainedInPart { retained, .. } = &mut kept.outcome {
        for r in retained {
            r.dataset = UNMATCHED_TEXT.to_owned();
            r.basis = UNMATCHED_TEXT.to_owned();
            if r.category.is_some() {
                r.category = Some(UNMATCHED_TEXT.to_owned());
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use lethe_core::{DatasetReport, RequestId, RetainedReport, TaskId};

    use super::*;

    /// A result that answers no task cannot be screened: no text a
    /// connector wrote reaches the dead letter, only counts and ids.
    #[test]
    fn an_unmatched_result_keeps_no_text_of_the_connectors() {
        let leak = "ada@example.com";
        let msg = |outcome| ResultMessage {
            version: 1,
            task_id: TaskId::new(),
            request_id: RequestId::new(),
            system: format!("crm-{leak}"),
            attempt: 1,
            outcome,
            reported_at: chrono::Utc::now(),
            worker: Some(format!("worker-{leak}")),
            task_issued_at: None,
        };
        let kept = RetainedReport {
            dataset: format!("invoices-{leak}"),
            category: Some(format!("billing-{leak}")),
            count: 2,
            basis: format!("kept for {leak}"),
            until: None,
            first_until: None,
        };
        for outcome in [
            Outcome::Erased {
                datasets: vec![DatasetReport::new(format!("export-{leak}"), 3, 0)],
                residual: Some(0),
            },
            Outcome::RetainedInPart {
                datasets: vec![DatasetReport::new(format!("export-{leak}"), 1, 0)],
                retained: vec![kept.clone()],
                residual: None,
            },
            Outcome::Failed { retryable: false, reason: format!("no such row {leak}") },
        ] {
            let original = msg(outcome);
            let dead = unmatched(&original);
            let text = String::from_utf8(dead.encode()).unwrap();
            assert!(!text.contains(leak), "{text}");
            assert_eq!((dead.task_id, dead.attempt), (original.task_id, original.attempt));
            if let Outcome::Erased { datasets, .. } = &dead.outcome {
                assert_eq!(datasets[0].deleted, 3, "the counts stay");
            }
        }
    }
}
