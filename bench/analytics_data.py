"""Bench data for the aggregations: sessions generated inside PostgreSQL (fast enough for ten
million rows), and the same shape as protobuf messages for the ingest-rate measurement.

Per org: 20 connections (12 database: postgres/mysql/mongodb, 5 custom: ssh/tcp, 3 application:
rdp) and 200 users; sessions uniformly over `days` days up to `t_end`; exec sessions last ~10
minutes and connect sessions ~1 hour (exponential); half of those started in the last 6 hours
are still open; 35% carry a review status; ended database sessions redact 0-3 of 6 info types,
and `metrics.data_masking` says the same as `redactions` (the reference gateway's report reads
the former). The role is the connection's name; database sessions name a resource (`db-00` to
`db-05`, two connections each), the others none (data sets loaded before that have none).
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

from session_audit.v1 import sessions_pb2 as pb

CONNECTIONS = 20
USERS = 200
INFO_TYPES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD_NUMBER", "PERSON_NAME",
              "US_SOCIAL_SECURITY_NUMBER", "IBAN_CODE")  # fmt: skip
REVIEW_STATUSES = ("PENDING", "APPROVED", "REJECTED", "REVOKED", "PROCESSING", "EXECUTED",
                   "UNKNOWN")  # fmt: skip


def connection(i: int) -> tuple[str, str, str]:
    """(name, type, subtype) of connection i."""
    if i < 12:
        subtype = ("postgres", "mysql", "mongodb")[i % 3]
        return f"{subtype}-{i:02d}", "database", subtype
    if i < 17:
        subtype = "ssh" if i < 15 else "tcp"
        return f"{subtype}-{i:02d}", "custom", subtype
    return f"rdp-{i:02d}", "application", "rdp"


def resource(connection_name: str) -> str:
    """The resource of a database connection (two connections each)."""
    return f"db-{int(connection_name[-2:]) // 2:02d}"


_CONN_VALUES = ", ".join(
    f"({i}, '{name}', '{kind}', '{sub}')"
    for i, (name, kind, sub) in ((i, connection(i)) for i in range(CONNECTIONS))
)
_INFO_ARRAY = "ARRAY[" + ", ".join(f"'{t}'" for t in INFO_TYPES) + "]"
_REVIEW_ARRAY = "ARRAY[" + ", ".join(f"'{t}'" for t in REVIEW_STATUSES) + "]"

# $1 org id, $2 org number, $3 how many, $4 t_end, $5 span in seconds
GENERATE = f"""
INSERT INTO sessions (id, org_id, start_date, end_date, status, verb, user_id, user_email,
                      user_name, connection, connection_type, connection_subtype, role_name,
                      resource_name, identity_type, exit_code, event_size, script_size, review_status,
                      redactions, connection_tags, metrics)
