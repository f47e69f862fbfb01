//! Turning HTTP statuses and transport failures into retryable or permanent
//! [`ConnectorError`]s. Messages name the step and the status, never a URL,
//! a body or a value: those can hold identifiers and secrets.

use lethe_connector::ConnectorError;

/// A status the step does not accept, classified.
pub fn status(step: &str, status: u16, also_retryable: &[u16]) -> ConnectorError {
    let what = match status {
        401 | 403 => "credentials rejected",
        404 => "not found",
        408 => "request timed out",
        409 => "conflict",
        429 => "rate limited",
        300..=399 => "unexpected redirect",
        400..=499 => "request rejected",
        500..=599 => "server error",
        _ => "unexpected status",
    };
    let message = format!("step {step:?}: {what} (HTTP {status})");
    if matches!(status, 408 | 425 | 429 | 500..=599) || also_retryable.contains(&status) {
        ConnectorError::retryable(message)
    } else {
        ConnectorError::permanent(message)
    }
}

/// A request that got no usable answer: timeouts and connection failures
/// are retryable; a request that could not even be built is permanent.
pub fn transport(step: &str, e: &reqwest::Error) -> ConnectorError {
    // reqwest's own message includes the URL: never use it.
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_builder() {
        return ConnectorError::permanent(format!("step {step:?}: invalid request (check base_url)"));
    } else if e.is_body() || e.is_decode() {
        "the response body could not be read"
    } else if e.is_redirect() {
        return ConnectorError::permanent(format!("step {step:?}: unexpected redirect"));
    } else {
        "transport error"
    };
    ConnectorError::retryable(format!("step {step:?}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let e = status("delete member", 401, &[]);
        assert!(!e.retryable);
        assert_eq!(e.message, "step \"delete member\": credentials rejected (HTTP 401)");
        assert!(status("s", 429, &[]).retryable);
        assert!(status("s", 503, &[]).retryable);
        assert!(status("s", 408, &[]).retryable);
        assert!(!status("s", 400, &[]).retryable);
        assert!(!status("s", 404, &[]).retryable);
        assert!(!status("s", 302, &[]).retryable);
        assert!(status("s", 409, &[409]).retryable);
    }
}
