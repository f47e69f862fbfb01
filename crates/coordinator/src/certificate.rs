//! Erasure certificates: a signed, identifier-free summary of a finished
//! request that anyone holding the public key can verify.
//!
//! A certificate is `{"payload": {...}, "signature": {"algorithm":
//! "Ed25519", "key_id", "value"}}`. The signature covers the canonical form
//! of `payload`: JSON with object keys sorted by code point, no insignificant
//! whitespace (RFC 8785 for the values a certificate holds: strings,
//! integers, booleans, null). Signing keys live in the state store, wrapped
//! by the master key; a rotated key is retired, not deleted, and stays
//! published so that the certificates it signed still verify.

use std::sync::Arc;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use lethe_core::plan::HOLD_BASIS_PREFIX;
use lethe_core::{DataKey, DatasetReport, MasterKey, Outcome, PlanItem, RequestStatus, RetainedReport};
use lethe_store::{RequestDetail, SigningKeyRecord, StateStore, StoreError};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The `format` of certificates this build writes.
pub const FORMAT: &str = "lethe-erasure-certificate/1";

/// A signed certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// What is certified; no identifier.
    #[schema(value_type = Object)]
    pub payload: Value,
    pub signature: SignatureInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignatureInfo {
    /// `Ed25519`.
    pub algorithm: String,
    /// The signing key's id (see `GET /v1/keys/certificate`).
    pub key_id: String,
    /// Base64 (standard, padded) of the 64-byte signature.
    pub value: String,
}

/// A published verification key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublicKey {
    pub key_id: String,
    /// `Ed25519`.
    pub algorithm: String,
    /// Hex of the 32-byte public key.
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    /// Set once a newer key signs; certificates it signed still verify.
    pub retired_at: Option<DateTime<Utc>>,
}

/// The certificate public keys, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublicKeys {
    pub keys: Vec<PublicKey>,
}

/// Why a certificate does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the certificate is not a valid certificate document: {0}")]
    Malformed(String),
    #[error("no public key with id {0:?} was given")]
    UnknownKey(String),
    #[error(
        "the signature does not match the content: the certificate was altered or signed by another key"
    )]
    BadSignature,
    #[error("the certificate says it was issued after its signing key {0:?} was retired")]
    IssuedAfterRetirement(String),
}

/// Reads a certificate document, refusing one in which an object names a
/// key twice: JSON readers disagree on which of the two counts (this one
/// would verify the last, another might show the first), so such a
/// document could be read as something other than what was signed.
pub fn parse(text: &str) -> Result<Certificate, VerifyError> {
    serde_json::from_str::<Unique>(text).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    serde_json::from_str(text).map_err(|e| VerifyError::Malformed(e.to_string()))
}

/// Any JSON value whose objects name each key once.
struct Unique;

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Unique)
    }
}

impl<'de> serde::de::Visitor<'de> for Unique {
    type Value = Unique;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("the key {key:?} appears twice in one object")));
            }
            map.next_value::<Unique>()?;
        }
        Ok(Unique)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        while seq.next_element::<Unique>()?.is_some() {}
        Ok(Unique)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_unit<E>(self) -> Result<Unique, E> {
        Ok(Unique)
    }
}

