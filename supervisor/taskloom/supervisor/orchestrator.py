"""The life of a task in one term of leadership: reports in, outcomes out.

The orchestrator is what the gRPC servicers call. It holds no state of its
own beyond the scheduler's cache: every decision is committed to the store
first (write before you tell), and only then are workers and watchers told.
It runs the term (recovery from Redis, dispatch, lease expiry, deadlines),
commits what workers report, and is the one place that acts on what a write
changed (``apply``). Its collaborators each own one concern:

- ``commands.Commands``: what clients ask (submit, read, list, cancel);
- ``planning.Planning``: plans and replans asked of the model;
- ``watching.Watching``: watches of a task's log and waits for ends;
- ``scheduler.Scheduler``: READY queues, worker sessions and leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, Status, StatusCode

from taskloom.core.errors import StoreUnavailable
from taskloom.core.limits import cut_text, fit_output
from taskloom.core.memory import release_memory
from taskloom.core.model import (
    AttemptRef,
    Event,
    ProgressUpdate,
    SubtaskFailure,
    SubtaskResult,
    SubtaskStatus,
    TaskStatus,
    Usage,
    WorkerInfo,
)
from taskloom.core.tracing import parent, tracer, tracing
from taskloom.supervisor.commands import Commands
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.outcomes import Handed, Outcome, ReadyItem
from taskloom.supervisor.planner import Planner
from taskloom.supervisor.planning import Planning
from taskloom.supervisor.scheduler import CancelAttempts, Lease, Offer, Scheduler, WorkerSession
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.supervisor.store import Store
from taskloom.supervisor.watching import Watching

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEADLINE_INTERVAL = 1.0
"""How often tasks are checked against their max_duration."""
JANITOR_INTERVAL = 60.0
COMPACT_INTERVAL = 1.0
"""Seconds between looks for finished tasks to compact."""
COMPACT_BATCH = 100
"""Tasks compacted per look (more if that many were due)."""
LARGE_TASK = 1_000
"""Subtasks of a task whose end returns the supervisor's freed memory to the system."""
STREAM_PIECE_BYTES = 64 * 1024
"""Largest piece of streamed text one message may log (a worker sends one
every 0.1 s, so an honest one stays far below)."""
"""How often finished tasks past their retention leave the indexes."""


