//! Lethe connector for Redis (and servers speaking its protocol, such as
//! Valkey).
//!
//! The subject's data is declared dataset by dataset in a [`RedisConfig`],
//! each with its data category and one of:
//! - `key = "session:{customer_id}"`: a key built from a template, deleted
//!   with `UNLINK`;
//! - `pattern = "cart:{customer_id}:*"`: every key matching a glob, found
//!   with `SCAN MATCH … COUNT` and deleted with `UNLINK` in batches; the
//!   substituted values are escaped, so an identifier cannot widen the
//!   pattern;
//! - `hash = "loyalty:index"` with `field = "{email}"`: a hash field
//!   (`HDEL`);
//! - `set = "newsletter:subscribers"` or `zset = "…"` with
//!   `member = "{email}"`: a set or sorted-set member (`SREM`, `ZREM`).
//!
//! Placeholders name identifier types (`{email}`, `{customer_id}`, any
//! custom type), optionally hashed (`{email|sha256}`, `{email|md5}`); a
//! dataset whose types the task has no value for is left alone.
//!
//! Each dataset follows the task's treatment of its category:
//! erase or anonymise delete (a Redis value cannot be anonymised in place),
//! a retention or hold keeps the data and reports how much, a category
//! without directive is left untouched. `verify` counts what is still there
//! in the datasets to be erased. Keys are built from identifiers, so no key
//! ever appears in a log line or an error message.

mod config;
mod connector;
mod error;
mod kind;
mod template;

pub use config::{Collection, Dataset, DatasetConfig, RedisConfig, Target, MAX_BATCH_SIZE};
pub use connector::RedisConnector;
pub use kind::RedisKind;
pub use template::{Filter, Syntax, Template};
