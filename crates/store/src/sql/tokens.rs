//! API tokens (digests only), the suppression list and certificate signing
//! keys.

use std::collections::BTreeSet;

use super::*;

fn token_record(r: &AnyRow) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        id: col(r, "id")?,
        name: col(r, "name")?,
        digest: col(r, "digest")?,
        scopes: col::<String>(r, "scopes")?.split_whitespace().map(str::to_owned).collect(),
        created_at: time(col(r, "created_at")?)?,
        revoked_at: opt_time(col(r, "revoked_at")?)?,
        previous_digest: col(r, "previous_digest")?,
        previous_until: opt_time(col(r, "previous_until")?)?,
    })
}

const TOKEN_COLUMNS: &str =
    "id, name, digest, scopes, created_at, revoked_at, previous_digest, previous_until";

impl SqlStore {
    pub(super) async fn insert_token(&self, token: NewToken) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, name, digest, scopes, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token.id.as_str())
        .bind(token.name.as_str())
        .bind(token.digest.as_str())
        .bind(token.scopes.join(" "))
        .bind(ms(token.created_at))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let event = PendingEvent::global(
            "token.created",
            json!({"token_id": token.id, "name": token.name, "scopes": token.scopes}),
        );
        self.append_audit(&mut tx, vec![event], token.created_at).await?;
        tx.commit().await.map_err(db_err)
    }

    pub(super) async fn token_with(&self, digest: &str) -> Result<Option<TokenRecord>, StoreError> {
        // The current secret first: a digest is never both, but a row
        // found by its current secret must win if it ever were.
        sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE digest = $1 OR previous_digest = $1 \
             ORDER BY CASE WHEN digest = $1 THEN 0 ELSE 1 END LIMIT 1"
        ))
        .bind(digest)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(token_record)
        .transpose()
    }

    pub(super) async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        sqlx::query(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id"))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?
            .iter()
            .map(token_record)
            .collect()
    }

    pub(super) async fn revoke(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(ms(now))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        self.append_audit(&mut tx, vec![PendingEvent::global("token.revoked", json!({"token_id": id}))], now)
            .await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    pub(super) async fn rotate(
        &self,
        id: &str,
        digest: &str,
        previous_until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let previous_until = previous_until.filter(|until| *until > now);
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE api_tokens SET previous_digest = CASE WHEN $1 IS NULL THEN NULL ELSE digest END, \
             previous_until = $1, digest = $2 WHERE id = $3 AND revoked_at IS NULL",
        )
        .bind(previous_until.map(ms))
        .bind(digest)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let event = PendingEvent::global(
            "token.rotated",
            json!({"token_id": id, "previous_valid_until": previous_until.map(|t| t.to_rfc3339())}),
        );
        self.append_audit(&mut tx, vec![event], now).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }

    pub(super) async fn suppressed_hashes(&self, hashes: &[String]) -> Result<Vec<String>, StoreError> {
        let unique: BTreeSet<&str> = hashes.iter().map(String::as_str).collect();
        let unique: Vec<&str> = unique.into_iter().collect();
        let mut found = Vec::new();
        for chunk in unique.chunks(1000) {
            let sql = format!(
                "SELECT DISTINCT i.subject_hash FROM identifiers i JOIN requests r ON r.id = i.request_id \
                 WHERE r.status IN ('completed', 'completed_with_exemptions') AND {}",
                self.dialect.in_keys("i.subject_hash", 1, Keys::Text)
            );
            let rows = sqlx::query(&sql).bind(key_list(chunk)).fetch_all(&self.pool).await.map_err(db_err)?;
            for r in &rows {
                found.push(col(r, "subject_hash")?);
            }
        }
        Ok(found)
    }

    pub(super) async fn keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        sqlx::query(
            "SELECT id, public_key, wrapped_key, created_at, retired_at FROM signing_keys \
             ORDER BY created_at DESC, id DESC",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| {
            Ok(SigningKeyRecord {
                id: col(r, "id")?,
                public_key: col(r, "public_key")?,
                wrapped_key: hex::decode(col::<String>(r, "wrapped_key")?)
                    .map_err(|_| StoreError::Corrupt("bad wrapped signing key".into()))?,
                created_at: time(col(r, "created_at")?)?,
                retired_at: opt_time(col(r, "retired_at")?)?,
            })
        })
        .collect()
    }

    pub(super) async fn insert_signing_key(&self, key: SigningKeyRecord) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
            .bind(ms(key.created_at))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query(
            "INSERT INTO signing_keys (id, public_key, wrapped_key, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(key.id.as_str())
        .bind(key.public_key.as_str())
        .bind(hex::encode(&key.wrapped_key))
        .bind(ms(key.created_at))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let event = PendingEvent::global(
            "certificate_key.added",
            json!({"key_id": key.id, "public_key": key.public_key}),
        );
        self.append_audit(&mut tx, vec![event], key.created_at).await?;
        tx.commit().await.map_err(db_err)
    }

    pub(super) async fn replace_signing_key_wrapping(
        &self,
        id: &str,
        wrapped: Vec<u8>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let updated = sqlx::query("UPDATE signing_keys SET wrapped_key = $1 WHERE id = $2")
            .bind(hex::encode(&wrapped))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
        if updated != 1 {
            return Err(StoreError::Corrupt(format!("certificate signing key {id} vanished")));
        }
        let event = PendingEvent::global("certificate_key.rewrapped", json!({"key_id": id}));
        self.append_audit(&mut tx, vec![event], now).await?;
        tx.commit().await.map_err(db_err)
    }
}
