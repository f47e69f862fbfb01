-- The request's identifier types each system finds subjects by, as
-- planned: a JSON array of type names; `[]` when the request gives none of
-- them (the system could not be searched for the subject); NULL where the
-- system's connector cannot tell, and for requests planned before this
-- column. Adding a nullable column without a default rewrites no rows.
ALTER TABLE plan_items ADD COLUMN searched_by TEXT;
