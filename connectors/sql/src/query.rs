//! Building statements: configured names are quoted (they were validated at
//! load), values are always bound parameters.

use sqlx::any::{Any, AnyArguments};
use sqlx::query::Query;

use crate::catalog::ColKind;
use crate::config::Compare;
use crate::dialect::Dialect;

/// A bound value.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Param {
    Text(String),
    Int(i64),
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Parameters carry identifiers: never print them.
        f.write_str("Param([redacted])")
    }
}

/// SQL text and its parameters, in order.
#[derive(Debug)]
pub struct Sql {
    dialect: Dialect,
    text: String,
    params: Vec<Param>,
}

impl Sql {
    pub fn new(dialect: Dialect) -> Self {
        Self { dialect, text: String::with_capacity(256), params: Vec::new() }
    }

    pub fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    /// Appends a configured (validated) name, quoted.
    pub fn ident(&mut self, name: &str) -> &mut Self {
        let quoted = self.dialect.quote(name);
        self.push(&quoted)
    }

    /// Appends `qualifier.column` (or just `column`), quoted.
    pub fn column(&mut self, qualifier: Option<&str>, column: &str) -> &mut Self {
        if let Some(q) = qualifier {
            self.push(q).push(".");
        }
        self.ident(column)
    }

    /// Appends a placeholder bound to `param`.
    pub fn bind(&mut self, param: Param) -> &mut Self {
        self.params.push(param);
        let placeholder = self.dialect.placeholder(self.params.len());
        self.push(&placeholder)
    }

    /// Appends a value for a column of `kind`: `$n`, or `CAST($n AS uuid)`.
    pub fn bind_for(&mut self, kind: ColKind, param: Param) -> &mut Self {
        if kind == ColKind::Uuid && self.dialect == Dialect::Postgres {
            self.push("CAST(").bind(param).push(" AS uuid)")
        } else {
            self.bind(param)
        }
    }

    /// The SQL text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// A configured (validated) name, quoted.
    pub fn quoted(&self, name: &str) -> String {
        self.dialect.quote(name)
    }

    /// The statement, ready to run.
    pub fn query(&self) -> Query<'_, Any, AnyArguments<'_>> {
        let mut q = sqlx::query(&self.text);
        for p in &self.params {
            q = match p {
                Param::Text(s) => q.bind(s.as_str()),
                Param::Int(i) => q.bind(*i),
            };
        }
        q
    }
}

/// The parameter for comparing a column of `kind` with `value`, or `None`
/// if no row could hold that value (e.g. `abc` in an integer column).
pub fn param_for(kind: ColKind, value: &str) -> Option<Param> {
    match kind {
        ColKind::Integer => value.parse::<i64>().ok().map(Param::Int),
        ColKind::Uuid => is_uuid(value).then(|| Param::Text(value.to_owned())),
        ColKind::Text | ColKind::CollatedText | ColKind::Other => Some(Param::Text(value.to_owned())),
    }
}

fn is_uuid(value: &str) -> bool {
    let hex: String =
        value.trim_start_matches('{').trim_end_matches('}').chars().filter(|c| *c != '-').collect();
    hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())
}

/// Which rows of a table belong to the subject: the OR of its terms.
#[derive(Debug)]
pub struct Cond {
    pub terms: Vec<Term>,
}

#[derive(Debug)]
pub enum Term {
    /// `column` holds one of `values`.
    Match { column: String, kind: ColKind, compare: Compare, values: Vec<String> },
    /// `column IN (SELECT references FROM table WHERE cond)`.
    Parent { column: String, table: String, references: String, cond: Cond },
}

impl Sql {
    /// Appends `cond`; `qualifier` prefixes column names; `depth` numbers
    /// the aliases of nested sub-queries.
    pub fn cond(&mut self, cond: &Cond, qualifier: Option<&str>, depth: usize) -> &mut Self {
        self.push("(");
        for (i, term) in cond.terms.iter().enumerate() {
            if i > 0 {
                self.push(" OR ");
            }
            match term {
                Term::Match { column, kind, compare, values } => {
                    self.match_term(qualifier, column, *kind, *compare, values)
                }
                Term::Parent { column, table, references, cond } => {
                    let alias = format!("p{}", depth + 1);
                    self.column(qualifier, column).push(" IN (SELECT ");
                    self.column(Some(&alias), references).push(" FROM ").ident(table);
                    self.push(" AS ").push(&alias).push(" WHERE ");
                    self.cond(cond, Some(&alias), depth + 1).push(")")
                }
            };
        }
        self.push(")")
    }

    fn match_term(
        &mut self,
        qualifier: Option<&str>,
        column: &str,
        kind: ColKind,
        compare: Compare,
        values: &[String],
    ) -> &mut Self {
        let target = match_target(self.dialect, qualifier, column, kind, compare);
        let params: Vec<Param> = values.iter().filter_map(|v| match_param(kind, compare, v)).collect();
        let list = |sql: &mut Self, target: &str| {
            sql.push(target).push(" IN (");
            for (i, p) in params.iter().enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.bind_match(kind, compare, p.clone());
            }
            sql.push(")");
        };
        let Some(bytes) = byte_wise(self.dialect, &target, kind, compare) else {
            list(self, &target);
            return self;
        };
        self.push("(");
        list(self, &target);
        self.push(" AND ");
        list(self, &bytes);
        self.push(")")
    }

    /// Appends the placeholder of a parameter made by [`match_param`].
    pub fn bind_match(&mut self, kind: ColKind, compare: Compare, param: Param) -> &mut Self {
        match compare {
            Compare::Normalized => self.bind(param),
            Compare::Exact => self.bind_for(kind, param),
        }
    }
}

