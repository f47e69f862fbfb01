//! Asynchronous deletions: a task whose connector started an external job
//! is `accepted`; it is dispatched again after the interval the connector
//! asked for, with the job, until the connector reports it finished.
//! Everything lives in the tasks and outbox tables, so polling goes on
//! across coordinator restarts.

use super::*;

/// Interval between checks when the connector names none.
const DEFAULT_POLL: Duration = Duration::from_secs(30);
/// Bounds on a connector's requested interval.
const MIN_POLL: Duration = Duration::from_secs(1);
const MAX_POLL: Duration = Duration::from_secs(24 * 3600);

/// Records the job of an `accepted` outcome and returns when the task is
/// next dispatched. The first report of a job fixes `job_accepted_at`; a
/// different job id (a resubmission) starts a new clock. Each check gets a
/// fresh attempt budget: polling a long job is not failing.
pub(super) async fn accept(
    tx: &mut AnyConnection,
    report: &OutcomeReport,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, StoreError> {
    let Outcome::Accepted { job_id, poll_after_seconds } = &report.outcome else {
        return Ok(now);
    };
    // The answered attempt counts as published even if its publication is
    // not recorded yet, so that recording it later leaves the task accepted.
    sqlx::query(
        "UPDATE tasks SET job_accepted_at = CASE WHEN job_id = $1 AND job_accepted_at IS NOT NULL \
         THEN job_accepted_at ELSE $2 END, job_id = $1, \
         attempts = CASE WHEN attempts < $4 THEN $4 ELSE attempts END, \
         budget_start = CASE WHEN attempts < $4 THEN $4 ELSE attempts END WHERE id = $3",
    )
    .bind(job_id.as_str())
    .bind(ms(now))
    .bind(report.task_id.to_string())
    .bind(i64::from(report.attempt))
    .execute(&mut *tx)
    .await
    .map_err(db_err)?;
    // One check planned at a time: a requeue that raced this answer is
    // replaced by the check (a row being published right now stays).
    sqlx::query("DELETE FROM outbox WHERE task_id = $1 AND (claimed_until IS NULL OR claimed_until < $2)")
        .bind(report.task_id.to_string())
        .bind(ms(now))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    let poll = poll_after_seconds.map_or(DEFAULT_POLL, Duration::from_secs).clamp(MIN_POLL, MAX_POLL);
    Ok(now + chrono::Duration::from_std(poll).unwrap_or_default())
}

/// Forgets a settled task's job: a later retry starts a new one.
pub(super) async fn clear(tx: &mut AnyConnection, task: TaskId) -> Result<(), StoreError> {
    sqlx::query("UPDATE tasks SET job_id = NULL, job_accepted_at = NULL WHERE id = $1 AND job_id IS NOT NULL")
        .bind(task.to_string())
        .execute(&mut *tx)
        .await
        .map(|_| ())
        .map_err(db_err)
}
