//! Lethe's configuration.
//!
//! Layers, in order, each overriding the one before:
//! 1. defaults (in this file),
//! 2. the TOML file (`--config`, else the embedded `config/lethe.toml`),
//! 3. environment variables `LETHE__SECTION__KEY` (e.g. `LETHE__SERVER__LISTEN`),
//! 4. command-line flags,
//! 5. [`Config::validate`].
//!
//! Secrets are written as `${ENV_VAR}` placeholders and resolved only where
//! they are used ([`resolve_placeholders`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use lethe_connector::RetryPolicy;
use serde::Deserialize;

/// The embedded default: SQLite state, in-process bus, demo systems.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../config/lethe.toml");

/// Prefix of environment overrides.
const ENV_PREFIX: &str = "LETHE__";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub bus: BusConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub dispatcher: DispatcherConfig,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// Retries of connector calls inside a worker.
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default)]
    pub worker: WorkerConfig,
    /// The data systems to erase from.
    #[serde(default)]
    pub systems: Vec<SystemConfig>,
    /// The retention policy: which files hold its rules.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Deadlines per regulation, replacing the statutory ones, e.g.
    /// `[deadlines.gdpr] response = "1m", extension = "2m"`.
    #[serde(default)]
    pub deadlines: std::collections::BTreeMap<lethe_core::Regulation, lethe_core::DeadlineRule>,
    /// Webhook endpoints of self-service portals: `[[webhooks]]` entries.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// The directory relative paths are resolved from: the config file's,
    /// or the working directory for the embedded default.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Policy files, or directories whose `*.toml` files are read in name
    /// order, relative to the config file. Empty: the bundled
    /// `config/policies/default.toml`.
    #[serde(default)]
    pub files: Vec<PathBuf>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the HTTP API.
    #[serde(default = "ServerConfig::default_listen")]
    pub listen: SocketAddr,
    /// An administrator's API token provisioned from a secret, written as
    /// `${ENV_VAR}`: stored (as a digest, with every non-connector scope) on
    /// start. Without it, the first start on an empty store creates one and
    /// prints it once.
    #[serde(default)]
    pub admin_token: Option<String>,
}

impl ServerConfig {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8700))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { listen: Self::default_listen(), admin_token: None }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://path/to/file.db` or `postgres://user@host/db` (may be `${ENV}`).
    #[serde(default = "StoreConfig::default_url")]
    pub url: String,
}

impl StoreConfig {
    fn default_url() -> String {
        "sqlite://lethe-data/lethe.db".into()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { url: Self::default_url() }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum BusConfig {
    /// Channels inside the coordinator process; connectors run in-process.
    #[default]
    InProcess,
    /// Kafka (or any Kafka-compatible broker); connectors run as
    /// `lethe connector run` processes.
    Kafka(lethe_bus::KafkaConfig),
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// The master key as 64 hex characters, normally `${LETHE_MASTER_KEY}`.
    /// Takes precedence over `master_key_file`.
    #[serde(default)]
    pub master_key: Option<String>,
    /// A file holding the master key in hex. With a SQLite state store it is
    /// created (mode 0600) if missing.
    #[serde(default = "KeysConfig::default_file")]
    pub master_key_file: PathBuf,
}

impl KeysConfig {
    fn default_file() -> PathBuf {
        PathBuf::from("lethe-data/master.key")
    }
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self { master_key: None, master_key_file: Self::default_file() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatcherConfig {
    /// Outbox rows published per batch.
    #[serde(default = "DispatcherConfig::default_batch")]
    pub batch: u32,
    /// Seconds a claim on outbox rows lasts.
    #[serde(default = "DispatcherConfig::default_lease_secs")]
    pub lease_secs: u64,
    /// Milliseconds between looks at an idle outbox.
    #[serde(default = "DispatcherConfig::default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Tasks of one system dispatched and not yet answered, at most (0: no
    /// bound). Keeps the queue in a system's topic short, so that a task's
    /// time-out measures its connector rather than the backlog ahead of it.
    #[serde(default = "DispatcherConfig::default_max_in_flight")]
    pub max_in_flight: u32,
}

impl DispatcherConfig {
    const fn default_batch() -> u32 {
        256
    }
    const fn default_lease_secs() -> u64 {
        30
    }
    const fn default_poll_ms() -> u64 {
        500
    }
    const fn default_max_in_flight() -> u32 {
        1000
    }
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            batch: Self::default_batch(),
            lease_secs: Self::default_lease_secs(),
            poll_interval_ms: Self::default_poll_ms(),
            max_in_flight: Self::default_max_in_flight(),
        }
    }
}

/// Connector workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Tasks a worker runs at once (offsets are still stored in order).
    #[serde(default = "WorkerConfig::default_concurrency")]
    pub concurrency: usize,
    /// Seconds a worker stopped by SIGTERM or Ctrl-C lets its tasks in
    /// flight finish and report before it exits; what still runs then is
    /// delivered again later.
    #[serde(default = "WorkerConfig::default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// Seconds a worker gives one task (its key, the connector's calls and
    /// their retries) from picking it up, before it abandons the calls and
    /// reports a retryable failure, so that a call that never returns does
    /// not hold a slot for ever. Unset: three times `[scheduler]
    /// task_timeout_secs`, a backstop that lets a slow task finish (its
    /// success counts even after the coordinator has sent it again).
    #[serde(default)]
    pub task_timeout_secs: Option<u64>,
}

impl WorkerConfig {
    const fn default_concurrency() -> usize {
        8
    }
    const fn default_shutdown_grace() -> u64 {
        30
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: Self::default_concurrency(),
            shutdown_grace_secs: Self::default_shutdown_grace(),
            task_timeout_secs: None,
        }
    }
}

