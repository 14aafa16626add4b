"""The one place where gRPC server interceptors are chosen.

Every RPC passes through them before any servicer runs: first
authentication (``auth.Authenticator``: token, role, principal), then
OpenTelemetry's server spans (skipped unless tracing is set up).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from taskloom.core.auth import TokenTable
from taskloom.core.tracing import tracing
from taskloom.supervisor.auth import Authenticator, Refused


class _Traced(grpc.aio.ServerInterceptor):
    """OpenTelemetry's server spans, except on the worker stream: its wrapper
    expects request iterators, and Connect reads and writes on the context."""

    UNTRACED = frozenset({"/taskloom.v1.WorkerService/Connect"})

    def __init__(self) -> None:
        self._otel = aio_server_interceptor()  # type: ignore[no-untyped-call]

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler_call_details.method in self.UNTRACED or not tracing():
            # Without a tracer provider its spans are no-ops, yet its wrappers
            # cost every call and every streamed message.
            return await continuation(handler_call_details)
        handler: grpc.RpcMethodHandler[Any, Any] | None = await self._otel.intercept_service(
            continuation, handler_call_details
        )
        return handler


def server_interceptors(
    tokens: Callable[[], TokenTable], refused: Refused | None = None, *, mutual_tls: bool = False
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors for the supervisor's server, outermost first."""
    return [Authenticator(tokens, refused, mutual_tls=mutual_tls), _Traced()]
