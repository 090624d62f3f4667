"""ListSessions: request → validated ListQuery, and the opaque keyset cursor."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from session_audit.core import validation as v
from session_audit.core.errors import InvalidArgument
from session_audit.core.schema import REVIEW_STATUSES
from session_audit.v1 import sessions_pb2

COUNT_MODES = ("capped", "exact", "none")
# `total` is exact up to this many rows in the default (capped) mode.
COUNT_CAP = 10_000
MAX_JIRA_KEYS = 100


@dataclass(frozen=True)
class Filters:
    user_id: str | None = None
    connection: str | None = None
    connection_type: str | None = None
    approver: str | None = None
    review_status: str | None = None
    correlation_id: str | None = None
    jira_keys: tuple[str, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None

    def fingerprint(self) -> str:
        """Short digest of the filters; a cursor only continues the listing it came from.
        The dataclass repr names every field with its value (str, tuple, datetime, None):
        deterministic, and cheaper than json.dumps(asdict()) on every page."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Cursor:
    start_date: datetime
    id: uuid.UUID


@dataclass(frozen=True)
class ListQuery:
    filters: Filters
    limit: int
    offset: int
    count: str
    cursor: Cursor | None


def encode_cursor(filters: Filters, start_date: datetime, session_id: uuid.UUID) -> str:
    payload = {"t": start_date.isoformat(), "i": str(session_id), "f": filters.fingerprint()}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(filters: Filters, token: str) -> Cursor:
    bad = InvalidArgument("page_token: expected a next_page_token returned by this listing")
    if len(token) > 512:
        raise bad
    # A token is whatever the caller sends: every part is checked for its type and domain.
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        if not isinstance(payload, dict):
            raise bad
        when, sid, fingerprint = payload.get("t"), payload.get("i"), payload.get("f")
        if not (isinstance(when, str) and isinstance(sid, str) and isinstance(fingerprint, str)):
            raise bad
        cursor = Cursor(datetime.fromisoformat(when), uuid.UUID(sid))
    except (ValueError, RecursionError):  # binascii.Error and JSONDecodeError are ValueErrors
        raise bad from None
    if cursor.start_date.tzinfo is None or not v.in_time_domain(cursor.start_date):
        raise bad
    if fingerprint != filters.fingerprint():
        raise InvalidArgument(
            "page_token: was issued for different filters; start again without it"
        )
    return cursor


def parse_list_request(req: sessions_pb2.ListSessionsRequest) -> ListQuery:
    status = None
    if req.review.status:
        status = v.choice("review.status", req.review.status, REVIEW_STATUSES, upper=True)
    approver = v.text("review.approver", req.review.approver.strip(), 320)
    jira = None
    if req.jira_issue_key:
        v.text("jira_issue_key", req.jira_issue_key, 4096)
        keys = tuple(
            sorted({k.strip().lower() for k in req.jira_issue_key.split(",") if k.strip()})
        )
        if not keys:
            raise InvalidArgument("jira_issue_key: expected one or more comma-separated keys")
        if len(keys) > MAX_JIRA_KEYS:
            raise InvalidArgument(f"jira_issue_key: expected at most {MAX_JIRA_KEYS} keys")
        jira = keys
    start = v.rfc3339("start_date", req.start_date)
    end = v.rfc3339("end_date", req.end_date)
    v.ordered("start_date", start, "end_date", end)
    filters = Filters(
        user_id=v.text("user", req.user),
        connection=v.text("connection", req.connection),
        connection_type=v.text("type", req.type),
        approver=approver.lower() if approver else None,
        review_status=status,
        correlation_id=v.text("correlation_id", req.correlation_id),
        jira_keys=jira,
        start=start,
        end=end,
    )
    limit, offset = v.paging(req.HasField("limit"), req.limit, req.HasField("offset"), req.offset)
    count = v.choice("count", req.count, COUNT_MODES) if req.count else "capped"
    cursor = None
    if req.page_token:
        if offset:
            raise InvalidArgument(
                "page_token: cannot be combined with offset; use one or the other"
            )
        cursor = decode_cursor(filters, req.page_token)
    return ListQuery(filters, limit, offset, count, cursor)