/// Time-outs and redispatch of tasks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Seconds a dispatched task may go without a result before it is sent again.
    #[serde(default = "SchedulerConfig::default_timeout")]
    pub task_timeout_secs: u64,
    /// Attempts per task before it fails for good; an operator retry grants as many again.
    #[serde(default = "SchedulerConfig::default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the second attempt, in seconds; doubled for each further one.
    #[serde(default = "SchedulerConfig::default_initial")]
    pub retry_initial_delay_secs: u64,
    /// Upper bound of the delay between attempts, in seconds.
    #[serde(default = "SchedulerConfig::default_max")]
    pub retry_max_delay_secs: u64,
    /// Seconds between sweeps for timed-out tasks.
    #[serde(default = "SchedulerConfig::default_interval")]
    pub interval_secs: u64,
    /// Days the webhook delivery log keeps an attempt (`GET
    /// /v1/webhooks/deliveries`); 0 keeps them for ever.
    #[serde(default = "SchedulerConfig::default_webhook_log_days")]
    pub webhook_log_days: u64,
}

impl SchedulerConfig {
    const fn default_timeout() -> u64 {
        300
    }
    const fn default_max_attempts() -> u32 {
        5
    }
    const fn default_initial() -> u64 {
        5
    }
    const fn default_max() -> u64 {
        3600
    }
    const fn default_interval() -> u64 {
        5
    }
    const fn default_webhook_log_days() -> u64 {
        90
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            task_timeout_secs: Self::default_timeout(),
            max_attempts: Self::default_max_attempts(),
            retry_initial_delay_secs: Self::default_initial(),
            retry_max_delay_secs: Self::default_max(),
            interval_secs: Self::default_interval(),
            webhook_log_days: Self::default_webhook_log_days(),
        }
    }
}

/// A registered data system.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    /// Unique name: lower-case letters, digits, `-` and `_`.
    pub name: String,
    /// Connector type (`sql`, `files`, `redis`, `kafka-compacted`, `http`),
    /// or `external` for a system served by a worker of its own (another
    /// language).
    pub connector: String,
    /// Team or person responsible for the system.
    #[serde(default)]
    pub owner: Option<String>,
    /// What the system is.
    #[serde(default)]
    pub description: Option<String>,
    /// Data categories the system holds, e.g. `identity.contact`. Read from
    /// the connector's datasets when left out; when given, it must list
    /// exactly the categories the datasets declare.
    #[serde(default)]
    pub categories: Vec<String>,
    /// For an `external` system: the identifier types its worker finds a
    /// subject by (built-in connectors read them from their datasets).
    /// Without them, intake cannot refuse a subject no system could find.
    #[serde(default)]
    pub identifier_types: Vec<String>,
    /// Bearer token of this system's connector workers (`lethe connector
    /// run`), written as `${ENV_VAR}`; required with the Kafka bus.
    #[serde(default)]
    pub token: Option<String>,
    /// The connector's own settings (see the connector's documentation).
    #[serde(default)]
    pub config: toml::Table,
}

impl SystemConfig {
    /// The system as the coordinator knows it, with the categories its
    /// connector's datasets declare.
    pub fn info(&self) -> anyhow::Result<lethe_coordinator::SystemInfo> {
        let declared = crate::registry::categories(self)?;
        if !self.categories.is_empty() {
            let listed: std::collections::BTreeSet<&String> = self.categories.iter().collect();
            let found: std::collections::BTreeSet<&String> = declared.iter().collect();
            if listed != found {
                bail!(
                    "system {:?} lists categories [{}] but its datasets declare [{}]",
                    self.name,
                    self.categories.join(", "),
                    declared.join(", ")
                );
            }
        }
        for t in &self.identifier_types {
            if t.parse::<lethe_core::IdentifierKind>().is_err() {
                bail!(
                    "system {:?}: identifier type {t:?} is not email, phone, customer_id, device_id \
                     or a lower-case word",
                    self.name
                );
            }
        }
        Ok(lethe_coordinator::SystemInfo {
            name: self.name.clone(),
            connector: self.connector.clone(),
            owner: self.owner.clone(),
            categories: declared,
            identifier_types: crate::registry::identifier_types(self)?,
            task_identifier_types: crate::registry::task_identifier_types(self)?,
            description: self.description.clone(),
        })
    }
}

/// A webhook endpoint: it receives request events, signed with its secret
/// (`Lethe-Signature` header), retried with backoff.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique name: lower-case letters, digits, `-` and `_`. Names the
    /// endpoint in the delivery log and keys its position in the event
    /// stream (renaming it starts a new stream from the present).
    pub name: String,
    /// Where events are POSTed: an `https://` (or `http://`) URL; may be `${ENV_VAR}`.
    pub url: String,
    /// The signing secret, written as `${ENV_VAR}`; at least 16 characters.
    pub secret: String,
    /// The events it receives (`request.received`, `request.extended`,
    /// `request.completed`, `request.completed_with_exemptions`,
    /// `request.failed`); all of them when left out.
    #[serde(default)]
    pub events: Option<Vec<lethe_coordinator::webhooks::EventType>>,
    /// Add the request's identifiers to the payload. Only possible while
    /// the request's data key exists (never in `request.completed` or
    /// `request.completed_with_exemptions`); off by default.
    #[serde(default)]
    pub include_identifiers: bool,
    /// Attempts per event before it is given up (logged as such, and
    /// counted in `lethe_webhook_events_given_up_total`).
    #[serde(default = "WebhookConfig::default_max_attempts")]
    pub max_attempts: u32,
    /// Seconds one attempt may take.
    #[serde(default = "WebhookConfig::default_timeout_secs")]
    pub timeout_secs: u64,
    /// Delay before the second attempt, in milliseconds; doubled, with
    /// jitter, for each further one.
    #[serde(default = "WebhookConfig::default_initial_delay_ms")]
    pub retry_initial_delay_ms: u64,
    /// Upper bound of the delay between attempts, in milliseconds.
    #[serde(default = "WebhookConfig::default_max_delay_ms")]
    pub retry_max_delay_ms: u64,
    /// Only requests submitted with an API token of one of these names
    /// (`lethe token create --name …`): a portal's endpoint hears of the
    /// portal's requests only. Every request's events when left out.
    #[serde(default)]
    pub submitted_by: Option<Vec<String>>,
}

