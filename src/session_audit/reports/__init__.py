"""Reports API v2 (seed 002): definitions, on-demand and scheduled reports, downloads.

requests -> store, composed by service; filters is the query_filter language, types the twelve
predefined report queries, generate/render/pdf produce downloads, scheduler/periods turn
subscriptions into reports."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from session_audit.core.db import Conn
from session_audit.core.sql import Where

# -- the public face other domains may use (retention: legal holds, the report purge) ---------


def session_filter(where: Where, text: str, param: str = "query_filter") -> Where:
    """AND a filter in the Reports API language (over sessions aliased `s`) into `where`.
    Raises InvalidArgument (naming `param`) when it does not parse."""
    from session_audit.reports import filters

    return filters.apply_filter(where, filters.parse_filter(text, param))


def canonical_filter(text: str, param: str = "query_filter") -> str:
    """The filter's canonical text (validated; round-trips through `session_filter`)."""
    from session_audit.reports import filters

    return filters.render_filter(filters.parse_filter(text, param))


PURGE_REPORTS = """
SELECT id FROM reports
 WHERE org_id = $1 AND status <> 'pending' AND coalesce(generated_at, created_at) < $2
   AND NOT (id = any($3::bigint[]))
 ORDER BY id
 LIMIT $4
   FOR UPDATE SKIP LOCKED
"""


async def purge_reports(
    conn: Conn,
    org_id: uuid.UUID,
    before: datetime,
    keep: Sequence[int],
    limit: int,
    timeout: float,
) -> int:
    """Delete up to `limit` generated reports of the org made before `before` (with their
    rows), except those in `keep`; call in a transaction. Returns how many went."""
    ids = [
        r["id"]
        for r in await conn.fetch(PURGE_REPORTS, org_id, before, list(keep), limit, timeout=timeout)
    ]
    if ids:
        await conn.execute(
            "DELETE FROM report_rows WHERE org_id = $1 AND report_id = any($2::bigint[])",
            org_id,
            ids,
            timeout=timeout,
        )
        await conn.execute(
            "DELETE FROM report_attempts WHERE org_id = $1 AND report_id = any($2::bigint[])",
            org_id,
            ids,
            timeout=timeout,
        )
        await conn.execute(
            "DELETE FROM reports WHERE org_id = $1 AND id = any($2::bigint[])",
            org_id,
            ids,
            timeout=timeout,
        )
    return len(ids)