/// The canonical JSON text of `v`: keys sorted, no whitespace.
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&map[k])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// Verifies `certificate` with one of `keys`.
pub fn verify(certificate: &Certificate, keys: &[PublicKey]) -> Result<(), VerifyError> {
    let sig = &certificate.signature;
    if sig.algorithm != "Ed25519" {
        return Err(VerifyError::Malformed(format!("unsupported algorithm {:?}", sig.algorithm)));
    }
    let key = keys
        .iter()
        .find(|k| k.key_id == sig.key_id)
        .ok_or_else(|| VerifyError::UnknownKey(sig.key_id.clone()))?;
    let public: [u8; 32] = hex::decode(&key.public_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| VerifyError::Malformed("public key is not 32 hex-encoded bytes".into()))?;
    let public =
        VerifyingKey::from_bytes(&public).map_err(|_| VerifyError::Malformed("invalid public key".into()))?;
    let bytes: [u8; 64] = base64::engine::general_purpose::STANDARD
        .decode(&sig.value)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| VerifyError::Malformed("signature is not 64 base64-encoded bytes".into()))?;
    public
        .verify_strict(canonical(&certificate.payload).as_bytes(), &Signature::from_bytes(&bytes))
        .map_err(|_| VerifyError::BadSignature)?;
    // A retired key signs nothing more: a certificate dated after its
    // retirement was not made by the coordinator.
    let issued = certificate.payload["issued_at"].as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok());
    match (issued, key.retired_at) {
        (Some(issued), Some(retired)) if issued > retired => {
            Err(VerifyError::IssuedAfterRetirement(key.key_id.clone()))
        }
        _ => Ok(()),
    }
}

/// Signs certificates with the current key of the state store.
#[derive(Clone)]
pub struct Certifier {
    store: Arc<dyn StateStore>,
    master: MasterKey,
}

impl Certifier {
    pub fn new(store: Arc<dyn StateStore>, master: MasterKey) -> Self {
        Self { store, master }
    }

    /// Creates the first signing key if there is none, and wraps anew any
    /// key still wrapped as earlier versions wrapped it (as a request's
    /// data key).
    pub async fn ensure_key(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        if !self.master_opens_store().await? {
            match self.rotate(now).await {
                Ok(_) => {}
                // Another coordinator created the first key at the same
                // time (the store keeps one current key): use that one.
                Err(StoreError::Conflict(_)) if self.master_opens_store().await? => {}
                Err(e) => return Err(e),
            }
        }
        for key in self.store.signing_keys().await? {
            if self.master.unwrap_signing_key(&key.id, &key.wrapped_key).is_ok() {
                continue;
            }
            // Wrapped like a request's data key, such a key could be handed
            // out by the connector key endpoint to anyone able to copy it
            // into a request's row. The secret stays; its wrapping changes.
            let Ok(secret) = self.master.unwrap(&key.wrapped_key) else {
                return Err(StoreError::Corrupt(format!(
                    "certificate signing key {} does not open with the master key",
                    key.id
                )));
            };
            let wrapped = self.master.wrap_signing_key(&key.id, &secret);
            self.store.rewrap_signing_key(&key.id, wrapped, now).await?;
            tracing::info!(key_id = %key.id, "certificate signing key wrapped anew under its own label");
        }
        Ok(())
    }

    /// Whether the store has signing keys (`false`: none yet), failing if
    /// the master key cannot open the newest: it is not the key the store's
    /// data was sealed under, and a coordinator running with it could read
    /// no identifier, so would apply no hold and screen nothing.
    pub async fn master_opens_store(&self) -> Result<bool, StoreError> {
        let keys = self.store.signing_keys().await?;
        let Some(newest) = keys.iter().max_by_key(|k| k.created_at) else { return Ok(false) };
        let opens = self.master.unwrap_signing_key(&newest.id, &newest.wrapped_key).is_ok()
            || self.master.unwrap(&newest.wrapped_key).is_ok();
        if opens {
            Ok(true)
        } else {
            Err(StoreError::Conflict(
                "the master key is not the one this state store was created with (it cannot open the \
                 store's certificate signing key); start with the original key"
                    .into(),
            ))
        }
    }

    /// Adds a new signing key; the previous ones are retired but stay
    /// published. Returns the new key's id.
    pub async fn rotate(&self, now: DateTime<Utc>) -> Result<String, StoreError> {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        let signing = SigningKey::from_bytes(&secret);
        let id = format!("cert-{}", uuid::Uuid::now_v7().simple());
        let wrapped = self.master.wrap_signing_key(
            &id,
            &DataKey::from_bytes(&secret).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        );
        secret.fill(0);
        let record = SigningKeyRecord {
            id: id.clone(),
            public_key: hex::encode(signing.verifying_key().as_bytes()),
            wrapped_key: wrapped,
            created_at: now,
            retired_at: None,
        };
        self.store.add_signing_key(record).await?;
        Ok(id)
    }

