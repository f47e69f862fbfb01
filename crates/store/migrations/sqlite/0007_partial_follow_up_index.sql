-- Most tasks never need a follow-up. Indexing only those that do spares
-- every other task update (several per task) an entry in this index; the
-- follow-up sweep asks for `follow_up_at IS NOT NULL`, which this matches.
DROP INDEX tasks_by_follow_up;
CREATE INDEX tasks_by_follow_up ON tasks (state, follow_up_at) WHERE follow_up_at IS NOT NULL;
