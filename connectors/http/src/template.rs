//! Templates: `{name|filter|…}` placeholders in base URLs, paths, query
//! values, headers and JSON bodies, and JSON pointers into responses.
//!
//! A placeholder names a variable (`subject`, an identifier type such as
//! `email`, `settings.list_id`, a value extracted by an earlier step,
//! `job.id`, …) and applies filters left to right: `lower`, `upper`, `trim`,
//! `md5`, `sha256` (lower-case hex), `base64`, `urlencode`, `json` (a JSON
//! string literal, quotes included) and `date` (the `YYYY-MM-DD` of an
//! RFC 3339 timestamp). `{{` and `}}` are literal braces.
//!
//! Where a value goes decides how it is escaped: a path segment is
//! percent-encoded (so a value can never add a `/` or a `?`, and a value
//! that would make a segment `.` or `..` is refused), a query value
//! is form-encoded by the HTTP client, a JSON body is serialised by
//! `serde_json`; headers reject control characters.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use md5::Md5;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Everything but RFC 3986 unreserved characters is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A transformation applied to a placeholder's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Lower,
    Upper,
    Trim,
    Md5,
    Sha256,
    Base64,
    Urlencode,
    Json,
    Date,
}

impl Filter {
    fn parse(name: &str) -> Result<Self, String> {
        Ok(match name {
            "lower" => Self::Lower,
            "upper" => Self::Upper,
            "trim" => Self::Trim,
            "md5" => Self::Md5,
            "sha256" => Self::Sha256,
            "base64" => Self::Base64,
            "urlencode" => Self::Urlencode,
            "json" => Self::Json,
            "date" => Self::Date,
            other => {
                return Err(format!(
                    "unknown filter {other:?} (known: lower, upper, trim, md5, sha256, base64, urlencode, json, date)"
                ))
            }
        })
    }

    fn apply(self, s: String) -> String {
        match self {
            Self::Lower => s.to_lowercase(),
            Self::Upper => s.to_uppercase(),
            Self::Trim => s.trim().to_owned(),
            Self::Md5 => hex::encode(Md5::digest(s.as_bytes())),
            Self::Sha256 => hex::encode(Sha256::digest(s.as_bytes())),
            Self::Base64 => base64::engine::general_purpose::STANDARD.encode(s.as_bytes()),
            Self::Urlencode => utf8_percent_encode(&s, COMPONENT).to_string(),
            Self::Json => Value::String(s).to_string(),
            Self::Date => s.chars().take(10).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var { name: String, filters: Vec<Filter> },
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// How substituted values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// As is (query values, headers, JSON strings, pointers).
    None,
    /// Percent-encoded as one path segment, unless the last filter already
    /// was `urlencode`.
    PathSegment,
    /// Part of a pointer ([`select`]): `~`, `/` and `|` escaped (`~0`,
    /// `~1`, `~2`), so that a value is one segment and never a separator.
    Pointer,
}

/// A template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// The variable has no value (its name only, never a value).
    Missing(String),
    /// A value would make a path segment `.` or `..`, which the URL parser
    /// removes together with the segment before it: the request would go to
    /// another resource.
    DotSegment,
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(name) => write!(f, "template variable {{{name}}} has no value"),
            Self::DotSegment => f.write_str(
                "a value would make a path segment `.` or `..`, which would lead the request to another resource",
            ),
        }
    }
}

