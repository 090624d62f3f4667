"""Bearer tokens: creation, hashing, lookup, and the caller's row scope.

Tokens are `sat_` + 43 url-safe characters (256 random bits). Only their SHA-256 is stored.
Each token belongs to one org and carries one role:

    admin    read the whole org, write sessions, manage everything
    auditor  read the whole org
    user     read only their own sessions (matched by e-mail, case-insensitively)
    ingest   write sessions; read nothing
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import grpc

from session_audit.core import logs, metrics
from session_audit.core.errors import PermissionDenied, Unauthenticated
from session_audit.core.sql import Where

ROLES = ("admin", "auditor", "user", "ingest")
READERS = frozenset({"admin", "auditor", "user"})
ORG_READERS = frozenset({"admin", "auditor"})
WRITERS = frozenset({"admin", "ingest"})
TOKEN_PREFIX = "sat_"

LOOKUP = """
SELECT t.id, t.org_id, t.role, t.email
  FROM api_tokens t
 WHERE t.token_hash = $1
   AND t.revoked_at IS NULL
"""
INSERT_ORG = """
INSERT INTO orgs (id, name) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
RETURNING id
"""
# Every org has its own copy of the predefined definitions (ids 5-16, owner NULL), so that
# definitions are always read within one org (migration 0030, docs/scaling.md).
INSERT_PREDEFINED = """
INSERT INTO defined_reports (org_id, id, title, type, created_at, modified_at)
SELECT $1, p.id, p.title, p.type, p.created_at, p.modified_at FROM predefined_reports p
ON CONFLICT (org_id, id) DO NOTHING
"""
INSERT_TOKEN = """
INSERT INTO api_tokens (org_id, token_hash, prefix, role, email)
VALUES ($1, $2, $3, $4, $5)
RETURNING id
"""
LIST_TOKENS = """
SELECT t.id, o.name AS org, t.prefix, t.role, t.email, t.created_at, t.revoked_at
  FROM api_tokens t
  JOIN orgs o ON o.id = t.org_id
 ORDER BY t.id
"""
# Token changes are audited by a trigger (migration 0020); this names who made them.
SET_ACTOR = "SELECT set_config('session_audit.actor', $1, true)"
CLI_ACTOR = "session-audit cli"
REVOKE_TOKEN = """
UPDATE api_tokens SET revoked_at = now()
 WHERE (id::text = $1 OR prefix = $1) AND revoked_at IS NULL
