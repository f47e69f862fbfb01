//! Errors as `application/problem+json` (RFC 9457). Details are written
//! here, never copied from a database or from the input, so no identifier
//! and no internal error text can reach a client.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use lethe_store::StoreError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// An API error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ProblemBody {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
}

impl Problem {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self { status, title, detail: detail.into() }
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid request", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not found", detail)
    }

    /// A fault of the coordinator's own (logged by the caller), told
    /// without its details.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error", detail)
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "state store error while serving a request");
        if e.is_transient() {
            Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the state store is unavailable; retry later",
            )
        } else {
            Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
                "the request could not be processed",
            )
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let slug = self.title.replace(' ', "-");
        let body = ProblemBody {
            kind: format!("https://lethe.dev/problems/{slug}"),
            title: self.title,
            status: self.status.as_u16(),
            detail: self.detail,
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        (self.status, [(header::CONTENT_TYPE, "application/problem+json")], json).into_response()
    }
}

/// Turns an error answered by the router itself rather than by a handler
/// (a method the route does not take, a path that is not valid UTF-8, a
/// timeout) into `application/problem+json` like every other error, with a
/// detail written here: the router's own texts may quote the input.
pub async fn as_problem(response: Response) -> Response {
    let status = response.status();
    // A handler's own answers are JSON (a problem, or `/readyz`'s 503); the
    // router's are plain text or empty.
    let is_json = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes().starts_with(b"application/problem+json") || v.as_bytes().starts_with(b"application/json")
    });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (title, detail) = match status {
        StatusCode::BAD_REQUEST => ("bad request", "the request could not be read (path, query or headers)"),
        StatusCode::NOT_FOUND => ("not found", "no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => ("method not allowed", "this endpoint does not take this method"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload too large", "the request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported media type", "send the body as application/json"),
        StatusCode::REQUEST_TIMEOUT => ("request timeout", "the request took too long"),
        s if s.is_client_error() => ("bad request", "the request could not be processed"),
        _ => ("internal error", "the request could not be processed"),
    };
    let (mut parts, _) = response.into_parts();
    let mut problem = Problem::new(status, title, detail).into_response();
    // Keep what the router said besides the body (`Allow` on a 405, say).
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    for (name, value) in parts.headers.drain().filter_map(|(n, v)| n.map(|n| (n, v))) {
        problem.headers_mut().entry(name).or_insert(value);
    }
    problem
}

/// A JSON body parsed strictly: `application/json` only, size-limited by the
/// router, unknown fields rejected by the target type, and parse errors
/// described by position and kind without quoting the input.
#[derive(Debug)]
pub struct StrictJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for StrictJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported media type",
                "send the body as application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e: BytesRejection| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload too large",
                    "the request body is too large",
                )
            } else {
                Problem::new(StatusCode::BAD_REQUEST, "bad request", "the request body could not be read")
            }
        })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = lethe_bus::envelope::field_path(e.path());
            describe_json_error(e.into_inner(), path.as_deref())
        })?;
        de.end().map_err(|e| describe_json_error(e, None))?;
        Ok(StrictJson(value))
    }
}

/// Describes a serde_json error, at `path` in the body if known, without
/// the input fragment it may quote.
fn describe_json_error(e: serde_json::Error, path: Option<&str>) -> Problem {
    use serde_json::error::Category;
    let at = format!("line {}, column {}", e.line(), e.column());
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed JSON",
            format!("the body is not valid JSON ({at})"),
        ),
        Category::Data => Problem::invalid(data_error(&e, path, &format!(" ({at})"))),
    }
}

/// Parses one item of a body that parsed (a batch's request), describing
/// a failure as [`describe_json_error`] does, without a position (it would
/// be the body's).
pub(super) fn parse_item<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = lethe_bus::envelope::field_path(e.path());
        data_error(e.inner(), path.as_deref(), "")
    })
}

/// A data error by kind, at `path` if known; `at` is appended where a
/// position helps.
fn data_error(e: &serde_json::Error, path: Option<&str>, at: &str) -> String {
    let msg = e.to_string();
    let field = |prefix: &str| {
        msg.strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .filter(|f| lethe_bus::envelope::field_like(f))
            .map(str::to_owned)
    };
    if let Some(f) = field("unknown field `") {
        format!("unknown field `{f}`{at}")
    } else if let Some(f) = field("missing field `") {
        format!("missing field `{f}`")
    } else if msg.starts_with(super::subject::DUPLICATE_TYPE) {
        format!("a subject names an identifier type more than once{at}")
    } else if msg.starts_with("unknown field") {
        format!("unknown field{at}")
    } else if let Some(path) = path {
        // serde's message names the kind, then quotes the value: the kind only.
        let kind = if msg.starts_with("invalid type") {
            "has the wrong type"
        } else if msg.starts_with("invalid length") {
            "has the wrong number of items"
        } else if msg.starts_with("unknown variant") {
            "is not one of the allowed values"
        } else {
            "has an invalid value"
        };
        format!("`{path}` {kind}{at}")
    } else if at.is_empty() {
        "the item does not match the expected schema".to_owned()
    } else {
        format!("the body does not match the expected schema{at}")
    }
}
