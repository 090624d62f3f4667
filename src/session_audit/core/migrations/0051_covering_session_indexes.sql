-- Performance (issue 14): a `q` the rollups cannot answer (duration, exit code, event size,
-- start/end ranges…) is counted from the sessions table over the window's starts, its ends
-- and the sessions open at its start. The three indexes those counts scan carry the columns
-- such a count reads (INCLUDE), so it is an index-only scan instead of one heap page per
-- session: same keys and predicates as before, no extra index for ingest to maintain.
DROP INDEX sessions_org_start;
CREATE INDEX sessions_org_start ON sessions (org_id, start_date DESC, id DESC)
    INCLUDE (end_date, exit_code, event_size, connection, connection_type, connection_subtype,
             verb, status, review_status);
DROP INDEX sessions_org_end;
CREATE INDEX sessions_org_end ON sessions (org_id, end_date)
    INCLUDE (start_date, exit_code, event_size, connection, connection_type,
             connection_subtype, verb, status, review_status)
    WHERE end_date IS NOT NULL;
DROP INDEX sessions_org_long;
CREATE INDEX sessions_org_long ON sessions (org_id, start_date)
    INCLUDE (end_date, exit_code, event_size, connection, connection_type, connection_subtype,
             verb, status, review_status)
    WHERE end_date IS NULL OR end_date - start_date > interval '24 hours';
