-- Performance (issue 14, docs/analytics.md "Reading few rows"): role and resource names rolled
-- up one field at a time, so a `q` on `role` alone or on `resource` alone (any AND/OR/NOT,
-- wildcard or `field:*` of that one field) reads a few rows per org and day instead of every
-- session of the window. Kept by ingest in the batch's transaction like the other rollups
-- (analytics/rollups.py NAMES), taken out by rollups.delete_sessions; no trigger.
--
-- field: 'role' or 'resource'; value: as the sessions table compares it (role_name;
-- resource_name, '' when NULL). Rows per org and day: distinct roles + distinct resources of
-- that day's sessions (at most two per session). `field` comes before `bucket` in the key:
-- a read of one field's days does not walk the other field's rows.
CREATE TABLE rollup_names (
    org_id    uuid        NOT NULL,
    grain     smallint    NOT NULL CHECK (grain IN (2, 3)),
    bucket    timestamptz NOT NULL,
    field     text        NOT NULL,
    value     text        NOT NULL,
    starts    integer     NOT NULL,
    ends      integer     NOT NULL,
    PRIMARY KEY (org_id, grain, field, bucket, value) INCLUDE (starts, ends)
) WITH (fillfactor = 80);

-- On Citus, distributed with the other rollups before the backfill (which is then pushed down
-- to each node's colocated shards).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM create_distributed_table('rollup_names', 'org_id', colocate_with => 'sessions');
    END IF;
END
$$;

-- Backfill: rollups.NAMES.contributions('TRUE'), verbatim (tests/test_analytics_names.py
-- checks they agree). One aggregate over the whole table, like 0052 (docs/operations.md).
INSERT INTO rollup_names (org_id, grain, bucket, field, value, starts, ends)
SELECT s.org_id, g.grain, date_trunc(g.unit, t.at, 'UTC') AS bucket, f.field, f.value, sum(t.st), sum(t.en) FROM sessions s CROSS JOIN LATERAL (VALUES (s.start_date, 1, 0), (s.end_date, 0, 1)) t(at, st, en) CROSS JOIN LATERAL (VALUES ('role', s.role_name), ('resource', coalesce(s.resource_name, ''))) f(field, value) CROSS JOIN (VALUES (2::smallint, 'day'), (3::smallint, 'month')) g(grain, unit) WHERE (TRUE) AND t.at IS NOT NULL GROUP BY 1, 2, 3, 4, 5;
