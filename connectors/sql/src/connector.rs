//! [`SqlConnector`]: erase, verify and health over one `AnyPool`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use lethe_connector::{Connector, ConnectorError, Erasure, ErasureTask};
use lethe_core::{DatasetReport, RetainedReport};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool, Row};

use crate::anonymize::Anonymizer;
use crate::batch::{Batcher, Change};
use crate::catalog::{configured_columns, Catalog, ColKind};
use crate::config::{SqlConfig, TableAction};
use crate::dialect::Dialect;
use crate::error::{classify, Context, POOL_TIMED_OUT};
use crate::query::{usable_values, Cond, Sql, Term};
use crate::retention::{count_kept, plan, report_kept, Scope, TablePlan, Until};
use crate::shared::{Group, Op, Shared, Subject};

/// How long to wait for a pooled connection before a retryable failure.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Identifier type → normalised values of the task.
type Ids = BTreeMap<String, Vec<String>>;

/// A connector for a SQL store declared table by table.
pub struct SqlConnector {
    config: Arc<SqlConfig>,
    dialect: Dialect,
    pool: AnyPool,
    /// Table indexes, children before parents.
    order: Vec<usize>,
    /// Column kinds, read on first use (or by `health`) and kept.
    catalog: RwLock<Option<Arc<Catalog>>>,
    /// Statements shared between concurrent tasks (PostgreSQL only).
    shared: Option<Shared>,
}

impl std::fmt::Debug for SqlConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlConnector").field("dialect", &self.dialect).field("config", &self.config).finish()
    }
}

