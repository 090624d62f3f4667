-- Performance (issue 14, docs/analytics.md "Reading few rows"): how sessions ended, rolled up,
-- so a `q` on `duration` (at bucket edges) and/or `exit_code` reads a few dozen rows per org
-- and day instead of every session of the window twice (starts and ends). Kept by ingest in
-- the batch's transaction like the other rollups (analytics/rollups.py OUTCOMES); no trigger.
--
-- duration_bucket: width_bucket over fields.DURATION_EDGES (seconds), -1 while open;
-- exit_code: its decimal text, '' when none (key columns cannot be NULL).
CREATE TABLE rollup_outcomes (
    org_id           uuid        NOT NULL,
    grain            smallint    NOT NULL CHECK (grain IN (2, 3)),
    bucket           timestamptz NOT NULL,
    duration_bucket  smallint    NOT NULL,
    exit_code        text        NOT NULL,
    starts           integer     NOT NULL,
    ends             integer     NOT NULL,
    PRIMARY KEY (org_id, grain, bucket, duration_bucket, exit_code) INCLUDE (starts, ends)
) WITH (fillfactor = 80);

-- On Citus, distributed with the other rollups before the backfill (which is then pushed down
-- to each node's colocated shards).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM create_distributed_table('rollup_outcomes', 'org_id', colocate_with => 'sessions');
    END IF;
END
$$;

-- Backfill: rollups.OUTCOMES.contributions('TRUE'), verbatim (tests/test_analytics_outcomes.py
-- checks they agree). About a minute per 10M sessions (docs/operations.md).
INSERT INTO rollup_outcomes (org_id, grain, bucket, duration_bucket, exit_code, starts, ends)
SELECT s.org_id, g.grain, date_trunc(g.unit, t.at, 'UTC') AS bucket, coalesce(width_bucket(extract(epoch FROM s.end_date - s.start_date)::float8, '{0,1,5,10,30,60,120,300,600,900,1800,3600,7200,14400,28800,43200,86400,172800,604800}'::float8[]), -1), coalesce(s.exit_code::text, ''), sum(t.st), sum(t.en) FROM sessions s CROSS JOIN LATERAL (VALUES (s.start_date, 1, 0), (s.end_date, 0, 1)) t(at, st, en) CROSS JOIN (VALUES (2::smallint, 'day'), (3::smallint, 'month')) g(grain, unit) WHERE (TRUE) AND t.at IS NOT NULL GROUP BY 1, 2, 3, 4, 5;
