-- The outbox row names its task's system, so that the dispatcher can bound
-- the tasks in flight per system (`[dispatcher] max_in_flight`) by claiming
-- rows system by system through an index instead of scanning the backlog.
ALTER TABLE outbox ADD COLUMN system TEXT NOT NULL DEFAULT '';
UPDATE outbox SET system = (SELECT t.system FROM tasks t WHERE t.id = outbox.task_id);
CREATE INDEX outbox_by_system ON outbox (system, id);
CREATE INDEX outbox_by_task ON outbox (task_id);
-- Rows claimed and not yet published count as in flight.
CREATE INDEX outbox_claimed ON outbox (system, claimed_until) WHERE claimed_by IS NOT NULL;
