"""The one place where gRPC server interceptors are chosen.

Every RPC passes through them before any servicer runs: first the gRPC
server metrics (``Measured``: calls started and handled by method and code,
and how long they took, refused calls included), then authentication
(``auth.Authenticator``: token, role, principal), then OpenTelemetry's
server spans (skipped unless tracing is set up).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from prometheus_client import CollectorRegistry, Counter, Histogram

from taskloom.core.auth import TokenTable
from taskloom.core.tracing import tracing
from taskloom.supervisor.auth import Authenticator, Refused


class _Traced(grpc.aio.ServerInterceptor):
    """OpenTelemetry's server spans, except on the worker stream (its wrapper
    expects request iterators, and Connect reads and writes on the context)
    and on a client's Session, which lasts as long as the client: each
    submit on it carries the caller's trace context instead."""

    UNTRACED = frozenset({"/taskloom.v1.WorkerService/Connect", "/taskloom.v1.TaskService/Session"})

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
    tokens: Callable[[], TokenTable],
    refused: Refused | None = None,
    *,
    mutual_tls: bool = False,
    registry: CollectorRegistry | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors for the supervisor's server, outermost first."""
    measured = [Measured(registry)] if registry is not None else []
    return [*measured, Authenticator(tokens, refused, mutual_tls=mutual_tls), _Traced()]


HANDLING_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
_KINDS = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}


class Measured(grpc.aio.ServerInterceptor):
    """gRPC server metrics by the names every gRPC dashboard knows
    (go-grpc-prometheus): ``grpc_server_started_total``,
    ``grpc_server_handled_total{grpc_code}`` and
    ``grpc_server_handling_seconds``, by service, method and type. A stream
    counts once, when it ends."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self._started = Counter(
            "grpc_server_started", "Calls started on the server", labels, registry=registry
        )
        self._handled = Counter(
            "grpc_server_handled",
            "Calls ended on the server, by status code",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self._seconds = Histogram(
            "grpc_server_handling_seconds",
            "How long calls took on the server, from start to status (streams: their life)",
            labels,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        attribute = next((a for a in _KINDS if getattr(handler, a) is not None), "")
        if not attribute:
            return handler
        behavior = getattr(handler, attribute)
        labels = (service or "unknown", method, _KINDS[attribute])
        started = self._started.labels(*labels)
        seconds = self._seconds.labels(*labels)
        handled = self._handled

        def done(began: float, code: str) -> None:
            seconds.observe(time.monotonic() - began)
            handled.labels(*labels, code).inc()

        if inspect.isasyncgenfunction(behavior):

            async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
                started.inc()
                began, code = time.monotonic(), "OK"
                try:
                    async for reply in behavior(request, context):
                        yield reply
                except asyncio.CancelledError:
                    # gRPC cancels the handler of a call its client gave up
                    # (before ``context.cancelled()`` says so).
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = _code(context, failed=True)
                    raise
                else:
                    code = _code(context)
                finally:
                    done(began, code)

            wrapped: Any = streamed
        else:

            async def called(request: Any, context: Any) -> Any:
                started.inc()
                began, code = time.monotonic(), "OK"
                try:
                    reply = await behavior(request, context)
                except BaseException:
                    code = _code(context, failed=True)
                    raise
                else:
                    code = _code(context)
                finally:
                    done(began, code)
                return reply

            wrapped = called
        make = getattr(grpc, f"{attribute}_rpc_method_handler")
        return make(  # type: ignore[no-any-return]
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _code(context: Any, *, failed: bool = False) -> str:
    """The status a call ended with: the one set on its context (abort sets
    it), else OK, or UNKNOWN for an exception that set none (CANCELLED when
    the call was cancelled)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and code:
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if not failed:
        return "OK"
    return "CANCELLED" if context.cancelled() else "UNKNOWN"
