//! Regulations and the due dates they set.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, Months, Utc};
use serde::{Deserialize, Serialize};

/// A privacy law under which a subject asks to be forgotten.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
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

/// A calendar period: `10y`, `6m`, `45d` (or ISO 8601 `P10Y`, `P6M`, `P45D`).
/// Serialised in the ISO 8601 form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// Calendar months (a year is 12), clamped to the last day of a shorter
    /// month.
    Months(u32),
    Days(u32),
}

impl Period {
    /// No time at all (`0d`, `0m`).
    pub fn is_zero(self) -> bool {
        matches!(self, Self::Months(0) | Self::Days(0))
    }

    /// `from` plus this period. Month arithmetic keeps the time of day and
    /// clamps the day: 31 January + 1 month = 28 (or 29) February.
    pub fn add_to(self, from: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Self::Months(n) => from.checked_add_months(Months::new(n)).unwrap_or(DateTime::<Utc>::MAX_UTC),
            Self::Days(n) => {
                from.checked_add_signed(Duration::days(i64::from(n))).unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        }
    }

    /// `from` minus this period, clamped the same way.
    pub fn subtract_from(self, from: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Self::Months(n) => from.checked_sub_months(Months::new(n)).unwrap_or(DateTime::<Utc>::MIN_UTC),
            Self::Days(n) => {
                from.checked_sub_signed(Duration::days(i64::from(n))).unwrap_or(DateTime::<Utc>::MIN_UTC)
            }
        }
    }

    /// The latest record date up to which every retention has ended by
    /// `as_of`: a record dated at or before it may go, one dated after it
    /// is kept. With months this is not always `as_of` minus the period,
    /// because adding clamps the day: on 31 March every record of 28
    /// February has ended its month (28 February + 1 month is 28 March).
    /// Clamping also folds several days onto a month's last, and then the
    /// records that have ended are not all earlier than those that have
    /// not: on 28 February 2026 at 14:30, a record of 28 February 2016 at
    /// 15:00 runs until 15:00, one of 29 February 2016 at 10:00 ended at
    /// 10:00. The cutoff stops before the first record still running
    /// (28 February 2016, 14:30), so that nothing is erased early; a folded
    /// record kept past its end is erased by a later follow-up (here on 1
    /// March, when the whole fold has ended).
    pub fn cutoff(self, as_of: DateTime<Utc>) -> DateTime<Utc> {
        let Self::Months(_) = self else { return self.subtract_from(as_of) };
        let start = self.subtract_from(as_of).date_naive();
        let time_of_day = as_of - as_of.date_naive().and_time(chrono::NaiveTime::MIN).and_utc();
        let mut cutoff = self.subtract_from(as_of);
        // Adding is monotonic and folds at most three days onto a month's
        // last, so the cutoff lies within a few days of `start`.
        for offset in -1..=3 {
            let day = start + Duration::days(offset);
            let midnight = day.and_time(chrono::NaiveTime::MIN).and_utc();
            match self.add_to(midnight).date_naive().cmp(&as_of.date_naive()) {
                // The whole day has ended by `as_of`.
                std::cmp::Ordering::Less => cutoff = midnight + Duration::days(1) - Duration::milliseconds(1),
                // The day ends on `as_of`'s own day: up to its time of day,
                // and no further (a later day folded onto the same date has
                // records still running before its own ended ones).
                std::cmp::Ordering::Equal => {
                    cutoff = midnight + time_of_day;
                    break;
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        cutoff
    }

    /// A rough length in days, to compare periods of different units.
    pub fn approx_days(self) -> u64 {
        match self {
            Self::Months(n) => u64::from(n) * 3044 / 100,
            Self::Days(n) => u64::from(n),
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Months(n) if n % 12 == 0 && n > 0 => write!(f, "P{}Y", n / 12),
            Self::Months(n) => write!(f, "P{n}M"),
            Self::Days(n) => write!(f, "P{n}D"),
        }
    }
}

/// A period that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid period {0:?}; expected a number and a unit, e.g. 10y, 6m, 45d (or P10Y, P6M, P45D), \
     of at most 1000 years"
)]
pub struct InvalidPeriod(pub String);

