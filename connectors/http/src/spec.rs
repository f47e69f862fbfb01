//! A spec: one REST API's deletion, lookup and health requests, declared in
//! TOML. Bundled specs for known vendors live in `specs/`; an operator may
//! write their own (`spec_file`).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::duration::Span;
use crate::template::{json_templates, Template};

/// The bundled specs, by name.
pub const BUNDLED: &[(&str, &str)] = &[
    ("mailchimp", include_str!("../specs/mailchimp.toml")),
    ("hubspot", include_str!("../specs/hubspot.toml")),
    ("braze", include_str!("../specs/braze.toml")),
    ("klaviyo", include_str!("../specs/klaviyo.toml")),
    ("segment", include_str!("../specs/segment.toml")),
    ("amplitude", include_str!("../specs/amplitude.toml")),
    ("mixpanel", include_str!("../specs/mixpanel.toml")),
];

/// Identifier types a template may name directly; any other type is reached
/// as `{subject}` with `key` set to it.
pub const BUILTIN_KINDS: &[&str] = &["email", "phone", "customer_id", "device_id"];

fn default_key() -> String {
    "email".to_owned()
}

/// One REST API, as a spec file declares it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Short name, e.g. `mailchimp`.
    pub name: String,
    /// What the spec erases, in a sentence.
    #[serde(default)]
    pub description: String,
    /// The vendor documentation pages the requests follow.
    #[serde(default)]
    pub docs: Vec<String>,
    /// Base URL; may use `{settings.x}` (e.g. a data-centre prefix).
    pub base_url: String,
    /// Default data category of what the API holds (a system may override).
    pub category: String,
    /// Name of the dataset reported (e.g. `list_members`).
    pub dataset: String,
    /// Identifier type whose values drive the flows (`{subject}`); each value
    /// is erased in its own run of the steps. Default `email`.
    #[serde(default = "default_key")]
    pub key: String,
    /// Per-deployment settings the templates use as `{settings.name}`.
    #[serde(default)]
    pub settings: BTreeMap<String, SettingSpec>,
    /// How requests authenticate.
    pub auth: AuthSpec,
    /// Headers sent with every request (templates over settings).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Client-side limit shared by every task of one connector.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Requests proving the credentials and configured objects work; also
    /// run before the first erase (and every few minutes after), so that a
    /// wrong list id is an error rather than "nothing found".
    #[serde(default)]
    pub health: Vec<Step>,
    /// How the subject's data is deleted.
    pub erase: EraseSpec,
    /// How what is left is counted.
    pub verify: VerifySpec,
}

/// A setting a spec expects from the system's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingSpec {
    /// What it is and where to find it.
    #[serde(default)]
    pub description: String,
    /// Used when the system leaves it out; without a default it is required.
    #[serde(default)]
    pub default: Option<String>,
}

/// How requests authenticate; templates over settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthSpec {
    /// No credentials.
    None,
    /// `Authorization: Bearer <token>`.
    Bearer { token: String },
    /// `Authorization: Basic base64(username:password)`.
    Basic { username: String, password: String },
    /// One header, e.g. `Authorization: Klaviyo-API-Key <key>` or `X-Api-Key`.
    Header { name: String, value: String },
    /// OAuth2 client credentials: a token from `token_url`, cached until
    /// shortly before it expires, fetched again once on a 401.
    Oauth2 {
        token_url: String,
        client_id: String,
        client_secret: String,
        #[serde(default)]
        scope: Option<String>,
        /// `basic` (HTTP Basic, the default) or `body` (form fields).
        #[serde(default)]
        client_auth: ClientAuth,
    },
}

/// How an OAuth2 client presents its id and secret.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    Basic,
    Body,
}

/// At most `requests` requests per `per_seconds`, across concurrent tasks;
/// each counts from its start until `per_seconds` after its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    pub per_seconds: u64,
}

/// HTTP methods a step may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_reqwest(self) -> reqwest::Method {
        match self {
            Self::Get => reqwest::Method::GET,
            Self::Post => reqwest::Method::POST,
            Self::Put => reqwest::Method::PUT,
            Self::Patch => reqwest::Method::PATCH,
            Self::Delete => reqwest::Method::DELETE,
        }
    }
}

