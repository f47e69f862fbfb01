//! The connector's configuration: the server and the datasets that hold a
//! subject's data, each a key template, a key pattern, a hash field, or a
//! set or sorted-set member.

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;

use crate::template::{Syntax, Template};

fn default_batch_size() -> u32 {
    500
}

fn default_timeout_secs() -> u64 {
    10
}

/// Largest accepted `batch_size`.
pub const MAX_BATCH_SIZE: u32 = 100_000;

/// A Redis server (or any server speaking its protocol, e.g. Valkey) and the
/// datasets in it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Connection URL: `redis://[user:password@]host:port/db`,
    /// `valkey://…`, or `unix:///path/to/redis.sock?db=0`. Write the password
    /// as a `${ENV}` reference.
    pub url: String,
    /// How many keys one `SCAN` step asks for (its `COUNT`) and how many keys,
    /// fields or members one `UNLINK`, `HDEL`, `SREM` or `ZREM` removes
    /// (default 500).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Limit, in seconds, for connecting and for each command (default 10).
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Where the subject's data is.
    pub datasets: Vec<DatasetConfig>,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("batch_size", &self.batch_size)
            .field("timeout_secs", &self.timeout_secs)
            .field("datasets", &self.datasets)
            .finish()
    }
}

/// One dataset: a data category and where its values are. Exactly one of
/// `key`, `pattern`, `hash` (with `field`), `set` or `zset` (with `member`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The dataset's name in reports, e.g. `sessions`.
    pub name: String,
    /// The data category, e.g. `web.session`; the retention policy decides
    /// per category, and a task leaves a dataset whose category it has no
    /// directive for untouched.
    pub category: String,
    /// A key template, e.g. `session:{customer_id}`: the key is deleted.
    #[serde(default)]
    pub key: Option<String>,
    /// A key pattern template, e.g. `cart:{customer_id}:*`: every key
    /// matching it (`SCAN MATCH`) is deleted. Wildcards are allowed in the
    /// literal text only; the substituted values are escaped.
    #[serde(default)]
    pub pattern: Option<String>,
    /// A hash's key (template), e.g. `loyalty:index`; `field` is removed from it.
    #[serde(default)]
    pub hash: Option<String>,
    /// The hash field template, e.g. `{email}`.
    #[serde(default)]
    pub field: Option<String>,
    /// A set's key (template), e.g. `newsletter:subscribers`; `member` is removed.
    #[serde(default)]
    pub set: Option<String>,
    /// A sorted set's key (template); `member` is removed.
    #[serde(default)]
    pub zset: Option<String>,
    /// The member template of `set` or `zset`, e.g. `{email}`.
    #[serde(default)]
    pub member: Option<String>,
}

/// A validated dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The name in reports.
    pub name: String,
    /// The data category whose directive the dataset follows.
    pub category: String,
    /// Where the subject's values are.
    pub target: Target,
}

/// Where a dataset's values are.
#[derive(Debug, Clone)]
pub enum Target {
    /// One key per combination of the subject's identifiers.
    Key(Template),
    /// Every key matching the pattern.
    Pattern(Template),
    /// A member of a collection (a hash field, a set or sorted-set member).
    Member {
        /// The type of the collection.
        collection: Collection,
        /// The collection's key.
        key: Template,
        /// The field or member.
        member: Template,
    },
}

/// The type of the key that holds a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// A hash; the member is a field (`HDEL`).
    Hash,
    /// A set (`SREM`).
    Set,
    /// A sorted set (`ZREM`).
    Zset,
}

impl Collection {
    /// The name `TYPE` answers for such a key.
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Hash => "hash",
            Self::Set => "set",
            Self::Zset => "zset",
        }
    }
}

impl Target {
    /// The identifier types the target needs, each once, in order.
    pub fn kinds(&self) -> Vec<&str> {
        let templates: Vec<&Template> = match self {
            Self::Key(t) | Self::Pattern(t) => vec![t],
            Self::Member { key, member, .. } => vec![key, member],
        };
        let mut out: Vec<&str> = Vec::new();
        for k in templates.into_iter().flat_map(Template::kinds) {
            if !out.contains(&k.as_str()) {
                out.push(k.as_str());
            }
        }
        out
    }
}

