-- `attempts` recorded each dispatch and when it finished, and nothing ever
-- read it: the task keeps its attempt count, the audit chain holds every
-- `task.dispatched` (with its attempt) and `outcomes` every result. Writing
-- it cost a row insert per dispatch and an update per outcome.
DROP TABLE attempts;
