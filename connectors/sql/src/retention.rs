//! What a task's directives mean for each table: which of the subject's rows
//! are kept now (by the directive of the table's category, or because a kept
//! row of a child table links to them), and how kept rows are reported.
//!
//! Dates are compared as epoch seconds ([`Dialect::epoch`]) with bound
//! integers, since the `Any` driver binds and decodes no date type.
//!
//! [`Dialect::epoch`]: crate::Dialect::epoch

use chrono::{DateTime, Utc};
use lethe_connector::{ConnectorError, ErasureTask};
use lethe_core::{Action, Directive, RetainedReport};
use sqlx::{AnyConnection, Row};

use crate::config::{SqlConfig, TableAction, TableConfig};
use crate::dialect::Dialect;
use crate::query::{Cond, Param, Sql};

/// The rows a table keeps by its own directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// None: every matching row gets the table's treatment.
    Nothing,
    /// All of them (a hold, or a retention not over for undated rows).
    All,
    /// Rows whose `column` is after `cutoff` (epoch seconds), and rows
    /// without a date (NULL) when `undated`.
    Dated { column: String, cutoff: i64, undated: bool },
}

impl Keep {
    /// What `directive` keeps of a table dated by `date_column`, as of the
    /// task's `issued_at`.
    pub fn of(directive: &Directive, date_column: Option<&str>, issued_at: DateTime<Utc>) -> Self {
        match directive.action {
            Action::Erase | Action::Anonymize => Self::Nothing,
            Action::Hold => Self::All,
            Action::Retain => {
                // Undated rows go once the retention counted from the
                // request is over; without an end, they stay.
                let undated = directive.until.is_none_or(|until| issued_at < until);
                match (date_column, directive.cutoff) {
                    (Some(column), Some(cutoff)) => {
                        Self::Dated { column: column.to_owned(), cutoff: cutoff.timestamp(), undated }
                    }
                    _ if undated => Self::All,
                    _ => Self::Nothing,
                }
            }
        }
    }
}

/// The rows of a table that are kept: its own, and those a kept row of a
/// child table references.
#[derive(Debug, Clone)]
pub struct Kept {
    pub own: Keep,
    pub links: Vec<Link>,
}

impl Kept {
    pub fn is_nothing(&self) -> bool {
        self.own == Keep::Nothing && self.links.is_empty()
    }
}

/// A child table with rows that may be kept, and how they reference the
/// parent.
#[derive(Debug, Clone)]
pub struct Link {
    /// The child table's index in the configuration.
    pub index: usize,
    pub table: String,
    /// The child's column holding the reference.
    pub column: String,
    /// The referenced column of the parent.
    pub references: String,
    pub kept: Kept,
}

/// What a task asks of one table that has a directive.
#[derive(Debug, Clone)]
pub struct TablePlan<'a> {
    pub directive: &'a Directive,
    pub kept: Kept,
}

impl TablePlan<'_> {
    /// Whether every matching row is kept: nothing to erase or verify.
    pub fn keeps_all(&self) -> bool {
        self.kept.own == Keep::All
    }
}

/// The plan of every table, index for index (`None`: no directive, the
/// table is left untouched). `order` lists children before parents. An
/// `anonymize` directive for a `delete` table is a permanent error.
pub fn plan<'a>(
    config: &SqlConfig,
    order: &[usize],
    task: &'a ErasureTask,
) -> Result<Vec<Option<TablePlan<'a>>>, ConnectorError> {
    let mut plans: Vec<Option<TablePlan<'a>>> = vec![None; config.tables.len()];
    for &i in order {
        let t = &config.tables[i];
        let Some(directive) = task.directive(&t.category) else {
            continue;
        };
        if directive.action == Action::Anonymize && t.action == TableAction::Delete {
            return Err(ConnectorError::permanent(format!(
                "table {}: category {} is to be anonymized, but the table's action is delete; \
                 nothing was done",
                t.name, t.category
            )));
        }
        let own = Keep::of(directive, t.date_column.as_deref(), task.issued_at);
        let links = config
            .tables
            .iter()
            .enumerate()
            .filter_map(|(j, c)| {
                let p = c.parent.as_ref().filter(|p| p.table == t.name)?;
                let kept = &plans[j].as_ref()?.kept;
                (!kept.is_nothing()).then(|| Link {
                    index: j,
                    table: c.name.clone(),
                    column: p.column.clone(),
                    references: p.references.clone(),
                    kept: kept.clone(),
                })
            })
            .collect();
        plans[i] = Some(TablePlan { directive, kept: Kept { own, links } });
    }
    Ok(plans)
}