impl WebhookConfig {
    const fn default_max_attempts() -> u32 {
        8
    }
    const fn default_timeout_secs() -> u64 {
        10
    }
    const fn default_initial_delay_ms() -> u64 {
        1_000
    }
    const fn default_max_delay_ms() -> u64 {
        300_000
    }

    /// Checks what can be checked before placeholders are resolved.
    fn validate(&self) -> anyhow::Result<()> {
        if !self.url.contains("${") {
            check_webhook_url(&self.url, self.include_identifiers)?;
        }
        if self.secret.trim().is_empty() {
            bail!("`secret` is required (write it as ${{ENV_VAR}})");
        }
        if !self.secret.contains("${") && self.secret.chars().count() < MIN_SECRET_CHARS {
            bail!("the secret must be at least {MIN_SECRET_CHARS} characters");
        }
        if self.events.as_ref().is_some_and(Vec::is_empty) {
            bail!("`events` lists no event; leave it out to receive all of them");
        }
        if self.submitted_by.as_ref().is_some_and(|n| n.is_empty() || n.iter().any(|n| n.trim().is_empty())) {
            bail!("`submitted_by` must name tokens; leave it out to receive every request's events");
        }
        if self.max_attempts == 0 {
            bail!("max_attempts must be at least 1");
        }
        if self.timeout_secs == 0 {
            bail!("timeout_secs must be at least 1");
        }
        if self.retry_initial_delay_ms == 0 || self.retry_max_delay_ms < self.retry_initial_delay_ms {
            bail!("retry delays must satisfy 1 <= retry_initial_delay_ms <= retry_max_delay_ms");
        }
        Ok(())
    }

    /// The endpoint as the coordinator runs it, with its URL and secret
    /// resolved from the environment.
    pub fn endpoint(&self) -> anyhow::Result<lethe_coordinator::webhooks::WebhookEndpoint> {
        use lethe_coordinator::webhooks::{EventType, Secret, WebhookEndpoint};
        let url = resolve_placeholders(&self.url).context("url")?;
        check_webhook_url(&url, self.include_identifiers)?;
        let secret = resolve_placeholders(&self.secret).context("secret")?;
        if secret.chars().count() < MIN_SECRET_CHARS {
            bail!("the secret must be at least {MIN_SECRET_CHARS} characters");
        }
        let events = match &self.events {
            Some(events) => events.iter().copied().collect(),
            None => EventType::ALL.into_iter().collect(),
        };
        Ok(WebhookEndpoint {
            events,
            include_identifiers: self.include_identifiers,
            max_attempts: self.max_attempts,
            timeout: Duration::from_secs(self.timeout_secs),
            initial_delay: Duration::from_millis(self.retry_initial_delay_ms),
            max_delay: Duration::from_millis(self.retry_max_delay_ms),
            submitted_by: self.submitted_by.as_ref().map(|n| n.iter().cloned().collect()),
            ..WebhookEndpoint::new(self.name.clone(), url, Secret::new(secret))
        })
    }
}

/// Shortest webhook signing secret.
const MIN_SECRET_CHARS: usize = 16;

/// The administrator's token opens everything: at least as long as a
/// connector's.
pub fn check_admin_token(token: &str) -> anyhow::Result<()> {
    if token.len() < 32 {
        bail!("server.admin_token must be at least 32 characters");
    }
    Ok(())
}

/// A connector token opens the data key of every open task of its system:
/// as hard to guess as an administrator's, and one per system.
fn check_connector_tokens(tokens: Vec<(String, String)>) -> anyhow::Result<Vec<(String, String)>> {
    let mut seen = std::collections::HashMap::new();
    for (system, token) in &tokens {
        if token.len() < 32 {
            bail!("system {system:?}: its connector token must be at least 32 characters");
        }
        if let Some(other) = seen.insert(token.as_str(), system.as_str()) {
            bail!("systems {other:?} and {system:?} share a connector token; give each system its own");
        }
    }
    Ok(tokens)
}

/// The URL and secret may carry credentials: neither is printed.
/// What `Debug` shows in place of a secret (tokens, keys, a URL that may
/// carry a password, a connector's settings).
const REDACTED: &str = "[redacted]";

/// `Some("[redacted]")` or `None`: whether a secret is set, not what it is.
fn redacted(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| REDACTED)
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("admin_token", &redacted(&self.admin_token))
            .finish()
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig").field("url", &REDACTED).finish()
    }
}

impl std::fmt::Debug for KeysConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeysConfig")
            .field("master_key", &redacted(&self.master_key))
            .field("master_key_file", &self.master_key_file)
            .finish()
    }
}

impl std::fmt::Debug for SystemConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemConfig")
            .field("name", &self.name)
            .field("connector", &self.connector)
            .field("owner", &self.owner)
            .field("description", &self.description)
            .field("categories", &self.categories)
            .field("identifier_types", &self.identifier_types)
            .field("token", &redacted(&self.token))
            .field("config", &self.config.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overrides")
            .field("listen", &self.listen)
            .field("store_url", &redacted(&self.store_url))
            .finish()
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &"[redacted]")
            .field("secret", &"[redacted]")
            .field("events", &self.events)
            .field("include_identifiers", &self.include_identifiers)
            .field("max_attempts", &self.max_attempts)
            .field("timeout_secs", &self.timeout_secs)
            .field("retry_initial_delay_ms", &self.retry_initial_delay_ms)
            .field("retry_max_delay_ms", &self.retry_max_delay_ms)
            .field("submitted_by", &self.submitted_by)
            .finish()
    }
}