impl SqlConnector {
    /// Validates `config` and prepares a lazy pool: nothing is connected
    /// until the first call, so a database that is down is a retryable
    /// failure of that call, not of start-up.
    pub async fn connect(config: SqlConfig) -> Result<Self, ConnectorError> {
        config
            .validate()
            .map_err(|e| ConnectorError::permanent(format!("invalid SQL connector configuration: {e}")))?;
        let dialect = config.dialect().map_err(ConnectorError::permanent)?;
        let order = config.order().map_err(ConnectorError::permanent)?;
        sqlx::any::install_default_drivers();
        let settings = Arc::new(dialect.session_settings(config.lock_timeout_secs));
        let pool = AnyPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _| {
                let settings = settings.clone();
                Box::pin(async move {
                    for statement in settings.iter() {
                        sqlx::Executor::execute(&mut *conn, statement.as_str()).await?;
                    }
                    Ok(())
                })
            })
            .connect_lazy(&dialect.driver_url(&config.url))
            .map_err(|e| classify(dialect, Context { op: "opening the pool", table: None }, &e))?;
        let config = Arc::new(config);
        let shared = (dialect == Dialect::Postgres).then(|| Shared::new(pool.clone(), config.clone()));
        Ok(Self { config, dialect, pool, order, catalog: RwLock::new(None), shared })
    }

    pub fn config(&self) -> &SqlConfig {
        &self.config
    }

    fn anonymizer<'a>(&'a self, catalog: &'a Catalog, i: usize, task: &'a ErasureTask) -> Anonymizer<'a> {
        Anonymizer {
            dialect: self.dialect,
            table: &self.config.tables[i],
            columns: &catalog.tables[i],
            hash_key: self.config.hash_key.as_deref(),
            subject: &task.identifiers,
        }
    }

    fn err(&self, op: &str, table: Option<&str>, e: &sqlx::Error) -> ConnectorError {
        classify(self.dialect, Context { op, table }, e)
    }

    async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, ConnectorError> {
        self.pool.acquire().await.map_err(|e| self.err("connecting", None, &e))
    }

    /// Why the pool had no connection to give: the pool keeps retrying a
    /// database it cannot reach until its time-out, and says no more, so
    /// one direct connection names the cause (refused, unknown host, bad
    /// password); if that one succeeds, every pooled connection is busy.
    async fn why_no_connection(&self) -> ConnectorError {
        use sqlx::Connection as _;
        let url = self.dialect.driver_url(&self.config.url);
        match tokio::time::timeout(ACQUIRE_TIMEOUT, AnyConnection::connect(&url)).await {
            Ok(Ok(mut conn)) => {
                // The pool's connections also run the session settings; one
                // the server refuses fails every new connection.
                for statement in self.dialect.session_settings(self.config.lock_timeout_secs) {
                    if let Err(e) = sqlx::Executor::execute(&mut conn, statement.as_str()).await {
                        let _ = conn.close().await;
                        let e = self.err("setting the lock time-out (lock_timeout_secs)", None, &e);
                        return ConnectorError { message: format!("no connection: {}", e.message), ..e };
                    }
                }
                let _ = conn.close().await;
                ConnectorError::retryable(format!(
                    "no connection: all {} pooled connections stayed busy for {} s (statements waiting \
                     on locks, or a max_connections too small for the worker's concurrency)",
                    self.config.max_connections,
                    ACQUIRE_TIMEOUT.as_secs()
                ))
            }
            Ok(Err(e)) => {
                let e = self.err("connecting", None, &e);
                ConnectorError { message: format!("no connection: {}", e.message), ..e }
            }
            Err(_) => ConnectorError::retryable(format!(
                "no connection: the database did not answer within {} s",
                ACQUIRE_TIMEOUT.as_secs()
            )),
        }
    }

    async fn catalog(&self) -> Result<Arc<Catalog>, ConnectorError> {
        if let Some(c) = self.catalog.read().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let mut conn = self.acquire().await?;
        let catalog = Arc::new(Catalog::load(&mut conn, self.dialect, &self.config).await?);
        self.remember(Some(catalog.clone()));
        Ok(catalog)
    }

    fn remember(&self, catalog: Option<Arc<Catalog>>) {
        if let Ok(mut slot) = self.catalog.write() {
            *slot = catalog;
        }
    }

    /// The subject condition of every table (`None`: matches nothing).
    fn conditions(&self, catalog: &Catalog, ids: &Ids) -> Vec<Option<Cond>> {
        (0..self.config.tables.len()).map(|i| self.cond_for(catalog, i, ids)).collect()
    }

    /// Whether the task gives an identifier of a type table `i` finds
    /// subjects by, itself or through its parent.
    fn searchable(&self, i: usize, ids: &Ids) -> bool {
        let t = &self.config.tables[i];
        t.matches.keys().any(|kind| ids.contains_key(kind.as_str()))
            || t.parent.as_ref().is_some_and(|p| {
                self.config
                    .tables
                    .iter()
                    .position(|x| x.name == p.table)
                    .is_some_and(|pi| self.searchable(pi, ids))
            })
    }

    /// Marks the reports of the tables with a directive that the task
    /// gives no identifier for.
    fn mark_unsearched(&self, datasets: &mut [DatasetReport], plans: &[Option<TablePlan<'_>>], ids: &Ids) {
        for (i, d) in datasets.iter_mut().enumerate() {
            if plans.get(i).is_some_and(Option::is_some) && !self.searchable(i, ids) {
                d.not_searched = true;
            }
        }
    }

    fn cond_for(&self, catalog: &Catalog, i: usize, ids: &Ids) -> Option<Cond> {
        let t = &self.config.tables[i];
        let mut terms = Vec::new();
        for (kind, m) in &t.matches {
            let Some(values) = ids.get(kind.as_str()) else {
                continue;
            };
            let compare = m.compare_for(kind);
            let col_kind = catalog.tables[i].kind(&m.column).unwrap_or(ColKind::Other);
            let values = usable_values(col_kind, compare, values.clone());
            if !values.is_empty() {
                terms.push(Term::Match { column: m.column.clone(), kind: col_kind, compare, values });
            }
        }
        if let Some(p) = &t.parent {
            let parent = self.config.tables.iter().position(|x| x.name == p.table);
            if let Some(cond) = parent.and_then(|pi| self.cond_for(catalog, pi, ids)) {
                terms.push(Term::Parent {
                    column: p.column.clone(),
                    table: p.table.clone(),
                    references: p.references.clone(),
                    cond,
                });
            }
        }
        (!terms.is_empty()).then_some(Cond { terms })
    }

    /// The statement `op` is for the task, when it can share it with other
    /// tasks (see [`crate::shared`]): one table with work, a set-based
    /// treatment, nothing kept, not batched, one identifier value matched
    /// on one column.
    fn shareable(
        &self,
        conds: &[Option<Cond>],
        plans: &[Option<TablePlan<'_>>],
        ids: &Ids,
        op: Op,
    ) -> Option<(usize, &Shared, Group, String)> {
        let shared = self.shared.as_ref()?;
        let mut work = conds.iter().zip(plans).enumerate().filter(|(_, (c, p))| c.is_some() && p.is_some());
        let (i, (Some(cond), Some(plan))) = work.next()? else { return None };
        let t = &self.config.tables[i];
        if work.next().is_some()
            || !self.one_statement(i, plan)
            || (op == Op::Erase && t.batch_size.is_some())
        {
            return None;
        }
        let [Term::Match { column, values, .. }] = cond.terms.as_slice() else { return None };
        let [value] = values.as_slice() else { return None };
        let (kind, _) = t.matches.iter().find(|(kind, m)| {
            m.column == *column && ids.get(kind.as_str()).is_some_and(|v| v.contains(value))
        })?;
        Some((i, shared, Group { op, table: i, kind: kind.clone() }, value.clone()))
    }

    /// Runs the task's part of a shared statement.
    async fn run_shared(
        &self,
        shared: &Shared,
        group: Group,
        value: String,
        catalog: Arc<Catalog>,
    ) -> Result<u64, ConnectorError> {
        let result = shared.run(group, Subject { value, catalog }).await;
        if result.is_err() {
            // Forget the catalog in case the schema changed under us.
            self.remember(None);
        }
        result
    }

    /// Erases in segments, children before parents: the tables between two
    /// batched tables share one transaction, committed before the next
    /// batched table starts; a batched table commits batch by batch.
    async fn erase_segments(
        &self,
        catalog: &Catalog,
        conds: &[Option<Cond>],
        plans: &[Option<TablePlan<'_>>],
        task: &ErasureTask,
        done: &mut Done,
    ) -> Result<(), ConnectorError> {
        let mut together: Vec<Table<'_, '_>> = Vec::new();
        for &index in &self.order {
            let (Some(cond), Some(plan)) = (&conds[index], &plans[index]) else { continue };
            let table = Table { index, cond, plan };
            match self.config.tables[index].batch_size {
                None => together.push(table),
                Some(size) => {
                    self.erase_together(catalog, &together, task, done).await?;
                    together.clear();
                    let mut conn = self.acquire().await?;
                    self.erase_table(&mut conn, catalog, table, Some(size), task, done).await?;
                    if task.wanted.withdrawn() {
                        // Stopped between batches: the tables after it
                        // are left as they are.
                        return Ok(());
                    }
                }
            }
        }
        self.erase_together(catalog, &together, task, done).await
    }

    /// Erases `tables` in one transaction.
    async fn erase_together(
        &self,
        catalog: &Catalog,
        tables: &[Table<'_, '_>],
        task: &ErasureTask,
        done: &mut Done,
    ) -> Result<(), ConnectorError> {
        if tables.is_empty() {
            return Ok(());
        }
        if matches!(tables, [t] if self.one_statement(t.index, t.plan)) {
            // Atomic by itself: BEGIN and COMMIT would only add round trips.
            let mut conn = self.acquire().await?;
            return self.erase_table(&mut conn, catalog, tables[0], None, task, done).await;
        }
        let mut tx = self.pool.begin().await.map_err(|e| self.err("begin transaction", None, &e))?;
        for &table in tables {
            // On an error, dropping the transaction rolls it back.
            self.erase_table(&mut tx, catalog, table, None, task, done).await?;
        }
        tx.commit().await.map_err(|e| self.err("commit", None, &e))
    }

    /// Whether erasing table `index` under `plan` is one statement: nothing
    /// kept (so no rows to count) and a treatment that is a single DELETE or
    /// an UPDATE whose new values do not depend on the row.
    fn one_statement(&self, index: usize, plan: &TablePlan<'_>) -> bool {
        let t = &self.config.tables[index];
        plan.kept.is_nothing()
            && match t.action {
                TableAction::Delete => true,
                TableAction::Anonymize => t.per_row_columns().next().is_none(),
            }
    }

    /// Applies one table's treatment, in batches of `batch` rows each
    /// committed on its own (`conn` outside any transaction) or as one
    /// statement in the caller's transaction, and reports what it did and
    /// what it keeps.
    async fn erase_table(
        &self,
        conn: &mut AnyConnection,
        catalog: &Catalog,
        table: Table<'_, '_>,
        batch: Option<u32>,
        task: &ErasureTask,
        done: &mut Done,
    ) -> Result<(), ConnectorError> {
        let Table { index: i, cond, plan } = table;
        let t = &self.config.tables[i];
        done.reached[i] = true;
        if !plan.keeps_all() {
            let scope = Scope { table: &t.name, cond, kept: Some(&plan.kept) };
            let changed = match batch {
                Some(size) => {
                    let batches = match t.action {
                        TableAction::Delete => {
                            let batcher = Batcher { dialect: self.dialect, table: &t.name, size };
                            batcher.run(conn, &Change::Delete, &scope, &task.wanted).await?
                        }
                        TableAction::Anonymize => {
                            self.anonymizer(catalog, i, task)
                                .run_batched(conn, &scope, size, &task.wanted)
                                .await?
                        }
                    };
                    tracing::debug!(
                        table = %t.name,
                        rows = batches.rows,
                        batches = batches.batches,
                        longest_batch_us = batches.longest.as_micros() as u64,
                        "batched table done"
                    );
                    batches.rows
                }
                None => match t.action {
                    TableAction::Delete => {
                        let mut sql = Sql::new(self.dialect);
                        sql.push("DELETE FROM ").ident(&t.name).push(" WHERE ").scope(&scope);
                        let result = sql
                            .query()
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| self.err("delete", Some(&t.name), &e))?;
                        result.rows_affected()
                    }
                    TableAction::Anonymize => self.anonymizer(catalog, i, task).run(conn, &scope).await?,
                },
            };
            match t.action {
                TableAction::Delete => done.datasets[i].deleted = changed,
                TableAction::Anonymize => done.datasets[i].anonymized = changed,
            }
        }
        let rows = count_kept(conn, self.dialect, &t.name, cond, &plan.kept)
            .await
            .map_err(|e| self.err("count kept rows", Some(&t.name), &e))?;
        let (reports, end) = report_kept(t, plan, &rows, task.issued_at, &done.kept);
        done.retained[i] = reports;
        done.kept[i] = (rows.own + rows.linked, end);
        tracing::debug!(
            table = %t.name,
            deleted = done.datasets[i].deleted,
            anonymized = done.datasets[i].anonymized,
            kept = done.kept[i].0,
            "table processed"
        );
        Ok(())
    }

    async fn verify_in(
        &self,
        conn: &mut AnyConnection,
        catalog: &Catalog,
        conds: &[Option<Cond>],
        plans: &[Option<TablePlan<'_>>],
        task: &ErasureTask,
    ) -> Result<u64, ConnectorError> {
        let mut residual = 0u64;
        for &i in &self.order {
            let (Some(cond), Some(plan)) = (&conds[i], &plans[i]) else { continue };
            if plan.keeps_all() {
                continue;
            }
            let t = &self.config.tables[i];
            let scope = Scope { table: &t.name, cond, kept: Some(&plan.kept) };
            let found = match t.action {
                TableAction::Anonymize => self.anonymizer(catalog, i, task).residual(conn, &scope).await?,
                TableAction::Delete => {
                    let mut sql = Sql::new(self.dialect);
                    sql.push("SELECT COUNT(*) FROM ").ident(&t.name).push(" WHERE ").scope(&scope);
                    let read = |e: sqlx::Error| self.err("verify", Some(&t.name), &e);
                    let row = sql.query().fetch_one(&mut *conn).await.map_err(read)?;
                    let n: i64 = row.try_get(0).map_err(read)?;
                    n.max(0) as u64
                }
            };
            if found > 0 {
                tracing::debug!(table = %t.name, residual = found, "rows left for the subject");
            }
            residual += found;
        }
        Ok(residual)
    }
}

/// One table a task works on: its index, the subject's condition there
/// and the table's plan.
#[derive(Clone, Copy)]
struct Table<'a, 'p> {
    index: usize,
    cond: &'a Cond,
    plan: &'a TablePlan<'p>,
}

/// What an erase has done so far, table by table (configured order).
struct Done {
    datasets: Vec<DatasetReport>,
    retained: Vec<Vec<RetainedReport>>,
    /// How many rows each table keeps, and until when.
    kept: Vec<(u64, Until)>,
    /// Whether the erase got to each table.
    reached: Vec<bool>,
}

impl Done {
    fn new(config: &SqlConfig) -> Self {
        let n = config.tables.len();
        Self {
            datasets: zeros(config),
            retained: vec![Vec::new(); n],
            kept: vec![(0, None); n],
            reached: vec![false; n],
        }
    }

    /// Drops the reports of the tables the erase never got to: after a
    /// stop part-way, a `deleted 0` would say they were searched and held
    /// nothing.
    fn only_reached(&mut self) {
        let mut reached = self.reached.iter();
        self.datasets.retain(|_| reached.next().copied().unwrap_or(false));
    }

    fn into_erasure(self) -> Erasure {
        Erasure { datasets: self.datasets, retained: self.retained.into_iter().flatten().collect() }
    }
}

/// A zero report for every table, in configured order.
fn zeros(config: &SqlConfig) -> Vec<DatasetReport> {
    config.tables.iter().map(|t| DatasetReport::new(t.name.clone(), 0, 0)).collect()
}

/// Whether some table both has a directive and can match the subject.
fn any_work(conds: &[Option<Cond>], plans: &[Option<TablePlan<'_>>]) -> bool {
    conds.iter().zip(plans).any(|(c, p)| c.is_some() && p.is_some())
}

fn identifiers(task: &ErasureTask) -> Ids {
    let mut ids = Ids::new();
    for id in &task.identifiers {
        let values = ids.entry(id.kind().as_str().to_owned()).or_default();
        let v = id.expose().to_owned();
        if !values.contains(&v) {
            values.push(v);
        }
    }
    ids
}

#[async_trait]
impl Connector for SqlConnector {
    async fn erase(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        self.explained(self.erase_now(task).await).await
    }

    async fn verify(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        self.explained(self.verify_now(task).await).await
    }

    async fn health(&self) -> Result<(), ConnectorError> {
        self.explained(self.health_now().await).await
    }
}

impl SqlConnector {
    /// A pool's time-out says no more than that: `result` with its cause.
    async fn explained<T>(&self, result: Result<T, ConnectorError>) -> Result<T, ConnectorError> {
        match result {
            Err(e) if e.message.ends_with(POOL_TIMED_OUT) => {
                let cause = self.why_no_connection().await;
                Err(ConnectorError { message: e.message.replace(POOL_TIMED_OUT, &cause.message), ..cause })
            }
            other => other,
        }
    }

    async fn erase_now(&self, task: &ErasureTask) -> Result<Erasure, ConnectorError> {
        let plans = plan(&self.config, &self.order, task)?;
        let catalog = self.catalog().await?;
        let ids = identifiers(task);
        let conds = self.conditions(&catalog, &ids);
        let mut done = Done::new(&self.config);
        self.mark_unsearched(&mut done.datasets, &plans, &ids);
        if !any_work(&conds, &plans) {
            tracing::debug!("no table both has a directive and can use the task's identifier types");
            return Ok(done.into_erasure());
        }
        if let Some((i, shared, group, value)) = self.shareable(&conds, &plans, &ids, Op::Erase) {
            let rows = self.run_shared(shared, group, value, catalog).await?;
            match self.config.tables[i].action {
                TableAction::Delete => done.datasets[i].deleted = rows,
                TableAction::Anonymize => done.datasets[i].anonymized = rows,
            }
            return Ok(done.into_erasure());
        }
        if let Err(e) = self.erase_segments(&catalog, &conds, &plans, task, &mut done).await {
            // Forget the catalog in case the schema changed under us.
            self.remember(None);
            return Err(e);
        }
        if task.wanted.withdrawn() {
            done.only_reached();
        }
        Ok(done.into_erasure())
    }

    async fn verify_now(&self, task: &ErasureTask) -> Result<u64, ConnectorError> {
        let plans = plan(&self.config, &self.order, task)?;
        let catalog = self.catalog().await?;
        let ids = identifiers(task);
        let conds = self.conditions(&catalog, &ids);
        if !any_work(&conds, &plans) {
            return Ok(0);
        }
        if let Some((_, shared, group, value)) = self.shareable(&conds, &plans, &ids, Op::Verify) {
            return self.run_shared(shared, group, value, catalog).await;
        }
        let mut conn = self.acquire().await?;
        let result = self.verify_in(&mut conn, &catalog, &conds, &plans, task).await;
        if result.is_err() {
            self.remember(None);
        }
        result
    }

    async fn health_now(&self) -> Result<(), ConnectorError> {
        let mut conn = self.acquire().await?;
        let catalog = Catalog::load(&mut conn, self.dialect, &self.config).await?;
        for t in &self.config.tables {
            let mut sql = Sql::new(self.dialect);
            sql.push("SELECT ");
            for (n, c) in configured_columns(t).into_iter().enumerate() {
                if n > 0 {
                    sql.push(", ");
                }
                sql.ident(c);
            }
            sql.push(" FROM ").ident(&t.name).push(" WHERE 1 = 0");
            sql.query()
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| self.err("health check", Some(&t.name), &e))?;
            if let Some(size) = t.batch_size {
                let privilege = match t.action {
                    TableAction::Delete => "DELETE",
                    TableAction::Anonymize => "UPDATE",
                };
                let batcher = Batcher { dialect: self.dialect, table: &t.name, size };
                batcher.check_partitions(&mut conn, privilege).await?;
            }
        }
        self.remember(Some(Arc::new(catalog)));
        Ok(())
    }
}