impl RedisConfig {
    /// Checks the whole configuration and returns the validated datasets,
    /// or names every problem found.
    pub fn datasets(&self) -> Result<Vec<Dataset>, String> {
        let mut problems = Vec::new();
        if let Err(e) = check_url(&self.url) {
            problems.push(e);
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            problems.push(format!("batch_size must be between 1 and {MAX_BATCH_SIZE}"));
        }
        if self.timeout_secs == 0 {
            problems.push("timeout_secs must be at least 1".to_owned());
        }
        if self.datasets.is_empty() {
            problems.push("no datasets configured".to_owned());
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for d in &self.datasets {
            if !seen.insert(d.name.as_str()) {
                problems.push(format!("dataset {:?} is configured twice", d.name));
            }
            match d.check() {
                Ok(dataset) => out.push(dataset),
                Err(mut p) => problems.append(&mut p),
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems.join("; "))
        }
    }

    /// The distinct data categories of the datasets, in order: what the
    /// system holds.
    pub fn categories(&self) -> Vec<String> {
        lethe_connector::kind::distinct(self.datasets.iter().map(|d| d.category.as_str()))
    }
}

impl DatasetConfig {
    fn check(&self) -> Result<Dataset, Vec<String>> {
        let name = &self.name;
        let mut problems = Vec::new();
        if name.trim().is_empty() {
            problems.push("a dataset has an empty name".to_owned());
        }
        if self.category.trim().is_empty() {
            problems.push(format!("dataset {name}: category is empty"));
        }
        let chosen: Vec<&str> = [
            ("key", self.key.is_some()),
            ("pattern", self.pattern.is_some()),
            ("hash", self.hash.is_some()),
            ("set", self.set.is_some()),
            ("zset", self.zset.is_some()),
        ]
        .into_iter()
        .filter_map(|(what, set)| set.then_some(what))
        .collect();
        let one = match chosen.as_slice() {
            [] => {
                problems.push(format!("dataset {name}: set one of key, pattern, hash, set or zset"));
                None
            }
            [one] => Some(*one),
            more => {
                problems.push(format!(
                    "dataset {name}: set only one of key, pattern, hash, set or zset (found {})",
                    more.join(", ")
                ));
                None
            }
        };
        if self.field.is_some() && one.is_some_and(|c| c != "hash") {
            problems.push(format!("dataset {name}: field goes only with hash"));
        }
        if self.member.is_some() && one.is_some_and(|c| c != "set" && c != "zset") {
            problems.push(format!("dataset {name}: member goes only with set or zset"));
        }
        let target = match (one, &self.field, &self.member) {
            (Some("key"), None, None) => self
                .key
                .as_deref()
                .and_then(|s| template(name, "key", s, Syntax::Exact, &mut problems))
                .map(Target::Key),
            (Some("pattern"), None, None) => self
                .pattern
                .as_deref()
                .and_then(|s| template(name, "pattern", s, Syntax::Glob, &mut problems))
                .map(Target::Pattern),
            (Some("hash"), Some(field), None) => {
                let key = self
                    .hash
                    .as_deref()
                    .and_then(|s| template(name, "hash", s, Syntax::Exact, &mut problems));
                let member = template(name, "field", field, Syntax::Exact, &mut problems);
                key.zip(member).map(|(key, member)| Target::Member {
                    collection: Collection::Hash,
                    key,
                    member,
                })
            }
            (Some(c @ ("set" | "zset")), None, Some(member)) => {
                let (collection, source) = if c == "set" {
                    (Collection::Set, self.set.as_deref())
                } else {
                    (Collection::Zset, self.zset.as_deref())
                };
                let key = source.and_then(|s| template(name, c, s, Syntax::Exact, &mut problems));
                let member = template(name, "member", member, Syntax::Exact, &mut problems);
                key.zip(member).map(|(key, member)| Target::Member { collection, key, member })
            }
            (Some("hash"), None, _) => {
                problems.push(format!("dataset {name}: hash needs a field"));
                None
            }
            (Some(c @ ("set" | "zset")), _, None) => {
                problems.push(format!("dataset {name}: {c} needs a member"));
                None
            }
            _ => None,
        };
        if let Some(t) = &target {
            if t.kinds().is_empty() {
                problems.push(format!(
                    "dataset {name} has no identifier placeholder such as {{customer_id}}: \
                     it would be the same data for every subject"
                ));
            }
        }
        match target {
            Some(target) if problems.is_empty() => {
                Ok(Dataset { name: name.clone(), category: self.category.clone(), target })
            }
            _ => Err(problems),
        }
    }
}

/// Parses one template of dataset `name`, recording a problem if it is wrong.
fn template(
    name: &str,
    what: &str,
    source: &str,
    syntax: Syntax,
    problems: &mut Vec<String>,
) -> Option<Template> {
    Template::parse(source, syntax).map_err(|e| problems.push(format!("dataset {name}: {what} {e}"))).ok()
}

/// Schemes this build can connect to (TLS is not compiled in).
const SCHEMES: [&str; 5] = ["redis", "valkey", "unix", "redis+unix", "valkey+unix"];

/// Checks the URL's scheme only: the rest may still hold `${ENV}` references.
fn check_url(url: &str) -> Result<(), String> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    if SCHEMES.contains(&scheme) {
        Ok(())
    } else if matches!(scheme, "rediss" | "valkeys") {
        Err(format!("url: {scheme}:// (TLS) is not supported by this build; use redis:// or a unix socket"))
    } else {
        Err(format!("url must start with one of {}", SCHEMES.map(|s| format!("{s}://")).join(", ")))
    }
}

