//! Delivers one endpoint's events in audit order: claims the endpoint's
//! cursor (a lease, so that one replica delivers at a time), sends each
//! event until the endpoint answers 2xx or the attempts run out, records
//! every attempt, and moves the cursor past the event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use lethe_core::{Identifier, MasterKey};
use lethe_store::{StateStore, StoreError, WebhookDelivery};

use super::{signature, Event, WebhookEndpoint, WebhookError, AUDIT_KINDS};
use crate::clock::Clock;
use crate::metrics::WEBHOOKS_GIVEN_UP_TOTAL;

/// Audit events read per look at the trail.
const BATCH: u32 = 100;

/// The outcome of one attempt.
struct Attempt {
    status_code: Option<u16>,
    error: Option<String>,
}

pub struct WebhookDispatcher {
    store: Arc<dyn StateStore>,
    master: MasterKey,
    clock: Arc<dyn Clock>,
    endpoint: WebhookEndpoint,
    client: reqwest::Client,
    owner: String,
    poll_interval: Duration,
    lease: Duration,
    /// How far this replica last found the trail handled.
    seen: AtomicI64,
    /// Token id → name, for [`WebhookEndpoint::submitted_by`]; read again
    /// when a request names a token not in it.
    token_names: tokio::sync::Mutex<HashMap<String, String>>,
}

impl WebhookDispatcher {
    pub fn new(
        store: Arc<dyn StateStore>,
        master: MasterKey,
        clock: Arc<dyn Clock>,
        endpoint: WebhookEndpoint,
        poll_interval: Duration,
        lease: Duration,
    ) -> Result<Self, WebhookError> {
        let client = reqwest::Client::builder()
            .timeout(endpoint.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Lethe-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| WebhookError::Endpoint {
                name: endpoint.name.clone(),
                reason: "cannot build an HTTP client".into(),
            })?;
        // The claim is renewed before each attempt, so it must outlast one.
        let lease = lease.max(endpoint.timeout * 2);
        Ok(Self {
            store,
            master,
            clock,
            endpoint,
            client,
            owner: format!("webhooks-{}", uuid::Uuid::new_v4()),
            poll_interval,
            lease,
            seen: AtomicI64::new(0),
            token_names: tokio::sync::Mutex::default(),
        })
    }

    pub fn endpoint(&self) -> &WebhookEndpoint {
        &self.endpoint
    }

    /// Claims (or renews the claim on) the endpoint's cursor.
    async fn claim(&self) -> Result<Option<i64>, StoreError> {
        self.store.claim_webhook_cursor(&self.endpoint.name, &self.owner, self.lease, self.clock.now()).await
    }

