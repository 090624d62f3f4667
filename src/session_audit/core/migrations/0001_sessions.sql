-- Orgs, API tokens and the session store.

CREATE TABLE orgs (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Bearer tokens. Only a SHA-256 of the token is stored: tokens are 256 random bits, so a fast
-- hash is enough (nothing to brute-force), and lookups stay one index probe per request.
CREATE TABLE api_tokens (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id      uuid        NOT NULL REFERENCES orgs (id),
    token_hash  bytea       NOT NULL UNIQUE,
    prefix      text        NOT NULL,
    role        text        NOT NULL CHECK (role IN ('admin', 'auditor', 'user', 'ingest')),
    email       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE sessions (
    id                    uuid        PRIMARY KEY,
    org_id                uuid        NOT NULL REFERENCES orgs (id),
    start_date            timestamptz NOT NULL,
    end_date              timestamptz,
    status                text        NOT NULL CHECK (status IN ('open', 'ready', 'done')),
    verb                  text        CHECK (verb IN ('connect', 'exec')),
    user_id               text        NOT NULL DEFAULT '',
    user_email            text        NOT NULL DEFAULT '',
    user_name             text        NOT NULL DEFAULT '',
    connection            text        NOT NULL DEFAULT '',
    connection_type       text        NOT NULL DEFAULT '',
    connection_subtype    text        NOT NULL DEFAULT '',
    role_name             text        NOT NULL DEFAULT '',
    resource_name         text,
    identity_type         text        CHECK (identity_type IN ('user', 'machine')),
    machine_identity_id   text,
    correlation_id        text,
    session_batch_id      text,
    exit_code             integer,
    event_size            bigint      NOT NULL DEFAULT 0,
    script                text,
    script_size           bigint      NOT NULL DEFAULT 0,
    -- Denormalised from `review` for filtering: the review's status and the lower-cased
    -- e-mails of its reviewers.
    review_status         text,
    review_approvers      text[],
    -- [{"info_type": "EMAIL_ADDRESS", "count": 3, "transformed_bytes": 120}, ...]
    redactions            jsonb,
    review                jsonb,
    ai_analysis           jsonb,
    guardrails_info       jsonb,
    connection_tags       jsonb,
    integrations_metadata jsonb,
    labels                jsonb,
    metadata              jsonb,
    metrics               jsonb,
    event_stream          jsonb,
    jira_issue_key        text GENERATED ALWAYS AS (lower(integrations_metadata ->> 'jira_issue_key')) STORED,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK (end_date IS NULL OR end_date >= start_date)
);

-- Every list is newest first within an org; one (org, filter, start_date, id) index per
-- common filter keeps filtered pages and keyset cursors to an index range scan.
CREATE INDEX sessions_org_start   ON sessions (org_id, start_date DESC, id DESC);
CREATE INDEX sessions_org_user    ON sessions (org_id, user_id, start_date DESC, id DESC);
CREATE INDEX sessions_org_email   ON sessions (org_id, lower(user_email), start_date DESC, id DESC);
CREATE INDEX sessions_org_conn    ON sessions (org_id, connection, start_date DESC, id DESC);
CREATE INDEX sessions_org_type    ON sessions (org_id, connection_type, start_date DESC, id DESC);
CREATE INDEX sessions_org_review  ON sessions (org_id, review_status, start_date DESC, id DESC)
    WHERE review_status IS NOT NULL;
CREATE INDEX sessions_org_corr    ON sessions (org_id, correlation_id, start_date DESC, id DESC)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX sessions_org_jira    ON sessions (org_id, jira_issue_key, start_date DESC, id DESC)
    WHERE jira_issue_key IS NOT NULL;
CREATE INDEX sessions_approvers   ON sessions USING gin (review_approvers)
    WHERE review_approvers IS NOT NULL;
