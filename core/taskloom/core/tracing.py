"""OpenTelemetry traces: one trace per task, across the supervisor and workers.

``setup_tracing`` follows OpenTelemetry's standard variables:

- ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console``, ``none`` or a comma list
  (default: ``otlp`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``..._TRACES_ENDPOINT`` is set, else none: tracing stays a no-op);
  ``TASKLOOM_TRACE_CONSOLE=1`` adds ``console``.
- ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``:
  ``grpc`` (the default here, port 4317) or ``http/protobuf`` (port 4318); the
  exporters read their own endpoint, headers, timeout and TLS variables.
- ``OTEL_TRACES_SAMPLER`` / ``..._ARG`` (the SDK's samplers, e.g.
  ``parentbased_traceidratio`` with ``0.1``), ``OTEL_SERVICE_NAME``,
  ``OTEL_RESOURCE_ATTRIBUTES``, and ``OTEL_PROPAGATORS`` (default
  ``tracecontext,baggage``) for the gRPC calls between processes.

The task's root span context travels inside each Assignment (stream metadata
would carry one per stream, not one per subtask). Prompts and outputs are
recorded only with ``TASKLOOM_TRACE_CONTENT=1``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from taskloom.core.errors import ConfigError
from taskloom.core.model import Usage

_PROPAGATOR = TraceContextTextMapPropagator()
EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")


def exporters() -> list[str]:
    """The span exporters the environment asks for (``[]``: none)."""
    endpoint = any(
        os.environ.get(v)
        for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "").strip() or ("otlp" if endpoint else "none")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not an exporter taskloom has; "
            f"use {', '.join(EXPORTERS)} (or several, with commas)"
        )
    if os.environ.get("TASKLOOM_TRACE_CONSOLE") == "1" and "console" not in names:
        names.append("console")
    return [n for n in names if n != "none"]


def otlp_protocol() -> str:
    """``grpc`` or ``http/protobuf``, from the standard variables."""
    raw = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if raw not in PROTOCOLS:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {raw!r} is not supported; use grpc or http/protobuf"
        )
    return raw


def setup_tracing(service: str) -> bool:
    """Install a tracer provider with the exporters the environment asks for;
    False if it asks for none (tracing stays a no-op). Spans still queued
    are flushed when the process exits."""
    names = exporters()
    protocol = otlp_protocol() if "otlp" in names else ""
    if not names:
        return False
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        raise ConfigError(
            "OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT: exporting traces needs the "
            "OpenTelemetry SDK; install it with pip install 'taskloom[otel]'"
        ) from None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
        SpanExporter,
    )

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service)})
    # No sampler given: the SDK reads OTEL_TRACES_SAMPLER and its argument.
    provider = TracerProvider(resource=resource, id_generator=attempt_ids())
    if protocol:
        exporter: SpanExporter
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HTTPSpanExporter,
            )

            exporter = HTTPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if "console" in names:
        # On stderr: stdout is for what a command prints (--json).
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)
    return True


def tracer() -> trace.Tracer:
    return trace.get_tracer("taskloom")


def tracing() -> bool:
    """Whether a tracer provider is installed: without one every span is a
    no-op, and a hot path may skip making them (a span costs tens of µs)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def record_content() -> bool:
    """Whether prompts and outputs may go into spans."""
    return os.environ.get("TASKLOOM_TRACE_CONTENT") == "1"


def carrier(span: Span) -> dict[str, str]:
    """The W3C trace context of ``span``, to store with a task and send in its
    assignments: taskloom's own record, whatever ``OTEL_PROPAGATORS`` says
    (those govern the gRPC calls between processes)."""
    out: dict[str, str] = {}
    _PROPAGATOR.inject(out, context=trace.set_span_in_context(span))
    return out


def parent(carried: Mapping[str, str]) -> otel_context.Context | None:
    """The context a carried ``traceparent`` names (None if there is none)."""
    if not carried.get("traceparent"):
        return None
    return _PROPAGATOR.extract(dict(carried))


def ids(span: Span) -> tuple[str, str]:
    """``(trace_id, span_id)`` in hex, or empty strings for a no-op span."""
    context = span.get_span_context()
    if not context.is_valid:
        return "", ""
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def genai_attributes(provider: str, model: str, usage: Usage | None = None) -> dict[str, Any]:
    """OpenTelemetry GenAI semantic-convention attributes of a chat."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "gen_ai.request.model": model,
    }
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.input_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
    return attributes


def response_attributes(reply: Any) -> dict[str, Any]:
    """``gen_ai.response.*`` of a ``ChatReply``: what the provider said of its
    answer (the model that gave it, its id, why it stopped), where it said."""
    attributes: dict[str, Any] = {}
    if reply.model:
        attributes["gen_ai.response.model"] = reply.model
    if reply.response_id:
        attributes["gen_ai.response.id"] = reply.response_id
    if reply.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = [reply.finish_reason]
    return attributes


_NEXT_SPAN_ID: ContextVar[int] = ContextVar("taskloom_next_span_id", default=0)


def attempt_ids() -> Any:
    """The SDK's random id generator, except for a span started under
    ``span_id_for``: an attempt's span id is made from its task, subtask and
    attempt number, so that the next attempt, on whichever worker, can link
    to it. (Built here: the SDK is the otel extra's.)"""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class AttemptIds(RandomIdGenerator):
        def generate_span_id(self) -> int:
            wanted = _NEXT_SPAN_ID.get()
            if wanted:
                _NEXT_SPAN_ID.set(0)
                return wanted
            return super().generate_span_id()

    return AttemptIds()


def attempt_span_id(task_id: str, subtask_id: str, attempt: int) -> int:
    """The span id of an attempt's span (64 bits of a hash; never 0)."""
    digest = hashlib.blake2b(f"{task_id}/{subtask_id}/{attempt}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") or 1


@contextlib.contextmanager
def span_id_for(span_id: int) -> Iterator[None]:
    """The next span started here gets ``span_id`` (with ``AttemptIds``)."""
    token = _NEXT_SPAN_ID.set(span_id)
    try:
        yield
    finally:
        _NEXT_SPAN_ID.reset(token)


def previous_attempt(
    carried: Mapping[str, str], task_id: str, subtask_id: str, attempt: int
) -> list[Link]:
    """A link to the attempt before ``attempt`` of a subtask (none for the first)."""
    context = parent(carried)
    if attempt <= 1 or context is None:
        return []
    task = trace.get_current_span(context).get_span_context()
    before = SpanContext(
        task.trace_id,
        attempt_span_id(task_id, subtask_id, attempt - 1),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return [Link(before, {"taskloom.attempt": attempt - 1})]
