//! Webhook delivery state: a leased cursor per endpoint into the audit
//! trail, the delivery log, and the sealed identifiers of a request whose
//! key still exists.

use crate::webhook::{AuditPage, DeliveryQuery, SealedSubject, WebhookDelivery};

use super::*;

const DELIVERY_COLUMNS: &str = "id, endpoint, event_id, event_type, seq, request_id, attempt, status_code, \
     error, delivered, created_at, duration_ms, next_attempt_at";

fn delivery_record(r: &AnyRow) -> Result<WebhookDelivery, StoreError> {
    Ok(WebhookDelivery {
        id: col(r, "id")?,
        endpoint: col(r, "endpoint")?,
        event_id: col(r, "event_id")?,
        event_type: col(r, "event_type")?,
        seq: col(r, "seq")?,
        request_id: col::<Option<String>>(r, "request_id")?.map(|s| parse(&s, "request id")).transpose()?,
        attempt: u32::try_from(col::<i64>(r, "attempt")?).unwrap_or(u32::MAX),
        status_code: col::<Option<i64>>(r, "status_code")?.and_then(|c| u16::try_from(c).ok()),
        error: col(r, "error")?,
        delivered: col::<i64>(r, "delivered")? == 1,
        created_at: time(col(r, "created_at")?)?,
        duration_ms: u64::try_from(col::<i64>(r, "duration_ms")?).unwrap_or(0),
        next_attempt_at: opt_time(col(r, "next_attempt_at")?)?,
    })
}

fn audit_record(r: &AnyRow) -> Result<AuditEvent, StoreError> {
    Ok(AuditEvent {
        seq: col(r, "seq")?,
        at: time(col(r, "at")?)?,
        request_id: col::<Option<String>>(r, "request_id")?.map(|s| parse(&s, "request id")).transpose()?,
        task_id: col::<Option<String>>(r, "task_id")?.map(|s| parse(&s, "task id")).transpose()?,
        kind: col(r, "kind")?,
        detail: col(r, "detail")?,
        prev_hash: col(r, "prev_hash")?,
        hash: col(r, "hash")?,
    })
}

impl SqlStore {
    pub(super) async fn init_cursor(&self, endpoint: &str, now: DateTime<Utc>) -> Result<i64, StoreError> {
        sqlx::query(
            "INSERT INTO webhook_cursors (endpoint, seq, updated_at) \
             SELECT $1, seq, $2 FROM audit_head WHERE id = 1 ON CONFLICT (endpoint) DO NOTHING",
        )
        .bind(endpoint)
        .bind(ms(now))
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        let row = sqlx::query("SELECT seq FROM webhook_cursors WHERE endpoint = $1")
            .bind(endpoint)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        col(&row, "seq")
    }

