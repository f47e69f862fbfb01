//! The worker runtime: consumes a system's tasks, opens their identifiers,
//! calls the connector with retries, verifies, publishes the result and only
//! then acknowledges the task. It owns the span, the retries and the metrics
//! so that a connector author writes only the store-specific part.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::Retryable;
use chrono::Utc;
use lethe_bus::{Bus, BusError, Consumer, Delivery, Position, ResultMessage, TaskMessage, ENVELOPE_VERSION};
use lethe_core::identifier::{WITHHELD_REASON, WITHHELD_TEXT};
use lethe_core::outcome::{cut, MAX_NAME_BYTES, MAX_REASON_BYTES};
use lethe_core::{DataKey, Identifier, Outcome, RequestId, TaskId};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::connector::{Connector, ConnectorError, Erasure, ErasureTask, Progress, StillWanted};
use crate::metrics::{RETRIES_TOTAL, TASKS_TOTAL, TASK_DURATION_SECONDS};
use crate::retry::RetryPolicy;

/// Attempts to write one dead letter before the message is given up.
pub const DEAD_LETTER_ATTEMPTS: usize = 20;

/// Gives a worker the data key of a request whose task it holds.
#[async_trait]
pub trait KeyResolver: Send + Sync + 'static {
    /// The request's data key for `attempt` of `task`, or `None` once it
    /// has been destroyed or the task no longer asks for that attempt (it
    /// settled, or the attempt was withdrawn or superseded).
    async fn data_key(
        &self,
        system: &str,
        request: RequestId,
        task: TaskId,
        attempt: u32,
    ) -> Result<Option<DataKey>, ConnectorError>;
}

/// What a worker gives one task unless told otherwise: three times the
/// coordinator's default task time-out.
const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(900);

/// How often a connector's [`StillWanted::check`] asks the coordinator at
/// most, unless told otherwise.
const DEFAULT_WANTED_EVERY: Duration = Duration::from_secs(2);

/// Runs one connector against one system's task stream.
pub struct Worker {
    system: String,
    name: String,
    connector: Arc<dyn Connector>,
    keys: Arc<dyn KeyResolver>,
    bus: Arc<dyn Bus>,
    retry: RetryPolicy,
    concurrency: usize,
    task_timeout: Duration,
    wanted_every: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("system", &self.system).field("name", &self.name).finish()
    }
}

impl Worker {
    pub fn new(
        system: impl Into<String>,
        connector: Arc<dyn Connector>,
        keys: Arc<dyn KeyResolver>,
        bus: Arc<dyn Bus>,
        retry: RetryPolicy,
    ) -> Self {
        let system = system.into();
        let name = format!("{system}-{}", std::process::id());
        Self {
            system,
            name,
            connector,
            keys,
            bus,
            retry,
            concurrency: 8,
            task_timeout: DEFAULT_TASK_TIMEOUT,
            wanted_every: DEFAULT_WANTED_EVERY,
        }
    }

    /// How often, at most, a running task's [`StillWanted::check`] asks the
    /// coordinator whether the attempt is still wanted (default 2 s).
    pub fn with_still_wanted_every(mut self, every: Duration) -> Self {
        self.wanted_every = every;
        self
    }

