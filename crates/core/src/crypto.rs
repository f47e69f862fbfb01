//! Envelope encryption of identifiers and keyed hashes of subjects.
//!
//! Every request has its own [`DataKey`] (AES-256-GCM). Identifiers are
//! sealed under it, with the request id and identifier type as associated
//! data, so a ciphertext cannot be moved to another request or type. The
//! data key is stored only wrapped by the [`MasterKey`]; destroying the
//! wrapped key makes every copy of the ciphertexts unreadable
//! (crypto-shredding).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::identifier::{Identifier, IdentifierKind};
use crate::ids::RequestId;

const NONCE_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("key material must be 32 bytes, hex-encoded (64 characters)")]
    BadKey,
    #[error("ciphertext is malformed or was sealed under another key")]
    Decrypt,
}

/// A 256-bit symmetric key, wiped from memory when dropped.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

impl DataKey {
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(k.as_mut());
        Self(k)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadKey)?;
        Ok(Self(Zeroizing::new(arr)))
    }

    pub fn from_hex(s: &str) -> Result<Self, CryptoError> {
        let bytes = Zeroizing::new(hex::decode(s.trim()).map_err(|_| CryptoError::BadKey)?);
        Self::from_bytes(&bytes)
    }

    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_ref()))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.as_ref().into())
    }

    /// `nonce || ciphertext || tag`.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn decrypt(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Decrypt)
    }

    /// Seals an identifier of `request` for storage and transport.
    pub fn seal(&self, request: RequestId, id: &Identifier) -> SealedIdentifier {
        let aad = aad(request, id.kind());
        SealedIdentifier {
            kind: id.kind().clone(),
            ciphertext: B64.encode(self.encrypt(id.expose().as_bytes(), &aad)),
        }
    }

    /// Opens a sealed identifier; fails if it was sealed for another request.
    pub fn open(&self, request: RequestId, sealed: &SealedIdentifier) -> Result<Identifier, CryptoError> {
        let bytes = B64.decode(&sealed.ciphertext).map_err(|_| CryptoError::Decrypt)?;
        let plain = self.decrypt(&bytes, &aad(request, &sealed.kind))?;
        let text = std::str::from_utf8(&plain).map_err(|_| CryptoError::Decrypt)?;
        Ok(Identifier::sealed_value(sealed.kind.clone(), text))
    }
}

fn aad(request: RequestId, kind: &IdentifierKind) -> Vec<u8> {
    let mut aad = request.0.as_bytes().to_vec();
    aad.extend_from_slice(kind.as_str().as_bytes());
    aad
}

/// An identifier encrypted under its request's data key: this is the only
/// form in which identifiers are stored or put on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SealedIdentifier {
    /// Identifier type, e.g. `email`.
    #[serde(rename = "type")]
    #[schema(value_type = String, pattern = "^[a-z][a-z0-9_]{0,63}$")]
    pub kind: IdentifierKind,
    /// Base64 of `nonce(12) || AES-256-GCM ciphertext || tag(16)`, with
    /// associated data `request_id (16 bytes) || type`.
    pub ciphertext: String,
}

/// The key that wraps request data keys and derives the subject-hash key.
#[derive(Clone, Debug)]
pub struct MasterKey {
    wrap: DataKey,
    hash_key: DataKey,
}

const WRAP_AAD: &[u8] = b"lethe/request-key/v1";
const SIGNING_AAD: &[u8] = b"lethe/certificate-key/v1";

