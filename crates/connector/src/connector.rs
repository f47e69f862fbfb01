//! The trait a connector author implements.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lethe_core::{Action, DatasetReport, Directive, Identifier, Job, RequestId, RetainedReport, TaskId};

/// One subject's erasure in one system, with identifiers already decrypted.
#[derive(Debug, Clone)]
pub struct ErasureTask {
    pub task_id: TaskId,
    pub request_id: RequestId,
    pub system: String,
    /// The most protective action among `directives` (informational).
    pub action: Action,
    /// What to do per data category; a dataset whose category has no
    /// directive is left untouched.
    pub directives: Vec<Directive>,
    /// The coordinator's time of this attempt: retention is decided as of
    /// it, never as of the connector's clock.
    pub issued_at: DateTime<Utc>,
    pub attempt: u32,
    /// Normalised identifiers. They print as `[redacted]`; use
    /// [`Identifier::expose`] only to bind them as query parameters.
    pub identifiers: Vec<Identifier>,
    /// The external job this connector started for the task on an earlier
    /// call of [`Connector::advance`], when the coordinator asks how it is
    /// going.
    pub job: Option<Job>,
    /// Whether the coordinator still asks for this attempt: a connector
    /// whose erase takes many steps (a batched table, a long scan) checks
    /// it between steps and stops when it says no (see [`StillWanted`]).
    pub wanted: StillWanted,
}

/// The answer of one check of [`StillWanted`].
pub type WantedAnswer = Pin<Box<dyn Future<Output = Result<bool, ConnectorError>> + Send>>;

/// Whether the coordinator still asks for an attempt. A legal hold placed
/// while an attempt runs withdraws it: from then on every step it takes
/// erases what the law now keeps. So does a newer attempt (the coordinator
/// gave up waiting for this one), which does the rest. A connector whose
/// erase takes many steps calls [`StillWanted::check`] between them and, on
/// `false`, stops and reports what it changed so far. The worker verifies
/// it as usual, so what is left makes the report a failure: never applied
/// to the withdrawn attempt, it is recorded, with what it changed, as a
/// late change.
///
/// Checks are cheap to call: the coordinator is asked at most once per
/// interval, counted from the task's start, so a short task never asks.
/// An answer that cannot be had (the coordinator unreachable) counts as
/// wanted: the worker's own retry check and the coordinator's decision on
/// the result still stand.
#[derive(Clone, Default)]
pub struct StillWanted(Option<Arc<Asking>>);

struct Asking {
    every: Duration,
    ask: Box<dyn Fn() -> WantedAnswer + Send + Sync>,
    /// When the coordinator may next be asked, and whether it said no.
    state: Mutex<(tokio::time::Instant, bool)>,
}

impl std::fmt::Debug for StillWanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("StillWanted(always)"),
            Some(a) => f.debug_struct("StillWanted").field("every", &a.every).finish_non_exhaustive(),
        }
    }
}

impl StillWanted {
    /// Never asks: always wanted (a task run outside a worker, by the
    /// conformance kit or `lethe connector check`).
    pub fn always() -> Self {
        Self(None)
    }

    /// Asks `ask` at most once per `every`, the first time `every` after now.
    pub fn asking(every: Duration, ask: impl Fn() -> WantedAnswer + Send + Sync + 'static) -> Self {
        let next = tokio::time::Instant::now() + every;
        Self(Some(Arc::new(Asking { every, ask: Box::new(ask), state: Mutex::new((next, false)) })))
    }

    /// For tests of how a connector stops: asks at every check, wanted for
    /// the first `checks`, withdrawn from then on (as if a legal hold were
    /// placed after them).
    pub fn withdrawn_after(checks: usize) -> Self {
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        Self::asking(Duration::ZERO, move || {
            let wanted = asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < checks;
            Box::pin(async move { Ok(wanted) })
        })
    }

    /// `false` once the coordinator has said it no longer asks for the
    /// attempt; asks it if the interval has passed since the last time.
    pub async fn check(&self) -> bool {
        let Some(asking) = &self.0 else { return true };
        {
            let mut state = asking.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.1 {
                return false;
            }
            let now = tokio::time::Instant::now();
            if now < state.0 {
                return true;
            }
            state.0 = now + asking.every;
        }
        match (asking.ask)().await {
            Ok(true) => true,
            Ok(false) => {
                asking.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
                false
            }
            Err(e) => {
                tracing::debug!(error = %e.message, "could not ask whether the attempt is still wanted; going on");
                true
            }
        }
    }

    /// Whether a check found the attempt withdrawn.
    pub fn withdrawn(&self) -> bool {
        self.0.as_ref().is_some_and(|a| a.state.lock().unwrap_or_else(|p| p.into_inner()).1)
    }
}

/// What a connector without per-record dates does with one data category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Treatment {
    /// Delete it: the directive is `erase`, or a retention has ended as of
    /// the task's `issued_at`.
    Erase,
    /// The policy asks for anonymisation; a store that cannot anonymise
    /// deletes instead.
    Anonymize,
    /// Keep it and report a [`RetainedReport`] with this basis and end
    /// (`until` is `None` under a legal hold).
    Keep { basis: String, until: Option<DateTime<Utc>> },
    /// No directive for the category: leave it untouched, report nothing.
    Skip,
}

