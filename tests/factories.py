"""Hand-built sessions for tests, and a plain-Python reference of the list semantics."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from session_audit.analytics import requests
from session_audit.analytics.q import parse_q
from session_audit.analytics.timebins import bin_starts
from session_audit.core.validation import parse_zone
from session_audit.sessions.ingest import IngestBatch
from session_audit.v1 import sessions_pb2 as pb

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class Spec:
    """What a test session is, in plain Python; `to_proto` makes the message to ingest."""

    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    start: datetime = T0
    end: datetime | None = None
    user_id: str = "sub-1"
    email: str = "ana@example.com"
    connection: str = "pg-prod"
    type: str = "database"
    subtype: str = "postgres"
    verb: str = "exec"
    review_status: str | None = None
    approvers: tuple[str, ...] = ()
    correlation_id: str | None = None
    jira: str | None = None
    script: str | None = None
    redactions: tuple[tuple[str, int, int], ...] = ()
    # Sent once the session has ended (open sessions carry no exit code).
    exit_code: int = 0
    # role_name (None: the connection's name, as the gateway names roles) and resource_name
    # (None: not sent, stored NULL).
    role: str | None = None
    resource: str | None = None

    @property
    def role_name(self) -> str:
        return self.connection if self.role is None else self.role

    def to_proto(self) -> pb.Session:
        s = pb.Session(
            id=self.id,
            user_id=self.user_id,
            user=self.email,
            user_name=self.email.split("@")[0],
            connection=self.connection,
            type=self.type,
            connection_subtype=self.subtype,
            role_name=self.role_name,
            verb=pb.SessionVerb.Value.Value(self.verb),
        )
        if self.resource is not None:
            s.resource_name = self.resource
        s.start_date.FromDatetime(self.start)
        if self.end is not None:
            s.end_date.FromDatetime(self.end)
            s.exit_code = self.exit_code
        if self.review_status is not None:
            s.review.status = pb.ReviewStatus.Value.Value(self.review_status)
            for email in self.approvers:
                g = s.review.review_groups_data.add(group="sre")
                g.reviewed_by.email = email
        if self.correlation_id is not None:
            s.correlation_id = self.correlation_id
        if self.jira is not None:
            s.integrations_metadata.update({"jira_issue_key": self.jira})
        if self.script is not None:
            s.script.data = self.script
        for info, count, size in self.redactions:
            s.redactions.add(info_type=info, count=count, transformed_bytes=float(size))
        return s


def reference_list(specs: list[Spec], params: dict[str, Any]) -> list[str]:
    """The ids ListSessions should return for `params`, newest first, written independently
    of the service: exact matches, jira keys case-insensitive and comma-separated, approver
    e-mail case-insensitive, review status case-insensitive, both dates inclusive."""

    def keep(s: Spec) -> bool:
        if "user" in params and s.user_id != params["user"]:
            return False
        if "connection" in params and s.connection != params["connection"]:
            return False
        if "type" in params and s.type != params["type"]:
            return False
        if "correlation_id" in params and s.correlation_id != params["correlation_id"]:
            return False
        if "review.status" in params and (
            s.review_status is None or s.review_status != params["review.status"].upper()
        ):
            return False
        if "review.approver" in params and params["review.approver"].lower() not in {
            a.lower() for a in s.approvers
        }:
            return False
        if "jira_issue_key" in params:
            keys = {k.strip().lower() for k in params["jira_issue_key"].split(",") if k.strip()}
            if s.jira is None or s.jira.lower() not in keys:
                return False
        if "start_date" in params and s.start < datetime.fromisoformat(params["start_date"]):
            return False
        return not ("end_date" in params and s.start > datetime.fromisoformat(params["end_date"]))

    kept = [s for s in specs if keep(s)]
    kept.sort(key=lambda s: (s.start, uuid.UUID(s.id)), reverse=True)
    return [s.id for s in kept]


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


async def ingest_specs(conn: Any, org: uuid.UUID, specs: list[Spec]) -> None:
    """Ingest `specs` into `org` through the write path (IngestBatch), in one transaction; none
    may be rejected."""
    async with conn.transaction():
        async with IngestBatch(conn, org, 60) as b:
            for s in specs:
                await b.add(s.to_proto())
            result = await b.finish()
    assert result.rejected == 0, result.rejections


def histogram_query(
    q: str | None, zone_name: str, start: datetime, days: int, bins: str = "day"
) -> requests.HistogramQuery:
    """A histogram of `protocol` over `days` from `start` (a naive start is read in the zone),
    as the service parses one."""
    _, zone = parse_zone(zone_name)
    start = start.replace(tzinfo=zone) if start.tzinfo is None else start
    end = start + timedelta(days=days)
    edges = tuple(bin_starts(start, end, bins, zone, 1000))
    query = parse_q(q, zone) if q else None
    return requests.HistogramQuery(
        "protocol", bins, start, end, zone_name, zone, None, query, edges
    )
