//! Key templates: how a dataset's record keys are made from a subject's
//! identifiers, e.g. `customer:{customer_id}`.
//!
//! A placeholder names an identifier type; `{{` and `}}` stand for literal
//! braces. A template renders to one key per combination of the task's
//! identifiers of the named types, and to none when the task has no
//! identifier of one of them (the dataset is then skipped).

use std::fmt;

use lethe_connector::ErasureTask;
use lethe_core::IdentifierKind;
use serde::{Deserialize, Deserializer};

/// Most keys one template may render for one task: a guard against a
/// template with several placeholders over many identifiers.
pub const MAX_KEYS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Id(IdentifierKind),
}

/// A parsed key template.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    source: String,
    parts: Vec<Part>,
}

impl fmt::Debug for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyTemplate({:?})", self.source)
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl KeyTemplate {
    /// Parses `source`; it needs at least one placeholder, or every subject
    /// would share one key.
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("key template {source:?}: unclosed '{{'")),
                        }
                    }
                    let kind = name.parse::<IdentifierKind>().map_err(|e| {
                        format!(
                            "key template {source:?}: placeholder {{{name}}} is not an identifier type: {e}"
                        )
                    })?;
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Id(kind));
                }
                '}' => return Err(format!("key template {source:?}: lone '}}' (write '}}}}')")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if !parts.iter().any(|p| matches!(p, Part::Id(_))) {
            return Err(format!(
                "key template {source:?} has no placeholder such as {{customer_id}}: it would match every subject's data"
            ));
        }
        Ok(Self { source: source.to_owned(), parts })
    }

    /// The identifier types the template needs.
    pub fn kinds(&self) -> impl Iterator<Item = &IdentifierKind> {
        self.parts.iter().filter_map(|p| match p {
            Part::Id(k) => Some(k),
            Part::Text(_) => None,
        })
    }

    /// Every key of `task`'s subject, without duplicates: empty when the
    /// task lacks an identifier of a type the template names.
    pub fn render(&self, task: &ErasureTask) -> Result<Vec<Vec<u8>>, String> {
        let mut keys: Vec<String> = vec![String::new()];
        for part in &self.parts {
            match part {
                Part::Text(t) => keys.iter_mut().for_each(|k| k.push_str(t)),
                Part::Id(kind) => {
                    let mut values: Vec<&str> =
                        task.identifiers_of(kind.as_str()).map(|i| i.expose()).collect();
                    values.sort_unstable();
                    values.dedup();
                    if keys.len().saturating_mul(values.len()) > MAX_KEYS {
                        return Err(format!(
                            "key template {:?} renders more than {MAX_KEYS} keys for one subject",
                            self.source
                        ));
                    }
                    keys = keys.iter().flat_map(|k| values.iter().map(move |v| format!("{k}{v}"))).collect();
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        Ok(keys.into_iter().map(String::into_bytes).collect())
    }
}

impl<'de> Deserialize<'de> for KeyTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use lethe_core::{Action, Identifier, RequestId, TaskId};

    use super::*;

    fn task(ids: &[(&str, &str)]) -> ErasureTask {
        ErasureTask {
            task_id: TaskId::new(),
            request_id: RequestId::new(),
            system: "events".into(),
            action: Action::Erase,
            directives: vec![],
            issued_at: Utc::now(),
            attempt: 1,
            identifiers: ids.iter().map(|(k, v)| Identifier::parse(k.parse().unwrap(), v).unwrap()).collect(),
            job: None,
            wanted: lethe_connector::StillWanted::always(),
        }
    }

    fn render(template: &str, ids: &[(&str, &str)]) -> Vec<String> {
        let keys = KeyTemplate::parse(template).unwrap().render(&task(ids)).unwrap();
        keys.into_iter().map(|k| String::from_utf8(k).unwrap()).collect()
    }

    #[test]
    fn renders_one_key_per_identifier() {
        assert_eq!(render("customer:{customer_id}", &[("customer_id", "42")]), ["customer:42"]);
        assert_eq!(
            render("{email}", &[("email", " Ada@Example.com "), ("email", "b@example.com")]),
            ["ada@example.com", "b@example.com"],
            "normalised values, sorted"
        );
        assert_eq!(
            render(
                "{customer_id}/{device_id}",
                &[("customer_id", "1"), ("device_id", "a"), ("device_id", "b")]
            ),
            ["1/a", "1/b"]
        );
        assert_eq!(render("{{json}}:{loyalty_no}", &[("loyalty_no", "7")]), ["{json}:7"]);
    }

    #[test]
    fn a_missing_identifier_type_renders_nothing() {
        assert!(render("customer:{customer_id}", &[("email", "a@example.com")]).is_empty());
        assert!(render("{customer_id}/{device_id}", &[("customer_id", "1")]).is_empty());
    }

    #[test]
    fn bad_templates_are_rejected() {
        for bad in ["customer:", "{customer_id", "a}b", "{Bad-Kind}", "{}"] {
            assert!(KeyTemplate::parse(bad).is_err(), "{bad:?} accepted");
        }
        let t = KeyTemplate::parse("{email}:{customer_id}").unwrap();
        assert_eq!(t.kinds().map(|k| k.as_str()).collect::<Vec<_>>(), ["email", "customer_id"]);
    }

    #[test]
    fn the_number_of_keys_is_bounded() {
        let ids: Vec<(String, String)> = (0..40)
            .flat_map(|i| [("customer_id".into(), format!("c{i}")), ("device_id".into(), format!("d{i}"))])
            .collect();
        let ids: Vec<(&str, &str)> = ids.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let err = KeyTemplate::parse("{customer_id}{device_id}").unwrap().render(&task(&ids)).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }
}
