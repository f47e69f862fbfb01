//! Sending one request: authentication (static or OAuth2 client
//! credentials), the client-side rate limit, and waiting out `429`s as the
//! server's `Retry-After` asks, within bounds.

use std::time::{Duration, SystemTime};

use lethe_connector::ConnectorError;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::error;
use crate::ratelimit::RateLimiter;
use crate::spec::ClientAuth;

/// Step name used for the OAuth2 token request in errors and logs.
const TOKEN_STEP: &str = "oauth2 token";

/// How requests authenticate, with credentials already rendered.
pub enum Auth {
    None,
    /// A fixed header (bearer, basic or an API-key header).
    Header(HeaderName, HeaderValue),
    OAuth2(OAuth2),
}

/// OAuth2 client credentials and the cached token.
pub struct OAuth2 {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub scope: Option<String>,
    pub client_auth: ClientAuth,
    pub cached: Mutex<Option<Token>>,
}

/// An access token and when to fetch the next one.
pub struct Token {
    value: HeaderValue,
    refresh_at: Instant,
}

impl OAuth2 {
    /// The cached token, or a new one once it is about to expire. One fetch
    /// at a time: concurrent callers wait for it.
    async fn header(&self, http: &reqwest::Client) -> Result<HeaderValue, ConnectorError> {
        let mut cached = self.cached.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.refresh_at) {
            return Ok(t.value.clone());
        }
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &self.scope {
            form.push(("scope", scope));
        }
        let mut rb = http.post(&self.token_url);
        match self.client_auth {
            ClientAuth::Basic => rb = rb.basic_auth(&self.client_id, Some(&self.client_secret)),
            ClientAuth::Body => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", &self.client_secret));
            }
        }
        let resp = rb.form(&form).send().await.map_err(|e| error::transport(TOKEN_STEP, &e))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(match status {
                400 | 401 | 403 => ConnectorError::permanent(format!(
                    "step {TOKEN_STEP:?}: credentials rejected (HTTP {status})"
                )),
                s => error::status(TOKEN_STEP, s, &[]),
            });
        }
        let body: Value = resp.json().await.map_err(|e| error::transport(TOKEN_STEP, &e))?;
        let token = body.get("access_token").and_then(Value::as_str).filter(|t| !t.is_empty());
        let token = token.ok_or_else(|| {
            ConnectorError::permanent(format!("step {TOKEN_STEP:?}: the response has no access_token"))
        })?;
        let expires_in = match body.get("expires_in") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(3600);
        let lifetime = Duration::from_secs(expires_in);
        let margin = (lifetime / 10).min(Duration::from_secs(60));
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ConnectorError::permanent(format!(
                "step {TOKEN_STEP:?}: the access token is not a valid header value"
            ))
        })?;
        value.set_sensitive(true);
        tracing::debug!(expires_in, "fetched an OAuth2 access token");
        *cached = Some(Token { value: value.clone(), refresh_at: Instant::now() + lifetime - margin });
        Ok(value)
    }

    async fn forget(&self) {
        *self.cached.lock().await = None;
    }
}

/// A request ready to send, with every template rendered.
pub struct Request {
    /// The step's name (logs and errors name it; never the URL).
    pub step: String,
    pub method: reqwest::Method,
    /// Path below the base URL, values already percent-encoded.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Body>,
}

/// A request body.
pub enum Body {
    Json(Vec<u8>),
    Form(Vec<(String, String)>),
}

/// What the server answered: the status and the body, parsed as JSON when
/// it is JSON (`null` otherwise).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The body as JSON; `null` when empty or not JSON.
    pub body: Value,
    /// Whether the body was JSON (or empty). An HTML page from a proxy, or
    /// an API answering in another format, is not: read as `null`, it
    /// would pass for "nothing found".
    pub json: bool,
}

