-- The chain's head could be set back to an earlier event (after removing
-- the events behind it) with nothing to stop it. (SQLite has no TRUNCATE;
-- a DELETE without WHERE fires the row triggers.)
CREATE TRIGGER audit_head_forward
BEFORE UPDATE ON audit_head
WHEN NEW.seq < OLD.seq
BEGIN
    SELECT RAISE(ABORT, 'audit_head only moves forward');
END;

CREATE TRIGGER audit_head_no_delete
BEFORE DELETE ON audit_head
BEGIN
    SELECT RAISE(ABORT, 'audit_head only moves forward');
END;
