//! [`HttpConnector`]: a spec with a system's settings, run against the API.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use lethe_connector::{
    wait_for, Connector, ConnectorError, Erasure, ErasureTask, Job, Progress, StillWanted, Treatment,
};
use lethe_core::{DatasetReport, RetainedReport};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;

use crate::client::{Auth, Client, OAuth2};
use crate::config::{HttpConfig, Resolved};
use crate::flow::{self, Run};
use crate::memo::{Memo, Seen};
use crate::ratelimit::RateLimiter;
use crate::spec::{AuthSpec, Evidence, Finished, JobSpec, Spec, Step, BUILTIN_KINDS};
use crate::template::{self, Escape, Template, Vars};

/// How long a passed health check lets erasures go ahead without another.
const PREFLIGHT_TTL: Duration = Duration::from_secs(600);

/// A REST API declared by a spec, with one system's settings.
pub struct HttpConnector {
    spec: Spec,
    category: String,
    key: String,
    /// `settings.*` variables.
    settings: Vars,
    client: Client,
    poll_interval: Duration,
    max_wait: Duration,
    /// When the health check last passed, for erasures; held while one
    /// runs so that concurrent tasks wait for it rather than repeat it.
    preflight: AsyncMutex<Option<Instant>>,
    /// Deletion jobs seen per subject, for APIs without a lookup.
    memo: Memo,
}

impl fmt::Debug for HttpConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConnector")
            .field("spec", &self.spec.name)
            .field("category", &self.category)
            .field("key", &self.key)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A job's state after one check.
enum State {
    Running,
    Done,
    Failed(String),
}

fn invalid(e: impl fmt::Display) -> ConnectorError {
    ConnectorError::permanent(format!("invalid HTTP connector configuration: {e}"))
}

impl HttpConnector {
    /// Loads the spec, applies `config` and prepares the client. Nothing is
    /// sent until the first call.
    pub fn new(config: HttpConfig) -> Result<Self, ConnectorError> {
        Self::from_resolved(config.resolve().map_err(invalid)?)
    }

    /// Builds from a system's settings table.
    pub fn from_table(table: &toml::Table) -> Result<Self, ConnectorError> {
        Self::new(lethe_connector::kind::parse(table).map_err(invalid)?)
    }

    fn from_resolved(r: Resolved) -> Result<Self, ConnectorError> {
        let mut settings = Vars::default();
        for (name, value) in &r.settings {
            settings.set(format!("settings.{name}"), value.as_str());
        }
        let render = |what: &str, source: &str| -> Result<String, ConnectorError> {
            let t = Template::parse(source).map_err(|e| invalid(format!("{what}: {e}")))?;
            t.render(&settings, Escape::None).map_err(|e| invalid(format!("{what}: {e}")))
        };
        let base = render("base_url", &r.base_url)?.trim_end_matches('/').to_owned();
        match reqwest::Url::parse(&base) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.query().is_none() => {}
            _ => return Err(invalid("base_url must be an http:// or https:// URL without a query")),
        }
        let auth = match &r.auth {
            AuthSpec::None => Auth::None,
            AuthSpec::Bearer { token } => {
                Auth::Header(AUTHORIZATION, secret(&format!("Bearer {}", render("auth token", token)?))?)
            }
            AuthSpec::Basic { username, password } => {
                let pair =
                    format!("{}:{}", render("auth username", username)?, render("auth password", password)?);
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                Auth::Header(AUTHORIZATION, secret(&format!("Basic {encoded}"))?)
            }
            AuthSpec::Header { name, value } => {
                let (n, v) =
                    flow::header("auth", &render("auth name", name)?, &render("auth value", value)?)?;
                Auth::Header(n, v)
            }
            AuthSpec::Oauth2 { token_url, client_id, client_secret, scope, client_auth } => {
                Auth::OAuth2(OAuth2 {
                    token_url: render("auth token_url", token_url)?,
                    client_id: render("auth client_id", client_id)?,
                    client_secret: render("auth client_secret", client_secret)?,
                    scope: scope.as_deref().map(|s| render("auth scope", s)).transpose()?,
                    client_auth: *client_auth,
                    cached: AsyncMutex::new(None),
                })
            }
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &r.spec.headers {
            let (n, v) = flow::header("headers", name, &render(&format!("header {name}"), value)?)?;
            headers.insert(n, v);
        }
        let limiter = r.rate_limit.map(|l| RateLimiter::new(l.requests, Duration::from_secs(l.per_seconds)));
        let client = Client {
            http: Client::http(r.timeout)?,
            base,
            auth,
            headers,
            limiter,
            max_retries: r.max_retries,
            max_retry_after: r.max_retry_after,
        };
        Ok(Self {
            // Every API that deletes by job: a retry of the same attempt
            // (its answer lost, a later subject's call failed) must follow
            // the jobs already submitted, not submit them again; the
            // subject is still found until the job has run.
            memo: Memo::new(r.spec.erase.job.is_some()),
            category: r.category,
            key: r.key,
            settings,
            client,
            poll_interval: r.poll_interval,
            max_wait: r.max_wait,
            preflight: AsyncMutex::new(None),
            spec: r.spec,
        })
    }

