//! The messages on the bus (see docs/protocol.md). Both carry `version`;
//! a consumer rejects a version it does not know.

use chrono::{DateTime, Utc};
use lethe_core::{Action, Outcome, Regulation, RequestId, SealedIdentifier, TaskId};
use serde::{Deserialize, Serialize};

use crate::Undecodable;

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// A unit of work for a connector: one subject in one system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskMessage {
    pub version: u32,
    pub task_id: TaskId,
    pub request_id: RequestId,
    pub system: String,
    pub action: Action,
    /// 1 for the first dispatch, incremented on every redispatch.
    pub attempt: u32,
    pub regulation: Regulation,
    pub due_at: DateTime<Utc>,
    /// The subject's identifiers, sealed under the request's data key.
    pub identifiers: Vec<SealedIdentifier>,
    pub issued_at: DateTime<Utc>,
}

/// A connector's report on one task attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultMessage {
    pub version: u32,
    pub task_id: TaskId,
    pub request_id: RequestId,
    pub system: String,
    pub attempt: u32,
    pub outcome: Outcome,
    pub reported_at: DateTime<Utc>,
    /// Free-form name of the worker instance, for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8], version: impl Fn(&T) -> u32) -> Result<T, Undecodable> {
    let fail = |reason: String| Undecodable {
        reason,
        raw: raw.to_vec(),
    };
    let msg: T = serde_json::from_slice(raw).map_err(|e| fail(format!("invalid envelope: {e}")))?;
    match version(&msg) {
        ENVELOPE_VERSION => Ok(msg),
        v => Err(fail(format!("unsupported envelope version {v}"))),
    }
}

impl TaskMessage {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Undecodable> {
        decode(raw, |m: &Self| m.version)
    }
}

impl ResultMessage {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Undecodable> {
        decode(raw, |m: &Self| m.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip_and_bad_input_is_undecodable() {
        let msg = ResultMessage {
            version: ENVELOPE_VERSION,
            task_id: TaskId::new(),
            request_id: RequestId::new(),
            system: "crm".into(),
            attempt: 1,
            outcome: Outcome::NotFound { residual: Some(0) },
            reported_at: Utc::now(),
            worker: None,
        };
        assert_eq!(ResultMessage::decode(&msg.encode()).unwrap(), msg);
        let err = ResultMessage::decode(b"{not json").unwrap_err();
        assert!(err.reason.starts_with("invalid envelope"));
        let mut v = serde_json::to_value(&msg).unwrap();
        v["version"] = 2.into();
        let err = ResultMessage::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err.reason, "unsupported envelope version 2");
    }
}