    pub async fn public_keys(&self) -> Result<PublicKeys, StoreError> {
        let keys = self.store.signing_keys().await?;
        Ok(PublicKeys {
            keys: keys
                .into_iter()
                .map(|k| PublicKey {
                    key_id: k.id,
                    algorithm: "Ed25519".into(),
                    public_key: k.public_key,
                    created_at: k.created_at,
                    retired_at: k.retired_at,
                })
                .collect(),
        })
    }

    /// The signed certificate of a request that has been answered.
    pub async fn certify(
        &self,
        detail: &RequestDetail,
        now: DateTime<Utc>,
    ) -> Result<Certificate, StoreError> {
        let current = self
            .store
            .signing_keys()
            .await?
            .into_iter()
            .find(|k| k.retired_at.is_none())
            .ok_or_else(|| StoreError::Corrupt("no certificate signing key".into()))?;
        let secret = self
            .master
            .unwrap_signing_key(&current.id, &current.wrapped_key)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let signing = SigningKey::from_bytes(secret.as_bytes());
        let audit = self.store.audit_events(Some(detail.request.id)).await?;
        let runs = Runs::of(&audit);
        let payload = payload(detail, audit.last().map(|e| (e.seq, e.hash.as_str())), &runs, now);
        let signature = signing.sign(canonical(&payload).as_bytes());
        Ok(Certificate {
            payload,
            signature: SignatureInfo {
                algorithm: "Ed25519".into(),
                key_id: current.id,
                value: base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
            },
        })
    }
}

/// Whether a request's certificate can be issued.
pub fn certifiable(status: RequestStatus) -> bool {
    matches!(status, RequestStatus::Completed | RequestStatus::CompletedWithExemptions)
}

/// Data changed by attempts whose results were not applied (withdrawn by a
/// legal hold while they ran, or superseded), by system, from the trail's
/// `task.outcome_ignored` events: the certificate must not say a system's
/// data was all kept when a late attempt erased some of it.
pub(crate) fn late_changes(audit: &[lethe_store::AuditEvent]) -> Vec<(String, Value)> {
    audit
        .iter()
        .filter(|e| e.kind == "task.outcome_ignored")
        .filter_map(|e| {
            let detail: Value = serde_json::from_str(&e.detail).ok()?;
            let system = detail["system"].as_str()?.to_owned();
            Some((
                system,
                json!({"attempt": detail["attempt"], "at": e.at, "datasets": detail["outcome"]["datasets"]}),
            ))
        })
        .collect()
}

/// What each system's task keeps now, by system, as the last of its runs
/// that finished reported it (from the trail's `task.outcome` events): a
/// run that failed (a follow-up that could not reach its store, say)
/// changed nothing, so what the run before kept is kept still.
pub(crate) fn kept_now(audit: &[lethe_store::AuditEvent]) -> Vec<(String, Vec<RetainedReport>)> {
    let mut kept: Vec<(String, Vec<RetainedReport>)> = Vec::new();
    for e in audit.iter().filter(|e| e.kind == "task.outcome") {
        let Ok(detail) = serde_json::from_str::<Value>(&e.detail) else { continue };
        let Some(system) = detail["system"].as_str() else { continue };
        let Ok(outcome) = serde_json::from_value::<Outcome>(detail["outcome"].clone()) else { continue };
        let now = match outcome {
            Outcome::Erased { .. } | Outcome::NotFound { .. } => Vec::new(),
            Outcome::RetainedInPart { retained, .. } => retained,
            Outcome::Failed { .. } | Outcome::Accepted { .. } => continue,
        };
        match kept.iter_mut().find(|(s, _)| s == system) {
            Some((_, k)) => *k = now,
            None => kept.push((system.to_owned(), now)),
        }
    }
    kept
}

