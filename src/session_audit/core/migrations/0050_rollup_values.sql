-- Performance (issue 14, docs/benchmarks.md).
--
-- 1. Per-field totals: the histogram's top-N (`size`) and the single-field statistics rank the
--    values of one field over a window. Read from rollup_sessions that means summing every
--    (connection, type, protocol, verb, status, review) combination of every day; here each
--    (org, grain, bucket, field, value) is one row: a few dozen rows per day and org. Kept by
--    ingest in the batch's transaction like the other rollups (analytics/rollups.py VALUES).
CREATE TABLE rollup_values (
    org_id    uuid        NOT NULL,
    grain     smallint    NOT NULL CHECK (grain IN (2, 3)),
    bucket    timestamptz NOT NULL,
    field     text        NOT NULL,
    value     text        NOT NULL,
    starts    integer     NOT NULL,
    ends      integer     NOT NULL,
    PRIMARY KEY (org_id, grain, bucket, field, value) INCLUDE (starts, ends)
) WITH (fillfactor = 80);

-- The same definition as rollups.VALUES, from the rows already rolled up.
INSERT INTO rollup_values (org_id, grain, bucket, field, value, starts, ends)
SELECT r.org_id, r.grain, r.bucket, f.field, f.value, sum(r.starts), sum(r.ends)
  FROM rollup_sessions r
 CROSS JOIN LATERAL (VALUES ('protocol', r.connection_subtype), ('connection', r.connection),
                            ('connection_type', r.connection_type), ('verb', r.verb),
                            ('status', r.status), ('review_status', r.review_status))
       f(field, value)
 GROUP BY 1, 2, 3, 4, 5
HAVING sum(r.starts) <> 0 OR sum(r.ends) <> 0;

-- 2. Covering keys: the counters ride in the primary key's index (INCLUDE), so the read paths
--    are index-only scans instead of one heap page per rollup row.
ALTER TABLE rollup_sessions
    DROP CONSTRAINT rollup_sessions_pkey,
    ADD CONSTRAINT rollup_sessions_pkey PRIMARY KEY (org_id, grain, bucket, connection,
        connection_type, connection_subtype, verb, status, review_status) INCLUDE (starts, ends);
ALTER TABLE rollup_sessions_user
    DROP CONSTRAINT rollup_sessions_user_pkey,
    ADD CONSTRAINT rollup_sessions_user_pkey PRIMARY KEY (org_id, grain, bucket, user_key)
        INCLUDE (starts, ends);
ALTER TABLE rollup_redactions
    DROP CONSTRAINT rollup_redactions_pkey,
    ADD CONSTRAINT rollup_redactions_pkey PRIMARY KEY (org_id, grain, bucket, connection,
        connection_type, verb, info_type) INCLUDE (sessions, redact_total, transformed_bytes);
ALTER TABLE rollup_redactions_user
    DROP CONSTRAINT rollup_redactions_user_pkey,
    ADD CONSTRAINT rollup_redactions_user_pkey PRIMARY KEY (org_id, grain, bucket, user_key,
        info_type) INCLUDE (sessions, redact_total, transformed_bytes);

-- The top-N's per-bin counts read a few users over many pieces: per user, each piece is then
-- one short range (the key above would walk every user of every day in the piece).
CREATE INDEX rollup_sessions_user_by_user ON rollup_sessions_user (org_id, grain, user_key, bucket)
    INCLUDE (starts, ends);

-- 3. Deletes: where sessions still carry the delete/truncate triggers of migration 0010 (no
--    application-side delete path yet), rollup_values follows them the same way. Where those
--    triggers are gone (deletes maintain every rollups.FAMILIES table themselves), none is
--    added. On Citus the new table is distributed with the others.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'sessions_deleted_rollups') THEN
        EXECUTE $fn$
        CREATE FUNCTION rollup_values_forget_deleted() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        BEGIN
            INSERT INTO rollup_values AS r
            SELECT d.org_id, g.grain, date_trunc(g.unit, t.at, 'UTC'), f.field, f.value,
                   -sum(t.starts), -sum(t.ends)
              FROM deleted d
             CROSS JOIN LATERAL (VALUES (d.start_date, 1, 0), (d.end_date, 0, 1))
                   t(at, starts, ends)
             CROSS JOIN LATERAL (VALUES ('protocol', d.connection_subtype),
                                        ('connection', d.connection),
                                        ('connection_type', d.connection_type),
                                        ('verb', coalesce(d.verb, '')), ('status', d.status),
                                        ('review_status', coalesce(d.review_status, '')))
                   f(field, value)
             CROSS JOIN (VALUES (2::smallint, 'day'), (3::smallint, 'month')) g(grain, unit)
             WHERE t.at IS NOT NULL
             GROUP BY 1, 2, 3, 4, 5
             ORDER BY 1, 2, 3, 4, 5
            ON CONFLICT ON CONSTRAINT rollup_values_pkey DO UPDATE
               SET starts = r.starts + EXCLUDED.starts, ends = r.ends + EXCLUDED.ends;
            RETURN NULL;
        END;
        $body$;
        $fn$;
        EXECUTE 'CREATE TRIGGER sessions_deleted_rollup_values AFTER DELETE ON sessions'
                ' REFERENCING OLD TABLE AS deleted FOR EACH STATEMENT'
                ' EXECUTE FUNCTION rollup_values_forget_deleted()';
        EXECUTE $fn$
        CREATE FUNCTION rollup_values_forget_all() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        BEGIN
            TRUNCATE rollup_values;
            RETURN NULL;
        END;
        $body$;
        $fn$;
        EXECUTE 'CREATE TRIGGER sessions_truncated_rollup_values AFTER TRUNCATE ON sessions'
                ' FOR EACH STATEMENT EXECUTE FUNCTION rollup_values_forget_all()';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM create_distributed_table('rollup_values', 'org_id', colocate_with => 'sessions');
    END IF;
END
$$;
