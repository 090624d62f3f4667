-- Performance (issue 14 goal 2, docs/analytics.md "Reading every session once"): a `q` the
-- rollups cannot answer is counted in one pass over sessions_org_start (the window and the
-- 24 h look-back before it) plus the long sessions of sessions_org_long. Migration 0051 made
-- those reads index-only for the columns of most fields, but not for the user's e-mail and
-- subject id, role, resource and correlation id: a `q` on one of those (`user_id:sub-1*`,
-- `correlation_id:*`, `protocol:ssh OR role:ssh-1*`…) fetched every session of the window
-- from the heap, one page each (10M sessions, 30 days: ~210k fetches, 200–230 ms). With every
-- column a `q` field reads in the two indexes, any `q` is an index-only pass. Cost: about
-- 45 bytes more per session in sessions_org_start (docs/benchmarks.md has the sizes and the
-- ingest figure); sessions_org_long holds only open and day-long sessions. sessions_org_end
-- is unchanged (the one-pass read does not use it). Same keys and predicates as 0051's.
DROP INDEX sessions_org_start;
CREATE INDEX sessions_org_start ON sessions (org_id, start_date DESC, id DESC)
    INCLUDE (end_date, exit_code, event_size, connection, connection_type, connection_subtype,
             verb, status, review_status, user_email, user_id, role_name, resource_name,
             correlation_id);
DROP INDEX sessions_org_long;
CREATE INDEX sessions_org_long ON sessions (org_id, start_date)
    INCLUDE (end_date, exit_code, event_size, connection, connection_type, connection_subtype,
             verb, status, review_status, user_email, user_id, role_name, resource_name,
             correlation_id)
    WHERE end_date IS NULL OR end_date - start_date > interval '24 hours';
