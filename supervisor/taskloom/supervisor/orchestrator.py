"""The life of a task: submit, plan, schedule, collect reports, finish.

The orchestrator is what the gRPC servicers call. It holds no state of its
own beyond the scheduler's cache: every decision is committed to the store
first (write before you tell), and only then are workers and watchers told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from taskloom.core.auth import LOCAL_ADMIN, Principal
from taskloom.core.errors import (
    InvalidArgument,
    LLMError,
    LLMUnavailable,
    PlanError,
    StoreUnavailable,
    TaskFinished,
    TaskNotFound,
    Unavailable,
)
from taskloom.core.limits import fit_output
from taskloom.core.logs import bind
from taskloom.core.model import (
    AttemptRef,
    Event,
    EventType,
    FailureReason,
    Fallback,
    Plan,
    PlannedSubtask,
    ProgressUpdate,
    SubtaskFailure,
    SubtaskResult,
    SubtaskStatus,
    Task,
    TaskOptions,
    TaskStatus,
    Usage,
    WorkerInfo,
)
from taskloom.core.plan import check_plan, finalize
from taskloom.core.tracing import carrier, genai_attributes, ids, parent, tracer
from taskloom.supervisor.events import EventHub
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.outcomes import Handed, Outcome, ReadyItem
from taskloom.supervisor.planner import PlanHooks, Planner
from taskloom.supervisor.scheduler import CancelAttempts, Lease, Offer, Scheduler, WorkerSession
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.supervisor.store import Store

logger = logging.getLogger(__name__)
T = TypeVar("T")

_EVENT_ID = re.compile(r"^\d+-\d+$")
_UNFINISHED = (TaskStatus.PLANNING, TaskStatus.RUNNING, TaskStatus.AWAITING_APPROVAL)
WATCH_WAIT = 5.0
"""A watcher waiting for events checks its task and the supervisor this often."""
RECENT_ENDS = 2048
RECENT_ENDS_TTL = 60.0
"""How many ends of tasks, and for how long (seconds), a terminal-only watch is
answered from memory; older ones are read from Redis."""
DEADLINE_INTERVAL = 1.0
"""How often tasks are checked against their max_duration."""


class BudgetSpent(Exception):
    """Planning used up the task's max_tokens; the task has ended."""


