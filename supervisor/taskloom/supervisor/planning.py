"""Planning jobs: a new task's plan, and the replacement of a failed subtask.

Each job runs in the background, at most ``planning_concurrency`` at once,
and rides out Redis outages (the task waits in Redis meanwhile). The
planner's reports (a rejected reply, a normalised one) become the task's
events, and each LLM call's usage is charged to the task as it happens, so a
``max_tokens`` budget stops planning too. A plan is stored only while the
task still waits for it: a task cancelled while the model thought stays so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Protocol

from opentelemetry.context import Context
from opentelemetry.trace import Span

from taskloom.core.errors import (
    BudgetSpent,
    LLMError,
    LLMUnavailable,
    PlanError,
    StoreUnavailable,
)
from taskloom.core.logs import bind
from taskloom.core.model import (
    AttemptRef,
    EventType,
    FailureReason,
    Fallback,
    Plan,
    PlannedSubtask,
    SubtaskStatus,
    TaskOptions,
    TaskStatus,
    Usage,
)
from taskloom.core.plan import finalize
from taskloom.core.roles import ROLE_PARAM, ROLE_PROMPT_PARAM
from taskloom.core.tracing import genai_attributes, ids, tracer
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.outcomes import Outcome
from taskloom.supervisor.planner import PlanHooks, Planner, offered_capabilities
from taskloom.supervisor.scheduler import Scheduler
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.supervisor.store import Store

logger = logging.getLogger(__name__)


class Applies(Protocol):
    """What a planning job needs of the orchestrator."""

    def apply(self, outcome: Outcome, refs: Sequence[AttemptRef] = (), *, reason: str = "") -> None:
        """Act on what a write changed (the one place that does)."""
        ...

    async def task_context(self, task_id: str) -> Context | None:
        """The context of the task's root span, to hang planning spans under."""
        ...