SELECT gen_random_uuid(), $1, x.st, e.en, CASE WHEN e.en IS NULL THEN 'open' ELSE 'done' END,
       v.verb, 'sub-' || x.u, format('user-%s@org%s.example', lpad(x.u::text, 3, '0'), $2::int),
       'user ' || x.u, c.name, c.kind, c.sub, c.name,
       CASE WHEN c.kind = 'database' THEN 'db-' || lpad((c.i / 2)::text, 2, '0') END, 'user',
       CASE WHEN e.en IS NULL THEN NULL WHEN x.r4 < 0.9 THEN 0 ELSE 1 END,
       x.ev, 0, CASE WHEN x.r3 < 0.35 THEN ({_REVIEW_ARRAY})[1 + (x.r3 * 1000)::int % 7] END,
       rd.reds, jsonb_build_object('team', c.kind), m.metrics
  FROM (SELECT g,
               $4::timestamptz - random() * $5::float8 * interval '1 second' AS st,
               (random() * {CONNECTIONS - 1})::int AS c, (random() * {USERS - 1})::int AS u,
               random() AS r1, random() AS r2, random() AS r3, random() AS r4,
               (200 + random() * 200000)::bigint AS ev
          FROM generate_series(1, $3::int) g) x
  JOIN (VALUES {_CONN_VALUES}) c(i, name, kind, sub) ON c.i = x.c
 CROSS JOIN LATERAL (SELECT CASE WHEN c.kind = 'database' AND x.r1 < 0.6 THEN 'exec'
                                 ELSE 'connect' END AS verb) v
 CROSS JOIN LATERAL (SELECT CASE
          WHEN x.st > $4::timestamptz - interval '6 hours' AND x.r2 < 0.5 THEN NULL
          ELSE least($4::timestamptz, x.st + interval '5 seconds'
               + (-ln(1 - x.r2 * 0.999999) * CASE v.verb WHEN 'exec' THEN 600 ELSE 3600 END)
                 * interval '1 second') END AS en) e
 CROSS JOIN LATERAL (
        SELECT CASE WHEN c.kind = 'database' AND e.en IS NOT NULL THEN (
            SELECT jsonb_agg(jsonb_build_object('info_type', t.it, 'count', t.n,
                                                'transformed_bytes', t.n * (8 + t.w)))
              FROM (SELECT it, 1 + (random() * 39)::int AS n, (random() * 32)::int AS w
                      FROM unnest({_INFO_ARRAY}) it
                     WHERE random() < 0.25 + 0 * x.g
                     LIMIT 3) t) END AS reds) rd
 CROSS JOIN LATERAL (
        SELECT CASE WHEN rd.reds IS NULL THEN jsonb_build_object('event_size', x.ev)
               ELSE jsonb_build_object('event_size', x.ev, 'data_masking', jsonb_build_object(
                   'info_types', (SELECT jsonb_object_agg(r ->> 'info_type', (r ->> 'count')::int)
                                    FROM jsonb_array_elements(rd.reds) r),
                   'transformed_bytes', (SELECT sum((r ->> 'transformed_bytes')::int)
                                           FROM jsonb_array_elements(rd.reds) r),
                   'total_redact_count', (SELECT sum((r ->> 'count')::int)
                                            FROM jsonb_array_elements(rd.reds) r)))
               END AS metrics) m
"""


def sessions(
    rng: random.Random, org_no: int, n: int, start: datetime, per_hour: float
) -> Iterator[pb.Session]:
    """`n` sessions of the same shape in start order from `start`, `per_hour` per hour: what
    a gateway reports live (the ingest-rate measurement)."""
    t = start
    for _ in range(n):
        t += timedelta(seconds=rng.expovariate(per_hour / 3600))
        name, kind, sub = connection(rng.randrange(CONNECTIONS))
        u = rng.randrange(USERS)
        verb = "exec" if kind == "database" and rng.random() < 0.6 else "connect"
        s = pb.Session(
            id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            connection=name, type=kind, connection_subtype=sub, role_name=name,
            user=f"user-{u:03d}@org{org_no}.example", user_id=f"sub-{u}", user_name=f"user {u}",
            verb=pb.SessionVerb.Value.Value(verb),
            identity_type=pb.IdentityType.Value.Value("user"),
            event_size=float(rng.randint(200, 200_200)),
        )  # fmt: skip
        if kind == "database":
            s.resource_name = resource(name)
        s.connection_tags["team"] = kind
        s.start_date.FromDatetime(t)
        mean = 600 if verb == "exec" else 3600
        s.end_date.FromDatetime(t + timedelta(seconds=5 - mean * math.log(1 - rng.random())))
        s.exit_code = 0 if rng.random() < 0.9 else 1
        if rng.random() < 0.35:
            s.review.status = pb.ReviewStatus.Value.Value(rng.choice(REVIEW_STATUSES))
        if kind == "database":
            info: dict[str, int] = {}
            for it in INFO_TYPES:
                if rng.random() < 0.25 and len(info) < 3:
                    count = rng.randint(1, 40)
                    s.redactions.add(info_type=it, count=count,
                                     transformed_bytes=float(count * rng.randint(8, 40)))  # fmt: skip
                    info[it] = count
            if info:
                s.metrics.update({"data_masking": {
                    "info_types": info, "total_redact_count": sum(info.values()),
                    "transformed_bytes": sum(r.transformed_bytes for r in s.redactions)}})  # fmt: skip
        yield s
