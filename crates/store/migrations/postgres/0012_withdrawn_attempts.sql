-- The last attempt of a task that a legal hold withdrew while it was queued
-- or on the bus: a result of that attempt, or of an earlier one, arrives
-- late and was asked under directives that no longer hold, so it is
-- recorded (`task.outcome_ignored`) and not applied.
ALTER TABLE tasks ADD COLUMN withdrawn_through BIGINT NOT NULL DEFAULT 0;
