"""The supervisor's Prometheus metrics.

Counters and histograms are updated where things happen (the orchestrator,
the scheduler, the store, the planner's LLM). The state of the queues, the
workers and the lease is read at scrape time from whichever scheduler leads
(``SchedulerCollector``), so a gauge can never drift from the cache it
describes. No label carries a task or subtask id.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskloom.core.metrics import Children, LLMMetrics
from taskloom.core.model import WorkerInfo
from taskloom.supervisor.outcomes import Outcome


class Lease(Protocol):
    """What the metrics read of a lease (``scheduler.Lease``)."""

    @property
    def capability(self) -> str: ...
    @property
    def assigned_at(self) -> float: ...


class Session(Protocol):
    """What the metrics read of a worker session (``scheduler.WorkerSession``)."""

    @property
    def info(self) -> WorkerInfo: ...
    @property
    def leases(self) -> Collection[object]: ...


class Scheduler(Protocol):
    """What the metrics read of the leading scheduler, at scrape time."""

    def queue_stats(self) -> dict[str, tuple[int, float]]: ...
    def sessions(self) -> Sequence[Session]: ...
    def lease_count(self) -> int: ...
    def busy_by_capability(self) -> dict[str, int]: ...
    def capabilities(self) -> frozenset[str]: ...


DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class SupervisorMetrics:
    """Every metric a supervisor exports, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks_submitted = Counter(
            "taskloom_tasks_submitted", "Tasks stored by SubmitTask or SubmitTasks", registry=r
        )
        self.refused = Counter(
            "taskloom_requests_refused",
            "Calls refused before any work: by reason (missing, invalid or forbidden "
            "token; a per-principal limit; an oversized output)",
            ["reason"],
            registry=r,
        )
        self.tasks_finished = Counter(
            "taskloom_tasks_finished",
            "Tasks that ended, by outcome (succeeded, failed, cancelled)",
            ["outcome"],
            registry=r,
        )
        self.subtasks_finished = Counter(
            "taskloom_subtasks_finished",
            "Subtask attempts whose end was committed, by capability and outcome "
            "(succeeded, retried, failed, cached)",
            ["capability", "outcome"],
            registry=r,
        )
        self.subtask_duration = Histogram(
            "taskloom_subtask_duration_seconds",
            "From assignment to the committed result of a succeeded attempt",
            ["capability"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "taskloom_subtask_queue_wait_seconds",
            "From READY (dispatchable) to assigned",
            ["capability"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.dispatch_latency = Histogram(
            "taskloom_dispatch_duration_seconds",
            "One dispatch batch: choosing workers, committing the assignments, sending them",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.lease_expiries = Counter(
            "taskloom_lease_expiries",
            "Attempts whose worker went silent past the lease TTL",
            registry=r,
        )
        self.overdue = Counter(
            "taskloom_subtask_overdue",
            "Attempts stopped by the supervisor, by reason (timeout, stalled)",
            ["reason"],
            registry=r,
        )
        self.stale_reports = Counter(
            "taskloom_stale_reports",
            "Reports for attempts that no longer held their subtask, discarded",
            registry=r,
        )
        self.progress_cut = Counter(
            "taskloom_progress_cut",
            "Progress and stream messages cut or dropped, by reason (message: a progress "
            "message over its size; chunk: a streamed piece over its size; rate: a worker "
            "over its rate; stream: a subtask's stream over its budget)",
            ["reason"],
            registry=r,
        )
        self.planner_calls = Counter(
            "taskloom_planner_runs",
            "Plans and replans asked of the model, by kind (plan, replan) and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.planner_repairs = Counter(
            "taskloom_planner_repairs",
            "Replies rejected and sent back to the model to be fixed",
            registry=r,
        )
        self.redis_duration = Histogram(
            "taskloom_redis_operation_duration_seconds",
            "One store operation (a Lua transition, a MULTI/EXEC, a read)",
            ["operation"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            "taskloom_redis_errors",
            "Store operations that failed because Redis was unavailable",
            ["operation"],
            registry=r,
        )
        self.redis_durable = Gauge(
            "taskloom_redis_durable",
            "1 if Redis runs with appendonly yes and appendfsync always, so that a crash "
            "of Redis loses nothing acknowledged; 0 if not; -1 if not known (a standby, or "
            "CONFIG GET refused). Read by the leader when it takes the lead",
            registry=r,
        )
        self.redis_durable.set(-1)
        self.approval_wait = Histogram(
            "taskloom_approval_wait_seconds",
            "How long a plan or a subtask waited for a person to approve or reject it, "
            "by kind (plan, subtask); apart from queue wait, which starts at approval",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.approval_alert_after = Gauge(
            "taskloom_approval_alert_after_seconds",
            "TASKLOOM_APPROVAL_ALERT_AFTER: waiting for approval longer than this alerts",
            registry=r,
        )
        self.llm = LLMMetrics(r)
        # Children looked up once: these are updated on every store operation
        # and every batch of results.
        self.redis_operation = Children(self.redis_duration)
        self.redis_failure = Children(self.redis_errors)
        self._tasks_finished = Children(self.tasks_finished)
        self._subtasks_finished = Children(self.subtasks_finished)
        self._queue_wait = Children(self.queue_wait)
        self._subtask_duration = Children(self.subtask_duration)

    def watch(
        self,
        scheduler: Callable[[], Scheduler | None],
        leading: Callable[[], bool],
        approvals: Callable[[], dict[str, tuple[int, float]]] = dict,
        configured: Collection[str] = (),
    ) -> None:
        """Export queue, worker and leader gauges read from the current
        scheduler, and the approvals waiting (kind → count, oldest wait).
        The per-capability gauges have a series, zero if need be, for every
        capability plans may use (``configured`` and the connected workers'):
        an autoscaler's query must see 0, not nothing, for a pool at rest."""
        self.registry.register(SchedulerCollector(scheduler, leading, approvals, configured))

    def observe_outcome(self, outcome: Outcome) -> None:
        """Count what any transition's outcome says: tasks finished, cache hits."""
        for status in outcome.finished_status:
            self._tasks_finished(status.lower()).inc()
        for capability in outcome.cached:
            self._subtasks_finished(capability, "cached").inc()

    def observe_queue_waits(self, waits: Iterable[tuple[str, float]]) -> None:
        """(capability, seconds a subtask waited for a worker) for a batch."""
        for capability, seconds in waits:
            self._queue_wait(capability).observe(seconds)

    def observe_results(self, outcome: Outcome, leases: Sequence[Lease | None], now: float) -> None:
        done: dict[str, int] = {}
        for ok, lease in zip(outcome.committed, leases, strict=True):
            if ok and lease is not None:
                done[lease.capability] = done.get(lease.capability, 0) + 1
                if lease.assigned_at:
                    self._subtask_duration(lease.capability).observe(now - lease.assigned_at)
        for capability, n in done.items():
            self._subtasks_finished(capability, "succeeded").inc(n)

    def observe_failures(
        self,
        outcome: Outcome,
        leases: Sequence[Lease | None],
        retried: Iterable[bool],
    ) -> None:
        for ok, lease, again in zip(outcome.committed, leases, retried, strict=True):
            if ok:
                capability = lease.capability if lease is not None else ""
                self._subtasks_finished(capability, "retried" if again else "failed").inc()


class SchedulerCollector(Collector):
    """Gauges computed at scrape time from the leading scheduler."""

    def __init__(
        self,
        scheduler: Callable[[], Scheduler | None],
        leading: Callable[[], bool],
        approvals: Callable[[], dict[str, tuple[int, float]]],
        configured: Collection[str] = (),
    ) -> None:
        self._scheduler = scheduler
        self._leading = leading
        self._approvals = approvals
        self._configured = frozenset(configured)

    def collect(self) -> Iterator[Metric]:
        leader = GaugeMetricFamily(
            "taskloom_leader", "1 while this supervisor holds the leader lease"
        )
        leader.add_metric([], 1.0 if self._leading() else 0.0)
        yield leader
        depth = GaugeMetricFamily(
            "taskloom_ready_subtasks",
            "READY subtasks waiting for a worker, by capability",
            labels=["capability"],
        )
        age = GaugeMetricFamily(
            "taskloom_ready_oldest_age_seconds",
            "How long the oldest READY subtask has waited for a worker, by capability",
            labels=["capability"],
        )
        workers = GaugeMetricFamily("taskloom_workers_connected", "Connected worker sessions")
        slots = GaugeMetricFamily(
            "taskloom_worker_slots",
            "Worker slots (subtasks they can run at once), by state (total, in_use)",
            labels=["state"],
        )
        leases = GaugeMetricFamily("taskloom_leases", "Attempts held by workers (leases)")
        busy = GaugeMetricFamily(
            "taskloom_busy_subtasks",
            "Attempts held by workers, by capability (with the READY ones: the work "
            "a capability's workers have; what autoscalers scale on)",
            labels=["capability"],
        )
        offered = GaugeMetricFamily(
            "taskloom_capability_workers",
            "Connected workers that offer a capability (0 for one plans may use that none "
            "offers: its READY work waits)",
            labels=["capability"],
        )
        scheduler = self._scheduler()
        if scheduler is not None:
            queues = scheduler.queue_stats()
            held = scheduler.busy_by_capability()
            known = self._configured | scheduler.capabilities() | queues.keys() | held.keys()
            for capability in sorted(known):
                count, oldest = queues.get(capability, (0, 0.0))
                depth.add_metric([capability], float(count))
                age.add_metric([capability], oldest if count else 0.0)
                busy.add_metric([capability], float(held.get(capability, 0)))
            sessions = scheduler.sessions()
            counts = collections.Counter(c for s in sessions for c in s.info.capabilities)
            for capability in sorted(known):
                offered.add_metric([capability], float(counts[capability]))
            workers.add_metric([], float(len(sessions)))
            slots.add_metric(["total"], float(sum(s.info.max_concurrency for s in sessions)))
            slots.add_metric(["in_use"], float(sum(len(s.leases) for s in sessions)))
            leases.add_metric([], float(scheduler.lease_count()))
        else:
            workers.add_metric([], 0.0)
            slots.add_metric(["total"], 0.0)
            slots.add_metric(["in_use"], 0.0)
            leases.add_metric([], 0.0)
        waiting = GaugeMetricFamily(
            "taskloom_awaiting_approval",
            "Plans and subtasks waiting for a person to approve them, by kind (plan, subtask)",
            labels=["kind"],
        )
        longest = GaugeMetricFamily(
            "taskloom_awaiting_approval_oldest_age_seconds",
            "How long the oldest plan or subtask waiting for approval has waited, by kind",
            labels=["kind"],
        )
        approvals = self._approvals() if scheduler is not None else {}
        for kind in ("plan", "subtask"):
            count, age_s = approvals.get(kind, (0, 0.0))
            waiting.add_metric([kind], float(count))
            longest.add_metric([kind], age_s)
        yield from (depth, age, workers, slots, leases, busy, offered, waiting, longest)

    def describe(self) -> Iterable[Metric]:
        return []
