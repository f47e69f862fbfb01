//! The conformance kit: the behaviour every connector owes the coordinator,
//! checked the same way for every connector.
//!
//! A bundled connector's tests run the kit against a real system with a
//! [`Fixture`] that seeds two subjects and builds failing connectors:
//!
//! ```ignore
//! Kit::new(connector, vec!["sessions".into()]).with_fixture(MyFixture { .. }).run().await.assert_passed();
//! ```
//!
//! `lethe connector check --system <name>` runs it against a configured live
//! system, without a fixture: with a made-up subject (nothing may be found,
//! nothing may fail) or a test subject the operator created
//! ([`Kit::with_subject`]).
//!
//! The checks:
//! - `health`: the health check passes;
//! - `verify_sees_data`: verify counts each seeded subject's data (> 0);
//! - `erase_reports`: erasing subject A reports what it erased or kept;
//! - `erase_is_idempotent`: erasing A again reports nothing and succeeds;
//! - `verify_is_zero_after_erase`: verify finds nothing left of A;
//! - `other_subjects_untouched`: subject B's count did not change;
//! - `errors_are_classified`: each fault fails as retryable or permanent as
//!   declared, and its health check fails too;
//! - `no_identifier_leaks`: no identifier value appears in any log line
//!   (captured at TRACE level), error message or report.

use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use lethe_core::{Action, Directive, Identifier, IdentifierKind, RequestId, TaskId};
use tracing::instrument::WithSubscriber;

use crate::connector::{wait_for, Connector, ConnectorError, Erasure, ErasureTask};

/// The longest the kit waits for one call (an external job included).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Sets up the system under test for the kit.
#[async_trait]
pub trait Fixture: Send + Sync {
    /// Stores data for two distinct new subjects in the system under test
    /// and returns each one's identifiers (new on every call, so that runs
    /// do not collide).
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String>;

    /// Connectors of the same type set up to fail, each with whether its
    /// failure must be retryable (an unreachable address) or permanent (bad
    /// credentials, a missing object, a wrong configuration).
    async fn faults(&self) -> Vec<Fault>;
}

/// A connector that must fail, and how.
pub struct Fault {
    pub name: String,
    pub connector: Arc<dyn Connector>,
    pub retryable: bool,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed(String),
    Skipped(String),
}

/// One named check and its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
}

/// Every check of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// No check failed (skipped checks do not fail a run).
    pub fn passed(&self) -> bool {
        !self.checks.iter().any(|c| matches!(c.verdict, Verdict::Failed(_)))
    }

    /// Panics with the whole report unless every check passed or was skipped.
    #[track_caller]
    pub fn assert_passed(&self) {
        assert!(self.passed(), "the connector failed the conformance kit:\n{self}");
    }

    /// The verdict of the check named `name`.
    pub fn verdict(&self, name: &str) -> Option<&Verdict> {
        self.checks.iter().find(|c| c.name == name).map(|c| &c.verdict)
    }

    fn record(&mut self, name: &'static str, verdict: Verdict) {
        self.checks.push(Check { name, verdict });
    }

    fn check(&mut self, name: &'static str, ok: bool, why: impl FnOnce() -> String) {
        self.record(name, if ok { Verdict::Passed } else { Verdict::Failed(why()) });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            match &c.verdict {
                Verdict::Passed => writeln!(f, "  pass  {}", c.name)?,
                Verdict::Failed(why) => writeln!(f, "  FAIL  {}: {why}", c.name)?,
                Verdict::Skipped(why) => writeln!(f, "  skip  {}: {why}", c.name)?,
            }
        }
        Ok(())
    }
}

/// Runs the checks against one connector.
pub struct Kit {
    connector: Arc<dyn Connector>,
    categories: Vec<String>,
    fixture: Option<Box<dyn Fixture>>,
    subject: Option<Vec<Identifier>>,
}

impl Kit {
    /// Checks `connector`, directing it to erase every one of `categories`.
    pub fn new(connector: Arc<dyn Connector>, categories: Vec<String>) -> Self {
        Self { connector, categories, fixture: None, subject: None }
    }

    /// Seeds subjects and builds faults with `fixture`: every check runs.
    pub fn with_fixture(mut self, fixture: impl Fixture + 'static) -> Self {
        self.fixture = Some(Box::new(fixture));
        self
    }

    /// Without a fixture: a test subject that exists in the live system and
    /// may be erased. Without either, a made-up subject is used and only
    /// what can be checked without data runs.
    pub fn with_subject(mut self, identifiers: Vec<Identifier>) -> Self {
        self.subject = Some(identifiers);
        self
    }

    /// Runs every check; never panics on a connector's failure.
    pub async fn run(&self) -> Report {
        let logs = LogBuffer::default();
        let mut seen = Seen::default();
        let (mut report, identifiers) = match capture::start(&logs) {
            // Every line of every thread, whatever other tests do meanwhile.
            Some(_active) => self.checks(&mut seen).await,
            // The binary has a global subscriber of its own: capture what
            // this run's own future logs.
            None => {
                let subscriber = subscriber(logs.clone());
                self.checks(&mut seen).with_subscriber(subscriber).await
            }
        };
        seen.text.push(logs.contents());
        report.record("no_identifier_leaks", seen.leaks(&identifiers));
        report
    }