/// One request of a flow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Named in logs and error messages (never the URL).
    pub name: String,
    pub method: Method,
    /// Path below the base URL; substituted values are percent-encoded.
    pub path: String,
    /// Query parameters (values are templates, form-encoded).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Headers of this step (templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body: strings are templates; `"{x}"` alone inserts x's JSON value.
    #[serde(default)]
    pub body: Option<toml::Value>,
    /// Form body (`application/x-www-form-urlencoded`) instead of JSON.
    #[serde(default)]
    pub form: Option<BTreeMap<String, String>>,
    /// Statuses meaning success; empty means any 2xx.
    #[serde(default)]
    pub success: Vec<u16>,
    /// Statuses meaning the subject is not there: the flow stops, nothing
    /// is deleted (in a health step: a configured object is missing).
    #[serde(default)]
    pub not_found: Vec<u16>,
    /// Pointer that must select something non-empty in a successful
    /// response, else the subject is not there (e.g. `/results`).
    #[serde(default)]
    pub found: Option<String>,
    /// Values for later steps: name → pointer into the response.
    #[serde(default)]
    pub extract: BTreeMap<String, String>,
    /// Pointer to the number of records affected or found (a number, or an
    /// array counted); without it a successful flow counts 1.
    #[serde(default)]
    pub count: Option<String>,
    /// Further statuses to treat as retryable (429, 408 and 5xx always are).
    #[serde(default)]
    pub retry: Vec<u16>,
}

impl Step {
    /// Whether `status` is this step's success.
    pub fn succeeded(&self, status: u16) -> bool {
        if self.success.is_empty() {
            (200..300).contains(&status)
        } else {
            self.success.contains(&status)
        }
    }

    /// Every template of the step with where it is used.
    pub(crate) fn templates(&self) -> Vec<(String, String)> {
        let mut out = vec![("path".to_owned(), self.path.clone())];
        out.extend(self.query.iter().map(|(k, v)| (format!("query {k}"), v.clone())));
        out.extend(self.headers.iter().map(|(k, v)| (format!("header {k}"), v.clone())));
        if let Some(body) = &self.body {
            let mut strings = Vec::new();
            json_templates(body, &mut strings);
            out.extend(strings.into_iter().map(|s| ("body".to_owned(), s)));
        }
        if let Some(form) = &self.form {
            out.extend(form.iter().map(|(k, v)| (format!("form {k}"), v.clone())));
        }
        let pointers = self.found.iter().chain(&self.count).chain(self.extract.values());
        out.extend(pointers.map(|p| ("pointer".to_owned(), p.clone())));
        out
    }
}

/// The deletion: steps, and for an asynchronous API the job to follow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EraseSpec {
    pub steps: Vec<Step>,
    /// Present when the API deletes asynchronously.
    #[serde(default)]
    pub job: Option<JobSpec>,
}

/// An asynchronous deletion job: how its id is formed and how it is checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job id, a template over the erase steps' extracted values (or a
    /// fixed text when the API returns none). Never an identifier.
    pub id: String,
    /// How long to wait between checks.
    pub poll_interval: Span,
    /// Longest time from acceptance to completion before the task fails.
    pub max_wait: Span,
    /// Requests reading the job's state (`{job.id}`, `{job.accepted_at}`).
    pub steps: Vec<Step>,
    /// How the last response maps to running, done or failed.
    pub state: JobState,
}

/// How a job's state is read from the last status response.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobState {
    /// Pointer to the state text.
    #[serde(default)]
    pub pointer: Option<String>,
    /// States meaning finished successfully.
    #[serde(default)]
    pub done: Vec<String>,
    /// States meaning failed.
    #[serde(default)]
    pub failed: Vec<String>,
    /// States meaning still running (any state not listed counts as
    /// running too, until `max_wait`).
    #[serde(default)]
    pub running: Vec<String>,
    /// Instead of `pointer`: the job is done once this pointer selects
    /// nothing (e.g. a lookup that no longer finds the profile).
    #[serde(default)]
    pub done_when_empty: Option<String>,
    /// What a status step's `not_found` status means: `failed` (default) or
    /// `done`.
    #[serde(default)]
    pub on_not_found: Finished,
}

/// A final job state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finished {
    Done,
    #[default]
    Failed,
}

/// What proves that the subject's data is gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Evidence {
    /// The API can look the subject up: `verify.steps` count what is left.
    #[default]
    Lookup,
    /// The deletion job's status is the only evidence: verify counts 0 only
    /// once the job finished.
    Job,
}

