//! What a connector reports for a task.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Rows or records affected in one dataset (a table, a list, a key space).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatasetReport {
    /// The dataset's name (the coordinator keeps at most 200 bytes of it).
    pub dataset: String,
    #[serde(default)]
    pub deleted: u64,
    #[serde(default)]
    pub anonymized: u64,
    /// For a store that removes data some time after acknowledging the
    /// deletion (log compaction, a purge job): by when the erased records
    /// are physically gone at the latest. Absent: at once, or no bound known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge_by: Option<DateTime<Utc>>,
    /// The task gave no identifier of a type this dataset finds subjects
    /// by, so nothing was looked for in it: its zero counts say nothing
    /// about the subject. Absent: searched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_searched: bool,
}

impl DatasetReport {
    pub fn new(dataset: impl Into<String>, deleted: u64, anonymized: u64) -> Self {
        Self { dataset: dataset.into(), deleted, anonymized, purge_by: None, not_searched: false }
    }

    /// A dataset the task gave no identifier for: nothing was looked for.
    pub fn unsearched(dataset: impl Into<String>) -> Self {
        Self { not_searched: true, ..Self::new(dataset, 0, 0) }
    }

    /// Records deleted and anonymised across `reports`.
    pub fn totals(reports: &[DatasetReport]) -> (u64, u64) {
        (reports.iter().map(|d| d.deleted).sum(), reports.iter().map(|d| d.anonymized).sum())
    }
}

/// Data kept on purpose, with the legal basis and the end of the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetainedReport {
    /// The dataset's name (the coordinator keeps at most 200 bytes of it).
    pub dataset: String,
    /// The data category of the dataset (at most 200 bytes kept). A
    /// connector MUST send it: without it, data kept under a legal hold
    /// released meanwhile waits (docs/protocol.md); it is optional only for
    /// results of older connectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub count: u64,
    /// The directive's basis, copied exactly (at most 500 bytes kept).
    pub basis: String,
    /// When the last of these records may go; absent while a legal hold
    /// keeps them (no end date until it is released).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// When the first of these records may go, where that is before
    /// `until` (records of different dates, each kept for its period from
    /// its own date): the coordinator runs the task again then, so that no
    /// record waits for the last one's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_until: Option<DateTime<Utc>>,
}

/// A connector's report on one attempt of one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The subject's data was erased or anonymised; `residual` is what a
    /// verification query still found (absent if not verified).
    Erased {
        datasets: Vec<DatasetReport>,
        #[serde(default)]
        residual: Option<u64>,
    },
    /// The system holds nothing for the subject.
    NotFound {
        #[serde(default)]
        residual: Option<u64>,
    },
    /// Part was erased, part must be kept.
    RetainedInPart {
        datasets: Vec<DatasetReport>,
        retained: Vec<RetainedReport>,
        #[serde(default)]
        residual: Option<u64>,
    },
    /// The attempt failed.
    Failed {
        retryable: bool,
        /// A short text for operators that never contains an identifier
        /// (the coordinator keeps at most 500 bytes of it).
        reason: String,
    },
    /// An asynchronous job runs in the external system: the coordinator
    /// dispatches the task again after `poll_after_seconds` (its own default
    /// if absent) so that the connector checks the job.
    Accepted {
        /// The external system's job id, sent back as it is: 1 to 1024
        /// bytes without control characters (any other fails the task).
        #[schema(min_length = 1)]
        job_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        poll_after_seconds: Option<u64>,
    },
}

/// An asynchronous job a connector started in an external system for a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    /// The external system's job id, as the connector reported it.
    pub id: String,
    /// When the coordinator first recorded the job; a connector's maximum
    /// wait is measured from here.
    pub accepted_at: DateTime<Utc>,
}

/// How an outcome moves a task, independent of its details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeClass {
    Succeeded,
    Retained,
    Failed,
    Accepted,
}

impl Outcome {
    /// Verification that found data left over turns a reported success into
    /// a failure: an under-deletion is never a success.
    pub fn class(&self) -> OutcomeClass {
        match self {
            Self::Erased { residual, .. }
            | Self::NotFound { residual }
            | Self::RetainedInPart { residual, .. }
                if residual.is_some_and(|r| r > 0) =>
            {
                OutcomeClass::Failed
            }
            Self::Erased { .. } | Self::NotFound { .. } => OutcomeClass::Succeeded,
            // Kept nothing after all: there is nothing to follow up.
            Self::RetainedInPart { retained, .. } if retained.is_empty() => OutcomeClass::Succeeded,
            Self::RetainedInPart { .. } => OutcomeClass::Retained,
            Self::Failed { .. } => OutcomeClass::Failed,
            Self::Accepted { .. } => OutcomeClass::Accepted,
        }
    }

