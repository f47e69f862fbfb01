//! The hash-chained audit trail. Each event's hash covers its content and
//! the previous event's hash, so an edited, removed or reordered event
//! breaks the chain at a point that [`ChainCheck`] names.

use chrono::{DateTime, Utc};
use lethe_core::{RequestId, TaskId};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The hash before the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit record. `detail` never holds an identifier; a subject appears
/// only as a keyed hash.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub request_id: Option<RequestId>,
    pub task_id: Option<TaskId>,
    pub kind: String,
    /// JSON text, exactly as hashed.
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// An event not yet written; the store assigns its place in the chain.
#[derive(Debug, Clone)]
pub(crate) struct PendingEvent {
    pub request_id: Option<RequestId>,
    pub task_id: Option<TaskId>,
    pub kind: &'static str,
    pub detail: Value,
}

impl PendingEvent {
    pub fn new(request: RequestId, task: Option<TaskId>, kind: &'static str, detail: Value) -> Self {
        Self { request_id: Some(request), task_id: task, kind, detail }
    }

    /// An event about no single request (e.g. a legal hold).
    pub fn global(kind: &'static str, detail: Value) -> Self {
        Self { request_id: None, task_id: None, kind, detail }
    }
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditCheck {
    Intact {
        events: u64,
        head: String,
    },
    /// The first event (by sequence number) at which the chain breaks, and why.
    Broken {
        seq: i64,
        reason: String,
    },
}

/// The hash of an event: SHA-256 over the previous hash and the event's
/// fields, each length-prefixed so that no two field lists collide.
pub fn event_hash(
    prev_hash: &str,
    seq: i64,
    at_ms: i64,
    request_id: Option<&str>,
    task_id: Option<&str>,
    kind: &str,
    detail: &str,
) -> String {
    let mut h = Sha256::new();
    let at = at_ms.to_string();
    let seq = seq.to_string();
    for field in [prev_hash, &seq, &at, request_id.unwrap_or(""), task_id.unwrap_or(""), kind, detail] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The chain checked event by event, in sequence order, so that a trail of
/// any length is checked in pages.
pub(crate) struct ChainCheck {
    prev: String,
    next_seq: i64,
}

impl Default for ChainCheck {
    fn default() -> Self {
        Self { prev: GENESIS.to_owned(), next_seq: 1 }
    }
}

impl ChainCheck {
    /// The sequence number of the last event checked (0 before the first).
    pub(crate) fn last_seq(&self) -> i64 {
        self.next_seq - 1
    }

    /// Checks the next event: its sequence number, its link and its hash.
    pub(crate) fn feed(&mut self, e: &AuditEvent) -> Result<(), AuditCheck> {
        let expected_seq = self.next_seq;
        if e.seq != expected_seq {
            return Err(AuditCheck::Broken {
                seq: expected_seq,
                reason: format!("event {expected_seq} is missing (found {} next)", e.seq),
            });
        }
        if e.prev_hash != self.prev {
            return Err(AuditCheck::Broken {
                seq: e.seq,
                reason: "link to the previous event does not match (removed or reordered)".into(),
            });
        }
        let rid = e.request_id.map(|r| r.to_string());
        let tid = e.task_id.map(|t| t.to_string());
        let hash = event_hash(
            &self.prev,
            e.seq,
            e.at.timestamp_millis(),
            rid.as_deref(),
            tid.as_deref(),
            &e.kind,
            &e.detail,
        );
        if hash != e.hash {
            return Err(AuditCheck::Broken {
                seq: e.seq,
                reason: "content does not match its hash (edited)".into(),
            });
        }
        self.prev = hash;
        self.next_seq += 1;
        Ok(())
    }

    /// The verdict once every event up to the head's has been fed: the head
    /// must record the last event and its hash.
    pub(crate) fn finish(self, head: (i64, &str)) -> AuditCheck {
        let last = self.last_seq();
        if head.0 != last || head.1 != self.prev {
            return AuditCheck::Broken {
                seq: last + 1,
                reason: format!("the chain head records event {} but the trail ends at {last}", head.0),
            };
        }
        AuditCheck::Intact { events: last as u64, head: self.prev }
    }
}