RETURNING id
"""


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    token_id: int
    org_id: uuid.UUID
    role: str
    email: str

    def scope(self, where: Where, alias: str = "") -> Where:
        """Restrict `where` to the rows this caller may read."""
        col = f"{alias}." if alias else ""
        where.add(f"{col}org_id = $org", org=self.org_id)
        if self.role not in ORG_READERS:
            where.add(f"lower({col}user_email) = $email", email=self.email.lower())
        return where

    def require(self, roles: Collection[str], action: str) -> None:
        if self.role not in roles:
            allowed = ", ".join(sorted(roles))
            raise PermissionDenied(f"role '{self.role}' may not {action} (needs {allowed})")


def bearer(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization: expected 'Bearer <token>'")
            return token.strip()
    raise Unauthenticated("authorization: missing; send 'authorization: Bearer <token>'")


CHANNEL = "session_audit_tokens"
# application_name of the listening connection (operators and tests can find it).
LISTENER_NAME = "session-audit token listener"


class TokenCache:
    """Recent successful token lookups, so a request costs one query instead of two.

    Safe only while we hear about every change: a trigger NOTIFYs on any write to api_tokens
    and `clear()` runs on each notification; while the listening connection is down the
    cache is disabled. A lookup that raced with a change (the generation moved while it ran)
    is not cached. Entries also expire after `ttl` seconds.
    """

    def __init__(self, ttl: float = 30.0, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        self.enabled = False
        self.generation = 0
        self._entries: dict[bytes, tuple[float, Principal]] = {}

    def get(self, key: bytes) -> Principal | None:
        if not self.enabled:
            return None
        hit = self._entries.get(key)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, key: bytes, principal: Principal, generation: int) -> None:
        if not self.enabled or generation != self.generation:
            return
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl, principal)

    def clear(self, *_: object) -> None:
        self.generation += 1
        self._entries.clear()

    def disable(self, *_: object) -> None:
        self.enabled = False
        self.clear()

    async def listen(self, dsn: str) -> asyncpg.Connection:
        """Open the listening connection; the cache works while it lives."""
        conn: asyncpg.Connection = await asyncpg.connect(
            dsn, server_settings={"application_name": LISTENER_NAME}
        )
        await conn.add_listener(CHANNEL, self.clear)
        conn.add_termination_listener(self.disable)
        self.clear()
        self.enabled = True
        return conn


async def authenticate(
    pool: asyncpg.Pool,
    context: grpc.aio.ServicerContext,
    roles: Collection[str],
    action: str,
    timeout: float | None = None,
    cache: TokenCache | None = None,
) -> Principal:
    key = hash_token(bearer(context))
    principal = cache.get(key) if cache is not None else None
    if cache is not None:
        (metrics.TOKEN_CACHE_MISSES if principal is None else metrics.TOKEN_CACHE_HITS).inc()
    if principal is None:
        generation = cache.generation if cache is not None else 0
        row = await pool.fetchrow(LOOKUP, key, timeout=timeout)
        if row is None:
            raise Unauthenticated("authorization: unknown or revoked token")
        principal = Principal(row["id"], row["org_id"], row["role"], row["email"])
        if cache is not None:
            cache.put(key, principal, generation)
    logs.note_caller(principal.org_id, principal.role)
    principal.require(roles, action)
    return principal


async def ensure_org(conn: asyncpg.Connection, name: str) -> uuid.UUID:
    """The org's id, creating it (with its copy of the predefined report definitions) when
    it is new."""
    async with conn.transaction():
        org_id: uuid.UUID = await conn.fetchval(INSERT_ORG, uuid.uuid4(), name)
        await conn.execute(INSERT_PREDEFINED, org_id)
    return org_id


class UnknownOrg(ValueError):
    """`create_token(..., create_org=False)` for an org name that does not exist."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"org: no org named {name!r}")
        self.name = name
        self.known = known


async def create_token(
    conn: asyncpg.Connection, org: str, role: str, email: str, *, create_org: bool = True
) -> str:
    """A new token for `email` in `org`. With `create_org=False` an org that does not exist
    is refused (UnknownOrg, listing the orgs that do) instead of created: a typo in an org
    name must not give someone a token for a new, empty org."""
    if role not in ROLES:
        raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    if not org.strip():
        raise ValueError("org: expected a non-empty org name")
    if "@" not in email:
        raise ValueError(f"email: expected an e-mail address, got {email!r}")
    token = new_token()
    async with conn.transaction():
        await conn.execute(SET_ACTOR, CLI_ACTOR)
        if create_org:
            org_id = await ensure_org(conn, org.strip())
        else:
            org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org.strip())
            if org_id is None:
                names = await conn.fetch("SELECT name FROM orgs ORDER BY name")
                raise UnknownOrg(org.strip(), [r["name"] for r in names])
        prefix = token[: len(TOKEN_PREFIX) + 6]
        await conn.execute(INSERT_TOKEN, org_id, hash_token(token), prefix, role, email.strip())
    return token


@dataclass(frozen=True)
class TokenInfo:
    id: int
    org: str
    prefix: str
    role: str
    email: str
    created_at: datetime
    revoked_at: datetime | None


async def list_tokens(conn: asyncpg.Connection) -> list[TokenInfo]:
    return [TokenInfo(**dict(r)) for r in await conn.fetch(LIST_TOKENS)]


async def revoke_token(conn: asyncpg.Connection, ident: str) -> int:
    """Revoke by numeric id or by the printed prefix. Returns how many were revoked."""
    async with conn.transaction():
        await conn.execute(SET_ACTOR, CLI_ACTOR)
        return len(await conn.fetch(REVOKE_TOKEN, ident))
