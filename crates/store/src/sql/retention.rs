//! Retention and legal holds: per-category plans, holds and their release,
//! follow-ups when a retention period ends, and deadline extensions.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use lethe_core::plan::HOLD_BASIS_PREFIX;
use lethe_core::policy::summarize;
use lethe_core::{
    ActiveHold, CategoryPlan, Deadlines, HoldRef, HoldScope, Period, Reference, RetainedReport,
};

use super::*;

pub(super) const CATEGORY_COLUMNS: [&str; 11] = [
    "request_id",
    "system",
    "category",
    "action",
    "rule",
    "rule_action",
    "basis",
    "period",
    "reference",
    "until_at",
    "hold_id",
];

/// The `plan_categories` row of one category decision.
pub(super) fn category_row(request: &str, system: &str, c: &CategoryPlan) -> Vec<Arg> {
    vec![
        Arg::from(request),
        system.into(),
        c.category.as_str().into(),
        c.action.as_str().into(),
        c.rule.as_str().into(),
        c.rule_action.as_str().into(),
        c.basis.clone().into(),
        c.period.map(|p| p.to_string()).into(),
        c.reference.map(|r| reference_name(r).to_owned()).into(),
        c.until.map(ms).into(),
        c.hold.as_ref().map(|h| h.id.clone()).into(),
    ]
}

fn reference_name(r: Reference) -> &'static str {
    match r {
        Reference::Record => "record",
        Reference::Request => "request",
    }
}

fn category_plan(r: &AnyRow) -> Result<CategoryPlan, StoreError> {
    let hold_id: Option<String> = col(r, "hold_id")?;
    let hold = match hold_id {
        Some(id) => Some(HoldRef {
            id,
            reason: col::<Option<String>>(r, "hold_reason")?.unwrap_or_default(),
            case_reference: col::<Option<String>>(r, "hold_case")?.unwrap_or_default(),
        }),
        None => None,
    };
    let reference = match col::<Option<String>>(r, "reference")?.as_deref() {
        None => None,
        Some("record") => Some(Reference::Record),
        Some("request") => Some(Reference::Request),
        Some(other) => return Err(StoreError::Corrupt(format!("unknown retention reference {other:?}"))),
    };
    Ok(CategoryPlan {
        category: col(r, "category")?,
        action: parse(&col::<String>(r, "action")?, "action")?,
        rule: col(r, "rule")?,
        rule_action: parse(&col::<String>(r, "rule_action")?, "action")?,
        basis: col(r, "basis")?,
        period: col::<Option<String>>(r, "period")?.map(|p| parse::<Period>(&p, "period")).transpose()?,
        reference,
        until: opt_time(col(r, "until_at")?)?,
        hold,
    })
}

/// How long after it reported an end already past a retained task runs
/// again.
pub(super) const PAST_END_RETRY: chrono::Duration = chrono::Duration::hours(1);

/// Records when a task that kept data runs again: the earliest end among
/// what it kept. Data kept without an end date waits for the release of a
/// legal hold:
/// - kept under a hold (its basis says so) on a category still held: until
///   that hold's release, which resumes the task;
/// - kept under a hold on a category no longer held: the hold was released
///   while the attempt ran (the release could not resume a task in
///   flight), so it runs again now;
/// - kept for another reason (a parent row pinned by a held child): while
///   any hold is on the task's categories, until their release; with none,
///   now.
///
/// Running again "now" happens once: when the attempt that reported was
/// itself such a follow-up, after [`PAST_END_RETRY`] instead (a connector
/// that keeps data without an end and without a hold must not be asked on
/// every sweep). An end already past (a connector whose clock or date
/// arithmetic differs from the coordinator's kept what the coordinator
/// thinks may go) runs it again after [`PAST_END_RETRY`] too.
pub(super) async fn set_follow_up(
    tx: &mut AnyConnection,
    report: &OutcomeReport,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let Outcome::RetainedInPart { retained, .. } = &report.outcome else { return Ok(()) };
    let task = report.task_id;
    let plan = sqlx::query(
        "SELECT p.category, p.action FROM plan_categories p \
         JOIN tasks t ON t.request_id = p.request_id AND t.system = p.system WHERE t.id = $1",
    )
    .bind(task.to_string())
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    let mut planned = BTreeSet::new();
    let mut held = BTreeSet::new();
    for r in &plan {
        let category: String = col(r, "category")?;
        if parse::<Action>(&col::<String>(r, "action")?, "action")? == Action::Hold {
            held.insert(category.clone());
        }
        planned.insert(category);
    }
    let row = sqlx::query("SELECT budget_start FROM tasks WHERE id = $1")
        .bind(task.to_string())
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
    // A follow-up starts a fresh attempt budget at the attempt it queues.
    let budget_start: i64 = col(&row, "budget_start")?;
    let attempt = i64::from(report.attempt);
    let after_follow_up = attempt > 1 && budget_start == attempt - 1;
    let resume = if after_follow_up { now + PAST_END_RETRY } else { now };
    let at = next_run(retained, &planned, &held, resume, now);
    sqlx::query("UPDATE tasks SET follow_up_at = $1 WHERE id = $2")
        .bind(at.map(ms))
        .bind(task.to_string())
        .execute(&mut *tx)
        .await
        .map(|_| ())
        .map_err(db_err)
}

