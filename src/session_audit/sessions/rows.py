"""Mapping between the Session message and its table row, and the ingest checks per item."""

from __future__ import annotations

import functools
import math
import operator
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from session_audit.core import validation
from session_audit.core.schema import INGEST_COLUMNS, JSON_COLUMNS
from session_audit.v1 import sessions_pb2 as pb

MAX_NAME = 256
SIZE_COLUMNS = ("event_size", "script_size")
MAX_SCRIPT = 1 << 20
MAX_JSON = 1 << 20
# Byte sizes travel as double (a JSON number); integral and below 2^53 keeps them exact.
MAX_EXACT = 2**53
INFO_TYPE = re.compile(r"^[A-Z0-9_]{1,64}$")
# Sessions may be reported with a clock a little ahead of ours, not from the future.
FUTURE_SLACK = timedelta(days=1)

_STATUS = pb.SessionStatus.Value
_VERB = pb.SessionVerb.Value
_IDENTITY = pb.IdentityType.Value
_REVIEW_STATUS = pb.ReviewStatus.Value


def _names(enum: Any) -> dict[int, str]:
    """Value number → name, without the 0 'unspecified' value."""
    return {v.number: v.name for v in enum.DESCRIPTOR.values if v.number != 0}


STATUS_NAMES = _names(_STATUS)
VERB_NAMES = _names(_VERB)
IDENTITY_NAMES = _names(_IDENTITY)
REVIEW_STATUS_NAMES = _names(_REVIEW_STATUS)
# Name → number, for the read path (enum_type_wrapper.Value is a Python call per lookup).
STATUS_NUMBERS = {name: _STATUS.Value(name) for name in STATUS_NAMES.values()}
VERB_NUMBERS = {name: _VERB.Value(name) for name in VERB_NAMES.values()}
IDENTITY_NUMBERS = {name: _IDENTITY.Value(name) for name in IDENTITY_NAMES.values()}


class ItemError(ValueError):
    """One ingest item is invalid; the message names the field."""


def _nul_free(name: str, value: str, max_len: int) -> str:
    if len(value) > max_len:
        raise ItemError(f"{name}: expected at most {max_len} characters, got {len(value)}")
    if "\x00" in value:
        raise ItemError(f"{name}: must not contain NUL characters")
    return value


def _size(name: str, value: float) -> int:
    if value != value or value < 0 or value >= MAX_EXACT or value != int(value):
        raise ItemError(f"{name}: expected a whole number of bytes 0..2^53, got {value}")
    return int(value)


def _free_json(name: str, value: Any) -> str:
    """Free-form JSON (Struct, ListValue): within the depth every read path renders."""
    if validation.json_depth(value, validation.MAX_JSON_DEPTH) > validation.MAX_JSON_DEPTH:
        raise ItemError(f"{name}: expected JSON nested at most {validation.MAX_JSON_DEPTH} levels")
    return _json_text(name, value)


def _json_text(name: str, value: Any) -> str:
    # orjson writes what json.dumps(separators=(",", ":"), ensure_ascii=False) writes, several
    # times faster; non-finite numbers never get here (_BadValue).
    text = orjson.dumps(value).decode()
    if len(text) > MAX_JSON:
        raise ItemError(f"{name}: expected at most {MAX_JSON} bytes of JSON")
    if "\\u0000" in text or "\x00" in text:
        raise ItemError(f"{name}: must not contain NUL characters")
    return text


# The time domain (core/validation.py), a little inside google.protobuf.Timestamp's range.
_MIN_SECONDS, _MAX_SECONDS = validation.MIN_SECONDS, validation.MAX_SECONDS
NON_FINITE = "expected a finite number (JSON has no NaN or Infinity)"
BAD_TIME = f"expected a time from {validation.TIME_RANGE}"


class _BadValue(Exception):
    """A NaN/infinity, an out-of-range Timestamp or an undefined enum number met on the hot
    path, without a location;
    `_bad_value_path` finds the field afterwards, only for such items."""


def _valid_timestamp(ts: timestamp_pb2.Timestamp) -> bool:
    return _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos < 1_000_000_000


def _timestamp(name: str, ts: timestamp_pb2.Timestamp) -> datetime:
    """Timestamp.ToDatetime(tzinfo=UTC) in integer arithmetic, with the range check turned
    into an ItemError naming the field."""
    if not _valid_timestamp(ts):
        raise ItemError(f"{name}: {BAD_TIME}, got {_shown_time(ts)}")
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def _shown_time(ts: timestamp_pb2.Timestamp) -> str:
    try:
        return ts.ToJsonString()
    except ValueError:
        return f"seconds={ts.seconds} nanos={ts.nanos}"


