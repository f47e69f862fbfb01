//! Lethe connector for SQL stores: PostgreSQL, MySQL/MariaDB and SQLite.
//!
//! The store is declared table by table in a [`SqlConfig`]: how the
//! subject's rows are found (a column per identifier type, or a `parent`
//! table they hang off) and whether they are deleted or anonymised column by
//! column. One code path serves the three engines through `sqlx::AnyPool`;
//! a small [`Dialect`] renders placeholders and quotes the configured names,
//! which are validated when the configuration is loaded. Identifier values
//! are only ever bound as parameters.
//!
//! Each table declares its data category. A task carries a directive per
//! category: `erase` applies the table's treatment, `anonymize` too (only
//! on an `anonymize` table), `retain` applies it to the rows past their
//! period (counted from the table's `date_column` where a row has one) and
//! keeps the others, `hold` touches nothing; a table whose category has no
//! directive is left untouched. A parent row referenced by a kept child row
//! is kept too. Kept rows are reported with their legal basis and end.
//!
//! An erase runs in one transaction, children before parents, and reports
//! the rows deleted and anonymised per table and the rows kept; verify
//! counts what should be gone but is left. A large table can declare a
//! `batch_size`: its rows are then treated in batches that each commit on
//! their own (see `batch`), and the tables before and after it in the
//! children-first order in transactions of their own.

mod anonymize;
mod batch;
mod catalog;
mod config;
mod connector;
mod dialect;
mod error;
mod kind;
mod query;
mod retention;
mod shared;

pub use config::{
    Compare, MatchColumn, ParentConfig, SqlConfig, Strategy, TableAction, TableConfig, MIN_HASH_KEY_LEN,
};
pub use connector::SqlConnector;
pub use dialect::Dialect;
pub use kind::SqlKind;
