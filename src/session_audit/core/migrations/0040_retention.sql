-- Retention, legal holds and the tamper-evident trail (issue 15, docs/retention.md).
--
-- Every table here is keyed by org first and has no trigger, so it distributes by org_id with
-- sessions on Citus (see the DO block at the end); the service writes every row itself, in
-- the transaction of the change it records.

-- A session's lock is now state the service sets: the gateway's label (at ingest), a lock by
-- the API (PUT /api/sessions/{id}/retention_lock) or a legal hold. The generated column is
-- replaced by a plain one holding the same values (Citus supports neither DROP EXPRESSION nor
-- ALTER COLUMN … on a distributed table, only ADD/DROP COLUMN): a constant default adds it
-- without a rewrite, only labelled rows are updated; ingest locks labelled sessions itself
-- from now on.
ALTER TABLE sessions ADD COLUMN retention_locked_set boolean NOT NULL DEFAULT false;
UPDATE sessions SET retention_locked_set = true WHERE retention_locked;
ALTER TABLE sessions DROP COLUMN retention_locked;
ALTER TABLE sessions RENAME COLUMN retention_locked_set TO retention_locked;

-- One row per org that set a policy. days NULL: keep forever (also the default without a row).
-- next_purge_at is the claim of the background purge: the process whose UPDATE moves it
-- forward runs that purge (exactly once per org and run, across processes).
CREATE TABLE retention_policies (
    org_id        uuid        PRIMARY KEY REFERENCES orgs (id),
    days          integer     CHECK (days IS NULL OR days BETWEEN 1 AND 36500),
    next_purge_at timestamptz NOT NULL DEFAULT now(),
    last_purge_at timestamptz,
    modified_by   text        NOT NULL,
    modified_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX retention_policies_due ON retention_policies (next_purge_at, org_id)
    WHERE days IS NOT NULL;

CREATE SEQUENCE retention_hold_ids START WITH 1;

-- Legal holds: a filter in the Reports API language, matched when the hold is made and by
-- every later ingest while it is active, and reports it names (kept from the report purge).
CREATE TABLE retention_holds (
    org_id       uuid        NOT NULL REFERENCES orgs (id),
    id           bigint      NOT NULL DEFAULT nextval('retention_hold_ids'),
    reason       text        NOT NULL,
    query_filter text        NOT NULL,
    report_ids   bigint[]    NOT NULL DEFAULT '{}',
    created_by   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    released_by  text,
    released_at  timestamptz,
    PRIMARY KEY (org_id, id)
);

-- Why a session is locked: one row per hold holding it (hold_id 0: locked through the API).
-- sessions.retention_locked is true while a row exists here or the gateway labelled it.
CREATE TABLE retention_locks (
    org_id     uuid        NOT NULL,
    hold_id    bigint      NOT NULL,
    session_id uuid        NOT NULL,
    reason     text        NOT NULL DEFAULT '',
    locked_by  text        NOT NULL,
    locked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, hold_id, session_id)
);
CREATE INDEX retention_locks_session ON retention_locks (org_id, session_id);

-- The per-org hash chain. An entry: seq, time, actor, kind, object type and ids, the digest of
-- the objects' new content, and hash = SHA-256(prev hash || canonical entry) (core/trail.py).
-- The head row is the chain's tip; it is locked (per org) for the moment an entry is added.
CREATE TABLE trail_heads (
    org_id uuid   PRIMARY KEY,
    seq    bigint NOT NULL,
    hash   bytea  NOT NULL
);

CREATE TABLE trail_entries (
    org_id      uuid        NOT NULL,
    seq         bigint      NOT NULL,
    at          timestamptz NOT NULL,
    actor       text        NOT NULL,
    kind        text        NOT NULL,
    object_type text        NOT NULL,
    object_ids  text[]      NOT NULL,
    items       integer     NOT NULL,
    digest      bytea       NOT NULL,
    prev        bytea       NOT NULL,
    hash        bytea       NOT NULL,
    PRIMARY KEY (org_id, seq)
);

-- The sessions an entry covers (an ingest batch, a purge batch, a lock) with the digest of each
-- one's stored content after the change (NULL: deleted). The entry's digest is over these.
CREATE TABLE trail_items (
    org_id     uuid   NOT NULL,
    seq        bigint NOT NULL,
    session_id uuid   NOT NULL,
    digest     bytea,
    PRIMARY KEY (org_id, seq, session_id)
);

DO $$
DECLARE
    t text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
    FOREACH t IN ARRAY ARRAY[
            'retention_policies', 'retention_holds', 'retention_locks', 'trail_heads',
            'trail_entries', 'trail_items'] LOOP
        PERFORM create_distributed_table(t::regclass, 'org_id', colocate_with => 'sessions');
    END LOOP;
END
$$;