def _bad_value_path(value: Any, path: str = "") -> tuple[str, str] | None:
    """(dotted path, what was expected) of the first bad value in a message/Struct/ListValue."""
    items: list[tuple[str, Any]]
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, NON_FINITE)
    if isinstance(value, timestamp_pb2.Timestamp):
        return None if _valid_timestamp(value) else (path, BAD_TIME)
    if isinstance(value, struct_pb2.Value):
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            return None if math.isfinite(value.number_value) else (path, NON_FINITE)
        inner = getattr(value, kind) if kind in ("struct_value", "list_value") else None
        return None if inner is None else _bad_value_path(inner, path)
    if isinstance(value, struct_pb2.Struct):
        items = [(f"{path}.{k}", v) for k, v in value.fields.items()]
    elif isinstance(value, struct_pb2.ListValue):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value.values)]
    elif isinstance(value, Message):
        items = []
        for f, v in value.ListFields():
            name = f"{path}.{f.name}" if path else f.name
            if f.enum_type is not None:
                known = f.enum_type.values_by_number
                if any(n not in known for n in (v if f.is_repeated else [v])):
                    expected = ", ".join(e.name for e in f.enum_type.values if e.number)
                    return name, f"expected one of {expected}"
                continue
            if f.is_repeated and _field_kind(f) != "map":
                items += [(f"{name}[{i}]", e) for i, e in enumerate(v)]
            else:
                items.append((name, v))
    else:
        return None
    for item_path, item in items:
        found = _bad_value_path(item, item_path)
        if found is not None:
            return found
    return None


def _plain(value: Any) -> Any:
    """Struct/ListValue → plain JSON values, as json_format would print them (integral
    numbers as integers), reading the Value oneofs directly instead of through the
    well-known-type wrappers."""
    if isinstance(value, struct_pb2.Struct):
        return {k: _plain_value(v) for k, v in value.fields.items()}
    return [_plain_value(v) for v in value.values]