/// Sends requests to one API.
pub struct Client {
    pub http: reqwest::Client,
    /// The base URL, without a trailing `/`.
    pub base: String,
    pub auth: Auth,
    /// Headers of every request.
    pub headers: HeaderMap,
    pub limiter: Option<RateLimiter>,
    /// Times a call waits out a 429 before failing.
    pub max_retries: u32,
    /// Longest wait a `Retry-After` may ask for within a call.
    pub max_retry_after: Duration,
}

impl Client {
    /// Builds the HTTP client: request timeout, no redirects (a deletion API
    /// that redirects is misconfigured, and a redirect would be logged with
    /// its URL).
    pub fn http(timeout: Duration) -> Result<reqwest::Client, ConnectorError> {
        reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("lethe-connector-http/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| ConnectorError::permanent("cannot build the HTTP client (TLS setup failed)"))
    }

    /// Sends `req`. A 429 (or a 503 with `Retry-After`) is waited out up to
    /// `max_retries` times when the wait asked for is at most
    /// `max_retry_after`; a 401 under OAuth2 fetches a new token once.
    /// Any other status is returned for the step to judge.
    pub async fn send(&self, req: &Request) -> Result<Response, ConnectorError> {
        let url = format!("{}{}", self.base, req.path);
        let mut waits = 0u32;
        let mut refreshed = false;
        loop {
            let mut rb = self.http.request(req.method.clone(), &url).headers(self.headers.clone());
            if !req.query.is_empty() {
                rb = rb.query(&req.query);
            }
            match &self.auth {
                Auth::None => {}
                Auth::Header(name, value) => rb = rb.header(name.clone(), value.clone()),
                Auth::OAuth2(o) => rb = rb.header(AUTHORIZATION, o.header(&self.http).await?),
            }
            for (name, value) in &req.headers {
                rb = rb.header(name.clone(), value.clone());
            }
            match &req.body {
                None => {}
                Some(Body::Json(bytes)) => {
                    if !req.headers.iter().any(|(n, _)| n == CONTENT_TYPE)
                        && !self.headers.contains_key(CONTENT_TYPE)
                    {
                        rb = rb.header(CONTENT_TYPE, "application/json");
                    }
                    rb = rb.body(bytes.clone());
                }
                Some(Body::Form(pairs)) => rb = rb.form(pairs),
            }
            // Held until the answer is read (or the request failed): see
            // `ratelimit` for why the window counts from there.
            let slot = match &self.limiter {
                Some(limiter) => Some(limiter.acquire().await),
                None => None,
            };
            let resp = rb.send().await.map_err(|e| error::transport(&req.step, &e))?;
            let status = resp.status().as_u16();
            if status == 401 && !refreshed {
                if let Auth::OAuth2(o) = &self.auth {
                    tracing::debug!(step = %req.step, "401: fetching a new OAuth2 token once");
                    o.forget().await;
                    refreshed = true;
                    continue;
                }
            }
            let asked = retry_after(resp.headers());
            if status == 429 || (status == 503 && asked.is_some()) {
                drop(slot);
                let wait = asked.unwrap_or_else(|| Duration::from_secs(1 << waits.min(5)));
                if waits < self.max_retries && wait <= self.max_retry_after {
                    tracing::debug!(step = %req.step, status, wait_ms = wait.as_millis() as u64, "waiting as the server asked");
                    tokio::time::sleep(wait).await;
                    waits += 1;
                    continue;
                }
                tracing::debug!(step = %req.step, status, waits, "rate limited; giving up for this attempt");
                return Err(error::status(&req.step, status, &[]));
            }
            let bytes = resp.bytes().await.map_err(|e| error::transport(&req.step, &e))?;
            drop(slot);
            let (body, json) = if bytes.is_empty() {
                (Value::Null, true)
            } else {
                serde_json::from_slice(&bytes).map_or((Value::Null, false), |v| (v, true))
            };
            tracing::debug!(step = %req.step, status, json, "answered");
            return Ok(Response { status, body, json });
        }
    }
}

/// `Retry-After` as seconds or an HTTP date, as a wait from now.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(30);
        h.insert(RETRY_AFTER, HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(28) && d <= Duration::from_secs(30), "{d:?}");
        h.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
