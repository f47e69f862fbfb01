//! Key templates: literal text with `{type}` or `{type|filter}` placeholders
//! that a task's identifiers fill in.
//!
//! `{email}`, `{customer_id}` or any custom identifier type stands for the
//! normalised value; `{email|sha256}` and `{email|md5}` for the lower-case
//! hex digest of it. `{{` and `}}` are literal braces (e.g. a cluster hash
//! tag: `user:{{{customer_id}}}`). In a glob pattern the substituted values
//! are escaped, so a value such as `*` matches only itself.

use std::collections::BTreeMap;
use std::fmt;

use lethe_core::IdentifierKind;
use md5::Md5;
use sha2::{Digest, Sha256};

/// One assignment of identifier values to identifier types:
/// type name → normalised value.
pub type Binding<'a> = BTreeMap<&'a str, &'a str>;

/// A transformation applied to an identifier value before it is substituted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Lower-case hex SHA-256 of the value.
    Sha256,
    /// Lower-case hex MD5 of the value.
    Md5,
}

impl Filter {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Self::Sha256),
            "md5" => Some(Self::Md5),
            _ => None,
        }
    }

    fn apply(self, value: &str) -> String {
        match self {
            Self::Sha256 => hex::encode(Sha256::digest(value.as_bytes())),
            Self::Md5 => hex::encode(Md5::digest(value.as_bytes())),
        }
    }
}

/// How the rendered text is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// An exact key, field or member: values are substituted as they are.
    Exact,
    /// A `SCAN MATCH` glob: the literal text keeps its wildcards, the values
    /// are escaped.
    Glob,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Slot { kind: IdentifierKind, filter: Option<Filter> },
}

/// A parsed template.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    syntax: Syntax,
    parts: Vec<Part>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The source is configuration text, never an identifier value.
        write!(f, "Template({:?})", self.source)
    }
}

/// Whether `text`, a literal part of a pattern, starts and ends with an
/// unescaped wildcard (`*`, `?` or a `[...]` class).
fn glob_ends(text: &str) -> (bool, bool) {
    let wild = |c: char| matches!(c, '*' | '?' | '[' | ']');
    let first = text.chars().next().is_some_and(wild);
    let mut last = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        last = wild(c);
        if c == '\\' {
            chars.next();
            last = false;
        }
    }
    (first, last)
}

