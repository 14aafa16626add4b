"""The worker runtime: run assignments concurrently, keep reports until acknowledged.

    worker = Worker(WorkerSettings.load(capabilities="llm,summarize"))

    @worker.handler("summarize")
    async def summarize(ctx: SubtaskContext) -> str:
        return ctx.instruction[:100]

    worker.run()        # or: await worker.serve()

Reports (results and failures) stay in memory until the supervisor
acknowledges them, and are sent again after a reconnect, so a supervisor that
dies between "done" and "stored" loses nothing. On SIGTERM the worker drains:
it takes no new work, gives running subtasks ``drain_timeout`` to finish,
hands back the rest, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from taskloom.core.errors import ConfigError
from taskloom.core.limits import fit_output
from taskloom.core.llm import LLM, create_llm
from taskloom.core.logs import bind_attempt
from taskloom.core.metrics import InstrumentedLLM, serve_metrics
from taskloom.core.model import (
    Assignment,
    AttemptRef,
    ProgressUpdate,
    SubtaskFailure,
    SubtaskResult,
    Usage,
)
from taskloom.core.plan import LABEL_RE
from taskloom.core.prices import Price, PriceTable
from taskloom.core.ratelimits import Limit, LimitTable, RateLimiter
from taskloom.core.roles import ROLE_PARAM
from taskloom.core.tracing import (
    attempt_span_id,
    parent,
    previous_attempt,
    span_id_for,
    tracer,
    tracing,
)
from taskloom.worker.codec import Accepted, Heartbeat, Report, Stopped
from taskloom.worker.connection import Connection
from taskloom.worker.context import (
    BudgetExhausted,
    ReplanRequested,
    SentBack,
    SubtaskContext,
    SubtaskError,
)
from taskloom.worker.handlers import (
    LLM_HANDLER_VERSION,
    Cacheable,
    Handler,
    HandlerRegistry,
    echo,
    llm_handler,
)
from taskloom.worker.metrics import WorkerMetrics
from taskloom.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

FENCE_CHECK = 0.25
"""How often the worker checks that the supervisor still hears it (seconds)."""
ACK_WAIT = 5.0
"""On shutdown, how long to wait for the last reports to be acknowledged."""
SHUTDOWN_WAIT = 5.0
"""Then, how long closing the connection and the LLM client may take."""


class Worker:
    """A worker process: a connection to the supervisor and a set of handlers."""

    def __init__(
        self,
        settings: WorkerSettings | None = None,
        *,
        registry: HandlerRegistry | None = None,
        llm: LLM | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings or WorkerSettings.load()
        self.metrics = metrics or WorkerMetrics()
        self.metrics_port = 0
        self.worker_id = uuid.uuid4().hex
        self.registry = HandlerRegistry()
        self.registry.add("echo", echo)
        self.registry.add(
            "llm",
            llm_handler(
                context_tokens=self.settings.context_tokens,
                max_output_tokens=self.settings.max_output_tokens,
            ),
            version=LLM_HANDLER_VERSION,
            cacheable=True,
        )
        if registry is not None:
            self.registry.update(registry)
        self._metered = InstrumentedLLM(
            llm or create_llm(self.settings), self.metrics.llm, "generate"
        )
        self.llm: LLM = self._metered
        self._running: dict[AttemptRef, asyncio.Task[None]] = {}
        self._cancelled: set[AttemptRef] = set()
        """Attempts the supervisor cancelled: acknowledged with Stopped."""
        self._fenced: set[AttemptRef] = set()
        """Attempts stopped because their lease lapsed: handed back."""
        self._unacked: dict[AttemptRef, Report] = {}
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._draining = False
        self._stopped = asyncio.Event()
        self._connection = Connection(self.settings, self.worker_id, self)
        self.rate_limiter = RateLimiter(LimitTable(), self._connection.take_rate, self.metrics.llm)
        """Keeps every subtask's LLM calls to the supervisor's rate limits."""
        self._logger = logging.getLogger("taskloom.worker.handler")
        self.metrics.watch(
            self.running, self.settings.concurrency, self._connection.connected.is_set
        )

    def handler(
        self, name: str, *, version: str | None = None, cacheable: Cacheable = False
    ) -> Callable[[Handler], Handler]:
        """Decorator: register an async function of a ``SubtaskContext`` for capability
        ``name``. See ``HandlerRegistry`` for ``version`` and ``cacheable``."""
        return self.registry.handler(name, version=version, cacheable=cacheable)

    def cache_keys(self) -> dict[str, str]:
        """Capability → what besides the subtask decides its output (handler
        version and model), for the capabilities whose outputs may be cached."""
        keys = {}
        for capability in self.settings.capabilities:
            info = self.registry.info(capability)
            if info is not None and info.cacheable:
                shared = "shared:" if info.shared_cache else ""
                keys[capability] = f"{shared}{info.version}@{self.llm.describe()}"
        return keys

    def labels(self) -> dict[str, str]:
        """What the worker tells the supervisor it is (``TASKLOOM_LABELS``):
        subtasks that require labels are routed by them. An ``llm`` worker
        says which model it runs (``model``) unless its settings do."""
        labels = dict(self.settings.labels)
        if "llm" in self.settings.capabilities and "model" not in labels:
            model = self.llm.model
            if LABEL_RE.match(model):
                labels["model"] = model
        return labels

    def on_prices(self, prices: dict[str, Price]) -> None:
        """The supervisor's price table (its Welcome): what LLM calls are priced with."""
        self._metered.prices = PriceTable(prices)

    def on_rate_limits(self, limits: dict[str, Limit]) -> None:
        """The supervisor's rate limits (its Welcome): which models' calls
        take from a shared bucket first."""
        self.rate_limiter.table = LimitTable(limits)

    def check(self) -> None:
        """Every advertised capability needs a handler."""
        missing = [c for c in self.settings.capabilities if c not in self.registry]
        if missing:
            raise ConfigError(
                f"TASKLOOM_CAPABILITIES / --capabilities: no handler for {', '.join(missing)}; "
                f"known: {', '.join(self.registry)} (add yours with --app MODULE:ATTR)"
            )

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM or Ctrl-C (twice to skip the drain)."""
        asyncio.run(self.serve(install_signal_handlers=True))

    async def serve(self, *, install_signal_handlers: bool = False) -> None:
        """Connect and run assignments until ``stop()`` or ``drain()`` completes."""
        self.check()
        if self.settings.metrics_port is not None and not self.metrics_port:
            self.metrics_port = serve_metrics(
                self.settings.metrics_port, self.metrics.registry, self.settings.metrics_host
            )
            logger.info("metrics on port %d", self.metrics_port)
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal)
        connection = asyncio.create_task(self._connection.run(), name="taskloom-connection")
        fence = asyncio.create_task(self._fence_forever(), name="taskloom-self-fencing")
        try:
            await self._stopped.wait()
        finally:
            fence.cancel()
            await self._connection.close()
            for task in self._running.values():
                task.cancel()
            # Once stopping, the worker exits: a gRPC call or channel that
            # never finishes closing (seen when the supervisor died during a
            # drain) must not keep the process alive.
            pending = [connection, *self._running.values()]
            _, stuck = await asyncio.wait(pending, timeout=SHUTDOWN_WAIT)
            if stuck:
                logger.warning("%d tasks did not stop within %.0fs; exiting anyway", len(stuck),
                               SHUTDOWN_WAIT)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.llm.close(), SHUTDOWN_WAIT)

    def _on_signal(self) -> None:
        if self._draining:
            logger.warning("second signal: stopping now")
            self._stopped.set()
        else:
            asyncio.get_running_loop().create_task(self.drain())

    async def drain(self, grace: float | None = None) -> None:
        """Take no new work, let running subtasks finish, hand back the rest, stop."""
        timeout = self.settings.drain_timeout if grace is None else grace
        self._draining = True
        logger.info("draining: %d subtasks running, up to %.0fs", len(self._running), timeout)
        self._connection.send(Heartbeat(len(self._running), True))
        if self._running:
            _, late = await asyncio.wait(list(self._running.values()), timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._wait_for_acks()
        self._stopped.set()

    async def stop(self) -> None:
        """Stop now; running subtasks are abandoned and their leases expire."""
        self._stopped.set()

    async def _wait_for_acks(self) -> None:
        if not self._connection.connected.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ACK_WAIT):
                await self._all_acked.wait()

    def lease_valid(self) -> bool:
        """Whether the supervisor has been heard within the lease TTL (always,
        with a supervisor that does not answer heartbeats)."""
        connection = self._connection
        if not connection.heartbeat_acks:
            return True
        return time.monotonic() - connection.last_contact <= connection.lease_ttl

    async def _fence_forever(self) -> None:
        """Self-fencing: once the supervisor has not been heard for the lease
        TTL, it has given this worker's attempts to others; stop them here, so
        that no two attempts of a subtask run past the lease TTL (plus one
        heartbeat interval) at once."""
        while True:
            await asyncio.sleep(FENCE_CHECK)
            if not self._running or self.lease_valid():
                continue
            silent = time.monotonic() - self._connection.last_contact
            for ref, task in list(self._running.items()):
                if ref in self._fenced or ref in self._cancelled:
                    continue
                logger.warning(
                    "no word from the supervisor for %.1fs, past the lease TTL (%gs): "
                    "stopping %s, which runs elsewhere now",
                    silent,
                    self._connection.lease_ttl,
                    ref,
                )
                self._fenced.add(ref)
                task.cancel()

    # -- the session (called by the connection) ----------------------------------------

    def in_flight(self) -> list[AttemptRef]:
        return [*self._running, *self._unacked]

    def unacked(self) -> list[Report]:
        return list(self._unacked.values())

    def running(self) -> int:
        return len(self._running)

    def draining(self) -> bool:
        return self._draining

    def on_assign(self, assignments: Sequence[Assignment]) -> None:
        for assignment in assignments:
            ref = assignment.ref
            if ref in self._running or ref in self._unacked:
                continue
            handler = self.registry.get(assignment.capability)
            if self._draining:
                self._report(
                    SubtaskFailure(ref, "the worker is shutting down; handed back", counts=False)
                )
            elif handler is None:
                self._report(
                    SubtaskFailure(
                        ref,
                        f"worker {self.settings.name} has no handler for {assignment.capability}",
                        True,
                    )
                )
            else:
                self._running[ref] = asyncio.create_task(
                    self._execute(assignment, handler), name=f"subtask-{ref}"
                )

    def on_cancel(self, refs: Sequence[AttemptRef], reason: str) -> None:
        """Stop these attempts' handlers (asyncio cancellation); each one that
        stops is acknowledged with Stopped."""
        self.on_ack(refs)
        for ref in refs:
            task = self._running.get(ref)
            if task is not None:
                logger.info("cancelling %s: %s", ref, reason)
                self._cancelled.add(ref)
                task.cancel()

    def on_ack(self, refs: Sequence[AttemptRef]) -> None:
        for ref in refs:
            self._unacked.pop(ref, None)
        if not self._unacked:
            self._all_acked.set()

    # -- running handlers ---------------------------------------------------------------

    async def _execute(self, assignment: Assignment, handler: Handler) -> None:
        ref = assignment.ref
        self._connection.send(Accepted(ref))
        if not tracing():
            with bind_attempt(ref):
                await self._run_handler(assignment, handler)
            return
        # A span per attempt, a child of the task's root span (its context came
        # inside the Assignment); the handler's LLM calls are spans beneath it.
        # Its span id is made from the attempt, so that a retry links to it.
        with (
            bind_attempt(ref),
            span_id_for(attempt_span_id(ref.task_id, ref.subtask_id, ref.attempt)),
            tracer().start_as_current_span(
                "subtask.attempt",
                context=parent(assignment.trace_context),
                kind=SpanKind.CONSUMER,
                links=previous_attempt(
                    assignment.trace_context, ref.task_id, ref.subtask_id, ref.attempt
                ),
                attributes={
                    "taskloom.task_id": ref.task_id,
                    "taskloom.subtask_id": ref.subtask_id,
                    "taskloom.attempt": ref.attempt,
                    "taskloom.capability": assignment.capability,
                    "taskloom.worker": self.settings.name,
                    "taskloom.role": assignment.params.get(ROLE_PARAM, ""),
                },
            ) as span,
        ):
            outcome = await self._run_handler(assignment, handler)
            span.set_attribute("taskloom.outcome", outcome)
            if outcome != "succeeded":
                span.set_status(Status(StatusCode.ERROR, outcome))

    async def _run_handler(self, assignment: Assignment, handler: Handler) -> str:
        """Run the handler, report how it ended; returns that as an outcome."""
        ref = assignment.ref

        async def report_progress(message: str, text: str) -> None:
            if ref in self._running:
                self._connection.send(ProgressUpdate(ref, message, text))

        ctx = SubtaskContext(
            assignment,
            self.llm,
            self._logger,
            report_progress,
            prices=self._metered.prices,
            limiter=self.rate_limiter,
            _lease=self.lease_valid,
        )
        span = trace.get_current_span()
        report: Report
        scope = asyncio.timeout(assignment.timeout or None)
        started = time.monotonic()
        outcome = "failed"
        try:
            async with scope:
                output = await handler(ctx)
                await ctx.flush()
            text, too_large = fit_output(
                _as_text(output),
                self._connection.max_output_bytes,
                truncate=self._connection.truncate_output,
            )
            if too_large:
                report = SubtaskFailure(ref, too_large, False, usage=ctx.usage)
            else:
                report = SubtaskResult(ref, text, ctx.usage)
                outcome = "succeeded"
        except TimeoutError as e:
            trace.get_current_span().record_exception(e)
            outcome = "timed_out" if scope.expired() else "failed"
            if scope.expired():
                report = SubtaskFailure(
                    ref, f"timed out after {assignment.timeout:g}s", True, usage=ctx.usage
                )
            else:
                report = SubtaskFailure(ref, f"TimeoutError: {e}", True, usage=ctx.usage)
        except asyncio.CancelledError:
            if ref in self._cancelled:
                self._cancelled.discard(ref)
                self._running.pop(ref, None)
                self._connection.send(Stopped(ref, ctx.usage))
                self._observe(assignment.capability, "cancelled", started)
                _spent(span, ctx.usage)
                return "cancelled"
            outcome = "handed_back"
            why = "the worker shut down before finishing; handed back"
            if ref in self._fenced:
                self._fenced.discard(ref)
                outcome = "fenced"
                why = "the worker lost the supervisor past the lease TTL and stopped; handed back"
            report = SubtaskFailure(ref, why, counts=False, usage=ctx.usage)
        except SubtaskError as e:
            trace.get_current_span().record_exception(e)
            report = SubtaskFailure(
                ref,
                e.message,
                e.retryable,
                usage=ctx.usage,
                replan=isinstance(e, ReplanRequested),
                send_back=e.step if isinstance(e, SentBack) else "",
                budget_exceeded=isinstance(e, BudgetExhausted),
            )
        except Exception as e:
            logger.exception("handler %s failed on %s", assignment.capability, ref)
            trace.get_current_span().record_exception(e)
            report = SubtaskFailure(ref, f"{type(e).__name__}: {e}", True, usage=ctx.usage)
        finally:
            self._running.pop(ref, None)
        self._observe(assignment.capability, outcome, started)
        _spent(span, ctx.usage)
        self._report(report)
        return outcome

    def _observe(self, capability: str, outcome: str, started: float) -> None:
        self.metrics.observe_attempt(capability, outcome, time.monotonic() - started)

    def _report(self, report: Report) -> None:
        self._unacked[report.ref] = report
        self._all_acked.clear()
        self._connection.send(report)


def _spent(span: trace.Span, usage: Usage) -> None:
    """The attempt's LLM usage on its span."""
    if usage.calls:
        span.set_attribute("taskloom.input_tokens", usage.input_tokens)
        span.set_attribute("taskloom.output_tokens", usage.output_tokens)
        span.set_attribute("taskloom.cost", usage.cost)


def _as_text(output: object) -> str:
    if output is None:
        return ""
    if isinstance(output, str):
        return output
    if isinstance(output, bytes):
        return output.decode("utf-8", errors="replace")
    return json.dumps(output, default=str, ensure_ascii=False)


def load_handlers(spec: str) -> HandlerRegistry:
    """The handlers at ``module:attribute`` (a ``Worker`` or a ``HandlerRegistry``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"TASKLOOM_APP / --app: {spec!r} is not MODULE:ATTRIBUTE")
    # Like celery and uvicorn: the app is found relative to where the worker starts.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"TASKLOOM_APP / --app: cannot import {module_name}: {e}") from None
    target = getattr(module, attribute, None)
    if isinstance(target, Worker):
        return target.registry
    if isinstance(target, HandlerRegistry):
        return target
    raise ConfigError(
        f"TASKLOOM_APP / --app: {spec} is {type(target).__name__}, not a Worker or HandlerRegistry"
    )
