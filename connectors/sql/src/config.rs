//! The connector's configuration: the database and its tables, declared one
//! by one with how the subject's rows are found and what happens to them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use lethe_core::IdentifierKind;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::dialect::{is_identifier, is_table_name, redact_url, Dialect};

/// Shortest `hash_key` accepted, in bytes.
pub const MIN_HASH_KEY_LEN: usize = 16;

fn default_max_connections() -> u32 {
    4
}

fn default_lock_timeout() -> u64 {
    60
}

fn default_primary_key() -> String {
    "id".to_owned()
}

/// A SQL store (PostgreSQL, MySQL/MariaDB or SQLite), declared table by table.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// Connection URL: `postgres://`, `postgresql://`, `mysql://`, `mariadb://`
    /// or `sqlite:` (e.g. `sqlite:///var/lib/app.db?mode=rw`).
    pub url: String,
    /// Largest number of pooled connections (default 4).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Seconds a statement may wait for a lock another session holds before
    /// the server cancels it (default 60; 0 leaves the server's setting): a
    /// retryable failure that gives the connection back, rather than keep
    /// it after the worker has given up on the task. A statement that runs
    /// slowly without waiting for a lock is not cut. PostgreSQL:
    /// `lock_timeout`; MySQL/MariaDB: `innodb_lock_wait_timeout` and
    /// `lock_wait_timeout`; SQLite waits at most 5 s for a locked database
    /// whatever this says.
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout_secs: u64,
    /// Key of the `hash` strategy (HMAC-SHA256); required, at least 16 bytes,
    /// when any column uses `hash`.
    #[serde(default)]
    pub hash_key: Option<String>,
    /// The tables that hold the subject's data.
    pub tables: Vec<TableConfig>,
}

impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("lock_timeout_secs", &self.lock_timeout_secs)
            .field("hash_key", &self.hash_key.as_ref().map(|_| "[redacted]"))
            .field("tables", &self.tables)
            .finish()
    }
}

/// One table: how the subject's rows are found and what happens to them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Table name, optionally `schema.table`; `[A-Za-z_][A-Za-z0-9_]*` parts.
    pub name: String,
    /// Primary key column, used to update rows one by one (default `id`).
    #[serde(default = "default_primary_key")]
    pub primary_key: String,
    /// Identifier type (`email`, `phone`, `customer_id`, `device_id` or a
    /// custom word) to the column that holds it.
    #[serde(rename = "match", default)]
    pub matches: BTreeMap<IdentifierKind, MatchColumn>,
    /// The table this one hangs off: its rows are the subject's when their
    /// `column` holds the `references` value of a subject's row there.
    #[serde(default)]
    pub parent: Option<ParentConfig>,
    /// `delete` the rows or `anonymize` them in place.
    pub action: TableAction,
    /// For `anonymize`: column to strategy (`"null"`, `{ fixed = "..." }`,
    /// `"hash"`, `"redact"`).
    #[serde(default)]
    pub columns: BTreeMap<String, Strategy>,
    /// The data category, e.g. `billing.invoice`; the retention policy
    /// decides per category, and a task leaves a table whose category it
    /// has no directive for untouched.
    pub category: String,
    /// The record's own date (e.g. an invoice date): the reference of a
    /// retention counted from the record. Rows without one (NULL) are
    /// retained like those of a table without this column.
    #[serde(default)]
    pub date_column: Option<String>,
    /// For large tables: the most rows one statement deletes or anonymises.
    /// The table's rows of the subject are then treated in batches, each its
    /// own short transaction, until a batch affects none (or two in a row
    /// affect fewer than the limit); absent, the
    /// table is treated by one statement in the task's transaction.
    #[serde(default)]
    pub batch_size: Option<u32>,
}

/// What happens to a table's matching rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableAction {
    Delete,
    Anonymize,
}

/// How one column is anonymised.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Set to NULL.
    Null,
    /// Set to a fixed value.
    Fixed(String),
    /// Replace by the hex HMAC-SHA256 of the current value under `hash_key`.
    Hash,
    /// Replace by as many `*` as the current value has characters.
    Redact,
}

impl Strategy {
    /// Whether the new value is computed from the old one, row by row.
    pub fn is_per_row(&self) -> bool {
        matches!(self, Self::Hash | Self::Redact)
    }
}