    /// Waits `delay`, renewing the claim every third of a lease so that a
    /// long backoff keeps the endpoint; false if the claim was lost.
    async fn wait_holding(&self, delay: Duration) -> Result<bool, StoreError> {
        let step = (self.lease / 3).max(Duration::from_millis(100));
        let mut left = delay;
        while !left.is_zero() {
            let nap = left.min(step);
            tokio::time::sleep(nap).await;
            left -= nap;
            if !left.is_zero() && self.claim().await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub async fn run(self) {
        // At 0 from the start, so that the first event given up is a change.
        metrics::counter!(WEBHOOKS_GIVEN_UP_TOTAL, "endpoint" => self.endpoint.name.clone()).increment(0);
        self.check_token_names().await;
        let mut backoff = crate::dispatcher::delays(self.poll_interval);
        loop {
            match self.run_once().await {
                Ok(0) => {
                    backoff = crate::dispatcher::delays(self.poll_interval);
                    tokio::time::sleep(self.poll_interval).await;
                }
                Ok(_) => backoff = crate::dispatcher::delays(self.poll_interval),
                Err(e) => {
                    let delay = backoff.next().unwrap_or(self.poll_interval);
                    tracing::warn!(endpoint = %self.endpoint.name, error = %e, ?delay, "webhook delivery loop failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Claims the endpoint and handles one page of audit events. Returns
    /// how many were handled (0: nothing new, or another replica holds the
    /// endpoint).
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let name = self.endpoint.name.as_str();
        // A read first: claiming writes, and an idle endpoint should not
        // write to the store on every poll.
        let seen = self.seen.load(Ordering::Relaxed);
        let peek = self.store.audit_events_after(seen, &AUDIT_KINDS, 1).await?;
        if peek.events.is_empty() && peek.scanned_to <= seen {
            return Ok(0);
        }
        let Some(cursor) = self.claim().await? else { return Ok(0) };
        let page = self.store.audit_events_after(cursor, &AUDIT_KINDS, BATCH).await?;
        let mut handled = 0;
        for audit in &page.events {
            let event = Event::from_audit(audit).filter(|e| self.endpoint.events.contains(&e.kind));
            let event = match event {
                Some(event) if self.endpoint.submitted_by.is_some() => {
                    self.submitted_by_wanted(&event).await?.then_some(event)
                }
                event => event,
            };
            if let Some(event) = event {
                if !self.deliver(&event).await? {
                    return Ok(handled);
                }
            }
            if !self.store.advance_webhook_cursor(name, &self.owner, audit.seq, self.clock.now()).await? {
                return Ok(handled);
            }
            handled += 1;
        }
        if page.scanned_to > cursor && page.events.last().is_none_or(|e| e.seq < page.scanned_to) {
            self.store.advance_webhook_cursor(name, &self.owner, page.scanned_to, self.clock.now()).await?;
        }
        self.seen.store(page.scanned_to.max(cursor), Ordering::Relaxed);
        Ok(handled)
    }

    /// Warns of `submitted_by` names that no token has (yet): a misspelt
    /// name would drop every event in silence.
    async fn check_token_names(&self) {
        let Some(names) = &self.endpoint.submitted_by else { return };
        let Ok(tokens) = self.store.list_tokens().await else { return };
        for name in names.iter().filter(|n| !tokens.iter().any(|t| &t.name == *n)) {
            tracing::warn!(endpoint = %self.endpoint.name, token_name = %name,
                "webhook endpoint's submitted_by names no token; it hears of no request of that name until one is created");
        }
    }

    /// Whether `event`'s request was submitted with a token of one of the
    /// endpoint's `submitted_by` names.
    async fn submitted_by_wanted(&self, event: &Event) -> Result<bool, StoreError> {
        let Some(names) = &self.endpoint.submitted_by else { return Ok(true) };
        let Some(detail) = self.store.request(event.request_id).await? else { return Ok(false) };
        let Some(token) = detail.request.submitted_by else { return Ok(false) };
        let mut known = self.token_names.lock().await;
        if !known.contains_key(&token) {
            *known = self.store.list_tokens().await?.into_iter().map(|t| (t.id, t.name)).collect();
        }
        Ok(known.get(&token).is_some_and(|name| names.contains(name)))
    }

    /// Sends `event` until the endpoint accepts it or the attempts run out,
    /// recording each attempt. False if the claim was lost to another
    /// replica (which then delivers the event).
    async fn deliver(&self, event: &Event) -> Result<bool, StoreError> {
        let e = &self.endpoint;
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(e.initial_delay)
            .with_max_delay(e.max_delay.max(e.initial_delay))
            .with_jitter()
            .without_max_times()
            .build();
        let max_attempts = e.max_attempts.max(1);
        for attempt in 1..=max_attempts {
            if self.claim().await?.is_none() {
                return Ok(false);
            }
            let Some(body) = self.body(event).await? else {
                tracing::warn!(endpoint = %e.name, event = %event.id, "the event's request is missing; skipped");
                return Ok(true);
            };
            let now = self.clock.now();
            let started = Instant::now();
            let result = self.send(event, &body, attempt, now.timestamp()).await;
            let delivered = result.error.is_none();
            let delay = (!delivered && attempt < max_attempts)
                .then(|| delays.next().unwrap_or(e.max_delay).min(e.max_delay));
            let record = WebhookDelivery {
                id: uuid::Uuid::now_v7().to_string(),
                endpoint: e.name.clone(),
                event_id: event.id.clone(),
                event_type: event.kind.as_str().to_owned(),
                seq: event.seq,
                request_id: Some(event.request_id),
                attempt,
                status_code: result.status_code,
                error: result.error.clone(),
                delivered,
                created_at: now,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                next_attempt_at: delay.and_then(|d| chrono::Duration::from_std(d).ok()).map(|d| now + d),
            };
            self.store.record_webhook_delivery(&record).await?;
            let (endpoint, id, kind) = (&e.name, &event.id, event.kind.as_str());
            match (&result.error, delay) {
                (None, _) => {
                    tracing::info!(%endpoint, event = %id, kind, attempt, status = ?result.status_code, "webhook delivered");
                    return Ok(true);
                }
                (Some(error), Some(delay)) => {
                    tracing::warn!(%endpoint, event = %id, kind, attempt, %error, ?delay, "webhook delivery failed; will retry");
                    if !self.wait_holding(delay).await? {
                        return Ok(false);
                    }
                }
                (Some(error), None) => {
                    metrics::counter!(WEBHOOKS_GIVEN_UP_TOTAL, "endpoint" => endpoint.clone()).increment(1);
                    tracing::warn!(%endpoint, event = %id, kind, attempt, %error, "webhook delivery failed; attempts exhausted, event given up");
                }
            }
        }
        Ok(true)
    }

    /// The payload as of now: identifiers only if the endpoint asks for
    /// them, the event may carry them and the request's key still exists.
    /// `None` if the request is unknown.
    async fn body(&self, event: &Event) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(detail) = self.store.request(event.request_id).await? else { return Ok(None) };
        let identifiers = if self.endpoint.include_identifiers && event.kind.may_carry_identifiers() {
            self.identifiers(event).await?
        } else {
            None
        };
        let payload = event.payload(&detail.request, identifiers.as_deref());
        Ok(Some(serde_json::to_vec(&payload).unwrap_or_default()))
    }

    async fn identifiers(&self, event: &Event) -> Result<Option<Vec<Identifier>>, StoreError> {
        let Some(sealed) = self.store.sealed_subject(event.request_id).await? else { return Ok(None) };
        let opened = sealed.open(&self.master, event.request_id);
        if opened.is_none() {
            tracing::warn!(endpoint = %self.endpoint.name, event = %event.id, "identifiers cannot be opened; sent without them");
        }
        Ok(opened)
    }

    /// One POST. Errors are described by Lethe, never copied from the HTTP
    /// client (whose messages quote the URL).
    async fn send(&self, event: &Event, body: &[u8], attempt: u32, timestamp: i64) -> Attempt {
        let signature = signature::sign(self.endpoint.secret.expose(), timestamp, body);
        let sent = self
            .client
            .post(&self.endpoint.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(signature::HEADER, signature)
            .header(super::EVENT_ID_HEADER, &event.id)
            .header(super::EVENT_TYPE_HEADER, event.kind.as_str())
            .header(super::ATTEMPT_HEADER, attempt.to_string())
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {
                Attempt { status_code: Some(response.status().as_u16()), error: None }
            }
            Ok(response) => {
                let status = response.status();
                Attempt {
                    status_code: Some(status.as_u16()),
                    error: Some(format!("HTTP {}", status.as_u16())),
                }
            }
            Err(e) => {
                let error = if e.is_timeout() {
                    format!("no answer within {} ms", self.endpoint.timeout.as_millis())
                } else if e.is_connect() {
                    "connection failed".to_owned()
                } else if e.is_builder() {
                    "the request could not be built (check the URL)".to_owned()
                } else {
                    "the request failed".to_owned()
                };
                Attempt { status_code: None, error: Some(error) }
            }
        }
    }
}