JANITOR_INTERVAL = 60.0


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
        self.planner = planner
        self.scheduler = scheduler
        scheduler.on_expired = self._leases_expired
        scheduler.on_overdue = self._leases_overdue
        self._planning_slots = asyncio.Semaphore(settings.planning_concurrency)
        self._planning: set[asyncio.Task[None]] = set()
        self._planning_ids: set[str] = set()
        self._unbroken_jobs: set[asyncio.Future[Any]] = set()
        self._live: dict[str, tuple[str, Span]] = {}
        """Owner and root span of each task this term created, until it ends."""
        self._recent_ends: OrderedDict[str, tuple[str, Event, float]] = OrderedDict()
        """Owner, terminal event and time of the last RECENT_ENDS of those tasks
        to end: a client that waits for a task it just submitted often asks
        after the end."""
        self._ended: defaultdict[str, set[asyncio.Future[Event | None]]] = defaultdict(set)
        """Who waits for each task's end (terminal-only watches)."""
        self.stale_reports = 0
        """Reports for attempts that no longer hold their subtask: dropped, counted."""
        self._loops: list[asyncio.Task[None]] = []
        self._closing = asyncio.Event()
        self.events = EventHub(store)
        """Wakes watchers when their task's log grows (one blocking read for all)."""

    async def start(self) -> None:
        """Pick up unfinished tasks from Redis, then start dispatching."""
        await self.recover()
        self.events.start()
        self._loops = [
            asyncio.create_task(self.scheduler.run(), name="taskloom-dispatch"),
            asyncio.create_task(self._janitor(), name="taskloom-janitor"),
            asyncio.create_task(self._resync_forever(), name="taskloom-resync"),
            asyncio.create_task(self._deadlines_forever(), name="taskloom-deadlines"),
        ]

    async def stop(self) -> None:
        """Stop deciding: no dispatch, no lease expiry, no planning; end watches.

        Called first when the supervisor goes away, so that while its RPCs
        finish it cannot expire the leases of workers it told to go elsewhere.
        Reports that still arrive are committed as usual.
        """
        self._closing.set()
        tasks = [*self._loops, *self._planning]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops = []
        await self.events.stop()

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
                if task.task_id not in self._planning_ids:
                    self._start_planning(task.task_id, task.goal, task.options)
                continue
            if task.replan_pending and task.task_id not in self._planning_ids:
                self._start_replanning(task.task_id, task.replan_pending)
            ready = []
            for sub in task.subtasks:
                if sub.status == SubtaskStatus.READY:
                    ready.append(
                        ReadyItem(
                            task.task_id, sub.subtask_id, sub.capability, task.options.priority
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

    def known_capabilities(self) -> frozenset[str]:
        """What plans may use: the connected workers' capabilities and the configured ones."""
        return self.scheduler.capabilities() | frozenset(self.settings.capabilities)

    # -- clients -------------------------------------------------------------------

    async def submit(
        self,
        goal: str,
        *,
        plan: Plan | None = None,
        options: TaskOptions | None = None,
        idempotency_key: str = "",
        principal: Principal = LOCAL_ADMIN,
    ) -> tuple[str, bool]:
        """Store a task owned by ``principal`` and start it; returns ``(task_id, created)``."""
        options = options or TaskOptions()
        goal = goal.strip()
        if not goal:
            raise InvalidArgument("the goal is empty; say what you want done", field="goal")
        if len(goal) > self.settings.max_goal_chars:
            raise InvalidArgument(
                f"the goal is {len(goal):,} characters; the limit is "
                f"{self.settings.max_goal_chars:,} (TASKLOOM_MAX_GOAL_CHARS)",
                field="goal",
            )
        _check_options(options)
        options = replace(
            options, stall_timeout=options.stall_timeout or self.settings.stall_timeout
        )
        if len(idempotency_key) > 200:
            raise InvalidArgument(
                "the idempotency key is longer than 200 characters", field="idempotency_key"
            )
        if plan is None:
            return await self._unbroken(
                self._create(goal, options, None, (), idempotency_key, principal)
            )
        if plan.synthesize is not None:
            options = replace(options, synthesize=plan.synthesize)
        try:
            check_plan(
                plan,
                capabilities=self.known_capabilities(),
                limits=self.settings.explicit_plan_limits(),
            )
        except PlanError as e:
            e.field = e.field or "plan.subtasks"
            raise
        graph, result_from = finalize(plan, synthesize=options.synthesize)
        return await self._unbroken(
            self._create(
                goal, options, self._resolve(graph, options), result_from, idempotency_key,
                principal,
            )
        )  # fmt: skip

    async def _create(
        self,
        goal: str,
        options: TaskOptions,
        graph: Plan | None,
        result_from: Sequence[str],
        idempotency_key: str,
        principal: Principal,
    ) -> tuple[str, bool]:
        """Store the task, then plan it or queue its READY subtasks."""
        # The task's root span: its context is stored with the task and sent
        # inside each Assignment, so every span of the task joins one trace.
        root = tracer().start_span(
            "task",
            attributes={"taskloom.plan": "explicit" if graph else "llm",
                        "taskloom.on_failure": str(options.on_failure)},
        )  # fmt: skip
        offer = self.scheduler.offer(_first_steps(graph, options) if graph else {})
        handed: Sequence[Handed] = ()
        try:
            with self._checked():
                task_id, created, outcome = await self.store.create_task(
                    goal=goal,
                    options=options,
                    plan=graph,
                    result_from=result_from,
                    idempotency_key=idempotency_key,
                    max_replans=self.settings.max_replans,
                    cache_ttl=self.settings.cache_ttl
                    if (self.settings.cache if options.cache is None else options.cache)
                    else 0.0,
                    trace=carrier(root),
                    owner=principal.name,
                    max_in_flight=0 if principal.admin else self.settings.max_tasks_in_flight,
                    offer=offer.slots(),
                )
            handed = outcome.handed
        except BaseException:
            root.end()
            raise
        finally:
            # Whatever became of the write: lease what it assigned, free the rest.
            self.scheduler.take(offer, handed)
        if not created:
            root.set_attribute("taskloom.duplicate_of", task_id)
            root.end()
            return task_id, created
        root.set_attribute("taskloom.task_id", task_id)
        self._live[task_id] = (principal.name, root)
        self.metrics.tasks_submitted.inc()
        if graph is None:
            logger.info("task %s submitted; planning", task_id)
            self._start_planning(task_id, goal, options)
        else:
            logger.info(
                "task %s submitted with a plan of %d subtasks", task_id, len(graph.subtasks)
            )
            self.scheduler.set_task_limit(task_id, options.max_parallel)
            self.scheduler.set_graph(task_id, graph.subtasks)
        self._apply(outcome, ())
        return task_id, created

    def _resolve(self, plan: Plan, options: TaskOptions) -> Plan:
        """Each subtask's attempts and timeout: its own, else the task's, else the defaults."""
        max_attempts = options.max_attempts or self.settings.max_attempts
        return Plan(
            subtasks=tuple(
                replace(
                    s,
                    max_attempts=s.max_attempts or max_attempts,
                    timeout=s.timeout
                    or options.subtask_timeout
                    or self.settings.timeout_for(s.capability),
                )
                for s in plan.subtasks
            ),
            synthesize=plan.synthesize,
        )

    async def get(
        self, task_id: str, *, subtasks: bool = True, principal: Principal = LOCAL_ADMIN
    ) -> Task:
        task = await self.store.get_task(task_id, subtasks=subtasks)
        if not principal.admin and task.owner != principal.name:
            raise TaskNotFound(task_id)
        return task

    async def _check_owner(self, task_id: str, principal: Principal) -> None:
        """TaskNotFound unless the task exists and is the caller's (or the caller
        is an admin): another principal's task does not exist, as far as a
        client can tell. One read tells both."""
        owner = await self.store.task_owner(task_id)
        if owner is None or not (principal.admin or owner == principal.name):
            raise TaskNotFound(task_id)

    async def list_tasks(
        self,
        *,
        statuses: Iterable[TaskStatus],
        page_size: int,
        page_token: str,
        principal: Principal = LOCAL_ADMIN,
    ) -> tuple[list[Task], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative", field="page_size")
        size = min(page_size or 50, 1000)
        return await self.store.list_tasks(
            statuses=statuses,
            page_size=size,
            page_token=page_token,
            owner=None if principal.admin else principal.name,
        )

    async def cancel(
        self,
        task_id: str,
        reason: str = "",
        *,
        subtask_id: str = "",
        principal: Principal = LOCAL_ADMIN,
    ) -> Task:
        """Cancel an unfinished task and stop its running subtasks; or, with
        ``subtask_id``, only that subtask (its dependents are skipped)."""
        await self._check_owner(task_id, principal)
        reason = reason.strip()[:500] or "cancelled on request"
        if subtask_id:
            return await self._cancel_subtask(task_id, subtask_id, reason)
        found = await self._unbroken(self._cancel_task(task_id, reason))
        if found is None:
            raise TaskNotFound(task_id)
        if found not in (*_UNFINISHED, TaskStatus.CANCELLED):
            raise TaskFinished(
                f"task {task_id} already ended as {found}; only unfinished tasks can be cancelled"
            )
        return await self.store.get_task(task_id)

    async def _cancel_task(self, task_id: str, reason: str) -> TaskStatus | None:
        """End the task as CANCELLED and stop its attempts; returns the state it was in."""
        changed, found, held = await self.store.finish(
            task_id, TaskStatus.CANCELLED, reason, EventType.TASK_CANCELLED, expected=_UNFINISHED
        )
        if changed:
            self.metrics.tasks_finished.labels("cancelled").inc()
            self._task_ended(task_id, TaskStatus.CANCELLED)
            logger.info("task %s cancelled: %s", task_id, reason)
            self._stop_attempts(held, reason)
            self.scheduler.forget_task(task_id)
        return found

    async def _cancel_subtask(self, task_id: str, subtask_id: str, reason: str) -> Task:
        task_status, sub_status, outcome = await self._unbroken(
            self._cancel_one(task_id, subtask_id, reason)
        )
        if task_status is None:
            raise TaskNotFound(task_id)
        if sub_status is None:
            raise InvalidArgument(f"task {task_id} has no subtask {subtask_id!r}")
        if outcome is None:
            if sub_status == SubtaskStatus.CANCELLED:
                return await self.store.get_task(task_id)
            if task_status != TaskStatus.RUNNING:
                raise TaskFinished(
                    f"task {task_id} is {task_status}; only a running task's subtasks "
                    "can be cancelled"
                )
            raise TaskFinished(
                f"subtask {subtask_id} already ended as {sub_status}; only unfinished "
                "subtasks can be cancelled"
            )
        return await self.store.get_task(task_id)

    async def _cancel_one(
        self, task_id: str, subtask_id: str, reason: str
    ) -> tuple[TaskStatus | None, SubtaskStatus | None, Outcome | None]:
        found = await self.store.cancel_subtask(task_id, subtask_id, reason)
        outcome = found[2]
        if outcome is not None:
            logger.info("subtask %s of task %s cancelled: %s", subtask_id, task_id, reason)
            self._stop_attempts(outcome.held, reason)
            self._apply(outcome, [])
        return found

    async def watch(
        self,
        task_id: str,
        after: str = "",
        *,
        principal: Principal = LOCAL_ADMIN,
        terminal_only: bool = False,
    ) -> AsyncIterator[list[Event]]:
        """The task's events after ``after``: first the log, then live; ends after the terminal one.

        Replay, then follow: each read starts at the last event sent, so
        nothing is missed or repeated, whatever happens between reads.
        """
        if after and after != "0" and not _EVENT_ID.match(after):
            raise InvalidArgument(
                f"after_event_id {after[:40]!r} is not an event id like 1700000000000-0",
                field="after_event_id",
            )
        if terminal_only:
            async for ended in self.wait_many([task_id], principal=principal):
                yield ended
            return
        await self._check_owner(task_id, principal)
        cursor = after
        while True:
            if self._closing.is_set():
                raise Unavailable("the supervisor is shutting down; watch again to resume")
            events = await self.store.read_events(task_id, cursor)
            if not events:
                status = await self.store.task_status(task_id)
                if status is None:
                    raise TaskNotFound(task_id)
                if status.terminal:
                    # The terminal event is committed with the status; read
                    # once more in case it landed after our first read.
                    events = await self.store.read_events(task_id, cursor)
                    if not events:
                        return
                else:
                    await self.events.wait(task_id, cursor, WATCH_WAIT)
                    continue
            yield events
            cursor = events[-1].id
            if any(e.terminal for e in events):
                return

    async def wait_many(
        self, task_ids: Sequence[str], *, principal: Principal = LOCAL_ADMIN
    ) -> AsyncIterator[list[Event]]:
        """Each task's terminal event as the task ends, those that end together
        in one list, without reading their logs; done once every task has
        ended. An unknown task, or another principal's, raises TaskNotFound
        (what was yielded stands).

        Every task ends through this supervisor (it leads; clients follow the
        leader), which hands the waiters the terminal event as it ends one
        (``_task_ended``, or None when it has no event to hand: then it is
        read). A task this term created needs no read at first: its owner is
        known, and its end will be handed over, or was, a moment ago
        (``_recent_ends``). The others are read, and every task is read again
        each WATCH_WAIT, so a task ended some other way is seen; the reads of
        all the tasks waiting are one pipelined batch."""
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[tuple[str, Event | None]] = asyncio.Queue()
        waiting: dict[str, asyncio.Future[Event | None]] = {}

        def listen(task_id: str) -> None:
            # Registered before any read: an end between the two still reaches us.
            future: asyncio.Future[Event | None] = loop.create_future()
            future.add_done_callback(
                lambda f: None if f.cancelled() else arrived.put_nowait((task_id, f.result()))
            )
            self._ended[task_id].add(future)
            waiting[task_id] = future

        def forget(task_id: str) -> None:
            future = waiting.pop(task_id)
            future.cancel()
            waiters = self._ended.get(task_id)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._ended[task_id]

        def owned(task_id: str, owner: str | None) -> None:
            if owner is None or not (principal.admin or owner == principal.name):
                raise TaskNotFound(task_id)

        ended: list[Event] = []
        unread: list[str] = []
        try:
            for task_id in task_ids:
                listen(task_id)
                recent = self._recent_ends.get(task_id)
                if recent is not None and time.monotonic() - recent[2] < RECENT_ENDS_TTL:
                    owned(task_id, recent[0])
                    ended.append(recent[1])
                    forget(task_id)
                elif task_id in self._live:
                    owned(task_id, self._live[task_id][0])
                else:
                    unread.append(task_id)
            while True:
                if unread:
                    found = await self.store.endings(unread, 10)
                    for task_id in unread:
                        if task_id not in waiting:
                            continue  # its end arrived during the read
                        owner, status, events = found[task_id]
                        owned(task_id, owner)
                        if status is None or not status.terminal:
                            continue
                        last = next((e for e in reversed(events) if e.terminal), None)
                        if task_id in self._live:
                            # It ended before we heard of it (the reply of its
                            # write was lost, or is on its way): end it here.
                            self._task_ended(task_id, status, last)
                        if last is not None:
                            ended.append(last)
                            forget(task_id)
                    unread = []
                if ended:
                    yield ended
                    ended = []
                if not waiting:
                    return
                if self._closing.is_set():
                    raise Unavailable(
                        "the supervisor is shutting down; wait or watch again to resume"
                    )
                try:
                    async with asyncio.timeout(WATCH_WAIT):
                        news = [await arrived.get()]
                except TimeoutError:
                    unread = list(waiting)
                    continue
                while not arrived.empty():
                    news.append(arrived.get_nowait())
                for task_id, event in news:
                    if task_id not in waiting:
                        continue
                    forget(task_id)
                    if event is not None:
                        ended.append(event)
                    else:  # ended with no event to hand over: read it
                        listen(task_id)
                        unread.append(task_id)
        finally:
            for task_id in list(waiting):
                forget(task_id)

    def _start_planning(self, task_id: str, goal: str, options: TaskOptions) -> None:
        self._spawn_planner(
            task_id,
            f"plan-{task_id}",
            "planning",
            lambda: self._plan_once(task_id, goal, options),
            lambda reason: self._planning_failed(task_id, reason),
        )

    def _start_replanning(self, task_id: str, subtask_id: str) -> None:
        """Ask the planner to replace a subtask that failed for good, and splice
        the answer into the graph; if it cannot, the task fails."""
        self._spawn_planner(
            task_id,
            f"replan-{task_id}-{subtask_id}",
            "replanning",
            lambda: self._replan_once(task_id, subtask_id),
            lambda reason: self._replanning_failed(task_id, reason),
        )

    def _spawn_planner(
        self,
        task_id: str,
        name: str,
        what: str,
        once: Callable[[], Awaitable[None]],
        give_up: Callable[[str], Awaitable[None]],
    ) -> None:
        with bind(task_id=task_id):  # the job's logs carry the task id
            job = asyncio.create_task(self._keep_planning(task_id, what, once, give_up), name=name)
        self._planning.add(job)
        self._planning_ids.add(task_id)

        def done(job: asyncio.Task[None]) -> None:
            self._planning.discard(job)
            self._planning_ids.discard(task_id)

        job.add_done_callback(done)

    async def _keep_planning(
        self,
        task_id: str,
        what: str,
        once: Callable[[], Awaitable[None]],
        give_up: Callable[[str], Awaitable[None]],
    ) -> None:
        """Run ``once`` through Redis outages (the task waits in Redis meanwhile);
        a bug ends the task through ``give_up`` rather than leaving it waiting."""
        delay = 1.0
        while True:
            try:
                async with self._planning_slots:
                    await once()
                return
            except StoreUnavailable as e:
                logger.warning("%s task %s paused: %s", what, task_id, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            except Exception as e:
                logger.exception("%s task %s failed unexpectedly", what, task_id)
                with contextlib.suppress(StoreUnavailable):
                    await give_up(f"{what} failed: internal error ({type(e).__name__}: {e})")
                return

    async def _plan_once(self, task_id: str, goal: str, options: TaskOptions) -> None:
        llm = self.planner.llm
        with tracer().start_as_current_span(
            "plan",
            context=await self._task_context(task_id),
            attributes={"taskloom.task_id": task_id, **genai_attributes(llm.provider, llm.model)},
        ) as span:
            await self._plan_traced(task_id, goal, options, span)

    async def _plan_traced(self, task_id: str, goal: str, options: TaskOptions, span: Span) -> None:
        await self.store.note(
            task_id,
            TaskStatus.PLANNING,
            EventType.PLAN_REQUESTED,
            f"asking {self.planner.llm.describe()} for a plan",
            span=ids(span)[1],
        )

        synthesize = options.synthesize
        try:
            plan = await self.planner.plan(
                goal,
                capabilities=self.known_capabilities(),
                synthesize=synthesize,
                hooks=self._plan_hooks(task_id, TaskStatus.PLANNING, span),
            )
        except BudgetSpent:
            self.metrics.planner_calls.labels("plan", "budget_exceeded").inc()
            return
        except PlanError as e:
            if options.fallback != Fallback.SINGLE:
                self.metrics.planner_calls.labels("plan", "invalid").inc()
                await self._planning_failed(
                    task_id, f"planning failed: {e}", FailureReason.PLAN_INVALID
                )
                return
            self.metrics.planner_calls.labels("plan", "fallback").inc()
            plan, synthesize = self._single(goal), False
            await self.store.note(
                task_id,
                TaskStatus.PLANNING,
                EventType.PLAN_FALLBACK,
                f"no valid plan ({e}); fallback=single: one subtask carries the whole goal",
            )
        except (LLMError, LLMUnavailable) as e:
            self.metrics.planner_calls.labels("plan", "llm_unavailable").inc()
            await self._planning_failed(
                task_id, f"planning failed: {e}", FailureReason.LLM_UNAVAILABLE
            )
            return
        else:
            self.metrics.planner_calls.labels("plan", "ok").inc()
        graph, result_from = finalize(plan, synthesize=synthesize)
        ready = await self.store.set_plan(
            task_id,
            self._resolve(graph, options),
            result_from=result_from,
            priority=options.priority,
        )
        if ready is None:
            logger.info("task %s ended while it was being planned", task_id)
            return
        logger.info("task %s planned: %d subtasks", task_id, len(graph.subtasks))
        self.scheduler.set_task_limit(task_id, options.max_parallel)
        self.scheduler.set_graph(task_id, graph.subtasks)
        self.scheduler.enqueue(ready)

    def _plan_hooks(self, task_id: str, status: TaskStatus, span: Span) -> PlanHooks:
        """Planner reports become the task's events; its usage, the task's and
        (summed) the planning span's."""
        total = Usage()

        async def rejected(message: str) -> None:
            self.metrics.planner_repairs.inc()
            await self.store.note(task_id, status, EventType.PLAN_REJECTED, message)

        async def normalized(message: str) -> None:
            await self.store.note(task_id, status, EventType.PLAN_NORMALIZED, message)

        async def spent(usage: Usage) -> None:
            nonlocal total
            total += usage
            llm = self.planner.llm
            span.set_attributes(genai_attributes(llm.provider, llm.model, total))
            over, held = await self.store.spend(task_id, usage)
            if over:
                self.metrics.tasks_finished.labels("failed").inc()
                self._task_ended(task_id, TaskStatus.FAILED)
                logger.info("task %s used up its max_tokens while planning", task_id)
                self._stop_attempts(held, "the task used up its token budget")
                self.scheduler.forget_task(task_id)
                raise BudgetSpent(task_id)

        return PlanHooks(rejected=rejected, normalized=normalized, spent=spent)

    def _single(self, goal: str) -> Plan:
        """fallback=single: the whole goal as one subtask."""
        caps = self.known_capabilities()
        capability = "llm" if "llm" in caps or not caps else sorted(caps)[0]
        limit = self.settings.llm_plan_limits().max_instruction_chars
        return Plan(
            (
                PlannedSubtask(
                    id="goal",
                    title="Carry out the goal",
                    instruction=goal[:limit],
                    capability=capability,
                ),
            )
        )

    async def _replan_once(self, task_id: str, failed_id: str) -> None:
        llm = self.planner.llm
        with tracer().start_as_current_span(
            "replan",
            context=await self._task_context(task_id),
            attributes={
                "taskloom.task_id": task_id,
                "taskloom.subtask_id": failed_id,
                **genai_attributes(llm.provider, llm.model),
            },
        ) as span:
            await self._replan_traced(task_id, failed_id, span)

    async def _replan_traced(self, task_id: str, failed_id: str, span: Span) -> None:
        task = await self.store.get_task(task_id)
        failed = next((s for s in task.subtasks if s.id == failed_id), None)
        if task.status != TaskStatus.RUNNING or failed is None:
            return
        await self.store.note(
            task_id,
            TaskStatus.RUNNING,
            EventType.PLAN_REQUESTED,
            f"asking {self.planner.llm.describe()} to replace {failed_id} ({failed.title})",
        )

        done = [s for s in task.subtasks if s.status == SubtaskStatus.SUCCEEDED]
        try:
            plan = await self.planner.replan(
                task.goal,
                failed=failed,
                done=done,
                capabilities=self.known_capabilities(),
                hooks=self._plan_hooks(task_id, TaskStatus.RUNNING, span),
            )
        except BudgetSpent:
            return
        except (PlanError, LLMError, LLMUnavailable) as e:
            self.metrics.planner_calls.labels("replan", "failed").inc()
            await self._replanning_failed(
                task_id,
                f"subtask {failed_id} ({failed.title}) failed: {failed.error}; no replacement: {e}",
            )
            return
        version = task.plan_version + 1
        ids = {s.id: f"v{version}-{s.id}" for s in plan.subtasks}
        renamed = Plan(
            tuple(
                replace(s, id=ids[s.id], depends_on=tuple(ids.get(d, d) for d in s.depends_on))
                for s in plan.subtasks
            )
        )
        graph = self._resolve(renamed, task.options)
        needed = {d for s in graph.subtasks for d in s.depends_on}
        sinks = [s.id for s in graph.subtasks if s.id not in needed]
        waiting = [s.id for s in task.subtasks if failed_id in s.depends_on]
        added = ", ".join(f"{s.id} ({s.title})" for s in graph.subtasks)
        message = f"plan v{version}: {failed_id} ({failed.title}) failed; replaced by {added}"
        if waiting:
            message += f"; {', '.join(waiting)} now wait for {', '.join(sinks)}"
        ready = await self.store.revise_plan(
            task_id, failed_id, task.plan_version, graph.subtasks, sinks, message
        )
        if ready is None:
            logger.info("task %s moved on while it was being replanned", task_id)
            return
        logger.info("task %s: %s", task_id, message)
        self.scheduler.set_graph(task_id, graph.subtasks)
        self.scheduler.enqueue(ready)

    async def _replanning_failed(self, task_id: str, reason: str) -> None:
        logger.warning("task %s: %s", task_id, reason)
        changed, _, held = await self.store.finish(
            task_id,
            TaskStatus.FAILED,
            reason,
            EventType.TASK_FAILED,
            expected=(TaskStatus.RUNNING,),
            reason=FailureReason.REPLAN_FAILED,
        )
        if changed:
            self.metrics.tasks_finished.labels("failed").inc()
            self._task_ended(task_id, TaskStatus.FAILED)
            self._stop_attempts(held, "the task failed")
            self.scheduler.forget_task(task_id)

    async def _planning_failed(
        self, task_id: str, reason: str, code: FailureReason = FailureReason.INTERNAL
    ) -> None:
        logger.warning("task %s: %s", task_id, reason)
        changed, _, _ = await self.store.finish(
            task_id,
            TaskStatus.FAILED,
            reason,
            EventType.TASK_FAILED,
            expected=(TaskStatus.PLANNING,),
            reason=code,
        )
        if changed:
            self.metrics.tasks_finished.labels("failed").inc()
            self._task_ended(task_id, TaskStatus.FAILED)

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

    async def progress(self, updates: Sequence[ProgressUpdate], worker_id: str = "") -> None:
        self.scheduler.touch((u.ref for u in updates), worker_id)
        ok = await self.store.progress(updates, worker_id)
        self._count_stale(ok)

    async def stopped(self, session: WorkerSession, refs: Sequence[AttemptRef]) -> None:
        """The worker acknowledged a Cancel: those handlers have stopped."""
        await self.store.stopped(refs, session.info.name)

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
            await self._unbroken(self._commit(self.store.fail(over, worker_id), refs, failed=True))
        if fitted:
            refs = [r.ref for r in fitted]
            # The dependents these results unlock go to workers in the same
            # step, as far as free slots were offered for them.
            offer = self.scheduler.offer_for(refs)
            write = self.store.complete(fitted, worker_id, offer=offer.slots(), limits=offer.limits)
            await self._unbroken(self._commit(write, refs, failed=False, offer=offer))
        return [r.ref for r in results]

    async def failed(
        self, failures: Sequence[SubtaskFailure], worker_id: str = ""
    ) -> list[AttemptRef]:
        """Commit failures; returns the refs to acknowledge."""
        refs = [f.ref for f in failures]
        await self._unbroken(self._commit(self.store.fail(failures, worker_id), refs, failed=True))
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
            with self._checked():
                outcome = await write
            handed = outcome.handed
        finally:
            if offer is not None:
                self.scheduler.take(offer, handed)
        self._observe(outcome, refs, leases, failed=failed)
        self._apply(outcome, refs)

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

    async def _unbroken(self, work: Awaitable[T]) -> T:
        """Run ``work`` to its end even if the caller is cancelled (its worker's
        stream or its client's call ended). A write to Redis and what the
        scheduler learns from it must not come apart: subtasks made READY in
        Redis but never queued would wait for ever."""
        job = asyncio.ensure_future(work)
        self._unbroken_jobs.add(job)
        job.add_done_callback(self._unbroken_done)
        return await asyncio.shield(job)

    def _unbroken_done(self, job: asyncio.Future[Any]) -> None:
        self._unbroken_jobs.discard(job)
        if not job.cancelled():
            job.exception()  # retrieved here: the caller that wanted it may be gone

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
        self._apply(outcome, refs)

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
        self._stop_attempts(refs, "; ".join(sorted({why for _, why in overdue})))
        self._apply(outcome, refs)

    def _apply(self, outcome: Outcome, refs: Sequence[AttemptRef]) -> None:
        self._count_stale(outcome.committed)
        self.metrics.observe_outcome(outcome)
        for task_id, status in zip(outcome.finished, outcome.finished_status, strict=False):
            self._task_ended(task_id, status, outcome.ended.get(task_id))
        self.scheduler.release(refs)
        self.scheduler.enqueue(outcome.ready)
        if outcome.held:
            self._stop_attempts(outcome.held, "the task failed")
        for task_id, subtask_id in outcome.replan:
            self._start_replanning(task_id, subtask_id)
        for task_id in outcome.finished:
            logger.info("task %s finished", task_id)
            self.scheduler.forget_task(task_id)

    def _task_ended(self, task_id: str, status: str, event: Event | None = None) -> None:
        """The task ended: tell who waits for its end (with its terminal
        event, if the write that ended it returned one) and end its span."""
        for ended in self._ended.pop(task_id, ()):
            if not ended.done():
                ended.set_result(event)
        live = self._live.pop(task_id, None)
        if live is not None:
            owner, span = live
            if event is not None:
                self._recent_ends[task_id] = (owner, event, time.monotonic())
                if len(self._recent_ends) > RECENT_ENDS:
                    self._recent_ends.popitem(last=False)
            span.set_attribute("taskloom.status", status)
            if status != TaskStatus.SUCCEEDED:
                span.set_status(Status(StatusCode.ERROR, status))
            span.end()

    async def _task_context(self, task_id: str) -> Context | None:
        """The context of the task's root span, from memory or from Redis."""
        live = self._live.get(task_id)
        if live is not None:
            return trace.set_span_in_context(live[1])
        return parent(await self.store.trace_of(task_id))

    def _stop_attempts(self, refs: Iterable[AttemptRef], reason: str) -> None:
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

    def _count_stale(self, committed: Sequence[bool]) -> None:
        stale = sum(1 for ok in committed if not ok)
        if stale:
            self._stale(stale)
            logger.debug("discarded %d stale reports", stale)

    def _stale(self, count: int) -> None:
        self.stale_reports += count
        self.metrics.stale_reports.inc(count)

    @contextlib.contextmanager
    def _checked(self) -> Iterator[None]:
        """A transition whose reply may be lost: if so, check the cache against Redis."""
        try:
            yield
        except StoreUnavailable:
            self.scheduler.out_of_sync.set()
            raise

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
                with self._checked():
                    outcome = await self.store.expire_overdue()
            except StoreUnavailable as e:
                logger.warning("deadlines: %s", e)
                continue
            for task_id in outcome.finished:
                logger.info("task %s ran past its max_duration", task_id)
            self._apply(outcome, [])

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            try:
                await self.store.trim_indexes()
            except StoreUnavailable as e:
                logger.warning("janitor: %s", e)


def _check_options(options: TaskOptions) -> None:
    """Each option in its range, or InvalidArgument naming the field."""
    if options.max_parallel < 0:
        raise InvalidArgument(
            "max_parallel must be 0 (no limit) or more", field="options.max_parallel"
        )
    if not 0 <= options.max_attempts <= 100:
        raise InvalidArgument(
            "max_attempts must be from 1 to 100 (0: the default)", field="options.max_attempts"
        )
    if options.subtask_timeout < 0 or options.stall_timeout < 0:
        raise InvalidArgument(
            "timeouts must be positive (0: the default)",
            field="options.subtask_timeout" if options.subtask_timeout < 0
            else "options.stall_timeout",
        )  # fmt: skip
    if options.max_tokens < 0 or options.max_duration < 0:
        raise InvalidArgument(
            "max_tokens and max_duration must be positive (0: no limit)",
            field="options.max_tokens" if options.max_tokens < 0 else "options.max_duration",
        )
    if options.context_tokens and not 256 <= options.context_tokens <= 10_000_000:
        raise InvalidArgument(
            "context_tokens must be from 256 to 10,000,000 (0: the model's)",
            field="options.context_tokens",
        )


def _first_steps(plan: Plan, options: TaskOptions) -> dict[str, int]:
    """Capability → how many of the plan's subtasks can start at once (those
    without dependencies, no more than the task's ``max_parallel``)."""
    counts = Counter(s.capability for s in plan.subtasks if not s.depends_on)
    if options.max_parallel > 0:
        return {c: min(n, options.max_parallel) for c, n in counts.items()}
    return dict(counts)