/// What `kept` keeps now under `plan`: a record kept for a retention
/// period whose category a legal hold has covered since (the run that kept
/// it came before the hold) is kept until the hold ends, on the hold's
/// basis, as a run under the hold reports it, not until a date that may
/// have passed.
pub(crate) fn kept_under_holds(
    kept: &[RetainedReport],
    plan: &PlanItem,
    now: DateTime<Utc>,
) -> Vec<RetainedReport> {
    kept.iter()
        .cloned()
        .map(|mut r| {
            let held = r.category.as_ref().and_then(|c| {
                plan.categories.iter().find(|p| &p.category == c && p.action == lethe_core::Action::Hold)
            });
            if let Some(basis) = held.and_then(|p| p.directive(now).basis) {
                r.basis = basis;
                r.until = None;
            }
            r
        })
        .collect()
}

/// `outcome` as [`kept_under_holds`] reads what it kept.
pub(crate) fn outcome_under_holds(outcome: &Outcome, plan: &PlanItem, now: DateTime<Utc>) -> Outcome {
    match outcome {
        Outcome::RetainedInPart { datasets, retained, residual } => Outcome::RetainedInPart {
            datasets: datasets.clone(),
            retained: kept_under_holds(retained, plan, now),
            residual: *residual,
        },
        other => other.clone(),
    }
}

/// What every applied outcome of each system's task removed, by system
/// and dataset, from the trail's `task.outcome` events: a task run again
/// (a retention period ended, a hold released) reports only what that run
/// removed, and the certificate must count the earlier runs too, each
/// attempt once. A later `purge_by` replaces an earlier one.
pub(crate) fn erased_totals(audit: &[lethe_store::AuditEvent]) -> Vec<(String, Vec<DatasetReport>)> {
    let mut totals: Vec<(String, Vec<DatasetReport>)> = Vec::new();
    // An attempt's removals count once, however often its result arrived.
    let mut counted = std::collections::HashSet::new();
    for e in audit.iter().filter(|e| e.kind == "task.outcome") {
        let Ok(detail) = serde_json::from_str::<Value>(&e.detail) else { continue };
        let Some(system) = detail["system"].as_str() else { continue };
        if !counted.insert((system.to_owned(), detail["attempt"].as_u64())) {
            continue;
        }
        let Ok(outcome) = serde_json::from_value::<Outcome>(detail["outcome"].clone()) else { continue };
        let (Outcome::Erased { datasets, .. } | Outcome::RetainedInPart { datasets, .. }) = outcome else {
            continue;
        };
        let at = match totals.iter().position(|(s, _)| s == system) {
            Some(at) => at,
            None => {
                totals.push((system.to_owned(), Vec::new()));
                totals.len() - 1
            }
        };
        let sums = &mut totals[at].1;
        for d in datasets {
            match sums.iter_mut().find(|x| x.dataset == d.dataset) {
                Some(sum) => {
                    sum.deleted += d.deleted;
                    sum.anonymized += d.anonymized;
                    sum.purge_by = d.purge_by.or(sum.purge_by);
                    // Searched by any run is searched.
                    sum.not_searched &= d.not_searched;
                }
                None => sums.push(d),
            }
        }
    }
    totals
}

/// What the trail says of every run of a request's tasks, by system.
pub(crate) struct Runs {
    /// Every applied run's removals ([`erased_totals`]).
    pub totals: Vec<(String, Vec<DatasetReport>)>,
    /// What withdrawn attempts changed ([`late_changes`]).
    pub late: Vec<(String, Value)>,
    /// What is kept now ([`kept_now`]).
    pub kept: Vec<(String, Vec<RetainedReport>)>,
}

impl Runs {
    pub fn of(audit: &[lethe_store::AuditEvent]) -> Self {
        Self { totals: erased_totals(audit), late: late_changes(audit), kept: kept_now(audit) }
    }