/// The rows a statement works on: the subject's rows of `table` (`cond`)
/// except the kept ones.
pub struct Scope<'a> {
    pub table: &'a str,
    pub cond: &'a Cond,
    pub kept: Option<&'a Kept>,
}

impl Sql {
    /// Appends the scope's predicate.
    pub fn scope(&mut self, scope: &Scope<'_>) -> &mut Self {
        let qualifier = self.quoted(scope.table);
        self.scope_as(scope, &qualifier)
    }

    /// Appends the scope's predicate for a statement in which the table's
    /// row is called `qualifier` (an alias, or the quoted table name).
    pub fn scope_as(&mut self, scope: &Scope<'_>, qualifier: &str) -> &mut Self {
        self.cond(scope.cond, None, 0);
        if let Some(kept) = scope.kept.filter(|k| !k.is_nothing()) {
            self.push(" AND NOT ").kept(kept, qualifier, 0);
        }
        self
    }

    /// Appends a predicate, never NULL, true for the rows `kept` keeps;
    /// `qualifier` names the table's row, `depth` numbers the aliases of
    /// nested sub-queries.
    pub fn kept(&mut self, kept: &Kept, qualifier: &str, depth: usize) -> &mut Self {
        self.push("(");
        let own = kept.own != Keep::Nothing;
        if own {
            self.keep(&kept.own, qualifier);
        }
        if !kept.links.is_empty() {
            if own {
                self.push(" OR ");
            }
            self.links(&kept.links, qualifier, depth);
        }
        if !own && kept.links.is_empty() {
            self.push("1 = 0");
        }
        self.push(")")
    }

    /// Appends a predicate, never NULL, true for the rows `keep` keeps.
    pub fn keep(&mut self, keep: &Keep, qualifier: &str) -> &mut Self {
        match keep {
            Keep::Nothing => self.push("(1 = 0)"),
            Keep::All => self.push("(1 = 1)"),
            Keep::Dated { column, cutoff, undated } => {
                let epoch = self.epoch_of(qualifier, column);
                self.push("(").push(&epoch);
                if *undated {
                    self.push(" IS NULL OR ");
                } else {
                    self.push(" IS NOT NULL AND ");
                }
                self.push(&epoch).push(" > ").bind(Param::Int(*cutoff)).push(")")
            }
        }
    }

    /// Appends `(EXISTS (kept child row referencing this row) OR ...)`.
    pub fn links(&mut self, links: &[Link], qualifier: &str, depth: usize) -> &mut Self {
        let alias = format!("k{}", depth + 1);
        self.push("(");
        for (n, link) in links.iter().enumerate() {
            if n > 0 {
                self.push(" OR ");
            }
            self.push("EXISTS (SELECT 1 FROM ").ident(&link.table).push(" AS ").push(&alias);
            self.push(" WHERE ").column(Some(&alias), &link.column).push(" = ");
            self.column(Some(qualifier), &link.references).push(" AND ");
            self.kept(&link.kept, &alias, depth + 1).push(")");
        }
        self.push(")")
    }

    /// The epoch seconds of `qualifier.column`.
    pub fn epoch_of(&self, qualifier: &str, column: &str) -> String {
        let mut target = Sql::new(self.dialect());
        target.column(Some(qualifier), column);
        self.dialect().epoch(target.text())
    }
}

/// Kept rows of one table, as counted after its treatment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeptRows {
    /// Rows kept by the table's own directive.
    pub own: u64,
    /// Of those, rows with a date; `min_epoch` and `max_epoch` are the
    /// earliest and the latest date.
    pub dated: u64,
    pub min_epoch: Option<i64>,
    pub max_epoch: Option<i64>,
    /// Further rows kept because kept child rows reference them.
    pub linked: u64,
}

/// Counts what `kept` keeps of the subject's rows of `table` (`cond`).
pub async fn count_kept(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    cond: &Cond,
    kept: &Kept,
) -> Result<KeptRows, sqlx::Error> {
    let qualifier = dialect.quote(table);
    let mut rows = KeptRows::default();
    if kept.own != Keep::Nothing {
        let mut sql = Sql::new(dialect);
        sql.push("SELECT COUNT(*)");
        if let Keep::Dated { column, .. } = &kept.own {
            let epoch = sql.epoch_of(&qualifier, column);
            sql.push(", COUNT(")
                .push(&epoch)
                .push("), MAX(")
                .push(&epoch)
                .push("), MIN(")
                .push(&epoch)
                .push(")");
        }
        sql.push(" FROM ").ident(table).push(" WHERE ").cond(cond, None, 0);
        sql.push(" AND ").keep(&kept.own, &qualifier);
        let row = sql.query().fetch_one(&mut *conn).await?;
        rows.own = count(row.try_get(0)?);
        if matches!(kept.own, Keep::Dated { .. }) {
            rows.dated = count(row.try_get(1)?);
            rows.max_epoch = row.try_get(2)?;
            rows.min_epoch = row.try_get(3)?;
        }
    }
    if !kept.links.is_empty() && kept.own != Keep::All {
        let mut sql = Sql::new(dialect);
        sql.push("SELECT COUNT(*) FROM ").ident(table).push(" WHERE ").cond(cond, None, 0);
        if kept.own != Keep::Nothing {
            sql.push(" AND NOT ").keep(&kept.own, &qualifier);
        }
        sql.push(" AND ").links(&kept.links, &qualifier, 0);
        let row = sql.query().fetch_one(&mut *conn).await?;
        rows.linked = count(row.try_get(0)?);
    }
    Ok(rows)
}

