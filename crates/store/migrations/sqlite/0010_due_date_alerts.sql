-- The scheduler's due-date alerts: `due_soon` once a request that is not
-- answered comes within the warning window of its due date, `overdue` once
-- it passes it. Each is raised once per request (an audit event and a log
-- line); this column records the last one raised. An extension that moves
-- the due date clears it.
ALTER TABLE requests ADD COLUMN due_alert TEXT;