/// The longest period accepted, in months (1000 years) and in days: dates
/// that far apart are still dates, and no law keeps records longer.
const MAX_MONTHS: u32 = 12_000;
const MAX_DAYS: u32 = 366_000;

impl FromStr for Period {
    type Err = InvalidPeriod;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidPeriod(s.to_owned());
        let t = s.trim().to_ascii_lowercase();
        let t = t.strip_prefix('p').unwrap_or(&t);
        let unit = t.chars().last().ok_or_else(bad)?;
        let n: u32 = t[..t.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
        let period = match unit {
            'y' => n.checked_mul(12).map(Self::Months).ok_or_else(bad)?,
            'm' => Self::Months(n),
            'w' => n.checked_mul(7).map(Self::Days).ok_or_else(bad)?,
            'd' => Self::Days(n),
            _ => return Err(bad()),
        };
        match period {
            Self::Months(n) if n > MAX_MONTHS => Err(bad()),
            Self::Days(n) if n > MAX_DAYS => Err(bad()),
            _ => Ok(period),
        }
    }
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Period {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("ISO 8601 period: PnY, PnM or PnD"))
            .pattern(Some("^P(0|[1-9][0-9]{0,9})[YMD]$"))
            .examples([serde_json::json!("P10Y")])
            .into()
    }
}

impl utoipa::ToSchema for Period {}

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

    /// How much a controller may extend the deadline, once, if the law
    /// allows it: GDPR Art. 12(3) two further months, CCPA §1798.130 and
    /// VCDPA 45 further days, PIPEDA s. 8(4) 30 further days. LGPD has none.
    pub fn extension_period(self) -> Option<Period> {
        match self {
            Self::Gdpr | Self::UkGdpr => Some(Period::Months(2)),
            Self::Ccpa | Self::Vcdpa => Some(Period::Days(45)),
            Self::Pipeda => Some(Period::Days(30)),
            Self::Lgpd => None,
        }
    }
}

/// The deadlines of one regulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadlineRule {
    /// Time to answer, from receipt.
    pub response: Period,
    /// One extension allowed before the original due date, if any.
    #[serde(default)]
    pub extension: Option<Period>,
}

/// Due dates and extensions per regulation: the statutory values, each
/// replaceable by configuration (e.g. a company that answers faster).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deadlines {
    overrides: std::collections::BTreeMap<Regulation, DeadlineRule>,
}

/// Why an extension was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtensionRefused {
    #[error("{0} allows no extension of the deadline")]
    NotAllowed(Regulation),
    #[error("the deadline was already extended once")]
    AlreadyExtended,
    #[error("the original due date has passed; an extension must be decided before it")]
    TooLate,
}

impl Deadlines {
    pub fn new(overrides: std::collections::BTreeMap<Regulation, DeadlineRule>) -> Self {
        Self { overrides }
    }

    pub fn rule(&self, regulation: Regulation) -> DeadlineRule {
        self.overrides.get(&regulation).copied().unwrap_or(DeadlineRule {
            response: regulation.response_period(),
            extension: regulation.extension_period(),
        })
    }

    pub fn due_at(&self, regulation: Regulation, received: DateTime<Utc>) -> DateTime<Utc> {
        self.rule(regulation).response.add_to(received)
    }

