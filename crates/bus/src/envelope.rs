//! The messages on the bus (see docs/protocol.md). Both carry `version`;
//! a consumer rejects a version it does not know, and ignores fields it
//! does not know within its own: fields are added to a version only where
//! a reader that ignores them still does the right thing.

use chrono::{DateTime, Utc};
use lethe_core::{Action, Directive, Job, Outcome, Regulation, RequestId, SealedIdentifier, TaskId};
use serde::{Deserialize, Serialize};

use crate::Undecodable;

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// A unit of work for a connector: one subject in one system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskMessage {
    /// Envelope version; this document describes version 1.
    #[schema(minimum = 1, maximum = 1)]
    pub version: u32,
    /// Unique per (request, system); results refer to it.
    #[schema(value_type = String, format = Uuid)]
    pub task_id: TaskId,
    #[schema(value_type = String, format = Uuid)]
    pub request_id: RequestId,
    /// The system's name; also the topic suffix.
    pub system: String,
    /// The most protective of the category actions below (`erase`,
    /// `anonymize`, `retain` or `hold`); informational: connectors follow
    /// `categories`.
    pub action: Action,
    /// What to do with each data category the system declares. A dataset
    /// whose category is not listed must be left untouched.
    pub categories: Vec<Directive>,
    /// 1 for the first dispatch, incremented on every redispatch.
    #[schema(value_type = u64, minimum = 1, maximum = 4294967295u64)]
    pub attempt: u32,
    pub regulation: Regulation,
    /// The request's legal due date.
    pub due_at: DateTime<Utc>,
    /// The subject's identifiers, sealed under the request's data key: those
    /// of the types the system uses (all of them where that is not known);
    /// may be empty.
    pub identifiers: Vec<SealedIdentifier>,
    /// When the coordinator published this attempt; retention is decided
    /// as of this instant (`cutoff` and `until` of the directives).
    pub issued_at: DateTime<Utc>,
    /// Set when the connector answered an earlier attempt with `accepted`:
    /// check this external job instead of starting another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
}

/// A connector's report on one task attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResultMessage {
    /// Envelope version; this document describes version 1.
    #[schema(minimum = 1, maximum = 1)]
    pub version: u32,
    /// The `task_id` of the task message.
    #[schema(value_type = String, format = Uuid)]
    pub task_id: TaskId,
    #[schema(value_type = String, format = Uuid)]
    pub request_id: RequestId,
    pub system: String,
    /// The `attempt` of the task message answered.
    #[schema(value_type = u64, minimum = 1, maximum = 4294967295u64)]
    pub attempt: u32,
    pub outcome: Outcome,
    /// When the connector finished the attempt.
    pub reported_at: DateTime<Utc>,
    /// Free-form name of the worker instance, for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The `issued_at` of the task message answered, echoed so that the
    /// coordinator can measure dispatch-to-outcome latency (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_issued_at: Option<DateTime<Utc>>,
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8], version: impl Fn(&T) -> u32) -> Result<T, Undecodable> {
    let fail = |reason: String| Undecodable { reason, raw: raw.to_vec() };
    // The version first: a later version may change what the fields mean.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    if let Ok(Versioned { version }) = serde_json::from_slice::<Versioned>(raw) {
        if version != ENVELOPE_VERSION {
            return Err(fail(format!("unsupported envelope version {version}")));
        }
    }
    let mut de = serde_json::Deserializer::from_slice(raw);
    let msg: T = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| describe(e.inner(), field_path(e.path()).as_deref()))
        .and_then(|msg| de.end().map(|()| msg).map_err(|e| describe(&e, None)))
        .map_err(|reason| fail(format!("invalid envelope: {reason}")))?;
    match version(&msg) {
        ENVELOPE_VERSION => Ok(msg),
        v => Err(fail(format!("unsupported envelope version {v}"))),
    }
}

/// What is wrong with a message, without quoting a value from it: serde's
/// own text quotes the offending value (`invalid type: string "…"`), and a
/// dead letter's reason is logged and kept where identifiers must not be.
/// Field and variant names are quoted only if they look like the
/// contract's own words.
fn describe(e: &serde_json::Error, path: Option<&str>) -> String {
    let msg = e.to_string();
    let at = match path {
        Some(path) => format!("in `{path}` at line {} column {}", e.line(), e.column()),
        None => format!("at line {} column {}", e.line(), e.column()),
    };
    for (prefix, what) in [
        ("unknown field `", "unknown field"),
        ("missing field `", "missing field"),
        ("unknown variant `", "unknown variant"),
        ("duplicate field `", "duplicate field"),
    ] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let name = rest.split('`').next().unwrap_or_default();
            return if field_like(name) { format!("{what} `{name}` {at}") } else { format!("{what} {at}") };
        }
    }
    let kind = match e.classify() {
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Eof => "truncated JSON",
        serde_json::error::Category::Data => "a value of the wrong type or format",
        serde_json::error::Category::Io => "unreadable",
    };
    format!("{kind} {at}")
}

