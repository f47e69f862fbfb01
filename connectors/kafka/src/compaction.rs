//! When a tombstone makes data physically disappear from a compacted topic.
//!
//! A tombstone does not delete anything by itself. Kafka's log cleaner
//! removes the earlier values of its key when it compacts the segment that
//! holds the tombstone, and `max.compaction.lag.ms` bounds how long a record
//! may wait before it is compacted (Kafka rolls the active segment for it);
//! without that setting (its default is `Long.MAX_VALUE`) compaction waits
//! until the dirty ratio reaches `min.cleanable.dirty.ratio`, which has no
//! time bound. The tombstone itself, whose key is still the subject's
//! identifier, is kept for `delete.retention.ms` after that compaction (so
//! that consumers can see it) and removed by a later cleaning (Kafka 3.1 and
//! later also schedule that cleaning, KIP-534).
//!
//! So, for a tombstone written at `t`:
//! - the values are gone by `t + max.compaction.lag.ms`;
//! - the tombstone is gone by `t + max.compaction.lag.ms + delete.retention.ms`;
//!
//! each plus the cleaner's own scheduling delay (`log.cleaner.backoff.ms`,
//! 15 s by default, and its throughput). Neither bound exists while
//! `max.compaction.lag.ms` is unbounded or unknown.

use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use rdkafka::admin::ConfigResource;

/// `max.compaction.lag.ms`.
pub const MAX_COMPACTION_LAG: &str = "max.compaction.lag.ms";
/// `delete.retention.ms`.
pub const DELETE_RETENTION: &str = "delete.retention.ms";
/// `cleanup.policy`.
pub const CLEANUP_POLICY: &str = "cleanup.policy";

/// Where a figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The broker's answer to DescribeConfigs for the topic (its own setting
    /// or the broker's default).
    Broker,
    /// The dataset's configuration, because the broker did not answer.
    Declared,
    /// Neither: nobody said.
    Unknown,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Broker => "broker",
            Self::Declared => "declared",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A duration setting of a topic, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figure {
    /// `None`: unbounded (Kafka's `Long.MAX_VALUE`) or, with
    /// [`Source::Unknown`], not known.
    pub ms: Option<u64>,
    pub source: Source,
}

impl Figure {
    pub const UNKNOWN: Self = Self { ms: None, source: Source::Unknown };

    /// The figure as a duration, if it is known and bounded.
    pub fn delta(&self) -> Option<TimeDelta> {
        self.ms.and_then(|ms| i64::try_from(ms).ok()).map(TimeDelta::milliseconds)
    }

    /// The broker's value if it gave one, else the declared one, else unknown.
    pub fn choose(broker: Option<Option<u64>>, declared: Option<u64>) -> Self {
        match (broker, declared) {
            (Some(ms), _) => Self { ms, source: Source::Broker },
            (None, Some(ms)) => Self { ms: bounded(ms), source: Source::Declared },
            (None, None) => Self::UNKNOWN,
        }
    }
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ms, self.source) {
            (_, Source::Unknown) => f.write_str("unknown"),
            (Some(ms), s) => write!(f, "{ms} ms ({s})"),
            (None, s) => write!(f, "unbounded ({s})"),
        }
    }
}

/// A value of Kafka's `Long.MAX_VALUE` or more means "no bound".
fn bounded(ms: u64) -> Option<u64> {
    (ms < i64::MAX as u64).then_some(ms)
}

/// What the broker said about a topic's cleanup (each `None` when it did not say).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerSettings {
    pub cleanup_policy: Option<String>,
    /// `Some(None)`: the broker says unbounded.
    pub max_compaction_lag_ms: Option<Option<u64>>,
    pub delete_retention_ms: Option<Option<u64>>,
}

impl BrokerSettings {
    /// Reads a DescribeConfigs answer; entries it lacks or cannot parse stay `None`.
    pub fn from_resource(resource: &ConfigResource) -> Self {
        let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
        let ms = |name: &str| {
            value(name).and_then(|v| v.trim().parse::<i64>().ok()).map(|v| bounded(v.max(0) as u64))
        };
        Self {
            cleanup_policy: value(CLEANUP_POLICY),
            max_compaction_lag_ms: ms(MAX_COMPACTION_LAG),
            delete_retention_ms: ms(DELETE_RETENTION),
        }
    }

    /// Whether the broker said the topic is not compacted.
    pub fn not_compacted(&self) -> bool {
        self.cleanup_policy.as_deref().is_some_and(|p| !p.split(',').any(|p| p.trim() == "compact"))
    }
}

/// A topic's figures, each from the broker or declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    pub max_compaction_lag: Figure,
    pub delete_retention: Figure,
}

impl Compaction {
    /// When tombstones written at `written_at` make the data disappear.
    pub fn purge(&self, written_at: DateTime<Utc>) -> Purge {
        let values_by = self.max_compaction_lag.delta().and_then(|lag| written_at.checked_add_signed(lag));
        let tombstones_by = values_by
            .zip(self.delete_retention.delta())
            .and_then(|(by, retention)| by.checked_add_signed(retention));
        Purge { written_at, values_by, tombstones_by, figures: *self }
    }
}

/// When erased data physically disappears from a compacted topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purge {
    /// When the last tombstone was acknowledged by the broker.
    pub written_at: DateTime<Utc>,
    /// The subject's earlier values are compacted away by then, at the
    /// latest (plus the cleaner's scheduling delay); `None`: no bound.
    pub values_by: Option<DateTime<Utc>>,
    /// The tombstones, which still carry the subject's keys, are removed by
    /// then; `None`: no bound. This is when nothing of the subject is left.
    pub tombstones_by: Option<DateTime<Utc>>,
    /// The figures it was computed from, with their sources.
    pub figures: Compaction,
}

impl Purge {
    /// One identifier-free sentence for reports and logs.
    pub fn describe(&self) -> String {
        let when = |t: Option<DateTime<Utc>>| {
            t.map_or_else(|| "no bound".to_owned(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        };
        format!(
            "tombstones written at {}; values compacted away by {}, tombstones removed by {} \
             (max.compaction.lag.ms {}, delete.retention.ms {}; plus the log cleaner's delay)",
            when(Some(self.written_at)),
            when(self.values_by),
            when(self.tombstones_by),
            self.figures.max_compaction_lag,
            self.figures.delete_retention,
        )
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use rdkafka::admin::{ConfigEntry, ConfigSource, OwnedResourceSpecifier};

    use super::*;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, h, m, 0).unwrap()
    }

    fn entry(name: &str, value: &str) -> ConfigEntry {
        ConfigEntry {
            name: name.into(),
            value: Some(value.into()),
            source: ConfigSource::DynamicTopic,
            is_read_only: false,
            is_default: false,
            is_sensitive: false,
        }
    }

    #[test]
    fn values_then_tombstones_disappear() {
        let c = Compaction {
            max_compaction_lag: Figure { ms: Some(3_600_000), source: Source::Broker },
            delete_retention: Figure { ms: Some(600_000), source: Source::Declared },
        };
        let p = c.purge(at(10, 0));
        assert_eq!(p.values_by, Some(at(11, 0)));
        assert_eq!(p.tombstones_by, Some(at(11, 10)));
        let text = p.describe();
        assert!(text.contains("2030-01-01T11:10:00Z") && text.contains("600000 ms (declared)"), "{text}");
    }

    #[test]
    fn unbounded_or_unknown_lag_gives_no_date() {
        for lag in [Figure { ms: None, source: Source::Broker }, Figure::UNKNOWN] {
            let c = Compaction {
                max_compaction_lag: lag,
                delete_retention: Figure { ms: Some(1), source: Source::Broker },
            };
            let p = c.purge(at(10, 0));
            assert_eq!((p.values_by, p.tombstones_by), (None, None));
            assert!(p.describe().contains("no bound"));
        }
        let c = Compaction {
            max_compaction_lag: Figure { ms: Some(60_000), source: Source::Broker },
            delete_retention: Figure::UNKNOWN,
        };
        let p = c.purge(at(10, 0));
        assert_eq!((p.values_by, p.tombstones_by), (Some(at(10, 1)), None));
    }

    #[test]
    fn the_broker_wins_over_the_declaration() {
        assert_eq!(Figure::choose(Some(Some(5)), Some(9)), Figure { ms: Some(5), source: Source::Broker });
        assert_eq!(Figure::choose(Some(None), Some(9)), Figure { ms: None, source: Source::Broker });
        assert_eq!(Figure::choose(None, Some(9)), Figure { ms: Some(9), source: Source::Declared });
        assert_eq!(Figure::choose(None, Some(u64::MAX)), Figure { ms: None, source: Source::Declared });
        assert_eq!(Figure::choose(None, None), Figure::UNKNOWN);
    }

    #[test]
    fn broker_answers_are_read() {
        let resource = ConfigResource {
            specifier: OwnedResourceSpecifier::Topic("t".into()),
            entries: vec![
                entry(CLEANUP_POLICY, "compact,delete"),
                entry(MAX_COMPACTION_LAG, "9223372036854775807"),
                entry(DELETE_RETENTION, "86400000"),
            ],
        };
        let s = BrokerSettings::from_resource(&resource);
        assert_eq!(s.max_compaction_lag_ms, Some(None), "Long.MAX_VALUE is unbounded");
        assert_eq!(s.delete_retention_ms, Some(Some(86_400_000)));
        assert!(!s.not_compacted());
        let delete_only = BrokerSettings { cleanup_policy: Some("delete".into()), ..Default::default() };
        assert!(delete_only.not_compacted());
        assert!(!BrokerSettings::default().not_compacted(), "unknown is not 'not compacted'");
    }
}