/// How a column is compared with an identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compare {
    /// `column = value`.
    Exact,
    /// `LOWER(TRIM(column)) = lower(value)`.
    Normalized,
}

impl Compare {
    /// `normalized` for email, `exact` for every other type.
    pub fn default_for(kind: &IdentifierKind) -> Self {
        if *kind == IdentifierKind::Email {
            Self::Normalized
        } else {
            Self::Exact
        }
    }
}

/// The column that holds an identifier: `"email"` or
/// `{ column = "email", compare = "exact" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchColumn {
    /// The column name.
    pub column: String,
    /// How to compare; absent means the identifier type's default.
    pub compare: Option<Compare>,
}

impl MatchColumn {
    pub fn compare_for(&self, kind: &IdentifierKind) -> Compare {
        self.compare.unwrap_or_else(|| Compare::default_for(kind))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchColumnTable {
    column: String,
    #[serde(default)]
    compare: Option<Compare>,
}

impl<'de> Deserialize<'de> for MatchColumn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MatchColumn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a column name or { column = \"...\", compare = \"exact\" | \"normalized\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MatchColumn, E> {
                Ok(MatchColumn { column: v.to_owned(), compare: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MatchColumn, A::Error> {
                let t = MatchColumnTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(MatchColumn { column: t.column, compare: t.compare })
            }
        }
        d.deserialize_any(V)
    }
}

/// The parent of a table: this table's `column` references `references`
/// in `table`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentConfig {
    /// The parent table's `name`, as configured.
    pub table: String,
    /// The column of this table that holds the reference.
    pub column: String,
    /// The referenced column of the parent table.
    pub references: String,
}

impl SqlConfig {
    pub fn dialect(&self) -> Result<Dialect, String> {
        Dialect::from_url(&self.url)
    }