impl Template {
    /// Parses `source`; errors name the problem, not the source (which may
    /// hold a secret).
    pub fn parse(source: &str) -> Result<Self, String> {
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
                '}' => return Err("unmatched '}' (write '}}' for a literal brace)".into()),
                '{' => {
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err("unclosed '{' (write '{{' for a literal brace)".into())
                            }
                            Some(c) => inner.push(c),
                        }
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    let mut pieces = inner.split('|').map(str::trim);
                    let name = pieces.next().unwrap_or_default().to_owned();
                    if !is_var_name(&name) {
                        return Err(format!("bad placeholder name {name:?}"));
                    }
                    let filters = pieces.map(Filter::parse).collect::<Result<_, _>>()?;
                    parts.push(Part::Var { name, filters });
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self { parts })
    }

    /// The variable names the template refers to.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var { name, .. } => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The variable, when the template is exactly one placeholder without
    /// filters (its value is then inserted into JSON as is, arrays too).
    pub fn whole_var(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Var { name, filters }] if filters.is_empty() => Some(name),
            _ => None,
        }
    }

    /// Renders with `vars`, escaping substituted values as `escape` says.
    pub fn render(&self, vars: &Vars, escape: Escape) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Var { name, filters } => {
                    let value = vars.get(name).ok_or_else(|| RenderError::Missing(name.clone()))?;
                    let mut s = text(value);
                    for f in filters {
                        s = f.apply(s);
                    }
                    let encoded = escape == Escape::PathSegment && filters.last() != Some(&Filter::Urlencode);
                    if encoded {
                        out.extend(utf8_percent_encode(&s, COMPONENT));
                    } else if escape == Escape::Pointer {
                        out.push_str(&s.replace('~', "~0").replace('/', "~1").replace('|', "~2"));
                    } else {
                        out.push_str(&s);
                    }
                }
            }
        }
        if escape == Escape::PathSegment && has_dot_segment(&out) {
            return Err(RenderError::DotSegment);
        }
        Ok(out)
    }
}

/// Whether the path of `url` has a segment that URL parsers treat as `.`
/// or `..` (also when percent-encoded, as `%2e`).
fn has_dot_segment(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    path.split('/').any(|segment| {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        decoded == "." || decoded == ".."
    })
}

fn is_var_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            let mut chars = part.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

/// A value as text: strings as they are, `null` as nothing, numbers and
/// booleans as written, arrays and objects as compact JSON.
pub fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Variables of one run of a flow, by dotted name.
#[derive(Clone, Default)]
pub struct Vars {
    map: BTreeMap<String, Value>,
}

impl fmt::Debug for Vars {
    /// Names only: values include identifiers and secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.map.keys()).finish()
    }
}

impl Vars {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name)
    }

    pub fn set(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.map.insert(name.into(), value.into());
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

/// Renders a JSON body declared in TOML: every string is a template; a
/// string that is one placeholder without filters takes the variable's JSON
/// value (an array extracted by an earlier step stays an array).
pub fn render_json(value: &toml::Value, vars: &Vars) -> Result<Value, RenderError> {
    Ok(match value {
        toml::Value::String(s) => {
            // Checked when the spec was loaded.
            let t = Template::parse(s).unwrap_or(Template { parts: vec![Part::Literal(s.clone())] });
            match t.whole_var() {
                Some(name) => vars.get(name).cloned().ok_or_else(|| RenderError::Missing(name.to_owned()))?,
                None => Value::String(t.render(vars, Escape::None)?),
            }
        }
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => {
            Value::Array(items.iter().map(|v| render_json(v, vars)).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(t) => Value::Object(
            t.iter().map(|(k, v)| Ok((k.clone(), render_json(v, vars)?))).collect::<Result<_, _>>()?,
        ),
    })
}

/// Every template string inside a TOML body, for checks at load time.
pub fn json_templates(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::String(s) => out.push(s.clone()),
        toml::Value::Array(items) => items.iter().for_each(|v| json_templates(v, out)),
        toml::Value::Table(t) => t.values().for_each(|v| json_templates(v, out)),
        _ => {}
    }
}

/// Reads `pointer` in `value`: a JSON pointer (RFC 6901, `""` is the whole
/// document) with two additions: a `*` segment maps the rest of the pointer
/// over an array's elements (collecting what is found), and a
/// `[field=value]` segment picks the first array element whose `field`
/// reads `value`. Alternatives separated by `|` are tried in order (for an
/// API documented with two response shapes).
pub fn select(value: &Value, pointer: &str) -> Option<Value> {
    pointer.split('|').find_map(|p| select_one(value, p.trim()))
}

fn select_one(value: &Value, pointer: &str) -> Option<Value> {
    if pointer.is_empty() {
        return Some(value.clone());
    }
    let rest = pointer.strip_prefix('/')?;
    let segments: Vec<String> =
        rest.split('/').map(|s| s.replace("~1", "/").replace("~2", "|").replace("~0", "~")).collect();
    walk(value, &segments)
}

fn walk(value: &Value, segments: &[String]) -> Option<Value> {
    let Some((first, rest)) = segments.split_first() else { return Some(value.clone()) };
    if first == "*" {
        let items = value.as_array()?;
        return Some(Value::Array(items.iter().filter_map(|v| walk(v, rest)).collect()));
    }
    if let Some(filter) = first.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        let (field, wanted) = filter.split_once('=')?;
        let found = value.as_array()?.iter().find(|v| v.get(field).is_some_and(|f| text(f) == wanted))?;
        return walk(found, rest);
    }
    let next = match value {
        Value::Object(map) => map.get(first.as_str())?,
        Value::Array(items) => items.get(first.parse::<usize>().ok()?)?,
        _ => return None,
    };
    walk(next, rest)
}

/// Whether a selected value means "nothing there": absent, `null`, `false`,
/// `0`, `""`, `[]` or `{}`.
pub fn is_empty(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => true,
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::Bool(true)) => false,
    }
}

