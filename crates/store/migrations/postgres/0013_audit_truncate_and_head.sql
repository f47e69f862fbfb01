-- The audit log's row triggers do not fire on TRUNCATE, and the chain's
-- head could be set back to an earlier event (after removing the events
-- behind it) with nothing to stop it. Both are refused now.
CREATE TRIGGER audit_events_no_truncate
BEFORE TRUNCATE ON audit_events
FOR EACH STATEMENT EXECUTE FUNCTION lethe_audit_append_only();

CREATE FUNCTION lethe_audit_head_forward() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.seq >= OLD.seq THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_head only moves forward';
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_head_forward
BEFORE UPDATE OR DELETE ON audit_head
FOR EACH ROW EXECUTE FUNCTION lethe_audit_head_forward();

CREATE TRIGGER audit_head_no_truncate
BEFORE TRUNCATE ON audit_head
FOR EACH STATEMENT EXECUTE FUNCTION lethe_audit_head_forward();
