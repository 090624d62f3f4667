"""Aggregation results → the protobuf responses (the document's JSON shapes)."""

from __future__ import annotations

from typing import Any

import orjson

from session_audit.analytics.requests import HistogramQuery, StatsQuery
from session_audit.analytics.store import HistogramResult, ReportResult, StatsResult
from session_audit.analytics.timebins import format_instant
from session_audit.v1 import analytics_pb2 as pb

HISTOGRAM_HREF = "/api/audit/sessions/histogram"
STATS_HREF = "/api/audit/sessions/stats"
PARENT = "/api/audit/sessions"

# A JSON object as built here (str keys; values are text, numbers, lists and objects).
Document = dict[str, Any]


def report_to_proto(result: ReportResult) -> pb.SessionReport:
    reply = pb.SessionReport(
        items=[
            pb.SessionReportItem(
                resource=resource,
                info_type=info_type,
                redact_total=float(redacted),
                transformed_bytes=float(transformed),
            )
            for resource, info_type, redacted, transformed in result.items
        ]
    )
    # Totals are the sums of the items, computed here from the same numbers.
    reply.total_redact_count = float(sum(i[2] for i in result.items))
    reply.total_transformed_bytes = float(sum(i[3] for i in result.items))
    return reply


def histogram_document(hq: HistogramQuery, result: HistogramResult, remaining: float) -> Document:
    """The answer as the JSON form of HistogramResponse (proto field names, fields in number
    order, zero counts present): REST callers get it as is (GetSessionHistogramJson), gRPC
    callers the message built from it, so both carry the same answer. A bucket has `values`
    only when the request has `size` (the histogram document's buckets have no such key)."""
    buckets: list[Document] = []
    for k, (start, (started, active)) in enumerate(zip(hq.bins, result.buckets, strict=True)):
        bucket: Document = {
            "id": format_instant(start, hq.zone),
            "start_count": started,
            "active_count": active,
        }
        if hq.size is not None:
            bucket["values"] = [
                {"value": value, "start_count": series[k][0], "active_count": series[k][1]}
                for value, series in zip(result.top, result.by_value, strict=True)
            ]
        buckets.append(bucket)
    meta: Document = {
        "bin_size": hq.bin_size,
        "field": hq.field,
        "href": HISTOGRAM_HREF,
        "parent": PARENT,
        "remaining_seconds": int(remaining),
        "time_zone": hq.zone_name,
    }
    if hq.size is not None:
        meta["size"] = hq.size
    meta["start"] = format_instant(hq.start, hq.zone)
    meta["end"] = format_instant(hq.end, hq.zone)
    return {"key": "histogram", "body": {"buckets": buckets}, "meta": meta}


def histogram_to_proto(
    hq: HistogramQuery, result: HistogramResult, remaining: float
) -> pb.HistogramResponse:
    return pb.HistogramResponse(**histogram_document(hq, result, remaining))


def histogram_to_json(hq: HistogramQuery, result: HistogramResult, remaining: float) -> bytes:
    return orjson.dumps(histogram_document(hq, result, remaining))


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def stats_to_proto(
    sq: StatsQuery, result: StatsResult, remaining: float
) -> pb.SessionStatsResponse:
    body = pb.SessionStatsBody(total=result.total, other_count=result.other)
    for value, n, subs, sub_other in result.values:
        body.values.add(
            value=value,
            count=n,
            percent=_percent(n, result.total),
            sub_values=[
                pb.SessionStatsSubValue(value=s, count=c, percent=_percent(c, n)) for s, c in subs
            ],
            sub_other_count=sub_other,
        )
    meta = pb.SessionStatsMeta(
        field=sq.field,
        sub_fields=sq.sub_field or "",
        size=sq.size,
        start=format_instant(sq.start, sq.zone),
        end=format_instant(sq.end, sq.zone),
        time_zone=sq.zone_name,
        href=STATS_HREF,
        parent=PARENT,
        remaining_seconds=int(remaining),
    )
    return pb.SessionStatsResponse(key="stats", body=body, meta=meta)
