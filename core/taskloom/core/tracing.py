"""OpenTelemetry traces: one trace per task, across the supervisor and workers.

``setup_tracing`` installs an exporter only when asked: the OTLP exporter when
the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``, or
``OTEL_TRACES_EXPORTER=otlp``) is set, the console exporter with
``TASKLOOM_TRACE_CONSOLE=1``; otherwise tracing stays a no-op. The task's root
span context travels as a W3C ``traceparent`` inside each Assignment (stream
metadata would carry one per stream, not one per subtask). Prompts and outputs
are recorded only with ``TASKLOOM_TRACE_CONTENT=1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from taskloom.core.model import Usage

_PROPAGATOR = TraceContextTextMapPropagator()


def setup_tracing(service: str) -> None:
    """Install a tracer provider with the exporters the environment asks for."""
    otlp = (
        any(
            os.environ.get(v)
            for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        or os.environ.get("OTEL_TRACES_EXPORTER", "") == "otlp"
    )
    console = os.environ.get("TASKLOOM_TRACE_CONSOLE") == "1"
    if not (otlp or console):
        return
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource)
    if otlp:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


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
    """The W3C trace context of ``span``, to send along."""
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