/// The associated data of a wrapped certificate signing key: its own label
/// and the key's id. A signing key's wrapping thus never opens as a
/// request's data key (the connector key endpoint would hand it out), nor
/// as another signing key.
fn signing_aad(key_id: &str) -> Vec<u8> {
    let mut aad = SIGNING_AAD.to_vec();
    aad.push(0);
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

impl MasterKey {
    pub fn new(key: DataKey) -> Self {
        let hash_key = derive(&key, b"lethe/subject-hash/v1");
        Self { wrap: key, hash_key }
    }

    /// Wraps a request's data key.
    pub fn wrap(&self, key: &DataKey) -> Vec<u8> {
        self.wrap.encrypt(key.as_bytes(), WRAP_AAD)
    }

    /// Unwraps a request's data key.
    pub fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        let plain = self.wrap.decrypt(wrapped, WRAP_AAD)?;
        DataKey::from_bytes(&plain)
    }

    /// Wraps the secret of certificate signing key `key_id`.
    pub fn wrap_signing_key(&self, key_id: &str, secret: &DataKey) -> Vec<u8> {
        self.wrap.encrypt(secret.as_bytes(), &signing_aad(key_id))
    }

    /// Unwraps the secret of certificate signing key `key_id`; fails for
    /// anything else, a request's data key included.
    pub fn unwrap_signing_key(&self, key_id: &str, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        let plain = self.wrap.decrypt(wrapped, &signing_aad(key_id))?;
        DataKey::from_bytes(&plain)
    }

    /// A keyed hash (HMAC-SHA256, hex) of an identifier: how audit records,
    /// holds and suppression lists refer to a subject without its value.
    pub fn subject_hash(&self, id: &Identifier) -> String {
        keyed_hash(self.hash_key.as_bytes(), id.kind().as_str(), id.expose())
    }

    /// A keyed hash of an arbitrary client-supplied string (e.g. an
    /// idempotency key), so that it is never stored as given.
    pub fn opaque_hash(&self, label: &str, value: &str) -> String {
        keyed_hash(self.hash_key.as_bytes(), label, value)
    }
}

/// HMAC-SHA256 over `label || 0x00 || value`, hex-encoded.
pub fn keyed_hash(key: &[u8], label: &str, value: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac());
    mac.update(label.as_bytes());
    mac.update(&[0]);
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn derive(key: &DataKey, label: &[u8]) -> DataKey {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).unwrap_or_else(|_| unreachable_hmac());
    mac.update(label);
    let out = mac.finalize().into_bytes();
    DataKey(Zeroizing::new(out.into()))
}

fn unreachable_hmac() -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this cannot happen.
    panic!("HMAC rejected a key")
}

/// Equality that takes the same time whatever the inputs share (for
/// comparing secrets' digests).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let key = DataKey::generate();
        let req = RequestId::new();
        let id = Identifier::parse(IdentifierKind::Email, "Ada@Example.com").unwrap();
        let sealed = key.seal(req, &id);
        assert!(!sealed.ciphertext.contains("ada"));
        assert_eq!(key.open(req, &sealed).unwrap(), id);
        assert_eq!(key.open(RequestId::new(), &sealed), Err(CryptoError::Decrypt));
        assert_eq!(DataKey::generate().open(req, &sealed), Err(CryptoError::Decrypt));
        // A value sealed under earlier, laxer rules (a soft hyphen, say)
        // still opens as it was: its request must still be erased.
        let earlier = Identifier::sealed_value(IdentifierKind::Email, "a\u{00AD}da@example.com");
        assert!(Identifier::parse(IdentifierKind::Email, earlier.expose()).is_err());
        let sealed = key.seal(req, &earlier);
        assert_eq!(key.open(req, &sealed).unwrap().expose(), "a\u{00AD}da@example.com");
    }

    #[test]
    fn wrap_unwrap_and_hashes() {
        let master = MasterKey::new(DataKey::generate());
        let key = DataKey::generate();
        let wrapped = master.wrap(&key);
        assert_eq!(master.unwrap(&wrapped).unwrap().as_bytes(), key.as_bytes());
        assert!(MasterKey::new(DataKey::generate()).unwrap(&wrapped).is_err());
        // The two kinds of wrapped key never open as each other, nor a
        // signing key under another key's id.
        let signing = master.wrap_signing_key("cert-a", &key);
        assert_eq!(master.unwrap_signing_key("cert-a", &signing).unwrap().as_bytes(), key.as_bytes());
        assert!(master.unwrap(&signing).is_err());
        assert!(master.unwrap_signing_key("cert-b", &signing).is_err());
        assert!(master.unwrap_signing_key("cert-a", &wrapped).is_err());
        let id = Identifier::parse(IdentifierKind::Email, "a@example.com").unwrap();
        let h = master.subject_hash(&id);
        assert_eq!(h.len(), 64);
        assert_eq!(h, master.subject_hash(&id));
        assert_ne!(h, MasterKey::new(DataKey::generate()).subject_hash(&id));
        assert!(format!("{:?}", master).contains("redacted"));
    }
}
