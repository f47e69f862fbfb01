//! The records of webhook delivery: the audit events an endpoint tails,
//! each delivery attempt, and a request's sealed identifiers for endpoints
//! allowed to receive them.

use chrono::{DateTime, Utc};
use lethe_core::{Identifier, MasterKey, RequestId, SealedIdentifier};

use crate::AuditEvent;

/// Audit events after a cursor, of the kinds asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    /// In chain order.
    pub events: Vec<AuditEvent>,
    /// Every event up to this sequence number has been looked at: a cursor
    /// may move here once `events` are handled, even past events of other
    /// kinds.
    pub scanned_to: i64,
}

/// One attempt to deliver an event to a webhook endpoint. Holds no payload,
/// URL or secret; `error` is a short description written by Lethe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    pub id: String,
    /// The endpoint's configured name.
    pub endpoint: String,
    pub event_id: String,
    pub event_type: String,
    /// The audit event the webhook event comes from.
    pub seq: i64,
    pub request_id: Option<RequestId>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The endpoint's HTTP status, if it answered.
    pub status_code: Option<u16>,
    pub error: Option<String>,
    /// The endpoint answered 2xx.
    pub delivered: bool,
    pub created_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// When the next attempt is due; `None` after a success or the last attempt.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Filter of the delivery log; newest first.
#[derive(Debug, Clone)]
pub struct DeliveryQuery {
    pub endpoint: Option<String>,
    pub request_id: Option<RequestId>,
    /// Only attempts older than this one (the previous page's last):
    /// its time (Unix milliseconds) and id.
    pub before: Option<(i64, String)>,
    pub limit: u32,
}

impl Default for DeliveryQuery {
    fn default() -> Self {
        Self { endpoint: None, request_id: None, before: None, limit: 100 }
    }
}

/// A request's identifiers, still sealed, with its wrapped data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSubject {
    pub wrapped_key: Vec<u8>,
    pub identifiers: Vec<SealedIdentifier>,
}

impl SealedSubject {
    /// The identifiers of `request`, opened with its data key unwrapped by
    /// `master`; `None` if the key or an identifier does not open (another
    /// master key, or damaged data).
    pub fn open(&self, master: &MasterKey, request: RequestId) -> Option<Vec<Identifier>> {
        let key = master.unwrap(&self.wrapped_key).ok()?;
        self.identifiers.iter().map(|s| key.open(request, s).ok()).collect()
    }
}
