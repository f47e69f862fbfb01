//! A system's settings: which spec, and the per-deployment values it needs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::duration::Span;
use crate::spec::{self, AuthSpec, RateLimit, Spec};

fn default_timeout() -> Span {
    Span::secs(30)
}

fn default_max_retries() -> u32 {
    3
}

fn default_max_retry_after() -> Span {
    Span::secs(60)
}

/// The settings of a system served by the HTTP connector.
///
/// ```toml
/// spec = "mailchimp"                       # or spec_file = "specs/crm.toml"
/// category = "marketing.profile"           # default: the spec's
/// settings = { dc = "us21", list_id = "a1b2c3", api_key = "${MAILCHIMP_API_KEY}" }
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// A bundled spec: `mailchimp`, `hubspot`, `braze`, `klaviyo`,
    /// `segment`, `amplitude` or `mixpanel`.
    #[serde(default)]
    pub spec: Option<String>,
    /// A spec file of one's own (relative to the working directory).
    #[serde(default)]
    pub spec_file: Option<PathBuf>,
    /// The data category of what the system holds (default: the spec's).
    #[serde(default)]
    pub category: Option<String>,
    /// Replaces the spec's base URL (a regional host, a proxy, a test server).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Identifier type whose values are the subject (default: the spec's).
    #[serde(default)]
    pub key: Option<String>,
    /// Replaces the spec's authentication (e.g. a bearer token instead of
    /// basic auth where the vendor offers both).
    #[serde(default)]
    pub auth: Option<AuthSpec>,
    /// Values of the spec's settings (`{settings.name}`); write secrets as
    /// `${ENV_VAR}`.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Replaces the spec's client-side rate limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Replaces the spec's interval between checks of a deletion job.
    #[serde(default)]
    pub poll_interval: Option<Span>,
    /// Replaces the spec's longest wait for a deletion job.
    #[serde(default)]
    pub max_wait: Option<Span>,
    /// Timeout of one request (default 30s).
    #[serde(default = "default_timeout")]
    pub timeout: Span,
    /// Times one call waits out a 429 before failing retryably (default 3).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Longest `Retry-After` waited within a call (default 60s); a longer
    /// one fails the call retryably at once.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after: Span,
}

