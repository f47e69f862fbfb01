//! Identifiers of a subject, normalised before use and redacted when printed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Longest identifier value accepted, in bytes, after normalisation.
pub const MAX_IDENTIFIER_LEN: usize = 320;

/// The type of an identifier. Custom types are lower-case ASCII words
/// (`[a-z][a-z0-9_]{0,63}`) chosen by the operator, e.g. `loyalty_number`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentifierKind {
    Email,
    Phone,
    CustomerId,
    DeviceId,
    Custom(String),
}

impl IdentifierKind {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Email => "email",
            Self::Phone => "phone",
            Self::CustomerId => "customer_id",
            Self::DeviceId => "device_id",
            Self::Custom(name) => name,
        }
    }
}

impl FromStr for IdentifierKind {
    type Err = IdentifierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "email" => Self::Email,
            "phone" => Self::Phone,
            "customer_id" => Self::CustomerId,
            "device_id" => Self::DeviceId,
            other => {
                let mut chars = other.chars();
                let valid = other.len() <= 64
                    && chars.next().is_some_and(|c| c.is_ascii_lowercase())
                    && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !valid {
                    return Err(IdentifierError::InvalidKind);
                }
                Self::Custom(other.to_owned())
            }
        })
    }
}

impl fmt::Display for IdentifierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for IdentifierKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for IdentifierKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why an identifier was rejected. Messages never contain the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    #[error("identifier type must be email, phone, customer_id, device_id or a lower-case word of at most 64 characters")]
    InvalidKind,
    #[error("{kind} is empty")]
    Empty { kind: String },
    #[error("{kind} is longer than {MAX_IDENTIFIER_LEN} bytes")]
    TooLong { kind: String },
    #[error("{kind} contains control or invisible formatting characters")]
    ControlCharacters { kind: String },
    #[error("email is not a valid address (expected local@domain)")]
    InvalidEmail,
    #[error("phone is not a valid international number (expected + and 8 to 15 digits, E.164)")]
    InvalidPhone,
}

/// A normalised identifier value. `Debug` and `Display` print `[redacted]`;
/// the value is reachable only through [`Identifier::expose`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Identifier {
    kind: IdentifierKind,
    value: String,
}

impl Identifier {
    /// Validates and normalises `raw` for `kind`: every value is trimmed and
    /// put in Unicode normal form C (so a composed and a decomposed `é` are
    /// one value); emails are lower-cased; phones are reduced to E.164 (`+`
    /// and digits, a leading `00` read as `+`). Control characters and
    /// invisible formatting characters (a zero-width space, a soft hyphen, a
    /// byte-order mark pasted from a form) are refused: they would make a
    /// value that looks like another hash differently, miss the systems'
    /// records and slip past legal holds.
    pub fn parse(kind: IdentifierKind, raw: &str) -> Result<Self, IdentifierError> {
        let name = || kind.as_str().to_owned();
        let trimmed = raw.trim();
        if trimmed.chars().any(|c| c.is_control() || c.general_category() == GeneralCategory::Format) {
            return Err(IdentifierError::ControlCharacters { kind: name() });
        }
        let composed: String = trimmed.nfc().collect();
        if composed.is_empty() {
            return Err(IdentifierError::Empty { kind: name() });
        }
        if composed.len() > MAX_IDENTIFIER_LEN {
            return Err(IdentifierError::TooLong { kind: name() });
        }
        let value = match kind {
            IdentifierKind::Email => normalise_email(&composed)?,
            IdentifierKind::Phone => normalise_phone(&composed)?,
            _ => composed,
        };
        Ok(Self { kind, value })
    }

    /// An identifier as it was sealed, normalised then, and authenticated
    /// by its encryption since: not judged again, so that one accepted
    /// under earlier rules still opens (and is erased) after an upgrade.
    pub(crate) fn sealed_value(kind: IdentifierKind, value: &str) -> Self {
        Self { kind, value: value.to_owned() }
    }

    pub fn kind(&self) -> &IdentifierKind {
        &self.kind
    }

