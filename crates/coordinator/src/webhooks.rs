//! Webhooks for self-service portals: configured endpoints receive
//! `request.received`, `request.extended`, `request.completed`,
//! `request.completed_with_exemptions` and `request.failed`, signed (see
//! [`signature`]), retried with backoff, and logged per attempt.
//!
//! Events come from the hash-chained audit trail, which records each of
//! them in the same transaction as the change it describes. Each endpoint
//! tails the trail from a durable cursor (the last audit event it handled),
//! so nothing is lost on a crash and events reach an endpoint in order;
//! delivery is at least once, and [`Payload::id`] lets a receiver drop
//! duplicates. A payload carries no identifier unless the endpoint has
//! `include_identifiers`, the request's data key still exists and the event
//! does not answer the request ([`EventType::may_carry_identifiers`]).

pub mod dispatcher;
pub mod signature;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lethe_core::{Identifier, Regulation, RequestId, RequestStatus};
use lethe_store::{AuditEvent, RequestRecord, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use dispatcher::WebhookDispatcher;
pub use signature::{sign, verify, SignatureError};

use crate::Coordinator;

/// The audit records that become webhook events.
pub(crate) const AUDIT_KINDS: [&str; 3] = ["request.received", "request.status", "request.extended"];

/// Header with the event's id (the same on every attempt).
pub const EVENT_ID_HEADER: &str = "Lethe-Event-Id";
/// Header with the event's type.
pub const EVENT_TYPE_HEADER: &str = "Lethe-Event-Type";
/// Header with the attempt number, from 1.
pub const ATTEMPT_HEADER: &str = "Lethe-Delivery-Attempt";

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "request.received")]
    Received,
    #[serde(rename = "request.extended")]
    Extended,
    #[serde(rename = "request.completed")]
    Completed,
    #[serde(rename = "request.completed_with_exemptions")]
    CompletedWithExemptions,
    #[serde(rename = "request.failed")]
    Failed,
}

impl EventType {
    pub const ALL: [Self; 5] =
        [Self::Received, Self::Extended, Self::Completed, Self::CompletedWithExemptions, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "request.received",
            Self::Extended => "request.extended",
            Self::Completed => "request.completed",
            Self::CompletedWithExemptions => "request.completed_with_exemptions",
            Self::Failed => "request.failed",
        }
    }

    /// Whether a payload of this event may carry the subject's identifiers
    /// (for an endpoint with `include_identifiers`, while the key exists).
    /// Never once the request is answered: `request.completed` comes after
    /// the key is destroyed, and `request.completed_with_exemptions` is the
    /// answer too, although its key is kept for the follow-ups.
    pub fn may_carry_identifiers(self) -> bool {
        !matches!(self, Self::Completed | Self::CompletedWithExemptions)
    }

    /// The event an audit record announces, if any.
    pub fn of_audit(kind: &str, detail: &Value) -> Option<Self> {
        match kind {
            "request.received" => Some(Self::Received),
            "request.extended" => Some(Self::Extended),
            "request.status" => match detail.get("to").and_then(Value::as_str)? {
                "completed" => Some(Self::Completed),
                "completed_with_exemptions" => Some(Self::CompletedWithExemptions),
                "failed" => Some(Self::Failed),
                _ => None,
            },
            _ => None,
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|e| e.as_str() == s).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|e| e.as_str()).collect();
            format!("unknown webhook event {s:?}; known: {}", known.join(", "))
        })
    }
}

/// An endpoint's signing secret. It never appears in `Debug` output, logs
/// or errors.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(Arc::from(secret.into()))
    }

    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A configured webhook endpoint.
#[derive(Clone)]
pub struct WebhookEndpoint {
    /// Unique name: the key of its cursor and of its delivery log.
    pub name: String,
    /// `https://…` (or `http://…`); not logged, not stored.
    pub url: String,
    pub secret: Secret,
    /// The events it receives.
    pub events: BTreeSet<EventType>,
    /// Add the request's identifiers while its data key exists.
    pub include_identifiers: bool,
    /// Attempts per event before it is given up (and logged as such).
    pub max_attempts: u32,
    /// How long one attempt may take.
    pub timeout: Duration,
    /// Delay before the second attempt; doubled (with jitter) for each further one.
    pub initial_delay: Duration,
    /// Upper bound of the delay between attempts.
    pub max_delay: Duration,
    /// Only the events of requests submitted with an API token of one of
    /// these names (a portal's own requests); every request's when `None`.
    pub submitted_by: Option<BTreeSet<String>>,
}

