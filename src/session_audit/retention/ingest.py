"""The ingest hook: the one call sessions.ingest makes in each batch's transaction, last."""

from __future__ import annotations

import uuid

from session_audit.core import trail
from session_audit.core.db import Conn
from session_audit.retention import store


async def on_ingest(
    conn: Conn,
    org_id: uuid.UUID,
    actor: str,
    ids: list[uuid.UUID],
    timeout: float,
    labelled: list[uuid.UUID] | None = None,
) -> None:
    """Lock what the gateway labelled or an active hold matches, then append the batch's
    trail entry (one per batch: the org's chain head is taken once, here, until commit).
    `labelled`: see store.lock_arrived (None: any of `ids` may be labelled)."""
    if not ids:
        return
    # A transaction id on this server before the active holds are read: a hold made meanwhile
    # waits for this transaction before its first window (store._settled). PostgreSQL gave
    # one at the first write already; a Citus coordinator gives none for router writes.
    await conn.execute(store.TAKE_XID, timeout=timeout)
    await store.lock_arrived(conn, org_id, actor, ids, timeout, labelled)
    await trail.record_sessions(conn, org_id, actor, "ingest", ids, timeout)
