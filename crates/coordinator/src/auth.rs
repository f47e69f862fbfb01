//! Who is calling, and what they may do.
//!
//! Every API call but health, readiness, the OpenAPI document and the
//! certificate public keys carries `Authorization: Bearer <token>`. Tokens
//! are kept only as SHA-256 digests: API tokens in the state store (created
//! with `lethe token create`), connector tokens of the systems in the
//! configuration. A missing, unknown or revoked token is 401; a token
//! without the scope an endpoint needs is 403. Neither answer says more.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use lethe_core::crypto::constant_time_eq;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::api::problem::Problem;
use crate::api::AppState;

/// What a token allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Submit requests (a portal).
    RequestsSubmit,
    /// Read the requests this token submitted, and their certificates.
    RequestsReadOwn,
    /// Read every request, explain plans, list systems (ops).
    RequestsRead,
    /// Retry tasks and extend deadlines (ops).
    RequestsManage,
    /// Place, list and release legal holds.
    HoldsWrite,
    /// Ask whether subjects are on the suppression list (ingestion).
    SuppressionsCheck,
    /// A connector worker of one system: that system's task keys only.
    Connector(String),
}

impl Scope {
    /// Every scope an administrator's token gets (not connector scopes).
    pub const ADMIN: [Scope; 5] = [
        Scope::RequestsSubmit,
        Scope::RequestsRead,
        Scope::RequestsManage,
        Scope::HoldsWrite,
        Scope::SuppressionsCheck,
    ];
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RequestsSubmit => f.write_str("requests:submit"),
            Self::RequestsReadOwn => f.write_str("requests:read:own"),
            Self::RequestsRead => f.write_str("requests:read"),
            Self::RequestsManage => f.write_str("requests:manage"),
            Self::HoldsWrite => f.write_str("holds:write"),
            Self::SuppressionsCheck => f.write_str("suppressions:check"),
            Self::Connector(system) => write!(f, "connector:{system}"),
        }
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "requests:submit" => Self::RequestsSubmit,
            "requests:read:own" => Self::RequestsReadOwn,
            "requests:read" => Self::RequestsRead,
            "requests:manage" => Self::RequestsManage,
            "holds:write" => Self::HoldsWrite,
            "suppressions:check" => Self::SuppressionsCheck,
            other => match other.strip_prefix("connector:") {
                Some(system) if !system.is_empty() => Self::Connector(system.to_owned()),
                _ => {
                    return Err(format!(
                    "unknown scope {other:?}; expected requests:submit, requests:read:own, requests:read, \
                         requests:manage, holds:write, suppressions:check or connector:<system>"
                ))
                }
            },
        })
    }
}

/// A new random token: `lethe_` and 43 characters (256 bits).
pub fn new_token() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("lethe_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The digest a token is stored and looked up by (hex SHA-256).
pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The systems' connector tokens from the configuration, by digest.
#[derive(Debug, Clone, Default)]
pub struct ConnectorTokens(HashMap<String, String>);

impl ConnectorTokens {
    /// From (system, token) pairs.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(pairs.into_iter().map(|(system, token)| (digest(&token), system)).collect())
    }

    fn system(&self, digest: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(d, _)| constant_time_eq(d.as_bytes(), digest.as_bytes()))
            .map(|(_, s)| s.as_str())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The API token's id (`connector:<system>` for a configured connector
    /// token); recorded as the submitter of requests.
    pub token_id: String,
    scopes: Vec<Scope>,
}

impl Caller {
    pub fn new(token_id: impl Into<String>, scopes: Vec<Scope>) -> Self {
        Self { token_id: token_id.into(), scopes }
    }

    pub fn can(&self, scope: &Scope) -> bool {
        self.scopes.contains(scope)
    }

    /// 403 unless the token has `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), Problem> {
        if self.can(&scope) {
            Ok(())
        } else {
            Err(forbidden())
        }
    }

    /// 403 unless the token has one of `scopes`.
    pub fn require_any(&self, scopes: &[Scope]) -> Result<(), Problem> {
        if scopes.iter().any(|s| self.can(s)) {
            Ok(())
        } else {
            Err(forbidden())
        }
    }

    /// The system of a connector token.
    pub fn connector_system(&self) -> Option<&str> {
        self.scopes.iter().find_map(|s| match s {
            Scope::Connector(system) => Some(system.as_str()),
            _ => None,
        })
    }
}

pub fn unauthorized() -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
}

pub fn forbidden() -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", "this token does not allow this operation")
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(unauthorized)?;
        // The scheme's name is case-insensitive (RFC 9110, section 11.1).
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(unauthorized)?;
        let digest = digest(token);
        if let Some(system) = state.connector_tokens.system(&digest) {
            return Ok(Caller::new(format!("connector:{system}"), vec![Scope::Connector(system.to_owned())]));
        }
        let record = state.store.token_by_digest(&digest).await?.ok_or_else(unauthorized)?;
        if !record.accepts(&digest, state.clock.now()) {
            return Err(unauthorized());
        }
        let scopes = record.scopes.iter().filter_map(|s| s.parse().ok()).collect();
        Ok(Caller::new(record.id, scopes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_unknown_ones_are_refused() {
        for s in [
            "requests:submit",
            "requests:read:own",
            "requests:read",
            "requests:manage",
            "holds:write",
            "suppressions:check",
            "connector:shop",
        ] {
            assert_eq!(s.parse::<Scope>().unwrap().to_string(), s);
        }
        assert!("admin".parse::<Scope>().is_err());
        assert!("connector:".parse::<Scope>().is_err());
    }

    #[test]
    fn tokens_are_random_and_digests_fixed_length() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("lethe_") && a.len() == 49, "{a}");
        assert_eq!(digest(&a).len(), 64);
        assert!(
            constant_time_eq(b"abc", b"abc")
                && !constant_time_eq(b"abc", b"abd")
                && !constant_time_eq(b"a", b"ab")
        );
    }
}
