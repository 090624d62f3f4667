"""Demo data: several orgs, users and connections; sessions over the last 90 days."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from tqdm import tqdm

from session_audit.core import auth
from session_audit.core.schema import REVIEW_STATUSES
from session_audit.sessions.ingest import IngestBatch, IngestResult
from session_audit.v1 import sessions_pb2 as pb

ORGS = ("acme", "globex", "initech")
FIRST = ("ana", "bruno", "chen", "dara", "eli", "fatima", "gus", "hana", "ivan", "jo")
LAST = ("silva", "okafor", "li", "novak", "haddad", "smith", "tanaka", "garcia")


@dataclass(frozen=True)
class Connection:
    name: str
    type: str
    subtype: str
    tags: dict[str, str]


CONNECTIONS = (
    Connection("pg-prod", "database", "postgres", {"env": "prod", "team": "payments"}),
    Connection("pg-staging", "database", "postgres", {"env": "staging", "team": "payments"}),
    Connection("mysql-crm", "database", "mysql", {"env": "prod", "team": "sales"}),
    Connection("mongo-events", "database", "mongodb", {"env": "prod", "team": "data"}),
    Connection("bastion-ssh", "custom", "ssh", {"env": "prod", "team": "sre"}),
    Connection("win-jump", "application", "rdp", {"env": "prod", "team": "it"}),
    Connection("k8s-admin", "custom", "tcp", {"env": "prod", "team": "platform"}),
)
INFO_TYPES = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD_NUMBER",
    "PERSON_NAME",
    "US_SOCIAL_SECURITY_NUMBER",
    "IBAN_CODE",
)
SCRIPTS = (
    "SELECT id, email FROM customers ORDER BY created_at DESC LIMIT 50",
    "UPDATE invoices SET status = 'void' WHERE id = 4411",
    "SELECT count(*) FROM orders WHERE created_at > now() - interval '1 day'",
    "db.events.find({type: 'login'}).limit(20)",
    "kubectl get pods -n payments",
)


def _users(rng: random.Random, org: str, n: int) -> list[tuple[str, str, str]]:
    out = []
    for i in range(n):
        first, last = FIRST[i % len(FIRST)], rng.choice(LAST)
        out.append((f"sub-{org}-{i:03d}", f"{first}.{last}@{org}.example", f"{first} {last}"))
    return out


def demo_sessions(
    rng: random.Random, org: str, n: int, now: datetime, days: int = 90
) -> Iterator[pb.Session]:
    """`n` plausible sessions of one org, spread over the last `days` days."""
    users = _users(rng, org, 8)
    span = days * 86400
    for i in range(n):
        conn = rng.choice(CONNECTIONS)
        user_id, email, name = rng.choice(users)
        start = now - timedelta(seconds=rng.uniform(60, span))
        verb = "exec" if conn.type == "database" and rng.random() < 0.6 else "connect"
        s = pb.Session(
            id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            connection=conn.name,
            connection_subtype=conn.subtype,
            type=conn.type,
            role_name=conn.name,
            user=email,
            user_id=user_id,
            user_name=name,
            verb=pb.SessionVerb.Value.Value(verb),
            identity_type=pb.IdentityType.Value.Value("user"),
        )
        s.connection_tags.update(conn.tags)
        s.start_date.FromDatetime(start)
        # A few recent sessions are still open.
        if not (start > now - timedelta(hours=6) and rng.random() < 0.5):
            duration = rng.expovariate(1 / (600 if verb == "exec" else 3600))
            s.end_date.FromDatetime(min(now, start + timedelta(seconds=5 + duration)))
            s.exit_code = 0 if rng.random() < 0.9 else rng.choice((1, 2, 127))
        if verb == "exec":
            s.script.data = rng.choice(SCRIPTS)
        s.event_size = float(rng.randint(200, 200_000))
        if rng.random() < 0.3:
            s.correlation_id = f"task-{rng.randint(1000, 1200)}"
        if rng.random() < 0.2:
            s.integrations_metadata.update({"jira_issue_key": f"SEC-{rng.randint(1, 60)}"})
        if rng.random() < 0.35:
            status = REVIEW_STATUSES[i % len(REVIEW_STATUSES)]
            approver = rng.choice(users)
            s.review.id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            s.review.status = pb.ReviewStatus.Value.Value(status)
            s.review.type = pb.ReviewType.Value.Value(rng.choice(("onetime", "jit")))
            s.review.min_approvals = 1
            s.review.created_at.FromDatetime(start - timedelta(minutes=5))
            if status != "PENDING":
                group = s.review.review_groups_data.add(group="sre", id=str(uuid.uuid4()))
                group.reviewed_by.email = approver[1]
                group.reviewed_by.name = approver[2]
                group.reviewed_by.id = approver[0]
                group.status = pb.ReviewRequestStatus.Value.Value(
                    "REJECTED" if status == "REJECTED" else "APPROVED"
                )
                group.review_date.FromDatetime(start - timedelta(minutes=1))
        if conn.type == "database" and s.HasField("end_date"):
            total_bytes = 0
            info_types: dict[str, int] = {}
            for info in rng.sample(INFO_TYPES, rng.randint(0, 3)):
                count = rng.randint(1, 40)
                size = count * rng.randint(8, 40)
                s.redactions.add(info_type=info, count=count, transformed_bytes=float(size))
                info_types[info] = count
                total_bytes += size
            s.metrics.update(
                {
                    "data_masking": {
                        "info_types": info_types,
                        "transformed_bytes": total_bytes,
                        "total_redact_count": sum(info_types.values()),
                    },
                    "event_size": s.event_size,
                }
            )
        yield s


async def is_empty(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM sessions)")


# The org `run` prints a token for: the demo org when it has sessions, else the first org that
# has any (a database loaded by other means), else the demo org. One index probe per org.
SHOWCASE_ORG = """
SELECT o.name
  FROM orgs o
 WHERE EXISTS (SELECT 1 FROM sessions s WHERE s.org_id = o.id)
 ORDER BY o.name = $1 DESC, o.name
 LIMIT 1
"""


async def showcase_org(conn: asyncpg.Connection) -> str:
    name: str | None = await conn.fetchval(SHOWCASE_ORG, ORGS[0])
    return name or ORGS[0]


async def seed(
    conn: asyncpg.Connection, sessions: int, *, seed_value: int = 7, progress: bool = True
) -> IngestResult:
    """Load `sessions` demo sessions spread over ORGS through the ingest path."""
    rng = random.Random(seed_value)
    now = datetime.now(UTC)
    total = IngestResult()
    per_org = [sessions // len(ORGS) + (1 if i < sessions % len(ORGS) else 0) for i in range(3)]
    with tqdm(total=sessions, unit="session", disable=not progress, desc="seed") as bar:
        for org, n in zip(ORGS, per_org, strict=True):
            org_id = await auth.ensure_org(conn, org)
            async with conn.transaction():
                async with IngestBatch(conn, org_id, timeout=600) as batch:
                    for s in demo_sessions(rng, org, n, now):
                        await batch.add(s)
                        bar.update()
                    result = await batch.finish()
            total.accepted += result.accepted
            total.written += result.written
            total.rejected += result.rejected
            total.rejections += result.rejections
    return total