/// The expression a match compares with the subject's values: the column,
/// read as text (and normalised) where the comparison needs it.
pub fn match_target(
    dialect: Dialect,
    qualifier: Option<&str>,
    column: &str,
    kind: ColKind,
    compare: Compare,
) -> String {
    let mut column_sql = Sql::new(dialect);
    column_sql.column(qualifier, column);
    let column_sql = column_sql.text;
    match compare {
        Compare::Normalized => {
            let text = if matches!(kind, ColKind::Text | ColKind::CollatedText) {
                column_sql
            } else {
                dialect.as_text(&column_sql)
            };
            format!("LOWER(TRIM({text}))")
        }
        Compare::Exact if kind == ColKind::Other => dialect.as_text(&column_sql),
        Compare::Exact => column_sql,
    }
}

/// `target` compared byte for byte, where the column's collation could
/// take another person's value for the subject's: MySQL's and MariaDB's
/// usual collations (`utf8mb4_*_ci`) take `AB12` for `ab12` and `josé` for
/// `jose`, a SQLite column may be declared `COLLATE NOCASE`, a PostgreSQL
/// one may have a non-deterministic collation (the catalog tells:
/// [`ColKind::CollatedText`]). The collated comparison stays beside
/// it, so that the column's index still finds the candidates. `None` where
/// the comparison is byte-wise already (integers; on SQLite, values read
/// through a function, `LOWER(TRIM(…))`; on PostgreSQL, deterministic
/// collations).
pub fn byte_wise(dialect: Dialect, target: &str, kind: ColKind, compare: Compare) -> Option<String> {
    match dialect {
        Dialect::MySql if compare == Compare::Normalized || kind != ColKind::Integer => {
            Some(format!("CAST({target} AS BINARY)"))
        }
        // `LOWER(TRIM(column))` is not a column: SQLite compares it with
        // BINARY whatever the column's collation. `CAST(column AS TEXT)`
        // still is, and keeps the column's collation.
        Dialect::Sqlite if compare == Compare::Exact && matches!(kind, ColKind::Text | ColKind::Other) => {
            Some(format!("{target} COLLATE BINARY"))
        }
        // Functions keep the column's collation on PostgreSQL.
        Dialect::Postgres if kind == ColKind::CollatedText => Some(format!("{target} COLLATE \"C\"")),
        _ => None,
    }
}

/// The parameter `value` is compared as, or `None` if no row could hold it.
pub fn match_param(kind: ColKind, compare: Compare, value: &str) -> Option<Param> {
    match compare {
        Compare::Normalized => Some(Param::Text(value.trim().to_lowercase())),
        Compare::Exact => param_for(kind, value),
    }
}

/// Values of `kind` that can appear in a column of `col_kind` under `compare`.
pub fn usable_values(col_kind: ColKind, compare: Compare, values: Vec<String>) -> Vec<String> {
    match compare {
        Compare::Normalized => values,
        Compare::Exact => values.into_iter().filter(|v| param_for(col_kind, v).is_some()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Cond {
        Cond {
            terms: vec![Term::Parent {
                column: "customer_id".into(),
                table: "customers".into(),
                references: "id".into(),
                cond: Cond {
                    terms: vec![
                        Term::Match {
                            column: "email".into(),
                            kind: ColKind::Text,
                            compare: Compare::Normalized,
                            values: vec!["A@x.io".into()],
                        },
                        Term::Match {
                            column: "id".into(),
                            kind: ColKind::Integer,
                            compare: Compare::Exact,
                            values: vec!["7".into(), "8".into()],
                        },
                    ],
                },
            }],
        }
    }

    #[test]
    fn renders_placeholders_per_dialect() {
        let mut pg = Sql::new(Dialect::Postgres);
        pg.push("DELETE FROM ").ident("orders").push(" WHERE ").cond(&sample(), None, 0);
        assert_eq!(
            pg.text(),
            "DELETE FROM \"orders\" WHERE (\"customer_id\" IN (SELECT p1.\"id\" FROM \"customers\" AS p1 WHERE \
             (LOWER(TRIM(p1.\"email\")) IN ($1) OR p1.\"id\" IN ($2, $3))))"
        );
        assert_eq!(pg.params, vec![Param::Text("a@x.io".into()), Param::Int(7), Param::Int(8)]);

        let mut my = Sql::new(Dialect::MySql);
        my.cond(&sample(), None, 0);
        // Text is compared under the collation (for the index) and byte for
        // byte (for the right person); integers only once.
        assert!(
            my.text().contains(
                "((LOWER(TRIM(p1.`email`)) IN (?) AND CAST(LOWER(TRIM(p1.`email`)) AS BINARY) IN (?)) \
                 OR p1.`id` IN (?, ?))"
            ),
            "{}",
            my.text()
        );
        assert_eq!(
            my.params,
            vec![Param::Text("a@x.io".into()), Param::Text("a@x.io".into()), Param::Int(7), Param::Int(8)]
        );
    }

    #[test]
    fn values_that_cannot_match_are_dropped() {
        assert_eq!(param_for(ColKind::Integer, "1 OR 1=1"), None);
        assert_eq!(param_for(ColKind::Integer, "42"), Some(Param::Int(42)));
        assert_eq!(param_for(ColKind::Uuid, "nope"), None);
        assert!(param_for(ColKind::Uuid, "0190f0b8-3c2a-7cc1-9d55-0a4c1e0e7f3b").is_some());
        assert_eq!(
            usable_values(ColKind::Integer, Compare::Exact, vec!["x".into(), "3".into()]),
            vec!["3".to_owned()]
        );
        assert_eq!(format!("{:?}", Param::Text("secret@x.io".into())), "Param([redacted])");
    }
}
