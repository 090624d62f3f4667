"""The report types: what each of the twelve predefined definitions computes, as SQL.

Each type has a column set and one INSERT … SELECT that writes the report's snapshot rows
(`report_rows`, cells rendered as text) from this service's data. Mapping of the document's
vocabulary onto sessions (docs/reports.md, "Predefined definitions"):

    server   = connection (name; its type and protocol beside it)
    account  = role name used on the connection
    safe     = a connection tag "key=value" (connections without tags: "(untagged)")
    approver = an e-mail recorded as reviewer on the session's review

Slots in the SQL (core.sql.Template): $report is the report id, $scope the WHERE clause of the
source (org, owner, filter, period), $order the session ORDER BY (session_summary only), $org
the report's org (system). Everything else is code. Times are RFC 3339 in UTC, to the second.
"""

from __future__ import annotations

from dataclasses import dataclass

from session_audit.core.sql import Template

EMPTY_JSON = "'{}'::jsonb"


def ts(expr: str) -> str:
    return f"""coalesce(to_char({expr} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), '')"""


def num(expr: str) -> str:
    return f"coalesce(({expr})::text, '')"


def txt(expr: str) -> str:
    return f"coalesce({expr}, '')"


DURATION = "floor(extract(epoch FROM s.end_date - s.start_date))::bigint"


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    # text | integer | time | boolean: alignment, and CSV formula neutralisation (text only).
    kind: str = "text"
    # Relative width of a text column in the PDF.
    weight: float = 1.0


@dataclass(frozen=True)
class ReportType:
    key: str
    title: str
    predefined_id: int
    # sessions | audit | tokens | none: what the rows are computed from.
    source: str
    columns: tuple[Column, ...]
    # The INSERT … SELECT; slots $report (the report id), $scope, $order, $org. None: no rows.
    rows_sql: Template | None
    # Only admin and auditor may create, read or subscribe to it.
    org_readers_only: bool = False
    # query_order applies (the rows are sessions).
    orderable: bool = False
    # Shown in the report header.
    note: str = ""

    @property
    def uses_filter(self) -> bool:
        return self.source == "sessions"


# Each row carries its report's org ($org), the distribution key of report_rows on Citus.
_INSERT = "INSERT INTO report_rows (report_id, org_id, n, cells)\n"

SESSION_SUMMARY = ReportType(
    "session_summary", "Session summary", 11, "sessions",
    (
        Column("id", "Session id", weight=2.4), Column("created_at", "Started", "time"),
        Column("finished_at", "Finished", "time"), Column("duration_s", "Duration (s)", "integer"),
        Column("user_email", "User e-mail", weight=1.8), Column("user_id", "User id", weight=1.6),
        Column("connection", "Server", weight=1.4), Column("protocol", "Protocol"),
        Column("account", "Account"), Column("verb", "Verb"),
        Column("session_status", "Session status"), Column("status", "Approval status"),
        Column("retention_locked", "Retention locked", "boolean"),
        Column("exit_code", "Exit code", "integer"),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid, row_number() OVER (ORDER BY $order),
       ARRAY[s.id::text, {ts("s.start_date")}, {ts("s.end_date")}, {num(DURATION)},
             s.user_email, s.user_id, s.connection, s.connection_subtype, s.role_name,
             {txt("s.verb")}, s.status, {txt("s.review_status")},
             CASE WHEN s.retention_locked THEN 'true' ELSE 'false' END, {num("s.exit_code")}]
  FROM sessions s
 WHERE $scope
"""),
    orderable=True,
    note="One row per session.",
)  # fmt: skip

SESSIONS_BY_SERVER = ReportType(
    "sessions_by_server", "Sessions by server report", 12, "sessions",
    (
        Column("server", "Server"), Column("type", "Type"), Column("protocol", "Protocol"),
        Column("sessions", "Sessions", "integer"), Column("users", "Users", "integer"),
        Column("open_sessions", "Open", "integer"), Column("first_session", "First", "time"),
        Column("last_session", "Last", "time"),
        Column("duration_s", "Total duration (s)", "integer"),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid,
       row_number() OVER (ORDER BY count(*) DESC, s.connection COLLATE "C",
                          s.connection_type COLLATE "C", s.connection_subtype COLLATE "C"),
       ARRAY[s.connection, s.connection_type, s.connection_subtype, count(*)::text,
             count(DISTINCT lower(s.user_email))::text,
             (count(*) FILTER (WHERE s.end_date IS NULL))::text,
             {ts("min(s.start_date)")}, {ts("max(s.start_date)")},
             coalesce(sum({DURATION}), 0)::text]
  FROM sessions s
 WHERE $scope
 GROUP BY s.connection, s.connection_type, s.connection_subtype
"""),
    note="One row per server (connection); busiest first.",
)  # fmt: skip

