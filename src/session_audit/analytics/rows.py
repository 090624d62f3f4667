"""Aggregation results → the protobuf responses (the document's JSON shapes)."""

from __future__ import annotations

from session_audit.analytics.requests import HistogramQuery, StatsQuery
from session_audit.analytics.store import HistogramResult, ReportResult, StatsResult
from session_audit.analytics.timebins import format_instant
from session_audit.v1 import analytics_pb2 as pb

HISTOGRAM_HREF = "/api/audit/sessions/histogram"
STATS_HREF = "/api/audit/sessions/stats"
PARENT = "/api/audit/sessions"


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


def histogram_to_proto(
    hq: HistogramQuery, result: HistogramResult, remaining: float
) -> pb.HistogramResponse:
    buckets = []
    for k, (start, (started, active)) in enumerate(zip(hq.bins, result.buckets, strict=True)):
        bucket = pb.HistogramBucket(
            id=format_instant(start, hq.zone), start_count=started, active_count=active
        )
        for value, series in zip(result.top, result.by_value, strict=True):
            bucket.values.add(value=value, start_count=series[k][0], active_count=series[k][1])
        buckets.append(bucket)
    meta = pb.HistogramMeta(
        bin_size=hq.bin_size,
        field=hq.field,
        href=HISTOGRAM_HREF,
        parent=PARENT,
        remaining_seconds=int(remaining),
        time_zone=hq.zone_name,
        start=format_instant(hq.start, hq.zone),
        end=format_instant(hq.end, hq.zone),
    )
    if hq.size is not None:
        meta.size = hq.size
    return pb.HistogramResponse(key="histogram", body=pb.HistogramBody(buckets=buckets), meta=meta)


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
