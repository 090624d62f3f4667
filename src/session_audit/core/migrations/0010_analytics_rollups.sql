-- Aggregations (issue 3): rollups kept current by ingest, and the indexes the base-table path
-- needs. See rollups.py for how rows are maintained and README "Aggregations" for why.
--
-- Every rollup row belongs to an org, a grain (1 = hour, 2 = day, 3 = month) and a bucket: the
-- UTC start of that hour/day/month. Which grains a table keeps is in rollups.py: hours only
-- where rows compress within an hour. Dimensions a session may lack are '' (never NULL), so
-- they can be part of the primary key that ON CONFLICT maintains. Counters are updated in
-- place by every ingest batch: fillfactor leaves room for HOT updates.

-- Histogram and statistics counters per day/month. `starts` counts sessions that started in
-- the bucket, `ends` sessions that ended in it (open sessions have no end yet). Sessions open at
-- a moment T are then sum(starts) - sum(ends) over every bucket before T.
CREATE TABLE rollup_sessions (
    org_id              uuid        NOT NULL,
    grain               smallint    NOT NULL CHECK (grain IN (2, 3)),
    bucket              timestamptz NOT NULL,
    connection          text        NOT NULL,
    connection_type     text        NOT NULL,
    connection_subtype  text        NOT NULL,
    verb                text        NOT NULL,
    status              text        NOT NULL,
    review_status       text        NOT NULL,
    starts              integer     NOT NULL,
    ends                integer     NOT NULL,
    PRIMARY KEY (org_id, grain, bucket, connection, connection_type, connection_subtype, verb,
                 status, review_status)
) WITH (fillfactor = 80);

-- The same counters without dimensions (one row per org and hour, day, month): histograms
-- that filter and group nothing, at any bin size and in any time zone.
CREATE TABLE rollup_sessions_total (
    org_id    uuid        NOT NULL,
    grain     smallint    NOT NULL CHECK (grain IN (1, 2, 3)),
    bucket    timestamptz NOT NULL,
    starts    integer     NOT NULL,
    ends      integer     NOT NULL,
    PRIMARY KEY (org_id, grain, bucket)
) WITH (fillfactor = 80);

-- The same counters per user (lower-cased e-mail): `field=user` and `size` by user.
CREATE TABLE rollup_sessions_user (
    org_id    uuid        NOT NULL,
    grain     smallint    NOT NULL CHECK (grain IN (2, 3)),
    bucket    timestamptz NOT NULL,
    user_key  text        NOT NULL,
    starts    integer     NOT NULL,
    ends      integer     NOT NULL,
    PRIMARY KEY (org_id, grain, bucket, user_key)
) WITH (fillfactor = 80);

-- Session report sums per info type, bucketed by the session's END (a session belongs to a
-- report window when it ended in it; open sessions are not reported yet). `sessions` counts
-- the sessions that reported the info type, so a row whose sessions all moved away (sums back
-- to zero) is told apart from one reporting zeros.
CREATE TABLE rollup_redactions (
    org_id             uuid        NOT NULL,
    grain              smallint    NOT NULL CHECK (grain IN (2, 3)),
    bucket             timestamptz NOT NULL,
    connection         text        NOT NULL,
    connection_type    text        NOT NULL,
    verb               text        NOT NULL,
    info_type          text        NOT NULL,
    sessions           integer     NOT NULL,
    redact_total       bigint      NOT NULL,
    transformed_bytes  bigint      NOT NULL,
    PRIMARY KEY (org_id, grain, bucket, connection, connection_type, verb, info_type)
) WITH (fillfactor = 80);

CREATE TABLE rollup_redactions_user (
    org_id             uuid        NOT NULL,
    grain              smallint    NOT NULL CHECK (grain IN (2, 3)),
    bucket             timestamptz NOT NULL,
    user_key           text        NOT NULL,
    info_type          text        NOT NULL,
    sessions           integer     NOT NULL,
    redact_total       bigint      NOT NULL,
    transformed_bytes  bigint      NOT NULL,
    PRIMARY KEY (org_id, grain, bucket, user_key, info_type)
) WITH (fillfactor = 80);

-- Orgs whose rollups are not current (sessions written with rollup maintenance off, e.g. a
-- bulk backfill). Reads for these orgs use the base tables until `rollups rebuild` clears it.
CREATE TABLE rollup_stale_orgs (
    org_id      uuid        PRIMARY KEY,
    stale_since timestamptz NOT NULL DEFAULT now()
);

-- Base-table path: sessions that ended in a window (report by end time, histogram `ends`),
-- of the org and of one user (user tokens read their own sessions from the base table).
CREATE INDEX sessions_org_end ON sessions (org_id, end_date) WHERE end_date IS NOT NULL;
CREATE INDEX sessions_org_email_end ON sessions (org_id, lower(user_email), end_date)
    WHERE end_date IS NOT NULL;
-- Base-table path: sessions open at a moment T are the ones started in the day before T that
-- had not ended by T, plus these few long or still-open ones (bounded look-back).
CREATE INDEX sessions_org_long ON sessions (org_id, start_date)
    WHERE end_date IS NULL OR end_date - start_date > interval '24 hours';