SERVER_ACCESS = ReportType(
    "server_access", "Server access report", 8, "sessions",
    (
        Column("server", "Server"), Column("protocol", "Protocol"),
        Column("user_email", "User e-mail"), Column("sessions", "Sessions", "integer"),
        Column("first_access", "First access", "time"),
        Column("last_access", "Last access", "time"),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid,
       row_number() OVER (ORDER BY s.connection COLLATE "C", s.connection_subtype COLLATE "C",
                          lower(s.user_email) COLLATE "C"),
       ARRAY[s.connection, s.connection_subtype, lower(s.user_email), count(*)::text,
             {ts("min(s.start_date)")}, {ts("max(s.start_date)")}]
  FROM sessions s
 WHERE $scope
 GROUP BY s.connection, s.connection_subtype, lower(s.user_email)
"""),
    note="Who accessed each server (connection).",
)  # fmt: skip

ACCOUNT_ACCESS = ReportType(
    "account_access", "Account access report", 6, "sessions",
    (
        Column("account", "Account"), Column("server", "Server"),
        Column("user_email", "User e-mail"), Column("sessions", "Sessions", "integer"),
        Column("first_access", "First access", "time"),
        Column("last_access", "Last access", "time"),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid,
       row_number() OVER (ORDER BY s.role_name COLLATE "C", s.connection COLLATE "C",
                          lower(s.user_email) COLLATE "C"),
       ARRAY[s.role_name, s.connection, lower(s.user_email), count(*)::text,
             {ts("min(s.start_date)")}, {ts("max(s.start_date)")}]
  FROM sessions s
 WHERE $scope
 GROUP BY s.role_name, s.connection, lower(s.user_email)
"""),
    note="Accounts are the role names sessions used on each server.",
)  # fmt: skip

SAFE_ACCESS = ReportType(
    "safe_access", "Safe access report", 7, "sessions",
    (
        Column("safe", "Safe"), Column("user_email", "User e-mail"),
        Column("servers", "Servers", "integer"), Column("sessions", "Sessions", "integer"),
        Column("first_access", "First access", "time"),
        Column("last_access", "Last access", "time"),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid,
       row_number() OVER (ORDER BY t.safe COLLATE "C", lower(s.user_email) COLLATE "C"),
       ARRAY[t.safe, lower(s.user_email), count(DISTINCT s.connection)::text, count(*)::text,
             {ts("min(s.start_date)")}, {ts("max(s.start_date)")}]
  FROM sessions s
 CROSS JOIN LATERAL (
        SELECT e.key || '=' || e.value AS safe
          FROM jsonb_each_text(coalesce(s.connection_tags, {EMPTY_JSON})) e
        UNION ALL
        SELECT '(untagged)' WHERE coalesce(s.connection_tags, {EMPTY_JSON}) = {EMPTY_JSON}
       ) t
 WHERE $scope
 GROUP BY t.safe, lower(s.user_email)
"""),
    note="Safes are connection tags (key=value); a session counts once under each tag of its "
         "connection.",
)  # fmt: skip

USER_ACCESS = ReportType(
    "user_access", "User access report", 13, "sessions",
    (
        Column("user_email", "User e-mail"), Column("user_id", "User id"),
        Column("server", "Server"), Column("protocol", "Protocol"),
        Column("sessions", "Sessions", "integer"),
        Column("first_access", "First access", "time"),
        Column("last_access", "Last access", "time"),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid,
       row_number() OVER (ORDER BY lower(s.user_email) COLLATE "C", s.user_id COLLATE "C",
                          s.connection COLLATE "C", s.connection_subtype COLLATE "C"),
       ARRAY[lower(s.user_email), s.user_id, s.connection, s.connection_subtype, count(*)::text,
             {ts("min(s.start_date)")}, {ts("max(s.start_date)")}]
  FROM sessions s
 WHERE $scope
 GROUP BY lower(s.user_email), s.user_id, s.connection, s.connection_subtype
"""),
    note="What each user accessed.",
)  # fmt: skip

