"""Requests that protobuf cannot decode (invalid UTF-8 in a string field, nesting past
protobuf's recursion limit, truncated bytes) are a client error: INVALID_ARGUMENT naming the
request, not grpc's INTERNAL "Exception deserializing request!" with a traceback in the log.

A server interceptor wraps every method's request deserializer: a request that fails to decode
becomes an `Undecodable` marker, and the method's behaviour answers it with INVALID_ARGUMENT
before any handler code runs (for client streams, when the bad message is reached)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from session_audit.core.interceptor import WrapOnce

_TYPE_NAME = re.compile(r" with type '[^']*'")


class Undecodable:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def message(self) -> str:
        return (
            "request: expected a valid protobuf message (strings in UTF-8), got one that "
            + self.reason
        )


def _reason(exc: Exception) -> str:
    text = _TYPE_NAME.sub("", str(exc))
    if "UTF-8" in text:
        return "has a string field that is not valid UTF-8"
    if "depth" in text.lower() or "recursion" in text.lower():
        return "is nested too deeply"
    return "cannot be parsed"


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except (DecodeError, RecursionError, ValueError) as exc:
            return Undecodable(_reason(exc))

    return decode


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    from session_audit.core.errors import InvalidArgument

    async for request in requests:
        if isinstance(request, Undecodable):
            raise InvalidArgument(request.message())
        yield request


def _unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        return await behaviour(request, context)

    return call


def _unary_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        async for item in behaviour(request, context):
            yield item

    return call


def _stream_unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(_checked(requests), context)

    return call


def _stream_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def call(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for item in behaviour(_checked(requests), context):
            yield item

    return call


class DecodeGuard(WrapOnce):
    def wrap(self, method: str, handler: Any) -> Any | None:
        return _decoding(handler) if hasattr(handler, "_replace") else None


def _decoding(handler: Any) -> Any:
    changes: dict[str, Any] = {"request_deserializer": _safe(handler.request_deserializer)}
    if handler.unary_unary is not None:
        changes["unary_unary"] = _unary(handler.unary_unary)
    elif handler.unary_stream is not None:
        changes["unary_stream"] = _unary_stream(handler.unary_stream)
    elif handler.stream_unary is not None:
        changes["stream_unary"] = _stream_unary(handler.stream_unary)
    elif handler.stream_stream is not None:
        changes["stream_stream"] = _stream_stream(handler.stream_stream)
    return handler._replace(**changes)