/// How verify counts what is left.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    #[serde(default)]
    pub evidence: Evidence,
    /// Why the evidence is what it is, for readers of the spec.
    #[serde(default)]
    pub note: Option<String>,
    /// Lookup steps (`evidence = "lookup"`): `not_found` or an empty
    /// `found` counts 0; otherwise `count`, or 1.
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// The names a template may use in one place.
struct Scope<'a> {
    settings: &'a BTreeSet<String>,
    key: &'a str,
    subject: bool,
    job: bool,
    extracts: BTreeSet<String>,
}

impl Scope<'_> {
    fn allows(&self, var: &str) -> bool {
        if let Some(name) = var.strip_prefix("settings.") {
            return self.settings.contains(name);
        }
        match var {
            "job.id" | "job.accepted_at" => self.job,
            "task.id" | "task.request_id" | "task.issued_at" | "subject" => self.subject,
            v if BUILTIN_KINDS.contains(&v) || v == self.key => self.subject,
            v => self.extracts.contains(v),
        }
    }
}

/// Loads a bundled spec by name.
pub fn bundled(name: &str) -> Result<Spec, String> {
    let (_, text) = BUNDLED.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let names: Vec<&str> = BUNDLED.iter().map(|(n, _)| *n).collect();
        format!("no bundled spec {name:?} (bundled: {})", names.join(", "))
    })?;
    parse(text).map_err(|e| format!("bundled spec {name:?}: {e}"))
}

/// Parses a spec's TOML text.
pub fn parse(text: &str) -> Result<Spec, String> {
    toml::from_str(text).map_err(|e: toml::de::Error| e.message().to_owned())
}

impl Spec {
    /// The built-in identifier types the subject's steps (erase, the job's
    /// checks, verify) name in their templates, besides the key.
    pub fn kinds_named(&self) -> BTreeSet<String> {
        let job = self.erase.job.iter().flat_map(|j| &j.steps);
        let steps = self.erase.steps.iter().chain(job).chain(&self.verify.steps);
        steps
            .flat_map(Step::templates)
            .filter_map(|(_, t)| Template::parse(&t).ok())
            .flat_map(|t| t.vars().map(str::to_owned).collect::<Vec<_>>())
            .filter(|v| BUILTIN_KINDS.contains(&v.as_str()))
            .collect()
    }

    /// Whether the API deletes asynchronously.
    pub fn is_async(&self) -> bool {
        self.erase.job.is_some()
    }