    /// Checks the whole configuration and names every problem found.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Err(e) = self.dialect() {
            problems.push(e);
        }
        if self.lock_timeout_secs > 86_400 {
            problems
                .push("lock_timeout_secs must be at most 86400 (a day); 0 leaves the server's".to_owned());
        }
        if self.max_connections == 0 {
            problems.push("max_connections must be at least 1".to_owned());
        }
        if self.tables.is_empty() {
            problems.push("no tables configured".to_owned());
        }
        let mut seen = HashSet::new();
        for t in &self.tables {
            if !seen.insert(t.name.as_str()) {
                problems.push(format!("table {:?} is configured twice", t.name));
            }
        }
        let names: HashSet<&str> = self.tables.iter().map(|t| t.name.as_str()).collect();
        for t in &self.tables {
            t.check(&names, &mut problems);
        }
        let uses_hash = self.tables.iter().any(|t| t.columns.values().any(|s| *s == Strategy::Hash));
        match &self.hash_key {
            None if uses_hash => {
                problems.push("a column uses the hash strategy but hash_key is not set".to_owned())
            }
            Some(k) if k.len() < MIN_HASH_KEY_LEN => {
                problems.push(format!("hash_key must be at least {MIN_HASH_KEY_LEN} bytes"))
            }
            _ => {}
        }
        if let Err(cycle) = self.order() {
            problems.push(cycle);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Indexes of the tables, children before parents (deepest first; equal
    /// depths in configured order). Fails on a parent cycle.
    pub fn order(&self) -> Result<Vec<usize>, String> {
        let index: HashMap<&str, usize> =
            self.tables.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
        let mut depths = Vec::with_capacity(self.tables.len());
        for (i, _) in self.tables.iter().enumerate() {
            let mut path = vec![i];
            let mut current = i;
            while let Some(p) = self.tables[current].parent.as_ref().and_then(|p| index.get(p.table.as_str()))
            {
                if path.contains(p) {
                    let start = path.iter().position(|x| x == p).unwrap_or(0);
                    let mut names: Vec<&str> =
                        path[start..].iter().map(|&j| self.tables[j].name.as_str()).collect();
                    names.push(self.tables[*p].name.as_str());
                    return Err(format!("parent cycle: {}", names.join(" -> ")));
                }
                path.push(*p);
                current = *p;
            }
            depths.push(path.len());
        }
        let mut order: Vec<usize> = (0..self.tables.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(depths[i]));
        Ok(order)
    }

    /// The distinct data categories of the tables, in table order: what
    /// the system holds.
    pub fn categories(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in &self.tables {
            if !out.contains(&t.category) {
                out.push(t.category.clone());
            }
        }
        out
    }

    /// The configured table called `name`.
    pub fn table(&self, name: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name == name)
    }
}

impl TableConfig {
    fn check(&self, names: &HashSet<&str>, problems: &mut Vec<String>) {
        let t = &self.name;
        if !is_table_name(t) {
            problems.push(format!(
                "table name {t:?} is not a plain SQL name ([A-Za-z_][A-Za-z0-9_]*, optionally schema.table)"
            ));
        }
        let mut column = |what: &str, c: &str| {
            if !is_identifier(c) {
                problems.push(format!(
                    "table {t}: {what} {c:?} is not a plain SQL name ([A-Za-z_][A-Za-z0-9_]*)"
                ));
            }
        };
        column("primary_key", &self.primary_key);
        for m in self.matches.values() {
            column("match column", &m.column);
        }
        if let Some(p) = &self.parent {
            column("parent column", &p.column);
            column("parent references", &p.references);
        }
        for c in self.columns.keys() {
            column("column", c);
        }
        if let Some(d) = &self.date_column {
            column("date_column", d);
        }
        if let Some(p) = &self.parent {
            if p.table == *t {
                problems.push(format!("table {t} is its own parent"));
            } else if !names.contains(p.table.as_str()) {
                problems.push(format!("table {t}: parent table {:?} is not configured", p.table));
            }
        }
        if self.matches.is_empty() && self.parent.is_none() {
            problems.push(format!("table {t} has neither match nor parent: it could never match a subject"));
        }
        match self.action {
            TableAction::Delete if !self.columns.is_empty() => {
                problems.push(format!("table {t}: action delete takes no columns"));
            }
            TableAction::Anonymize if self.columns.is_empty() => {
                problems.push(format!("table {t}: action anonymize needs at least one column"));
            }
            TableAction::Anonymize if self.columns.contains_key(&self.primary_key) => {
                problems
                    .push(format!("table {t}: the primary key {} cannot be anonymized", self.primary_key));
            }
            _ => {}
        }
        // A row found by the subject's e-mail or phone number and
        // "anonymised" with it left in place is not anonymous, and
        // verification, which checks the configured columns, would not see
        // it. (A customer or device number may stay as a pseudonymous key,
        // often a NOT NULL one, once the record it points to is gone.)
        if self.action == TableAction::Anonymize {
            let direct = |k: &IdentifierKind| matches!(k, IdentifierKind::Email | IdentifierKind::Phone);
            for (kind, m) in self.matches.iter().filter(|(k, _)| direct(k)) {
                if m.column == self.primary_key {
                    // The primary key is never anonymised: the row would
                    // keep the very value it was found by.
                    problems.push(format!(
                        "table {t}: the match column {} (the subject's {kind}) is the primary key, which \
                         anonymize keeps; use action = \"delete\" for this table",
                        m.column
                    ));
                } else if !self.columns.contains_key(&m.column) {
                    problems.push(format!(
                        "table {t}: action anonymize would leave the match column {} (the subject's {kind}) \
                         as it is; give it a strategy, e.g. {} = \"null\"",
                        m.column, m.column
                    ));
                }
            }
        }
        if let Some(d) = self.date_column.as_ref().filter(|d| self.columns.contains_key(*d)) {
            problems.push(format!(
                "table {t}: the date_column {d} cannot be anonymized (it dates the retention)"
            ));
        }
        if self.category.trim().is_empty() {
            problems.push(format!("table {t}: category is empty"));
        }
        if self.batch_size == Some(0) {
            problems.push(format!("table {t}: batch_size must be at least 1"));
        }
    }

    /// Columns anonymised by a strategy computed row by row.
    pub fn per_row_columns(&self) -> impl Iterator<Item = (&String, &Strategy)> {
        self.columns.iter().filter(|(_, s)| s.is_per_row())
    }