/// An absolute `https://` or `http://` URL with a host; `https://` to send
/// identifiers, unless the endpoint is on this machine (a loopback
/// address). The error does not quote the URL, which may hold a credential.
fn check_webhook_url(url: &str, identifiers: bool) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).map_err(|_| anyhow::anyhow!("`url` is not a valid URL"))?;
    if !matches!(parsed.scheme(), "https" | "http") || parsed.host_str().is_none_or(str::is_empty) {
        bail!("`url` must be an https:// (or http://) URL with a host");
    }
    let host = parsed.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if identifiers && parsed.scheme() == "http" && !loopback {
        bail!("`include_identifiers = true` needs an https:// `url`: identifiers are not sent in the clear");
    }
    Ok(())
}

/// Command-line overrides (layer 4).
#[derive(Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub store_url: Option<String>,
}

/// A system name as configuration accepts it: 1-64 lower-case letters,
/// digits, '-' or '_'. Also the parser of system names given on the
/// command line, so that none is put into a URL unchecked.
pub fn system_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!("system name {name:?} must be 1-64 lower-case letters, digits, '-' or '_'"))
    }
}

impl Config {
    /// Loads `path` (or the embedded default), applies the environment and
    /// `overrides`, and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, overrides, &env)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        overrides: &Overrides,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let base_dir = match path.and_then(Path::parent) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config file {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (EMBEDDED_DEFAULT.to_owned(), "embedded default config".into()),
        };
        let mut table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{origin} is not valid TOML"))?;
        apply_env(&mut table, env)?;
        let overridden = env.iter().any(|(name, _)| name.starts_with(ENV_PREFIX));
        let with = if overridden { " (with LETHE__ overrides)" } else { "" };
        let mut config: Config = match toml::Value::Table(table).try_into() {
            Ok(config) => config,
            // Without overrides, read from the text again for the error: it
            // then names the line and column. With them, the table's own
            // error: the file's line may not be where the problem is.
            Err(e) => {
                let located = if overridden { e } else { toml::from_str::<Config>(&text).err().unwrap_or(e) };
                return Err(anyhow::Error::new(located)
                    .context(format!("{origin}{with} is not a valid Lethe config")));
            }
        };
        config.base_dir = base_dir;
        if let Some(listen) = overrides.listen {
            config.server.listen = listen;
        }
        if let Some(url) = &overrides.store_url {
            config.store.url = url.clone();
        }
        config.validate().with_context(|| format!("{origin}{with} is not a valid Lethe config"))?;
        Ok(config)
    }

    /// Checks what serde cannot: unique, well-formed system names and
    /// known connector types with valid settings, and values in range.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.check_ranges()?;
        for (regulation, rule) in &self.deadlines {
            if rule.response.is_zero() {
                bail!("[deadlines.{regulation}] response is zero: every request would be due, and overdue, on arrival");
            }
            if rule.extension.is_some_and(lethe_core::Period::is_zero) {
                bail!("[deadlines.{regulation}] extension is zero: leave it out to allow no extension");
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.systems {
            system_name(&s.name).map_err(anyhow::Error::msg)?;
            if !seen.insert(&s.name) {
                bail!("system {:?} is declared twice", s.name);
            }
            crate::registry::categories(s).with_context(|| format!("system {:?}", s.name))?;
            if s.connector == crate::registry::EXTERNAL && !matches!(self.bus, BusConfig::Kafka(_)) {
                bail!(
                    "system {:?} is served by an external worker, which needs the Kafka bus \
                     ([bus] kind = \"kafka\")",
                    s.name
                );
            }
            if matches!(self.bus, BusConfig::Kafka(_)) && s.token.is_none() {
                bail!("system {:?} needs a `token` for its connector workers with the Kafka bus", s.name);
            }
        }
        if self.dispatcher.batch == 0 {
            bail!("dispatcher.batch must be at least 1");
        }
        if self.scheduler.max_attempts == 0 {
            bail!("scheduler.max_attempts must be at least 1");
        }
        if self.scheduler.task_timeout_secs == 0 {
            bail!("scheduler.task_timeout_secs must be at least 1");
        }
        let mut webhooks = std::collections::BTreeSet::new();
        for w in &self.webhooks {
            let ok = !w.name.is_empty()
                && w.name.len() <= 64
                && w.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !ok {
                bail!("webhook name {:?} must be 1-64 lower-case letters, digits, '-' or '_'", w.name);
            }
            if !webhooks.insert(&w.name) {
                bail!("webhook {:?} is declared twice", w.name);
            }
            w.validate().with_context(|| format!("webhook {:?}", w.name))?;
        }
        // Literal tokens are checked here, so that `config check` refuses
        // what `serve` would; those from the environment when it starts.
        let literal = self.systems.iter().filter_map(|s| {
            s.token.as_ref().map(|t| (s.name.clone(), t.clone())).filter(|(_, t)| !t.contains("${"))
        });
        check_connector_tokens(literal.collect())?;
        let mut named = std::collections::HashMap::new();
        for s in &self.systems {
            if let Some(token) = s.token.as_deref().filter(|t| t.contains("${")) {
                if let Some(other) = named.insert(token, s.name.as_str()) {
                    bail!("systems {other:?} and {:?} take their connector token from the same {token}; give each system its own", s.name);
                }
            }
        }
        crate::policy::planner(self)?;
        Ok(())
    }

    /// Checks, as `lethe serve` does, each secret whose placeholders this
    /// environment can resolve (connector tokens, webhook secrets, the
    /// master key); those it cannot are left to `serve`.
    pub fn check_resolvable_secrets(&self) -> anyhow::Result<()> {
        let tokens = self
            .systems
            .iter()
            .filter_map(|s| {
                s.token.as_ref().and_then(|t| Some((s.name.clone(), resolve_placeholders(t).ok()?)))
            })
            .collect();
        check_connector_tokens(tokens)?;
        for w in &self.webhooks {
            if resolve_placeholders(&w.url).is_ok() && resolve_placeholders(&w.secret).is_ok() {
                w.endpoint().with_context(|| format!("webhook {:?}", w.name))?;
            }
        }
        if let Some(hex) = self.keys.master_key.as_deref().and_then(|k| resolve_placeholders(k).ok()) {
            lethe_core::DataKey::from_hex(&hex).context("keys.master_key")?;
        }
        if let Some(token) = self.server.admin_token.as_deref().and_then(|t| resolve_placeholders(t).ok()) {
            check_admin_token(&token)?;
        }
        Ok(())
    }

    /// The state store a coordinator made, for the commands that work on it
    /// directly: a SQLite file that is not there is an error, not a new,
    /// empty store ([`lethe_store::connect_existing`]).
    pub async fn open_store(&self) -> anyhow::Result<std::sync::Arc<dyn lethe_store::StateStore>> {
        let url = resolve_placeholders(&self.store.url).context("store.url")?;
        lethe_store::connect_existing(&url).await.context("cannot open the state store")
    }

    /// The connector token of each system that has one, resolved from the
    /// environment and checked: long enough, one per system.
    pub fn connector_tokens(&self) -> anyhow::Result<Vec<(String, String)>> {
        let tokens = self
            .systems
            .iter()
            .filter_map(|s| s.token.as_ref().map(|t| Ok((s.name.clone(), resolve_placeholders(t)?))))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("system token")?;
        check_connector_tokens(tokens)
    }

    /// Values that parse but cannot work: a zero lease lets two replicas
    /// publish one outbox row, a zero poll interval spins, a zero time-out
    /// or attempt budget fails every task.
    fn check_ranges(&self) -> anyhow::Result<()> {
        let (d, s) = (&self.dispatcher, &self.scheduler);
        let r = &self.retry;
        let checks: [(bool, &str); 10] = [
            (
                r.initial_delay_ms >= 1 && r.initial_delay_ms <= r.max_delay_ms,
                "retry delays must satisfy 1 <= retry.initial_delay_ms <= retry.max_delay_ms",
            ),
            ((1..=10_000).contains(&d.batch), "dispatcher.batch must be 1 to 10000"),
            (d.lease_secs >= 1, "dispatcher.lease_secs must be at least 1"),
            (d.poll_interval_ms >= 1, "dispatcher.poll_interval_ms must be at least 1"),
            (self.worker.concurrency >= 1, "worker.concurrency must be at least 1"),
            (s.task_timeout_secs >= 1, "scheduler.task_timeout_secs must be at least 1"),
            (s.max_attempts >= 1, "scheduler.max_attempts must be at least 1"),
            (s.interval_secs >= 1, "scheduler.interval_secs must be at least 1"),
            (
                s.retry_initial_delay_secs <= s.retry_max_delay_secs,
                "scheduler.retry_initial_delay_secs must not exceed retry_max_delay_secs",
            ),
            (
                self.store.url.starts_with("${")
                    || ["sqlite:", "postgres:", "postgresql:"].iter().any(|p| self.store.url.starts_with(p)),
                "store.url must be sqlite://… or postgres://…",
            ),
        ];
        if let Some((_, problem)) = checks.iter().find(|(ok, _)| !ok) {
            bail!("{problem}");
        }
        if self.worker.task_timeout_secs == Some(0) {
            bail!("worker.task_timeout_secs must be at least 1 (leave it out for the default)");
        }
        if let BusConfig::Kafka(k) = &self.bus {
            if k.brokers.trim().is_empty() {
                bail!("bus.brokers is empty");
            }
            if k.partitions < 1 || k.replication_factor < 1 {
                bail!("bus.partitions and bus.replication_factor must be at least 1");
            }
            for (alias, of) in lethe_bus::kafka::REFUSED_CLIENT_SETTINGS {
                if k.client.contains_key(*alias) {
                    bail!(
                        "bus.client.{alias:?} is another name of {of:?}, which Lethe sets itself; remove it"
                    );
                }
            }
        }
        Ok(())
    }

    /// How long a connector worker gives one task.
    pub fn worker_task_timeout(&self) -> Duration {
        let default = self.scheduler.task_timeout_secs.saturating_mul(3);
        Duration::from_secs(self.worker.task_timeout_secs.unwrap_or(default))
    }

    /// The webhook endpoints, with URLs and secrets resolved.
    pub fn webhook_endpoints(&self) -> anyhow::Result<Vec<lethe_coordinator::webhooks::WebhookEndpoint>> {
        self.webhooks.iter().map(|w| w.endpoint().with_context(|| format!("webhook {:?}", w.name))).collect()
    }

    /// The coordinator's tunables.
    pub fn settings(&self) -> lethe_coordinator::Settings {
        let (d, s) = (&self.dispatcher, &self.scheduler);
        lethe_coordinator::Settings {
            dispatch_batch: d.batch,
            max_in_flight: (d.max_in_flight > 0).then_some(d.max_in_flight),
            lease: Duration::from_secs(d.lease_secs),
            poll_interval: Duration::from_millis(d.poll_interval_ms),
            retry: lethe_store::RetrySchedule {
                max_attempts: s.max_attempts,
                initial_delay: Duration::from_secs(s.retry_initial_delay_secs),
                max_delay: Duration::from_secs(s.retry_max_delay_secs),
            },
            task_timeout: Duration::from_secs(s.task_timeout_secs),
            scheduler_interval: Duration::from_secs(s.interval_secs.max(1)),
            webhook_log_keep: (s.webhook_log_days > 0)
                .then(|| Duration::from_secs(s.webhook_log_days.saturating_mul(86_400))),
            ..Default::default()
        }
    }

    /// A system by name.
    pub fn system(&self, name: &str) -> anyhow::Result<&SystemConfig> {
        self.systems.iter().find(|s| s.name == name).with_context(|| {
            let known: Vec<&str> = self.systems.iter().map(|s| s.name.as_str()).collect();
            format!("no system named {name:?}; configured: {}", known.join(", "))
        })
    }

    pub fn is_sqlite(&self) -> bool {
        self.store.url.starts_with("sqlite:")
    }
}

