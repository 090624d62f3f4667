-- Scale-out (issue 12, docs/scaling.md): every table of tenant data is keyed by org first, so
-- it can be distributed by org_id (migration 0031, on Citus only) with each org's rows of
-- every table on one node. The same schema runs on plain PostgreSQL.

-- Session ids are unique per org: the same id sent by two orgs is two sessions, and no org
-- can learn that an id exists in another.
ALTER TABLE sessions DROP CONSTRAINT sessions_pkey;
ALTER TABLE sessions ADD PRIMARY KEY (org_id, id);

-- No trigger on tenant tables (Citus does not run them on distributed tables): deleting
-- sessions goes through analytics.rollups.delete_sessions, which takes the sessions'
-- contributions out of the rollups in the same transaction, like ingest maintains them.
DROP TRIGGER sessions_deleted_rollups ON sessions;
DROP TRIGGER sessions_truncated_rollups ON sessions;
DROP FUNCTION rollups_forget_deleted();
DROP FUNCTION rollups_forget_all();

-- Predefined report definitions: one copy per org (ids 5-16 in every org, owner NULL), so a
-- definition is always read with its org. New orgs get theirs from this template when they
-- are created (core.auth.ensure_org).
CREATE TABLE predefined_reports (
    id          bigint      PRIMARY KEY CHECK (id BETWEEN 1 AND 1000),
    title       text        NOT NULL,
    type        text        NOT NULL,
    created_at  timestamptz NOT NULL,
    modified_at timestamptz NOT NULL
);
INSERT INTO predefined_reports (id, title, type, created_at, modified_at)
SELECT id, title, type, created_at, modified_at FROM defined_reports WHERE org_id IS NULL;

-- Foreign keys on the old keys go first; they come back on the new ones.
ALTER TABLE report_subscriptions
    DROP CONSTRAINT report_subscriptions_defined_report_id_fkey;
ALTER TABLE subscription_periods
    DROP CONSTRAINT subscription_periods_subscription_id_fkey;
ALTER TABLE defined_reports
    DROP CONSTRAINT defined_reports_check,
    DROP CONSTRAINT defined_reports_check1;
INSERT INTO defined_reports (id, org_id, title, type, created_at, modified_at)
SELECT p.id, o.id, p.title, p.type, p.created_at, p.modified_at
  FROM predefined_reports p CROSS JOIN orgs o;
DELETE FROM defined_reports WHERE org_id IS NULL;
ALTER TABLE defined_reports
    ALTER COLUMN org_id SET NOT NULL,
    DROP CONSTRAINT defined_reports_pkey,
    ADD PRIMARY KEY (org_id, id),
    ADD CHECK ((owner IS NULL) = (id BETWEEN 1 AND 1000));

ALTER TABLE report_subscriptions
    DROP CONSTRAINT report_subscriptions_pkey,
    ADD PRIMARY KEY (org_id, id),
    ADD CONSTRAINT report_subscriptions_definition_fkey
        FOREIGN KEY (org_id, defined_report_id) REFERENCES defined_reports (org_id, id)
        ON DELETE CASCADE;
DROP INDEX report_subscriptions_due;
CREATE INDEX report_subscriptions_due ON report_subscriptions (next_run_at, org_id);

ALTER TABLE reports
    DROP CONSTRAINT reports_pkey,
    ADD PRIMARY KEY (org_id, id);
DROP INDEX reports_pending;
CREATE INDEX reports_pending ON reports (org_id, id) WHERE status = 'pending';

-- Rows, periods and attempts carry their report's / subscription's org.
ALTER TABLE report_rows ADD COLUMN org_id uuid;
UPDATE report_rows x SET org_id = r.org_id FROM reports r WHERE r.id = x.report_id;
DELETE FROM report_rows WHERE org_id IS NULL;
ALTER TABLE report_rows
    ALTER COLUMN org_id SET NOT NULL,
    DROP CONSTRAINT report_rows_pkey,
    ADD PRIMARY KEY (org_id, report_id, n);

ALTER TABLE subscription_periods ADD COLUMN org_id uuid;
UPDATE subscription_periods p SET org_id = s.org_id
  FROM report_subscriptions s WHERE s.id = p.subscription_id;
ALTER TABLE subscription_periods
    ALTER COLUMN org_id SET NOT NULL,
    DROP CONSTRAINT subscription_periods_pkey,
    ADD PRIMARY KEY (org_id, subscription_id, period_start),
    ADD CONSTRAINT subscription_periods_subscription_fkey
        FOREIGN KEY (org_id, subscription_id) REFERENCES report_subscriptions (org_id, id)
        ON DELETE CASCADE;

ALTER TABLE report_attempts ADD COLUMN org_id uuid;
UPDATE report_attempts a SET org_id = r.org_id FROM reports r WHERE r.id = a.report_id;
DELETE FROM report_attempts WHERE org_id IS NULL;
ALTER TABLE report_attempts
    ALTER COLUMN org_id SET NOT NULL,
    DROP CONSTRAINT report_attempts_pkey,
    ADD PRIMARY KEY (org_id, report_id);

ALTER TABLE audit_log
    DROP CONSTRAINT audit_log_pkey,
    ADD PRIMARY KEY (org_id, id);
-- Citus does not distribute a table with an identity column: a sequence default instead,
-- continuing from the identity.
CREATE SEQUENCE audit_log_ids OWNED BY audit_log.id;
SELECT setval('audit_log_ids', coalesce(max(id), 0) + 1, false) FROM audit_log;
ALTER TABLE audit_log
    ALTER COLUMN id DROP IDENTITY,
    ALTER COLUMN id SET DEFAULT nextval('audit_log_ids');
