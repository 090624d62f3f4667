"""Retention (issue 15, docs/retention.md): the per-org policy, locks and legal holds, the
purge job, and the API over them and over the org's trail (core/trail.py).

store holds the SQL, purge the job, service the RPCs; `ingest.on_ingest` is the one call
sessions.ingest makes in every ingest transaction. Holds use the Reports API filter language
through the reports package's public `session_filter`."""
