//! Due-date alerts: each request that is not answered is announced once as
//! due soon and once as overdue, with an audit event in the transaction
//! that marks it, so that two coordinator replicas never both raise one.

use chrono::{DateTime, Utc};
use lethe_core::RequestId;
use serde_json::json;

use super::{col, db_err, ms, parse, time, SqlStore};
use crate::audit::PendingEvent;
use crate::dialect::{key_list, Keys};
use crate::types::{DueAlert, DueAlerts};
use crate::StoreError;

/// Statuses of requests that still await an answer (a failed request
/// waits for an operator).
const UNANSWERED: &str = "status IN ('received', 'in_progress', 'failed')";

/// The requests owed a due-date alert, oldest first: `$1` the end of the
/// "due soon" window, `$2` the due-soon mark, `$3` now, `$4` how many. The
/// `requests_unanswered` index (migration 0015) holds exactly the rows of
/// [`UNANSWERED`], so the sweep never walks answered requests.
fn due_alerts_statement(dialect: crate::dialect::Dialect) -> String {
    format!(
        "SELECT id, due_at FROM requests WHERE {UNANSWERED} AND due_at < $1 \
         AND (due_alert IS NULL OR (due_alert = $2 AND due_at <= $3)) ORDER BY id LIMIT $4{}",
        dialect.skip_locked()
    )
}

impl SqlStore {
    pub(super) async fn due_alerts(
        &self,
        now: DateTime<Utc>,
        soon: std::time::Duration,
        limit: u32,
    ) -> Result<DueAlerts, StoreError> {
        let soon_ms = ms(now) + i64::try_from(soon.as_millis()).unwrap_or(i64::MAX / 4);
        let mut tx = self.begin().await?;
        // Requests owed an alert: within the window and not yet announced,
        // or past the date and not yet announced as overdue. Rows are
        // locked in id order, as every writer of requests does; one that
        // another transaction holds is left for the next sweep.
        let rows = sqlx::query(&due_alerts_statement(self.dialect))
            .bind(soon_ms)
            .bind(DueAlert::DueSoon.as_str())
            .bind(ms(now))
            .bind(i64::from(limit.max(1)))
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let mut alerts = DueAlerts::default();
        let mut events = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: RequestId = parse(&col::<String>(r, "id")?, "request id")?;
            let due_at = time(col(r, "due_at")?)?;
            // A request first found past its date is announced as overdue
            // only.
            let kind = if due_at <= now { DueAlert::Overdue } else { DueAlert::DueSoon };
            events.push(PendingEvent::new(id, None, kind.audit_kind(), json!({ "due_at": due_at })));
            match kind {
                DueAlert::Overdue => alerts.overdue.push(id),
                DueAlert::DueSoon => alerts.due_soon.push(id),
            }
        }
        for (kind, ids) in [(DueAlert::Overdue, &alerts.overdue), (DueAlert::DueSoon, &alerts.due_soon)] {
            if ids.is_empty() {
                continue;
            }
            sqlx::query(&format!(
                "UPDATE requests SET due_alert = $1 WHERE {}",
                self.dialect.in_keys("id", 2, Keys::Text)
            ))
            .bind(kind.as_str())
            .bind(key_list(ids.iter().map(ToString::to_string)))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        self.append_audit(&mut tx, events, now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(alerts)
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{Executor, Row};

    use super::*;

    /// However many requests were answered, the sweep reads the open ones
    /// through the index of migration 0015, not down the primary key.
    #[tokio::test]
    async fn postgres_due_alerts_read_only_the_open_requests() {
        let mut conn = crate::dialect::tests::postgres().await;
        let migration = include_str!("../../migrations/postgres/0015_open_requests_and_one_current_key.sql");
        let index =
            migration.lines().find(|l| l.starts_with("CREATE INDEX requests_unanswered")).expect("the index");
        conn.execute(
            "CREATE TEMP TABLE requests (id TEXT PRIMARY KEY, status TEXT NOT NULL, due_at BIGINT NOT NULL, \
               due_alert TEXT); \
             INSERT INTO requests SELECT lpad(g::text, 8, '0'), \
               CASE WHEN g % 5000 = 0 THEN 'in_progress' ELSE 'completed' END, g, NULL \
               FROM generate_series(1, 200000) g",
        )
        .await
        .unwrap();
        conn.execute(index).await.unwrap();
        conn.execute("ANALYZE requests").await.unwrap();
        let rows =
            sqlx::query(&format!("EXPLAIN {}", due_alerts_statement(crate::dialect::Dialect::Postgres)))
                .bind(i64::MAX)
                .bind("due_soon")
                .bind(0i64)
                .bind(500i64)
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let plan = rows.iter().map(|r| r.get::<String, _>(0)).collect::<Vec<_>>().join("\n");
        assert!(plan.contains("requests_unanswered") && !plan.contains("requests_pkey"), "{plan}");
        let _ = sqlx::Connection::close(conn).await;
    }
}
