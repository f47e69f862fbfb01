-- API tokens, the submitter of each request, and certificate signing keys.

-- Bearer tokens, kept only as SHA-256 digests of the token text. `scopes`
-- is a space-separated list (requests:submit, requests:read:own, ...).
CREATE TABLE api_tokens (
    id         TEXT   PRIMARY KEY,
    name       TEXT   NOT NULL,
    digest     TEXT   NOT NULL UNIQUE,
    scopes     TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

-- The token that submitted a request (for `requests:read:own`).
ALTER TABLE requests ADD COLUMN submitted_by TEXT;
CREATE INDEX requests_by_submitter ON requests (submitted_by, id);

-- Ed25519 keys that sign erasure certificates. The private key is wrapped
-- by the master key; retired keys stay so that old certificates verify.
CREATE TABLE signing_keys (
    id          TEXT   PRIMARY KEY,
    public_key  TEXT   NOT NULL,
    wrapped_key TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    retired_at  BIGINT
);
