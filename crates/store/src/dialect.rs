//! The few places where PostgreSQL and SQLite need different SQL.

/// The engine behind a [`crate::SqlStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    pub fn from_url(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }

    /// Row lock for read-modify-write. SQLite runs one writer at a time
    /// (the pool has one connection), so it needs none.
    pub fn for_update(self) -> &'static str {
        match self {
            Self::Postgres => " FOR UPDATE",
            Self::Sqlite => "",
        }
    }

    /// Lets replicas claim disjoint outbox rows concurrently.
    pub fn skip_locked(self) -> &'static str {
        match self {
            Self::Postgres => " FOR UPDATE SKIP LOCKED",
            Self::Sqlite => "",
        }
    }
}

/// What a key list of [`Dialect::in_keys`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    Text,
    Int,
}

impl Dialect {
    /// `column IN` the keys bound as the one parameter `$n`, a JSON array
    /// ([`key_list`]). The statement's text does not depend on how many
    /// keys there are, so it is parsed and prepared once per connection;
    /// and PostgreSQL looks each key up in the column's index, where a list
    /// of hundreds of constants makes it estimate a large share of the
    /// table and scan all of it (which grows with the table).
    pub fn in_keys(self, column: &str, n: usize, keys: Keys) -> String {
        match (self, keys) {
            (Self::Postgres, Keys::Text) => {
                format!("{column} = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(${n} AS jsonb))))")
            }
            (Self::Postgres, Keys::Int) => format!(
                "{column} = ANY(ARRAY(SELECT CAST(jsonb_array_elements_text(CAST(${n} AS jsonb)) AS BIGINT)))"
            ),
            (Self::Sqlite, _) => format!("{column} IN (SELECT value FROM json_each(${n}))"),
        }
    }
}

/// The parameter of [`Dialect::in_keys`]: the keys as a JSON array.
pub fn key_list<T: serde::Serialize>(keys: impl IntoIterator<Item = T>) -> String {
    let keys: Vec<T> = keys.into_iter().collect();
    serde_json::to_string(&keys).unwrap_or_else(|_| "[]".to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use sqlx::{Connection, Executor, Row};

    use super::*;

    #[test]
    fn key_lists_are_json_arrays() {
        assert_eq!(key_list(["a\"b", "c,d"]), r#"["a\"b","c,d"]"#);
        assert_eq!(key_list([3i64, 4]), "[3,4]");
        assert_eq!(Dialect::Sqlite.in_keys("id", 2, Keys::Int), "id IN (SELECT value FROM json_each($2))");
    }

    /// The plan PostgreSQL picks for `sql` with `param` bound, as text.
    async fn plan(conn: &mut sqlx::AnyConnection, sql: &str, param: Option<&str>) -> String {
        let explain = format!("EXPLAIN {sql}");
        let mut query = sqlx::query(&explain);
        if let Some(p) = param {
            query = query.bind(p);
        }
        let rows = query.fetch_all(&mut *conn).await.expect("explain");
        rows.iter().map(|r| r.get::<String, _>(0)).collect::<Vec<_>>().join("\n")
    }

    /// A connection to the test server (`LETHE_TEST_PG_URL`), for tests that
    /// look at PostgreSQL's plans; they work on temporary tables.
    pub(crate) async fn postgres() -> sqlx::AnyConnection {
        sqlx::any::install_default_drivers();
        let base = std::env::var("LETHE_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        sqlx::AnyConnection::connect(&base).await.expect("PostgreSQL reachable")
    }

    #[tokio::test]
    async fn postgres_looks_keys_up_by_index_however_many() {
        let mut conn = postgres().await;
        conn.execute(
            "CREATE TEMP TABLE lethe_keys (id TEXT PRIMARY KEY, n BIGINT UNIQUE); \
             INSERT INTO lethe_keys SELECT 'key-' || g, g FROM generate_series(1, 100000) g; \
             ANALYZE lethe_keys",
        )
        .await
        .unwrap();
        let texts: Vec<String> = (0..1000).map(|i| format!("key-{}", i * 97 + 1)).collect();
        let ints: Vec<i64> = (0..1000).map(|i| i * 97 + 1).collect();

        // What a list of constants does to a table of this size.
        let constants = texts.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
        let old = plan(&mut conn, &format!("SELECT n FROM lethe_keys WHERE id IN ({constants})"), None).await;
        assert!(old.contains("Seq Scan"), "{old}");

        let sql =
            format!("SELECT n FROM lethe_keys WHERE {}", Dialect::Postgres.in_keys("id", 1, Keys::Text));
        let new = plan(&mut conn, &sql, Some(&key_list(&texts))).await;
        assert!(new.contains("Index") && !new.contains("Seq Scan"), "{new}");
        let sql = format!("SELECT id FROM lethe_keys WHERE {}", Dialect::Postgres.in_keys("n", 1, Keys::Int));
        let new = plan(&mut conn, &sql, Some(&key_list(&ints))).await;
        assert!(new.contains("Index") && !new.contains("Seq Scan"), "{new}");

        let found = sqlx::query(&sql).bind(key_list(&ints)).fetch_all(&mut conn).await.unwrap();
        assert_eq!(found.len(), 1000, "every key is found");
        let _ = conn.close().await;
    }
}