    /// Whether the attempt reports records it erased or anonymised.
    pub fn changed_data(&self) -> bool {
        match self {
            Self::Erased { datasets, .. } | Self::RetainedInPart { datasets, .. } => {
                datasets.iter().any(|d| d.deleted > 0 || d.anonymized > 0)
            }
            _ => false,
        }
    }

    /// An `erased` that changed nothing and carries no purge date: kept as
    /// `erased` only to carry datasets not searched, it found nothing.
    pub fn found_nothing(&self) -> bool {
        match self {
            Self::Erased { datasets, .. } => {
                !self.changed_data() && datasets.iter().all(|d| d.purge_by.is_none())
            }
            _ => false,
        }
    }

    /// Whether the attempt could search nothing: every dataset it reports
    /// (at least one) is not searched, and it keeps nothing.
    pub fn searched_nothing(&self) -> bool {
        match self {
            Self::Erased { datasets, .. } => !datasets.is_empty() && datasets.iter().all(|d| d.not_searched),
            Self::RetainedInPart { datasets, retained, .. } => {
                retained.is_empty() && !datasets.is_empty() && datasets.iter().all(|d| d.not_searched)
            }
            _ => false,
        }
    }

    /// The datasets the attempt could not search (no identifier of their
    /// types), by name.
    pub fn unsearched_datasets(&self) -> Vec<&str> {
        match self {
            Self::Erased { datasets, .. } | Self::RetainedInPart { datasets, .. } => {
                datasets.iter().filter(|d| d.not_searched).map(|d| d.dataset.as_str()).collect()
            }
            _ => Vec::new(),
        }
    }

    pub fn residual(&self) -> Option<u64> {
        match self {
            Self::Erased { residual, .. }
            | Self::NotFound { residual }
            | Self::RetainedInPart { residual, .. } => *residual,
            _ => None,
        }
    }

    /// A short, identifier-free description for task views and audit.
    pub fn summary(&self) -> String {
        match self {
            Self::Erased { datasets, residual } | Self::RetainedInPart { datasets, residual, .. } => {
                let (deleted, anonymized) = DatasetReport::totals(datasets);
                let mut s = if self.found_nothing() {
                    "nothing found".to_owned()
                } else {
                    format!("deleted {deleted}, anonymized {anonymized}")
                };
                if let Some(r) = residual.filter(|r| *r > 0) {
                    s.push_str(&format!("; under-deletion: {r} records remain"));
                }
                let unsearched = self.unsearched_datasets();
                if !unsearched.is_empty() {
                    s.push_str(&format!(
                        "; not searched (no identifier of the types they find subjects by): {}",
                        unsearched.join(", ")
                    ));
                }
                s
            }
            Self::NotFound { .. } => "nothing found".into(),
            Self::Failed { retryable, reason } => {
                format!("failed ({}): {reason}", if *retryable { "retryable" } else { "permanent" })
            }
            Self::Accepted { .. } => "accepted; external job running".into(),
        }
    }
}

/// Longest failure reason (or basis of a kept record) kept in a result, in
/// bytes; a longer one is cut.
pub const MAX_REASON_BYTES: usize = 500;

/// Longest dataset or category name kept in a result, in bytes.
pub const MAX_NAME_BYTES: usize = 200;

/// Cuts `text` to at most `limit` bytes (on a character boundary), marked
/// with an ellipsis.
pub fn cut(text: &mut String, limit: usize) {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_turns_success_into_failure() {
        let ok = Outcome::Erased { datasets: vec![], residual: Some(0) };
        let under = Outcome::Erased { datasets: vec![], residual: Some(3) };
        assert_eq!(ok.class(), OutcomeClass::Succeeded);
        assert_eq!(under.class(), OutcomeClass::Failed);
        assert!(under.summary().contains("under-deletion"));
    }

    #[test]
    fn a_report_that_kept_nothing_is_a_success() {
        let none_kept = Outcome::RetainedInPart { datasets: vec![], retained: vec![], residual: Some(0) };
        assert_eq!(none_kept.class(), OutcomeClass::Succeeded, "no end to wait for, no key kept for ever");
        let under = Outcome::RetainedInPart { datasets: vec![], retained: vec![], residual: Some(1) };
        assert_eq!(under.class(), OutcomeClass::Failed);
    }

    #[test]
    fn wire_form_is_tagged() {
        let o = Outcome::Failed { retryable: true, reason: "timeout".into() };
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["status"], "failed");
        let back: Outcome = serde_json::from_value(json).unwrap();
        assert_eq!(back, o);
        // A field added within the protocol's version is ignored.
        let added: Outcome = serde_json::from_str(r#"{"status":"not_found","extra":1}"#).unwrap();
        assert_eq!(added, Outcome::NotFound { residual: None });
        assert!(serde_json::from_str::<Outcome>(r#"{"status":"shredded"}"#).is_err());
    }
}
