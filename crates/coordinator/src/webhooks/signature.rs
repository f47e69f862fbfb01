//! The `Lethe-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256>`,
//! the MAC taken with the endpoint's secret over `"<t>.<raw body>"`.
//!
//! A receiver recomputes the MAC over the body exactly as received,
//! compares it in constant time, and rejects a timestamp more than
//! [`TOLERANCE`] away from its own clock, so that a captured delivery
//! cannot be replayed later. [`verify`] is that recipe.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the signature.
pub const HEADER: &str = "Lethe-Signature";

/// How old (or how far in the future) a signature's timestamp may be.
pub const TOLERANCE: Duration = Duration::from_secs(300);

/// Why a signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is malformed")]
    Malformed,
    #[error("the signature's timestamp is outside the replay window")]
    Expired,
    #[error("the signature does not match the body")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value for `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(tag))
}

/// Checks a header value against `body` at `now` (Unix seconds): the
/// timestamp within `tolerance`, and one `v1` MAC matching (compared in
/// constant time). Several `v1` entries are allowed, for secret rotation.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut tags = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => timestamp = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => tags.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?),
            Some(_) => {}
            None => return Err(SignatureError::Malformed),
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if tags.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now.abs_diff(timestamp) > tolerance.as_secs() {
        return Err(SignatureError::Expired);
    }
    let expected = mac(secret, timestamp, body);
    if tags.iter().any(|tag| expected.clone().verify_slice(tag).is_ok()) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"request.completed"}"#;

    #[test]
    fn signs_the_timestamp_and_body_with_hmac_sha256() {
        // HMAC-SHA256("whsec_test", "1767225600." + body), computed with Python's hmac module.
        let header = sign(SECRET, 1_767_225_600, BODY);
        assert_eq!(
            header,
            "t=1767225600,v1=9430ce4c39d1af7a4db454555dbf51423a68d5e1871f94d44dc224538949e9fc"
        );
        assert_eq!(sign(SECRET, 1_767_225_600, BODY), header, "deterministic");
        assert_ne!(sign(SECRET, 1_767_225_601, BODY), header, "the timestamp is signed");
        assert_ne!(sign(b"other", 1_767_225_600, BODY), header, "the secret matters");
    }

    #[test]
    fn verifies_within_the_window_and_rejects_tampering_and_replays() {
        let t = 1_767_225_600;
        let header = sign(SECRET, t, BODY);
        assert_eq!(verify(SECRET, &header, BODY, t + 299, TOLERANCE), Ok(()));
        assert_eq!(verify(SECRET, &header, BODY, t - 10, TOLERANCE), Ok(()));
        let tampered = br#"{"id":"evt_1","type":"request.failed"}"#;
        assert_eq!(verify(SECRET, &header, tampered, t, TOLERANCE), Err(SignatureError::Mismatch));
        assert_eq!(verify(b"wrong", &header, BODY, t, TOLERANCE), Err(SignatureError::Mismatch));
        assert_eq!(verify(SECRET, &header, BODY, t + 301, TOLERANCE), Err(SignatureError::Expired));
        let moved = header.replace(&format!("t={t}"), &format!("t={}", t + 1));
        assert_eq!(verify(SECRET, &moved, BODY, t, TOLERANCE), Err(SignatureError::Mismatch));
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz", "garbage"] {
            assert_eq!(verify(SECRET, bad, BODY, t, TOLERANCE), Err(SignatureError::Malformed), "{bad:?}");
        }
        let rotated = format!("{header},v1={}", "00".repeat(32));
        assert_eq!(verify(SECRET, &rotated, BODY, t, TOLERANCE), Ok(()));
    }
}
