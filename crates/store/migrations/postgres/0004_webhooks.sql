-- Webhooks: a cursor per endpoint into the audit trail, and the log of
-- every delivery attempt.

-- The last audit event (`seq`) an endpoint has handled, and the coordinator
-- replica that delivers its events (a lease, as for the outbox), so that
-- replicas never deliver one endpoint's events at once.
CREATE TABLE webhook_cursors (
    endpoint      TEXT   PRIMARY KEY,
    seq           BIGINT NOT NULL,
    claimed_by    TEXT,
    claimed_until BIGINT,
    updated_at    BIGINT NOT NULL
);

-- One row per delivery attempt. Neither the payload nor the endpoint's URL
-- or secret is stored; `error` is a short description written by Lethe.
CREATE TABLE webhook_deliveries (
    id              TEXT   PRIMARY KEY,
    endpoint        TEXT   NOT NULL,
    event_id        TEXT   NOT NULL,
    event_type      TEXT   NOT NULL,
    seq             BIGINT NOT NULL,
    request_id      TEXT,
    attempt         BIGINT NOT NULL,
    status_code     BIGINT,
    error           TEXT,
    -- 1: the endpoint answered 2xx
    delivered       BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    duration_ms     BIGINT NOT NULL,
    -- when the next attempt is due; NULL after a success or the last attempt
    next_attempt_at BIGINT
);
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint, created_at);
CREATE INDEX webhook_deliveries_by_request ON webhook_deliveries (request_id, created_at);
