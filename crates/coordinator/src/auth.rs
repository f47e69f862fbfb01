//! Authentication of connector workers: each system has its own bearer
//! token, and a worker presenting it may read only its system's task keys.
//! Tokens are kept as SHA-256 digests, never as given.

use std::collections::HashMap;

use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use crate::api::problem::Problem;

/// The systems' connector tokens, by digest.
#[derive(Debug, Clone, Default)]
pub struct ConnectorTokens(HashMap<[u8; 32], String>);

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl ConnectorTokens {
    /// From (system, token) pairs.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(pairs.into_iter().map(|(system, token)| (digest(&token), system)).collect())
    }

    /// The system whose token is presented as `Authorization: Bearer …`.
    /// Looking up the digest (not the token) keeps the comparison
    /// independent of how much of a guessed token is right.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&str, Problem> {
        let unauthorized =
            || Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid connector token is required");
        let value =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(unauthorized)?;
        let token = value.strip_prefix("Bearer ").ok_or_else(unauthorized)?;
        self.0.get(&digest(token.trim())).map(String::as_str).ok_or_else(unauthorized)
    }
}
