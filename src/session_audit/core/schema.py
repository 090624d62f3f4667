"""The session record's shape, shared by every domain: which columns ingest writes (in COPY
order), which hold JSON, and the review statuses a session can carry. Names are code constants,
never request text."""

from __future__ import annotations

# Columns written by ingest, in COPY order.
INGEST_COLUMNS: tuple[str, ...] = (
    "id", "org_id", "start_date", "end_date", "status", "verb",
    "user_id", "user_email", "user_name", "connection", "connection_type",
    "connection_subtype", "role_name", "resource_name", "identity_type",
    "machine_identity_id", "correlation_id", "session_batch_id", "exit_code",
    "event_size", "script", "script_size", "review_status", "review_approvers",
    "redactions", "review", "ai_analysis", "guardrails_info", "connection_tags",
    "integrations_metadata", "labels", "metadata", "metrics", "event_stream",
)  # fmt: skip
JSON_COLUMNS = frozenset({
    "redactions", "review", "ai_analysis", "guardrails_info", "connection_tags",
    "integrations_metadata", "labels", "metadata", "metrics", "event_stream",
})  # fmt: skip
REVIEW_STATUSES = (
    "PENDING",
    "APPROVED",
    "REJECTED",
    "REVOKED",
    "PROCESSING",
    "EXECUTED",
    "UNKNOWN",
)