impl fmt::Debug for HttpConfig {
    /// Setting values and credentials may be secrets: names only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field("spec", &self.spec)
            .field("spec_file", &self.spec_file)
            .field("category", &self.category)
            .field("base_url", &self.base_url.as_ref().map(|_| "[set]"))
            .field("key", &self.key)
            .field("auth", &self.auth.as_ref().map(|_| "[set]"))
            .field("settings", &self.settings.keys().collect::<Vec<_>>())
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

/// A spec with a system's settings applied.
#[derive(Clone)]
pub struct Resolved {
    pub spec: Spec,
    pub category: String,
    pub base_url: String,
    pub key: String,
    pub auth: AuthSpec,
    /// Every setting, defaults filled in.
    pub settings: BTreeMap<String, String>,
    pub rate_limit: Option<RateLimit>,
    pub poll_interval: Duration,
    pub max_wait: Duration,
    pub timeout: Duration,
    pub max_retries: u32,
    pub max_retry_after: Duration,
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolved")
            .field("spec", &self.spec.name)
            .field("category", &self.category)
            .field("key", &self.key)
            .field("settings", &self.settings.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl HttpConfig {
    /// Loads the spec (bundled or from its file).
    pub fn load_spec(&self) -> Result<Spec, String> {
        match (&self.spec, &self.spec_file) {
            (Some(name), None) => spec::bundled(name),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read spec_file {}: {e}", path.display()))?;
                spec::parse(&text).map_err(|e| format!("spec_file {}: {e}", path.display()))
            }
            _ => Err("set exactly one of spec (a bundled spec) and spec_file".into()),
        }
    }

    /// Loads and checks the spec and applies these settings; names every
    /// problem found. Placeholders such as `${API_KEY}` may still be there.
    pub fn resolve(&self) -> Result<Resolved, String> {
        let spec = self.load_spec()?;
        let mut problems = Vec::new();
        let mut spec = spec;
        if let Some(key) = &self.key {
            if key.parse::<lethe_core::IdentifierKind>().is_err() {
                problems.push(format!("key {key:?} is not an identifier type"));
            }
            spec.key = key.clone();
        }
        if let Some(auth) = &self.auth {
            spec.auth = auth.clone();
        }
        if let Some(base) = &self.base_url {
            spec.base_url = base.clone();
        }
        if let Err(e) = spec.check() {
            problems.push(format!("spec {:?}: {e}", spec.name));
        }
        let mut settings = BTreeMap::new();
        for (name, declared) in &spec.settings {
            match (self.settings.get(name), &declared.default) {
                (Some(v), _) => {
                    settings.insert(name.clone(), v.clone());
                }
                (None, Some(d)) => {
                    settings.insert(name.clone(), d.clone());
                }
                (None, None) => {
                    problems.push(format!("setting {name:?} is required: {}", declared.description))
                }
            }
        }
        for name in self.settings.keys() {
            if !spec.settings.contains_key(name) {
                let known: Vec<&str> = spec.settings.keys().map(String::as_str).collect();
                problems.push(format!(
                    "unknown setting {name:?} (spec {:?} takes: {})",
                    spec.name,
                    known.join(", ")
                ));
            }
        }
        let category = self.category.clone().unwrap_or_else(|| spec.category.clone());
        if category.trim().is_empty() {
            problems.push("category is empty".into());
        }
        if let Some(r) = self.rate_limit {
            if r.requests == 0 || r.per_seconds == 0 {
                problems.push("rate_limit needs requests and per_seconds of at least 1".into());
            }
        }
        if self.timeout.0.is_zero() {
            problems.push("timeout must be positive".into());
        }
        let job = spec.erase.job.as_ref();
        let poll_interval =
            self.poll_interval.or(job.map(|j| j.poll_interval)).map_or(Duration::ZERO, |s| s.0);
        let max_wait = self.max_wait.or(job.map(|j| j.max_wait)).map_or(Duration::ZERO, |s| s.0);
        if job.is_some() && (poll_interval.is_zero() || max_wait < poll_interval) {
            problems.push("poll_interval must be positive and max_wait at least poll_interval".into());
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Resolved {
            category,
            base_url: spec.base_url.clone(),
            key: spec.key.clone(),
            auth: spec.auth.clone(),
            rate_limit: self.rate_limit.or(spec.rate_limit),
            settings,
            poll_interval,
            max_wait,
            timeout: self.timeout.0,
            max_retries: self.max_retries,
            max_retry_after: self.max_retry_after.0,
            spec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> HttpConfig {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn settings_are_checked_against_the_spec() {
        let ok = config(
            r#"
            spec = "mailchimp"
            settings = { dc = "us21", list_id = "l1", api_key = "${MC_KEY}" }
            "#,
        )
        .resolve()
        .unwrap();
        assert_eq!(ok.category, "marketing.profile");
        assert_eq!(ok.key, "email");
        let e = config("spec = \"mailchimp\"\nsettings = { dc = \"us21\", colour = \"x\" }")
            .resolve()
            .unwrap_err();
        assert!(e.contains("setting \"list_id\" is required"), "{e}");
        assert!(e.contains("unknown setting \"colour\""), "{e}");
        assert!(config("spec_file = \"x.toml\"\nspec = \"mailchimp\"").resolve().is_err());
        assert!(config("").resolve().is_err());
        assert!(toml::from_str::<HttpConfig>("spec = \"mailchimp\"\nurl = \"x\"").is_err());
    }

    #[test]
    fn overrides_apply() {
        let r = config(
            r#"
            spec = "segment"
            category = "analytics.events"
            base_url = "http://127.0.0.1:9"
            key = "device_id"
            poll_interval = "1s"
            max_wait = "1m"
            auth = { type = "bearer", token = "t" }
            settings = { token = "x" }
            "#,
        )
        .resolve()
        .unwrap();
        assert_eq!(r.base_url, "http://127.0.0.1:9");
        assert_eq!(r.key, "device_id");
        assert_eq!(r.poll_interval, Duration::from_secs(1));
        assert_eq!(r.max_wait, Duration::from_secs(60));
        assert_eq!(r.auth, AuthSpec::Bearer { token: "t".into() });
    }

    #[test]
    fn debug_shows_no_values() {
        let c = config("spec = \"mailchimp\"\nsettings = { api_key = \"sekrit\" }");
        assert!(!format!("{c:?}").contains("sekrit"));
    }
}