    pub(super) async fn claim_cursor(
        &self,
        endpoint: &str,
        owner: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, StoreError> {
        let until = ms(now) + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        let mut tx = self.begin().await?;
        let claimed = sqlx::query(
            "UPDATE webhook_cursors SET claimed_by = $1, claimed_until = $2 \
             WHERE endpoint = $3 AND (claimed_by IS NULL OR claimed_by = $1 OR claimed_until < $4)",
        )
        .bind(owner)
        .bind(until)
        .bind(endpoint)
        .bind(ms(now))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if claimed.rows_affected() == 0 {
            return Ok(None);
        }
        let row = sqlx::query("SELECT seq FROM webhook_cursors WHERE endpoint = $1")
            .bind(endpoint)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        let seq = col(&row, "seq")?;
        tx.commit().await.map_err(db_err)?;
        Ok(Some(seq))
    }

    pub(super) async fn advance_cursor(
        &self,
        endpoint: &str,
        owner: &str,
        seq: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_cursors SET seq = $1, updated_at = $2 \
             WHERE endpoint = $3 AND claimed_by = $4 AND seq <= $1",
        )
        .bind(seq)
        .bind(ms(now))
        .bind(endpoint)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn rewind_cursor(
        &self,
        endpoint: &str,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let mut tx = self.begin().await?;
        let sql = format!("SELECT seq FROM webhook_cursors WHERE endpoint = $1{}", self.dialect.for_update());
        let row = sqlx::query(&sql).bind(endpoint).fetch_optional(&mut *tx).await.map_err(db_err)?;
        let Some(row) = row else { return Ok(None) };
        let from: i64 = col(&row, "seq")?;
        let before = sqlx::query("SELECT MAX(seq) AS seq FROM audit_events WHERE at < $1")
            .bind(ms(since))
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        let to = col::<Option<i64>>(&before, "seq")?.unwrap_or(0).min(from);
        sqlx::query(
            "UPDATE webhook_cursors SET seq = $1, claimed_by = NULL, claimed_until = NULL, updated_at = $2 \
             WHERE endpoint = $3",
        )
        .bind(to)
        .bind(ms(now))
        .bind(endpoint)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let event =
            PendingEvent::global("webhook.rewound", json!({"endpoint": endpoint, "from": from, "to": to}));
        self.append_audit(&mut tx, vec![event], now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(Some((from, to)))
    }

    pub(super) async fn audit_after(
        &self,
        after: i64,
        kinds: &[&str],
        limit: u32,
    ) -> Result<AuditPage, StoreError> {
        // The head first: every event up to it is committed (the head moves
        // in the same transaction as the events), so none is skipped.
        let head = sqlx::query("SELECT seq FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        let head: i64 = col(&head, "seq")?;
        if kinds.is_empty() || head <= after {
            return Ok(AuditPage { events: Vec::new(), scanned_to: head.max(after) });
        }
        let sql = format!(
            "SELECT seq, at, request_id, task_id, kind, detail, prev_hash, hash FROM audit_events \
             WHERE seq > $1 AND seq <= $2 AND {} ORDER BY seq LIMIT {}",
            self.dialect.in_keys("kind", 3, Keys::Text),
            limit.max(1)
        );
        let rows = sqlx::query(&sql)
            .bind(after)
            .bind(head)
            .bind(key_list(kinds))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        let events = rows.iter().map(audit_record).collect::<Result<Vec<_>, _>>()?;
        let scanned_to = match events.last() {
            Some(last) if events.len() >= limit.max(1) as usize => last.seq,
            _ => head,
        };
        Ok(AuditPage { events, scanned_to })
    }

    pub(super) async fn insert_delivery(&self, d: &WebhookDelivery) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO webhook_deliveries ({DELIVERY_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .bind(d.id.as_str())
        .bind(d.endpoint.as_str())
        .bind(d.event_id.as_str())
        .bind(d.event_type.as_str())
        .bind(d.seq)
        .bind(d.request_id.map(|r| r.to_string()))
        .bind(i64::from(d.attempt))
        .bind(d.status_code.map(i64::from))
        .bind(d.error.clone())
        .bind(i64::from(d.delivered))
        .bind(ms(d.created_at))
        .bind(i64::try_from(d.duration_ms).unwrap_or(i64::MAX))
        .bind(d.next_attempt_at.map(ms))
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    pub(super) async fn deliveries(&self, q: &DeliveryQuery) -> Result<Vec<WebhookDelivery>, StoreError> {
        let mut filters = Vec::new();
        let mut args = Vec::new();
        if let Some(endpoint) = &q.endpoint {
            args.push(endpoint.clone());
            filters.push(format!("endpoint = ${}", args.len()));
        }
        if let Some(request) = q.request_id {
            args.push(request.to_string());
            filters.push(format!("request_id = ${}", args.len()));
        }
        if let Some((_, id)) = &q.before {
            args.push(id.clone());
            let (at, id) = (args.len() + 1, args.len());
            filters.push(format!("(created_at < ${at} OR (created_at = ${at} AND id < ${id}))"));
        }
        let filter =
            if filters.is_empty() { String::new() } else { format!(" WHERE {}", filters.join(" AND ")) };
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries{filter} \
             ORDER BY created_at DESC, id DESC LIMIT {}",
            q.limit.max(1)
        );
        let query = args.iter().fold(sqlx::query(&sql), |query, a| query.bind(a.as_str()));
        let query = match &q.before {
            Some((at, _)) => query.bind(*at),
            None => query,
        };
        query.fetch_all(&self.pool).await.map_err(db_err)?.iter().map(delivery_record).collect()
    }

    pub(super) async fn prune_deliveries(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // Oldest first, down the (created_at, id) index, a bounded batch at
        // a time: a large backlog is removed over several sweeps without
        // one long transaction.
        let removed = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries \
             WHERE created_at < $1 ORDER BY created_at, id LIMIT $2)",
        )
        .bind(ms(before))
        .bind(i64::from(limit.max(1)))
        .execute(&self.pool)
        .await
        .map_err(db_err)?
        .rows_affected();
        Ok(removed)
    }

    pub(super) async fn sealed_subject_of(&self, id: RequestId) -> Result<Option<SealedSubject>, StoreError> {
        Ok(self.sealed_subjects_of(&[id]).await?.remove(&id))
    }

    pub(super) async fn sealed_subjects_of(
        &self,
        requests: &[RequestId],
    ) -> Result<HashMap<RequestId, SealedSubject>, StoreError> {
        let mut subjects = HashMap::new();
        if requests.is_empty() {
            return Ok(subjects);
        }
        let mut ids: Vec<String> = requests.iter().map(ToString::to_string).collect();
        ids.sort();
        ids.dedup();
        // One statement, so each key and its identifiers are read together.
        let sql = format!(
            "SELECT r.id, r.wrapped_key, i.kind, i.sealed FROM requests r \
             JOIN identifiers i ON i.request_id = r.id \
             WHERE {} AND r.wrapped_key IS NOT NULL ORDER BY r.id, i.position",
            self.dialect.in_keys("r.id", 1, Keys::Text)
        );
        let rows = sqlx::query(&sql).bind(key_list(&ids)).fetch_all(&self.pool).await.map_err(db_err)?;
        for r in &rows {
            let id: RequestId = parse(&col::<String>(r, "id")?, "request id")?;
            let identifier = SealedIdentifier {
                kind: parse::<IdentifierKind>(&col::<String>(r, "kind")?, "identifier type")?,
                ciphertext: col(r, "sealed")?,
            };
            match subjects.entry(id) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    e.get_mut().identifiers.push(identifier)
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(SealedSubject {
                        wrapped_key: col(r, "wrapped_key")?,
                        identifiers: vec![identifier],
                    });
                }
            }
        }
        Ok(subjects)
    }
}