/// A selected value as a record count: a number as is, an array by its
/// length, a numeric string parsed, anything else present as 1.
pub fn count(value: Option<&Value>) -> u64 {
    match value {
        _ if is_empty(value) => 0,
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::Array(a)) => a.len() as u64,
        Some(Value::String(s)) => s.trim().parse().unwrap_or(1),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn vars() -> Vars {
        let mut v = Vars::default();
        v.set("email", "Ada@Example.com");
        v.set("settings.list_id", "l1");
        v.set("ids", json!(["a", "b"]));
        v.set("n", 3);
        v
    }

    fn render(t: &str, escape: Escape) -> String {
        Template::parse(t).unwrap().render(&vars(), escape).unwrap()
    }

    /// A value in a pointer is one piece of text: its `/` or `|` separate
    /// nothing, and it finds the entry that holds exactly it.
    #[test]
    fn a_value_in_a_pointer_is_never_a_separator() {
        let body = json!({"matches": [{"user_id": "a"}, {"user_id": "a/b|c~d"}]});
        let mut v = Vars::default();
        v.set("subject", "a/b|c~d");
        let p = Template::parse("/matches/[user_id={subject}]/user_id")
            .unwrap()
            .render(&v, Escape::Pointer)
            .unwrap();
        assert_eq!(p, "/matches/[user_id=a~1b~2c~0d]/user_id");
        assert_eq!(select(&body, &p), Some(json!("a/b|c~d")));
        v.set("subject", "a|/matches/0");
        let p = Template::parse("/matches/[user_id={subject}]").unwrap().render(&v, Escape::Pointer).unwrap();
        assert_eq!(select(&body, &p), None, "no alternative smuggled in");
    }

    #[test]
    fn filters_chain_left_to_right() {
        assert_eq!(render("{email|lower}", Escape::None), "ada@example.com");
        assert_eq!(render("{email|lower|md5}", Escape::None), hex::encode(Md5::digest(b"ada@example.com")));
        assert_eq!(render("{ email | upper }", Escape::None), "ADA@EXAMPLE.COM");
        assert_eq!(render("{email|json}", Escape::None), "\"Ada@Example.com\"");
        assert_eq!(render("{n}-{{x}}", Escape::None), "3-{x}");
        assert_eq!(render("{email|base64}", Escape::None), "QWRhQEV4YW1wbGUuY29t");
    }

    #[test]
    fn path_segments_are_percent_encoded_once() {
        assert_eq!(
            render("/lists/{settings.list_id}/m/{email}", Escape::PathSegment),
            "/lists/l1/m/Ada%40Example.com"
        );
        assert_eq!(render("/m/{email|urlencode}", Escape::PathSegment), "/m/Ada%40Example.com");
        let mut v = Vars::default();
        v.set("x", "../a b/?#");
        let t = Template::parse("/u/{x}").unwrap();
        assert_eq!(t.render(&v, Escape::PathSegment).unwrap(), "/u/..%2Fa%20b%2F%3F%23");
        // A value that is a whole `.` or `..` segment would move the request
        // up the path: refused, however it is written.
        for dots in [".", "..", "%2e", "%2E%2e", ".%2e"] {
            v.set("x", dots);
            let urlencoded = Template::parse("/u/{x|urlencode}/orders").unwrap();
            for t in [&t, &urlencoded] {
                if let Ok(path) = t.render(&v, Escape::PathSegment) {
                    assert!(!has_dot_segment(&path), "{dots:?} gave {path:?}");
                } else {
                    assert_eq!(t.render(&v, Escape::PathSegment), Err(RenderError::DotSegment), "{dots:?}");
                }
            }
        }
        v.set("x", "..");
        assert_eq!(t.render(&v, Escape::PathSegment), Err(RenderError::DotSegment));
        v.set("x", "...");
        assert_eq!(t.render(&v, Escape::PathSegment).unwrap(), "/u/...");
        v.set("x", "..a");
        assert_eq!(
            Template::parse("/u/{x}.json").unwrap().render(&v, Escape::PathSegment).unwrap(),
            "/u/..a.json"
        );
    }

    #[test]
    fn bad_templates_are_rejected_without_echoing_them() {
        for bad in ["{", "}", "{a|nope}", "{}", "{a b}", "{{x}"] {
            let e = Template::parse(bad);
            assert!(e.is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            Template::parse("{missing}").unwrap().render(&vars(), Escape::None),
            Err(RenderError::Missing("missing".into()))
        );
    }

    #[test]
    fn json_bodies_keep_structure_and_escape_strings() {
        let body: toml::Value = toml::from_str(
            r#"
            ids = "{ids}"
            text = "id {email}"
            nested = { list = ["{n}", "x"] }
            "#,
        )
        .unwrap();
        let mut v = vars();
        v.set("email", "o\"brien\\\u{e9}@example.com");
        let out = render_json(&body, &v).unwrap();
        assert_eq!(out["ids"], json!(["a", "b"]));
        assert_eq!(out["text"], json!("id o\"brien\\\u{e9}@example.com"));
        assert_eq!(out["nested"]["list"], json!([3, "x"]));
        let wire = serde_json::to_string(&out).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&wire).unwrap(), out);
    }

    #[test]
    fn pointers_select_map_and_filter() {
        let doc = json!({"results": [{"id": "7", "day": "2024-01-02", "s": "done"}, {"id": "8", "day": "2024-01-03"}]});
        assert_eq!(select(&doc, "/results/0/id"), Some(json!("7")));
        assert_eq!(select(&doc, "/results/*/id"), Some(json!(["7", "8"])));
        assert_eq!(select(&doc, "/results/[day=2024-01-02]/s"), Some(json!("done")));
        assert_eq!(select(&doc, "/results/[day=2030-01-01]/s"), None);
        assert_eq!(select(&doc, "/results/5"), None);
        assert_eq!(select(&doc, "/0/id|/results/1/id"), Some(json!("8")));
        assert_eq!(select(&doc, ""), Some(doc.clone()));
        assert_eq!(count(select(&doc, "/results").as_ref()), 2);
        assert!(is_empty(select(&doc, "/nothing").as_ref()));
        assert_eq!(count(Some(&json!({"a": 1}))), 1);
        assert_eq!(count(Some(&json!(4))), 4);
    }
}
