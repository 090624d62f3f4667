"""Plain-Python answers of the report, the histogram and the statistics over the same sessions
the service stores, written from docs/analytics.md's definitions without any of the service's code
(no pieces, no counters, no SQL): loop over the sessions and count."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime

from tests.factories import Spec

Pred = Callable[[Spec], bool]


def field_value(s: Spec, field: str) -> str:
    return {
        "protocol": s.subtype,
        "connection": s.connection,
        "connection_type": s.type,
        "user": s.email.lower(),
        "verb": s.verb,
        "status": "open" if s.end is None else "done",
        "review_status": s.review_status or "",
    }[field]


def visible(specs: list[Spec], viewer: str | None) -> list[Spec]:
    """What a token sees: everything of its org, or a user's own sessions."""
    return [s for s in specs if viewer is None or s.email.lower() == viewer.lower()]


def report(
    specs: list[Spec],
    start: datetime,
    end: datetime,
    group_by: str = "connection",
    *,
    connection: str | None = None,
    user_email: str | None = None,
    verb: str | None = None,
    session_id: str | None = None,
) -> list[tuple[str, str, int, int]]:
    """Sessions that ENDED in [start, end); per (resource, info type) the sums."""
    sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for s in specs:
        if s.end is None or not start <= s.end < end:
            continue
        if connection is not None and s.connection != connection:
            continue
        if user_email is not None and s.email.lower() != user_email.lower():
            continue
        if verb is not None and s.verb != verb:
            continue
        if session_id is not None and uuid.UUID(s.id) != uuid.UUID(session_id):
            continue
        resource = {
            "connection": s.connection,
            "connection_type": s.type,
            "id": str(uuid.UUID(s.id)),
            "user_email": s.email.lower(),
        }[group_by]
        for info, count, size in s.redactions:
            acc = sums[(resource, info.upper())]
            acc[0] += count
            acc[1] += size
    return [(r, i, a[0], a[1]) for (r, i), a in sorted(sums.items())]


def rank(counts: dict[str, int], size: int) -> list[str]:
    present = [v for v, n in counts.items() if v and n]
    present.sort(key=lambda v: (-counts[v], v))
    return present[:size]


def histogram(
    specs: list[Spec],
    bin_starts: list[datetime],
    start: datetime,
    end: datetime,
    field: str,
    size: int | None,
    pred: Pred,
) -> tuple[list[tuple[int, int]], list[str], list[list[tuple[int, int]]]]:
    """(buckets, top values, per-value buckets). A bin covers [its start, next start) clipped
    to [start, end); start_count = started in it; active_count = started before its end and
    not ended before its start."""
    chosen = [s for s in specs if pred(s)]
    top: list[str] = []
    if size is not None:
        counts: dict[str, int] = defaultdict(int)
        for s in chosen:
            if start <= s.start < end:
                counts[field_value(s, field)] += 1
        top = rank(counts, size)
        chosen = [s for s in chosen if field_value(s, field) in top]
    edges = [*bin_starts[1:], end]
    bins = [(max(b, start), min(e, end)) for b, e in zip(bin_starts, edges, strict=True)]

    def series(group: list[Spec]) -> list[tuple[int, int]]:
        out = []
        for lo, hi in bins:
            started = sum(1 for s in group if lo <= s.start < hi)
            active = sum(1 for s in group if s.start < hi and (s.end is None or s.end >= lo))
            out.append((started, active))
        return out

    by_value = [series([s for s in chosen if field_value(s, field) == v]) for v in top]
    return series(chosen), top, by_value


def stats(
    specs: list[Spec],
    start: datetime,
    end: datetime,
    field: str,
    sub_field: str | None,
    size: int,
    pred: Pred,
) -> tuple[int, list[tuple[str, int, list[tuple[str, int]], int]], int]:
    """(total, [(value, count, [(sub value, count)], sub other)], other) over the sessions
    that started in [start, end)."""
    chosen = [s for s in specs if pred(s) and start <= s.start < end]
    counts: dict[str, int] = defaultdict(int)
    for s in chosen:
        counts[field_value(s, field)] += 1
    values = []
    for v in rank(counts, size):
        subs: list[tuple[str, int]] = []
        sub_other = 0
        if sub_field is not None:
            split: dict[str, int] = defaultdict(int)
            for s in chosen:
                if field_value(s, field) == v:
                    split[field_value(s, sub_field)] += 1
            subs = [(x, split[x]) for x in rank(split, size)]
            sub_other = counts[v] - sum(n for _, n in subs)
        values.append((v, counts[v], subs, sub_other))
    return len(chosen), values, len(chosen) - sum(n for _, n, _, _ in values)