    /// Columns anonymised by a set-based assignment (`null`, `fixed`).
    pub fn set_columns(&self) -> impl Iterator<Item = (&String, &Strategy)> {
        self.columns.iter().filter(|(_, s)| !s.is_per_row())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        url = "postgres://lethe@db/app"
        hash_key = "0123456789abcdef0123"

        [[tables]]
        name = "customers"
        action = "delete"
        category = "identity.contact"
        match = { email = "email", customer_id = "id", phone = { column = "phone", compare = "normalized" } }

        [[tables]]
        name = "addresses"
        action = "delete"
        category = "identity.contact"
        parent = { table = "customers", column = "customer_id", references = "id" }
        batch_size = 5000

        [[tables]]
        name = "crm.orders"
        primary_key = "order_id"
        action = "anonymize"
        category = "billing.order"
        date_column = "ordered_at"
        parent = { table = "customers", column = "customer_id", references = "id" }
        columns = { name = "null", address = { fixed = "REDACTED" }, customer_id = "null", note = "hash", phone = "redact" }
    "#;

    fn parse(s: &str) -> Result<SqlConfig, String> {
        toml::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn example_parses_with_defaults() {
        let c = parse(EXAMPLE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.max_connections, 4);
        assert_eq!(c.dialect(), Ok(Dialect::Postgres));
        let customers = &c.tables[0];
        assert_eq!(customers.primary_key, "id");
        assert_eq!(customers.category, "identity.contact");
        assert_eq!(customers.date_column, None);
        assert_eq!(customers.batch_size, None);
        assert_eq!(c.tables[1].batch_size, Some(5000));
        let email = &customers.matches[&IdentifierKind::Email];
        assert_eq!(
            (email.column.as_str(), email.compare_for(&IdentifierKind::Email)),
            ("email", Compare::Normalized)
        );
        let id = &customers.matches[&IdentifierKind::CustomerId];
        assert_eq!(id.compare_for(&IdentifierKind::CustomerId), Compare::Exact);
        assert_eq!(customers.matches[&IdentifierKind::Phone].compare, Some(Compare::Normalized));
        let orders = &c.tables[2];
        assert_eq!(orders.date_column.as_deref(), Some("ordered_at"));
        assert_eq!(c.categories(), vec!["identity.contact".to_owned(), "billing.order".to_owned()]);
        assert_eq!(orders.primary_key, "order_id");
        assert_eq!(orders.action, TableAction::Anonymize);
        assert_eq!(orders.columns["address"], Strategy::Fixed("REDACTED".into()));
        assert_eq!(orders.columns["note"], Strategy::Hash);
        assert_eq!(orders.columns["phone"], Strategy::Redact);
        assert_eq!(orders.columns["name"], Strategy::Null);
        assert_eq!(orders.per_row_columns().count(), 2);
        assert_eq!(orders.parent.as_ref().unwrap().references, "id");
        // Children first.
        assert_eq!(c.order().unwrap(), vec![1, 2, 0]);
        let debug = format!("{c:?}");
        assert!(!debug.contains("0123456789abcdef0123"), "{debug}");
    }

    #[test]
    fn custom_identifier_types_are_accepted() {
        let c = parse(
            r#"
            url = "sqlite:///tmp/x.db"
            [[tables]]
            name = "cards"
            action = "delete"
            category = "loyalty.card"
            match = { loyalty_number = "number" }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.tables[0].matches.contains_key(&IdentifierKind::Custom("loyalty_number".into())));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let top = format!("{EXAMPLE}\nextra = 1");
        assert!(parse(&top).unwrap_err().contains("extra"));
        let table = EXAMPLE.replace("category = \"identity.contact\"", "categroy = \"x\"");
        assert!(parse(&table).unwrap_err().contains("categroy"));
        let parent = EXAMPLE.replacen("references = \"id\"", "references = \"id\", on = \"x\"", 1);
        assert!(parse(&parent).is_err());
        let matched = EXAMPLE.replace("compare = \"normalized\"", "compare = \"normalized\", fuzzy = true");
        assert!(parse(&matched).unwrap_err().contains("fuzzy"));
        let compare = EXAMPLE.replace("compare = \"normalized\"", "compare = \"soundex\"");
        assert!(parse(&compare).is_err());
        let strategy = EXAMPLE.replace("note = \"hash\"", "note = \"shuffle\"");
        assert!(parse(&strategy).unwrap_err().contains("shuffle"));
        let action = EXAMPLE.replacen("action = \"delete\"", "action = \"truncate\"", 1);
        assert!(parse(&action).is_err());
        let kind = EXAMPLE.replace("customer_id = \"id\"", "\"Customer ID\" = \"id\"");
        assert!(parse(&kind).is_err());
        let uncategorized = EXAMPLE.replace("category = \"identity.contact\"", "");
        assert!(parse(&uncategorized).unwrap_err().contains("category"));
    }

    fn problems(edit: impl Fn(&mut SqlConfig)) -> String {
        let mut c = parse(EXAMPLE).unwrap();
        edit(&mut c);
        c.validate().unwrap_err()
    }

    #[test]
    fn validation_names_each_problem() {
        let p = problems(|c| c.tables[1].parent.as_mut().unwrap().table = "clients".into());
        assert!(p.contains("parent table \"clients\" is not configured"), "{p}");
        assert!(p.contains("addresses"), "{p}");

        let p = problems(|c| {
            c.tables[1].parent = None;
        });
        assert!(p.contains("addresses has neither match nor parent"), "{p}");

        let p = problems(|c| {
            c.tables[0].parent = Some(ParentConfig {
                table: "crm.orders".into(),
                column: "order_id".into(),
                references: "order_id".into(),
            })
        });
        assert!(p.contains("parent cycle"), "{p}");
        assert!(p.contains("customers -> crm.orders -> customers"), "{p}");

        let p = problems(|c| c.tables[2].columns.clear());
        assert!(p.contains("crm.orders: action anonymize needs at least one column"), "{p}");

        let p = problems(|c| {
            c.tables[0].columns.insert("name".into(), Strategy::Null);
        });
        assert!(p.contains("customers: action delete takes no columns"), "{p}");

        let p = problems(|c| c.tables[0].name = "customers; DROP TABLE x".into());
        assert!(p.contains("is not a plain SQL name"), "{p}");

        let p = problems(|c| {
            c.tables[2].columns.insert("bad-name".into(), Strategy::Null);
        });
        assert!(p.contains("column \"bad-name\""), "{p}");

        let p = problems(|c| c.hash_key = None);
        assert!(p.contains("hash_key is not set"), "{p}");

        let p = problems(|c| c.hash_key = Some("short".into()));
        assert!(p.contains("hash_key must be at least 16 bytes"), "{p}");

        let p = problems(|c| {
            let dup = c.tables[1].clone();
            c.tables.push(dup);
        });
        assert!(p.contains("table \"addresses\" is configured twice"), "{p}");

        let p = problems(|c| c.url = "oracle://db".into());
        assert!(p.contains("url must start with"), "{p}");

        let p = problems(|c| c.tables[1].parent.as_mut().unwrap().table = "addresses".into());
        assert!(p.contains("addresses is its own parent"), "{p}");

        let p = problems(|c| {
            c.tables[2].columns.insert("order_id".into(), Strategy::Hash);
        });
        assert!(p.contains("primary key order_id cannot be anonymized"), "{p}");

        let p = problems(|c| c.tables[1].category = " ".into());
        assert!(p.contains("addresses: category is empty"), "{p}");

        let p = problems(|c| c.tables[2].date_column = Some("ordered at".into()));
        assert!(p.contains("date_column \"ordered at\""), "{p}");

        let p = problems(|c| c.tables[1].batch_size = Some(0));
        assert!(p.contains("addresses: batch_size must be at least 1"), "{p}");

        let p = problems(|c| c.tables[2].date_column = Some("note".into()));
        assert!(p.contains("crm.orders: the date_column note cannot be anonymized"), "{p}");

        // Anonymised rows found by an identifier must not keep it.
        let p = problems(|c| {
            c.tables[2]
                .matches
                .insert(IdentifierKind::Email, MatchColumn { column: "email".into(), compare: None });
        });
        assert!(p.contains("crm.orders: action anonymize would leave the match column email"), "{p}");
        // Nor when that identifier is the primary key, which is never
        // anonymised: such a table can only be deleted from.
        let p = problems(|c| {
            let orders = &mut c.tables[2];
            orders.primary_key = "email".into();
            orders
                .matches
                .insert(IdentifierKind::Email, MatchColumn { column: "email".into(), compare: None });
        });
        assert!(
            p.contains("crm.orders: the match column email (the subject's email) is the primary key"),
            "{p}"
        );

        // Several problems at once are all reported.
        let p = problems(|c| {
            c.max_connections = 0;
            c.tables[2].columns.clear();
        });
        assert!(p.contains("max_connections") && p.contains("anonymize needs"), "{p}");
    }

    #[test]
    fn hash_key_is_optional_without_hash() {
        let mut c = parse(EXAMPLE).unwrap();
        c.tables[2].columns.insert("note".into(), Strategy::Redact);
        c.hash_key = None;
        c.validate().unwrap();
    }
}