impl WebhookEndpoint {
    /// An endpoint receiving every event, without identifiers, with the
    /// default retry settings.
    pub fn new(name: impl Into<String>, url: impl Into<String>, secret: Secret) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            secret,
            events: EventType::ALL.into_iter().collect(),
            include_identifiers: false,
            max_attempts: 8,
            timeout: Duration::from_secs(10),
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            submitted_by: None,
        }
    }
}

impl fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("name", &self.name)
            .field("url", &"[redacted]")
            .field("secret", &self.secret)
            .field("events", &self.events)
            .field("include_identifiers", &self.include_identifiers)
            .field("max_attempts", &self.max_attempts)
            .field("timeout", &self.timeout)
            .field("initial_delay", &self.initial_delay)
            .field("max_delay", &self.max_delay)
            .field("submitted_by", &self.submitted_by)
            .finish()
    }
}

/// The body of a webhook delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// Unique per event, the same on every attempt and for every endpoint:
    /// `evt_` and the start of the audit event's hash.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// When the event happened.
    pub created_at: DateTime<Utc>,
    pub request: RequestPayload,
}

/// The request an event is about, as of that event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestPayload {
    pub id: RequestId,
    pub status: RequestStatus,
    pub regulation: Regulation,
    pub received_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    /// Set when the request is answered (final status).
    pub finished_at: Option<DateTime<Utc>>,
    /// The submitter's own reference, if it gave one.
    pub external_ref: Option<String>,
    /// For `request.extended`: the due date before, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<ExtensionPayload>,
    /// Only for an endpoint with `include_identifiers`, while the request's
    /// data key exists, and never in `request.completed` or
    /// `request.completed_with_exemptions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifiers: Option<Vec<IdentifierPayload>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtensionPayload {
    pub original_due_at: DateTime<Utc>,
    pub reason: String,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentifierPayload {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl fmt::Debug for IdentifierPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentifierPayload({}: [redacted])", self.kind)
    }
}

/// A webhook event read from the audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub kind: EventType,
    /// The audit event's sequence number.
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub request_id: RequestId,
    detail: Value,
}

impl Event {
    /// The webhook event an audit record announces, if any.
    pub fn from_audit(e: &AuditEvent) -> Option<Self> {
        let detail: Value = serde_json::from_str(&e.detail).ok()?;
        let kind = EventType::of_audit(&e.kind, &detail)?;
        Some(Self {
            id: format!("evt_{}", e.hash.get(..32).unwrap_or(&e.hash)),
            kind,
            seq: e.seq,
            at: e.at,
            request_id: e.request_id?,
            detail,
        })
    }

    fn detail_time(&self, field: &str) -> Option<DateTime<Utc>> {
        self.detail.get(field).and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// The payload, with the request as of this event: the status it
    /// reached, the due date it set.
    pub fn payload(&self, request: &RequestRecord, identifiers: Option<&[Identifier]>) -> Payload {
        let (status, finished_at) = match self.kind {
            EventType::Received => (RequestStatus::Received, None),
            // The status when it was extended (recorded since the event
            // carries it; the request's own for older events).
            EventType::Extended => (
                self.detail
                    .get("status")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or(request.status),
                None,
            ),
            // Completed after its exemptions' follow-ups: finished when it
            // was answered, as the request and its certificate say.
            EventType::Completed => (
                RequestStatus::Completed,
                Some(request.finished_at.filter(|f| *f <= self.at).unwrap_or(self.at)),
            ),
            EventType::CompletedWithExemptions => (RequestStatus::CompletedWithExemptions, Some(self.at)),
            EventType::Failed => (RequestStatus::Failed, Some(self.at)),
        };
        let due_at = match self.kind {
            EventType::Received => self.detail_time("due_at"),
            EventType::Extended => self.detail_time("to"),
            _ => None,
        }
        .unwrap_or(request.due_at);
        let extension = (self.kind == EventType::Extended).then(|| ExtensionPayload {
            original_due_at: self.detail_time("from").or(request.original_due_at).unwrap_or(request.due_at),
            reason: self.detail.get("reason").and_then(Value::as_str).unwrap_or_default().to_owned(),
        });
        let identifiers = identifiers.map(|ids| {
            ids.iter()
                .map(|i| IdentifierPayload { kind: i.kind().to_string(), value: i.expose().to_owned() })
                .collect()
        });
        Payload {
            id: self.id.clone(),
            kind: self.kind,
            created_at: self.at,
            request: RequestPayload {
                id: request.id,
                status,
                regulation: request.regulation,
                received_at: request.received_at,
                due_at,
                finished_at,
                external_ref: request.external_ref.clone(),
                extension,
                identifiers,
            },
        }
    }
}

/// Why webhooks could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("webhook endpoint {name:?}: {reason}")]
    Endpoint { name: String, reason: String },
}