    /// The spec in use.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The data category of what the system holds.
    pub fn category(&self) -> &str {
        &self.category
    }

    fn report(&self, deleted: u64) -> Erasure {
        Erasure {
            datasets: vec![DatasetReport::new(self.spec.dataset.clone(), deleted, 0)],
            retained: vec![],
        }
    }

    /// The task's values of the key identifier type, each once.
    fn subjects<'a>(&self, task: &'a ErasureTask) -> Vec<&'a str> {
        let mut out: Vec<&str> = Vec::new();
        for id in task.identifiers.iter().filter(|i| i.kind().as_str() == self.key) {
            if !out.contains(&id.expose()) {
                out.push(id.expose());
            }
        }
        out
    }

    /// The variables of one run for `subject`.
    fn vars(&self, task: &ErasureTask, subject: &str) -> Vars {
        let mut v = self.settings.clone();
        v.set("subject", subject);
        for kind in BUILTIN_KINDS.iter().copied().chain([self.key.as_str()]) {
            if kind == self.key {
                v.set(kind, subject);
            } else if let Some(id) = task.identifiers_of(kind).next() {
                v.set(kind, id.expose());
            }
        }
        v.set("task.id", task.task_id.to_string());
        v.set("task.request_id", task.request_id.to_string());
        v.set("task.issued_at", task.issued_at.to_rfc3339());
        if let Some(job) = &task.job {
            v.set("job.accepted_at", job.accepted_at.to_rfc3339());
        }
        v
    }

    /// An identifier type `steps` name that the task does not have.
    fn missing_kind(&self, steps: &[Step], vars: &Vars) -> Option<String> {
        let mut names = BTreeSet::new();
        for step in steps {
            for (_, source) in step.templates() {
                if let Ok(t) = Template::parse(&source) {
                    names.extend(t.vars().filter(|v| BUILTIN_KINDS.contains(v)).map(str::to_owned));
                }
            }
        }
        names.into_iter().find(|n| !vars.contains(n))
    }

    /// Runs `steps` for one subject, stopping between two steps once the
    /// attempt is no longer `wanted`; a flow naming an identifier type the
    /// task lacks finds nothing.
    async fn run(&self, steps: &[Step], vars: Vars, wanted: &StillWanted) -> Result<Run, ConnectorError> {
        if let Some(kind) = self.missing_kind(steps, &vars) {
            tracing::debug!(kind = %kind, "the task has no identifier of a type the spec needs; nothing to do");
            return Ok(Run::NotFound);
        }
        flow::run(&self.client, steps, vars, wanted).await
    }

    /// The health check, at most every few minutes, before erasing: a
    /// configured object that does not exist must fail the erase, not look
    /// like a subject that is not there.
    async fn preflight(&self) -> Result<(), ConnectorError> {
        let mut passed = self.preflight.lock().await;
        if passed.is_some_and(|t| t.elapsed() < PREFLIGHT_TTL) {
            return Ok(());
        }
        self.health().await?;
        *passed = Some(Instant::now());
        Ok(())
    }

    /// What the lookup counts for each subject.
    async fn lookup(&self, task: &ErasureTask, subjects: &[&str]) -> Result<u64, ConnectorError> {
        let mut found = 0;
        for subject in subjects {
            if let Run::Done { count, .. } =
                self.run(&self.spec.verify.steps, self.vars(task, subject), &StillWanted::always()).await?
            {
                found += count.unwrap_or(1);
            }
        }
        Ok(found)
    }

    /// Data under a retention or hold: counted and reported, not touched.
    async fn keep(
        &self,
        task: &ErasureTask,
        basis: String,
        until: Option<DateTime<Utc>>,
    ) -> Result<Erasure, ConnectorError> {
        let subjects = self.subjects(task);
        let count = match self.spec.verify.evidence {
            Evidence::Lookup => self.lookup(task, &subjects).await?,
            Evidence::Job => {
                subjects.iter().filter(|s| self.memo.get(task.request_id, s) != Some(Seen::Finished)).count()
                    as u64
            }
        };
        let mut erasure = self.report(0);
        if count > 0 {
            erasure.retained.push(RetainedReport {
                dataset: self.spec.dataset.clone(),
                category: Some(self.category.clone()),
                count,
                basis,
                until,
                first_until: None,
            });
        }
        Ok(erasure)
    }

    /// Runs the erase flow for each subject. A legal hold or a newer
    /// attempt that withdraws this one stops it between two steps or two
    /// subjects: the report says what went, and the worker's verification
    /// finds what is left.
    async fn erase_now(&self, task: &ErasureTask, subjects: &[&str]) -> Result<Erasure, ConnectorError> {
        self.preflight().await?;
        let mut deleted = 0;
        for subject in subjects {
            if !task.wanted.check().await {
                tracing::info!(
                    deleted,
                    "the attempt was withdrawn (a legal hold, or a newer attempt): stopped"
                );
                break;
            }
            match self.run(&self.spec.erase.steps, self.vars(task, subject), &task.wanted).await? {
                Run::Done { count, .. } => deleted += count.unwrap_or(1),
                Run::NotFound => {}
                Run::Stopped => break,
            }
        }
        tracing::debug!(deleted, "erased");
        Ok(self.report(deleted))
    }

    /// Submits one deletion job per subject found. The job id lists each
    /// subject's job in order, separated by `,` (empty where nothing was
    /// found). An attempt withdrawn before every job is submitted stops
    /// there: the jobs submitted run on (nothing stops a job once started),
    /// the subjects after them are not submitted, and verification counts
    /// them as left.
    async fn submit(
        &self,
        job: &JobSpec,
        task: &ErasureTask,
        subjects: &[&str],
    ) -> Result<Progress, ConnectorError> {
        self.preflight().await?;
        let mut parts: Vec<String> = Vec::with_capacity(subjects.len());
        for subject in subjects {
            if !task.wanted.check().await {
                tracing::info!(
                    submitted = parts.iter().filter(|p| !p.is_empty()).count(),
                    "the attempt was withdrawn (a legal hold, or a newer attempt): no more jobs submitted"
                );
                break;
            }
            match self.memo.get(task.request_id, subject) {
                Some(Seen::Running(id)) => {
                    tracing::debug!("a deletion job already runs for the subject; following it");
                    parts.push(id);
                    continue;
                }
                Some(Seen::Finished) => {
                    tracing::debug!("a deletion job for the subject finished recently; nothing to submit");
                    parts.push(String::new());
                    continue;
                }
                None => {}
            }
            match self.run(&self.spec.erase.steps, self.vars(task, subject), &task.wanted).await? {
                Run::NotFound => parts.push(String::new()),
                Run::Stopped => break,
                Run::Done { vars, .. } => {
                    let t = Template::parse(&job.id).map_err(invalid)?;
                    let id =
                        t.render(&vars, Escape::None).map_err(|e| invalid(format!("erase.job.id: {e}")))?;
                    if id.is_empty() || id.contains(',') {
                        return Err(ConnectorError::permanent(
                            "the deletion job id the API returned is empty or contains ','",
                        ));
                    }
                    self.memo.running(task.request_id, subject, &id);
                    parts.push(id);
                }
            }
        }
        if parts.iter().all(String::is_empty) {
            return Ok(Progress::Done(self.report(0)));
        }
        tracing::debug!(jobs = parts.iter().filter(|p| !p.is_empty()).count(), "deletion jobs submitted");
        Ok(Progress::running(parts.join(","), self.poll_interval))
    }

    /// Checks one job.
    async fn state(&self, job: &JobSpec, mut vars: Vars, id: &str) -> Result<State, ConnectorError> {
        vars.set("job.id", id);
        // A job check is never stopped: what a started job does is the
        // outcome, wanted or not.
        let (last, vars) = match self.run(&job.steps, vars, &StillWanted::always()).await? {
            Run::NotFound => {
                return Ok(match job.state.on_not_found {
                    Finished::Done => State::Done,
                    Finished::Failed => State::Failed("not found".into()),
                })
            }
            // An empty answer (a gateway's) is no job state: reading it as
            // one would take "nothing there" for a finished deletion.
            Run::Done { last: Some(serde_json::Value::Null), .. } => {
                let step = job.steps.last().map_or("", |s| s.name.as_str());
                return Err(crate::flow::no_body(step, 200));
            }
            Run::Done { last: Some(last), vars, .. } => (last, vars),
            Run::Done { last: None, .. } => {
                let step = job.steps.last().map_or("", |s| s.name.as_str());
                return Err(crate::flow::not_json(step, 200));
            }
            // Not with `StillWanted::always()`; read as "not done yet".
            Run::Stopped => return Ok(State::Running),
        };
        let at = |pointer: &str| -> Result<Option<serde_json::Value>, ConnectorError> {
            let p = Template::parse(pointer).map_err(invalid)?;
            let p = p.render(&vars, Escape::Pointer).map_err(|e| invalid(format!("erase.job.state: {e}")))?;
            Ok(template::select(&last, &p))
        };
        let s = &job.state;
        if let Some(pointer) = &s.done_when_empty {
            return Ok(if template::is_empty(at(pointer)?.as_ref()) { State::Done } else { State::Running });
        }
        let value = at(s.pointer.as_deref().unwrap_or_default())?;
        let text = value.as_ref().map(template::text).unwrap_or_default();
        Ok(if s.done.contains(&text) {
            State::Done
        } else if s.failed.contains(&text) {
            State::Failed(text)
        } else {
            if !s.running.contains(&text) {
                tracing::debug!("the job reports a state the spec does not list; still waiting");
            }
            State::Running
        })
    }

    /// Checks every job of `task`; done when all are.
    async fn check(
        &self,
        spec: &JobSpec,
        task: &ErasureTask,
        job: &Job,
        subjects: &[&str],
    ) -> Result<Progress, ConnectorError> {
        let mut running = false;
        let mut finished = Vec::new();
        for (i, id) in job.id.split(',').enumerate() {
            if id.is_empty() {
                continue;
            }
            let subject = subjects.get(i).or(subjects.first()).copied().unwrap_or_default();
            match self.state(spec, self.vars(task, subject), id).await? {
                State::Done => finished.push(subject),
                State::Running => running = true,
                State::Failed(state) => {
                    self.memo.forget(task.request_id, subject);
                    return Err(ConnectorError::permanent(format!(
                        "the deletion job failed (state {state:?})"
                    )));
                }
            }
        }
        if running {
            let waited = Utc::now().signed_duration_since(job.accepted_at).to_std().unwrap_or_default();
            if waited > self.max_wait {
                return Err(ConnectorError::permanent(format!(
                    "the deletion job did not finish within the maximum wait of {}s",
                    self.max_wait.as_secs()
                )));
            }
            return Ok(Progress::running(job.id.clone(), self.poll_interval));
        }
        for subject in &finished {
            self.memo.finished(task.request_id, subject);
        }
        tracing::debug!(jobs = finished.len(), "deletion jobs finished");
        Ok(Progress::Done(self.report(finished.len() as u64)))
    }

    /// What is left when the job status is the only evidence: 0 for a
    /// subject whose job finished, 1 otherwise.
    async fn verify_by_job(&self, task: &ErasureTask, subjects: &[&str]) -> Result<u64, ConnectorError> {
        let (Some(spec), Some(job)) = (&self.spec.erase.job, &task.job) else {
            return Ok(subjects
                .iter()
                .filter(|s| self.memo.get(task.request_id, s) != Some(Seen::Finished))
                .count() as u64);
        };
        let mut left = 0;
        for (i, subject) in subjects.iter().enumerate() {
            let id = job.id.split(',').nth(i).unwrap_or_default();
            if id.is_empty() {
                left += u64::from(self.memo.get(task.request_id, subject) != Some(Seen::Finished));
                continue;
            }
            if !matches!(self.state(spec, self.vars(task, subject), id).await?, State::Done) {
                left += 1;
            }
        }
        Ok(left)
    }
}