fn count(n: i64) -> u64 {
    n.max(0) as u64
}

/// When kept rows may go: `None` is no end (a hold).
pub type Until = Option<DateTime<Utc>>;

/// The later of two ends, `None` (no end) being the latest.
fn later(a: Until, b: Until) -> Until {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

/// The end of a row dated `epoch` kept under `directive`.
fn end_of(directive: &Directive, issued_at: DateTime<Utc>, epoch: i64) -> DateTime<Utc> {
    let date = DateTime::from_timestamp(epoch, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
    match directive.period {
        Some(period) => period.add_to(date),
        // No period given: the span between the cutoff and the task.
        None => date
            .checked_add_signed(issued_at - directive.cutoff.unwrap_or(issued_at))
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    }
}

/// The end of the rows a table keeps by its own directive.
fn own_until(directive: &Directive, issued_at: DateTime<Utc>, rows: &KeptRows) -> Until {
    if directive.action != Action::Retain {
        return None;
    }
    let dated = rows.max_epoch.filter(|_| rows.dated > 0).map(|max| end_of(directive, issued_at, max));
    match (dated, rows.own > rows.dated) {
        (Some(d), true) => later(Some(d), directive.until),
        (Some(d), false) => Some(d),
        (None, _) => directive.until,
    }
}

/// When the first of the rows a table keeps by its own directive may go,
/// if that is before `until` (the last's end): rows of different dates end
/// at different times, and none should wait for the last.
fn own_first_until(directive: &Directive, issued_at: DateTime<Utc>, rows: &KeptRows, until: Until) -> Until {
    if directive.action != Action::Retain {
        return None;
    }
    let dated = rows.min_epoch.filter(|_| rows.dated > 0).map(|min| end_of(directive, issued_at, min));
    let undated = directive.until.filter(|_| rows.own > rows.dated);
    let first = dated.into_iter().chain(undated).min();
    first.filter(|f| until.is_some_and(|u| *f < u))
}

/// The reports of the rows `table` keeps (`rows`), and the end of the
/// last of them. `kept` holds, per table, the count and end of the rows
/// already kept (children come first).
pub fn report_kept(
    table: &TableConfig,
    plan: &TablePlan<'_>,
    rows: &KeptRows,
    issued_at: DateTime<Utc>,
    kept: &[(u64, Until)],
) -> (Vec<RetainedReport>, Until) {
    let mut reports = Vec::new();
    // `None`: nothing kept yet.
    let mut end: Option<Until> = None;
    if rows.own > 0 {
        let until = own_until(plan.directive, issued_at, rows);
        let first = own_first_until(plan.directive, issued_at, rows, until);
        reports.push(own_report(&table.name, &table.category, plan.directive, rows.own, (until, first)));
        end = Some(until);
    }
    if rows.linked > 0 {
        let mut pinning: Vec<&Link> = plan.kept.links.iter().filter(|l| kept[l.index].0 > 0).collect();
        if pinning.is_empty() {
            pinning = plan.kept.links.iter().collect();
        }
        let until = pinning.iter().map(|l| kept[l.index].1).reduce(later).flatten();
        let children: Vec<&str> = pinning.iter().map(|l| l.table.as_str()).collect();
        reports.push(linked_report(&table.name, &table.category, &children, rows.linked, until));
        end = Some(end.map_or(until, |e| later(e, until)));
    }
    (reports, end.flatten())
}

/// The report of the rows a table keeps by its own directive.
fn own_report(
    table: &str,
    category: &str,
    directive: &Directive,
    count: u64,
    (until, first_until): (Until, Until),
) -> RetainedReport {
    let fallback = if directive.action == Action::Hold { "legal hold" } else { "retention policy" };
    RetainedReport {
        dataset: table.to_owned(),
        category: Some(category.to_owned()),
        count,
        basis: directive.basis.clone().unwrap_or_else(|| fallback.to_owned()),
        until,
        first_until,
    }
}

/// The report of the rows a table keeps because kept rows of `children`
/// reference them.
fn linked_report(table: &str, category: &str, children: &[&str], count: u64, until: Until) -> RetainedReport {
    RetainedReport {
        dataset: table.to_owned(),
        category: Some(category.to_owned()),
        count,
        basis: format!("kept while linked records in {} are kept", children.join(", ")),
        until,
        first_until: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ColKind;
    use crate::config::Compare;
    use crate::query::Term;
    use chrono::TimeZone;
    use lethe_core::Period;

    fn directive(action: Action) -> Directive {
        Directive {
            category: "billing.invoice".into(),
            action,
            basis: None,
            period: None,
            cutoff: None,
            until: None,
        }
    }

    fn at(y: i32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn keep_follows_the_directive() {
        let now = at(2030);
        assert_eq!(Keep::of(&directive(Action::Erase), Some("d"), now), Keep::Nothing);
        assert_eq!(Keep::of(&directive(Action::Hold), Some("d"), now), Keep::All);
        let mut retain = directive(Action::Retain);
        retain.until = Some(at(2031));
        assert_eq!(Keep::of(&retain, Some("d"), now), Keep::All, "no cutoff: counted from the request");
        retain.cutoff = Some(at(2020));
        assert_eq!(
            Keep::of(&retain, Some("d"), now),
            Keep::Dated { column: "d".into(), cutoff: at(2020).timestamp(), undated: true }
        );
        assert_eq!(Keep::of(&retain, None, now), Keep::All);
        assert_eq!(Keep::of(&retain, None, at(2031)), Keep::Nothing, "until reached");
        assert_eq!(
            Keep::of(&retain, Some("d"), at(2031)),
            Keep::Dated { column: "d".into(), cutoff: at(2020).timestamp(), undated: false }
        );
    }

    #[test]
    fn until_is_the_later_of_dated_and_undated_and_the_first_end_is_kept_too() {
        let mut retain = directive(Action::Retain);
        retain.period = Some(Period::Months(120));
        retain.cutoff = Some(at(2020));
        retain.until = Some(at(2035));
        let rows = KeptRows {
            own: 2,
            dated: 2,
            min_epoch: Some(at(2021).timestamp()),
            max_epoch: Some(at(2024).timestamp()),
            linked: 0,
        };
        assert_eq!(own_until(&retain, at(2030), &rows), Some(at(2034)));
        // The row of 2021 goes in 2031, before the last: the first end.
        let until = own_until(&retain, at(2030), &rows);
        assert_eq!(own_first_until(&retain, at(2030), &rows, until), Some(at(2031)));
        let mixed = KeptRows { own: 3, ..rows };
        assert_eq!(own_until(&retain, at(2030), &mixed), Some(at(2035)));
        let undated = KeptRows { own: 1, dated: 0, min_epoch: None, max_epoch: None, linked: 0 };
        let until = own_until(&retain, at(2030), &undated);
        assert_eq!(until, Some(at(2035)));
        assert_eq!(own_first_until(&retain, at(2030), &undated, until), None, "one end: no first");
        assert_eq!(own_until(&directive(Action::Hold), at(2030), &undated), None);
        assert_eq!(later(Some(at(2030)), Some(at(2031))), Some(at(2031)));
        assert_eq!(later(Some(at(2030)), None), None);
    }

    #[test]
    fn renders_kept_rows_and_links() {
        let cond = Cond {
            terms: vec![Term::Match {
                column: "email".into(),
                kind: ColKind::Text,
                compare: Compare::Exact,
                values: vec!["a@x.io".into()],
            }],
        };
        let invoices = Kept {
            own: Keep::Dated { column: "issued_on".into(), cutoff: 100, undated: false },
            links: vec![],
        };
        let accounts = Kept {
            own: Keep::Nothing,
            links: vec![Link {
                index: 1,
                table: "invoices".into(),
                column: "account_id".into(),
                references: "id".into(),
                kept: invoices,
            }],
        };
        let mut sql = Sql::new(Dialect::Postgres);
        sql.push("DELETE FROM ").ident("accounts").push(" WHERE ");
        sql.scope(&Scope { table: "accounts", cond: &cond, kept: Some(&accounts) });
        let epoch = Dialect::Postgres.epoch("k1.\"issued_on\"");
        assert_eq!(
            sql.text(),
            format!(
                "DELETE FROM \"accounts\" WHERE (\"email\" IN ($1)) AND NOT ((EXISTS (SELECT 1 FROM \
                 \"invoices\" AS k1 WHERE k1.\"account_id\" = \"accounts\".\"id\" AND (({epoch} IS NOT NULL \
                 AND {epoch} > $2)))))"
            )
        );
    }
}