    pub fn removed(&self, system: &str) -> &[DatasetReport] {
        self.totals.iter().find(|(s, _)| s == system).map_or(&[], |(_, d)| d.as_slice())
    }

    pub fn late(&self, system: &str) -> Vec<&Value> {
        self.late.iter().filter(|(s, _)| s == system).map(|(_, v)| v).collect()
    }

    pub fn kept(&self, system: &str) -> Option<&[RetainedReport]> {
        self.kept.iter().find(|(s, _)| s == system).map(|(_, k)| k.as_slice())
    }
}

fn payload(detail: &RequestDetail, audit: Option<(i64, &str)>, runs: &Runs, now: DateTime<Utc>) -> Value {
    let r = &detail.request;
    let systems: Vec<Value> = detail
        .plan
        .iter()
        .map(|p| {
            let task = detail.tasks.iter().find(|t| t.system == p.system);
            let outcome = task.and_then(|t| t.last_outcome.as_ref());
            let (datasets, retained) = match outcome {
                Some(Outcome::Erased { datasets, .. }) => (json!(datasets), json!([])),
                Some(Outcome::RetainedInPart { datasets, retained, .. }) => (json!(datasets), json!(retained)),
                _ => (json!([]), json!([])),
            };
            // Every run's removals, and what the last run that finished
            // kept, where the trail has them.
            let datasets = match runs.removed(&p.system) {
                [] => datasets,
                sums => json!(sums),
            };
            let retained = runs.kept(&p.system).map_or(retained, |k| json!(kept_under_holds(k, p, now)));
            let categories: Vec<Value> = p
                .categories
                .iter()
                .map(|c| {
                    json!({
                        "category": c.category,
                        "action": c.action,
                        "rule": c.rule,
                        "basis": c.basis,
                        "legal_hold": c.hold.as_ref().map(|h| &h.id),
                    })
                })
                .collect();
            let late = runs.late(&p.system);
            let removed_any = DatasetReport::totals(runs.removed(&p.system)) != (0, 0)
                || outcome.is_some_and(Outcome::changed_data);
            let not_searched = outcome.is_some_and(|o| not_searched(p, o, runs.removed(&p.system)));
            let mut entry = json!({
                "system": p.system,
                "action": p.action,
                "state": task.map(|t| t.state),
                "outcome": outcome.map(|o| match o {
                    // Some run removed data (a follow-up may find nothing).
                    Outcome::Erased { .. } | Outcome::NotFound { .. } if removed_any => "erased",
                    // The plan says so, or the connector per dataset.
                    Outcome::Erased { .. } | Outcome::NotFound { .. } if not_searched => "not_searched",
                    // Nothing found where it searched (kept as `erased` to
                    // carry the datasets not searched); a purge date is an
                    // erasure's (a tombstone of a lost first attempt's).
                    Outcome::Erased { .. } if o.found_nothing() => "not_found",
                    Outcome::Erased { .. } => "erased",
                    Outcome::NotFound { .. } => "not_found",
                    Outcome::RetainedInPart { .. } => "retained_in_part",
                    Outcome::Failed { .. } => "failed",
                    Outcome::Accepted { .. } => "accepted",
                }),
                // A re-run after a lost result may find nothing its first
                // attempt removed: the count says the task ran again.
                "attempts": task.map(|t| t.attempts),
                "datasets": datasets,
                "retained": retained,
                // Nothing was checked in a system not searched, and only the
                // searched datasets were in one searched in part.
                "verification": if not_searched {
                    json!({"verified": false, "residual": null})
                } else {
                    let mut v = json!({"verified": outcome.and_then(Outcome::residual).is_some(), "residual": outcome.and_then(Outcome::residual)});
                    let unsearched = outcome.map(Outcome::unsearched_datasets).unwrap_or_default();
                    if !unsearched.is_empty() {
                        v["not_searched"] = json!(unsearched);
                    }
                    v
                },
                "categories": categories,
            });
            if !late.is_empty() {
                entry["late_changes"] = json!(late);
            }
            if let Some(types) = &p.searched_by {
                entry["searched_by"] = json!(types);
            }
            entry
        })
        .collect();
    let mut systems = Value::Array(systems);
    without_hold_reasons(&mut systems);
    json!({
        "format": FORMAT,
        "request_id": r.id.to_string(),
        "regulation": r.regulation,
        "status": r.status,
        "received_at": r.received_at,
        "due_at": r.due_at,
        "original_due_at": r.original_due_at,
        "finished_at": r.finished_at,
        "key_destroyed_at": r.key_destroyed_at,
        "issued_at": now,
        "systems": systems,
        "audit": audit.map(|(seq, hash)| json!({"last_event": seq, "hash": hash})),
    })
}