    async fn checks(&self, seen: &mut Seen) -> (Report, Vec<Identifier>) {
        let mut report = Report::default();
        let health = call(self.connector.health()).await;
        seen.error(&health);
        report.check("health", health.is_ok(), || format!("{}", health.unwrap_err()));

        let (a, b) = match (&self.fixture, &self.subject) {
            (Some(fixture), _) => match fixture.seed().await {
                Ok([a, b]) => (a, Some(b)),
                Err(e) => {
                    report.record("verify_sees_data", Verdict::Failed(format!("seeding failed: {e}")));
                    return (report, vec![]);
                }
            },
            (None, Some(subject)) => (subject.clone(), None),
            (None, None) => (probe(), None),
        };
        let known = self.fixture.is_some() || self.subject.is_some();
        let mut identifiers = a.clone();
        identifiers.extend(b.iter().flatten().cloned());

        let task_a = self.task(a);
        let task_b = b.map(|b| self.task(b));
        let before_a = self.verify(&task_a, seen).await;
        let before_b = match &task_b {
            Some(t) => Some(self.verify(t, seen).await),
            None => None,
        };
        if known {
            let ok = matches!(before_a, Ok(n) if n > 0)
                && before_b.as_ref().is_none_or(|b| matches!(b, Ok(n) if *n > 0));
            report.check("verify_sees_data", ok, || {
                format!(
                    "verify before erase: subject A {}, subject B {}",
                    show(&before_a),
                    before_b.as_ref().map_or("-".into(), show)
                )
            });
        } else {
            report.check("verify_sees_data", matches!(before_a, Ok(0)), || {
                format!("a made-up subject must count 0, got {}", show(&before_a))
            });
        }

        let first = self.erase(&task_a, seen).await;
        if known {
            report.check("erase_reports", matches!(&first, Ok(e) if reports(e)), || match &first {
                Ok(e) => format!("erasing a seeded subject reported nothing: {e:?}"),
                Err(e) => format!("erase failed: {e}"),
            });
        } else {
            report.check("erase_reports", matches!(&first, Ok(e) if e.total() == 0), || match &first {
                Ok(e) => format!("erasing a made-up subject reported data: {e:?}"),
                Err(e) => format!("erase failed: {e}"),
            });
        }
        let second = self.erase(&task_a, seen).await;
        report.check("erase_is_idempotent", matches!(&second, Ok(e) if e.total() == 0), || match &second {
            Ok(e) => format!("a second erase reported more erased: {e:?}"),
            Err(e) => format!("a second erase failed: {e}"),
        });
        let after_a = self.verify(&task_a, seen).await;
        report.check("verify_is_zero_after_erase", matches!(after_a, Ok(0)), || {
            format!("verify after erase: {}", show(&after_a))
        });

        match (&task_b, &before_b) {
            (Some(task_b), Some(before_b)) => {
                let after_b = self.verify(task_b, seen).await;
                report.check(
                    "other_subjects_untouched",
                    after_b.as_ref().ok() == before_b.as_ref().ok(),
                    || format!("subject B counted {} before and {} after", show(before_b), show(&after_b)),
                );
            }
            _ => report.record(
                "other_subjects_untouched",
                Verdict::Skipped("needs a fixture that seeds a second subject".into()),
            ),
        }

        match &self.fixture {
            Some(fixture) => {
                let faults = fixture.faults().await;
                report.record(
                    "errors_are_classified",
                    self.faults(&faults, &task_b.unwrap_or(task_a), seen).await,
                );
            }
            None => report.record(
                "errors_are_classified",
                Verdict::Skipped("needs a fixture that builds failing connectors".into()),
            ),
        }
        (report, identifiers)
    }

    async fn faults(&self, faults: &[Fault], task: &ErasureTask, seen: &mut Seen) -> Verdict {
        if faults.is_empty() {
            return Verdict::Failed("the fixture declares no faults".into());
        }
        let mut problems = Vec::new();
        for fault in faults {
            let erased = call(fault.connector.advance(task)).await;
            seen.error(&erased);
            match erased {
                Ok(_) => problems.push(format!("{}: erase succeeded", fault.name)),
                Err(e) if e.retryable != fault.retryable => problems.push(format!(
                    "{}: classified {} but must be {}: {e}",
                    fault.name,
                    kind(e.retryable),
                    kind(fault.retryable)
                )),
                Err(_) => {}
            }
            let health = call(fault.connector.health()).await;
            seen.error(&health);
            if health.is_ok() {
                problems.push(format!("{}: health check passed", fault.name));
            }
        }
        if problems.is_empty() {
            Verdict::Passed
        } else {
            Verdict::Failed(problems.join("; "))
        }
    }

    async fn erase(&self, task: &ErasureTask, seen: &mut Seen) -> Result<Erasure, ConnectorError> {
        let result = call(wait_for(&*self.connector, task, CALL_TIMEOUT, Duration::from_secs(5))).await;
        seen.error(&result);
        if let Ok(e) = &result {
            seen.text.push(format!("{e:?}"));
        }
        result
    }

    async fn verify(&self, task: &ErasureTask, seen: &mut Seen) -> Result<u64, ConnectorError> {
        let result = call(self.connector.verify(task)).await;
        seen.error(&result);
        result
    }

    /// A task that erases every category of the system.
    pub fn task(&self, identifiers: Vec<Identifier>) -> ErasureTask {
        let directives = self
            .categories
            .iter()
            .map(|c| Directive {
                category: c.clone(),
                action: Action::Erase,
                basis: None,
                period: None,
                cutoff: None,
                until: None,
            })
            .collect();
        ErasureTask {
            task_id: TaskId::new(),
            request_id: RequestId::new(),
            system: "conformance".into(),
            action: Action::Erase,
            directives,
            issued_at: Utc::now(),
            attempt: 1,
            identifiers,
            job: None,
            wanted: crate::StillWanted::always(),
        }
    }
}

/// A made-up subject no real system holds: one identifier of each built-in
/// type, unique to this run.
fn probe() -> Vec<Identifier> {
    let tag = uuid_like();
    [
        (IdentifierKind::Email, format!("lethe-check-{tag}@example.invalid")),
        (IdentifierKind::CustomerId, format!("lethe-check-{tag}")),
        (IdentifierKind::DeviceId, format!("lethe-check-{tag}")),
    ]
    .into_iter()
    .filter_map(|(kind, raw)| Identifier::parse(kind, &raw).ok())
    .collect()
}

fn uuid_like() -> String {
    RequestId::new().to_string().replace('-', "")
}

async fn call<T>(
    f: impl std::future::Future<Output = Result<T, ConnectorError>>,
) -> Result<T, ConnectorError> {
    tokio::time::timeout(CALL_TIMEOUT, f).await.unwrap_or_else(|_| {
        Err(ConnectorError::retryable(format!("no answer within {}s", CALL_TIMEOUT.as_secs())))
    })
}

fn reports(e: &Erasure) -> bool {
    e.total() > 0 || !e.retained.is_empty()
}

fn show(r: &Result<u64, ConnectorError>) -> String {
    match r {
        Ok(n) => n.to_string(),
        Err(e) => format!("error ({e})"),
    }
}

fn kind(retryable: bool) -> &'static str {
    if retryable {
        "retryable"
    } else {
        "permanent"
    }
}

/// Everything the connector said during the run: errors and reports.
#[derive(Default)]
struct Seen {
    text: Vec<String>,
}

impl Seen {
    fn error<T>(&mut self, r: &Result<T, ConnectorError>) {
        if let Err(e) = r {
            self.text.push(format!("{e} {e:?}"));
        }
    }

    fn leaks(&self, identifiers: &[Identifier]) -> Verdict {
        let text = self.text.join("\n").to_lowercase();
        let leaked: Vec<String> = identifiers
            .iter()
            .filter(|i| text.contains(&i.expose().to_lowercase()))
            .map(|i| format!("a {} identifier", i.kind()))
            .collect();
        if leaked.is_empty() {
            Verdict::Passed
        } else {
            Verdict::Failed(format!("{} appeared in logs, errors or reports", leaked.join(", ")))
        }
    }
}

fn subscriber<W>(writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(writer)
        .finish()
}

/// Log capture through one global subscriber, installed by the first run
/// if the binary has none. A subscriber scoped to a run's future misses
/// lines: tracing caches per call site whether anyone listens, and other
/// tests' threads (or the connector's own spawned tasks) race with that
/// cache. The global one writes every line to the buffer of every run in
/// progress; a run looks only for its own subjects' identifiers.
mod capture {
    use std::sync::{Mutex, OnceLock, Weak};

    use super::LogBuffer;

    static ACTIVE: Mutex<Vec<Weak<Mutex<Vec<u8>>>>> = Mutex::new(Vec::new());

    /// Captures into `logs` until the guard drops; `None` if another
    /// global subscriber is installed.
    pub(super) fn start(logs: &LogBuffer) -> Option<Active> {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        let installed = *INSTALLED
            .get_or_init(|| tracing::subscriber::set_global_default(super::subscriber(Everyone)).is_ok());
        if !installed {
            return None;
        }
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        active.retain(|w| w.strong_count() > 0);
        active.push(std::sync::Arc::downgrade(&logs.0));
        Some(Active(logs.clone()))
    }

    /// Stops a capture when dropped.
    pub(super) struct Active(LogBuffer);

    impl Drop for Active {
        fn drop(&mut self) {
            let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
            active.retain(|w| w.upgrade().is_some_and(|b| !std::sync::Arc::ptr_eq(&b, &(self.0).0)));
        }
    }

    /// Writes to every capture in progress.
    struct Everyone;

    impl std::io::Write for Everyone {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
            for b in active.iter().filter_map(Weak::upgrade) {
                b.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Everyone {
        type Writer = Everyone;

        fn make_writer(&'a self) -> Self::Writer {
            Everyone
        }
    }
}

/// Log lines captured during a run; also a `MakeWriter` for a test's own
/// subscriber, to check what a piece of code logs.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    /// What was written so far.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
