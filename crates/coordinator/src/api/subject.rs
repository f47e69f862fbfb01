//! A subject as the API reads it: identifiers by type, each type once.
//!
//! A JSON object may repeat a key, and a map would keep only the last value:
//! `{"email": "a@x.com", "email": "b@x.com"}` would erase one address and
//! report the subject done. These readers refuse the repeat instead.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer, Error, MapAccess, SeqAccess, Visitor};

/// The message a repeated type fails with; `describe_json_error` knows it.
pub(crate) const DUPLICATE_TYPE: &str = "duplicate identifier type";

struct SubjectVisitor;

impl<'de> Visitor<'de> for SubjectVisitor {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of identifiers by type")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut subject = BTreeMap::new();
        while let Some((kind, value)) = map.next_entry::<String, String>()? {
            if subject.insert(kind, value).is_some() {
                return Err(A::Error::custom(DUPLICATE_TYPE));
            }
        }
        Ok(subject)
    }
}

/// One subject (`deserialize_with`).
pub(crate) fn subject<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    d.deserialize_map(SubjectVisitor)
}

/// A list of subjects (`deserialize_with`).
pub(crate) fn subjects<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BTreeMap<String, String>>, D::Error> {
    struct Subjects;
    impl<'de> Visitor<'de> for Subjects {
        type Value = Vec<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of subjects")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            struct One(BTreeMap<String, String>);
            impl<'de> serde::Deserialize<'de> for One {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    subject(d).map(One)
                }
            }
            let mut all = Vec::new();
            while let Some(One(s)) = seq.next_element()? {
                all.push(s);
            }
            Ok(all)
        }
    }
    d.deserialize_seq(Subjects)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct One {
        #[serde(deserialize_with = "super::subject")]
        subject: std::collections::BTreeMap<String, String>,
    }

    #[derive(Deserialize)]
    struct Many {
        #[serde(deserialize_with = "super::subjects")]
        subjects: Vec<std::collections::BTreeMap<String, String>>,
    }

    #[test]
    fn a_repeated_type_is_refused() {
        let ok: One = serde_json::from_str(r#"{"subject": {"email": "a@x.io", "phone": "+4420"}}"#).unwrap();
        assert_eq!(ok.subject.len(), 2);
        let err = serde_json::from_str::<One>(r#"{"subject": {"email": "a@x.io", "email": "b@x.io"}}"#)
            .err()
            .unwrap();
        assert!(err.to_string().starts_with(super::DUPLICATE_TYPE), "{err}");
        let many: Many = serde_json::from_str(r#"{"subjects": [{"email": "a@x.io"}, {}]}"#).unwrap();
        assert_eq!(many.subjects.len(), 2);
        assert!(serde_json::from_str::<Many>(r#"{"subjects": [{"email": "a@x.io", "email": "a@x.io"}]}"#)
            .is_err());
        assert!(serde_json::from_str::<One>(r#"{"subject": {"email": 7}}"#).is_err());
    }
}