/// Whether a system's task searched nothing for the subject: the plan
/// gave it none of the types it finds subjects by, or its connector could
/// search none of its datasets; and no run (`removed`: every run's
/// removals) nor the `last` changed anything. The certificate and the
/// request view both say so.
pub(crate) fn not_searched(plan: &PlanItem, last: &Outcome, removed: &[DatasetReport]) -> bool {
    (plan.not_searched() || last.searched_nothing())
        && !last.changed_data()
        && DatasetReport::totals(removed) == (0, 0)
}

/// A certificate may be handed to the subject: a legal hold is named by its
/// id (`GET /v1/holds` resolves it for those who may know), and a basis
/// that quotes a hold (`legal hold <case>: <reason>`, as connectors report
/// what a hold kept) reads only `legal hold`, so that it tips no one off.
fn without_hold_reasons(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(basis) if key == "basis" && basis.starts_with(HOLD_BASIS_PREFIX) => {
                        *basis = HOLD_BASIS_PREFIX.trim_end().to_owned();
                    }
                    _ => without_hold_reasons(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(without_hold_reasons),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kept for a retention period, then held: kept until the hold ends,
    /// on its basis; other categories keep their own end.
    #[test]
    fn a_hold_placed_after_a_retention_run_is_what_keeps_the_record() {
        use lethe_core::{Action, CategoryPlan};
        let now = Utc::now();
        let category = |name: &str, action: Action, hold: Option<lethe_core::plan::HoldRef>| CategoryPlan {
            category: name.into(),
            action,
            rule: "tax".into(),
            rule_action: Action::Retain,
            basis: Some("AO §147".into()),
            period: None,
            reference: None,
            until: None,
            hold,
        };
        let hold = lethe_core::plan::HoldRef {
            id: "h1".into(),
            reason: "inquiry".into(),
            case_reference: "LIT-2".into(),
        };
        let plan = lethe_core::policy::summarize(
            "shop",
            vec![
                category("billing.invoice", Action::Hold, Some(hold)),
                category("billing.payment", Action::Retain, None),
            ],
        );
        let kept = |category: &str| RetainedReport {
            dataset: "invoices".into(),
            category: Some(category.into()),
            count: 1,
            basis: "AO §147".into(),
            until: Some(now - chrono::Duration::hours(1)),
            first_until: None,
        };
        let now_kept = kept_under_holds(&[kept("billing.invoice"), kept("billing.payment")], &plan, now);
        assert_eq!(now_kept[0].until, None, "{now_kept:?}");
        assert_eq!(now_kept[0].basis, "legal hold LIT-2: inquiry");
        assert_eq!(now_kept[1], kept("billing.payment"), "not held: as the run reported it");
    }

    #[test]
    fn hold_reasons_and_case_references_stay_out() {
        let mut v = json!([{"retained": [{"basis": "legal hold LIT-7: fraud inquiry", "count": 2},
                                         {"basis": "HGB §257(4)", "count": 1}],
                            "categories": [{"basis": "HGB §257(4)", "legal_hold": "h1"}]}]);
        without_hold_reasons(&mut v);
        assert_eq!(
            v,
            json!([{"retained": [{"basis": "legal hold", "count": 2}, {"basis": "HGB §257(4)", "count": 1}],
                    "categories": [{"basis": "HGB §257(4)", "legal_hold": "h1"}]}])
        );
    }

    #[test]
    fn canonical_form_sorts_keys_and_drops_whitespace() {
        let v: Value = serde_json::from_str(r#"{ "b": [1, {"z": null, "a": "é\n"}], "a": true }"#).unwrap();
        assert_eq!(canonical(&v), r#"{"a":true,"b":[1,{"a":"é\n","z":null}]}"#);
    }

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let payload = json!({"request_id": "r1", "systems": [{"system": "shop", "deleted": 3}]});
        let value = base64::engine::general_purpose::STANDARD
            .encode(signing.sign(canonical(&payload).as_bytes()).to_bytes());
        let cert = Certificate {
            payload,
            signature: SignatureInfo { algorithm: "Ed25519".into(), key_id: "k1".into(), value },
        };
        let key = PublicKey {
            key_id: "k1".into(),
            algorithm: "Ed25519".into(),
            public_key: hex::encode(signing.verifying_key().as_bytes()),
            created_at: Utc::now(),
            retired_at: None,
        };
        assert_eq!(verify(&cert, std::slice::from_ref(&key)), Ok(()));
        let mut changed = cert.clone();
        changed.payload["systems"][0]["deleted"] = json!(4);
        assert_eq!(verify(&changed, std::slice::from_ref(&key)), Err(VerifyError::BadSignature));
        let mut other = key.clone();
        other.key_id = "k2".into();
        assert!(matches!(verify(&cert, &[other]), Err(VerifyError::UnknownKey(_))));
    }

    fn signed(payload: Value, key_id: &str) -> Certificate {
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let value = base64::engine::general_purpose::STANDARD
            .encode(signing.sign(canonical(&payload).as_bytes()).to_bytes());
        Certificate {
            payload,
            signature: SignatureInfo { algorithm: "Ed25519".into(), key_id: key_id.into(), value },
        }
    }

    /// A document that names a key twice reads differently in different
    /// JSON readers: it is refused, however deep the repetition.
    #[test]
    fn a_document_naming_a_key_twice_is_refused() {
        let text =
            serde_json::to_string(&signed(json!({"status": "completed", "systems": [{"a": 1}]}), "k1"))
                .unwrap();
        assert!(parse(&text).is_ok());
        let twice =
            text.replacen("\"status\":\"completed\"", "\"status\":\"failed\",\"status\":\"completed\"", 1);
        assert_ne!(twice, text);
        let Err(VerifyError::Malformed(e)) = parse(&twice) else { panic!("accepted") };
        assert!(e.contains("\"status\" appears twice"), "{e}");
        let deep = text.replacen("{\"a\":1}", "{\"a\":1,\"a\":2}", 1);
        assert_ne!(deep, text);
        assert!(parse(&deep).is_err());
    }

    /// A retired key signs nothing more: a certificate dated after the
    /// retirement is refused; one dated before still verifies.
    #[test]
    fn a_certificate_issued_after_its_keys_retirement_is_refused() {
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let retired = Utc::now();
        let key = PublicKey {
            key_id: "k1".into(),
            algorithm: "Ed25519".into(),
            public_key: hex::encode(signing.verifying_key().as_bytes()),
            created_at: retired - chrono::Duration::days(30),
            retired_at: Some(retired),
        };
        let before = signed(json!({"issued_at": retired - chrono::Duration::days(1)}), "k1");
        assert_eq!(verify(&before, std::slice::from_ref(&key)), Ok(()));
        let after = signed(json!({"issued_at": retired + chrono::Duration::seconds(1)}), "k1");
        assert_eq!(verify(&after, &[key]), Err(VerifyError::IssuedAfterRetirement("k1".into())));
    }
}