/// When a task that kept `retained` runs again (see [`set_follow_up`]):
/// `planned` and `held` are the task's categories and those held now;
/// `resume` is when to run again for data whose hold is gone.
fn next_run(
    retained: &[RetainedReport],
    planned: &BTreeSet<String>,
    held: &BTreeSet<String>,
    resume: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    retained
        .iter()
        .filter_map(|r| match r.first_until.or(r.until) {
            Some(until) if until <= now => Some(now + PAST_END_RETRY),
            Some(until) => Some(until),
            None if planned.is_empty() => None,
            None => {
                let category = r.category.as_ref().filter(|c| planned.contains(*c));
                let wait = match category {
                    Some(c) if held.contains(c) => true,
                    Some(_) if r.basis.starts_with(HOLD_BASIS_PREFIX) => false,
                    _ => !held.is_empty(),
                };
                (!wait).then_some(resume)
            }
        })
        .min()
}

/// The PostgreSQL advisory lock of [`SqlStore::hold_barrier`] ("lethehol").
const HOLD_LOCK: i64 = 0x6c65_7468_6568_6f6c;

const HOLD_COLUMNS: &str =
    "h.id, h.reason, h.case_reference, h.scope, h.placed_at, h.expires_at, h.released_at, h.release_reason";

fn scope_of(r: &AnyRow) -> Result<HoldScope, StoreError> {
    serde_json::from_str(&col::<String>(r, "scope")?)
        .map_err(|e| StoreError::Corrupt(format!("bad hold scope: {e}")))
}