/// `LETHE__A__B=v` sets `a.b = v`; `v` is read as a TOML value (number,
/// boolean, array) when it parses as one, else as a string.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> anyhow::Result<()> {
    for (name, value) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            bail!("environment variable {name} has an empty path segment");
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let (last, parents) = keys.split_last().unwrap_or_else(|| unreachable!("split yields one key"));
        let mut node = &mut *table;
        for k in parents {
            let entry = node.entry(k.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = entry
                .as_table_mut()
                .with_context(|| format!("environment variable {name}: `{k}` is not a section"))?;
        }
        node.insert(last.clone(), parsed);
    }
    Ok(())
}

/// The environment variables that the configuration at `path` (the
/// embedded default without one), with the `LETHE__` overrides of this
/// environment, names in a `${…}` placeholder and that are not set here,
/// each once, in the order they appear.
pub fn unset_variables(path: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let text = match path {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read config file {}", p.display()))?
        }
        None => EMBEDDED_DEFAULT.to_owned(),
    };
    let mut table: toml::Table = toml::from_str(&text)?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    apply_env(&mut table, &env)?;
    fn walk(value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::String(s) => {
                let mut rest = s.as_str();
                while let Some(start) = rest.find("${") {
                    let after = &rest[start + 2..];
                    let Some(end) = after.find('}') else { break };
                    let name = &after[..end];
                    if std::env::var_os(name).is_none() && !out.iter().any(|n| n == name) {
                        out.push(name.to_owned());
                    }
                    rest = &after[end + 1..];
                }
            }
            toml::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            toml::Value::Table(t) => t.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&toml::Value::Table(table), &mut out);
    Ok(out)
}

