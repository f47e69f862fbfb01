-- The requests not answered yet, for the sweeps that look only at them
-- (due-date alerts, every minute on every replica): without it they walk
-- every request ever received in id order.
CREATE INDEX requests_unanswered ON requests (id) WHERE status IN ('received', 'in_progress', 'failed');

-- At most one current certificate signing key. Two coordinators starting
-- together on a new database could each create one. All but the newest
-- are retired now; they stay published, so what they signed verifies.
UPDATE signing_keys SET retired_at = (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT
 WHERE retired_at IS NULL
   AND id <> (SELECT id FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC, id DESC LIMIT 1);
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys ((retired_at IS NULL)) WHERE retired_at IS NULL;
