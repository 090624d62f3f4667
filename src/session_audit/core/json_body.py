"""Strict JSON request bodies for REST (ingest and the Reports API's POST/PATCH bodies).

Envoy's gRPC-JSON transcoder drops body fields the request message does not have, and has no
option to refuse them (envoyproxy/envoy#46623). A dropped field is a silent wrong answer: on
ingest `{"end_dat": …}` would store a still-open session, on a report `{"query_filtr": …}` would
give a report of everything, both answered 200. So every REST path with a body is bound to an
RPC that takes the raw body (`google.api.HttpBody`) and the body is read here, following
proto3's JSON mapping (the one the transcoder applies, so a well-formed body means exactly
what it meant before):

- keys are a field's proto name or its lowerCamel JSON name; any other key is a 400 naming its
  path (`sessions[3].review.statsu`) and the fields allowed there;
- a value of the wrong JSON type is a 400 naming its path and what was expected; integers and
  numbers may also be strings, enum values are names (exact case) or numbers, times RFC 3339
  with an offset, `null` is the field's default;
- free-form fields (Struct, ListValue) keep whatever JSON they carry, nested at most
  validation.MAX_JSON_DEPTH levels;
- the body is UTF-8, every object's keys are unique (a duplicate is a 400, not "the last one
  wins"), and times lie in the time domain (core/validation.py).

The checked values are given to the generated message's constructor (upb, in C), which is
about six times faster than `json_format.ParseDict` here; the descriptors drive both, so the
contract stays the single source of field names and types.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from typing import Any, NoReturn, TypeVar

import orjson
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from session_audit.core import validation
from session_audit.core.errors import InvalidArgument

M = TypeVar("M", bound=Message)
Convert = Callable[[Any, str], Any]  # (JSON value, its path) -> a value for the constructor

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})
_SPECIAL_FLOATS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _shown(value: Any) -> str:
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, dict | list) and validation.json_depth(value, 8) > 8:
        text = "{…}" if isinstance(value, dict) else "[…]"
    else:
        try:
            text = orjson.dumps(value).decode()
        except TypeError:  # integers beyond 64 bits, which JSON (and the parser) allow
            text = json.dumps(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _where(path: str) -> str:
    return path if len(path) <= 200 else path[:200] + "…"


def _bad(path: str, expected: str, value: Any) -> NoReturn:
    raise InvalidArgument(f"{_where(path) or 'body'}: {expected}, got {_shown(value)}")


def _exactly(kind: type, expected: str) -> Convert:
    """A value that must be of one JSON type (bool is not a number, nor a number a string)."""

    def convert(value: Any, path: str) -> Any:
        if type(value) is not kind:
            _bad(path, expected, value)
        return value

    return convert


_string = _exactly(str, "expected a string")
_bool = _exactly(bool, "expected true or false")
_object = _exactly(dict, "expected an object")  # map fields
_list = _exactly(list, "expected a list")  # repeated fields


def _free(kind: type, expected: str) -> Convert:
    """Struct / ListValue: any JSON of that type, nested at most MAX_JSON_DEPTH levels."""
    limit = validation.MAX_JSON_DEPTH

    def convert(value: Any, path: str) -> Any:
        if type(value) is not kind:
            _bad(path, expected, value)
        if validation.json_depth(value, limit) > limit:
            raise InvalidArgument(
                f"{_where(path)}: expected JSON nested at most {limit} levels, got deeper"
            )
        return value

    return convert


def _integer(kind: int) -> Convert:
    low, high = _INT_RANGES[kind]
    expected = f"expected an integer from {low} to {high}"

    def convert(value: Any, path: str) -> Any:
        kind_of = type(value)
        if kind_of is int:
            number = value
        elif kind_of is float and value.is_integer():
            number = int(value)
        elif kind_of is str and validation.DECIMAL.fullmatch(value) is not None:
            number = int(value)
        else:
            _bad(path, "expected an integer", value)
        if not low <= number <= high:
            _bad(path, expected, value)
        return number

    return convert


def _number(value: Any, path: str) -> Any:
    kind_of = type(value)
    if kind_of is float or kind_of is int:
        return value
    if kind_of is str:
        special = _SPECIAL_FLOATS.get(value)
        if special is not None:
            return special
        try:
            return float(value)
        except ValueError:
            pass
    _bad(path, "expected a number", value)


def _enum(field: FieldDescriptor) -> Convert:
    enum = field.enum_type
    assert enum is not None  # an enum field has its type
    names = frozenset(v.name for v in enum.values)
    expected = "expected one of " + ", ".join(v.name for v in enum.values if v.number != 0)

    def convert(value: Any, path: str) -> Any:
        if (type(value) is str and value in names) or type(value) is int:
            return value  # numbers pass through; undefined ones are refused per item later
        _bad(path, expected, value)

    return convert


# google.protobuf.Timestamp as proto3's JSON mapping writes it: RFC 3339 with `T`, seconds, up
# to 9 fraction digits, an offset (request parameters are read by validation.rfc3339). Up to
# microseconds `datetime.fromisoformat` (C) reads it; nanoseconds go to protobuf.
_PROTO_TIMESTAMP = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.(\d{1,9}))?(?:Z|[+-]\d\d:\d\d)", re.ASCII
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIME_EXPECTED = "expected an RFC 3339 time with an offset, such as 2026-01-01T10:00:00Z"


def _timestamp(value: Any, path: str) -> Any:
    match = _PROTO_TIMESTAMP.fullmatch(value) if type(value) is str else None
    if match is None:
        _bad(path, _TIME_EXPECTED, value)
    # The time domain is checked per item by the RPC (an ingest item out of it is rejected
    # alone, as on gRPC); here only the syntax.
    fraction = match.group(1)
    try:
        if fraction is None or len(fraction) <= 6:
            delta = datetime.fromisoformat(value) - _EPOCH
            return Timestamp(
                seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000
            )
        stamp = Timestamp()
        stamp.FromJsonString(value)
        return stamp
    except ValueError:
        _bad(path, _TIME_EXPECTED, value)


_WELL_KNOWN: dict[str, Convert] = {
    "google.protobuf.Timestamp": _timestamp,
    "google.protobuf.Struct": _free(dict, "expected an object"),
    "google.protobuf.ListValue": _free(list, "expected a list"),
}


def _single(field: FieldDescriptor) -> Convert:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        sub = field.message_type
        assert sub is not None  # a message field has its type
        special = _WELL_KNOWN.get(sub.full_name)
        return special if special is not None else _message(sub)
    if kind == FieldDescriptor.TYPE_STRING:
        return _string
    if kind == FieldDescriptor.TYPE_BOOL:
        return _bool
    if kind in _INT_RANGES:
        return _integer(kind)
    if kind in _FLOATS:
        return _number
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enum(field)
    raise TypeError(f"{field.full_name}: no JSON reading for field type {kind}")


def _field(field: FieldDescriptor) -> Convert:
    sub = field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None
    if sub is not None and sub.GetOptions().map_entry:
        value_of = _single(sub.fields_by_name["value"])

        def convert_map(value: Any, path: str) -> Any:
            return {k: value_of(v, f"{path}.{k}") for k, v in _object(value, path).items()}

        return convert_map
    element = _single(field)
    if field.is_repeated:

        def convert_list(value: Any, path: str) -> Any:
            return [element(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path))]

        return convert_list
    return element


@cache
def _plan(desc: Descriptor) -> dict[str, tuple[str, Convert]]:
    """Accepted JSON keys of a message (proto name and lowerCamel JSON name alike) → the field's
    proto name and how to read its value."""
    plan: dict[str, tuple[str, Convert]] = {}
    for f in desc.fields:
        entry = (f.name, _field(f))
        plan[f.name] = entry
        plan[f.json_name] = entry
    return plan


def _message(desc: Descriptor) -> Convert:
    expected = ", ".join(sorted(f.name for f in desc.fields))

    def convert(value: Any, path: str) -> Any:
        _object(value, path)
        plan = _plan(desc)  # looked up when called: messages may contain themselves
        out: dict[str, Any] = {}
        for key, item in value.items():
            entry = plan.get(key)
            where = f"{path}.{key}" if path else key
            if entry is None:
                raise InvalidArgument(f"{_where(where)}: unknown field; expected one of {expected}")
            if item is not None:  # null is the field's default in proto3 JSON
                out[entry[0]] = entry[1](item, where)
        return out

    return convert


@cache
def _reader(desc: Descriptor) -> Convert:
    return _message(desc)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _NonFinite(Exception):
    def __init__(self, literal: str) -> None:
        super().__init__(literal)
        self.literal = literal


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _no_constant(literal: str) -> Any:
    raise _NonFinite(literal)


def load_json(data: bytes, param: str = "body") -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity literals, unique keys in every object, bounded
    nesting (the parser's own recursion limit, answered as a 400)."""
    expected = "expected a JSON object matching the request"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(
            f"{param}: expected UTF-8 text, got an invalid byte at offset {err.start}"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except _DuplicateKey as dup:
        raise InvalidArgument(
            f"{param}: expected unique keys in every object, got {_shown(dup.key)} twice"
        ) from None
    except _NonFinite as bad:
        raise InvalidArgument(f"{param}: {expected}; JSON has no {bad.literal}") from None
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"{param}: {expected}; {err}") from None
    except RecursionError:
        raise InvalidArgument(f"{param}: {expected}; nested too deeply") from None