/// Replaces every `${NAME}` in `s` with the environment variable `NAME`;
/// a missing variable is an error that names it (and nothing else).
pub fn resolve_placeholders(s: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').context("unterminated ${…} placeholder")?;
        let name = &after[..end];
        let value = std::env::var(name).with_context(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Resolves placeholders in every string of a TOML table.
pub fn resolve_table(table: &toml::Table) -> anyhow::Result<toml::Table> {
    fn walk(v: &toml::Value) -> anyhow::Result<toml::Value> {
        Ok(match v {
            toml::Value::String(s) => toml::Value::String(resolve_placeholders(s)?),
            toml::Value::Array(a) => toml::Value::Array(a.iter().map(walk).collect::<anyhow::Result<_>>()?),
            toml::Value::Table(t) => toml::Value::Table(resolve_table(t)?),
            other => other.clone(),
        })
    }
    table.iter().map(|(k, v)| Ok((k.clone(), walk(v)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_config_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let mut files = Vec::new();
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() && path.file_name().is_some_and(|n| n == "policies") {
                    continue; // policy files, parsed by the policy tests
                } else if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "toml") {
                    files.push(path);
                }
            }
        }
        assert!(!files.is_empty());
        for f in files {
            Config::load_with_env(Some(&f), &Overrides::default(), &[])
                .unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
        }
    }

    /// Nothing secret reaches a `{:?}` of the configuration: tokens, the
    /// master key, a store URL's password, a connector's or the Kafka
    /// client's settings.
    #[test]
    fn debug_output_shows_no_secret() {
        let text = r#"
            [server]
            admin_token = "admin-token-value-0123456789abcdef"
            [store]
            url = "postgres://lethe:store-password@db.internal/lethe"
            [keys]
            master_key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
            [bus]
            kind = "kafka"
            brokers = "127.0.0.1:9092"
            [bus.client]
            "sasl.password" = "kafka-password-value"
            [[systems]]
            name = "shop"
            connector = "redis"
            token = "connector-token-value-0123456789abcdef"
            [systems.config]
            url = "redis://:redis-password@cache.internal"
            [[systems.config.datasets]]
            name = "sessions"
            category = "web.session"
            key = "session:{customer_id}"
        "#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lethe.toml");
        std::fs::write(&path, text).unwrap();
        let overrides =
            Overrides { listen: None, store_url: Some("postgres://u:override-password@h/db".into()) };
        let config = Config::load_with_env(Some(&path), &overrides, &[]).unwrap();
        let shown = format!("{config:?} {overrides:?}");
        for secret in [
            "admin-token-value",
            "store-password",
            "0011223344",
            "kafka-password-value",
            "connector-token-value",
            "redis-password",
            "override-password",
        ] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.contains("sasl.password") && shown.contains("\"shop\""), "{shown}");
    }

    /// Another name of a setting Lethe forces would undo it, whichever of
    /// the two librdkafka takes: refused with the name it stands for.
    #[test]
    fn aliases_of_forced_kafka_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (alias, of) in [("delivery.timeout.ms", "message.timeout.ms"), ("request.required.acks", "acks")]
        {
            let path = dir.path().join("lethe.toml");
            let text = format!(
                "[bus]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n[bus.client]\n\"{alias}\" = \"1\"\n"
            );
            std::fs::write(&path, text).unwrap();
            let e = Config::load_with_env(Some(&path), &Overrides::default(), &[]).unwrap_err();
            let e = format!("{e:#}");
            assert!(e.contains(alias) && e.contains(of), "{e}");
        }
    }

    #[test]
    fn layers_apply_in_order() {
        let env = vec![
            ("LETHE__SERVER__LISTEN".to_owned(), "127.0.0.1:9000".to_owned()),
            ("LETHE__STORE__URL".to_owned(), "sqlite://env.db".to_owned()),
            ("LETHE__DISPATCHER__BATCH".to_owned(), "7".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let flags = Overrides { listen: None, store_url: Some("sqlite://flag.db".into()) };
        let c = Config::load_with_env(None, &flags, &env).unwrap();
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.store.url, "sqlite://flag.db");
        assert_eq!(c.dispatcher.batch, 7);
        assert!(!c.systems.is_empty());
    }

    #[test]
    fn bad_configs_are_rejected_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let write = |body: &str| {
            let p = dir.path().join("c.toml");
            std::fs::write(&p, body).unwrap();
            p
        };
        let unknown = write("[server]\nlisten = \"127.0.0.1:1\"\nport = 3\n");
        let err =
            format!("{:#}", Config::load_with_env(Some(&unknown), &Overrides::default(), &[]).unwrap_err());
        assert!(err.contains("unknown field `port`"), "{err}");
        assert!(err.contains("line 3, column 1"), "the line of the unknown key: {err}");
        let misspelt = write("[[systems]]\nname = \"a\"\nconnector = \"sql\"\n[systems.config]\nurl = \"sqlite://x.db\"\n[[systems.config.tables]]\nname = \"t\"\naction = \"delete\"\ncategory = \"identity.contact\"\nmatch = { email = \"email\" }\n[[systems.config.tables]]\nname = \"u\"\naction = \"anonymise\"\ncategory = \"identity.contact\"\nmatch = { email = \"email\" }\n");
        let err =
            format!("{:#}", Config::load_with_env(Some(&misspelt), &Overrides::default(), &[]).unwrap_err());
        assert!(err.contains("tables[1].action: unknown variant `anonymise`"), "the setting's path: {err}");
        let twice = write("[[systems]]\nname = \"a\"\nconnector = \"sql\"\n[systems.config]\nurl = \"sqlite://x.db\"\n[[systems.config.tables]]\nname = \"t\"\naction = \"delete\"\ncategory = \"identity.contact\"\nmatch = { email = \"email\" }\n[[systems]]\nname = \"a\"\nconnector = \"sql\"\n[systems.config]\nurl = \"sqlite://x.db\"\n[[systems.config.tables]]\nname = \"t\"\naction = \"delete\"\ncategory = \"identity.contact\"\nmatch = { email = \"email\" }\n");
        let err =
            format!("{:#}", Config::load_with_env(Some(&twice), &Overrides::default(), &[]).unwrap_err());
        assert!(err.contains("declared twice"), "{err}");
        for (deadline, problem) in [
            ("response = \"0d\"", "[deadlines.gdpr] response is zero"),
            ("response = \"1m\"\nextension = \"0m\"", "[deadlines.gdpr] extension is zero"),
        ] {
            let zero = write(&format!("[deadlines.gdpr]\n{deadline}\n"));
            let err =
                format!("{:#}", Config::load_with_env(Some(&zero), &Overrides::default(), &[]).unwrap_err());
            assert!(err.contains(problem), "{err}");
        }
        let unknown_kind = write("[[systems]]\nname = \"a\"\nconnector = \"ftp\"\n");
        let err = format!(
            "{:#}",
            Config::load_with_env(Some(&unknown_kind), &Overrides::default(), &[]).unwrap_err()
        );
        assert!(err.contains("unknown connector type"), "{err}");
        // Values that parse but cannot work.
        for (name, value, problem) in [
            ("LETHE__DISPATCHER__LEASE_SECS", "0", "dispatcher.lease_secs"),
            ("LETHE__DISPATCHER__POLL_INTERVAL_MS", "0", "dispatcher.poll_interval_ms"),
            ("LETHE__SCHEDULER__MAX_ATTEMPTS", "0", "scheduler.max_attempts"),
            ("LETHE__WORKER__CONCURRENCY", "0", "worker.concurrency"),
            ("LETHE__WORKER__TASK_TIMEOUT_SECS", "0", "worker.task_timeout_secs must be at least 1"),
            ("LETHE__STORE__URL", "postgress://db/lethe", "store.url"),
            // A zero backoff retries a broker outage in a busy loop.
            ("LETHE__RETRY__INITIAL_DELAY_MS", "0", "retry.initial_delay_ms"),
            ("LETHE__RETRY__MAX_DELAY_MS", "100", "retry.initial_delay_ms <= retry.max_delay_ms"),
        ] {
            let env = [(name.to_owned(), value.to_owned())];
            let err = format!("{:#}", Config::load_with_env(None, &Overrides::default(), &env).unwrap_err());
            assert!(err.contains(problem), "{name}={value}: {err}");
            assert!(err.contains("(with LETHE__ overrides)"), "not the file alone: {err}");
        }
    }

    /// Unset, a worker gives a task three times what the coordinator gives
    /// it; set, what it says, more or less than the coordinator's.
    #[test]
    fn a_workers_task_time_out_follows_the_coordinators_unless_set() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let load = |pairs: &[(&str, &str)]| {
            Config::load_with_env(None, &Overrides::default(), &env(pairs)).unwrap().worker_task_timeout()
        };
        assert_eq!(load(&[]), Duration::from_secs(900));
        assert_eq!(load(&[("LETHE__SCHEDULER__TASK_TIMEOUT_SECS", "40")]), Duration::from_secs(120));
        assert_eq!(
            load(&[
                ("LETHE__SCHEDULER__TASK_TIMEOUT_SECS", "40"),
                ("LETHE__WORKER__TASK_TIMEOUT_SECS", "25")
            ]),
            Duration::from_secs(25)
        );
    }

    /// `config check` refuses what `serve` would: two systems with one
    /// connector token, literally or from one environment variable.
    #[test]
    fn systems_never_share_a_connector_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lethe.toml");
        let load = |a: &str, b: &str| {
            let system = |name: &str, token: &str| {
                format!(
                    "[[systems]]\nname = \"{name}\"\nconnector = \"external\"\n\
                     categories = [\"identity.contact\"]\ntoken = \"{token}\"\n"
                )
            };
            let text = format!(
                "[bus]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n{}{}",
                system("crm", a),
                system("mail", b)
            );
            std::fs::write(&path, text).unwrap();
            Config::load_with_env(Some(&path), &Overrides::default(), &[]).map_err(|e| format!("{e:#}"))
        };
        let literal = "connector-token-value-0123456789abcdef";
        let err = load(literal, literal).unwrap_err();
        assert!(err.contains("share a connector token") && !err.contains(literal), "{err}");
        let err = load("${LETHE_CRM_TOKEN}", "${LETHE_CRM_TOKEN}").unwrap_err();
        assert!(err.contains("from the same ${LETHE_CRM_TOKEN}"), "{err}");
        assert!(load("${LETHE_CRM_TOKEN}", "${LETHE_MAIL_TOKEN}").is_ok());
        assert!(load(literal, "connector-token-value-0123456789abcdeF").is_ok());
    }

    /// `config check` refuses an administrator's token `serve` would refuse.
    #[test]
    fn a_short_admin_token_fails_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lethe.toml");
        let check = |token: &str| {
            std::fs::write(&path, format!("[server]\nadmin_token = \"{token}\"\n")).unwrap();
            let config = Config::load_with_env(Some(&path), &Overrides::default(), &[]).unwrap();
            config.check_resolvable_secrets().map_err(|e| format!("{e:#}"))
        };
        let err = check("short").unwrap_err();
        assert!(
            err.contains("admin_token must be at least 32 characters") && !err.contains("short"),
            "{err}"
        );
        assert!(check("an-admin-token-of-enough-characters-0123").is_ok());
        // One this environment cannot resolve is left to `serve`.
        assert!(check("${LETHE_TEST_UNSET_ADMIN_TOKEN}").is_ok());
    }

    #[test]
    fn placeholders_resolve_from_the_environment() {
        std::env::set_var("LETHE_TEST_PLACEHOLDER", "s3cret");
        assert_eq!(
            resolve_placeholders("postgres://u:${LETHE_TEST_PLACEHOLDER}@h/db").unwrap(),
            "postgres://u:s3cret@h/db"
        );
        let err = resolve_placeholders("${LETHE_TEST_MISSING_VAR}").unwrap_err().to_string();
        assert_eq!(err, "environment variable LETHE_TEST_MISSING_VAR is not set");
    }

    #[test]
    fn webhooks_are_validated_and_never_print_their_secret() {
        let dir = tempfile::tempdir().unwrap();
        let load = |webhook: &str| {
            let p = dir.path().join("w.toml");
            std::fs::write(&p, format!("[[webhooks]]\nname = \"portal\"\n{webhook}")).unwrap();
            Config::load_with_env(Some(&p), &Overrides::default(), &[]).map_err(|e| format!("{e:#}"))
        };
        let ok = load(
            "url = \"https://portal.example/hooks/lethe\"\nsecret = \"${LETHE_TEST_WEBHOOK_SECRET}\"\n\
             events = [\"request.completed\", \"request.failed\"]\nmax_attempts = 3\n",
        )
        .unwrap();
        let w = &ok.webhooks[0];
        assert_eq!((w.max_attempts, w.timeout_secs, w.include_identifiers), (3, 10, false));
        std::env::set_var("LETHE_TEST_WEBHOOK_SECRET", "whsec_0123456789abcdef");
        let endpoint = ok.webhook_endpoints().unwrap().remove(0);
        assert_eq!(endpoint.events.len(), 2);
        for debug in [format!("{ok:?}"), format!("{endpoint:?}")] {
            assert!(!debug.contains("whsec_") && !debug.contains("portal.example"), "{debug}");
        }
        std::env::set_var("LETHE_TEST_WEBHOOK_SHORT", "short");
        let short =
            load("url = \"http://127.0.0.1:9/x\"\nsecret = \"${LETHE_TEST_WEBHOOK_SHORT}\"\n").unwrap();
        assert!(load("url = \"http://localhost:9/x\"\nsecret = \"whsec_literal_0123456789\"\ninclude_identifiers = true\n").is_ok());
        let err = format!("{:#}", short.webhook_endpoints().unwrap_err());
        assert!(err.contains("at least 16") && !err.contains("short"), "{err}");
        for (body, expected) in [
            ("url = \"ftp://x.example/\"\nsecret = \"whsec_literal_0123456789\"\n", "https://"),
            ("url = \"not a url\"\nsecret = \"whsec_literal_0123456789\"\n", "not a valid URL"),
            ("url = \"https://x.example/\"\n", "missing field `secret`"),
            ("url = \"https://x.example/\"\nsecret = \"\"\n", "`secret` is required"),
            ("url = \"https://x.example/\"\nsecret = \"s\"\n", "at least 16 characters"),
            (
                "url = \"https://x.example/\"\nsecret = \"whsec_literal_0123456789\"\nevents = [\"request.deleted\"]\n",
                "unknown variant",
            ),
            ("url = \"https://x.example/\"\nsecret = \"whsec_literal_0123456789\"\nevents = []\n", "lists no event"),
            ("url = \"https://x.example/\"\nsecret = \"whsec_literal_0123456789\"\nmax_attempts = 0\n", "max_attempts"),
            ("url = \"https://x.example/\"\nsecret = \"whsec_literal_0123456789\"\nretries = 3\n", "unknown field `retries`"),
            (
                "url = \"http://x.example/\"\nsecret = \"whsec_literal_0123456789\"\ninclude_identifiers = true\n",
                "needs an https://",
            ),
        ] {
            let err = load(body).unwrap_err();
            assert!(err.contains(expected), "{body}: {err}");
        }
    }
}
