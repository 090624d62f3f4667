-- Any change to api_tokens (create, revoke, delete, by any client) tells every server
-- process to drop its cache of token lookups (auth.TokenCache).
CREATE FUNCTION notify_api_tokens_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('session_audit_tokens', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_tokens_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION notify_api_tokens_changed();