class Orchestrator:
    """Runs tasks from submission to their end, through the store and the scheduler."""

    def __init__(
        self,
        settings: SupervisorSettings,
        store: Store,
        planner: Planner,
        scheduler: Scheduler,
        metrics: SupervisorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or SupervisorMetrics()
        self.store = store
        self.scheduler = scheduler
        scheduler.on_expired = self._leases_expired
        scheduler.on_overdue = self._leases_overdue
        scheduler.on_outcome = self.apply
        self.planning = Planning(settings, store, planner, scheduler, self.metrics, self)
        self.watching = Watching(store, self.task_ended)
        self.commands = Commands(settings, store, scheduler, self.planning, self.metrics, self)
        self._unbroken_jobs: set[asyncio.Future[Any]] = set()
        self._spans: dict[str, Span] = {}
        """The root span of each task this term created, until it ends."""
        self.stale_reports = 0
        """Reports for attempts that no longer hold their subtask: dropped, counted."""
        self.awaiting: dict[tuple[str, str], float] = {}
        """``(task, subtask)`` waiting for a person's approval (subtask '' for a
        plan) → since when (Unix time): for the gauges and the alert."""
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Pick up unfinished tasks from Redis, then start dispatching."""
        await self.recover()
        self.watching.start()
        self._loops = [
            asyncio.create_task(self.scheduler.run(), name="taskloom-dispatch"),
            asyncio.create_task(self._janitor(), name="taskloom-janitor"),
            asyncio.create_task(self._compactor(), name="taskloom-compactor"),
            asyncio.create_task(self._resync_forever(), name="taskloom-resync"),
            asyncio.create_task(self._deadlines_forever(), name="taskloom-deadlines"),
        ]

    async def stop(self) -> None:
        """Stop deciding: no dispatch, no lease expiry, no planning; end watches.

        Called first when the supervisor goes away, so that while its RPCs
        finish it cannot expire the leases of workers it told to go elsewhere.
        Reports that still arrive are committed as usual.
        """
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, self.planning.stop(), return_exceptions=True)
        await self.watching.stop()
        # The tasks this term created go on under the next leader, which
        # marks their end with a span of its own (``_ended_elsewhere``).
        spans, self._spans = self._spans, {}
        for span in spans.values():
            span.set_attribute("taskloom.handed_over", True)
            span.end()

    async def recover(self) -> None:
        """Rebuild the scheduler's cache from the unfinished tasks in Redis.

        PLANNING tasks are planned again; READY subtasks are queued; ASSIGNED
        and RUNNING ones get a lease that lasts one TTL, so their workers can
        reconnect and keep them, or they run again. Safe to run again at any
        time: what the cache already knows is left as it is, and a subtask
        queued twice is assigned once.
        """
        tasks = await self.store.load_active()
        queued = leased = 0
        for task in tasks:
            self.scheduler.set_task_limit(task.task_id, task.options.max_parallel)
            if task.status == TaskStatus.PLANNING:
                if not self.planning.busy(task.task_id):
                    self.planning.plan(task.task_id, task.goal, task.options)
                continue
            if task.awaiting_since is not None:
                self.awaiting[(task.task_id, "")] = task.awaiting_since
            if task.replan_pending and not self.planning.busy(task.task_id):
                self.planning.replan(task.task_id, task.replan_pending)
            # A paused task, or one whose plan waits, starts nothing: its
            # READY subtasks are queued when it is resumed or approved.
            startable = not task.paused and task.status == TaskStatus.RUNNING
            ready = []
            for sub in task.subtasks:
                if sub.status == SubtaskStatus.AWAITING_APPROVAL:
                    self.awaiting[(task.task_id, sub.subtask_id)] = sub.ready_at or time.time()
                elif sub.status == SubtaskStatus.READY and startable:
                    # A retry goes on waiting out its backoff where it was.
                    ready.append(
                        ReadyItem(
                            task.task_id,
                            sub.subtask_id,
                            sub.capability,
                            task.options.priority,
                            retry_at=sub.retry_at,
                        )
                    )
                elif sub.status in (SubtaskStatus.ASSIGNED, SubtaskStatus.RUNNING):
                    ref = AttemptRef(task.task_id, sub.subtask_id, sub.attempt)
                    if self.scheduler.holds(ref):
                        continue
                    self.scheduler.restore_lease(
                        ref,
                        sub.worker_id,
                        sub.worker,
                        deadline=sub.deadline,
                        stall_timeout=task.options.stall_timeout,
                        capability=sub.capability,
                    )
                    leased += 1
            self.scheduler.enqueue(ready)
            queued += len(ready)
        if tasks:
            logger.info(
                "recovered %d unfinished tasks: %d subtasks queued, %d held by workers",
                len(tasks),
                queued,
                leased,
            )

    # -- workers ---------------------------------------------------------------------

    def worker_connected(self, info: WorkerInfo) -> WorkerSession:
        session, stale = self.scheduler.connect(info)
        logger.info(
            "worker %s connected: %s, %d slots, %d in flight",
            info.name,
            ",".join(sorted(info.capabilities)),
            info.max_concurrency,
            len(info.in_flight),
        )
        if stale:
            # Their results, if any, are late: the worker drops them.
            self._stale(len(stale))
            logger.info("worker %s holds %d stale attempts; cancelling them", info.name, len(stale))
            session.send(CancelAttempts(tuple(stale), "no longer assigned to this worker"))
        return session

    def worker_disconnected(self, session: WorkerSession) -> None:
        self.scheduler.disconnect(session)
        logger.info("worker %s disconnected", session.info.name)

    def heard_from(self, session: WorkerSession, *, draining: bool | None = None) -> None:
        self.scheduler.heard_from(session, draining=draining)

    async def accepted(self, refs: Sequence[AttemptRef], worker_id: str = "") -> None:
        self.scheduler.touch(refs, worker_id)
        ok = await self.store.start(refs, worker_id)
        self._count_stale(ok)

    async def progress(
        self,
        updates: Sequence[ProgressUpdate],
        worker_id: str = "",
        session: WorkerSession | None = None,
    ) -> None:
        """Log progress and streamed text within their caps: a message or a
        piece over its size is cut, a worker over its rate loses the excess,
        and a subtask's stream stops at its budget (``progress.lua``)."""
        self.scheduler.touch((u.ref for u in updates), worker_id)
        if session is not None:
            allowed = session.progress_allowance(
                len(updates), self.settings.max_progress_rate, time.monotonic()
            )
            if allowed < len(updates):
                self.metrics.progress_cut.labels("rate").inc(len(updates) - allowed)
                updates = updates[:allowed]
        fitted = []
        for update in updates:
            message, cut = cut_text(
                update.message, self.settings.max_progress_bytes, "TASKLOOM_MAX_PROGRESS_BYTES"
            )
            if cut:
                self.metrics.progress_cut.labels("message").inc()
            text, cut = cut_text(update.text, STREAM_PIECE_BYTES, "one streamed piece")
            if cut:
                self.metrics.progress_cut.labels("chunk").inc()
            fitted.append(ProgressUpdate(update.ref, message, text))
        if not fitted:
            return
        ok = await self.store.progress(fitted, worker_id, self.settings.max_stream_bytes)
        self._count_stale(ok)

    async def stopped(
        self, session: WorkerSession, stopped: Sequence[tuple[AttemptRef, Usage]]
    ) -> None:
        """The worker acknowledged a Cancel: those handlers have stopped."""
        await self.store.stopped(stopped, session.info.name, session.info.worker_id)

    async def completed(
        self, results: Sequence[SubtaskResult], worker_id: str = ""
    ) -> list[AttemptRef]:
        """Commit results; returns the refs to acknowledge (committed or stale).

        An output over ``max_output_bytes`` fails its subtask for good, or is
        cut, as ``output_overflow`` says; workers apply the same limit (the
        Welcome tells them), so only a broken or hostile one gets this far.
        """
        fitted: list[SubtaskResult] = []
        over: list[SubtaskFailure] = []
        truncate = self.settings.output_overflow == "truncate"
        for result in results:
            output, error = fit_output(
                result.output, self.settings.max_output_bytes, truncate=truncate
            )
            if error:
                over.append(SubtaskFailure(result.ref, error, retryable=False, usage=result.usage))
            else:
                fitted.append(result if output is result.output else replace(result, output=output))
        if over:
            self.metrics.refused.labels("output_too_large").inc(len(over))
            refs = [f.ref for f in over]
            await self.unbroken(self._commit(self.store.fail(over, worker_id), refs, failed=True))
        if fitted:
            refs = [r.ref for r in fitted]
            # The dependents these results unlock go to workers in the same
            # step, as far as free slots were offered for them.
            offer = self.scheduler.offer_for(refs)
            write = self.store.complete(fitted, worker_id, offer=offer.slots(), limits=offer.limits)
            await self.unbroken(self._commit(write, refs, failed=False, offer=offer))
        return [r.ref for r in results]

    async def failed(
        self, failures: Sequence[SubtaskFailure], worker_id: str = ""
    ) -> list[AttemptRef]:
        """Commit failures; returns the refs to acknowledge."""
        refs = [f.ref for f in failures]
        await self.unbroken(self._commit(self.store.fail(failures, worker_id), refs, failed=True))
        return refs

    async def _commit(
        self,
        write: Awaitable[Outcome],
        refs: Sequence[AttemptRef],
        *,
        failed: bool,
        offer: Offer | None = None,
    ) -> None:
        leases = [self.scheduler.lease(ref) for ref in refs]
        handed: Sequence[Handed] = ()
        try:
            with self.checked():
                outcome = await write
            handed = outcome.handed
        finally:
            if offer is not None:
                self.scheduler.take(offer, handed)
        self._observe(outcome, refs, leases, failed=failed)
        self.apply(outcome, refs)

    def _observe(
        self,
        outcome: Outcome,
        refs: Sequence[AttemptRef],
        leases: Sequence[Lease | None],
        *,
        failed: bool,
    ) -> None:
        """Count committed attempts by outcome (the leases say their capability)."""
        if not failed:
            self.metrics.observe_results(outcome, leases, time.monotonic())
            return
        again = {(i.task_id, i.subtask_id) for i in outcome.ready}
        retried = [(ref.task_id, ref.subtask_id) in again for ref in refs]
        self.metrics.observe_failures(outcome, leases, retried)

    async def _leases_expired(self, leases: list[Lease]) -> None:
        failures = [
            SubtaskFailure(
                lease.ref,
                f"worker {lease.worker_name} stopped answering and its lease expired",
                retryable=True,
                counts=False,
            )
            for lease in leases
        ]
        for lease in leases:
            logger.warning("lease %s of worker %s expired", lease.ref, lease.worker_name)
        self.metrics.lease_expiries.inc(len(leases))
        outcome = await self.store.fail(failures)
        refs = [lease.ref for lease in leases]
        self._observe(outcome, refs, leases, failed=True)
        self.apply(outcome, refs)

    async def _leases_overdue(self, overdue: list[tuple[Lease, str]]) -> None:
        """Attempts past their timeout, or stalled: stop them and run them again."""
        for lease, why in overdue:
            logger.warning("%s on worker %s %s", lease.ref, lease.worker_name, why)
            self.metrics.overdue.labels("stalled" if "stalled" in why else "timeout").inc()
        outcome = await self.store.fail(
            [SubtaskFailure(lease.ref, why, retryable=True) for lease, why in overdue]
        )
        refs = [lease.ref for lease, _ in overdue]
        self._observe(outcome, refs, [lease for lease, _ in overdue], failed=True)
        self.stop_attempts(refs, "; ".join(sorted({why for _, why in overdue})))
        self.apply(outcome, refs)

    # -- the one place that acts on a write's outcome ------------------------------------

    def apply(
        self,
        outcome: Outcome,
        refs: Sequence[AttemptRef] = (),
        *,
        reason: str = "the task failed",
    ) -> None:
        """Tell everyone what a committed write changed: count it, stop the
        attempts of tasks it ended (for ``reason``), end those tasks, free the
        slots of the attempts ``refs`` it reported on, queue what it made
        READY, ask for replans."""
        self._count_stale(outcome.committed)
        self.metrics.observe_outcome(outcome)
        if outcome.held:
            self.stop_attempts(outcome.held, reason)
        now = time.time()
        for task_id, subtask_id in outcome.awaiting:
            self.awaiting[(task_id, subtask_id)] = now
        for task_id, subtask_id, waited in outcome.approved:
            self.awaiting.pop((task_id, subtask_id), None)
            self.metrics.approval_wait.labels("subtask" if subtask_id else "plan").observe(waited)
        for task_id in outcome.reopened:
            self.watching.reopened(task_id)
        for task_id, status in zip(outcome.finished, outcome.finished_status, strict=False):
            self.task_ended(
                task_id,
                TaskStatus(status),
                outcome.ended.get(task_id),
                outcome.snapshots.get(task_id),
            )
        self.scheduler.release(refs)
        self.scheduler.enqueue(outcome.ready)
        for task_id, subtask_id in outcome.replan:
            self.planning.replan(task_id, subtask_id)
        for task_id in outcome.finished:
            logger.info("task %s finished", task_id)
            self.scheduler.forget_task(task_id)

    def started(self, task_id: str, owner: str, span: Span) -> None:
        """A task this term created: waits for it need no read, and its root
        span ends with it."""
        self._spans[task_id] = span
        self.watching.created(task_id, owner)

    def task_ended(
        self,
        task_id: str,
        status: TaskStatus,
        event: Event | None = None,
        snapshot: Any = None,
    ) -> None:
        """The task ended: tell who waits for its end (with its terminal
        event, and the task as it ended, if the write that ended it returned
        them) and end its span."""
        self.watching.ended(task_id, event, snapshot)
        for key in [k for k in self.awaiting if k[0] == task_id]:
            del self.awaiting[key]
        span = self._spans.pop(task_id, None)
        if span is not None:
            _finish_span(span, status)
        elif tracing():
            job = asyncio.ensure_future(self._ended_elsewhere(task_id, status))
            self._unbroken_jobs.add(job)
            job.add_done_callback(self._unbroken_done)

    async def _ended_elsewhere(self, task_id: str, status: TaskStatus) -> None:
        """A task whose root span another term started (before a failover)
        ended here: a ``task.ended`` span in its trace, linked to that root,
        says how."""
        carried = await self.store.trace_of(task_id)
        context = parent(carried)
        if context is None:
            return
        root = trace.get_current_span(context).get_span_context()
        span = tracer().start_span(
            "task.ended",
            context=context,
            links=[Link(root, {"taskloom.link": "the task's root span"})],
            attributes={"taskloom.task_id": task_id},
        )
        _finish_span(span, status)

    async def task_context(self, task_id: str) -> Context | None:
        """The context of the task's root span, from memory or from Redis."""
        span = self._spans.get(task_id)
        if span is not None:
            return trace.set_span_in_context(span)
        return parent(await self.store.trace_of(task_id))

    def approvals(self) -> dict[str, tuple[int, float]]:
        """``plan`` and ``subtask`` → (how many wait for approval, the oldest's
        wait in seconds); read by the metrics thread, from a copy."""
        now = time.time()
        out = {"plan": (0, 0.0), "subtask": (0, 0.0)}
        for (_, subtask_id), since in list(self.awaiting.items()):
            kind = "subtask" if subtask_id else "plan"
            count, oldest = out[kind]
            out[kind] = (count + 1, max(oldest, now - since))
        return out

    def stop_attempts(self, refs: Iterable[AttemptRef], reason: str) -> None:
        """Tell the workers holding these attempts to stop, and free the slots."""
        by_session: dict[WorkerSession, list[AttemptRef]] = defaultdict(list)
        refs = list(refs)
        for ref in refs:
            session = self.scheduler.holder(ref)
            if session is not None:
                by_session[session].append(ref)
        for session, held in by_session.items():
            session.send(CancelAttempts(tuple(held), reason))
        self.scheduler.release(refs)

    def unbroken(self, work: Awaitable[T]) -> Awaitable[T]:
        """Run ``work`` to its end even if the caller is cancelled (its worker's
        stream or its client's call ended). A write to Redis and what the
        scheduler learns from it must not come apart: subtasks made READY in
        Redis but never queued would wait for ever."""
        job = asyncio.ensure_future(work)
        self._unbroken_jobs.add(job)
        job.add_done_callback(self._unbroken_done)
        return asyncio.shield(job)

    def _unbroken_done(self, job: asyncio.Future[Any]) -> None:
        self._unbroken_jobs.discard(job)
        if not job.cancelled():
            job.exception()  # retrieved here: the caller that wanted it may be gone

    def _count_stale(self, committed: Sequence[bool]) -> None:
        stale = sum(1 for ok in committed if not ok)
        if stale:
            self._stale(stale)
            logger.debug("discarded %d stale reports", stale)

    def _stale(self, count: int) -> None:
        self.stale_reports += count
        self.metrics.stale_reports.inc(count)

    @contextlib.contextmanager
    def checked(self) -> Iterator[None]:
        """A transition whose reply may be lost: if so, check the cache against Redis."""
        try:
            yield
        except StoreUnavailable:
            self.scheduler.out_of_sync.set()
            raise

    # -- the term's loops ------------------------------------------------------------------

    async def _resync_forever(self) -> None:
        """After a write whose reply was lost (Redis died mid-way), Redis may
        have made subtasks READY or ASSIGNED that this cache does not know:
        once Redis answers, pick them up as at start-up."""
        while True:
            await self.scheduler.out_of_sync.wait()
            await asyncio.sleep(0.5)
            self.scheduler.out_of_sync.clear()
            try:
                await self.recover()
            except StoreUnavailable:
                self.scheduler.out_of_sync.set()

    async def _deadlines_forever(self) -> None:
        """End tasks that ran past their max_duration (BUDGET_EXCEEDED)."""
        while True:
            await asyncio.sleep(DEADLINE_INTERVAL)
            try:
                with self.checked():
                    outcome = await self.store.expire_overdue()
            except StoreUnavailable as e:
                logger.warning("deadlines: %s", e)
                continue
            for task_id in outcome.finished:
                logger.info("task %s ran past its max_duration", task_id)
            self.apply(outcome, reason="the task ran past its max_duration")

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            try:
                await self.store.trim_indexes()
                await self.store.sweep_staging()
            except StoreUnavailable as e:
                logger.warning("janitor: %s", e)

    async def _compactor(self) -> None:
        """Compact finished tasks once they are ``compact_after`` old (store.compact)."""
        while True:
            await asyncio.sleep(COMPACT_INTERVAL)
            try:
                largest = 0
                while True:
                    due, most = await self.store.compact_finished(limit=COMPACT_BATCH)
                    largest = max(largest, most)
                    if due < COMPACT_BATCH:  # else more may be due
                        break
            except StoreUnavailable as e:
                logger.warning("compactor: %s", e)
                continue
            if largest >= LARGE_TASK:
                # What a large task took while it ran goes back to the system.
                release_memory()


def _finish_span(span: Span, status: TaskStatus) -> None:
    span.set_attribute("taskloom.status", str(status))
    if status != TaskStatus.SUCCEEDED:
        span.set_status(Status(StatusCode.ERROR, str(status)))
    span.end()
