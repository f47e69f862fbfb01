-- Lethe state, SQLite. Times are Unix milliseconds (BIGINT) so that the
-- same SQL serves PostgreSQL and SQLite. No column holds a plaintext
-- identifier: identifiers are sealed under the request's data key, which is
-- stored wrapped by the master key and destroyed when the request closes.

CREATE TABLE requests (
    id               TEXT PRIMARY KEY,
    regulation       TEXT   NOT NULL,
    status           TEXT   NOT NULL,
    received_at      BIGINT NOT NULL,
    due_at           BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    finished_at      BIGINT,
    external_ref     TEXT,
    idempotency_key  TEXT UNIQUE,
    wrapped_key      BLOB,
    key_destroyed_at BIGINT
);
CREATE INDEX requests_by_status ON requests (status, id);

CREATE TABLE identifiers (
    request_id   TEXT   NOT NULL REFERENCES requests (id),
    position     BIGINT NOT NULL,
    kind         TEXT   NOT NULL,
    sealed       TEXT   NOT NULL,
    subject_hash TEXT   NOT NULL,
    PRIMARY KEY (request_id, position)
);
CREATE INDEX identifiers_by_subject_hash ON identifiers (subject_hash);

CREATE TABLE plan_items (
    request_id TEXT NOT NULL REFERENCES requests (id),
    system     TEXT NOT NULL,
    action     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    basis      TEXT,
    until_at   BIGINT,
    PRIMARY KEY (request_id, system)
);

CREATE TABLE tasks (
    id           TEXT PRIMARY KEY,
    request_id   TEXT   NOT NULL REFERENCES requests (id),
    system       TEXT   NOT NULL,
    action       TEXT   NOT NULL,
    state        TEXT   NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    -- attempts made before the last operator retry: the retry budget
    -- counts from here
    budget_start BIGINT NOT NULL DEFAULT 0,
    last_outcome TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    UNIQUE (request_id, system)
);
CREATE INDEX tasks_by_state ON tasks (state, updated_at);

CREATE TABLE attempts (
    task_id       TEXT   NOT NULL REFERENCES tasks (id),
    attempt       BIGINT NOT NULL,
    dispatched_at BIGINT NOT NULL,
    finished_at   BIGINT,
    PRIMARY KEY (task_id, attempt)
);

-- Every outcome received, including duplicates and late ones (applied = 0).
CREATE TABLE outcomes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     TEXT   NOT NULL REFERENCES tasks (id),
    attempt     BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    status      TEXT   NOT NULL,
    body        TEXT   NOT NULL,
    applied     BIGINT NOT NULL
);
CREATE INDEX outcomes_by_task ON outcomes (task_id);

-- The transactional outbox: a row per task to publish, written in the same
-- transaction as the state it announces.
CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id       TEXT   NOT NULL REFERENCES tasks (id),
    created_at    BIGINT NOT NULL,
    -- not published before this time (retry backoff)
    available_at  BIGINT NOT NULL DEFAULT 0,
    claimed_by    TEXT,
    claimed_until BIGINT
);

-- Append-only, hash-chained audit trail.
CREATE TABLE audit_events (
    seq        BIGINT PRIMARY KEY,
    at         BIGINT NOT NULL,
    request_id TEXT,
    task_id    TEXT,
    kind       TEXT   NOT NULL,
    detail     TEXT   NOT NULL,
    prev_hash  TEXT   NOT NULL,
    hash       TEXT   NOT NULL
);
CREATE INDEX audit_events_by_request ON audit_events (request_id, seq);

CREATE TABLE audit_head (
    id   BIGINT PRIMARY KEY,
    seq  BIGINT NOT NULL,
    hash TEXT   NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TRIGGER audit_events_no_update
BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only');
END;

CREATE TRIGGER audit_events_no_delete
BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only');
END;
