-- The requests not answered yet, for the sweeps that look only at them
-- (due-date alerts, every minute): without it they walk every request ever
-- received in id order.
CREATE INDEX requests_unanswered ON requests (id) WHERE status IN ('received', 'in_progress', 'failed');

-- At most one current certificate signing key. Two coordinators starting
-- together on a new database could each create one. All but the newest
-- are retired now; they stay published, so what they signed verifies.
UPDATE signing_keys SET retired_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
 WHERE retired_at IS NULL
   AND id <> (SELECT id FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC, id DESC LIMIT 1);
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys ((retired_at IS NULL)) WHERE retired_at IS NULL;
