-- Retention policy, legal holds and deadline extensions.

-- The policy's decision for every data category of every system of a
-- request. `action` is what applies now (`hold` while a legal hold covers
-- the category); `rule_action` is the rule's own action, which applies
-- again once the hold ends.
CREATE TABLE plan_categories (
    request_id  TEXT NOT NULL REFERENCES requests (id),
    system      TEXT NOT NULL,
    category    TEXT NOT NULL,
    action      TEXT NOT NULL,
    rule        TEXT NOT NULL,
    rule_action TEXT NOT NULL,
    basis       TEXT,
    period      TEXT,
    reference   TEXT,
    until_at    BIGINT,
    hold_id     TEXT,
    PRIMARY KEY (request_id, system, category)
);
CREATE INDEX plan_categories_by_hold ON plan_categories (hold_id);

-- Legal holds. A subject is known only by the keyed hashes of its
-- identifiers, the same as `identifiers.subject_hash`.
CREATE TABLE holds (
    id             TEXT   PRIMARY KEY,
    reason         TEXT   NOT NULL,
    case_reference TEXT   NOT NULL,
    scope          TEXT   NOT NULL,
    placed_at      BIGINT NOT NULL,
    expires_at     BIGINT,
    released_at    BIGINT,
    release_reason TEXT
);
CREATE INDEX holds_by_expiry ON holds (released_at, expires_at);

CREATE TABLE hold_subjects (
    hold_id      TEXT NOT NULL REFERENCES holds (id),
    subject_hash TEXT NOT NULL,
    PRIMARY KEY (hold_id, subject_hash)
);
CREATE INDEX hold_subjects_by_hash ON hold_subjects (subject_hash);

-- When a task that kept data runs again to erase what may then go.
ALTER TABLE tasks ADD COLUMN follow_up_at BIGINT;
CREATE INDEX tasks_by_follow_up ON tasks (state, follow_up_at);

-- One extension of the deadline: the original due date and the reason.
ALTER TABLE requests ADD COLUMN original_due_at BIGINT;
ALTER TABLE requests ADD COLUMN extension_reason TEXT;
CREATE INDEX requests_by_due ON requests (due_at);