/// Where in a JSON document a value failed, as `outcome.datasets[0].deleted`
/// or `requests[2].regulation`: field names and indexes only; a key that
/// is not spelled like a field name (a map may be keyed by anything) is
/// shown as `…`, since it may be a value.
pub fn field_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(if field_like(key) { key } else { "…" });
            }
            Segment::Unknown => {}
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A name as Lethe's fields and identifier types are spelled.
pub fn field_like(name: &str) -> bool {
    !name.is_empty() && name.len() <= 32 && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
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

/// The JSON Schema (2020-12) of an envelope, generated from these types;
/// `docs/schemas/` holds the published copies and a test keeps them equal.
pub fn json_schema(name: &str) -> Option<serde_json::Value> {
    use utoipa::OpenApi;
    #[derive(OpenApi)]
    #[openapi(components(schemas(TaskMessage, ResultMessage)))]
    struct Envelopes;
    let doc = serde_json::to_value(Envelopes::openapi()).ok()?;
    let text = doc["components"]["schemas"].to_string().replace("#/components/schemas/", "#/$defs/");
    let defs: serde_json::Value = serde_json::from_str(&text).ok()?;
    let serde_json::Value::Object(mut defs) = defs else { return None };
    let root = defs.remove(name)?;
    let mut schema = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("https://lethe.dev/schemas/{}.v{ENVELOPE_VERSION}.json", name.trim_end_matches("Message").to_lowercase()),
        "title": name,
    });
    let obj = schema.as_object_mut()?;
    obj.extend(root.as_object()?.clone());
    obj.insert("$defs".into(), serde_json::Value::Object(defs));
    Some(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result_of(outcome: Outcome) -> ResultMessage {
        ResultMessage {
            version: ENVELOPE_VERSION,
            task_id: TaskId::new(),
            request_id: RequestId::new(),
            system: "crm".into(),
            attempt: 1,
            outcome,
            reported_at: Utc::now(),
            worker: None,
            task_issued_at: None,
        }
    }

    #[test]
    fn results_round_trip_and_bad_input_is_undecodable() {
        let msg = result_of(Outcome::NotFound { residual: Some(0) });
        assert_eq!(ResultMessage::decode(&msg.encode()).unwrap(), msg);
        let err = ResultMessage::decode(b"{not json").unwrap_err();
        assert_eq!(err.reason, "invalid envelope: not valid JSON at line 1 column 2");
        // The value at fault is never quoted, only where it is.
        let mut v = serde_json::to_value(&msg).unwrap();
        v["attempt"] = "ada@example.com".into();
        let err = ResultMessage::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.reason.starts_with("invalid envelope: a value of the wrong type"), "{}", err.reason);
        assert!(err.reason.contains("in `attempt` at line 1"), "names the field: {}", err.reason);
        assert!(!err.reason.contains("ada"), "{}", err.reason);
        v["attempt"] = 1.into();
        v["task_issued_at"] = "yesterday".into();
        let err = ResultMessage::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.reason.contains("in `task_issued_at`"), "{}", err.reason);
        v["task_issued_at"] = serde_json::Value::Null;
        let erased = result_of(Outcome::Erased {
            datasets: vec![lethe_core::DatasetReport::new("t", 1, 0)],
            residual: Some(0),
        });
        let mut negative = serde_json::to_value(&erased).unwrap();
        negative["outcome"]["datasets"][0]["deleted"] = (-1).into();
        let err = ResultMessage::decode(&serde_json::to_vec(&negative).unwrap()).unwrap_err();
        assert!(err.reason.contains("in `outcome"), "{}", err.reason);
        let twice = String::from_utf8(msg.encode()).unwrap().replacen('{', "{\"version\":1,", 1);
        let err = ResultMessage::decode(twice.as_bytes()).unwrap_err();
        assert!(err.reason.starts_with("invalid envelope: duplicate field `version`"), "{}", err.reason);
        v["outcome"]["status"] = "ada@example.com".into();
        let err = ResultMessage::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(!err.reason.contains("ada"), "{}", err.reason);
        let mut v = serde_json::to_value(&msg).unwrap();
        v["version"] = 2.into();
        let err = ResultMessage::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err.reason, "unsupported envelope version 2");
    }

    /// A field added within the version, in the envelope or in any variant
    /// of an outcome, is ignored, and the published schema allows it; a
    /// later version is refused before its fields are read.
    #[test]
    fn unknown_fields_are_ignored_and_unknown_versions_refused() {
        let outcomes = [
            Outcome::Erased { datasets: vec![], residual: Some(0) },
            Outcome::NotFound { residual: None },
            Outcome::RetainedInPart { datasets: vec![], retained: vec![], residual: None },
            Outcome::Failed { retryable: false, reason: "down".into() },
            Outcome::Accepted { job_id: "j".into(), poll_after_seconds: None },
        ];
        for outcome in outcomes {
            let msg = result_of(outcome);
            let mut v = serde_json::to_value(&msg).unwrap();
            v["outcome"]["extra"] = 1.into();
            v["added_later"] = serde_json::json!({"any": "shape"});
            assert_eq!(ResultMessage::decode(&serde_json::to_vec(&v).unwrap()).unwrap(), msg);
            // A later version's fields may mean something else: refused
            // by its number, whatever its fields.
            v["version"] = 2.into();
            v["attempt"] = "two".into();
            let err = ResultMessage::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert_eq!(err.reason, "unsupported envelope version 2");
        }
        for name in ["TaskMessage", "ResultMessage"] {
            let schema = json_schema(name).unwrap();
            assert!(!schema.to_string().contains("additionalProperties\":false"), "{name}: {schema}");
        }
    }

    /// `docs/schemas/*.json` are the published contract; regenerate them
    /// with `LETHE_WRITE_SCHEMAS=1 cargo test -p lethe-bus` after a change.
    #[test]
    fn published_schemas_match_the_code() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/schemas");
        for (name, file) in [("TaskMessage", "task.v1.json"), ("ResultMessage", "result.v1.json")] {
            let generated = serde_json::to_string_pretty(&json_schema(name).unwrap()).unwrap() + "\n";
            let path = dir.join(file);
            if std::env::var_os("LETHE_WRITE_SCHEMAS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &generated).unwrap();
            }
            let published = std::fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(published, generated, "{file} is out of date; see this test's doc comment");
        }
    }
}
