//! Durations written as `"250ms"`, `"30s"`, `"5m"`, `"6h"`, `"30d"` or a
//! number of seconds.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration read from a spec or a system's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl Span {
    pub fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"6h"` or `"30d"`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 =
        number.parse().map_err(|_| format!("bad duration {s:?} (e.g. \"30s\", \"5m\", \"6h\", \"30d\")"))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" | "" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h or d)")),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(|| format!("duration {s:?} is too long"))
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"5m\", \"6h\", \"30d\" or a number of seconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Span, E> {
                u64::try_from(v).map(Span::secs).map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Span, E> {
                Ok(Span::secs(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Span, E> {
                parse(v).map(Span).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("6h").unwrap(), Duration::from_secs(21_600));
        assert_eq!(parse("30d").unwrap(), Duration::from_secs(2_592_000));
        assert_eq!(parse("7").unwrap(), Duration::from_secs(7));
        for bad in ["", "s", "5w", "-1s", "1.5h"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let t: toml::Table = toml::from_str("a = \"2m\"\nb = 3").unwrap();
        assert_eq!(t["a"].clone().try_into::<Span>().unwrap(), Span::secs(120));
        assert_eq!(t["b"].clone().try_into::<Span>().unwrap(), Span::secs(3));
    }
}