impl ErasureTask {
    /// The directive for `category`, if the task has one.
    pub fn directive(&self, category: &str) -> Option<&Directive> {
        self.directives.iter().find(|d| d.category == category)
    }

    /// What to do with a category whose records carry no date of their own.
    /// A retention counted from the record's date keeps such records until
    /// the directive's `until`, as one counted from the request does.
    pub fn treatment(&self, category: &str) -> Treatment {
        let Some(d) = self.directive(category) else { return Treatment::Skip };
        let basis = || d.basis.clone().unwrap_or_else(|| "legal obligation".into());
        match d.action {
            Action::Erase => Treatment::Erase,
            Action::Anonymize => Treatment::Anonymize,
            Action::Hold => Treatment::Keep { basis: basis(), until: None },
            Action::Retain => match d.until {
                Some(until) if until <= self.issued_at => Treatment::Erase,
                until => Treatment::Keep { basis: basis(), until },
            },
        }
    }

    /// The identifiers of one type.
    pub fn identifiers_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Identifier> + 'a {
        self.identifiers.iter().filter(move |i| i.kind().as_str() == kind)
    }
}

/// What an erase call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erasure {
    /// Per dataset: rows deleted and rows anonymised.
    pub datasets: Vec<DatasetReport>,
    /// Data kept on a legal basis.
    pub retained: Vec<RetainedReport>,
}

impl Erasure {
    pub fn total(&self) -> u64 {
        self.datasets.iter().map(|d| d.deleted + d.anonymized).sum()
    }
}

impl Treatment {
    /// `Erase` or `Anonymize`: what is there now should be gone afterwards
    /// (what verify counts).
    pub fn removes(&self) -> bool {
        matches!(self, Self::Erase | Self::Anonymize)
    }
}

/// Where a task stands after one call of [`Connector::advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Finished: what was erased and what was kept.
    Done(Erasure),
    /// An external job runs; the coordinator asks again after `poll_after`,
    /// with [`ErasureTask::job`] set.
    Running(Pending),
}

/// An external job that has not finished yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The external system's job id. Never derived from an identifier.
    pub job_id: String,
    /// How long to wait before asking again.
    pub poll_after: Duration,
}

impl Progress {
    pub fn running(job_id: impl Into<String>, poll_after: Duration) -> Self {
        Self::Running(Pending { job_id: job_id.into(), poll_after })
    }
}

/// A connector failure. `message` must not contain an identifier; the
/// runtime retries only errors marked retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConnectorError {
    pub retryable: bool,
    pub message: String,
}

impl ConnectorError {
    /// A transient failure (connection refused, timeout, lock, 5xx, 429).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self { retryable: true, message: message.into() }
    }

    /// A failure that will not go away by itself (bad configuration, missing
    /// table, permission denied).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { retryable: false, message: message.into() }
    }
}

/// A data system that can erase a subject.
///
/// Implementations must be idempotent: erasing twice has the effect of
/// erasing once, and a second erase reports nothing found.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// Erases or anonymises the subject's data; reports counts per dataset.
    /// A connector for a system that erases asynchronously implements
    /// [`advance`](Connector::advance) and answers here with
    /// [`wait_for`](crate::wait_for) (submit, then poll until done).
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError>;

    /// Moves the task one step on; what the worker runtime calls. The default
    /// erases synchronously. A connector for an asynchronous deletion API
    /// submits the job when `task.job` is `None` and returns
    /// [`Progress::Running`]; the task is then `accepted` and the
    /// coordinator's scheduler asks again later (durably, across restarts)
    /// with `task.job` set, when the connector checks the job instead of
    /// submitting again: still running, done (the runtime then verifies), or
    /// an error if it failed or ran past its maximum wait.
    async fn advance(&self, task: &ErasureTask) -> Result<Progress, ConnectorError> {
        self.erase(task).await.map(Progress::Done)
    }

    /// Counts what is still there for the subject (0 after a complete erase).
    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError>;

    /// Checks that the system is reachable and configured as declared.
    async fn health(&self) -> Result<(), ConnectorError>;
}

/// Runs `task` to its end in one call: advances, and while an external job
/// runs, sleeps as asked (at most `max_poll`) and checks again, for at most
/// `max_wait`. For [`Connector::erase`] of asynchronous connectors, the
/// conformance kit and `lethe connector check`.
pub async fn wait_for(
    connector: &(impl Connector + ?Sized),
    task: &ErasureTask,
    max_wait: Duration,
    max_poll: Duration,
) -> Result<Erasure, ConnectorError> {
    let started = tokio::time::Instant::now();
    let mut task = task.clone();
    loop {
        match connector.advance(&task).await? {
            Progress::Done(erasure) => return Ok(erasure),
            Progress::Running(pending) => {
                if started.elapsed() >= max_wait {
                    return Err(ConnectorError::retryable(format!(
                        "the external job did not finish within {}s",
                        max_wait.as_secs()
                    )));
                }
                let job = task.job.get_or_insert_with(|| Job { id: String::new(), accepted_at: Utc::now() });
                job.id = pending.job_id;
                tokio::time::sleep(pending.poll_after.min(max_poll)).await;
            }
        }
    }
}