    /// The normalised value. Call only where the value must leave the
    /// process in a controlled way: encryption, a keyed hash, a query
    /// parameter.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Whether `text` mentions this identifier, also as connectors commonly
    /// write one: in any case, percent-encoded (`ada%40example.com`), as the
    /// lower-case hex MD5 or SHA-256 of its normalised value (Mailchimp's
    /// subscriber hash, say), and, for a phone number, as its last eight
    /// digits, whatever the separators or prefix around them (`020 7946 0958`
    /// for `+442079460958`). A value under four characters (a customer number
    /// `42`) would match ordinary text and is not looked for as text.
    /// Invisible formatting characters ([`is_invisible`]) in `text` are
    /// ignored: `ada\u{200b}@example.com` names Ada.
    pub fn appears_in(&self, text: &str) -> bool {
        use md5::Md5;
        use sha2::{Digest, Sha256};
        let value = self.expose();
        let visible: String;
        let text = if text.chars().any(is_invisible) {
            visible = text.chars().filter(|c| !is_invisible(*c)).collect();
            visible.as_str()
        } else {
            text
        };
        let lower = text.to_lowercase();
        let decoded = percent_encoding::percent_decode_str(text).decode_utf8_lossy().to_lowercase();
        let needle = value.to_lowercase();
        if needle.chars().count() >= 4 && (lower.contains(&needle) || decoded.contains(&needle)) {
            return true;
        }
        let digests =
            [hex::encode(Md5::digest(value.as_bytes())), hex::encode(Sha256::digest(value.as_bytes()))];
        if digests.iter().any(|d| lower.contains(d.as_str())) {
            return true;
        }
        if self.kind == IdentifierKind::Phone {
            let digits: String = value.chars().filter(char::is_ascii_digit).collect();
            if digits.len() >= 8 {
                let tail = &digits[digits.len() - 8..];
                let squashed: String = decoded
                    .chars()
                    .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}'))
                    .collect();
                return squashed.contains(tail);
            }
        }
        false
    }
}

/// An invisible formatting character (Unicode's format characters that
/// text carries without showing: soft hyphen, zero-width spaces and
/// joiners, direction marks and overrides, word joiner and invisible
/// operators, byte-order mark, tags). Free text is refused with one, so
/// that it can neither hide an identifier from a screen nor mislead a
/// reader.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{61c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    )
}

/// What a connector's failure reason becomes when it holds one of the
/// subject's identifiers ([`Identifier::appears_in`]).
pub const WITHHELD_REASON: &str =
    "[the connector's reason was withheld: it contained an identifier of the subject]";

/// What another text a connector reports (a kept record's basis, a dataset
/// name) becomes when it holds one of the subject's identifiers.
pub const WITHHELD_TEXT: &str = "[withheld: it contained an identifier of the subject]";

impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identifier({}: [redacted])", self.kind)
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

fn normalise_email(s: &str) -> Result<String, IdentifierError> {
    let lower = s.to_lowercase();
    let (local, domain) = lower.rsplit_once('@').ok_or(IdentifierError::InvalidEmail)?;
    let domain_ok = !domain.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..");
    // An `@` in the local part is legal only quoted (`"a@b"@example.com`).
    let quoted = local.len() > 1 && local.starts_with('"') && local.ends_with('"');
    if local.is_empty()
        || local.len() > 64
        || !domain_ok
        || lower.chars().any(char::is_whitespace)
        || (local.contains('@') && !quoted)
    {
        return Err(IdentifierError::InvalidEmail);
    }
    Ok(lower)
}

