"""Aggregation results → the protobuf responses (the document's JSON shapes)."""

from __future__ import annotations

import math
import re
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
    redacted, transformed = _report_totals(result)
    reply.total_redact_count = redacted
    reply.total_transformed_bytes = transformed
    return reply


def _report_totals(result: ReportResult) -> tuple[float, float]:
    """Totals are the sums of the items, computed here from the same numbers."""
    return float(sum(i[2] for i in result.items)), float(sum(i[3] for i in result.items))


def report_to_json(result: ReportResult) -> bytes:
    """report_to_proto's message as the transcoder prints it (GetSessionReportJson): proto
    field names in field-number order, every field present, doubles and strings as
    protobuf's JSON writer prints them."""
    redacted, transformed = _report_totals(result)
    return proto_json({
        "items": [
            {"info_type": info_type, "redact_total": proto_double(float(r)), "resource": resource,
             "transformed_bytes": proto_double(float(b))}
            for resource, info_type, r, b in result.items
        ],
        "total_redact_count": proto_double(redacted),
        "total_transformed_bytes": proto_double(transformed),
    })  # fmt: skip


def proto_double(x: float) -> int | orjson.Fragment:
    """A double as protobuf's JSON writer prints it (io::SimpleDtoa: `%.15g`, or `%.17g` when
    that does not read back as x; non-finite values as quoted names). Whole numbers under
    10^15 print as their digits, the same text as the int, which orjson writes fastest."""
    if x.is_integer() and abs(x) < 1e15 and (x != 0 or math.copysign(1.0, x) > 0):
        return int(x)
    if not math.isfinite(x):
        return orjson.Fragment('"NaN"' if x != x else '"Infinity"' if x > 0 else '"-Infinity"')
    text = f"{x:.15g}"
    if float(text) != x:
        text = f"{x:.17g}"
    return orjson.Fragment(text)


# What protobuf's JSON writer escapes beyond JSON's own escapes (which orjson writes the same
# way): `<` and `>`, DEL and the C1 controls, and invisible or direction-changing characters
# (json/internal/writer.cc, MustEscape), "to prevent security bugs in JavaScript".
_PROTO_ESCAPED = re.compile(
    "[<>\x7f-\x9f\xad\u0600-\u0603\u06dd\u070f\u17b4\u17b5\u200b-\u200f"
    "\u2028-\u202e\u2060-\u2064\u206a-\u206f\ufeff\ufff9-\ufffb"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)


def _u_escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    if c < 0x10000:
        return f"\\u{c:04x}"
    c -= 0x10000
    return f"\\u{0xD800 + (c >> 10):04x}\\u{0xDC00 + (c & 0x3FF):04x}"


def proto_json(doc: Document) -> bytes:
    """`doc` as JSON with the escapes protobuf's JSON writer adds (Envoy's transcoder prints
    strings that way): the characters only ever occur inside strings, so they are replaced in
    the serialized text."""
    out = orjson.dumps(doc)
    if out.isascii() and b"<" not in out and b">" not in out and b"\x7f" not in out:
        return out
    return _PROTO_ESCAPED.sub(_u_escape, out.decode()).encode()


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
    return proto_json(histogram_document(hq, result, remaining))


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