/// Whether `text`, a literal part of a pattern, holds an unescaped wildcard.
fn has_wildcard(text: &str) -> bool {
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// The first character `text` matches literally (after an escape).
fn first_char(text: &str) -> Option<char> {
    let mut chars = text.chars();
    match chars.next()? {
        '\\' => chars.next(),
        c => Some(c),
    }
}

/// The last character of `text` (a pattern never ends in a lone escape).
fn last_char(text: &str) -> Option<char> {
    text.chars().next_back()
}

impl Template {
    /// Parses `source`. Errors name the problem, never a value.
    pub fn parse(source: &str, syntax: Syntax) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(format!("{source:?}: unmatched `}}` (write `}}}}` for a literal brace)")),
                '{' => {
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => inner.push(c),
                            None => {
                                return Err(format!(
                                    "{source:?}: unclosed `{{` (write `{{{{` for a literal brace)"
                                ))
                            }
                        }
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(slot(source, &inner)?);
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let template = Self { source: source.to_owned(), syntax, parts };
        if syntax == Syntax::Glob {
            template.check_glob()?;
            template.check_wildcards_apart()?;
        }
        Ok(template)
    }

    /// A wildcard right against a placeholder is refused:
    /// `sess:{customer_id}*` for customer 12 also matches customer 123's keys.
    fn check_wildcards_apart(&self) -> Result<(), String> {
        for (i, part) in self.parts.iter().enumerate() {
            let Part::Literal(text) = part else { continue };
            let (first, last) = glob_ends(text);
            let slot_before = i > 0 && matches!(self.parts[i - 1], Part::Slot { .. });
            let slot_after = matches!(self.parts.get(i + 1), Some(Part::Slot { .. }));
            if (slot_before && first) || (slot_after && last) {
                return Err(format!(
                    "{:?}: a wildcard right against a placeholder would match other subjects' keys too; \
                     put a separator between them (e.g. `{{customer_id}}:*`)",
                    self.source
                ));
            }
        }
        Ok(())
    }

    /// A placeholder inside a `[...]` class would put the value's characters
    /// in a set of alternatives: refused. So is a pattern ending in a lone
    /// escape.
    fn check_glob(&self) -> Result<(), String> {
        let mut in_class = false;
        for part in &self.parts {
            match part {
                Part::Slot { .. } if in_class => {
                    return Err(format!("{:?}: a placeholder cannot stand inside `[...]`", self.source))
                }
                Part::Slot { .. } => {}
                Part::Literal(text) => {
                    let mut chars = text.chars();
                    while let Some(c) = chars.next() {
                        match c {
                            // An escape must escape something in the literal text:
                            // before a placeholder it would swallow the escape of
                            // the value's first character.
                            '\\' => {
                                let Some(_) = chars.next() else {
                                    return Err(format!(
                                        "{:?}: `\\` must escape the character after it",
                                        self.source
                                    ));
                                };
                            }
                            '[' if !in_class => in_class = true,
                            ']' if in_class => in_class = false,
                            _ => {}
                        }
                    }
                }
            }
        }
        if in_class {
            return Err(format!("{:?}: unclosed `[`", self.source));
        }
        Ok(())
    }

    /// The template as configured.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The identifier types the template needs, each once.
    pub fn kinds(&self) -> impl Iterator<Item = &IdentifierKind> + '_ {
        let mut seen: Vec<&IdentifierKind> = Vec::new();
        self.parts.iter().filter_map(move |p| match p {
            Part::Slot { kind, .. } if !seen.contains(&kind) => {
                seen.push(kind);
                Some(kind)
            }
            _ => None,
        })
    }

    /// Whether the template has no placeholder: the same text for everyone.
    pub fn is_fixed(&self) -> bool {
        self.kinds().next().is_none()
    }

    /// For a pattern: the first value of `binding` that contains the
    /// character separating its placeholder from a wildcard further on, as
    /// (identifier type, separator). In `cart:{customer_id}:*` the value
    /// `acme:eu` is such a value: its keys and those of customer `acme` share
    /// the prefix `cart:acme:`, so neither subject's keys can be told apart
    /// from the other's. Digests (`|sha256`, `|md5`) have a fixed length and
    /// are never ambiguous.
    pub fn ambiguous<'b>(&self, binding: &Binding<'b>) -> Option<(&'b str, char)> {
        if self.syntax != Syntax::Glob {
            return None;
        }
        let wild = |part: &Part| matches!(part, Part::Literal(text) if has_wildcard(text));
        for (i, part) in self.parts.iter().enumerate() {
            let Part::Slot { kind, filter: None } = part else { continue };
            let Some((&kind, &value)) = binding.get_key_value(kind.as_str()) else { continue };
            let after = match self.parts.get(i + 1) {
                Some(Part::Literal(text)) if self.parts[i + 1..].iter().any(wild) => first_char(text),
                _ => None,
            };
            let before = match i.checked_sub(1).map(|j| &self.parts[j]) {
                Some(Part::Literal(text)) if self.parts[..i].iter().any(wild) => last_char(text),
                _ => None,
            };
            if let Some(sep) = [after, before].into_iter().flatten().find(|&c| value.contains(c)) {
                return Some((kind, sep));
            }
        }
        None
    }

    /// The text for `binding`, or `None` if it lacks a type the template needs.
    pub fn render(&self, binding: &Binding<'_>) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Slot { kind, filter } => {
                    let value = *binding.get(kind.as_str())?;
                    let value = match filter {
                        Some(f) => f.apply(value),
                        None => value.to_owned(),
                    };
                    match self.syntax {
                        Syntax::Exact => out.push_str(&value),
                        Syntax::Glob => escape_glob_into(&value, &mut out),
                    }
                }
            }
        }
        Some(out)
    }
}

fn slot(source: &str, inner: &str) -> Result<Part, String> {
    let (kind, filter) = match inner.split_once('|') {
        Some((k, f)) => (k.trim(), Some(f.trim())),
        None => (inner.trim(), None),
    };
    let kind = kind.parse::<IdentifierKind>().map_err(|_| {
        format!("{source:?}: `{{{inner}}}` does not name an identifier type (email, phone, customer_id, device_id or a lower-case word)")
    })?;
    let filter = match filter {
        None => None,
        Some(name) => Some(
            Filter::parse(name)
                .ok_or_else(|| format!("{source:?}: unknown filter {name:?} (sha256 or md5)"))?,
        ),
    };
    Ok(Part::Slot { kind, filter })
}