    /// How many tasks run at once (default 8). Acknowledgements still
    /// follow the order of each partition: an offset is stored only once
    /// every earlier task of its partition has delivered its result.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// How long one task may take from its pick-up, its key, the
    /// connector's calls and their retries together (default 900 s, three
    /// times the coordinator's default time-out). Past it the calls are
    /// abandoned (their futures dropped; work a connector spawned may
    /// still run) and the task reports a retryable failure, so a call that
    /// never returns costs an attempt, not a slot for ever. A task that
    /// outlasts the coordinator's time-out is sent again meanwhile; a
    /// success of the first attempt still counts.
    pub fn with_task_timeout(mut self, timeout: Duration) -> Self {
        self.task_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Consumes until the bus closes. Each task is acknowledged only after
    /// its result has been delivered.
    pub async fn run(self) -> Result<(), BusError> {
        self.run_until(std::future::pending(), Duration::ZERO).await
    }

    /// As [`Worker::run`], until `stop` resolves (a SIGTERM, say): then it
    /// takes no new task and lets those in flight finish, deliver their
    /// results and be acknowledged, for at most `grace`; what is still
    /// running then is left unacknowledged, to be delivered again. A task
    /// cut off after its erase ran would be run again and report what it
    /// finds then (nothing), not what it removed.
    pub async fn run_until(self, stop: impl Future<Output = ()>, grace: Duration) -> Result<(), BusError> {
        crate::metrics::describe(&self.system);
        let mut consumer: Box<dyn Consumer<TaskMessage>> = self.bus.task_consumer(&self.system).await?;
        tracing::info!(system = %self.system, concurrency = self.concurrency, "worker started");
        let this = Arc::new(self);
        let source: Arc<str> = consumer.source().into();
        let mut in_flight: JoinSet<Result<Position, BusError>> = JoinSet::new();
        let mut order = AckOrder::default();
        let mut open = true;
        let mut stopping = false;
        let deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(stop, deadline);
        while open || !in_flight.is_empty() {
            tokio::select! {
                () = &mut stop, if !stopping => {
                    stopping = true;
                    open = false;
                    deadline.as_mut().reset(tokio::time::Instant::now() + grace);
                    tracing::info!(system = %this.system, in_flight = in_flight.len(),
                        "stopping: finishing the tasks in flight");
                }
                () = &mut deadline, if stopping => {
                    tracing::warn!(system = %this.system, in_flight = in_flight.len(),
                        "stopping: tasks still running after the grace period are left to be delivered again");
                    return Ok(());
                }
                delivery = consumer.recv(), if open && in_flight.len() < this.concurrency => match delivery {
                    Some(d) => {
                        order.received(d.position);
                        in_flight.spawn(this.clone().handle(d, source.clone()));
                    }
                    None => open = false,
                },
                Some(done) = in_flight.join_next() => {
                    let position = done.map_err(|e| BusError::Unavailable(format!("task panicked: {e}")))??;
                    if let Some(ack) = order.completed(position) {
                        consumer.ack(ack).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Processes one delivery to a published result (or a dead letter).
    async fn handle(
        self: Arc<Self>,
        delivery: Delivery<TaskMessage>,
        source: Arc<str>,
    ) -> Result<Position, BusError> {
        match delivery.message {
            Ok(task) => {
                let result = self.process(task).await;
                self.publish(&result).await?;
            }
            Err(bad) => {
                let written = (|| self.bus.dead_letter(&source, &bad.raw, &bad.reason))
                    .retry(self.retry.unbounded().with_max_times(DEAD_LETTER_ATTEMPTS))
                    .when(|e| !matches!(e, BusError::Closed))
                    .notify(|e, _| tracing::warn!(error = %e, "writing a dead letter failed; retrying"))
                    .await;
                match written {
                    // The reason never quotes the message (see the envelope's decoder).
                    Ok(()) => {
                        metrics::counter!(crate::metrics::DEAD_LETTERS_TOTAL, "source" => "tasks")
                            .increment(1);
                        tracing::warn!(source = %source, partition = delivery.position.partition,
                            offset = delivery.position.offset, reason = %bad.reason, "a task message was dead-lettered")
                    }
                    Err(BusError::Closed) => return Err(BusError::Closed),
                    // A dead letter the bus keeps refusing (no right to the
                    // topic, a message over its size limit) must not stop
                    // every task behind it.
                    Err(e) => tracing::error!(error = %e, reason = %bad.reason,
                        "a dead letter could not be written; the undecodable message is dropped"),
                }
            }
        }
        Ok(delivery.position)
    }

    async fn publish(&self, result: &ResultMessage) -> Result<(), BusError> {
        (|| self.bus.publish_result(result))
            .retry(self.retry.unbounded())
            .when(|e| !matches!(e, BusError::Closed))
            .notify(|e, _| tracing::warn!(error = %e, "publishing a result failed; retrying"))
            .await
    }

    /// Runs one task to an outcome. Never fails: every failure becomes a
    /// `failed` outcome with a reason free of identifiers.
    pub async fn process(&self, task: TaskMessage) -> ResultMessage {
        let span = tracing::info_span!(
            "task",
            request = %task.request_id,
            task = %task.task_id,
            system = %task.system,
            attempt = task.attempt,
        );
        lethe_bus::trace::link(&span, task.request_id);
        let started = Instant::now();
        // A connector that panics fails its task; the worker and the other
        // tasks in flight carry on.
        let run = CatchUnwind(Box::pin(self.outcome(&task).instrument(span.clone())));
        let outcome = match tokio::time::timeout(self.task_timeout, run).await {
            Ok(Ok(outcome)) => outcome,
            Err(_) => {
                let secs = self.task_timeout.as_secs_f64();
                span.in_scope(|| {
                    tracing::warn!(timeout_secs = secs, "the task ran out of time; its calls were abandoned")
                });
                Outcome::Failed {
                    retryable: true,
                    reason: format!(
                        "the task did not finish within {secs} s (the worker's task time-out): its calls were \
                         abandoned, and what they did is checked again on the next attempt"
                    ),
                }
            }
            Ok(Err(_)) => {
                span.in_scope(|| tracing::error!("the connector panicked; the task fails"));
                Outcome::Failed {
                    retryable: false,
                    reason: "the connector panicked (a bug in the connector; see the worker's log)".into(),
                }
            }
        };
        let label = outcome_label(&outcome);
        span.in_scope(|| tracing::info!(outcome = label, summary = %outcome.summary(), "task finished"));
        metrics::counter!(TASKS_TOTAL, "system" => self.system.clone(), "outcome" => label).increment(1);
        metrics::histogram!(TASK_DURATION_SECONDS, "system" => self.system.clone())
            .record(started.elapsed().as_secs_f64());
        ResultMessage {
            version: ENVELOPE_VERSION,
            task_id: task.task_id,
            request_id: task.request_id,
            system: task.system,
            attempt: task.attempt,
            outcome,
            reported_at: Utc::now(),
            worker: Some(self.name.clone()),
            task_issued_at: Some(task.issued_at),
        }
    }

    async fn outcome(&self, msg: &TaskMessage) -> Outcome {
        let task = match self.open(msg).await {
            Ok(task) => task,
            Err(e) => return failed(e),
        };
        // A connector's error text leaves the process (in the worker's log
        // and the result) only if it names none of the subject's
        // identifiers, however a store quoted the value back.
        let subject = task.identifiers.as_slice();
        // A retry first asks whether the attempt is still wanted: a legal
        // hold placed while the connector backs off withdraws the attempt
        // (its key is refused from then on), and nothing more may go.
        let mut retrying = false;
        let erase = || {
            let check = std::mem::replace(&mut retrying, true);
            let task = &task;
            async move {
                if check {
                    self.still_wanted(msg).await?;
                }
                self.connector.advance(task).await
            }
        };
        let erasure = match self.call("erase", subject, erase).await {
            Ok(Progress::Done(erasure)) => erasure,
            Ok(Progress::Running(pending)) => {
                return Outcome::Accepted {
                    job_id: pending.job_id,
                    poll_after_seconds: Some(pending.poll_after.as_secs().max(1)),
                }
            }
            Err(e) => return failed(screened(e, subject)),
        };
        // Stopped part-way: a legal hold or a newer attempt (the coordinator
        // gave up waiting) withdrew it while it ran. It is verified all the
        // same, so that it never passes for a whole erasure: what is left
        // makes it a failure, which the coordinator does not apply to a
        // withdrawn attempt but records, with what it changed, as a late
        // change; a newer attempt erases the rest.
        let withdrawn = task.wanted.withdrawn();
        if withdrawn {
            tracing::warn!(
                changed = erasure.total(),
                "the attempt was withdrawn while it ran; it stopped part-way"
            );
        }
        match self.call("verify", subject, || self.connector.verify(&task)).await {
            Ok(residual) => erased(screened_report(erasure, subject), Some(residual)),
            // Unverified, the report still says what the attempt changed:
            // the coordinator applies no unverified report of a withdrawn
            // or superseded attempt, and records it as a late change.
            Err(e) if withdrawn => {
                tracing::warn!(error = %screened(e, subject).message, "could not verify the withdrawn attempt");
                erased(screened_report(erasure, subject), None)
            }
            Err(e) => {
                let e = screened(e, subject);
                failed(ConnectorError { message: format!("verification failed: {}", e.message), ..e })
            }
        }
    }

    /// Fails (permanently) if the coordinator no longer asks for this
    /// attempt: it refuses the attempt's key once it is withdrawn.
    async fn still_wanted(&self, msg: &TaskMessage) -> Result<(), ConnectorError> {
        match self.keys.data_key(&msg.system, msg.request_id, msg.task_id, msg.attempt).await? {
            Some(_) => Ok(()),
            None => Err(ConnectorError::permanent(
                "this attempt was withdrawn while it was retried (a legal hold, or a newer attempt): \
                 nothing more was done",
            )),
        }
    }

    /// Asks the coordinator whether `msg`'s attempt is still wanted: it
    /// refuses the attempt's key once the attempt is withdrawn.
    fn wanted(&self, msg: &TaskMessage) -> StillWanted {
        let keys = self.keys.clone();
        let (system, request, task, attempt) = (msg.system.clone(), msg.request_id, msg.task_id, msg.attempt);
        StillWanted::asking(self.wanted_every, move || {
            let (keys, system) = (keys.clone(), system.clone());
            Box::pin(async move { Ok(keys.data_key(&system, request, task, attempt).await?.is_some()) })
        })
    }

    async fn open(&self, msg: &TaskMessage) -> Result<ErasureTask, ConnectorError> {
        let key = self
            .call("key", &[], || self.keys.data_key(&msg.system, msg.request_id, msg.task_id, msg.attempt))
            .await?
            .ok_or_else(|| {
                ConnectorError::permanent(
                    "no key for this task: the request is closed, the task is not this system's, \
                     or this attempt is no longer asked for",
                )
            })?;
        let identifiers = msg
            .identifiers
            .iter()
            .map(|s| key.open(msg.request_id, s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                ConnectorError::permanent("identifiers could not be decrypted with the request's key")
            })?;
        Ok(ErasureTask {
            task_id: msg.task_id,
            request_id: msg.request_id,
            system: msg.system.clone(),
            action: msg.action,
            directives: msg.categories.clone(),
            issued_at: msg.issued_at,
            attempt: msg.attempt,
            identifiers,
            job: msg.job.clone(),
            wanted: self.wanted(msg),
        })
    }

    async fn call<T, F, Fut>(
        &self,
        call: &'static str,
        subject: &[Identifier],
        f: F,
    ) -> Result<T, ConnectorError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ConnectorError>>,
    {
        f.retry(self.retry.backoff())
            .when(|e: &ConnectorError| e.retryable)
            .notify(|e, delay| {
                let error = screened(e.clone(), subject).message;
                tracing::warn!(call, %error, ?delay, "retryable connector error; backing off");
                metrics::counter!(RETRIES_TOTAL, "system" => self.system.clone(), "call" => call)
                    .increment(1);
            })
            .await
    }
}

/// Resolves to `Err` if polling the future panics.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// `e`, its message withheld if it names one of `subject`'s identifiers.
fn screened(e: ConnectorError, subject: &[Identifier]) -> ConnectorError {
    if subject.iter().any(|i| i.appears_in(&e.message)) {
        ConnectorError { message: WITHHELD_REASON.to_owned(), ..e }
    } else {
        e
    }
}

/// `erasure`, each text of it (dataset names, a kept record's category
/// and basis) withheld if it names one of `subject`'s identifiers: they
/// reach the audit trail and the certificate.
fn screened_report(mut erasure: Erasure, subject: &[Identifier]) -> Erasure {
    let screen = |text: &mut String, limit: usize| {
        if subject.iter().any(|i| i.appears_in(text)) {
            *text = WITHHELD_TEXT.to_owned();
        }
        cut(text, limit);
    };
    erasure.datasets.iter_mut().for_each(|d| screen(&mut d.dataset, MAX_NAME_BYTES));
    for r in &mut erasure.retained {
        screen(&mut r.dataset, MAX_NAME_BYTES);
        r.category.iter_mut().for_each(|c| screen(c, MAX_NAME_BYTES));
        screen(&mut r.basis, MAX_REASON_BYTES);
    }
    erasure
}

/// The outcome of an error, its message cut to the protocol's length (a
/// vendor's error page must not make a result the broker refuses).
fn failed(e: ConnectorError) -> Outcome {
    let mut reason = e.message;
    cut(&mut reason, MAX_REASON_BYTES);
    Outcome::Failed { retryable: e.retryable, reason }
}

/// Nothing removed is `not_found`, unless a dataset still says by when
/// what an earlier attempt removed is gone for good (`purge_by`: a
/// compacted topic's tombstone written before), or that it was not
/// searched: that must reach the request, so the outcome stays `erased`.
fn erased(erasure: Erasure, residual: Option<u64>) -> Outcome {
    let telling = erasure.datasets.iter().any(|d| d.purge_by.is_some() || d.not_searched);
    if !erasure.retained.is_empty() {
        Outcome::RetainedInPart { datasets: erasure.datasets, retained: erasure.retained, residual }
    } else if erasure.total() == 0 && !telling {
        Outcome::NotFound { residual }
    } else {
        Outcome::Erased { datasets: erasure.datasets, residual }
    }
}

/// The outcome's metric label: one that could search none of its datasets
/// is not counted as an erasure.
fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        _ if o.searched_nothing() => "not_searched",
        // Data left over after the erase (a stopped attempt, say): the
        // coordinator takes it for a failure too.
        _ if o.class() == lethe_core::OutcomeClass::Failed => "failed",
        Outcome::Erased { .. } => "erased",
        Outcome::NotFound { .. } => "not_found",
        Outcome::RetainedInPart { .. } => "retained_in_part",
        Outcome::Failed { .. } => "failed",
        Outcome::Accepted { .. } => "accepted",
    }
}

/// Keeps acknowledgements in partition order while tasks finish out of
/// order: the offset to store is the highest one below which every task of
/// that partition is done.
#[derive(Debug, Default)]
struct AckOrder {
    partitions: std::collections::HashMap<i32, std::collections::VecDeque<(i64, bool)>>,
}

impl AckOrder {
    fn received(&mut self, p: Position) {
        self.partitions.entry(p.partition).or_default().push_back((p.offset, false));
    }

    /// Marks `p` done; returns the position to acknowledge, if any moved.
    fn completed(&mut self, p: Position) -> Option<Position> {
        let queue = self.partitions.get_mut(&p.partition)?;
        // A message read again after a rebalance can be queued twice: each
        // completion marks one of them.
        if let Some(entry) = queue.iter_mut().find(|(o, done)| *o == p.offset && !done) {
            entry.1 = true;
        }
        let mut last = None;
        while let Some(&(offset, true)) = queue.front() {
            queue.pop_front();
            last = Some(Position { partition: p.partition, offset });
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_follow_partition_order() {
        let at = |partition, offset| Position { partition, offset };
        let mut order = AckOrder::default();
        for o in 0..4 {
            order.received(at(0, o));
        }
        order.received(at(1, 7));
        assert_eq!(order.completed(at(0, 2)), None, "0 and 1 are still running");
        assert_eq!(order.completed(at(1, 7)), Some(at(1, 7)));
        assert_eq!(order.completed(at(0, 0)), Some(at(0, 0)));
        assert_eq!(order.completed(at(0, 1)), Some(at(0, 2)), "1 done releases 2 as well");
        assert_eq!(order.completed(at(0, 3)), Some(at(0, 3)));
    }

    /// A re-run that removes nothing more is `not_found`, unless a dataset
    /// carries the date by which an earlier removal is complete.
    #[test]
    fn a_rerun_keeps_the_purge_date() {
        use lethe_core::DatasetReport;
        let none = Erasure { datasets: vec![DatasetReport::new("profiles", 0, 0)], retained: vec![] };
        assert!(matches!(erased(none.clone(), Some(0)), Outcome::NotFound { .. }));
        let by = Utc::now() + chrono::Duration::days(7);
        let mut purging = none;
        purging.datasets[0].purge_by = Some(by);
        match erased(purging, Some(0)) {
            Outcome::Erased { datasets, .. } => assert_eq!(datasets[0].purge_by, Some(by)),
            other => panic!("{other:?}"),
        }
    }

    /// Nothing removed where a dataset could not be searched is no "nothing
    /// found": the datasets reach the request, saying which were searched.
    #[test]
    fn a_dataset_not_searched_keeps_the_datasets() {
        use lethe_core::DatasetReport;
        let some = Erasure {
            datasets: vec![DatasetReport::new("newsletter", 0, 0), DatasetReport::unsearched("sessions")],
            retained: vec![],
        };
        let outcome = erased(some, Some(0));
        let Outcome::Erased { datasets, .. } = &outcome else { panic!("{outcome:?}") };
        assert!(!datasets[0].not_searched && datasets[1].not_searched);
        let summary = outcome.summary();
        assert!(
            summary.ends_with("not searched (no identifier of the types they find subjects by): sessions"),
            "{summary}"
        );
        assert_eq!(outcome_label(&outcome), "erased", "one dataset was searched");
        let none = erased(
            Erasure { datasets: vec![DatasetReport::unsearched("sessions")], retained: vec![] },
            Some(0),
        );
        assert_eq!(outcome_label(&none), "not_searched", "counted apart from erasures: {none:?}");
    }

    struct Panics;

    #[async_trait]
    impl Connector for Panics {
        async fn erase(&self, _task: &ErasureTask) -> Result<Erasure, ConnectorError> {
            panic!("a bug in the connector")
        }
        async fn verify(&self, _task: &ErasureTask) -> Result<u64, ConnectorError> {
            Ok(0)
        }
        async fn health(&self) -> Result<(), ConnectorError> {
            Ok(())
        }
    }

    /// Serves its key for every task, or only once (`once`): the attempt
    /// is then withdrawn, by a legal hold say, after the worker has it.
    struct OneKey {
        key: DataKey,
        once: bool,
        served: std::sync::atomic::AtomicBool,
    }

    impl OneKey {
        fn new(key: &DataKey) -> Self {
            Self { key: key.clone(), once: false, served: Default::default() }
        }

        fn once(key: &DataKey) -> Self {
            Self { once: true, ..Self::new(key) }
        }
    }

    #[async_trait]
    impl KeyResolver for OneKey {
        async fn data_key(
            &self,
            _system: &str,
            _request: RequestId,
            _task: TaskId,
            _attempt: u32,
        ) -> Result<Option<DataKey>, ConnectorError> {
            let served = self.served.swap(true, std::sync::atomic::Ordering::SeqCst);
            Ok((!(self.once && served)).then(|| self.key.clone()))
        }
    }

    /// A panicking connector fails its task instead of ending the worker,
    /// and the worker goes on to the next task.
    #[tokio::test]
    async fn a_connector_that_panics_fails_the_task_and_the_worker_goes_on() {
        let key = DataKey::generate();
        let bus = Arc::new(lethe_bus::InProcessBus::new());
        let retry = RetryPolicy { initial_delay_ms: 1, max_delay_ms: 1, max_retries: 0 };
        let worker = Worker::new("crm", Arc::new(Panics), Arc::new(OneKey::new(&key)), bus.clone(), retry);
        bus.publish_tasks(&[task_for(&key, 1), task_for(&key, 2)]).await.unwrap();
        let mut results = bus.result_consumer().await.unwrap();
        let running = tokio::spawn(worker.run());
        for attempt in [1, 2] {
            let delivery = tokio::time::timeout(std::time::Duration::from_secs(10), results.recv())
                .await
                .expect("a result")
                .expect("the bus is open");
            let result = delivery.message.expect("a well-formed result");
            assert_eq!(result.attempt, attempt);
            let Outcome::Failed { retryable, reason } = result.outcome else { panic!("{result:?}") };
            assert!(!retryable && reason.contains("panicked"), "{reason}");
        }
        assert!(!running.is_finished(), "the worker still runs");
        running.abort();
    }

    /// A vendor's error page as a reason, or a name that runs on, is cut
    /// to the protocol's lengths before the result is sent.
    #[test]
    fn texts_are_cut_to_the_protocols_lengths() {
        let Outcome::Failed { reason, .. } = failed(ConnectorError::retryable("é".repeat(1_000_000))) else {
            panic!("failed")
        };
        assert!(
            reason.len() <= MAX_REASON_BYTES + '…'.len_utf8() && reason.ends_with('…'),
            "{}",
            reason.len()
        );
        let long = Erasure {
            datasets: vec![lethe_core::DatasetReport::new("d".repeat(1_000), 1, 0)],
            retained: vec![],
        };
        let cut = screened_report(long, &[]);
        assert_eq!(cut.datasets[0].dataset.len(), MAX_NAME_BYTES + '…'.len_utf8());
    }

    /// Erases after a pause (`slow`).
    struct Slow(std::time::Duration);

    #[async_trait]
    impl Connector for Slow {
        async fn erase(&self, _task: &ErasureTask) -> Result<Erasure, ConnectorError> {
            tokio::time::sleep(self.0).await;
            Ok(Erasure {
                datasets: vec![lethe_core::DatasetReport::new("customers", 1, 0)],
                retained: vec![],
            })
        }
        async fn verify(&self, _task: &ErasureTask) -> Result<u64, ConnectorError> {
            Ok(0)
        }
        async fn health(&self) -> Result<(), ConnectorError> {
            Ok(())
        }
    }

    /// A connector that never answers costs each task its time-out, not
    /// the worker's slot: with one slot, both tasks report a retryable
    /// failure that says what happened, the second after the first.
    #[tokio::test]
    async fn a_task_that_outlasts_its_time_out_fails_retryably_and_frees_its_slot() {
        use std::time::Duration;
        let key = DataKey::generate();
        let retry = RetryPolicy { initial_delay_ms: 1, max_delay_ms: 1, max_retries: 0 };
        let bus = Arc::new(lethe_bus::InProcessBus::new());
        let worker = Worker::new(
            "crm",
            Arc::new(Slow(Duration::from_secs(3600))),
            Arc::new(OneKey::new(&key)),
            bus.clone(),
            retry,
        )
        .with_concurrency(1)
        .with_task_timeout(Duration::from_millis(200));
        bus.publish_tasks(&[task_for(&key, 1), task_for(&key, 2)]).await.unwrap();
        let mut results = bus.result_consumer().await.unwrap();
        let running = tokio::spawn(worker.run());
        let started = std::time::Instant::now();
        for attempt in [1, 2] {
            let delivery = tokio::time::timeout(Duration::from_secs(10), results.recv())
                .await
                .expect("a result within the time-out")
                .unwrap();
            let result = delivery.message.unwrap();
            assert_eq!(result.attempt, attempt);
            let Outcome::Failed { retryable, reason } = result.outcome else {
                panic!("{:?}", result.outcome)
            };
            assert!(retryable, "a hang may pass: the coordinator sends the task again");
            assert!(reason.contains("did not finish within 0.2 s"), "{reason}");
        }
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "one after the other: {:?}",
            started.elapsed()
        );
        running.abort();
    }

    /// Stopped while a task runs, a worker lets it finish and report what
    /// it removed (run again, it would find nothing), takes no new task,
    /// and gives up on what outlasts the grace period.
    #[tokio::test]
    async fn a_stopped_worker_finishes_its_tasks_in_flight_within_the_grace_period() {
        use std::time::Duration;
        let key = DataKey::generate();
        let retry = RetryPolicy { initial_delay_ms: 1, max_delay_ms: 1, max_retries: 0 };
        let bus = Arc::new(lethe_bus::InProcessBus::new());
        let worker = Worker::new(
            "crm",
            Arc::new(Slow(Duration::from_millis(300))),
            Arc::new(OneKey::new(&key)),
            bus.clone(),
            retry,
        )
        .with_concurrency(1);
        bus.publish_tasks(&[task_for(&key, 1)]).await.unwrap();
        let mut results = bus.result_consumer().await.unwrap();
        let stop = tokio::time::sleep(Duration::from_millis(50));
        let running = tokio::spawn(worker.run_until(stop, Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        bus.publish_tasks(&[task_for(&key, 2)]).await.unwrap();
        let done = tokio::time::timeout(Duration::from_secs(10), running).await.expect("the worker stops");
        done.unwrap().unwrap();
        let result = results.recv().await.unwrap().message.unwrap();
        assert_eq!(result.attempt, 1);
        assert!(matches!(result.outcome, Outcome::Erased { .. }), "{result:?}");
        let none = tokio::time::timeout(Duration::from_millis(400), results.recv()).await;
        assert!(none.is_err(), "the task that came after the stop was not taken");

        // A task that outlasts the grace period is left to come again.
        let bus = Arc::new(lethe_bus::InProcessBus::new());
        let worker = Worker::new(
            "crm",
            Arc::new(Slow(Duration::from_secs(60))),
            Arc::new(OneKey::new(&key)),
            bus.clone(),
            retry,
        );
        bus.publish_tasks(&[task_for(&key, 1)]).await.unwrap();
        let stop = tokio::time::sleep(Duration::from_millis(50));
        let started = std::time::Instant::now();
        worker.run_until(stop, Duration::from_millis(200)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    /// A task of request `ada@example.com`'s, sealed under `key`.
    fn task_for(key: &DataKey, attempt: u32) -> TaskMessage {
        let request = RequestId::new();
        let email = Identifier::parse(lethe_core::IdentifierKind::Email, "ada@example.com").unwrap();
        TaskMessage {
            version: ENVELOPE_VERSION,
            task_id: TaskId::new(),
            request_id: request,
            system: "crm".into(),
            action: lethe_core::Action::Erase,
            categories: vec![],
            attempt,
            regulation: lethe_core::Regulation::Gdpr,
            due_at: Utc::now(),
            identifiers: vec![key.seal(request, &email)],
            issued_at: Utc::now(),
            job: None,
        }
    }

    /// Fails retryably with `first` on its first call, then answers `then`.
    struct FailsFirst {
        calls: std::sync::atomic::AtomicU32,
        first: &'static str,
        then: Result<Erasure, ConnectorError>,
    }

    impl FailsFirst {
        fn new(first: &'static str, then: Result<Erasure, ConnectorError>) -> Self {
            Self { calls: Default::default(), first, then }
        }

        fn calls(&self) -> u32 {
            self.calls.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Connector for FailsFirst {
        async fn erase(&self, _task: &ErasureTask) -> Result<Erasure, ConnectorError> {
            if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return Err(ConnectorError::retryable(self.first));
            }
            self.then.clone()
        }
        async fn verify(&self, _task: &ErasureTask) -> Result<u64, ConnectorError> {
            Ok(0)
        }
        async fn health(&self) -> Result<(), ConnectorError> {
            Ok(())
        }
    }

    /// An attempt withdrawn while its connector backs off is not retried:
    /// the retry asks first, and nothing more is erased.
    #[tokio::test]
    async fn an_attempt_withdrawn_during_its_retries_erases_nothing_more() {
        let key = DataKey::generate();
        let retry = RetryPolicy { initial_delay_ms: 1, max_delay_ms: 1, max_retries: 3 };
        let bus = Arc::new(lethe_bus::InProcessBus::new());
        // Busy at first, then erases whatever it is asked to.
        let erased =
            Erasure { datasets: vec![lethe_core::DatasetReport::new("customers", 1, 0)], retained: vec![] };
        let connector = Arc::new(FailsFirst::new("database is locked", Ok(erased)));
        let keys = Arc::new(OneKey::once(&key));
        let worker = Worker::new("crm", connector.clone(), keys, bus, retry);
        let result = worker.process(task_for(&key, 1)).await;
        let Outcome::Failed { retryable, reason } = result.outcome else { panic!("{result:?}") };
        assert!(!retryable && reason.contains("withdrawn"), "{reason}");
        assert_eq!(connector.calls(), 1, "erase was not called again");
    }

    /// Erases one row per step, checking between steps that the attempt
    /// is still wanted; counts its verify calls.
    #[derive(Default)]
    struct Stepwise {
        verified: std::sync::atomic::AtomicU32,
        erased: std::sync::atomic::AtomicU64,
        verify_fails: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Connector for Stepwise {
        async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
            let mut rows = 0;
            for _ in 0..100 {
                rows += 1;
                if !task.wanted.check().await {
                    break;
                }
            }
            self.erased.store(rows, std::sync::atomic::Ordering::SeqCst);
            Ok(Erasure {
                datasets: vec![lethe_core::DatasetReport::new("events", rows, 0)],
                retained: vec![],
            })
        }
        async fn verify(&self, _task: &ErasureTask) -> Result<u64, ConnectorError> {
            self.verified.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.verify_fails.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(ConnectorError::permanent("the count query was cancelled"));
            }
            Ok(100 - self.erased.load(std::sync::atomic::Ordering::SeqCst))
        }
        async fn health(&self) -> Result<(), ConnectorError> {
            Ok(())
        }
    }

    /// A legal hold placed while a long erase runs: the connector's check
    /// between steps asks the coordinator (its key is refused from then
    /// on), the erase stops, and the result reports what it did and what
    /// is left: never a success, since the same refusal comes when the
    /// coordinator has given up waiting and queued a newer attempt, which
    /// must not be skipped.
    #[tokio::test]
    async fn an_attempt_withdrawn_while_it_runs_stops_and_reports_what_it_did() {
        let key = DataKey::generate();
        let retry = RetryPolicy { initial_delay_ms: 1, max_delay_ms: 1, max_retries: 0 };
        let bus = Arc::new(lethe_bus::InProcessBus::new());
        let connector = Arc::new(Stepwise::default());
        // The first key call opens the task; the first check is refused.
        let keys = Arc::new(OneKey::once(&key));
        let worker = Worker::new("crm", connector.clone(), keys, bus.clone(), retry)
            .with_still_wanted_every(Duration::ZERO);
        let result = worker.process(task_for(&key, 1)).await;
        assert_eq!(result.outcome.class(), lethe_core::OutcomeClass::Failed, "{result:?}");
        assert_eq!(outcome_label(&result.outcome), "failed");
        let Outcome::Erased { datasets, residual } = result.outcome else { panic!("{result:?}") };
        assert_eq!(datasets, vec![lethe_core::DatasetReport::new("events", 1, 0)]);
        assert_eq!(residual, Some(99), "what the stopped attempt left");
        assert_eq!(connector.verified.load(std::sync::atomic::Ordering::SeqCst), 1);

        // Still wanted throughout: every step, then verified. By default
        // a task shorter than the interval never asks.
        let worker = Worker::new("crm", connector.clone(), Arc::new(OneKey::once(&key)), bus.clone(), retry);
        let result = worker.process(task_for(&key, 2)).await;
        let Outcome::Erased { datasets, residual } = result.outcome else { panic!("{result:?}") };
        assert_eq!(datasets, vec![lethe_core::DatasetReport::new("events", 100, 0)]);
        assert_eq!(residual, Some(0));
        assert_eq!(connector.verified.load(std::sync::atomic::Ordering::SeqCst), 2);

        // Withdrawn, and the verification fails: the report still says
        // what the attempt changed, unverified (never applied as such to a
        // withdrawn or superseded attempt, recorded as a late change).
        connector.verify_fails.store(true, std::sync::atomic::Ordering::SeqCst);
        let worker = Worker::new("crm", connector.clone(), Arc::new(OneKey::once(&key)), bus.clone(), retry)
            .with_still_wanted_every(Duration::ZERO);
        let result = worker.process(task_for(&key, 3)).await;
        let Outcome::Erased { datasets, residual } = result.outcome else { panic!("{result:?}") };
        assert_eq!((datasets, residual), (vec![lethe_core::DatasetReport::new("events", 1, 0)], None));
        // Not withdrawn, a failed verification fails the attempt as before.
        let worker = Worker::new("crm", connector.clone(), Arc::new(OneKey::once(&key)), bus, retry);
        let result = worker.process(task_for(&key, 4)).await;
        assert!(matches!(result.outcome, Outcome::Failed { .. }), "{result:?}");
    }

    /// An error that quotes the subject reaches neither the result nor the
    /// worker's log: its text is withheld in both.
    #[tokio::test]
    async fn an_error_naming_the_subject_is_withheld_from_the_result_and_the_log() {
        let log = crate::conformance::LogBuffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(log.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let key = DataKey::generate();
        let retry = RetryPolicy { initial_delay_ms: 1, max_delay_ms: 1, max_retries: 3 };
        let bus = Arc::new(lethe_bus::InProcessBus::new());
        // Fails as stores do: quoting the value back, first retryably.
        let connector = Arc::new(FailsFirst::new(
            "lock timeout on row (email)=(ADA@example.com)",
            Err(ConnectorError::permanent(
                "duplicate key value violates unique constraint: (email)=(ada%40example.com)",
            )),
        ));
        let worker = Worker::new("crm", connector, Arc::new(OneKey::new(&key)), bus, retry);
        let result = worker.process(task_for(&key, 1)).await;
        let Outcome::Failed { retryable, reason } = result.outcome else { panic!("{result:?}") };
        assert!(!retryable);
        assert_eq!(reason, WITHHELD_REASON);
        let text = log.contents();
        assert!(text.contains("retryable connector error") && text.contains("task finished"), "{text}");
        assert!(!text.to_lowercase().contains("ada@example") && !text.contains("ada%40"), "{text}");
    }

    /// A report whose texts quote the subject (a file named after it, a
    /// basis written per record) is sent with those texts withheld.
    #[tokio::test]
    async fn a_report_naming_the_subject_is_sent_with_that_text_withheld() {
        let key = DataKey::generate();
        let retry = RetryPolicy { initial_delay_ms: 1, max_delay_ms: 1, max_retries: 3 };
        let bus = Arc::new(lethe_bus::InProcessBus::new());
        let kept = lethe_core::RetainedReport {
            dataset: "invoices".into(),
            category: Some("billing.invoice".into()),
            count: 1,
            basis: "tax law, invoice of ADA@example.com".into(),
            until: Some(chrono::Utc::now() + chrono::Duration::days(3650)),
            first_until: None,
        };
        let erasure = Erasure {
            datasets: vec![
                lethe_core::DatasetReport::new("export-ada@example.com.json", 1, 0),
                lethe_core::DatasetReport::new("customers", 1, 0),
            ],
            retained: vec![kept],
        };
        let connector = Arc::new(FailsFirst::new("database is locked", Ok(erasure)));
        let worker = Worker::new("crm", connector, Arc::new(OneKey::new(&key)), bus, retry);
        let result = worker.process(task_for(&key, 1)).await;
        let Outcome::RetainedInPart { datasets, retained, .. } = result.outcome else { panic!("{result:?}") };
        assert_eq!(datasets[0].dataset, WITHHELD_TEXT);
        assert_eq!(datasets[1].dataset, "customers");
        assert_eq!(retained[0].basis, WITHHELD_TEXT);
        assert_eq!(
            (retained[0].dataset.as_str(), retained[0].category.as_deref()),
            ("invoices", Some("billing.invoice"))
        );
    }

    #[test]
    fn a_message_read_twice_is_acknowledged_once_both_are_done() {
        let at = |partition, offset| Position { partition, offset };
        let mut order = AckOrder::default();
        order.received(at(0, 5));
        order.received(at(0, 6));
        // A rebalance hands the partition back: 5 and 6 come again.
        order.received(at(0, 5));
        order.received(at(0, 6));
        assert_eq!(order.completed(at(0, 5)), Some(at(0, 5)));
        assert_eq!(order.completed(at(0, 6)), Some(at(0, 6)));
        assert_eq!(order.completed(at(0, 5)), Some(at(0, 5)));
        assert_eq!(order.completed(at(0, 6)), Some(at(0, 6)), "the partition does not block");
    }
}
