-- Token rotation: a new secret replaces a token's digest under the same id,
-- so the requests it submitted and its idempotency keys stay its own. The
-- secret it replaced may stay valid for an overlap, until `previous_until`
-- (epoch milliseconds), while the holder switches.
ALTER TABLE api_tokens ADD COLUMN previous_digest TEXT;
ALTER TABLE api_tokens ADD COLUMN previous_until BIGINT;
CREATE INDEX api_tokens_by_previous_digest ON api_tokens (previous_digest);