class Planning:
    """The planning jobs of one term of leadership."""

    def __init__(
        self,
        settings: SupervisorSettings,
        store: Store,
        planner: Planner,
        scheduler: Scheduler,
        metrics: SupervisorMetrics,
        effects: Applies,
    ) -> None:
        self.settings = settings
        self.store = store
        self.planner = planner
        self.scheduler = scheduler
        self.metrics = metrics
        self._effects = effects
        self._slots = asyncio.Semaphore(settings.planning_concurrency)
        self.jobs: set[asyncio.Task[None]] = set()
        """The jobs running now."""
        self._task_ids: set[str] = set()
        self.rights: Callable[[str], frozenset[str] | None] = lambda owner: None
        """The capabilities a principal may use (None: every one), by name."""

    def busy(self, task_id: str) -> bool:
        """Whether a job plans or replans this task now."""
        return task_id in self._task_ids

    async def stop(self) -> None:
        jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    def capabilities(self) -> frozenset[str]:
        """What plans may use: the connected workers' capabilities and the configured ones."""
        return self.scheduler.capabilities() | frozenset(self.settings.capabilities)

    async def allowed(self, task_id: str) -> frozenset[str]:
        """What the planner may use for this task: ``capabilities`` offered to the
        planner (``offered_capabilities``), within its owner's rights (a token may
        be limited to some capabilities)."""
        caps = offered_capabilities(self.capabilities(), planner=self.settings.planner_capabilities)
        owner = await self.store.task_owner(task_id)
        rights = self.rights(owner) if owner else None
        return caps if rights is None else caps & rights

    def resolve(self, plan: Plan, options: TaskOptions) -> Plan:
        """Each subtask's attempts and timeout (its own, else the task's, else
        the defaults), and whether a person must approve it: if it says so, or
        if its capability is one the operator gates, whatever the plan says. A
        step with a role gets the role's system prompt (param ``role_prompt``)."""
        max_attempts = options.max_attempts or self.settings.max_attempts
        gated = frozenset(self.settings.approval_capabilities)
        roles = self.planner.roles
        return Plan(
            subtasks=tuple(
                replace(
                    s,
                    params=(
                        {**s.params, ROLE_PROMPT_PARAM: roles[s.params[ROLE_PARAM]].prompt}
                        if s.params.get(ROLE_PARAM) in roles
                        else s.params
                    ),
                    max_attempts=s.max_attempts or max_attempts,
                    timeout=s.timeout
                    or options.subtask_timeout
                    or self.settings.timeout_for(s.capability),
                    requires_approval=s.requires_approval or s.capability in gated,
                )
                for s in plan.subtasks
            ),
            synthesize=plan.synthesize,
        )

    # -- jobs ------------------------------------------------------------------------

    def plan(self, task_id: str, goal: str, options: TaskOptions) -> None:
        """Ask the planner for the task's plan, and store it."""
        self._spawn(
            task_id,
            f"plan-{task_id}",
            "planning",
            lambda: self._plan_once(task_id, goal, options),
            lambda reason: self._give_up(task_id, reason, TaskStatus.PLANNING),
        )

    def replan(self, task_id: str, subtask_id: str) -> None:
        """Ask the planner to replace a subtask that failed for good, and splice
        the answer into the graph; if it cannot, the task fails."""
        self._spawn(
            task_id,
            f"replan-{task_id}-{subtask_id}",
            "replanning",
            lambda: self._replan_once(task_id, subtask_id),
            lambda reason: self._give_up(
                task_id, reason, TaskStatus.RUNNING, FailureReason.REPLAN_FAILED
            ),
        )

    def _spawn(
        self,
        task_id: str,
        name: str,
        what: str,
        once: Callable[[], Awaitable[None]],
        give_up: Callable[[str], Awaitable[None]],
    ) -> None:
        with bind(task_id=task_id):  # the job's logs carry the task id
            job = asyncio.create_task(self._keep_going(task_id, what, once, give_up), name=name)
        self.jobs.add(job)
        self._task_ids.add(task_id)

        def done(job: asyncio.Task[None]) -> None:
            self.jobs.discard(job)
            self._task_ids.discard(task_id)

        job.add_done_callback(done)

    async def _keep_going(
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
                async with self._slots:
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

    async def _give_up(
        self,
        task_id: str,
        reason: str,
        expected: TaskStatus,
        code: FailureReason = FailureReason.INTERNAL,
    ) -> None:
        """End the task FAILED (if it is still ``expected``) for ``reason``."""
        logger.warning("task %s: %s", task_id, reason)
        _, outcome = await self.store.finish(
            task_id,
            TaskStatus.FAILED,
            reason,
            EventType.TASK_FAILED,
            expected=(expected,),
            reason=code,
        )
        self._effects.apply(outcome, reason="the task failed")

    # -- planning ----------------------------------------------------------------------

    async def _plan_once(self, task_id: str, goal: str, options: TaskOptions) -> None:
        llm = self.planner.llm
        with tracer().start_as_current_span(
            "plan",
            context=await self._effects.task_context(task_id),
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
        synthesize = options.synthesize is not False
        try:
            plan = await self.planner.plan(
                goal,
                capabilities=await self.allowed(task_id),
                synthesize=synthesize,
                aggregate=options.aggregate,
                hooks=self._hooks(task_id, TaskStatus.PLANNING, span),
            )
        except BudgetSpent:
            self.metrics.planner_calls.labels("plan", "budget_exceeded").inc()
            return
        except PlanError as e:
            if options.fallback != Fallback.SINGLE:
                self.metrics.planner_calls.labels("plan", "invalid").inc()
                await self._give_up(
                    task_id,
                    f"planning failed: {e}",
                    TaskStatus.PLANNING,
                    FailureReason.PLAN_INVALID,
                )
                return
            self.metrics.planner_calls.labels("plan", "fallback").inc()
            plan, synthesize = self._single(goal, await self.allowed(task_id)), False
            await self.store.note(
                task_id,
                TaskStatus.PLANNING,
                EventType.PLAN_FALLBACK,
                f"no valid plan ({e}); fallback=single: one subtask carries the whole goal",
            )
        except (LLMError, LLMUnavailable) as e:
            self.metrics.planner_calls.labels("plan", "llm_unavailable").inc()
            await self._give_up(
                task_id,
                f"planning failed: {e}",
                TaskStatus.PLANNING,
                FailureReason.LLM_UNAVAILABLE,
            )
            return
        else:
            self.metrics.planner_calls.labels("plan", "ok").inc()
        graph, result_from = finalize(plan, synthesize=synthesize, aggregate=options.aggregate)
        stored = await self.store.set_plan(
            task_id,
            self.resolve(graph, options),
            result_from=result_from,
            priority=options.priority,
        )
        if stored is None:
            logger.info("task %s ended while it was being planned", task_id)
            return
        logger.info("task %s planned: %d subtasks", task_id, len(graph.subtasks))
        self.scheduler.set_task_limit(task_id, options.max_parallel)
        self.scheduler.set_graph(task_id, graph.subtasks)
        self._effects.apply(stored)

    def _hooks(self, task_id: str, status: TaskStatus, span: Span) -> PlanHooks:
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
            span.set_attribute("taskloom.cost", total.cost)
            outcome = await self.store.spend(task_id, usage)
            if outcome.finished:
                logger.info("task %s used up its budget while planning", task_id)
                self._effects.apply(outcome, reason="the task used up its token budget")
                raise BudgetSpent(task_id)

        return PlanHooks(rejected=rejected, normalized=normalized, spent=spent)

    def _single(self, goal: str, caps: frozenset[str]) -> Plan:
        """fallback=single: the whole goal as one subtask."""
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

    # -- replanning --------------------------------------------------------------------

    async def _replan_once(self, task_id: str, failed_id: str) -> None:
        llm = self.planner.llm
        with tracer().start_as_current_span(
            "replan",
            context=await self._effects.task_context(task_id),
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
                capabilities=await self.allowed(task_id),
                hooks=self._hooks(task_id, TaskStatus.RUNNING, span),
            )
        except BudgetSpent:
            return
        except (PlanError, LLMError, LLMUnavailable) as e:
            self.metrics.planner_calls.labels("replan", "failed").inc()
            await self._give_up(
                task_id,
                f"subtask {failed_id} ({failed.title}) failed: {failed.error}; no replacement: {e}",
                TaskStatus.RUNNING,
                FailureReason.REPLAN_FAILED,
            )
            return
        version = task.plan_version + 1
        renamed_ids = {s.id: f"v{version}-{s.id}" for s in plan.subtasks}
        renamed = Plan(
            tuple(
                replace(
                    s,
                    id=renamed_ids[s.id],
                    depends_on=tuple(renamed_ids.get(d, d) for d in s.depends_on),
                )
                for s in plan.subtasks
            )
        )
        graph = self.resolve(renamed, task.options)
        needed = {d for s in graph.subtasks for d in s.depends_on}
        sinks = [s.id for s in graph.subtasks if s.id not in needed]
        waiting = [s.id for s in task.subtasks if failed_id in s.depends_on]
        added = ", ".join(f"{s.id} ({s.title})" for s in graph.subtasks)
        message = f"plan v{version}: {failed_id} ({failed.title}) failed; replaced by {added}"
        if waiting:
            message += f"; {', '.join(waiting)} now wait for {', '.join(sinks)}"
        revised = await self.store.revise_plan(
            task_id, failed_id, task.plan_version, graph.subtasks, sinks, message
        )
        if revised is None:
            logger.info("task %s moved on while it was being replanned", task_id)
            return
        logger.info("task %s: %s", task_id, message)
        self.scheduler.set_graph(task_id, graph.subtasks)
        self._effects.apply(revised)