    /// What the configured deadlines allow that the law does not: a
    /// response or an extension that, for some day of receipt, ends after
    /// the statutory one, or an extension where the law has none. Each
    /// names the regulation and an example receipt date.
    pub fn warnings(&self) -> Vec<String> {
        // Every day of a common and of a leap year: month lengths and
        // clamping are all there.
        let days = (0..365 + 366).map(|d| {
            chrono::NaiveDate::from_ymd_opt(2027, 1, 1)
                .expect("a date")
                .and_time(chrono::NaiveTime::MIN)
                .and_utc()
                + Duration::days(d)
        });
        let later = |ours: &dyn Fn(DateTime<Utc>) -> DateTime<Utc>,
                     law: &dyn Fn(DateTime<Utc>) -> DateTime<Utc>| {
            days.clone().find(|&r| ours(r) > law(r)).map(|r| (r, ours(r), law(r)))
        };
        let day = |t: DateTime<Utc>| t.format("%Y-%m-%d").to_string();
        let mut out = Vec::new();
        for (&regulation, rule) in &self.overrides {
            let (response, extension) = (regulation.response_period(), regulation.extension_period());
            if let Some((r, ours, law)) = later(&|r| rule.response.add_to(r), &|r| response.add_to(r)) {
                out.push(format!(
                    "[deadlines.{regulation}] response = {} ends after the statutory {response}: a request \
                     received on {} would be due on {}, the law says {}",
                    rule.response,
                    day(r),
                    day(ours),
                    day(law)
                ));
            }
            match (rule.extension, extension) {
                (Some(_), None) => out.push(format!(
                    "[deadlines.{regulation}] allows an extension, which {regulation} does not: extended \
                     requests would be answered after the statutory deadline"
                )),
                (Some(ours), Some(law)) => {
                    let ours_total = |r| ours.add_to(rule.response.add_to(r));
                    let law_total = |r| law.add_to(response.add_to(r));
                    if let Some((r, ours, law)) = later(&ours_total, &law_total) {
                        out.push(format!(
                            "[deadlines.{regulation}] response and extension together end after the statutory \
                             ones: a request received on {} and extended would be due on {}, the law says {}",
                            day(r),
                            day(ours),
                            day(law)
                        ));
                    }
                }
                (None, _) => {}
            }
        }
        out
    }

