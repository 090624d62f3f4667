"""Mapping between the Session message and its table row, and the ingest checks per item."""

from __future__ import annotations

import functools
import math
import operator
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

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


class IngestItem(NamedTuple):
    """One validated report (a NamedTuple: made per session, three times cheaper than a
    frozen dataclass)."""

    id: uuid.UUID
    start_date: datetime
    end_date: datetime | None
    explicit_status: bool
    values: dict[str, Any]

    def record(self) -> tuple[Any, ...]:
        row: tuple[Any, ...] = _RECORD(self.values)
        return row


def item_from_proto(s: pb.Session, org_id: uuid.UUID, now: datetime) -> IngestItem:
    """Validate one reported session and turn it into column values (None = not sent).

    Two paths with one meaning: `_fast_item` takes the common case (every field valid) in
    fewer Python steps and gives up (`_Slow`) at anything else; `checked_item` is the
    reference, field by field, and the only one that words errors. So every rejection and its
    message come from the reference, and tests/test_rows_fastpath.py checks that the fast
    path's items equal the reference's over generated sessions."""
    try:
        return _fast_item(s, org_id, now)
    except (_Slow, KeyError):  # KeyError: an enum number the fast path has no name for
        return checked_item(s, org_id, now)


def checked_item(s: pb.Session, org_id: uuid.UUID, now: datetime) -> IngestItem:
    """The reference validation of one session (see item_from_proto)."""
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


# -- the fast path of item_from_proto --------------------------------------------------------------


class _Slow(Exception):
    """The fast path leaves this item to the reference (`checked_item`), which decides."""


_EPOCH_NAIVE = datetime(1970, 1, 1)
_MAX_DEPTH = validation.MAX_JSON_DEPTH
_OPTIONAL_NAMES = ("resource_name", "machine_identity_id", "correlation_id", "session_batch_id")
_FREE_STRUCTS = ("integrations_metadata", "metadata", "metrics")


