-- Reports API v2: report definitions, generated reports (snapshots), subscriptions with their
-- per-period ledger, and the audit log of changes made through the API.

-- A session is retention-locked when the gateway labels it so (labels.retention_locked =
-- "true", any case). Generated, so ingest (which names its COPY columns) needs no change.
ALTER TABLE sessions
    ADD COLUMN retention_locked boolean
    GENERATED ALWAYS AS (coalesce(lower(labels ->> 'retention_locked') = 'true', false)) STORED;

-- One id space for definitions, reports and subscriptions: 64-bit, above 2^60, so ids never
-- collide with the predefined definitions 5-16 and always travel as strings of digits.
CREATE SEQUENCE report_object_ids START WITH 1152921504606846977;

CREATE TABLE defined_reports (
    id           bigint      PRIMARY KEY DEFAULT nextval('report_object_ids'),
    -- NULL for the predefined definitions, which every org shares.
    org_id       uuid        REFERENCES orgs (id),
    title        text        NOT NULL,
    type         text        NOT NULL,
    query_filter text        NOT NULL DEFAULT '',
    query_order  text        NOT NULL DEFAULT '',
    -- Lower-cased e-mail of the creator (the token's e-mail); NULL when predefined.
    owner        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    modified_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((org_id IS NULL) = (owner IS NULL)),
    CHECK ((org_id IS NULL) = (id BETWEEN 1 AND 1000))
);
CREATE INDEX defined_reports_org ON defined_reports (org_id, owner, id);

INSERT INTO defined_reports (id, title, type, created_at, modified_at) VALUES
    (5,  'System report',                   'system',             '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (6,  'Account access report',           'account_access',     '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (7,  'Safe access report',              'safe_access',        '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (8,  'Server access report',            'server_access',      '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (9,  'Session approvals by user',       'session_approvals',  '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (10, 'Session sharing invites by user', 'session_sharing',    '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (11, 'Session summary',                 'session_summary',    '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (12, 'Sessions by server report',       'sessions_by_server', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (13, 'User access report',              'user_access',        '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (14, 'User activity report',            'user_activity',      '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (15, 'User privilege report',           'user_privilege',     '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'),
    (16, 'User report',                     'user',               '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z');

CREATE TABLE report_subscriptions (
    id                bigint      PRIMARY KEY DEFAULT nextval('report_object_ids'),
    org_id            uuid        NOT NULL REFERENCES orgs (id),
    defined_report_id bigint      NOT NULL REFERENCES defined_reports (id) ON DELETE CASCADE,
    owner             text        NOT NULL,
    -- 'org': the subscriber may read the whole org (admin/auditor when subscribing);
    -- 'own': only their own sessions (user).
    owner_scope       text        NOT NULL CHECK (owner_scope IN ('org', 'own')),
    period            text        NOT NULL CHECK (period IN ('day', 'week', 'month', 'quarter', 'year')),
    time_zone         text        NOT NULL DEFAULT 'UTC',
    -- The next period to generate, [next_period_start, next_run_at); due once next_run_at
    -- has passed. Advanced under the row lock in the same transaction that records the period.
    next_period_start timestamptz NOT NULL,
    next_run_at       timestamptz NOT NULL,
    created_at        timestamptz NOT NULL,
    modified_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, owner, defined_report_id, period)
);
CREATE INDEX report_subscriptions_due ON report_subscriptions (next_run_at);
CREATE INDEX report_subscriptions_org ON report_subscriptions (org_id, owner, id);

CREATE TABLE reports (
    id                bigint      PRIMARY KEY DEFAULT nextval('report_object_ids'),
    org_id            uuid        NOT NULL REFERENCES orgs (id),
    -- Kept when the definition is deleted later: a report is history.
    defined_report_id bigint      NOT NULL,
    subscription_id   bigint,
    type              text        NOT NULL,
    title             text        NOT NULL,
    owner             text        NOT NULL,
    owner_scope       text        NOT NULL CHECK (owner_scope IN ('org', 'own')),
    query_filter      text        NOT NULL DEFAULT '',
    query_order       text        NOT NULL DEFAULT '',
    time_zone         text        NOT NULL DEFAULT 'UTC',
    period            text,
    period_start      timestamptz,
    period_end        timestamptz,
    status            text        NOT NULL DEFAULT 'pending'
                                  CHECK (status IN ('pending', 'ready', 'failed')),
    failure           text,
    row_count         bigint,
    -- [[label, value], ...] and {"unit": ..., "buckets": [[label, count], ...]}
    summary           jsonb,
    chart             jsonb,
    note              text,
    generated_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    modified_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reports_org_owner ON reports (org_id, owner, id DESC);
CREATE INDEX reports_org ON reports (org_id, id DESC);
CREATE INDEX reports_pending ON reports (id) WHERE status = 'pending';
CREATE INDEX reports_org_definition ON reports (org_id, defined_report_id);

-- The snapshot: one row per report line, cells already rendered as text, written by one
-- INSERT ... SELECT when the report is generated. No foreign key (a per-row check would
-- slow million-row reports); deleting a report deletes its rows in the same transaction.
CREATE TABLE report_rows (
    report_id bigint  NOT NULL,
    n         integer NOT NULL,
    cells     text[]  NOT NULL,
    PRIMARY KEY (report_id, n)
);

-- Exactly one report per (subscription, period): the scheduler inserts here before it
-- creates the report. report_id survives the report's deletion (the period stays done).
CREATE TABLE subscription_periods (
    subscription_id bigint      NOT NULL REFERENCES report_subscriptions (id) ON DELETE CASCADE,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    report_id       bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, period_start)
);

-- Every create/change/delete through the API (definitions, reports, subscriptions) and every
-- token change (by any client: the trigger below), with who, what and when.
CREATE TABLE audit_log (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id      uuid        NOT NULL REFERENCES orgs (id),
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text        NOT NULL,
    actor_role  text        NOT NULL DEFAULT '',
    action      text        NOT NULL CHECK (action IN ('create', 'update', 'delete', 'revoke')),
    object_type text        NOT NULL,
    object_id   text        NOT NULL,
    details     jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_org_at ON audit_log (org_id, at, id);

-- Token changes are audited whoever makes them. The CLI names itself through the
-- session_audit.actor setting; anything else is recorded as the database user.
CREATE FUNCTION audit_api_tokens() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    who text := coalesce(nullif(current_setting('session_audit.actor', true), ''),
                         'database user ' || session_user);
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO audit_log (org_id, actor, action, object_type, object_id, details)
        VALUES (NEW.org_id, who, 'create', 'token', NEW.id::text,
                jsonb_build_object('role', NEW.role, 'email', NEW.email, 'prefix', NEW.prefix));
    ELSIF TG_OP = 'UPDATE' AND OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        INSERT INTO audit_log (org_id, actor, action, object_type, object_id, details)
        VALUES (NEW.org_id, who, 'revoke', 'token', NEW.id::text,
                jsonb_build_object('role', NEW.role, 'email', NEW.email, 'prefix', NEW.prefix));
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO audit_log (org_id, actor, action, object_type, object_id, details)
        VALUES (OLD.org_id, who, 'delete', 'token', OLD.id::text,
                jsonb_build_object('role', OLD.role, 'email', OLD.email, 'prefix', OLD.prefix));
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_tokens_audit
    AFTER INSERT OR UPDATE OR DELETE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION audit_api_tokens();