    /// Checks templates, variables, statuses and the evidence; names every
    /// problem found.
    pub fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.name.trim().is_empty() {
            problems.push("name is empty".to_owned());
        }
        if self.category.trim().is_empty() {
            problems.push("category is empty".to_owned());
        }
        if self.dataset.trim().is_empty() {
            problems.push("dataset is empty".to_owned());
        }
        if self.key.parse::<lethe_core::IdentifierKind>().is_err() {
            problems.push(format!("key {:?} is not an identifier type", self.key));
        }
        let settings: BTreeSet<String> = self.settings.keys().cloned().collect();
        let base = Scope {
            settings: &settings,
            key: &self.key,
            subject: false,
            job: false,
            extracts: BTreeSet::new(),
        };
        check_template(&base, "base_url", &self.base_url, &mut problems);
        for (name, t) in auth_templates(&self.auth) {
            check_template(&base, &format!("auth {name}"), &t, &mut problems);
        }
        for (name, t) in &self.headers {
            check_template(&base, &format!("header {name}"), t, &mut problems);
        }
        if let Some(r) = self.rate_limit {
            if r.requests == 0 || r.per_seconds == 0 {
                problems.push("rate_limit needs requests and per_seconds of at least 1".to_owned());
            }
        }
        check_steps(
            "health",
            &self.health,
            Scope { extracts: BTreeSet::new(), ..base_scope(&base) },
            &mut problems,
        );
        let subject = Scope { subject: true, ..base_scope(&base) };
        if self.erase.steps.is_empty() {
            problems.push("erase has no steps".to_owned());
        }
        let extracts = check_steps("erase", &self.erase.steps, subject, &mut problems);
        if let Some(job) = &self.erase.job {
            // The job id is stored with the task and in the audit trail:
            // never built from the subject's identifiers.
            let after = Scope { subject: false, extracts, ..base_scope(&base) };
            check_template(&after, "erase.job.id", &job.id, &mut problems);
            if job.steps.is_empty() {
                problems.push("erase.job has no steps".to_owned());
            }
            let poll = Scope { subject: true, job: true, ..base_scope(&base) };
            check_steps("erase.job", &job.steps, poll, &mut problems);
            let s = &job.state;
            match (&s.pointer, &s.done_when_empty) {
                (Some(_), Some(_)) | (None, None) => problems
                    .push("erase.job.state needs exactly one of pointer and done_when_empty".to_owned()),
                (Some(_), None) if s.done.is_empty() => {
                    problems.push("erase.job.state lists no done state".to_owned())
                }
                _ => {}
            }
            if job.poll_interval.0.is_zero() || job.max_wait.0 < job.poll_interval.0 {
                problems.push("erase.job needs poll_interval > 0 and max_wait >= poll_interval".to_owned());
            }
        }
        match self.verify.evidence {
            Evidence::Lookup if self.verify.steps.is_empty() => {
                problems.push("verify by lookup needs steps".to_owned())
            }
            Evidence::Job if self.erase.job.is_none() => {
                problems.push("verify by job evidence needs erase.job".to_owned())
            }
            Evidence::Job if !self.verify.steps.is_empty() => {
                problems.push("verify by job evidence takes no steps".to_owned())
            }
            _ => {}
        }
        check_steps(
            "verify",
            &self.verify.steps,
            Scope { subject: true, ..base_scope(&base) },
            &mut problems,
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

fn base_scope<'a>(base: &Scope<'a>) -> Scope<'a> {
    Scope { settings: base.settings, key: base.key, subject: false, job: false, extracts: BTreeSet::new() }
}

/// Every template of an auth declaration, by field.
pub fn auth_templates(auth: &AuthSpec) -> Vec<(&'static str, String)> {
    match auth {
        AuthSpec::None => vec![],
        AuthSpec::Bearer { token } => vec![("token", token.clone())],
        AuthSpec::Basic { username, password } => {
            vec![("username", username.clone()), ("password", password.clone())]
        }
        AuthSpec::Header { name, value } => vec![("name", name.clone()), ("value", value.clone())],
        AuthSpec::Oauth2 { token_url, client_id, client_secret, scope, .. } => {
            let mut out = vec![
                ("token_url", token_url.clone()),
                ("client_id", client_id.clone()),
                ("client_secret", client_secret.clone()),
            ];
            out.extend(scope.clone().map(|s| ("scope", s)));
            out
        }
    }
}

fn check_template(scope: &Scope<'_>, place: &str, source: &str, problems: &mut Vec<String>) {
    match Template::parse(source) {
        Ok(t) => {
            for var in t.vars() {
                if !scope.allows(var) {
                    problems.push(format!("{place}: {{{var}}} is not available here"));
                }
            }
        }
        Err(e) => problems.push(format!("{place}: {e}")),
    }
}

