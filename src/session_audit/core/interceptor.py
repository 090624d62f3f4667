"""The shape every interceptor of ours shares: wrap a method's handler once, not per call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc


class WrapOnce(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Subclasses say how to wrap a method's handler (`wrap`, None: leave it as it is); the
    wrapper is built on the method's first call and reused while grpc hands out the same
    handler (the dict is bounded by the registered methods)."""

    def __init__(self) -> None:
        # method → (the handler it wrapped, the wrapper)
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def wrap(self, method: str, handler: Any) -> Any | None:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        hit = self._wrapped.get(details.method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self.wrap(details.method, handler)
        if wrapped is None:
            return handler
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped
