//! The conformance kit itself: a well-behaved in-memory connector passes,
//! and each kind of misbehaviour fails the check that names it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lethe_connector::conformance::{Fault, Fixture, Kit, Report, Verdict};
use lethe_connector::{Connector, ConnectorError, Erasure, ErasureTask, Progress};
use lethe_core::{DatasetReport, Identifier, IdentifierKind};

/// Ways to misbehave.
#[derive(Clone, Copy, Default)]
struct Flaws {
    logs_identifier: bool,
    logs_on_another_thread: bool,
    reports_every_time: bool,
    erases_everyone: bool,
    asynchronous: bool,
}

/// Emails in a set; in asynchronous mode a job is done at its second check.
#[derive(Clone, Default)]
struct Memory {
    emails: Arc<Mutex<HashSet<String>>>,
    jobs: Arc<Mutex<HashMap<String, u32>>>,
    flaws: Flaws,
    down: Option<bool>,
}

impl Memory {
    fn erase_now(&self, task: &ErasureTask) -> Erasure {
        let mut emails = self.emails.lock().unwrap();
        let mut deleted = 0;
        for id in task.identifiers_of("email") {
            if self.flaws.logs_identifier {
                tracing::info!(email = id.expose(), "erasing");
            }
            if self.flaws.logs_on_another_thread {
                let email = id.expose().to_owned();
                std::thread::spawn(move || tracing::debug!(%email, "erasing in the background"))
                    .join()
                    .unwrap();
            }
            deleted += u64::from(emails.remove(id.expose()));
        }
        if self.flaws.erases_everyone {
            emails.clear();
        }
        if self.flaws.reports_every_time {
            deleted = deleted.max(1);
        }
        let datasets = vec![DatasetReport::new("contacts", deleted, 0)];
        Erasure { datasets, retained: vec![] }
    }

    fn fail(&self) -> Result<(), ConnectorError> {
        match self.down {
            Some(true) => Err(ConnectorError::retryable("connection refused")),
            Some(false) => Err(ConnectorError::permanent("credentials rejected")),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Connector for Memory {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        lethe_connector::wait_for(self, task, Duration::from_secs(5), Duration::from_millis(10)).await
    }

    async fn advance(&self, task: &ErasureTask) -> Result<Progress, ConnectorError> {
        self.fail()?;
        if !self.flaws.asynchronous {
            return Ok(Progress::Done(self.erase_now(task)));
        }
        let Some(job) = &task.job else {
            let id = format!("job-{}", task.task_id);
            self.jobs.lock().unwrap().insert(id.clone(), 0);
            return Ok(Progress::running(id, Duration::from_millis(10)));
        };
        let checks = {
            let mut jobs = self.jobs.lock().unwrap();
            let n = jobs.get_mut(&job.id).ok_or_else(|| ConnectorError::permanent("unknown job"))?;
            *n += 1;
            *n
        };
        if checks < 2 {
            return Ok(Progress::running(job.id.clone(), Duration::from_millis(10)));
        }
        Ok(Progress::Done(self.erase_now(task)))
    }

    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        self.fail()?;
        let emails = self.emails.lock().unwrap();
        Ok(task.identifiers_of("email").filter(|i| emails.contains(i.expose())).count() as u64)
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        self.fail()
    }
}

/// Seeds two subjects; builds an unreachable and a misconfigured copy.
struct Seeds {
    memory: Memory,
    /// Declares the unreachable copy's failure permanent (wrongly).
    misdeclared: bool,
}

#[async_trait]
impl Fixture for Seeds {
    async fn seed(&self) -> Result<[Vec<Identifier>; 2], String> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let [a, b] = [format!("a-{tag}@example.com"), format!("b-{tag}@example.com")];
        let mut emails = self.memory.emails.lock().unwrap();
        emails.insert(a.clone());
        emails.insert(b.clone());
        let id = |e: &str| vec![Identifier::parse(IdentifierKind::Email, e).unwrap()];
        Ok([id(&a), id(&b)])
    }

    async fn faults(&self) -> Vec<Fault> {
        let broken = |down| Arc::new(Memory { down: Some(down), ..self.memory.clone() });
        vec![
            Fault { name: "unreachable".into(), connector: broken(true), retryable: !self.misdeclared },
            Fault { name: "bad credentials".into(), connector: broken(false), retryable: false },
        ]
    }
}

async fn run(flaws: Flaws, misdeclared: bool) -> Report {
    let memory = Memory { flaws, ..Memory::default() };
    Kit::new(Arc::new(memory.clone()), vec!["contact".into()])
        .with_fixture(Seeds { memory, misdeclared })
        .run()
        .await
}

fn failed(report: &Report, check: &str) -> bool {
    matches!(report.verdict(check), Some(Verdict::Failed(_)))
}

#[tokio::test]
async fn a_well_behaved_connector_passes_every_check() {
    let report = run(Flaws::default(), false).await;
    report.assert_passed();
    assert!(report.checks.iter().all(|c| c.verdict == Verdict::Passed), "{report}");
    assert_eq!(report.checks.len(), 8, "{report}");
}

#[tokio::test]
async fn asynchronous_jobs_are_polled_to_their_end() {
    run(Flaws { asynchronous: true, ..Flaws::default() }, false).await.assert_passed();
}

#[tokio::test]
async fn an_identifier_in_a_log_line_fails() {
    let report = run(Flaws { logs_identifier: true, ..Flaws::default() }, false).await;
    assert!(failed(&report, "no_identifier_leaks"), "{report}");
    assert!(!report.passed());
}

#[tokio::test]
async fn an_identifier_logged_by_another_thread_fails() {
    let report = run(Flaws { logs_on_another_thread: true, ..Flaws::default() }, false).await;
    assert!(failed(&report, "no_identifier_leaks"), "{report}");
}

#[tokio::test]
async fn a_second_erase_that_reports_data_fails() {
    let report = run(Flaws { reports_every_time: true, ..Flaws::default() }, false).await;
    assert!(failed(&report, "erase_is_idempotent"), "{report}");
}

#[tokio::test]
async fn erasing_other_subjects_fails() {
    let report = run(Flaws { erases_everyone: true, ..Flaws::default() }, false).await;
    assert!(failed(&report, "other_subjects_untouched"), "{report}");
}

#[tokio::test]
async fn misclassified_errors_fail() {
    let report = run(Flaws::default(), true).await;
    assert!(failed(&report, "errors_are_classified"), "{report}");
}

#[tokio::test]
async fn without_a_fixture_a_made_up_subject_is_checked() {
    let report = Kit::new(Arc::new(Memory::default()), vec!["contact".into()]).run().await;
    report.assert_passed();
    assert!(matches!(report.verdict("errors_are_classified"), Some(Verdict::Skipped(_))), "{report}");
    assert!(matches!(report.verdict("other_subjects_untouched"), Some(Verdict::Skipped(_))), "{report}");
}
