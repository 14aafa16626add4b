"""The worker's Prometheus metrics: what its handlers run, and its LLM calls."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskloom.core.metrics import Children, LLMMetrics

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class WorkerMetrics:
    """Every metric a worker exports, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "taskloom_worker_attempts",
            "Attempts this worker's handlers ended, by capability and outcome "
            "(succeeded, failed, timed_out, cancelled, handed_back)",
            ["capability", "outcome"],
            registry=r,
        )
        self.attempt_duration = Histogram(
            "taskloom_worker_attempt_duration_seconds",
            "How long a handler ran, by capability",
            ["capability"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.llm = LLMMetrics(r)
        self._attempts = Children(self.attempts)
        self._durations = Children(self.attempt_duration)

    def observe_attempt(self, capability: str, outcome: str, seconds: float) -> None:
        """Count an attempt that ended with ``outcome`` after running ``seconds``."""
        self._attempts(capability, outcome).inc()
        self._durations(capability).observe(seconds)

    def watch(self, running: Callable[[], int], slots: int, connected: Callable[[], bool]) -> None:
        self.registry.register(_WorkerCollector(running, slots, connected))


class _WorkerCollector(Collector):
    def __init__(self, running: Callable[[], int], slots: int, connected: Callable[[], bool]):
        self._running = running
        self._slots = slots
        self._connected = connected

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("taskloom_worker_running", "Attempts running now")
        running.add_metric([], float(self._running()))
        slots = GaugeMetricFamily(
            "taskloom_worker_concurrency", "Attempts this worker runs at once"
        )
        slots.add_metric([], float(self._slots))
        connected = GaugeMetricFamily(
            "taskloom_worker_connected", "1 while connected to a leading supervisor"
        )
        connected.add_metric([], 1.0 if self._connected() else 0.0)
        yield from (running, slots, connected)

    def describe(self) -> Iterable[Metric]:
        return []