USER = ReportType(
    "user", "User report", 16, "sessions",
    (
        Column("user_email", "User e-mail"), Column("user_id", "User id"),
        Column("user_name", "Name"), Column("sessions", "Sessions", "integer"),
        Column("servers", "Servers", "integer"), Column("open_sessions", "Open", "integer"),
        Column("first_session", "First session", "time"),
        Column("last_session", "Last session", "time"),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid,
       row_number() OVER (ORDER BY lower(s.user_email) COLLATE "C", s.user_id COLLATE "C"),
       ARRAY[lower(s.user_email), s.user_id, max(s.user_name), count(*)::text,
             count(DISTINCT s.connection)::text,
             (count(*) FILTER (WHERE s.end_date IS NULL))::text,
             {ts("min(s.start_date)")}, {ts("max(s.start_date)")}]
  FROM sessions s
 WHERE $scope
 GROUP BY lower(s.user_email), s.user_id
"""),
    note="One row per user (e-mail and subject id).",
)  # fmt: skip

SESSION_APPROVALS = ReportType(
    "session_approvals", "Session approvals by user", 9, "sessions",
    (
        Column("approver", "Approver"), Column("reviews", "Reviews", "integer"),
        Column("approved", "Approved", "integer"), Column("executed", "Executed", "integer"),
        Column("rejected", "Rejected", "integer"), Column("revoked", "Revoked", "integer"),
        Column("pending", "Pending", "integer"), Column("other", "Other", "integer"),
        Column("first_session", "First session", "time"),
        Column("last_session", "Last session", "time"),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid,
       row_number() OVER (ORDER BY coalesce(a.approver, '(none)') COLLATE "C"),
       ARRAY[coalesce(a.approver, '(none)'), count(*)::text,
             (count(*) FILTER (WHERE s.review_status = 'APPROVED'))::text,
             (count(*) FILTER (WHERE s.review_status = 'EXECUTED'))::text,
             (count(*) FILTER (WHERE s.review_status = 'REJECTED'))::text,
             (count(*) FILTER (WHERE s.review_status = 'REVOKED'))::text,
             (count(*) FILTER (WHERE s.review_status = 'PENDING'))::text,
             (count(*) FILTER (WHERE s.review_status IN ('PROCESSING', 'UNKNOWN')))::text,
             {ts("min(s.start_date)")}, {ts("max(s.start_date)")}]
  FROM sessions s
  LEFT JOIN LATERAL unnest(s.review_approvers) AS a(approver) ON true
 WHERE $scope AND s.review_status IS NOT NULL
 GROUP BY coalesce(a.approver, '(none)')
"""),
    note="Sessions that needed approval, by the reviewer recorded on their review "
         "(\"(none)\": nobody has reviewed yet). Counts are the sessions' review statuses.",
)  # fmt: skip

SESSION_SHARING = ReportType(
    "session_sharing", "Session sharing invites by user", 10, "none",
    (
        Column("user_email", "User e-mail"), Column("invited", "Invited user"),
        Column("session_id", "Session id"), Column("invited_at", "Invited at", "time"),
    ),
    None,
    note="No data source: this service does not record session sharing invites, so this report "
         "has no rows.",
)  # fmt: skip