/// `url` with any user name and password replaced by `[redacted]`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "[redacted]".to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://[redacted]@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        url = "redis://:secret@127.0.0.1:6379/0"
        batch_size = 200

        [[datasets]]
        name = "sessions"
        category = "web.session"
        key = "session:{customer_id}"

        [[datasets]]
        name = "carts"
        category = "shop.cart"
        pattern = "cart:{customer_id}:*"

        [[datasets]]
        name = "loyalty"
        category = "shop.loyalty"
        hash = "loyalty:index"
        field = "{email}"

        [[datasets]]
        name = "newsletter"
        category = "marketing.newsletter"
        set = "newsletter:subscribers"
        member = "{email}"

        [[datasets]]
        name = "leaderboard"
        category = "shop.loyalty"
        zset = "leaderboard"
        member = "{customer_id}"
    "#;

    fn config(text: &str) -> RedisConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn problems(datasets: &str) -> String {
        config(&format!("url = \"redis://127.0.0.1:6379\"\n{datasets}")).datasets().unwrap_err()
    }

    #[test]
    fn parses_the_example() {
        let c = config(EXAMPLE);
        let datasets = c.datasets().unwrap();
        assert_eq!(datasets.len(), 5);
        assert!(matches!(datasets[0].target, Target::Key(_)));
        assert!(matches!(datasets[1].target, Target::Pattern(_)));
        assert!(matches!(datasets[2].target, Target::Member { collection: Collection::Hash, .. }));
        assert!(matches!(datasets[4].target, Target::Member { collection: Collection::Zset, .. }));
        assert_eq!(c.categories(), ["web.session", "shop.cart", "shop.loyalty", "marketing.newsletter"]);
        assert_eq!(c.timeout_secs, 10);
        let debug = format!("{c:?}");
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn names_every_problem() {
        let p = problems(
            r#"
            [[datasets]]
            name = "a"
            category = ""
            key = "k:{email}"
            pattern = "p:{email}:*"

            [[datasets]]
            name = "a"
            category = "c"
            hash = "h"

            [[datasets]]
            name = "fixed"
            category = "c"
            key = "global:counter"

            [[datasets]]
            name = "orphan"
            category = "c"
            key = "k:{email}"
            member = "{email}"

            [[datasets]]
            name = "bad"
            category = "c"
            pattern = "p:[{email}]"
            "#,
        );
        for expected in [
            "dataset a: category is empty",
            "set only one of key, pattern, hash, set or zset (found key, pattern)",
            "dataset \"a\" is configured twice",
            "dataset a: hash needs a field",
            "dataset fixed has no identifier placeholder",
            "dataset orphan: member goes only with set or zset",
            "dataset bad: pattern \"p:[{email}]\": a placeholder cannot stand inside `[...]`",
        ] {
            assert!(p.contains(expected), "missing {expected:?} in {p}");
        }
    }

    #[test]
    fn a_member_placeholder_is_enough_and_unknown_keys_are_refused() {
        assert!(config(EXAMPLE).datasets().is_ok());
        let unknown = toml::from_str::<RedisConfig>(
            "url = \"redis://h\"\n[[datasets]]\nname = \"a\"\ncategory = \"c\"\nkey = \"k:{email}\"\nttl = 3\n",
        );
        assert!(unknown.is_err());
    }

    #[test]
    fn urls() {
        assert!(check_url("redis://:${REDIS_PASSWORD}@cache:6379/2").is_ok());
        assert!(check_url("unix:///run/redis.sock?db=1").is_ok());
        assert!(check_url("rediss://cache:6380").unwrap_err().contains("TLS"));
        assert!(check_url("http://cache").is_err());
        assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://[redacted]@h:1/0");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("nonsense"), "[redacted]");
    }

    #[test]
    fn limits() {
        let mut c = config(EXAMPLE);
        c.batch_size = 0;
        c.timeout_secs = 0;
        let p = c.datasets().unwrap_err();
        assert!(p.contains("batch_size") && p.contains("timeout_secs"), "{p}");
        c.datasets.clear();
        assert!(c.datasets().unwrap_err().contains("no datasets"));
    }
}