    /// The new due date of a request whose original due date is
    /// `original_due`, if it may be extended at `now`.
    pub fn extend(
        &self,
        regulation: Regulation,
        original_due: DateTime<Utc>,
        already_extended: bool,
        now: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, ExtensionRefused> {
        let period = self.rule(regulation).extension.ok_or(ExtensionRefused::NotAllowed(regulation))?;
        if already_extended {
            return Err(ExtensionRefused::AlreadyExtended);
        }
        if now >= original_due {
            return Err(ExtensionRefused::TooLate);
        }
        Ok(period.add_to(original_due))
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
    fn extensions_once_and_only_before_the_original_due_date() {
        let d = Deadlines::default();
        // (regulation, received, now, already extended, expected new due date or refusal)
        type Case = (Regulation, DateTime<Utc>, DateTime<Utc>, bool, Result<DateTime<Utc>, ExtensionRefused>);
        let cases: [Case; 9] = [
            // GDPR: due 28 Feb (clamped), +2 months from the original due date
            (Regulation::Gdpr, at(2026, 1, 31), at(2026, 2, 10), false, Ok(at(2026, 4, 28))),
            // leap year: due 29 Feb 2028, +2 months = 29 April
            (Regulation::Gdpr, at(2028, 1, 31), at(2028, 2, 1), false, Ok(at(2028, 4, 29))),
            (Regulation::UkGdpr, at(2026, 10, 31), at(2026, 11, 1), false, Ok(at(2027, 1, 30))),
            (Regulation::Ccpa, at(2026, 1, 1), at(2026, 1, 2), false, Ok(at(2026, 4, 1))),
            (Regulation::Vcdpa, at(2026, 1, 1), at(2026, 2, 14), false, Ok(at(2026, 4, 1))),
            (Regulation::Pipeda, at(2026, 2, 1), at(2026, 2, 2), false, Ok(at(2026, 4, 2))),
            (
                Regulation::Lgpd,
                at(2026, 2, 1),
                at(2026, 2, 2),
                false,
                Err(ExtensionRefused::NotAllowed(Regulation::Lgpd)),
            ),
            // at the due date itself it is too late
            (Regulation::Gdpr, at(2026, 1, 31), at(2026, 2, 28), false, Err(ExtensionRefused::TooLate)),
            (Regulation::Ccpa, at(2026, 1, 1), at(2026, 1, 2), true, Err(ExtensionRefused::AlreadyExtended)),
        ];
        for (reg, received, now, extended, expected) in cases {
            let original = d.due_at(reg, received);
            assert_eq!(
                d.extend(reg, original, extended, now),
                expected,
                "{reg} received {received} at {now}"
            );
        }
    }

    #[test]
    fn configured_deadlines_replace_the_statutory_ones() {
        let mut o = std::collections::BTreeMap::new();
        o.insert(Regulation::Gdpr, DeadlineRule { response: Period::Days(14), extension: None });
        let d = Deadlines::new(o);
        assert_eq!(d.due_at(Regulation::Gdpr, at(2026, 1, 1)), at(2026, 1, 15));
        assert_eq!(d.due_at(Regulation::Ccpa, at(2026, 1, 1)), at(2026, 2, 15));
        assert_eq!(
            d.extend(Regulation::Gdpr, at(2026, 1, 15), false, at(2026, 1, 2)),
            Err(ExtensionRefused::NotAllowed(Regulation::Gdpr))
        );
    }

    #[test]
    fn deadlines_longer_than_the_statute_are_warned_of() {
        let rule = |response: &str, extension: Option<&str>| DeadlineRule {
            response: response.parse().unwrap(),
            extension: extension.map(|e| e.parse().unwrap()),
        };
        let warnings =
            |rules: Vec<(Regulation, DeadlineRule)>| Deadlines::new(rules.into_iter().collect()).warnings();
        // Shorter or equal: nothing to say.
        assert!(warnings(vec![
            (Regulation::Gdpr, rule("14d", None)),
            (Regulation::Ccpa, rule("45d", Some("45d"))),
            (Regulation::UkGdpr, rule("28d", Some("2m"))),
            (Regulation::Pipeda, rule("4w", None)),
        ])
        .is_empty());
        // 30 days can end after a month (the month after 30 January ends on 28 February).
        let w = warnings(vec![(Regulation::Gdpr, rule("30d", Some("2m")))]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("[deadlines.gdpr] response = P30D ends after the statutory P1M"), "{w:?}");
        assert!(
            w[0].contains("received on 2027-01-30 would be due on 2027-03-01, the law says 2027-02-28"),
            "{w:?}"
        );
        assert!(w[1].contains("response and extension together"), "{w:?}");
        let w = warnings(vec![
            (Regulation::Lgpd, rule("15d", Some("5d"))),
            (Regulation::Ccpa, rule("46d", None)),
        ]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("[deadlines.ccpa] response = P46D"), "{w:?}");
        assert!(w[1].contains("[deadlines.lgpd] allows an extension, which lgpd does not"), "{w:?}");
    }

    #[test]
    fn periods_parse_print_and_do_calendar_arithmetic() {
        let cases = [
            ("10y", Period::Months(120), "P10Y"),
            ("P10Y", Period::Months(120), "P10Y"),
            ("6m", Period::Months(6), "P6M"),
            ("45d", Period::Days(45), "P45D"),
            ("2w", Period::Days(14), "P14D"),
            (" 7Y ", Period::Months(84), "P7Y"),
        ];
        for (text, period, iso) in cases {
            assert_eq!(text.parse::<Period>().unwrap(), period, "{text}");
            assert_eq!(period.to_string(), iso);
            assert_eq!(serde_json::to_string(&period).unwrap(), format!("\"{iso}\""));
        }
        for bad in ["", "y", "10", "10x", "-1y", "1.5y", "99999999999y", "999999y", "100000000d", "1001y"] {
            assert!(bad.parse::<Period>().is_err(), "{bad:?} parsed");
        }
        assert_eq!("1000y".parse::<Period>().unwrap(), Period::Months(12_000));
        // Whatever a stored period says, the arithmetic clamps, never panics.
        let now = at(2026, 3, 10);
        assert_eq!(Period::Days(u32::MAX).add_to(now), DateTime::<Utc>::MAX_UTC);
        assert_eq!(Period::Days(u32::MAX).subtract_from(now), DateTime::<Utc>::MIN_UTC);
        assert_eq!(Period::Months(u32::MAX).add_to(now), DateTime::<Utc>::MAX_UTC);
        // 29 February + 10 years clamps to 28 February; back again is 28 Feb.
        let leap = at(2016, 2, 29);
        assert_eq!(Period::Months(120).add_to(leap), at(2026, 2, 28));
        assert_eq!(Period::Months(120).subtract_from(at(2026, 2, 28)), at(2016, 2, 28));
        assert!(Period::Months(120).approx_days() > Period::Days(3650).approx_days() - 1);
    }

    #[test]
    fn the_cutoff_never_erases_a_record_whose_retention_runs() {
        let ten_years = Period::Months(120);
        // On 28 February 2026 (14:30) a record of 28 February 2016 at 15:00
        // runs until 15:00: the cutoff stops before it, and a record of 29
        // February 2016 (ended at 14:30, +10y clamps to 28 February) waits
        // until 1 March, when all of the fold has ended.
        let as_of = at(2026, 2, 28);
        assert_eq!(ten_years.cutoff(as_of), at(2016, 2, 28));
        // The case the property test found: 90 months to 28 February 2038.
        let as_of_2038 = Utc.with_ymd_and_hms(2038, 2, 28, 0, 0, 0).unwrap();
        let running = Utc.with_ymd_and_hms(2030, 8, 28, 0, 0, 1).unwrap();
        assert!(Period::Months(90).add_to(running) > as_of_2038);
        assert!(Period::Months(90).cutoff(as_of_2038) < running, "not erased while its retention runs");
        let first_of_march = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        assert_eq!(ten_years.cutoff(first_of_march), ten_years.subtract_from(first_of_march));
        assert!(ten_years.cutoff(first_of_march) > Utc.with_ymd_and_hms(2016, 2, 29, 23, 59, 59).unwrap());
        // On 31 March all of 28 February (+1 month: 28 March) has ended.
        let end_of_feb = Utc.with_ymd_and_hms(2026, 2, 28, 23, 59, 59).unwrap() + Duration::milliseconds(999);
        assert_eq!(Period::Months(1).cutoff(at(2026, 3, 31)), end_of_feb);
        assert_eq!(Period::Days(45).cutoff(as_of), as_of - Duration::days(45));
    }

    proptest::proptest! {
        /// A record dated at or before the cutoff has ended: nothing is
        /// erased early. One dated after it runs past `as_of`, or ended on
        /// `as_of`'s own date in a fold of clamped days (kept until a later
        /// follow-up).
        #[test]
        fn a_record_is_kept_exactly_while_its_period_runs(
            months in 1u32..240,
            as_of_secs in 0i64..(40_000 * 86_400),
            // Near the boundary, where clamping matters: within four days.
            offset_secs in -345_600i64..345_600,
        ) {
            let origin = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
            let period = Period::Months(months);
            let as_of = origin + Duration::seconds(as_of_secs);
            let record = period.subtract_from(as_of) + Duration::seconds(offset_secs);
            let ends = period.add_to(record);
            if record <= period.cutoff(as_of) {
                proptest::prop_assert!(ends <= as_of, "erased early: {} {} {}", months, as_of, record);
            } else {
                proptest::prop_assert!(
                    ends > as_of || ends.date_naive() == as_of.date_naive(),
                    "kept though it ended before today: {} {} {}", months, as_of, record
                );
            }
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
