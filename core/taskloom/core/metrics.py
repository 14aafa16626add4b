"""What every process exports to Prometheus: LLM calls, and the HTTP endpoint.

Each process keeps its metrics in a ``CollectorRegistry`` of its own (tests
make a fresh one) and serves it on ``/metrics`` at ``--metrics-port``. Names
follow Prometheus' rules: the ``taskloom_`` prefix, base units (seconds),
``_total`` on counters (added by prometheus-client), and never a task or
subtask id as a label.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.trace import SpanKind
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from taskloom.core.llm.base import LLM, ChatMessage, ChatReply, TextCallback, WrappedLLM
from taskloom.core.model import Usage
from taskloom.core.prices import PriceTable
from taskloom.core.tracing import genai_attributes, record_content, response_attributes, tracer

LLM_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
"""LLM calls take from a fraction of a second to minutes."""


class Children:
    """The labelled children of one metric, each looked up once.

    ``metric.labels(...)`` takes a lock and builds a key on every call, which
    costs more than the update; on a hot path (every store operation, every
    attempt) keep the child. Label values come from small fixed sets here
    (operations, capabilities, outcomes), so the cache stays small.
    """

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class LLMMetrics:
    """LLM requests, their duration and tokens, by model (``provider:model``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "taskloom_llm_requests",
            "LLM calls by model, operation (plan, generate) and outcome (ok, error)",
            ["model", "operation", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "taskloom_llm_request_duration_seconds",
            "Time from sending an LLM call to its last token",
            ["model", "operation"],
            buckets=LLM_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "taskloom_llm_tokens",
            "LLM tokens by model and direction (input: prompt, output: completion)",
            ["model", "direction"],
            registry=registry,
        )
        self.rate_waits = Counter(
            "taskloom_llm_rate_limit_waits",
            "Waits before an LLM call, by model and reason (limit: the shared "
            "TASKLOOM_RATE_LIMITS bucket was empty; provider: it answered 429)",
            ["model", "reason"],
            registry=registry,
        )
        self.rate_wait_seconds = Counter(
            "taskloom_llm_rate_limit_wait_seconds",
            "Time LLM calls waited for rate limits, by model",
            ["model"],
            registry=registry,
        )
        self.cost = Counter(
            "taskloom_llm_cost",
            "What LLM calls cost by model, in the price table's currency (US dollars "
            "unless TASKLOOM_PRICES_FILE says otherwise)",
            ["model"],
            registry=registry,
        )


class InstrumentedLLM(WrappedLLM):
    """A backend whose every call is counted in ``LLMMetrics`` and priced by
    ``prices``: each reply's usage carries its cost."""

    def __init__(
        self,
        inner: LLM,
        metrics: LLMMetrics,
        operation: str,
        prices: PriceTable | None = None,
    ) -> None:
        super().__init__(inner)
        self._metrics = metrics
        self._operation = operation
        self.prices = prices or PriceTable()
        """Replaced when the supervisor sends its table (workers)."""

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        schema: Mapping[str, Any] | None = None,
        temperature: float = 0.0,
        on_text: TextCallback | None = None,
        max_tokens: int = 0,
        context_tokens: int = 0,
    ) -> ChatReply:
        model = self.describe()
        started = time.monotonic()
        with tracer().start_as_current_span(
            f"chat {self.model}",
            kind=SpanKind.CLIENT,
            attributes=genai_attributes(self.provider, self.model),
        ) as span:
            if record_content():
                span.set_attribute("taskloom.prompt", "\n\n".join(m.content for m in messages))
            try:
                reply = await super().chat(
                    messages,
                    schema=schema,
                    temperature=temperature,
                    on_text=on_text,
                    max_tokens=max_tokens,
                    context_tokens=context_tokens,
                )
            except Exception:
                self._metrics.requests.labels(model, self._operation, "error").inc()
                raise
            finally:
                self._metrics.duration.labels(model, self._operation).observe(
                    time.monotonic() - started
                )
            reply = self.priced(reply)
            span.set_attributes(genai_attributes(self.provider, self.model, reply.usage))
            span.set_attributes(response_attributes(reply))
            span.set_attribute("taskloom.cost", reply.usage.cost)
            if record_content():
                span.set_attribute("taskloom.completion", reply.text)
        self._metrics.requests.labels(model, self._operation, "ok").inc()
        self._metrics.tokens.labels(model, "input").inc(reply.usage.input_tokens)
        self._metrics.tokens.labels(model, "output").inc(reply.usage.output_tokens)
        return reply

    def priced(self, reply: ChatReply) -> ChatReply:
        """``reply`` with its usage's cost (none for a model without a price)."""
        usage = self._costed(reply.usage)
        return reply if usage is reply.usage else replace(reply, usage=usage)

    def charge(self, usage: Usage) -> Usage:
        """``usage`` (of a call that did not return: cancelled, cut) priced and counted."""
        self._metrics.tokens.labels(usage.model, "input").inc(usage.input_tokens)
        self._metrics.tokens.labels(usage.model, "output").inc(usage.output_tokens)
        return self._costed(usage)

    def _costed(self, usage: Usage) -> Usage:
        costed = self.prices.costed(usage)
        if costed.costs:
            self._metrics.cost.labels(usage.model).inc(costed.cost)
        return costed


# A ``_created`` series per counter and histogram doubles what is scraped and
# says nothing a dashboard uses (OpenMetrics' own advice for this case).
disable_created_metrics()  # type: ignore[no-untyped-call]
_WITH_PROCESS: set[CollectorRegistry] = set()


def serve_metrics(
    port: int,
    registry: CollectorRegistry,
    host: str = "0.0.0.0",
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> int:
    """Serve ``registry`` on ``http://host:port/metrics`` (``https`` with a
    certificate and key) from a thread; returns the port (useful with 0: any
    free port). The process's own metrics (``process_*``, ``python_*``) are
    served with it."""
    if registry not in _WITH_PROCESS:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        _WITH_PROCESS.add(registry)
    server, _ = start_http_server(
        port, addr=host, registry=registry, certfile=certfile, keyfile=keyfile
    )
    return int(server.server_port)