USER_ACTIVITY = ReportType(
    "user_activity", "User activity report", 14, "audit",
    (
        Column("at", "At", "time"), Column("actor", "Who"), Column("role", "Role"),
        Column("action", "Action"), Column("object_type", "Object"),
        Column("object_id", "Object id"), Column("details", "Details", weight=4.0),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid, row_number() OVER (ORDER BY a.at, a.id),
       ARRAY[{ts("a.at")}, a.actor, a.actor_role, a.action, a.object_type, a.object_id,
             a.details::text]
  FROM audit_log a
 WHERE $scope
"""),
    note="Changes made through this service: report definitions, reports, subscriptions and API "
         "tokens. Session filters do not apply.",
)  # fmt: skip

USER_PRIVILEGE = ReportType(
    "user_privilege", "User privilege report", 15, "tokens",
    (
        Column("user_email", "User e-mail"), Column("role", "Role"),
        Column("active_tokens", "Active tokens", "integer"),
        Column("revoked_tokens", "Revoked tokens", "integer"),
        Column("first_granted", "First granted", "time"),
        Column("last_granted", "Last granted", "time"),
    ),
    Template(_INSERT + f"""
SELECT $report, $org::uuid, row_number() OVER (ORDER BY lower(t.email) COLLATE "C", t.role),
       ARRAY[lower(t.email), t.role,
             (count(*) FILTER (WHERE t.revoked_at IS NULL))::text,
             (count(*) FILTER (WHERE t.revoked_at IS NOT NULL))::text,
             {ts("min(t.created_at)")}, {ts("max(t.created_at)")}]
  FROM api_tokens t
 WHERE $scope
 GROUP BY lower(t.email), t.role
"""),
    note="Roles granted through API tokens, as they stand when the report is generated; the "
         "period and session filters do not apply.",
)  # fmt: skip

_REDACTED = "(SELECT sum((r ->> 'count')::bigint) FROM jsonb_array_elements(s.redactions) r)"

SYSTEM = ReportType(
    "system", "System report", 5, "sessions",
    (Column("metric", "Metric"), Column("value", "Value", "integer")),
    Template(_INSERT + f"""
SELECT $report, $org::uuid, m.n, ARRAY[m.metric, m.value::text]
  FROM (SELECT count(*) AS sessions,
               count(*) FILTER (WHERE s.end_date IS NULL) AS open,
               count(DISTINCT lower(s.user_email)) AS users,
               count(DISTINCT s.connection) AS servers,
               count(DISTINCT s.role_name) AS accounts,
               count(DISTINCT s.connection_subtype) AS protocols,
               count(*) FILTER (WHERE s.review_status IS NOT NULL) AS reviewed,
               count(*) FILTER (WHERE s.review_status = 'APPROVED') AS approved,
               count(*) FILTER (WHERE s.review_status = 'REJECTED') AS rejected,
               count(*) FILTER (WHERE s.review_status = 'PENDING') AS pending,
               count(*) FILTER (WHERE s.retention_locked) AS locked,
               coalesce(sum(s.event_size), 0) AS event_bytes,
               coalesce(sum({_REDACTED}), 0) AS redacted
          FROM sessions s
         WHERE $scope) a,
       (SELECT count(*) FILTER (WHERE revoked_at IS NULL) AS active,
               count(*) FILTER (WHERE revoked_at IS NULL AND role = 'admin') AS admins,
               count(*) FILTER (WHERE revoked_at IS NULL AND role = 'auditor') AS auditors,
               count(*) FILTER (WHERE revoked_at IS NULL AND role = 'user') AS users,
               count(*) FILTER (WHERE revoked_at IS NULL AND role = 'ingest') AS ingest
          FROM api_tokens WHERE org_id = $org) t,
       LATERAL (VALUES
           (1, 'Sessions', a.sessions), (2, 'Open sessions', a.open),
           (3, 'Finished sessions', a.sessions - a.open), (4, 'Users', a.users),
           (5, 'Servers', a.servers), (6, 'Accounts', a.accounts),
           (7, 'Protocols', a.protocols), (8, 'Sessions needing approval', a.reviewed),
           (9, 'Approved', a.approved), (10, 'Rejected', a.rejected),
           (11, 'Pending approval', a.pending), (12, 'Retention-locked sessions', a.locked),
           (13, 'Recorded event bytes', a.event_bytes), (14, 'Redacted values', a.redacted),
           (15, 'Active API tokens', t.active), (16, 'Admin tokens', t.admins),
           (17, 'Auditor tokens', t.auditors), (18, 'User tokens', t.users),
           (19, 'Ingest tokens', t.ingest)
       ) AS m(n, metric, value)
"""),
    org_readers_only=True,
    note="Figures for the whole org within the filter and period; API tokens as they stand "
         "when the report is generated.",
)  # fmt: skip

TYPES: tuple[ReportType, ...] = (
    SYSTEM, ACCOUNT_ACCESS, SAFE_ACCESS, SERVER_ACCESS, SESSION_APPROVALS, SESSION_SHARING,
    SESSION_SUMMARY, SESSIONS_BY_SERVER, USER_ACCESS, USER_ACTIVITY, USER_PRIVILEGE, USER,
)  # fmt: skip
BY_KEY: dict[str, ReportType] = {t.key: t for t in TYPES}
BY_PREDEFINED_ID: dict[int, ReportType] = {t.predefined_id: t for t in TYPES}
# What `POST /api/v2/report` with criteria and no defined_report_id generates.
DEFAULT_ON_DEMAND = SESSION_SUMMARY
