-- On a Citus coordinator (the citus extension is created in this database), distribute the
-- tenant tables by org_id, all colocated with sessions: every statement for one org is routed
-- to the one node holding that org (docs/scaling.md). Does nothing on plain PostgreSQL.
--
--   reference (a copy on every node): orgs, predefined_reports
--   coordinator-local: api_tokens (looked up by token hash, without an org; its triggers
--     NOTIFY the servers and write the audit log), schema_migrations
--   distributed by org_id: everything else
DO $$
DECLARE
    t text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    -- Distributing tables that hold rows and have foreign keys, in one transaction.
    SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
    -- A local table may not reference a reference table without becoming a Citus table
    -- itself; api_tokens stays plain (the service creates the org with the token).
    ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_org_id_fkey;
    PERFORM create_reference_table('orgs');
    PERFORM create_reference_table('predefined_reports');
    PERFORM create_distributed_table('sessions', 'org_id');
    -- Foreign keys between tables being distributed are dropped and made again afterwards
    -- (neither side may be local while the other is distributed).
    ALTER TABLE subscription_periods DROP CONSTRAINT subscription_periods_subscription_fkey;
    ALTER TABLE report_subscriptions DROP CONSTRAINT report_subscriptions_definition_fkey;
    FOREACH t IN ARRAY ARRAY[
            'rollup_sessions', 'rollup_sessions_total', 'rollup_sessions_user',
            'rollup_redactions', 'rollup_redactions_user', 'rollup_stale_orgs',
            'defined_reports', 'report_subscriptions', 'subscription_periods', 'reports',
            'report_rows', 'report_attempts', 'audit_log'] LOOP
        PERFORM create_distributed_table(t::regclass, 'org_id', colocate_with => 'sessions');
    END LOOP;
    ALTER TABLE report_subscriptions
        ADD CONSTRAINT report_subscriptions_definition_fkey
        FOREIGN KEY (org_id, defined_report_id) REFERENCES defined_reports (org_id, id)
        ON DELETE CASCADE;
    ALTER TABLE subscription_periods
        ADD CONSTRAINT subscription_periods_subscription_fkey
        FOREIGN KEY (org_id, subscription_id) REFERENCES report_subscriptions (org_id, id)
        ON DELETE CASCADE;
END
$$;