/// Holds in force at `now` on any of `hashes`, with the hash each matched.
async fn holds_in_force(
    dialect: Dialect,
    conn: &mut AnyConnection,
    hashes: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<(String, ActiveHold)>, StoreError> {
    let unique: BTreeSet<&str> = hashes.iter().map(String::as_str).collect();
    let mut found = Vec::new();
    let unique: Vec<&str> = unique.into_iter().collect();
    for chunk in unique.chunks(1000) {
        if chunk.is_empty() {
            continue;
        }
        let sql = format!(
            "SELECT s.subject_hash, {HOLD_COLUMNS} FROM hold_subjects s JOIN holds h ON h.id = s.hold_id \
             WHERE h.released_at IS NULL AND (h.expires_at IS NULL OR h.expires_at > $1) \
             AND {} ORDER BY h.placed_at, h.id",
            dialect.in_keys("s.subject_hash", 2, Keys::Text)
        );
        let rows = sqlx::query(&sql)
            .bind(ms(now))
            .bind(key_list(chunk))
            .fetch_all(&mut *conn)
            .await
            .map_err(db_err)?;
        for r in &rows {
            let hold = ActiveHold {
                hold: HoldRef {
                    id: col(r, "id")?,
                    reason: col(r, "reason")?,
                    case_reference: col(r, "case_reference")?,
                },
                scope: scope_of(r)?,
            };
            found.push((col(r, "subject_hash")?, hold));
        }
    }
    Ok(found)
}

impl SqlStore {
    /// A request's plan: one line per system, summarised from the current
    /// category decisions.
    pub(super) async fn plan_of(&self, id: RequestId) -> Result<Vec<PlanItem>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        let mut categories = self.categories_of(&mut conn, &[id.to_string()]).await?;
        sqlx::query(
            "SELECT system, action, reason, basis, until_at, searched_by FROM plan_items WHERE request_id = $1 \
             ORDER BY system",
        )
            .bind(id.to_string())
            .fetch_all(&mut *conn)
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| {
                let system: String = col(r, "system")?;
                let searched_by = col::<Option<String>>(r, "searched_by")?
                    .map(|t| serde_json::from_str::<Vec<String>>(&t))
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(format!("plan_items.searched_by: {e}")))?;
                match categories.remove(&(id.to_string(), system.clone())) {
                    Some(c) => Ok(PlanItem { searched_by, ..summarize(&system, c) }),
                    None => Ok(PlanItem {
                        action: parse::<Action>(&col::<String>(r, "action")?, "action")?,
                        reason: col(r, "reason")?,
                        basis: col(r, "basis")?,
                        until: opt_time(col(r, "until_at")?)?,
                        categories: Vec::new(),
                        searched_by,
                        system,
                    }),
                }
            })
            .collect()
    }

    /// The category decisions of `requests`, by (request, system).
    pub(super) async fn categories_of(
        &self,
        conn: &mut AnyConnection,
        requests: &[String],
    ) -> Result<HashMap<(String, String), Vec<CategoryPlan>>, StoreError> {
        let mut out: HashMap<(String, String), Vec<CategoryPlan>> = HashMap::new();
        if requests.is_empty() {
            return Ok(out);
        }
        let sql = format!(
            "SELECT p.request_id, p.system, p.category, p.action, p.rule, p.rule_action, p.basis, p.period, \
             p.reference, p.until_at, p.hold_id, h.reason AS hold_reason, h.case_reference AS hold_case \
             FROM plan_categories p LEFT JOIN holds h ON h.id = p.hold_id \
             WHERE {} ORDER BY p.request_id, p.system, p.category",
            self.dialect.in_keys("p.request_id", 1, Keys::Text)
        );
        let rows = sqlx::query(&sql).bind(key_list(requests)).fetch_all(&mut *conn).await.map_err(db_err)?;
        for r in &rows {
            out.entry((col(r, "request_id")?, col(r, "system")?)).or_default().push(category_plan(r)?);
        }
        Ok(out)
    }

    /// Plans of `reqs` without the holds released since they were made
    /// (between the planner's [`StateStore::active_holds`] and the insert),
    /// or `None` if no hold they name was released. Locks the holds named,
    /// so that a release waits for the insert or the insert for the release.
    pub(super) async fn drop_released_holds(
        &self,
        tx: &mut AnyConnection,
        reqs: &[&NewRequest],
    ) -> Result<Option<Vec<NewRequest>>, StoreError> {
        let named: BTreeSet<&str> = reqs
            .iter()
            .flat_map(|r| &r.plan)
            .flat_map(|p| &p.categories)
            .filter_map(|c| c.hold.as_ref().map(|h| h.id.as_str()))
            .collect();
        if named.is_empty() {
            return Ok(None);
        }
        let sql = format!(
            "SELECT id, released_at FROM holds WHERE {} ORDER BY id{}",
            self.dialect.in_keys("id", 1, Keys::Text),
            self.dialect.for_update()
        );
        let rows = sqlx::query(&sql).bind(key_list(&named)).fetch_all(&mut *tx).await;
        let mut released = BTreeSet::new();
        for r in &rows.map_err(db_err)? {
            if col::<Option<i64>>(r, "released_at")?.is_some() {
                released.insert(col::<String>(r, "id")?);
            }
        }
        if released.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(reqs.len());
        for req in reqs {
            let mut req = (*req).clone();
            let stale = |c: &CategoryPlan| c.hold.as_ref().is_some_and(|h| released.contains(&h.id));
            if req.plan.iter().flat_map(|p| &p.categories).any(stale) {
                let hashes: Vec<String> = req.identifiers.iter().map(|i| i.subject_hash.clone()).collect();
                let others = holds_in_force(self.dialect, tx, &hashes, req.received_at).await?;
                for item in &mut req.plan {
                    let mut categories = std::mem::take(&mut item.categories);
                    for c in categories.iter_mut().filter(|c| stale(c)) {
                        let still = others.iter().find(|(_, a)| a.scope.covers(&item.system, &c.category));
                        c.hold = still.map(|(_, a)| a.hold.clone());
                        c.action = if c.hold.is_some() { Action::Hold } else { c.rule_action };
                    }
                    let searched_by = item.searched_by.take();
                    *item = PlanItem { searched_by, ..summarize(&item.system, categories) };
                }
                for task in &mut req.tasks {
                    if let Some(item) = req.plan.iter().find(|p| p.system == task.system) {
                        task.action = item.action;
                        task.held = item.is_held();
                    }
                }
            }
            out.push(req);
        }
        Ok(Some(out))
    }

    pub(super) async fn holds_on(
        &self,
        hashes: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, ActiveHold)>, StoreError> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        holds_in_force(self.dialect, &mut conn, hashes, now).await
    }

    pub(super) async fn insert_hold(&self, hold: NewHold) -> Result<HoldReach, StoreError> {
        let mut tx = self.begin().await?;
        self.hold_barrier(&mut tx, true).await?;
        let scope = json_text(&hold.scope);
        sqlx::query(
            "INSERT INTO holds (id, reason, case_reference, scope, placed_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(hold.id.as_str())
        .bind(hold.reason.as_str())
        .bind(hold.case_reference.as_str())
        .bind(scope)
        .bind(ms(hold.placed_at))
        .bind(hold.expires_at.map(ms))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let hashes: BTreeSet<&str> = hold.subject_hashes.iter().map(String::as_str).collect();
        let rows = hashes.iter().map(|h| vec![Arg::from(hold.id.as_str()), (*h).into()]).collect();
        insert_rows(&mut tx, self.dialect, "hold_subjects", &["hold_id", "subject_hash"], rows).await?;
        let mut events = Vec::new();
        let hashes: Vec<&str> = hashes.into_iter().collect();
        let active = ActiveHold {
            hold: HoldRef {
                id: hold.id.clone(),
                reason: hold.reason.clone(),
                case_reference: hold.case_reference.clone(),
            },
            scope: hold.scope.clone(),
        };
        let sql = format!(
            "SELECT DISTINCT i.request_id FROM identifiers i JOIN requests r ON r.id = i.request_id \
             WHERE r.wrapped_key IS NOT NULL AND {}",
            self.dialect.in_keys("i.subject_hash", 1, Keys::Text)
        );
        let rows = sqlx::query(&sql).bind(key_list(&hashes)).fetch_all(&mut *tx).await.map_err(db_err)?;
        let under_way = rows
            .iter()
            .map(|r| parse::<RequestId>(&col::<String>(r, "request_id")?, "request id"))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let reach = self.hold_under_way(&mut tx, &active, hold.placed_at, &under_way, &mut events).await?;
        events.insert(
            0,
            PendingEvent::global(
                "hold.placed",
                json!({
                    "hold_id": hold.id,
                    "scope": hold.scope,
                    "reason": hold.reason,
                    "case_reference": hold.case_reference,
                    "expires_at": hold.expires_at,
                    "subjects": hashes,
                    "requests": reach.requests,
                    "tasks": reach.tasks,
                    "too_late": reach.too_late,
                }),
            ),
        );
        self.append_audit(&mut tx, events, hold.placed_at).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(reach)
    }

    /// Orders placing a hold with intake. Intake checks, after inserting,
    /// for holds its plans missed ([`late_holds`](Self::late_holds)); a
    /// hold, once placed, looks for the requests it reaches. Without an
    /// order, a hold placed while a batch is being written could miss it
    /// both ways. On PostgreSQL placing (and releasing) takes an exclusive
    /// transaction lock and intake a shared one: a hold waits for the
    /// batches under way and then sees them, a batch that starts later sees
    /// the hold. SQLite runs one transaction at a time.
    pub(super) async fn hold_barrier(&self, tx: &mut AnyConnection, placing: bool) -> Result<(), StoreError> {
        if self.dialect != Dialect::Postgres {
            return Ok(());
        }
        let sql = if placing {
            "SELECT pg_advisory_xact_lock($1)"
        } else {
            "SELECT pg_advisory_xact_lock_shared($1)"
        };
        sqlx::query(sql).bind(HOLD_LOCK).execute(&mut *tx).await.map(|_| ()).map_err(db_err)
    }

    /// Applies to requests just inserted (not yet committed) the holds in
    /// force on their subjects that their plans missed: placed after the
    /// planner looked. `true` if there were any (they may have changed the
    /// requests' statuses).
    pub(super) async fn late_holds(
        &self,
        tx: &mut AnyConnection,
        reqs: &[&NewRequest],
        at: DateTime<Utc>,
        events: &mut Vec<PendingEvent>,
    ) -> Result<bool, StoreError> {
        let hashes: Vec<String> =
            reqs.iter().flat_map(|r| r.identifiers.iter().map(|i| i.subject_hash.clone())).collect();
        let found = holds_in_force(self.dialect, tx, &hashes, at).await?;
        let any = !found.is_empty();
        let mut by_hold: BTreeMap<String, (ActiveHold, BTreeSet<String>)> = BTreeMap::new();
        for (hash, active) in found {
            by_hold.entry(active.hold.id.clone()).or_insert_with(|| (active, BTreeSet::new())).1.insert(hash);
        }
        for (active, held) in by_hold.values() {
            let reached: BTreeSet<RequestId> = reqs
                .iter()
                .filter(|r| r.identifiers.iter().any(|i| held.contains(&i.subject_hash)))
                .map(|r| r.id)
                .collect();
            // Categories the plan already holds are left as they are.
            self.hold_under_way(tx, active, at, &reached, events).await?;
        }
        Ok(any)
    }

    /// Applies a hold being placed to `requests` of its subject still
    /// under way (their key not destroyed), as [`HoldReach`] describes.
    /// Requests and tasks are locked in id order, as every writer locks
    /// them. A withdrawn task's next attempt is counted as spent whether or
    /// not a dispatcher had claimed its queue row: a claimed row may be on
    /// its way to the bus with the old directives, and one released after
    /// a publish that failed, or by a restart, may have reached it all the
    /// same. So that attempt's key is refused, its answer is not applied
    /// (`withdrawn_through`) and its publication record finds no row.
    async fn hold_under_way(
        &self,
        tx: &mut AnyConnection,
        hold: &ActiveHold,
        at: DateTime<Utc>,
        requests: &BTreeSet<RequestId>,
        events: &mut Vec<PendingEvent>,
    ) -> Result<HoldReach, StoreError> {
        let mut reach = HoldReach::default();
        if requests.is_empty() {
            return Ok(reach);
        }
        let statuses = self.lock_requests(tx, requests.iter().copied()).await?;
        let keys: Vec<String> = requests.iter().map(ToString::to_string).collect();

        let sql = format!(
            "SELECT request_id, system, category, action FROM plan_categories WHERE {} \
             ORDER BY request_id, system, category",
            self.dialect.in_keys("request_id", 1, Keys::Text)
        );
        let rows = sqlx::query(&sql).bind(key_list(&keys)).fetch_all(&mut *tx).await.map_err(db_err)?;
        // Per (request, system): the categories the hold newly covers, with
        // the action each had, and whether it leaves some to their rules.
        type Covered = (Vec<(String, Action)>, bool);
        let mut covered: BTreeMap<(String, String), Covered> = BTreeMap::new();
        for r in &rows {
            let (system, category): (String, String) = (col(r, "system")?, col(r, "category")?);
            let action = parse::<Action>(&col::<String>(r, "action")?, "action")?;
            let held = action == Action::Hold;
            let newly = !held && hold.scope.covers(&system, &category);
            let entry = covered.entry((col(r, "request_id")?, system)).or_default();
            if newly {
                entry.0.push((category, action));
            } else if !held {
                entry.1 = true; // a category the hold leaves to its rule
            }
        }
        covered.retain(|_, (newly, _)| !newly.is_empty());
        if covered.is_empty() {
            return Ok(reach);
        }
        let sql = format!(
            "SELECT id, request_id, system FROM tasks WHERE {}",
            self.dialect.in_keys("request_id", 1, Keys::Text)
        );
        let rows = sqlx::query(&sql).bind(key_list(&keys)).fetch_all(&mut *tx).await.map_err(db_err)?;
        let mut task_of: HashMap<(String, String), TaskId> = HashMap::new();
        for r in &rows {
            task_of.insert(
                (col(r, "request_id")?, col(r, "system")?),
                parse(&col::<String>(r, "id")?, "task id")?,
            );
        }
        let tasks = self.lock_tasks(tx, covered.keys().filter_map(|k| task_of.get(k)).copied()).await?;
        let ids: Vec<String> = tasks.keys().map(ToString::to_string).collect();
        // The queue rows are locked, not just read: a claim not yet
        // committed holds its row, and this waits for it, so that its
        // publication record, which comes after, finds the row gone.
        let sql = format!(
            "SELECT task_id FROM outbox WHERE {}{}",
            self.dialect.in_keys("task_id", 1, Keys::Text),
            self.dialect.for_update()
        );
        let now = ms(at);
        sqlx::query(&sql).bind(key_list(&ids)).fetch_all(&mut *tx).await.map_err(db_err)?;

        // Tasks whose last run is over and kept data (a follow-up of such a
        // run may be queued or on the bus): that run erased the rest.
        let sql =
            format!("SELECT id, last_outcome FROM tasks WHERE {}", self.dialect.in_keys("id", 1, Keys::Text));
        let rows = sqlx::query(&sql).bind(key_list(&ids)).fetch_all(&mut *tx).await.map_err(db_err)?;
        let mut ran: HashSet<TaskId> = HashSet::new();
        for r in &rows {
            let last: Option<String> = col(r, "last_outcome")?;
            let kept = last
                .and_then(|l| serde_json::from_str::<Outcome>(&l).ok())
                .is_some_and(|o| o.class() == OutcomeClass::Retained);
            if kept {
                ran.insert(parse(&col::<String>(r, "id")?, "task id")?);
            }
        }

        let mut changed: BTreeSet<RequestId> = BTreeSet::new();
        for ((request, system), (newly, uncovered)) in &covered {
            let request_id: RequestId = parse(request, "request id")?;
            let Some(task_id) = task_of.get(&(request.clone(), system.clone())).copied() else { continue };
            let Some((state, has_job)) = tasks.get(&task_id).map(|t| (t.state, t.has_job)) else { continue };
            if state == TaskState::Succeeded {
                reach.too_late += 1;
                continue;
            }
            // A retained task's run is over (its follow-up may be under
            // way): what its plan erased or anonymised is gone, and only what
            // it keeps can be held. The plan keeps saying what happened to
            // the rest.
            let over = state == TaskState::Retained || ran.contains(&task_id);
            let erased = |a: &Action| matches!(a, Action::Erase | Action::Anonymize);
            let newly: Vec<String> =
                newly.iter().filter(|(_, a)| !(over && erased(a))).map(|(c, _)| c.clone()).collect();
            if newly.is_empty() {
                reach.too_late += 1;
                continue;
            }
            // A job already runs in the external system: too late for what
            // it does, but a later attempt (a retry after the job fails, a
            // follow-up) is built from the plan, which now holds. The job
            // runs while its task waits (`accepted`) and while a check of it
            // is queued or on the bus (`pending`, `dispatched`); the checks
            // go on, to collect what it did, and are not held.
            let job_running = state == TaskState::Accepted
                || (has_job && matches!(state, TaskState::Pending | TaskState::Dispatched));
            if job_running {
                reach.too_late += 1;
            }
            let sql = format!(
                "UPDATE plan_categories SET action = $1, hold_id = $2 \
                 WHERE request_id = $3 AND system = $4 AND {}",
                self.dialect.in_keys("category", 5, Keys::Text)
            );
            sqlx::query(&sql)
                .bind(Action::Hold.as_str())
                .bind(hold.hold.id.as_str())
                .bind(request.as_str())
                .bind(system.as_str())
                .bind(key_list(&newly))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            // Every category held: nothing of the system may go now.
            let all_held = !*uncovered;
            let next = match state {
                _ if job_running => state,
                TaskState::Pending | TaskState::Dispatched if all_held => TaskState::Held,
                TaskState::Pending | TaskState::Dispatched => TaskState::Pending,
                // A failed task stays failed for an operator to retry; the
                // retry carries the new plan.
                TaskState::Retained if all_held => TaskState::Held,
                other => other,
            };
            // Queued or on the bus: withdrawn, to be sent again (or held).
            // A check of a running job is left to go on.
            let withdrawn = !job_running && matches!(state, TaskState::Pending | TaskState::Dispatched);
            if withdrawn {
                sqlx::query("DELETE FROM outbox WHERE task_id = $1")
                    .bind(task_id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
            }
            let spent = i64::from(withdrawn);
            sqlx::query(
                "UPDATE tasks SET state = $1, action = $2, attempts = attempts + $3, \
                 budget_start = budget_start + $3, updated_at = $4, \
                 follow_up_at = CASE WHEN $1 = $5 THEN NULL ELSE follow_up_at END, \
                 finished_at = CASE WHEN $1 = $5 THEN $4 ELSE finished_at END, \
                 withdrawn_through = CASE WHEN $7 = 1 THEN attempts + $3 ELSE withdrawn_through END \
                 WHERE id = $6",
            )
            .bind(next.as_str())
            .bind(Action::Hold.as_str())
            .bind(spent)
            .bind(now)
            .bind(TaskState::Held.as_str())
            .bind(task_id.to_string())
            .bind(i64::from(withdrawn))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            if withdrawn && next == TaskState::Pending {
                self.enqueue(tx, task_id, now, at).await?;
            }
            events.push(PendingEvent::new(
                request_id,
                Some(task_id),
                "task.hold_applied",
                json!({"system": system, "hold_id": hold.hold.id, "categories": newly, "from": state, "to": next}),
            ));
            if !job_running {
                reach.tasks += 1;
            }
            changed.insert(request_id);
        }
        reach.requests = changed.len() as u64;
        for id in changed {
            if let Some(status) = statuses.get(&id) {
                self.refresh_request(tx, id, *status, at, events).await?;
            }
        }
        Ok(reach)
    }

    pub(super) async fn release(
        &self,
        id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<ReleaseResult, StoreError> {
        let mut tx = self.begin().await?;
        // One hold changes plans at a time: a release that read the holds in
        // force before a new hold on the same data committed would resume
        // what the new hold keeps.
        self.hold_barrier(&mut tx, true).await?;
        let row =
            sqlx::query(&format!("SELECT released_at FROM holds WHERE id = $1{}", self.dialect.for_update()))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        let Some(row) = row else { return Ok(ReleaseResult::NotFound) };
        if col::<Option<i64>>(&row, "released_at")?.is_some() {
            return Ok(ReleaseResult::AlreadyReleased);
        }
        sqlx::query("UPDATE holds SET released_at = $1, release_reason = $2 WHERE id = $3")
            .bind(ms(now))
            .bind(reason)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let held = sqlx::query("SELECT request_id, system, category FROM plan_categories WHERE hold_id = $1")
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let mut held_by: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for r in &held {
            held_by.entry(col(r, "request_id")?).or_default().push((col(r, "system")?, col(r, "category")?));
        }
        // Other holds in force on the same subjects may still cover a category.
        let mut hashes_of: HashMap<String, Vec<String>> = HashMap::new();
        if !held_by.is_empty() {
            let sql = format!(
                "SELECT request_id, subject_hash FROM identifiers WHERE {}",
                self.dialect.in_keys("request_id", 1, Keys::Text)
            );
            let rows =
                sqlx::query(&sql).bind(key_list(held_by.keys())).fetch_all(&mut *tx).await.map_err(db_err)?;
            for r in &rows {
                hashes_of.entry(col(r, "request_id")?).or_default().push(col(r, "subject_hash")?);
            }
        }
        let all_hashes: Vec<String> = hashes_of.values().flatten().cloned().collect();
        let mut others = holds_in_force(self.dialect, &mut tx, &all_hashes, now).await?;
        if !others.is_empty() {
            // Lock the holds that may take over, and drop those released
            // meanwhile: a concurrent release must not leave a category
            // kept by a hold that no longer exists.
            let ids: BTreeSet<String> = others.iter().map(|(_, a)| a.hold.id.clone()).collect();
            let sql = format!(
                "SELECT id FROM holds WHERE {} AND released_at IS NULL ORDER BY id{}",
                self.dialect.in_keys("id", 1, Keys::Text),
                self.dialect.for_update()
            );
            let rows = sqlx::query(&sql).bind(key_list(&ids)).fetch_all(&mut *tx).await;
            let live: BTreeSet<String> =
                rows.map_err(db_err)?.iter().map(|r| col::<String>(r, "id")).collect::<Result<_, _>>()?;
            others.retain(|(_, a)| live.contains(&a.hold.id));
        }
        let mut events = Vec::new();
        let mut resumed = 0u64;
        for (request, categories) in &held_by {
            let hashes = hashes_of.get(request).map_or(&[][..], Vec::as_slice);
            let mut freed: BTreeSet<&str> = BTreeSet::new();
            // Categories another hold keeps from now on, by system and hold.
            let mut taken: BTreeMap<(&str, String), Vec<&str>> = BTreeMap::new();
            for (system, category) in categories {
                let still = others
                    .iter()
                    .find(|(h, a)| hashes.contains(h) && a.scope.covers(system, category))
                    .map(|(_, a)| a.hold.id.clone());
                let sql = if still.is_some() {
                    "UPDATE plan_categories SET hold_id = $1, action = 'hold' \
                     WHERE request_id = $2 AND system = $3 AND category = $4"
                } else {
                    "UPDATE plan_categories SET hold_id = $1, action = rule_action \
                     WHERE request_id = $2 AND system = $3 AND category = $4"
                };
                sqlx::query(sql)
                    .bind(still.clone())
                    .bind(request.as_str())
                    .bind(system.as_str())
                    .bind(category.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                match still {
                    Some(other) => taken.entry((system.as_str(), other)).or_default().push(category.as_str()),
                    None => {
                        freed.insert(system.as_str());
                    }
                }
            }
            let request_id: RequestId = parse(request, "request id")?;
            // The trail names the hold that keeps each category: the one
            // that takes over is recorded as the first one was.
            for ((system, other), categories) in taken {
                let task_id = task_of(&mut tx, request, system).await?;
                events.push(PendingEvent::new(
                    request_id,
                    task_id,
                    "task.hold_transferred",
                    json!({"system": system, "categories": categories, "from_hold": id, "to_hold": other}),
                ));
            }
            if freed.is_empty() {
                continue;
            }
            self.lock_request(&mut tx, request_id).await?;
            for system in freed {
                let Some(task_id) = task_of(&mut tx, request, system).await? else { continue };
                if self
                    .follow_up(&mut tx, request_id, task_id, "legal hold released", now, &mut events)
                    .await?
                {
                    resumed += 1;
                }
            }
        }
        events.push(PendingEvent::global(
            "hold.released",
            json!({"hold_id": id, "reason": reason, "resumed_tasks": resumed}),
        ));
        self.append_audit(&mut tx, events, now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(ReleaseResult::Released { resumed })
    }

    /// Moves a `retained` or `held` task (its request locked by the caller)
    /// back to `pending` with a fresh attempt budget and queues it.
    async fn follow_up(
        &self,
        tx: &mut AnyConnection,
        request: RequestId,
        task_id: TaskId,
        why: &str,
        now: DateTime<Utc>,
        events: &mut Vec<PendingEvent>,
    ) -> Result<bool, StoreError> {
        let task = self.lock_task(tx, task_id).await?;
        if task.state.apply(TaskEvent::FollowUp) != Ok(Step::Moved(TaskState::Pending)) {
            return Ok(false);
        }
        // The task's action follows the plan as it is now: a released hold
        // gives its categories back to their rules.
        let actions = category_actions(tx, request, &task.system).await?;
        let action = actions.into_iter().max_by_key(|a| a.rank()).map(Action::as_str);
        sqlx::query(
            "UPDATE tasks SET state = $1, budget_start = attempts, follow_up_at = NULL, updated_at = $2, \
             finished_at = NULL, action = COALESCE($3, action) WHERE id = $4",
        )
        .bind(TaskState::Pending.as_str())
        .bind(ms(now))
        .bind(action)
        .bind(task_id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        self.enqueue(tx, task_id, ms(now), now).await?;
        events.push(PendingEvent::new(
            request,
            Some(task_id),
            "task.follow_up",
            json!({"system": task.system, "from": task.state, "why": why}),
        ));
        Ok(true)
    }

    pub(super) async fn holds(&self, all: bool, now: DateTime<Utc>) -> Result<Vec<HoldRecord>, StoreError> {
        let filter = if all {
            ""
        } else {
            " WHERE h.released_at IS NULL AND (h.expires_at IS NULL OR h.expires_at > $1)"
        };
        let sql = format!(
            "SELECT {HOLD_COLUMNS}, (SELECT COUNT(*) FROM hold_subjects s WHERE s.hold_id = h.id) AS subjects \
             FROM holds h{filter} ORDER BY h.placed_at DESC, h.id DESC"
        );
        let query = sqlx::query(&sql);
        let query = if all { query } else { query.bind(ms(now)) };
        query
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| {
                Ok(HoldRecord {
                    id: col(r, "id")?,
                    scope: scope_of(r)?,
                    reason: col(r, "reason")?,
                    case_reference: col(r, "case_reference")?,
                    placed_at: time(col(r, "placed_at")?)?,
                    expires_at: opt_time(col(r, "expires_at")?)?,
                    released_at: opt_time(col(r, "released_at")?)?,
                    release_reason: col(r, "release_reason")?,
                    identifiers: u64::try_from(col::<i64>(r, "subjects")?).unwrap_or(0),
                })
            })
            .collect()
    }

    pub(super) async fn expire(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM holds WHERE released_at IS NULL AND expires_at IS NOT NULL AND expires_at <= $1 \
             ORDER BY expires_at LIMIT 100",
        )
        .bind(ms(now))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        let mut released = 0;
        for r in &rows {
            let id: String = col(r, "id")?;
            if let ReleaseResult::Released { .. } = self.release(&id, "expired", now).await? {
                released += 1;
            }
        }
        Ok(released)
    }

    pub(super) async fn follow_ups(&self, now: DateTime<Utc>, limit: u32) -> Result<BySystem, StoreError> {
        let rows = sqlx::query(
            "SELECT id, request_id, system FROM tasks WHERE state = $1 AND follow_up_at IS NOT NULL AND follow_up_at <= $2 \
             ORDER BY request_id, id LIMIT $3",
        )
        .bind(TaskState::Retained.as_str())
        .bind(ms(now))
        .bind(i64::from(limit.max(1)))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        let mut queued = BySystem::new();
        if rows.is_empty() {
            return Ok(queued);
        }
        let mut tx = self.begin().await?;
        let mut events = Vec::new();
        for r in &rows {
            let request: RequestId = parse(&col::<String>(r, "request_id")?, "request id")?;
            let task: TaskId = parse(&col::<String>(r, "id")?, "task id")?;
            self.lock_request(&mut tx, request).await?;
            // Read again under the lock: since the sweep read it, a hold may
            // have held the task, or another replica followed it up and it
            // was retained again with a later date.
            let sql =
                format!("SELECT state, follow_up_at FROM tasks WHERE id = $1{}", self.dialect.for_update());
            let row = sqlx::query(&sql).bind(task.to_string()).fetch_one(&mut *tx).await.map_err(db_err)?;
            let state: TaskState = parse(&col::<String>(&row, "state")?, "task state")?;
            let due = col::<Option<i64>>(&row, "follow_up_at")?.is_some_and(|at| at <= ms(now));
            if state != TaskState::Retained || !due {
                continue;
            }
            if self.follow_up(&mut tx, request, task, "retention period ended", now, &mut events).await? {
                *queued.entry(col(r, "system")?).or_default() += 1;
            }
        }
        self.append_audit(&mut tx, events, now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(queued)
    }

    pub(super) async fn extend(
        &self,
        id: RequestId,
        reason: &str,
        deadlines: &Deadlines,
        now: DateTime<Utc>,
    ) -> Result<ExtendResult, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT regulation, status, due_at, original_due_at FROM requests WHERE id = $1{}",
            self.dialect.for_update()
        ))
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let Some(row) = row else { return Ok(ExtendResult::NotFound) };
        let status: RequestStatus = parse(&col::<String>(&row, "status")?, "status")?;
        if matches!(status, RequestStatus::Completed | RequestStatus::CompletedWithExemptions) {
            return Ok(ExtendResult::Final(status));
        }
        let regulation: Regulation = parse(&col::<String>(&row, "regulation")?, "regulation")?;
        let due = time(col(&row, "due_at")?)?;
        let original = opt_time(col(&row, "original_due_at")?)?;
        let new_due = match deadlines.extend(regulation, original.unwrap_or(due), original.is_some(), now) {
            Ok(d) => d,
            Err(refused) => return Ok(ExtendResult::Refused(refused)),
        };
        sqlx::query(
            "UPDATE requests SET due_at = $1, original_due_at = $2, extension_reason = $3, updated_at = $4, \
             due_alert = NULL WHERE id = $5",
        )
        .bind(ms(new_due))
        .bind(ms(due))
        .bind(reason)
        .bind(ms(now))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let event = PendingEvent::new(
            id,
            None,
            "request.extended",
            json!({"from": due, "to": new_due, "reason": reason, "status": status}),
        );
        self.append_audit(&mut tx, vec![event], now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(ExtendResult::Extended { due_at: new_due })
    }
}

/// The action the plan now gives each category of `system` in `request`.
pub(super) async fn category_actions(
    tx: &mut AnyConnection,
    request: RequestId,
    system: &str,
) -> Result<Vec<Action>, StoreError> {
    sqlx::query("SELECT action FROM plan_categories WHERE request_id = $1 AND system = $2")
        .bind(request.to_string())
        .bind(system)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| parse::<Action>(&col::<String>(r, "action")?, "action"))
        .collect()
}

/// The task of `request` for `system`, if it has one.
async fn task_of(tx: &mut AnyConnection, request: &str, system: &str) -> Result<Option<TaskId>, StoreError> {
    let row = sqlx::query("SELECT id FROM tasks WHERE request_id = $1 AND system = $2")
        .bind(request)
        .bind(system)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
    row.map(|r| parse(&col::<String>(&r, "id")?, "task id")).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(category: &str, basis: &str) -> RetainedReport {
        RetainedReport {
            dataset: category.into(),
            category: Some(category.into()),
            count: 1,
            basis: basis.into(),
            until: None,
            first_until: None,
        }
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Data kept without an end: by a hold still in force it waits; by a
    /// hold released meanwhile it runs again, even beside another hold;
    /// for another reason (a parent pinned by a held child) it waits while
    /// any hold is on the task.
    #[test]
    fn data_kept_without_an_end_waits_only_for_holds_in_force() {
        let now = Utc::now();
        let planned = set(&["contact", "orders", "support"]);
        let next =
            |retained: &[RetainedReport], held: &[&str]| next_run(retained, &planned, &set(held), now, now);
        let held_contact = kept("contact", "legal hold C-1: litigation");
        let pinned = kept("contact", "kept while linked records in orders are kept");
        assert_eq!(next(std::slice::from_ref(&held_contact), &["contact"]), None, "still held");
        assert_eq!(
            next(std::slice::from_ref(&held_contact), &["support"]),
            Some(now),
            "its hold was released"
        );
        assert_eq!(next(&[held_contact], &[]), Some(now));
        assert_eq!(next(std::slice::from_ref(&pinned), &["orders"]), None, "pinned by a held child");
        assert_eq!(next(&[pinned], &[]), Some(now), "nothing held any more");
        let mut ends = kept("orders", "HGB §257");
        ends.until = Some(now + chrono::Duration::days(3));
        assert_eq!(next(&[ends.clone()], &["support"]), ends.until, "an end of its own");
        ends.until = Some(now - chrono::Duration::days(3));
        assert_eq!(next(&[ends], &[]), Some(now + PAST_END_RETRY), "an end already past");
    }
}