impl Coordinator {
    /// Starts one webhook dispatcher per endpoint, polling the audit trail
    /// every `settings.poll_interval`; a replica's claim on an endpoint
    /// lasts `settings.lease` (at least twice the endpoint's time-out), so
    /// after a crash another replica, or the restarted one, takes over
    /// within that time. An endpoint seen for the first time gets its
    /// cursor at the head of the audit trail before this returns: it
    /// receives the events from its first start on, none from before.
    pub async fn start_webhooks(
        &mut self,
        endpoints: Vec<WebhookEndpoint>,
        settings: &crate::Settings,
    ) -> Result<(), WebhookError> {
        let mut names = BTreeSet::new();
        for endpoint in &endpoints {
            if !names.insert(endpoint.name.as_str()) {
                return Err(WebhookError::Endpoint {
                    name: endpoint.name.clone(),
                    reason: "declared twice".into(),
                });
            }
        }
        let state = &self.state;
        let mut dispatchers = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            state.store.init_webhook_cursor(&endpoint.name, state.clock.now()).await?;
            dispatchers.push(WebhookDispatcher::new(
                state.store.clone(),
                state.master.clone(),
                state.clock.clone(),
                endpoint,
                settings.poll_interval,
                settings.lease,
            )?);
        }
        for d in dispatchers {
            tracing::info!(endpoint = %d.endpoint().name, "webhook endpoint active");
            self.tasks.spawn(d.run());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use lethe_core::IdentifierKind;

    fn audit(kind: &str, detail: Value) -> AuditEvent {
        AuditEvent {
            seq: 7,
            at: Utc.with_ymd_and_hms(2026, 2, 1, 10, 0, 0).unwrap(),
            request_id: Some(RequestId::new()),
            task_id: None,
            kind: kind.into(),
            detail: detail.to_string(),
            prev_hash: "0".repeat(64),
            hash: "ab".repeat(32),
        }
    }

    fn record(id: RequestId) -> RequestRecord {
        let t = Utc.with_ymd_and_hms(2026, 1, 31, 9, 0, 0).unwrap();
        RequestRecord {
            id,
            regulation: Regulation::Gdpr,
            status: RequestStatus::InProgress,
            received_at: t,
            due_at: Utc.with_ymd_and_hms(2026, 4, 28, 9, 0, 0).unwrap(),
            updated_at: t,
            finished_at: None,
            external_ref: Some("ticket-9".into()),
            key_destroyed_at: None,
            original_due_at: Some(Utc.with_ymd_and_hms(2026, 2, 28, 9, 0, 0).unwrap()),
            extension_reason: Some("complex".into()),
            submitted_by: None,
        }
    }

    #[test]
    fn audit_records_map_to_events() {
        let status = |to: &str| audit("request.status", serde_json::json!({"from": "in_progress", "to": to}));
        let kind = |e: &AuditEvent| Event::from_audit(e).map(|e| e.kind);
        assert_eq!(kind(&audit("request.received", serde_json::json!({}))), Some(EventType::Received));
        assert_eq!(kind(&audit("request.extended", serde_json::json!({}))), Some(EventType::Extended));
        assert_eq!(kind(&status("completed")), Some(EventType::Completed));
        assert_eq!(kind(&status("completed_with_exemptions")), Some(EventType::CompletedWithExemptions));
        assert_eq!(kind(&status("failed")), Some(EventType::Failed));
        assert_eq!(kind(&status("in_progress")), None);
        assert_eq!(kind(&audit("plan.decided", serde_json::json!({}))), None);
        let e = Event::from_audit(&status("completed")).unwrap();
        assert_eq!(e.id, format!("evt_{}", "ab".repeat(16)));
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        assert!("request.deleted".parse::<EventType>().is_err());
    }

    #[test]
    fn payloads_describe_the_request_as_of_the_event_without_identifiers() {
        let received = audit(
            "request.received",
            serde_json::json!({"regulation": "gdpr", "due_at": "2026-02-28T09:00:00Z", "subjects": ["h"]}),
        );
        let event = Event::from_audit(&received).unwrap();
        let request = record(event.request_id);
        let body = serde_json::to_value(event.payload(&request, None)).unwrap();
        assert_eq!(body["type"], "request.received");
        assert_eq!(body["request"]["status"], "received");
        assert_eq!(body["request"]["due_at"], "2026-02-28T09:00:00Z");
        assert_eq!(body["request"]["finished_at"], Value::Null);
        assert_eq!(body["request"]["external_ref"], "ticket-9");
        assert!(body["request"].get("identifiers").is_none() && body["request"].get("extension").is_none());
        assert!(!body.to_string().contains("subjects"), "the audit detail is not copied: {body}");

        let extended = audit(
            "request.extended",
            serde_json::json!({"from": "2026-02-28T09:00:00Z", "to": "2026-04-28T09:00:00Z", "reason": "complex"}),
        );
        let event = Event::from_audit(&extended).unwrap();
        let body = serde_json::to_value(event.payload(&record(event.request_id), None)).unwrap();
        assert_eq!(body["request"]["due_at"], "2026-04-28T09:00:00Z");
        assert_eq!(body["request"]["extension"]["original_due_at"], "2026-02-28T09:00:00Z");
        assert_eq!(body["request"]["extension"]["reason"], "complex");
        assert_eq!(body["request"]["status"], "in_progress", "the request's own, for an event without one");
        // Delivered after the request completed: the status it had when
        // it was extended.
        let extended = audit(
            "request.extended",
            serde_json::json!({"from": "2026-02-28T09:00:00Z", "to": "2026-04-28T09:00:00Z", "reason": "complex",
                               "status": "received"}),
        );
        let event = Event::from_audit(&extended).unwrap();
        let answered = Utc.with_ymd_and_hms(2026, 1, 31, 10, 0, 0).unwrap();
        let done = RequestRecord {
            status: RequestStatus::Completed,
            finished_at: Some(answered),
            ..record(event.request_id)
        };
        let body = serde_json::to_value(event.payload(&done, None)).unwrap();
        assert_eq!(
            (&body["request"]["status"], &body["request"]["finished_at"]),
            (&serde_json::json!("received"), &Value::Null)
        );
        // Completed by the follow-ups of its exemptions: finished when it
        // was answered.
        let completed = audit(
            "request.status",
            serde_json::json!({"from": "completed_with_exemptions", "to": "completed"}),
        );
        let event = Event::from_audit(&completed).unwrap();
        let body = serde_json::to_value(event.payload(&done, None)).unwrap();
        assert_eq!(body["request"]["finished_at"], "2026-01-31T10:00:00Z");

        let done = audit("request.status", serde_json::json!({"from": "in_progress", "to": "failed"}));
        let event = Event::from_audit(&done).unwrap();
        let ada = Identifier::parse(IdentifierKind::Email, "ada@example.com").unwrap();
        let payload = event.payload(&record(event.request_id), Some(&[ada]));
        let body = serde_json::to_value(&payload).unwrap();
        assert_eq!(body["request"]["status"], "failed");
        assert_eq!(body["request"]["finished_at"], "2026-02-01T10:00:00Z");
        assert_eq!(
            body["request"]["identifiers"],
            serde_json::json!([{"type": "email", "value": "ada@example.com"}])
        );
        assert!(!format!("{payload:?}").contains("ada@"), "Debug redacts identifiers");
    }

    #[test]
    fn secrets_and_urls_never_print() {
        let endpoint = WebhookEndpoint::new(
            "portal",
            "https://user:pw@portal.example/hook?token=abc",
            Secret::new("s3cr3t"),
        );
        let debug = format!("{endpoint:?}");
        for needle in ["s3cr3t", "pw@", "token=abc"] {
            assert!(!debug.contains(needle), "{debug}");
        }
        assert!(debug.contains("portal"), "{debug}");
    }
}