def _fast_time(ts: timestamp_pb2.Timestamp) -> datetime:
    seconds, nanos = ts.seconds, ts.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        raise _Slow
    # Positional: the keyword form of timedelta() costs ~70% more.
    return _EPOCH + timedelta(0, seconds, nanos // 1000)


def _ts_text(ts: timestamp_pb2.Timestamp) -> str:
    """Timestamp.ToJsonString() of a valid timestamp (Z, 0/3/6/9 fraction digits), without
    the library's float arithmetic and range check."""
    seconds, nanos = ts.seconds, ts.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        raise _Slow
    text = (_EPOCH_NAIVE + timedelta(0, seconds)).isoformat()
    if not nanos:
        return text + "Z"
    if not nanos % 1_000_000:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if not nanos % 1000:
        return f"{text}.{nanos // 1000:06d}Z"
    return f"{text}.{nanos:09d}Z"


def _fast_text(value: Any) -> str:
    """_json_text for values that pass it; anything else is the reference's to word."""
    text = orjson.dumps(value).decode()
    if len(text) > MAX_JSON or "\\u0000" in text or "\x00" in text:
        raise _Slow
    return text


def _fast_name(text: str) -> str:
    if len(text) > MAX_NAME or "\x00" in text:
        raise _Slow
    return text


def _map_dict(m: Any) -> dict[str, str]:
    """dict(m) of a map field, same order: dict() goes through the Mapping mixin's keys(),
    2.5 times slower."""
    return {key: m[key] for key in m}


def _fast_struct(struct: struct_pb2.Struct, level: int) -> dict[str, Any]:
    """_plain of a Struct at nesting `level` (the outermost is 1), giving up on a non-finite
    number or deeper than MAX_JSON_DEPTH (so no json_depth pass afterwards). The common kinds
    are read here, not through _fast_value: a call per value is a fifth of the walk."""
    if level > _MAX_DEPTH:
        raise _Slow
    fields = struct.fields
    out: dict[str, Any] = {}
    for key in fields:
        v = fields[key]
        kind = v.WhichOneof("kind")
        if kind == "string_value":
            out[key] = v.string_value
        elif kind == "number_value":
            n = v.number_value
            if n - n != 0:  # NaN or an infinity
                raise _Slow
            out[key] = int(n) if n.is_integer() and -MAX_EXACT < n < MAX_EXACT else n
        elif kind == "struct_value":
            out[key] = _fast_struct(v.struct_value, level + 1)
        else:
            out[key] = _fast_value(v, level)
    return out


def _fast_list(values: struct_pb2.ListValue, level: int) -> list[Any]:
    if level > _MAX_DEPTH:
        raise _Slow
    return [_fast_value(v, level) for v in values.values]


def _fast_value(v: struct_pb2.Value, level: int) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        n = v.number_value
        if n - n != 0:  # NaN or an infinity
            raise _Slow
        return int(n) if n.is_integer() and -MAX_EXACT < n < MAX_EXACT else n
    if kind == "struct_value":
        return _fast_struct(v.struct_value, level + 1)
    if kind == "list_value":
        return _fast_list(v.list_value, level + 1)
    if kind == "bool_value":
        return v.bool_value
    return None


# How _fast_dict reads a field: (name, kind, repeated, enum number → name), per field
# descriptor, made once (descriptor attributes are Python calls on every read).
_Plan = tuple[str, str, bool, dict[int, str]]
_PLANS: dict[Any, _Plan] = {}


def _plan(f: Any) -> _Plan:
    names = {e.number: e.name for e in f.enum_type.values} if f.enum_type is not None else {}
    plan = _PLANS[f] = (f.name, _field_kind(f), f.is_repeated, names)
    return plan


def _fast_dict(msg: Any) -> dict[str, Any]:
    """_message_dict of a message whose every value is valid."""
    out: dict[str, Any] = {}
    for f, value in msg.ListFields():
        name, kind, repeated, names = _PLANS.get(f) or _plan(f)
        if kind == "scalar":
            if repeated:
                value = list(value)
                if value and isinstance(value[0], float) and not all(map(math.isfinite, value)):
                    raise _Slow
            elif value.__class__ is float and value - value != 0:
                raise _Slow
        elif kind == "message":
            value = [_fast_dict(m) for m in value] if repeated else _fast_dict(value)
        elif kind == "enum":
            value = [names[n] for n in value] if repeated else names[value]  # KeyError: slow
        elif kind == "timestamp":
            value = [_ts_text(t) for t in value] if repeated else _ts_text(value)
        else:  # map
            value = dict(value)
        out[name] = value
    return out


def _fast_item(s: pb.Session, org_id: uuid.UUID, now: datetime) -> IngestItem:
    """The same IngestItem as `_item_from_proto` for a valid session, in fewer steps; `_Slow`
    for anything the reference would reject (or that this path does not take)."""
    dyn: Any = s  # fields picked by name below
    has = dyn.HasField
    try:
        sid = uuid.UUID(s.id.strip())
    except ValueError:
        raise _Slow from None
    if s.org_id and s.org_id.strip().lower() != str(org_id):
        raise _Slow
    if not has("start_date"):
        raise _Slow
    start = _fast_time(s.start_date)
    if start > now + FUTURE_SLACK:
        raise _Slow
    end = _fast_time(s.end_date) if has("end_date") else None
    if end is not None and end < start:
        raise _Slow
    status_number = s.status
    status = STATUS_NAMES.get(status_number)
    explicit = status is not None
    if explicit:
        if (status == "done") != (end is not None):
            raise _Slow
    elif status_number:
        raise _Slow
    else:
        status = "done" if end is not None else "open"
    verb_number = s.verb
    verb = VERB_NAMES.get(verb_number)
    if verb is None and verb_number:
        raise _Slow
    identity_number = s.identity_type
    identity = IDENTITY_NAMES.get(identity_number)
    if identity is None and identity_number:
        raise _Slow
    user_id, user, user_name = s.user_id, s.user, s.user_name
    connection, connection_type, subtype, role = (
        s.connection,
        s.type,
        s.connection_subtype,
        s.role_name,
    )
    for text in (user_id, user, user_name, connection, connection_type, subtype, role):
        if len(text) > MAX_NAME or "\x00" in text:
            raise _Slow
    optional = [_fast_name(getattr(s, n)) if has(n) else None for n in _OPTIONAL_NAMES]
    event_size, script_size = s.event_size, s.script_size
    if not (
        0 <= event_size < MAX_EXACT and event_size.is_integer()
        and 0 <= script_size < MAX_EXACT and script_size.is_integer()
    ):  # fmt: skip
        raise _Slow
    script = None
    if has("script"):
        script = s.script.data
        if len(script) > MAX_SCRIPT or "\x00" in script:
            raise _Slow
        script_size = script_size or len(script.encode())

    review = review_status = approvers = None
    if has("review"):
        r = s.review
        review = _fast_text(_fast_dict(r))
        review_status = REVIEW_STATUS_NAMES.get(r.status)
        emails = {
            g.reviewed_by.email.strip().lower()
            for g in r.review_groups_data
            if g.reviewed_by.email.strip()
        }
        approvers = sorted(emails) or None
    redactions = None
    if s.redactions:
        seen: set[str] = set()
        reds = []
        for red in s.redactions:
            info = red.info_type.strip().upper()
            size = red.transformed_bytes
            if (
                info in seen or not INFO_TYPE.match(info) or red.count < 0
                or not (0 <= size < MAX_EXACT and size.is_integer())
            ):  # fmt: skip
                raise _Slow
            seen.add(info)
            reds.append({"info_type": info, "count": red.count, "transformed_bytes": int(size)})
        redactions = _fast_text(reds)
    ai = _fast_text(_fast_dict(s.ai_analysis)) if has("ai_analysis") else None
    guardrails = (
        _fast_text([_fast_dict(g) for g in s.guardrails_info]) if s.guardrails_info else None
    )
    tags = _fast_text(_map_dict(s.connection_tags)) if s.connection_tags else None
    labels = _fast_text(_map_dict(s.labels)) if s.labels else None
    free = [_fast_text(_fast_struct(getattr(s, c), 1)) if has(c) else None for c in _FREE_STRUCTS]
    stream = _fast_text(_fast_list(s.event_stream, 1)) if has("event_stream") else None
    # In INGEST_COLUMNS order (asserted below).
    values = {
        "id": sid, "org_id": org_id, "start_date": start, "end_date": end, "status": status,
        "verb": verb, "user_id": user_id, "user_email": user, "user_name": user_name,
        "connection": connection, "connection_type": connection_type,
        "connection_subtype": subtype, "role_name": role, "resource_name": optional[0],
        "identity_type": identity, "machine_identity_id": optional[1],
        "correlation_id": optional[2], "session_batch_id": optional[3],
        "exit_code": s.exit_code if has("exit_code") else None,
        "event_size": int(event_size), "script": script, "script_size": int(script_size),
        "review_status": review_status, "review_approvers": approvers,
        "redactions": redactions, "review": review, "ai_analysis": ai,
        "guardrails_info": guardrails, "connection_tags": tags,
        "integrations_metadata": free[0], "labels": labels, "metadata": free[1],
        "metrics": free[2], "event_stream": stream,
    }  # fmt: skip
    return IngestItem(sid, start, end, explicit, values)


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
