-- Performance (issue 14, docs/analytics.md "Weeks per user"): rollup_sessions_user keeps UTC
-- weeks (grain 4, ISO weeks from Monday 00:00 UTC) beside days and months, so a top-N of users
-- per weekly bin reads one row per (week, top user) instead of seven days. Kept by ingest like
-- the other grains (analytics/rollups.py SESSIONS_USER.grains); no trigger. Reads use a week
-- only where a whole UTC week lies inside a piece of the question (timebins.cheapest): a week
-- of Europe/Berlin never does, and is read from days and the base table as before.

-- One subcommand per ALTER (Citus).
ALTER TABLE rollup_sessions_user DROP CONSTRAINT rollup_sessions_user_grain_check;
ALTER TABLE rollup_sessions_user
    ADD CONSTRAINT rollup_sessions_user_grain_check CHECK (grain IN (2, 3, 4));

-- Backfill from the day rows (a week is the sum of its seven UTC days; the same rows
-- rollups.SESSIONS_USER.contributions would give, tests/test_analytics_weeks.py). Grouped by
-- org_id, the distribution column: on Citus each shard fills its own rows.
INSERT INTO rollup_sessions_user (org_id, grain, bucket, user_key, starts, ends)
SELECT org_id, 4::smallint, date_trunc('week', bucket, 'UTC'), user_key, sum(starts), sum(ends)
  FROM rollup_sessions_user
 WHERE grain = 2
 GROUP BY 1, 2, 3, 4
HAVING sum(starts) <> 0 OR sum(ends) <> 0;