def _plain_value(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        n = v.number_value
        if not math.isfinite(n):
            raise _BadValue
        return int(n) if n.is_integer() and abs(n) < MAX_EXACT else n
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return _plain(v.struct_value)
    if kind == "list_value":
        return _plain(v.list_value)
    return None


def _message_dict(msg: Any) -> dict[str, Any]:
    """A message as json_format.MessageToDict(preserving_proto_field_name=True) would give it
    for our messages (set fields only; enums by name; Timestamps as RFC 3339), by walking
    ListFields() — several times cheaper, which matters at tens of thousands of rows/s."""
    return {f.name: _field_value(f, value) for f, value in msg.ListFields()}


def _field_value(f: Any, value: Any) -> Any:
    kind = _field_kind(f)
    if kind == "map":
        return dict(value)
    if kind == "timestamp":
        stamps = list(value) if f.is_repeated else [value]
        if not all(map(_valid_timestamp, stamps)):
            raise _BadValue
        return [v.ToJsonString() for v in stamps] if f.is_repeated else value.ToJsonString()
    if kind == "message":
        return [_message_dict(v) for v in value] if f.is_repeated else _message_dict(value)
    if kind == "enum":
        names = f.enum_type.values_by_number
        try:  # an undefined number (proto3 enums are open on the wire) is a KeyError
            return [names[v].name for v in value] if f.is_repeated else names[value].name
        except KeyError:
            raise _BadValue from None
    if f.is_repeated:
        out = list(value)
        if out and isinstance(out[0], float) and not all(map(math.isfinite, out)):
            raise _BadValue
        return out
    if isinstance(value, float) and not math.isfinite(value):
        raise _BadValue
    return value


@functools.cache
def _field_kind(f: Any) -> str:
    if f.message_type is not None:
        if f.message_type.GetOptions().map_entry:
            return "map"
        if f.message_type.full_name == "google.protobuf.Timestamp":
            return "timestamp"
        return "message"
    return "enum" if f.enum_type is not None else "scalar"


_RECORD = operator.itemgetter(*INGEST_COLUMNS)


@dataclass(frozen=True)
class IngestItem:
    id: uuid.UUID
    start_date: datetime
    end_date: datetime | None
    explicit_status: bool
    values: dict[str, Any]

    def record(self) -> tuple[Any, ...]:
        row: tuple[Any, ...] = _RECORD(self.values)
        return row


def item_from_proto(s: pb.Session, org_id: uuid.UUID, now: datetime) -> IngestItem:
    """Validate one reported session and turn it into column values (None = not sent)."""
    try:
        return _item_from_proto(s, org_id, now)
    except _BadValue:
        where, expected = _bad_value_path(s) or ("session", "valid values")
        raise ItemError(f"{where}: {expected}") from None


def _item_from_proto(s: pb.Session, org_id: uuid.UUID, now: datetime) -> IngestItem:
    try:
        sid = uuid.UUID(s.id.strip())
    except ValueError:
        raise ItemError(f"id: expected a UUID, got {s.id[:80]!r}") from None
    if s.org_id and s.org_id.strip().lower() != str(org_id):
        raise ItemError("org_id: must be empty or the token's org")
    if not s.HasField("start_date"):
        raise ItemError("start_date: required")
    start = _timestamp("start_date", s.start_date)
    if start > now + FUTURE_SLACK:
        raise ItemError(f"start_date: in the future ({start.isoformat()})")
    end = _timestamp("end_date", s.end_date) if s.HasField("end_date") else None
    if end is not None and end < start:
        raise ItemError("end_date: before start_date")

    for name, names in (("status", STATUS_NAMES), ("verb", VERB_NAMES),
                        ("identity_type", IDENTITY_NAMES)):  # fmt: skip
        number = getattr(s, name)
        if number and number not in names:
            raise ItemError(f"{name}: expected one of {', '.join(names.values())}, got {number}")
    explicit = s.status in STATUS_NAMES
    if explicit:
        status = STATUS_NAMES[s.status]
        if status == "done" and end is None:
            raise ItemError("end_date: required when status is done")
        if status != "done" and end is not None:
            raise ItemError(f"status: '{status}' contradicts end_date (use done)")
    else:
        status = "done" if end is not None else "open"

    v: dict[str, Any] = dict.fromkeys(INGEST_COLUMNS)
    v.update(id=sid, org_id=org_id, start_date=start, end_date=end, status=status)
    v["verb"] = VERB_NAMES.get(s.verb)
    v["identity_type"] = IDENTITY_NAMES.get(s.identity_type)
    # Always sent ('' = not known): the table keeps '' for these, and a later report's ''
    # does not overwrite what is stored (see sessions_store._merged).
    v["user_id"] = _nul_free("user_id", s.user_id, MAX_NAME)
    v["user_email"] = _nul_free("user", s.user, MAX_NAME)
    v["user_name"] = _nul_free("user_name", s.user_name, MAX_NAME)
    v["connection"] = _nul_free("connection", s.connection, MAX_NAME)
    v["connection_type"] = _nul_free("type", s.type, MAX_NAME)
    v["connection_subtype"] = _nul_free("connection_subtype", s.connection_subtype, MAX_NAME)
    v["role_name"] = _nul_free("role_name", s.role_name, MAX_NAME)
    dyn: Any = s  # fields picked by name below
    for col in ("resource_name", "machine_identity_id", "correlation_id", "session_batch_id"):
        if dyn.HasField(col):
            v[col] = _nul_free(col, getattr(s, col), MAX_NAME)
    if s.HasField("exit_code"):
        v["exit_code"] = s.exit_code
    v["event_size"] = _size("event_size", s.event_size)
    script_size = _size("script_size", s.script_size)
    if s.HasField("script"):
        v["script"] = _nul_free("script.data", s.script.data, MAX_SCRIPT)
        script_size = script_size or len(s.script.data.encode())
    v["script_size"] = script_size

    if s.HasField("review"):
        review = _message_dict(s.review)
        v["review"] = _json_text("review", review)
        v["review_status"] = REVIEW_STATUS_NAMES.get(s.review.status)
        emails = {
            g.reviewed_by.email.strip().lower()
            for g in s.review.review_groups_data
            if g.reviewed_by.email.strip()
        }
        v["review_approvers"] = sorted(emails) or None
    if s.redactions:
        seen: set[str] = set()
        reds = []
        for i, r in enumerate(s.redactions):
            info = r.info_type.strip().upper()
            if not INFO_TYPE.match(info):
                raise ItemError(
                    f"redactions[{i}].info_type: expected 1-64 of A-Z, 0-9 and _, got "
                    f"{r.info_type[:80]!r}"
                )
            if info in seen:
                raise ItemError(f"redactions[{i}].info_type: {info} appears twice")
            seen.add(info)
            if r.count < 0:
                raise ItemError(f"redactions[{i}].count: expected >= 0, got {r.count}")
            size = _size(f"redactions[{i}].transformed_bytes", r.transformed_bytes)
            reds.append({"info_type": info, "count": r.count, "transformed_bytes": size})
        v["redactions"] = _json_text("redactions", reds)
    if s.HasField("ai_analysis"):
        v["ai_analysis"] = _json_text("ai_analysis", _message_dict(s.ai_analysis))
    if s.guardrails_info:
        v["guardrails_info"] = _json_text(
            "guardrails_info", [_message_dict(g) for g in s.guardrails_info]
        )
    if s.connection_tags:
        v["connection_tags"] = _json_text("connection_tags", dict(s.connection_tags))
    if s.labels:
        v["labels"] = _json_text("labels", dict(s.labels))
    for col in ("integrations_metadata", "metadata", "metrics"):
        if dyn.HasField(col):
            v[col] = _free_json(col, _plain(getattr(s, col)))
    if s.HasField("event_stream"):
        v["event_stream"] = _free_json("event_stream", _plain(s.event_stream))
    return IngestItem(sid, start, end, explicit, v)


def merge_items(old: IngestItem, new: IngestItem) -> IngestItem:
    """Two reports of one session in a batch: the later one's sent fields win."""
    values = dict(old.values)
    for col, value in new.values.items():
        if value is not None and value != "" and not (col in SIZE_COLUMNS and value == 0):
            values[col] = value
    if new.end_date is None and old.end_date is not None:
        values["status"] = old.values["status"]
    return IngestItem(new.id, new.start_date, values["end_date"], new.explicit_status, values)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_timestamp(ts: timestamp_pb2.Timestamp, dt: datetime) -> None:
    """Timestamp.FromDatetime in integer arithmetic: several times cheaper than the library's
    utctimetuple/timegm route, and it runs a few times per listed session."""
    d = dt - _EPOCH if dt.tzinfo is not None else dt - _EPOCH.replace(tzinfo=None)
    ts.seconds = d.days * 86400 + d.seconds
    ts.nanos = d.microseconds * 1000


@functools.cache
def _json_plan(descriptor: Any) -> dict[str, tuple[str, Any]]:
    """Per message type, once: field name → (kind, field) for _set_json."""
    return {f.name: (_field_kind(f), f) for f in descriptor.fields}


def _set_json(target: Any, value: dict[str, Any]) -> None:
    """Fill a message from the JSON we stored (our own MessageToDict output). A direct walk of
    the descriptor: json_format.ParseDict's generality costs ~10x more per list page."""
    plan = _json_plan(target.DESCRIPTOR)
    for key, item in value.items():
        entry = plan.get(key)
        if entry is None:
            continue
        kind, f = entry
        if kind == "scalar":
            if f.is_repeated:
                getattr(target, key).extend(item)
            else:
                setattr(target, key, item)
        elif kind == "enum":
            setattr(target, key, f.enum_type.values_by_name[item].number)
        elif kind == "map":
            getattr(target, key).update(item)
        elif kind == "timestamp":
            set_timestamp(getattr(target, key), datetime.fromisoformat(item))
        elif f.is_repeated:
            container = getattr(target, key)
            for element in item:
                _set_json(container.add(), element)
        else:
            _set_json(getattr(target, key), item)


def row_to_proto(r: asyncpg.Record) -> pb.Session:
    s = pb.Session(
        id=str(r["id"]),
        org_id=str(r["org_id"]),
        connection=r["connection"],
        connection_subtype=r["connection_subtype"],
        type=r["connection_type"],
        user=r["user_email"],
        user_id=r["user_id"],
        user_name=r["user_name"],
        role_name=r["role_name"],
        event_size=float(r["event_size"]),
        script_size=float(r["script_size"]),
        status=STATUS_NUMBERS[r["status"]],
    )
    set_timestamp(s.start_date, r["start_date"])
    if r["end_date"] is not None:
        set_timestamp(s.end_date, r["end_date"])
    if r["verb"] is not None:
        s.verb = VERB_NUMBERS[r["verb"]]
    if r["identity_type"] is not None:
        s.identity_type = IDENTITY_NUMBERS[r["identity_type"]]
    for col in ("resource_name", "machine_identity_id", "correlation_id", "session_batch_id"):
        if r[col] is not None:
            setattr(s, col, r[col])
    if r["exit_code"] is not None:
        s.exit_code = r["exit_code"]
    if r["review"] is not None:
        _set_json(s.review, r["review"])
    if r["ai_analysis"] is not None:
        _set_json(s.ai_analysis, r["ai_analysis"])
    for g in r["guardrails_info"] or ():
        _set_json(s.guardrails_info.add(), g)
    for red in r["redactions"] or ():
        s.redactions.add(
            info_type=red["info_type"],
            count=red["count"],
            transformed_bytes=float(red["transformed_bytes"]),
        )
    if r["connection_tags"]:
        s.connection_tags.update(r["connection_tags"])
    if r["labels"]:
        s.labels.update(r["labels"])
    # Empty objects print as {} like labels and connection_tags do (set, with no fields).
    for col in ("integrations_metadata", "metadata", "metrics"):
        struct = getattr(s, col)
        struct.SetInParent()
        if r[col]:
            struct.update(r[col])
    if "script" in r and r["script"] is not None:
        s.script.data = r["script"]
    if "event_stream" in r and r["event_stream"] is not None:
        s.event_stream.extend(r["event_stream"])
    return s


assert JSON_COLUMNS <= set(INGEST_COLUMNS)
