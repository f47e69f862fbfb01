-- An idempotency key is scoped to the token that submitted it (the stored
-- hash covers both) and remembers a fingerprint of what was submitted: the
-- regulation, the subject and the external reference, as a keyed hash. A key
-- reused for a different submission is refused instead of answering with
-- the earlier request, which would leave the second subject unerased.
-- Keys stored before this migration were hashed without the token and so
-- no longer match a retry; they only ever guarded retries in flight.
ALTER TABLE requests ADD COLUMN idempotency_fingerprint TEXT;