fn secret(value: &str) -> Result<HeaderValue, ConnectorError> {
    let mut v =
        HeaderValue::from_str(value).map_err(|_| invalid("the credentials are not a valid header value"))?;
    v.set_sensitive(true);
    Ok(v)
}

#[async_trait]
impl Connector for HttpConnector {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        if self.spec.is_async() {
            wait_for(self, task, self.max_wait, self.poll_interval).await
        } else {
            match self.advance(task).await? {
                Progress::Done(e) => Ok(e),
                Progress::Running(_) => Err(ConnectorError::permanent("a synchronous spec started a job")),
            }
        }
    }

    async fn advance(&self, task: &ErasureTask) -> Result<Progress, ConnectorError> {
        // A job already started is checked whatever the directives say now:
        // a hold placed since cannot stop it, and what it did is the outcome.
        if let (Some(spec), Some(job)) = (&self.spec.erase.job, &task.job) {
            let subjects = self.subjects(task);
            return self.check(spec, task, job, &subjects).await;
        }
        match task.treatment(&self.category) {
            Treatment::Skip => return Ok(Progress::Done(Erasure::default())),
            Treatment::Keep { basis, until } => {
                return self.keep(task, basis, until).await.map(Progress::Done)
            }
            Treatment::Anonymize => tracing::debug!("the API cannot anonymise; deleting instead"),
            Treatment::Erase => {}
        }
        let subjects = self.subjects(task);
        if subjects.is_empty() {
            tracing::debug!(key = %self.key, "the task has no identifier of the spec's key type");
            let mut unsearched = self.report(0);
            unsearched.datasets.iter_mut().for_each(|d| d.not_searched = true);
            return Ok(Progress::Done(unsearched));
        }
        match &self.spec.erase.job {
            Some(spec) => self.submit(spec, task, &subjects).await,
            None => self.erase_now(task, &subjects).await.map(Progress::Done),
        }
    }

    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        if !matches!(task.treatment(&self.category), Treatment::Erase | Treatment::Anonymize) {
            return Ok(0);
        }
        let subjects = self.subjects(task);
        if subjects.is_empty() {
            return Ok(0);
        }
        match self.spec.verify.evidence {
            Evidence::Lookup => self.lookup(task, &subjects).await,
            Evidence::Job => self.verify_by_job(task, &subjects).await,
        }
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        if self.spec.health.is_empty() {
            let probe = Step {
                name: "reach the API".into(),
                method: crate::spec::Method::Get,
                path: "/".into(),
                query: Default::default(),
                headers: Default::default(),
                body: None,
                form: None,
                success: (200..500).filter(|s| !matches!(s, 401 | 403 | 408 | 429)).collect(),
                not_found: vec![],
                found: None,
                extract: Default::default(),
                count: None,
                retry: vec![],
            };
            return flow::run(&self.client, &[probe], self.settings.clone(), &StillWanted::always())
                .await
                .map(drop);
        }
        match flow::run(&self.client, &self.spec.health, self.settings.clone(), &StillWanted::always())
            .await?
        {
            // Never stopped: nothing asks whether a health check is wanted.
            Run::Done { .. } | Run::Stopped => Ok(()),
            Run::NotFound => Err(ConnectorError::permanent(
                "health check: an object the settings name does not exist (check the settings)",
            )),
        }
    }
}