def parse_strict(data: bytes, cls: type[M]) -> M:
    """`data`, the JSON form of a `cls` message, as that message; anything the message does not
    define, or a value of the wrong type, is an InvalidArgument naming where it is."""
    obj = load_json(data)
    if type(obj) is not dict:
        _bad("body", "expected a JSON object matching the request", obj)
    fields = _reader(cls.DESCRIPTOR)(obj, "")
    try:
        return cls(**fields)
    except (TypeError, ValueError, OverflowError) as err:  # only the constructor knows
        raise InvalidArgument(f"body: {str(err)[:300]}") from None


# A body at least this large is read in a worker thread (`parse_strict_off_loop`): reading
# costs ~80 µs of CPU per KB (a 1,000-session ingest body, ~0.5 MB: ~40-80 ms), which on the
# event loop would hold every other call for that long (issue 11: ~20 ms at most). A worker
# thread gives the GIL back to the loop at least every 5 ms (sys.getswitchinterval()).
OFF_LOOP_BYTES = 32 * 1024


async def parse_strict_off_loop(data: bytes, cls: type[M]) -> M:
    """`parse_strict`, in a worker thread when `data` is large (OFF_LOOP_BYTES)."""
    if len(data) < OFF_LOOP_BYTES:
        return parse_strict(data, cls)
    return await asyncio.to_thread(parse_strict, data, cls)


def parse_strict_for_path(data: bytes, cls: type[M], path_id: str) -> M:
    """`parse_strict` for a body whose object is named by the path (PATCH/PUT …/{id}): the id
    comes from the path; the same id in the body is tolerated, another one is refused."""
    body = parse_strict(data, cls)
    given: str = getattr(body, "id")  # noqa: B009 - every such request message has an id
    if given and given != path_id:
        raise InvalidArgument(f"id: given in the path ({path_id[:40]}); leave it out of the body")
    setattr(body, "id", path_id)  # noqa: B010
    return body