fn normalise_phone(s: &str) -> Result<String, IdentifierError> {
    let (international, rest) = if let Some(rest) = s.strip_prefix('+') {
        (true, rest)
    } else if let Some(rest) = s.strip_prefix("00") {
        (true, rest)
    } else {
        (false, s)
    };
    if !international {
        return Err(IdentifierError::InvalidPhone);
    }
    // `+44 (0)20 …`: the national trunk prefix, written in brackets, is not
    // dialled from abroad and not part of the number.
    let rest = rest.replacen("(0)", "", 1);
    let mut digits = String::with_capacity(16);
    for c in rest.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' | '/' => {}
            _ => return Err(IdentifierError::InvalidPhone),
        }
    }
    if !(8..=15).contains(&digits.len()) || digits.starts_with('0') {
        return Err(IdentifierError::InvalidPhone);
    }
    Ok(format!("+{digits}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kind: &str, raw: &str) -> Result<String, IdentifierError> {
        Identifier::parse(kind.parse()?, raw).map(|i| i.expose().to_owned())
    }

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(parse("email", "  Ada.Lovelace@Example.COM \t").unwrap(), "ada.lovelace@example.com");
        assert_eq!(parse("email", "o'brien@example.ie").unwrap(), "o'brien@example.ie");
        assert_eq!(parse("email", "\"a@b\"@example.com").unwrap(), "\"a@b\"@example.com", "quoted");
        for bad in [
            "",
            "   ",
            "no-at-sign",
            "@example.com",
            "a@",
            "a@nodot",
            "a b@example.com",
            "a@.com",
            "a@x..com",
            "a@@example.com",
            "x@y@example.com",
        ] {
            assert!(parse("email", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn phones_become_e164() {
        assert_eq!(parse("phone", "+44 20 7946 0958").unwrap(), "+442079460958");
        assert_eq!(parse("phone", "0049 (30) 123-4567").unwrap(), "+49301234567");
        // The trunk prefix in brackets is not part of the number.
        assert_eq!(parse("phone", "+44 (0)20 7946 0958").unwrap(), "+442079460958");
        assert_eq!(parse("phone", "0044 (0) 20 7946 0958").unwrap(), "+442079460958");
        for bad in ["020 7946 0958", "+12", "+1234567890123456", "+44 20 ABC", "+0123456789"] {
            assert!(parse("phone", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn other_kinds_are_trimmed_and_bounded() {
        assert_eq!(parse("customer_id", " C-42 ").unwrap(), "C-42");
        assert_eq!(parse("loyalty_no", "77").unwrap(), "77");
        assert!(parse("Bad-Kind", "x").is_err());
        assert!(parse("device_id", &"x".repeat(MAX_IDENTIFIER_LEN + 1)).is_err());
        assert!(parse("device_id", "a\u{0}b").is_err());
        assert!(parse("device_id", "a\tb").is_err());
    }

    #[test]
    fn invisible_characters_are_refused_and_forms_composed() {
        for pasted in ["ada@example.com\u{200B}", "\u{FEFF}ada@example.com", "a\u{00AD}da@example.com"] {
            let err = parse("email", pasted).unwrap_err();
            assert!(matches!(err, IdentifierError::ControlCharacters { .. }), "{pasted:?}: {err}");
        }
        assert!(parse("customer_id", "C\u{2060}42").is_err());
        // A decomposed é (e + combining acute) is the composed one.
        assert_eq!(parse("email", "rene\u{0301}@example.fr").unwrap(), "ren\u{00E9}@example.fr");
        assert_eq!(
            parse("customer_id", "Jose\u{0301}").unwrap(),
            parse("customer_id", "Jos\u{00E9}").unwrap()
        );
    }

    #[test]
    fn printing_never_shows_the_value() {
        let id = Identifier::parse(IdentifierKind::Email, "secret@example.com").unwrap();
        assert_eq!(id.to_string(), "[redacted]");
        assert!(!format!("{id:?}").contains("secret"));
        let err = Identifier::parse(IdentifierKind::Email, "secret-no-at").unwrap_err();
        assert!(!err.to_string().contains("secret"));
    }

    fn id(kind: IdentifierKind, value: &str) -> Identifier {
        Identifier::parse(kind, value).unwrap()
    }

    #[test]
    fn failure_reasons_are_screened_for_the_usual_spellings_of_an_identifier() {
        let email = id(IdentifierKind::Email, "Ada@Example.com");
        for reason in [
            "no such member ada@example.com",
            "no such member ADA@EXAMPLE.COM",
            "GET /members/ada%40example.com answered 404",
            "ref ada\u{200b}@example.com",
            "ref \u{202e}ada@exam\u{ad}ple.com",
        ] {
            assert!(email.appears_in(reason), "{reason}");
        }
        let md5 = hex::encode(<md5::Md5 as sha2::Digest>::digest(b"ada@example.com"));
        assert!(email.appears_in(&format!("list member {md5} is archived")));
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"ada@example.com"));
        assert!(email.appears_in(&format!("profile {} gone", sha.to_uppercase())));
        assert!(!email.appears_in("connection refused by mail.example.com"));

        let phone = id(IdentifierKind::Phone, "+44 20 7946 0958");
        for reason in ["number +442079460958 blocked", "number 020 7946 0958 blocked", "tel. (0)20-7946-0958"]
        {
            assert!(phone.appears_in(reason), "{reason}");
        }
        assert!(!phone.appears_in("timed out after 30000 ms (attempt 3 of 5)"));

        // A short customer number is not looked for as text.
        let short = id(IdentifierKind::CustomerId, "42");
        assert!(!short.appears_in("HTTP 429 after 42 requests"));
        let long = id(IdentifierKind::CustomerId, "C-1042");
        assert!(long.appears_in("customer c-1042 is locked"));
    }
}
