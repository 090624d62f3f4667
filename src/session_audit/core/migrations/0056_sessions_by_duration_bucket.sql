-- Performance (issue 14, docs/analytics.md "Reading few rows"): a `q` on `duration` whose
-- threshold falls inside a bucket of rollup_outcomes (`duration:>3600`, `<=60`, `3599`, ranges
-- between edges) is counted from the rollup for every bucket it decides, and from the sessions
-- table for the one or two buckets it leaves partial (store.count). This index holds the
-- sessions of one duration bucket by start time, so that count reads only those sessions:
-- starts in a bin, ends in a bin (a session of bucket [E1, E2) that ended in [lo, hi) started
-- in (lo - E2, hi - E1]) and the sessions open at the window's start, each an index range.
-- INCLUDE end_date and exit_code: the rest of such a `q` is checked in the index (index-only).
--
-- The key expression is rollups.DURATION_BUCKET without the `s.` alias, verbatim (the planner
-- matches it to the query's; tests/test_analytics_duration_split.py checks they agree): the
-- bucket rollup_outcomes counts a session in, width_bucket over fields.DURATION_EDGES, -1
-- while open. Every function in it is immutable. On Citus, CREATE INDEX on the distributed
-- table is propagated to its shards.
CREATE INDEX sessions_org_duration ON sessions (org_id, (coalesce(width_bucket(extract(epoch FROM end_date - start_date)::float8, '{0,1,5,10,30,60,120,300,600,900,1800,3600,7200,14400,28800,43200,86400,172800,604800}'::float8[]), -1)), start_date)
    INCLUDE (end_date, exit_code);
