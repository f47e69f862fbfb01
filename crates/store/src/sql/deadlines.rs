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
        let rows = sqlx::query(&format!(
            "SELECT id, due_at FROM requests WHERE {UNANSWERED} AND due_at < $1 \
             AND (due_alert IS NULL OR (due_alert = $2 AND due_at <= $3)) ORDER BY id LIMIT $4{}",
            self.dialect.skip_locked()
        ))
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
