"""gRPC channel and server options shared by every process.

One place for message-size limits and keepalive, so both ends agree: clients
ping every 20 s on idle connections and the server accepts pings that often.
"""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000

Options = list[tuple[str, int | str]]


def _common(max_message_bytes: int) -> Options:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def client_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Options:
    return [
        *_common(max_message_bytes),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after a supervisor restart: the default backoff
        # grows to two minutes, far past a worker's lease. Callers add their
        # own jittered backoff on top.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Options:
    return [
        *_common(max_message_bytes),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def insecure_channel(
    address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> grpc.aio.Channel:
    """A channel to a supervisor (TLS arrives with the security work)."""
    return grpc.aio.insecure_channel(
        address,
        options=client_options(max_message_bytes),
        # OpenTelemetry client spans for unary calls (a no-op unless tracing is
        # set up). Its stream interceptors change how a call behaves when
        # cancelled, which the worker's Connect stream depends on.
        interceptors=[
            i
            for i in aio_client_interceptors()  # type: ignore[no-untyped-call]
            if isinstance(i, grpc.aio.UnaryUnaryClientInterceptor)
        ],
    )