/// Checks a flow's steps in order; returns the names they extract.
fn check_steps(
    flow: &str,
    steps: &[Step],
    mut scope: Scope<'_>,
    problems: &mut Vec<String>,
) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for step in steps {
        let place = format!("{flow} step {:?}", step.name);
        if !names.insert(step.name.as_str()) {
            problems.push(format!("{place}: the name is used twice"));
        }
        if step.body.is_some() && step.form.is_some() {
            problems.push(format!("{place}: body and form exclude each other"));
        }
        if !step.path.starts_with('/') {
            problems.push(format!("{place}: path must start with '/'"));
        }
        let statuses = step.success.iter().chain(&step.not_found).chain(&step.retry);
        if let Some(s) = statuses.clone().find(|s| !(100..600).contains(*s)) {
            problems.push(format!("{place}: {s} is not an HTTP status"));
        }
        if let Some(s) = step.success.iter().find(|s| step.not_found.contains(s)) {
            problems.push(format!("{place}: {s} is both success and not_found"));
        }
        for (what, t) in step.templates() {
            check_template(&scope, &format!("{place} {what}"), &t, problems);
        }
        for name in step.extract.keys() {
            let reserved = name == "subject" || BUILTIN_KINDS.contains(&name.as_str()) || name.contains('.');
            if reserved || Template::parse(&format!("{{{name}}}")).is_err() {
                problems.push(format!("{place}: cannot extract into {name:?}"));
            }
            scope.extracts.insert(name.clone());
        }
    }
    scope.extracts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_spec_loads_and_checks() {
        for (name, _) in BUNDLED {
            let spec = bundled(name).unwrap();
            assert_eq!(&spec.name, name);
            spec.check().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!spec.docs.is_empty(), "{name} names no documentation page");
            assert!(!spec.health.is_empty(), "{name} has no health check");
        }
        assert!(bundled("nope").unwrap_err().contains("mailchimp"));
    }

    #[test]
    fn the_readme_example_is_a_valid_spec() {
        let readme = include_str!("../README.md");
        let section = &readme[readme.find("## Spec format").unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let example = &section[start..start + section[start..].find("```").unwrap()];
        let spec = parse(example).unwrap();
        spec.check().unwrap();
        assert_eq!(spec.erase.steps.len(), 2);
    }

    fn spec(extra: &str) -> Result<Spec, String> {
        parse(&format!(
            r#"
            name = "t"
            base_url = "https://{{settings.host}}"
            category = "marketing.profile"
            dataset = "contacts"
            auth = {{ type = "bearer", token = "{{settings.token}}" }}
            settings = {{ host = {{}}, token = {{}} }}
            {extra}
            "#
        ))
    }

    /// A task for the system must carry the key and every built-in type
    /// the subject's steps name, in erase and in verify; nothing else.
    #[test]
    fn the_kinds_named_are_those_the_subjects_steps_use() {
        let s = spec(
            r#"
            key = "customer_id"
            [[erase.steps]]
            name = "delete"
            method = "POST"
            path = "/gdpr/{subject}"
            body = { email = "{email}", host = "{settings.host}" }
            [verify]
            evidence = "lookup"
            [[verify.steps]]
            name = "look"
            method = "GET"
            path = "/people"
            query = { phone = "{phone}" }
            "#,
        )
        .unwrap();
        assert_eq!(s.check(), Ok(()));
        assert_eq!(s.kinds_named(), BTreeSet::from(["email".to_owned(), "phone".to_owned()]));
    }

    #[test]
    fn variables_are_checked_where_they_are_used() {
        let s = spec(
            r#"
            [[erase.steps]]
            name = "find"
            method = "GET"
            path = "/c/{subject|lower}/{contact_id}/{settings.nope}/{job.id}"
            extract = { email = "/x" }
            [[erase.steps]]
            name = "find"
            method = "DELETE"
            path = "c"
            success = [204]
            not_found = [204]
            [verify]
            evidence = "job"
            "#,
        )
        .unwrap();
        let e = s.check().unwrap_err();
        for part in [
            "{contact_id} is not available",
            "{settings.nope} is not available",
            "{job.id} is not available",
            "cannot extract into \"email\"",
            "the name is used twice",
            "path must start with '/'",
            "204 is both success and not_found",
            "verify by job evidence needs erase.job",
        ] {
            assert!(e.contains(part), "{part:?} missing from {e}");
        }
    }

    #[test]
    fn a_job_id_is_never_built_from_an_identifier() {
        let s = spec(
            r#"
            [[erase.steps]]
            name = "submit"
            method = "POST"
            path = "/jobs"
            success = [202]
            [erase.job]
            id = "{email|md5}"
            poll_interval = "1m"
            max_wait = "1h"
            [erase.job.state]
            pointer = "/status"
            running = ["running"]
            done = ["done"]
            [[erase.job.steps]]
            name = "status"
            method = "GET"
            path = "/jobs/{job.id}"
            [verify]
            evidence = "job"
            "#,
        )
        .unwrap();
        let e = s.check().unwrap_err();
        assert!(e.contains("erase.job.id: {email} is not available"), "{e}");
    }

    #[test]
    fn unknown_fields_and_auth_types_are_rejected() {
        assert!(spec("colour = 1\n[erase]\nsteps = []\n[verify]\n").unwrap_err().contains("colour"));
        let bad = parse(
            r#"
            name = "t"
            base_url = "https://x"
            category = "c"
            dataset = "d"
            auth = { type = "magic" }
            [erase]
            steps = []
            [verify]
            "#,
        );
        assert!(bad.is_err());
    }
}