/// Appends `value` with the glob metacharacters `* ? [ ] \` escaped.
fn escape_glob_into(value: &str, out: &mut String) {
    for c in value.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Every combination of the task's values for `kinds` (a subject may have
/// several identifiers of one type). Empty when a type has no value.
pub fn bindings<'a>(kinds: &[&'a str], values: &'a BTreeMap<String, Vec<String>>) -> Vec<Binding<'a>> {
    let mut out = vec![Binding::new()];
    for &kind in kinds {
        let Some(vs) = values.get(kind).filter(|v| !v.is_empty()) else {
            return Vec::new();
        };
        out = out
            .into_iter()
            .flat_map(|b| {
                vs.iter().map(move |v| {
                    let mut b = b.clone();
                    b.insert(kind, v.as_str());
                    b
                })
            })
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one<'a>(kind: &'a str, value: &'a str) -> Binding<'a> {
        Binding::from([(kind, value)])
    }

    #[test]
    fn renders_placeholders_and_literal_braces() {
        let t = Template::parse("session:{customer_id}", Syntax::Exact).unwrap();
        assert_eq!(t.render(&one("customer_id", "C-42")).unwrap(), "session:C-42");
        assert_eq!(t.render(&one("email", "a@b.c")), None);
        let t = Template::parse("user:{{{customer_id}}}:cart", Syntax::Exact).unwrap();
        assert_eq!(t.render(&one("customer_id", "7")).unwrap(), "user:{7}:cart");
        let t = Template::parse("{ loyalty_no }", Syntax::Exact).unwrap();
        assert_eq!(t.render(&one("loyalty_no", "77")).unwrap(), "77");
        assert!(Template::parse("fixed:index", Syntax::Exact).unwrap().is_fixed());
    }

    #[test]
    fn a_value_holding_the_separator_of_a_pattern_is_ambiguous() {
        let glob = |s: &str| Template::parse(s, Syntax::Glob).unwrap();
        let t = glob("cart:{customer_id}:*");
        assert_eq!(t.ambiguous(&one("customer_id", "acme")), None);
        assert_eq!(t.ambiguous(&one("customer_id", "acme:eu")), Some(("customer_id", ':')));
        assert_eq!(t.ambiguous(&one("email", "a:b")), None, "not this template's type");
        // A wildcard before the placeholder makes the separator before it count.
        let t = glob("*/{customer_id}");
        assert_eq!(t.ambiguous(&one("customer_id", "eu/1")), Some(("customer_id", '/')));
        assert_eq!(t.ambiguous(&one("customer_id", "eu:1")), None);
        // An escaped separator is the character it escapes.
        let t = glob("k\\?{customer_id}\\?*");
        assert_eq!(t.ambiguous(&one("customer_id", "a?b")), Some(("customer_id", '?')));
        // No wildcard: the key is exact whatever the value holds. Digests
        // have a fixed length. Exact templates are never ambiguous.
        assert_eq!(glob("cart:{customer_id}:main").ambiguous(&one("customer_id", "a:b")), None);
        assert_eq!(glob("av:{email|md5}:*").ambiguous(&one("email", "a:b@x.org")), None);
        let t = Template::parse("cart:{customer_id}:x", Syntax::Exact).unwrap();
        assert_eq!(t.ambiguous(&one("customer_id", "a:b")), None);
    }

    #[test]
    fn filters_hash_the_value() {
        let t = Template::parse("avatar:{email|md5}:{email|sha256}", Syntax::Exact).unwrap();
        let out = t.render(&one("email", "ada@example.com")).unwrap();
        let md5 = hex::encode(Md5::digest(b"ada@example.com"));
        let sha = hex::encode(Sha256::digest(b"ada@example.com"));
        assert_eq!(out, format!("avatar:{md5}:{sha}"));
        assert_eq!(t.kinds().map(|k| k.as_str()).collect::<Vec<_>>(), vec!["email"]);
    }

    #[test]
    fn glob_values_are_escaped_literal_wildcards_kept() {
        let t = Template::parse("cart:{customer_id}:*", Syntax::Glob).unwrap();
        assert_eq!(t.render(&one("customer_id", "a*b?[c]\\d")).unwrap(), r"cart:a\*b\?\[c\]\\d:*");
        // The same value in an exact key is kept as is.
        let t = Template::parse("cart:{customer_id}", Syntax::Exact).unwrap();
        assert_eq!(t.render(&one("customer_id", "a*b")).unwrap(), "cart:a*b");
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in ["a:{email", "a:}", "a:{Email}", "a:{email|sha1}", "a:{}", "a:{bad-kind}"] {
            assert!(Template::parse(bad, Syntax::Exact).is_err(), "{bad}");
        }
        for bad in ["a:[{email}]", "a:[x", "a:{email}\\", "a:\\{email}"] {
            assert!(Template::parse(bad, Syntax::Glob).is_err(), "{bad}");
        }
        assert!(Template::parse("a:[xy]:{email}:\\*", Syntax::Glob).is_ok());
        // A wildcard against a placeholder: customer 12's pattern would
        // match customer 123's keys.
        for bad in ["sess:{customer_id}*", "sess:*{customer_id}", "s:{customer_id}?:x", "s:[ab]{email}"] {
            let e = Template::parse(bad, Syntax::Glob).unwrap_err();
            assert!(e.contains("separator"), "{bad}: {e}");
        }
        assert!(Template::parse("sess:{customer_id}\\*", Syntax::Glob).is_ok(), "an escaped star is literal");
    }

    #[test]
    fn bindings_are_the_cartesian_product() {
        let values = BTreeMap::from([
            ("email".to_owned(), vec!["a@x.io".to_owned(), "b@x.io".to_owned()]),
            ("customer_id".to_owned(), vec!["1".to_owned()]),
        ]);
        let all = bindings(&["customer_id", "email"], &values);
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|b| b["customer_id"] == "1"));
        assert!(bindings(&["phone"], &values).is_empty());
        assert_eq!(bindings(&[], &values), vec![Binding::new()]);
    }
}