-- Any DELETE or TRUNCATE of sessions (retention, manual clean-up) takes the deleted sessions'
-- contributions out of the rollups in the same transaction, with the same definitions as
-- rollups.py (tests compare both with a rebuild). Ingest maintains inserts and updates itself,
-- set-based per batch, which is far cheaper than triggers.
CREATE FUNCTION rollups_forget_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rollup_sessions AS r
    SELECT d.org_id, g.grain, date_trunc(g.unit, t.at, 'UTC'), d.connection, d.connection_type,
           d.connection_subtype, coalesce(d.verb, ''), d.status, coalesce(d.review_status, ''),
           -sum(t.starts), -sum(t.ends)
      FROM deleted d
     CROSS JOIN LATERAL (VALUES (d.start_date, 1, 0), (d.end_date, 0, 1)) t(at, starts, ends)
     CROSS JOIN (VALUES (2::smallint, 'day'), (3::smallint, 'month')) g(grain, unit)
     WHERE t.at IS NOT NULL
     GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
     ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9
    ON CONFLICT ON CONSTRAINT rollup_sessions_pkey DO UPDATE
       SET starts = r.starts + EXCLUDED.starts, ends = r.ends + EXCLUDED.ends;

    INSERT INTO rollup_sessions_total AS r
    SELECT d.org_id, g.grain, date_trunc(g.unit, t.at, 'UTC'), -sum(t.starts), -sum(t.ends)
      FROM deleted d
     CROSS JOIN LATERAL (VALUES (d.start_date, 1, 0), (d.end_date, 0, 1)) t(at, starts, ends)
     CROSS JOIN (VALUES (1::smallint, 'hour'), (2::smallint, 'day'), (3::smallint, 'month'))
           g(grain, unit)
     WHERE t.at IS NOT NULL
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT rollup_sessions_total_pkey DO UPDATE
       SET starts = r.starts + EXCLUDED.starts, ends = r.ends + EXCLUDED.ends;

    INSERT INTO rollup_sessions_user AS r
    SELECT d.org_id, g.grain, date_trunc(g.unit, t.at, 'UTC'), lower(d.user_email),
           -sum(t.starts), -sum(t.ends)
      FROM deleted d
     CROSS JOIN LATERAL (VALUES (d.start_date, 1, 0), (d.end_date, 0, 1)) t(at, starts, ends)
     CROSS JOIN (VALUES (2::smallint, 'day'), (3::smallint, 'month')) g(grain, unit)
     WHERE t.at IS NOT NULL
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
    ON CONFLICT ON CONSTRAINT rollup_sessions_user_pkey DO UPDATE
       SET starts = r.starts + EXCLUDED.starts, ends = r.ends + EXCLUDED.ends;

    INSERT INTO rollup_redactions AS r
    SELECT d.org_id, g.grain, date_trunc(g.unit, d.end_date, 'UTC'), d.connection,
           d.connection_type, coalesce(d.verb, ''), x ->> 'info_type', -count(*),
           -sum((x ->> 'count')::bigint), -sum((x ->> 'transformed_bytes')::bigint)
      FROM deleted d
     CROSS JOIN LATERAL jsonb_array_elements(d.redactions) x
     CROSS JOIN (VALUES (2::smallint, 'day'), (3::smallint, 'month')) g(grain, unit)
     WHERE d.end_date IS NOT NULL AND jsonb_typeof(d.redactions) = 'array'
     GROUP BY 1, 2, 3, 4, 5, 6, 7
     ORDER BY 1, 2, 3, 4, 5, 6, 7
    ON CONFLICT ON CONSTRAINT rollup_redactions_pkey DO UPDATE
       SET sessions = r.sessions + EXCLUDED.sessions,
           redact_total = r.redact_total + EXCLUDED.redact_total,
           transformed_bytes = r.transformed_bytes + EXCLUDED.transformed_bytes;

    INSERT INTO rollup_redactions_user AS r
    SELECT d.org_id, g.grain, date_trunc(g.unit, d.end_date, 'UTC'), lower(d.user_email),
           x ->> 'info_type', -count(*),
           -sum((x ->> 'count')::bigint), -sum((x ->> 'transformed_bytes')::bigint)
      FROM deleted d
     CROSS JOIN LATERAL jsonb_array_elements(d.redactions) x
     CROSS JOIN (VALUES (2::smallint, 'day'), (3::smallint, 'month')) g(grain, unit)
     WHERE d.end_date IS NOT NULL AND jsonb_typeof(d.redactions) = 'array'
     GROUP BY 1, 2, 3, 4, 5
     ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT ON CONSTRAINT rollup_redactions_user_pkey DO UPDATE
       SET sessions = r.sessions + EXCLUDED.sessions,
           redact_total = r.redact_total + EXCLUDED.redact_total,
           transformed_bytes = r.transformed_bytes + EXCLUDED.transformed_bytes;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sessions_deleted_rollups
    AFTER DELETE ON sessions
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION rollups_forget_deleted();

CREATE FUNCTION rollups_forget_all() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE rollup_sessions, rollup_sessions_total, rollup_sessions_user, rollup_redactions,
             rollup_redactions_user;
    RETURN NULL;
END;
$$;

CREATE TRIGGER sessions_truncated_rollups
    AFTER TRUNCATE ON sessions
    FOR EACH STATEMENT EXECUTE FUNCTION rollups_forget_all();
