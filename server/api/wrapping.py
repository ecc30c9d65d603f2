"""What the node's server interceptors share: each rewrites a method's handler once, the first
time the method is called, and keeps it (handlers are fixed once the server starts; a method
that finds no handler is not kept)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def kind_of(handler: Any) -> str:
    """Which of the four behaviours `handler` has."""
    return next(k for k in KINDS if getattr(handler, k))


class HandlerRewriter(grpc.aio.ServerInterceptor):
    """Serves each method with `rewrite(method, handler)`, made once per method."""

    def __init__(self) -> None:
        self._handlers: dict[str, Any] = {}

    def rewrite(self, method: str, handler: Any) -> Any:
        raise NotImplementedError

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        method: str = details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = await continuation(details)
            if handler is None:
                return None
            handler = self.rewrite(method, handler)
            self._handlers[method] = handler
        return handler
