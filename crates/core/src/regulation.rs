//! Regulations and the due dates they set.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, Months, Utc};
use serde::{Deserialize, Serialize};

/// A privacy law under which a subject asks to be forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Regulation {
    /// EU GDPR Art. 17, answered within one month (Art. 12(3)).
    Gdpr,
    /// UK GDPR Art. 17, one month.
    UkGdpr,
    /// California CCPA §1798.105, 45 days (§1798.130).
    Ccpa,
    /// Virginia VCDPA, 45 days.
    Vcdpa,
    /// Brazil LGPD Art. 18, 15 days.
    Lgpd,
    /// Canada PIPEDA, 30 days.
    Pipeda,
}

/// How long a regulation gives to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Calendar months, clamped to the last day of a shorter month.
    Months(u32),
    Days(u32),
}

impl Period {
    /// `from` plus this period. Month arithmetic keeps the time of day and
    /// clamps the day: 31 January + 1 month = 28 (or 29) February.
    pub fn add_to(self, from: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Self::Months(n) => from.checked_add_months(Months::new(n)).unwrap_or(DateTime::<Utc>::MAX_UTC),
            Self::Days(n) => from + Duration::days(i64::from(n)),
        }
    }
}

impl Regulation {
    pub const ALL: [Regulation; 6] =
        [Self::Gdpr, Self::UkGdpr, Self::Ccpa, Self::Vcdpa, Self::Lgpd, Self::Pipeda];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gdpr => "gdpr",
            Self::UkGdpr => "uk-gdpr",
            Self::Ccpa => "ccpa",
            Self::Vcdpa => "vcdpa",
            Self::Lgpd => "lgpd",
            Self::Pipeda => "pipeda",
        }
    }

    /// The statutory time to answer a request.
    pub fn response_period(self) -> Period {
        match self {
            Self::Gdpr | Self::UkGdpr => Period::Months(1),
            Self::Ccpa | Self::Vcdpa => Period::Days(45),
            Self::Pipeda => Period::Days(30),
            Self::Lgpd => Period::Days(15),
        }
    }

    /// The due date of a request received at `received`.
    pub fn due_at(self, received: DateTime<Utc>) -> DateTime<Utc> {
        self.response_period().add_to(received)
    }
}

/// An unknown regulation name; the message lists the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown regulation; expected one of gdpr, uk-gdpr, ccpa, vcdpa, lgpd, pipeda")]
pub struct UnknownRegulation;

impl FromStr for Regulation {
    type Err = UnknownRegulation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|r| r.as_str().eq_ignore_ascii_case(s.trim())).ok_or(UnknownRegulation)
    }
}

impl fmt::Display for Regulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 14, 30, 0).unwrap()
    }

    #[test]
    fn due_dates_by_regulation() {
        let cases = [
            (Regulation::Gdpr, at(2026, 1, 31), at(2026, 2, 28)),
            (Regulation::Gdpr, at(2028, 1, 31), at(2028, 2, 29)),
            (Regulation::UkGdpr, at(2026, 3, 31), at(2026, 4, 30)),
            (Regulation::Gdpr, at(2026, 12, 15), at(2027, 1, 15)),
            (Regulation::Gdpr, at(2026, 5, 10), at(2026, 6, 10)),
            (Regulation::Ccpa, at(2026, 1, 1), at(2026, 2, 15)),
            (Regulation::Vcdpa, at(2026, 12, 20), at(2027, 2, 3)),
            (Regulation::Pipeda, at(2026, 2, 1), at(2026, 3, 3)),
            (Regulation::Lgpd, at(2026, 2, 20), at(2026, 3, 7)),
            (Regulation::Lgpd, at(2028, 2, 20), at(2028, 3, 6)),
        ];
        for (reg, received, due) in cases {
            assert_eq!(reg.due_at(received), due, "{reg} received {received}");
        }
    }

    #[test]
    fn names_round_trip_and_unknown_is_rejected() {
        for reg in Regulation::ALL {
            assert_eq!(reg.as_str().parse::<Regulation>().unwrap(), reg);
            let json = serde_json::to_string(&reg).unwrap();
            assert_eq!(json, format!("\"{}\"", reg.as_str()));
        }
        assert_eq!("GDPR".parse::<Regulation>().unwrap(), Regulation::Gdpr);
        assert!("hipaa".parse::<Regulation>().is_err());
    }
}
