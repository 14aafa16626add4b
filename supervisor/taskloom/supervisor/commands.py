"""What clients ask of a task: submit it, read it, list them, cancel one.

Each command checks who asks (a task belongs to its submitter; admins may do
anything), writes one atomic step to the store, and hands what that step
changed to the orchestrator (``apply``), which tells workers and watchers.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from opentelemetry.trace import Span

from taskloom.core.auth import LOCAL_ADMIN, Principal
from taskloom.core.errors import (
    InvalidArgument,
    PermissionDenied,
    PlanError,
    TaskFinished,
    TaskNotFound,
)
from taskloom.core.model import (
    AttemptRef,
    EventType,
    Plan,
    SubtaskStatus,
    Task,
    TaskOptions,
    TaskStatus,
)
from taskloom.core.plan import check_plan, finalize
from taskloom.core.tracing import carrier, tracer
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.outcomes import Handed, Outcome
from taskloom.supervisor.planner import role_problems
from taskloom.supervisor.planning import Planning
from taskloom.supervisor.scheduler import Scheduler
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.supervisor.store import Store

logger = logging.getLogger(__name__)
T = TypeVar("T")

UNFINISHED = (TaskStatus.PLANNING, TaskStatus.RUNNING, TaskStatus.AWAITING_APPROVAL)
MAX_KEY_CHARS = 200
"""Longest idempotency key."""
MAX_REASON_CHARS = 500
"""Longest reason kept with a cancellation."""


class Effects(Protocol):
    """What a command needs of the orchestrator."""

    def apply(self, outcome: Outcome, refs: Sequence[AttemptRef] = (), *, reason: str = "") -> None:
        """Act on what a write changed (the one place that does)."""
        ...

    def started(self, task_id: str, owner: str, span: Span) -> None:
        """A task this term created: its root span ends with it."""
        ...

    def unbroken(self, work: Awaitable[T]) -> Awaitable[T]:
        """Run ``work`` to its end even if the caller goes away."""
        ...

    def checked(self) -> contextlib.AbstractContextManager[None]:
        """Around a write whose reply may be lost (see ``Orchestrator.checked``)."""
        ...


class Commands:
    """The client commands of one term of leadership."""

    def __init__(
        self,
        settings: SupervisorSettings,
        store: Store,
        scheduler: Scheduler,
        planning: Planning,
        metrics: SupervisorMetrics,
        effects: Effects,
    ) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self.planning = planning
        self.metrics = metrics
        self._effects = effects

    # -- submitting --------------------------------------------------------------------

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
        options.check()
        synthesize = options.synthesize
        if synthesize is None:
            synthesize = plan.synthesize if plan is not None else None
        # Priority orders work across tenants: each role has a range.
        bound = self.settings.max_admin_priority if principal.admin else self.settings.max_priority
        options = replace(
            options,
            synthesize=True if synthesize is None else synthesize,
            stall_timeout=options.stall_timeout or self.settings.stall_timeout,
            priority=max(-bound, min(bound, options.priority)),
        )
        if len(idempotency_key) > MAX_KEY_CHARS:
            raise InvalidArgument(
                f"the idempotency key is longer than {MAX_KEY_CHARS} characters",
                field="idempotency_key",
            )
        if plan is None:
            return await self._effects.unbroken(
                self._create(goal, options, None, (), idempotency_key, principal)
            )
        try:
            check_plan(
                plan,
                capabilities=self.planning.capabilities(),
                limits=self.settings.explicit_plan_limits(),
            )
        except PlanError as e:
            e.field = e.field or "plan.subtasks"
            raise
        if problems := role_problems(plan, self.planning.planner.roles):
            raise InvalidArgument("; ".join(problems[:5]), field="plan.subtasks")
        graph, result_from = finalize(
            plan, synthesize=bool(options.synthesize), aggregate=options.aggregate
        )
        forbidden = sorted(
            {s.capability for s in graph.subtasks if not principal.may_use(s.capability)}
        )
        if forbidden:
            raise PermissionDenied(
                f"{principal.name} may not use {', '.join(forbidden)}: its token allows "
                f"{', '.join(sorted(principal.capabilities or ())) or 'no capability'}"
            )
        graph = self.planning.resolve(graph, options)
        return await self._effects.unbroken(
            self._create(goal, options, graph, result_from, idempotency_key, principal)
        )

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
            with self._effects.checked():
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
                    offer=offer.slots(),
                    **self._budgets(principal),
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
        self._effects.started(task_id, principal.name, root)
        self.metrics.tasks_submitted.inc()
        if graph is None:
            logger.info("task %s submitted; planning", task_id)
            self.planning.plan(task_id, goal, options)
        else:
            logger.info(
                "task %s submitted with a plan of %d subtasks", task_id, len(graph.subtasks)
            )
            self.scheduler.set_task_limit(task_id, options.max_parallel)
            self.scheduler.set_graph(task_id, graph.subtasks)
        self._effects.apply(outcome)
        return task_id, created

    def _budgets(self, principal: Principal) -> dict[str, int]:
        """What the principal may have in Redis (an admin: more, not unlimited)."""
        s = self.settings
        if principal.admin:
            return {
                "max_in_flight": s.admin_max_tasks_in_flight,
                "max_subtasks": s.admin_max_unfinished_subtasks,
                "max_bytes": s.admin_max_stored_bytes,
            }
        return {
            "max_in_flight": s.max_tasks_in_flight,
            "max_subtasks": s.max_unfinished_subtasks,
            "max_bytes": s.max_stored_bytes,
        }

    # -- reading -----------------------------------------------------------------------

    async def get(
        self, task_id: str, *, subtasks: bool = True, principal: Principal = LOCAL_ADMIN
    ) -> Task:
        if not principal.admin:
            # Another principal's task costs one small read, not a large one.
            await self.check_owner(task_id, principal)
        task = await self.store.get_task(task_id, subtasks=subtasks)
        if not principal.admin and task.owner != principal.name:
            raise TaskNotFound(task_id)
        return task

    async def check_owner(self, task_id: str, principal: Principal) -> None:
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

    # -- cancelling --------------------------------------------------------------------

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
        await self.check_owner(task_id, principal)
        reason = reason.strip()[:MAX_REASON_CHARS] or "cancelled on request"
        if subtask_id:
            return await self._cancel_subtask(task_id, subtask_id, reason)
        found = await self._effects.unbroken(self._cancel_task(task_id, reason))
        if found is None:
            raise TaskNotFound(task_id)
        if found not in (*UNFINISHED, TaskStatus.CANCELLED):
            raise TaskFinished(
                f"task {task_id} already ended as {found}; only unfinished tasks can be cancelled"
            )
        return await self.store.get_task(task_id)

    async def _cancel_task(self, task_id: str, reason: str) -> TaskStatus | None:
        """End the task as CANCELLED and stop its attempts; returns the state it was in."""
        found, outcome = await self.store.finish(
            task_id, TaskStatus.CANCELLED, reason, EventType.TASK_CANCELLED, expected=UNFINISHED
        )
        if outcome.finished:
            logger.info("task %s cancelled: %s", task_id, reason)
        self._effects.apply(outcome, reason=reason)
        return found

    async def _cancel_subtask(self, task_id: str, subtask_id: str, reason: str) -> Task:
        task_status, sub_status, outcome = await self._effects.unbroken(
            self._cancel_one(task_id, subtask_id, reason)
        )
        if task_status is None:
            raise TaskNotFound(task_id)
        if sub_status is None:
            raise InvalidArgument(
                f"task {task_id} has no subtask {subtask_id[:64]!r}", field="subtask_id"
            )
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
            self._effects.apply(outcome, reason=reason)
        return found

    # -- steering ----------------------------------------------------------------------

    async def approve(
        self,
        task_id: str,
        *,
        subtask_id: str = "",
        plan: Plan | None = None,
        reason: str = "",
        principal: Principal = LOCAL_ADMIN,
    ) -> Task:
        """Start a task whose plan waits for approval (with ``plan``: replace
        it first, checked like any explicit plan), or let a waiting subtask run."""
        await self.check_owner(task_id, principal)
        replacement: tuple[Plan, Sequence[str]] | None = None
        if plan is not None:
            if subtask_id:
                raise InvalidArgument(
                    "a plan replaces a task's whole plan: approve it without a subtask",
                    field="plan",
                )
            replacement = await self._checked_plan(task_id, plan)
        write = self.store.approve(
            task_id, subtask_id, principal.name, _reason(reason), replacement
        )
        return await self._steer(task_id, write, "approved")

    async def _checked_plan(self, task_id: str, plan: Plan) -> tuple[Plan, Sequence[str]]:
        """An edited plan for a waiting task, checked and resolved like an
        explicit plan at submit, with the ids its result is taken from."""
        task = await self.store.get_task(task_id, subtasks=False)
        try:
            check_plan(
                plan,
                capabilities=self.planning.capabilities(),
                limits=self.settings.explicit_plan_limits(),
            )
        except PlanError as e:
            e.field = e.field or "plan.subtasks"
            raise
        synthesize = plan.synthesize if plan.synthesize is not None else task.options.synthesize
        graph, result_from = finalize(
            plan, synthesize=synthesize is not False, aggregate=task.options.aggregate
        )
        return self.planning.resolve(graph, task.options), result_from

    async def reject(
        self,
        task_id: str,
        *,
        subtask_id: str = "",
        reason: str = "",
        principal: Principal = LOCAL_ADMIN,
    ) -> Task:
        """Cancel a task whose plan waits for approval, or skip a waiting
        subtask (its dependents are skipped; the task goes on)."""
        await self.check_owner(task_id, principal)
        write = self.store.reject(task_id, subtask_id, principal.name, _reason(reason))
        return await self._steer(task_id, write, "the plan was rejected")

    async def retry(
        self,
        task_id: str,
        subtask_id: str,
        *,
        instruction: str | None = None,
        reason: str = "",
        principal: Principal = LOCAL_ADMIN,
    ) -> Task:
        """Run a FAILED, SKIPPED or CANCELLED subtask again (with a new
        ``instruction``, if given), and everything downstream of it."""
        await self.check_owner(task_id, principal)
        if instruction is not None:
            instruction = instruction.strip()
            limit = self.settings.explicit_plan_limits().max_instruction_chars
            if not instruction or len(instruction) > limit:
                raise InvalidArgument(
                    f"the instruction must have 1 to {limit:,} characters", field="instruction"
                )
        _need_subtask(subtask_id)
        write = self.store.rework(
            "retry", task_id, subtask_id, principal.name, _reason(reason), instruction
        )
        return await self._steer(task_id, write, "retried")

    async def skip(
        self,
        task_id: str,
        subtask_id: str,
        *,
        output: str = "",
        reason: str = "",
        principal: Principal = LOCAL_ADMIN,
    ) -> Task:
        """Mark a pending, waiting or failed subtask SKIPPED with ``output``,
        which its dependents run on."""
        await self.check_owner(task_id, principal)
        _need_subtask(subtask_id)
        if len(output.encode()) > self.settings.max_output_bytes:
            raise InvalidArgument(
                f"the output is over {self.settings.max_output_bytes:,} bytes "
                "(TASKLOOM_MAX_OUTPUT_BYTES)",
                field="output",
            )
        write = self.store.rework(
            "skip", task_id, subtask_id, principal.name, _reason(reason), output
        )
        return await self._steer(task_id, write, "skipped")

    async def pause(
        self, task_id: str, *, reason: str = "", principal: Principal = LOCAL_ADMIN
    ) -> Task:
        """Start nothing new of the task until it is resumed; what runs finishes."""
        await self.check_owner(task_id, principal)
        write = self.store.pause(task_id, True, principal.name, _reason(reason))
        return await self._steer(task_id, write, "paused")

    async def resume(
        self, task_id: str, *, reason: str = "", principal: Principal = LOCAL_ADMIN
    ) -> Task:
        """Let a paused task go on."""
        await self.check_owner(task_id, principal)
        write = self.store.pause(task_id, False, principal.name, _reason(reason))
        return await self._steer(task_id, write, "resumed")

    async def _steer(self, task_id: str, write: Awaitable[Outcome], what: str) -> Task:
        """Commit a person's action and act on what it changed, whatever
        becomes of the caller; the task as it is now."""

        async def commit() -> None:
            with self._effects.checked():
                outcome = await write
            logger.info("task %s %s", task_id, what)
            self._effects.apply(outcome, reason=f"the task was {what}")

        await self._effects.unbroken(commit())
        return await self.store.get_task(task_id)


def _reason(reason: str) -> str:
    return " ".join(reason.split())[:MAX_REASON_CHARS]


def _need_subtask(subtask_id: str) -> None:
    if not subtask_id:
        raise InvalidArgument("name the subtask (--subtask ID)", field="subtask_id")


def _first_steps(plan: Plan, options: TaskOptions) -> dict[str, int]:
    """Capability → how many of the plan's subtasks can start at once (those
    without dependencies, no more than the task's ``max_parallel``)."""
    counts = Counter(s.capability for s in plan.subtasks if not s.depends_on)
    if options.max_parallel > 0:
        return {c: min(n, options.max_parallel) for c, n in counts.items()}
    return dict(counts)
