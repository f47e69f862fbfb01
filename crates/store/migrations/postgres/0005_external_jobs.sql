-- Asynchronous deletions: the external job a connector started for a task
-- (its id and when the coordinator first recorded it), kept while the task
-- is accepted and dispatched again to check the job, cleared when the task
-- settles.
ALTER TABLE tasks ADD COLUMN job_id TEXT;
ALTER TABLE tasks ADD COLUMN job_accepted_at BIGINT;
