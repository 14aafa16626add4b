"""The Redis store: the truth about every task, subtask and event.

Every state transition is one atomic step, a Lua script from ``lua/``
(writing a new task or plan as much as assign, start, progress, complete,
fail, finish), and appends its event to the task's stream in the same step.
Methods take and return batches, so the hot path pays one round trip for
many subtasks.
The scripts share one auto-pipelined connection (``scriptline``); reads use
redis-py's pool, and watchers' blocking reads a pool of their own.

Redis errors are translated here, and only here, into ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from taskloom.core.errors import (
    InvalidArgument,
    NotLeader,
    ResourceExhausted,
    StoreUnavailable,
    TaskNotFound,
)
from taskloom.core.model import (
    SYNTHESIZE_ID,
    Assignment,
    AttemptRef,
    ContextMode,
    Event,
    EventType,
    FailureReason,
    Fallback,
    Input,
    OnFailure,
    Plan,
    PlannedSubtask,
    ProgressUpdate,
    Subtask,
    SubtaskFailure,
    SubtaskResult,
    SubtaskStatus,
    Task,
    TaskOptions,
    TaskStatus,
    Usage,
)
from taskloom.supervisor.keys import Keys, lua_prelude
from taskloom.supervisor.scriptline import ScriptLine

if TYPE_CHECKING:
    from taskloom.supervisor.metrics import SupervisorMetrics

logger = logging.getLogger(__name__)

REDIS_TIMEOUT = 10.0
"""How long a command may go unanswered before the call fails (seconds)."""

P = ParamSpec("P")
T = TypeVar("T")

_SCRIPTS = (
    "create",
    "plan",
    "assign",
    "start",
    "progress",
    "complete",
    "fail",
    "finish",
    "note",
    "lead",
    "cancel_subtask",
    "stopped",
    "revise",
    "spend",
    "expire",
)
_FENCED = "TASKLOOM_FENCED"
_BLOCKING = frozenset({"read_streams"})
"""Operations that wait for something to happen: their time is not latency."""
DEFAULT_MAX_ATTEMPTS = 3
"""For a planned subtask that does not say (the orchestrator always does)."""
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, rexc.ReadOnlyError)


@dataclass(frozen=True, slots=True)
class ReadyItem:
    """A READY subtask waiting for a worker."""

    task_id: str
    subtask_id: str
    capability: str
    priority: int = 0
    failed_attempt: int = 0
    """The attempt that just failed, for retry backoff; 0 for a first run."""


@dataclass(frozen=True, slots=True)
class Handed:
    """A subtask the script that made it READY gave at once to an offered
    worker (see ``Scheduler.offer`` and hand_out in lib.lua)."""

    item: ReadyItem
    worker: int
    """Which of the workers offered for ``item.capability`` (0-based)."""
    assignment: Assignment


OfferedSlots = Mapping[str, Sequence[tuple[str, str, str, int]]]
"""Free worker slots a write may fill with the subtasks it makes READY:
capability → ``(worker_id, name, cache fingerprint, slots)`` per worker."""


@dataclass(slots=True)
class Outcome:
    """What a write changed: a batch of reports, an assignment, a new task."""

    committed: list[bool] = field(default_factory=list)
    ready: list[ReadyItem] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    held: list[AttemptRef] = field(default_factory=list)
    """Attempts workers still hold in tasks that just ended: to be cancelled."""
    replan: list[tuple[str, str]] = field(default_factory=list)
    """``(task, subtask)``: failed for good in a task that replans; ask the planner."""
    finished_status: list[str] = field(default_factory=list)
    """The status each of ``finished`` ended with."""
    cached: list[str] = field(default_factory=list)
    """Capabilities of subtasks answered from the cache."""
    handed: list[Handed] = field(default_factory=list)
    """Subtasks that became READY and were assigned at once to offered workers."""
    ended: dict[str, Event] = field(default_factory=dict)
    """The terminal event of each task in ``finished``."""


@dataclass(frozen=True, slots=True)
class RecoveredSubtask:
    subtask_id: str
    status: SubtaskStatus
    attempt: int
    worker_id: str
    worker: str
    capability: str
    deadline: float | None = None
    """When the held attempt's timeout ends (Unix time)."""


@dataclass(frozen=True, slots=True)
class RecoveredTask:
    """An unfinished task found at start-up."""

    task_id: str
    status: TaskStatus
    goal: str
    options: TaskOptions
    subtasks: tuple[RecoveredSubtask, ...]
    replan_pending: str = ""
    """A subtask whose replacement the planner was asked for when the supervisor stopped."""


def new_task_id() -> str:
    """Time-ordered and unguessable: 12 hex digits of milliseconds, 8 random."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def _translated(
    method: Callable[Concatenate[Store, P], Awaitable[T]],
) -> Callable[Concatenate[Store, P], Coroutine[Any, Any, T]]:
    operation = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Store, /, *args: P.args, **kwargs: P.kwargs) -> T:
        started = time.monotonic()
        try:
            result = await method(self, *args, **kwargs)
        except _UNAVAILABLE as e:
            _cancellation_swallowed()
            if self.metrics is not None:
                self.metrics.redis_failure(operation).inc()
            raise StoreUnavailable(
                f"Redis at {self.safe_url} is unavailable ({e}); "
                "check that it runs and TASKLOOM_REDIS_URL points at it"
            ) from None
        except rexc.ResponseError as e:
            if str(e).startswith(_FENCED):
                holder = str(e).removeprefix(_FENCED).removeprefix(" the leader lease is held by ")
                raise NotLeader(
                    f"this supervisor lost the leader lease (now held by {holder}); "
                    "a supervisor takes the lead within TASKLOOM_LEADER_TTL, try again"
                ) from None
            raise
        # redis-py (8.x) finishes a command whose caller was cancelled and
        # returns as if nothing happened: the cancellation is lost, and a loop
        # that was told to stop runs for ever. Give it back.
        _cancellation_swallowed()
        if self.metrics is not None and operation not in _BLOCKING:
            self.metrics.redis_operation(operation).observe(time.monotonic() - started)
        return result

    return wrapper


def _cancellation_swallowed() -> None:
    """Raise CancelledError if the current task was cancelled during the call."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError()


def _dict(value: Any) -> dict[str, Any]:
    # cjson encodes an empty Lua table as {}, a list or a map alike.
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    # cjson encodes an empty Lua table as {}.
    return value if isinstance(value, list) else []


class Store:
    """Tasks, subtasks and events in Redis under one key prefix."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "taskloom:",
        retention: float = 7 * 86400.0,
        socket_timeout: float = REDIS_TIMEOUT,
        max_connections: int = 64,
    ) -> None:
        self.keys = Keys(prefix)
        self.metrics: SupervisorMetrics | None = None
        """Where operation latency and errors are counted (None: nowhere)."""
        self.fence = ""
        """The leader lease's token; every write checks that it still holds the lease.
        Empty only for tools and tests that run without a leader."""
        self.retention = max(1, int(retention))
        self.safe_url = _without_password(url)
        # A pooled connection that Redis closed (a restart, an idle timeout)
        # is found closed only when used: the command is sent once more on a
        # new connection rather than failing. Every pooled command is a read
        # or idempotent; the scripts, which are not, go over the script line
        # and are never resent. A timeout is not retried, so a Redis that
        # hangs costs one socket timeout, not two.
        retry = Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,))
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": 5.0,
            "retry": retry,
        }
        # redis-py's annotations cannot express decode_responses=True (every
        # reply is str); the store is the one module that touches it, so it
        # holds the clients as Any rather than casting each reply.
        # A blocking pool: a burst of more operations than connections waits
        # for a free one (redis-py's default pool fails them at 100).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            **options,
        )
        self._redis: Any = aioredis.Redis.from_pool(pool)
        # Watchers block in XREAD; they get their own pool so that they can
        # never starve the transitions of connections.
        self._blocking: Any = aioredis.Redis.from_url(url, socket_timeout=None, **options)
        # Scripts, the hot path, share one auto-pipelined connection.
        self._line = ScriptLine(pool, socket_timeout)
        prelude = lua_prelude() + _lua("lib")
        self._sources = {name: prelude + _lua(name) for name in _SCRIPTS}
        self._shas = {
            name: hashlib.sha1(source.encode()).hexdigest()
            for name, source in self._sources.items()
        }

    @_translated
    async def connect(self) -> None:
        """Check that Redis answers and load the scripts."""
        await self._redis.ping()
        for source in self._sources.values():
            await self._redis.script_load(source)

    @_translated
    async def persistence(self) -> tuple[str, str] | None:
        """Redis's ``appendonly`` and ``appendfsync``; None where CONFIG is
        refused (managed services rename or forbid it)."""
        try:
            found = await self._redis.config_get("append*")
        except rexc.ResponseError:
            return None
        return str(found.get("appendonly", "")), str(found.get("appendfsync", ""))

    async def close(self) -> None:
        await self._line.close()
        await self._redis.aclose()
        await self._blocking.aclose()

    async def _run(
        self, name: str, payload: Any, *, fenced: bool = True, now: float | None = None
    ) -> Any:
        args: list[str | int] = [
            self.keys.prefix,
            repr(time.time() if now is None else now),
            self.retention,
            json.dumps(payload),
            self.fence if fenced else "",
        ]
        reply = await self._line.eval(self._sources[name], self._shas[name], args)
        return json.loads(reply)

    # -- the leader lease --------------------------------------------------------

    @_translated
    async def acquire_lease(self, holder: str, ttl: float) -> tuple[bool, str]:
        """Take the lease if it is free: ``(True, token)``, else ``(False, the holder's token)``."""
        reply = await self._run("lead", ["acquire", holder, int(ttl * 1000)], fenced=False)
        return bool(reply["ok"]), str(reply["token"])

    @_translated
    async def renew_lease(self, token: str, ttl: float) -> tuple[bool, str]:
        """Extend our lease: ``(True, token)``, or ``(False, whoever holds it now)``."""
        reply = await self._run("lead", ["renew", token, int(ttl * 1000)], fenced=False)
        return bool(reply["ok"]), str(reply["token"])

    @_translated
    async def release_lease(self, token: str) -> bool:
        """Give the lease up if we still hold it."""
        reply = await self._run("lead", ["release", token, 0], fenced=False)
        return bool(reply["ok"])

    # -- creating tasks --------------------------------------------------------

    @_translated
    async def create_task(
        self,
        *,
        goal: str,
        options: TaskOptions,
        plan: Plan | None,
        result_from: Sequence[str] = (),
        idempotency_key: str = "",
        max_replans: int = 0,
        cache_ttl: float = 0.0,
        trace: Mapping[str, str] | None = None,
        owner: str = "",
        max_in_flight: int = 0,
        offer: OfferedSlots | None = None,
    ) -> tuple[str, bool, Outcome]:
        """Store a new task (PLANNING, or RUNNING with ``plan``) owned by ``owner``.

        Each planned subtask's ``max_attempts`` and ``timeout`` must be
        resolved already, and ``options.stall_timeout`` too.

        Returns ``(task_id, created, outcome)``: the plan's READY subtasks
        are in ``outcome.ready``, or in ``outcome.handed`` for those given
        at once to the workers in ``offer`` (no more than
        ``options.max_parallel``). ``created`` is False when the idempotency key
        already names a task of the same owner, which is returned instead.
        With ``max_in_flight``, an owner who already has that many
        unfinished tasks gets ``ResourceExhausted``.
        """
        # Idempotency keys are the owner's own: another principal's key
        # must neither find nor block this one's task.
        idem = self.keys.idempotency(f"{owner}\x00{idempotency_key}") if idempotency_key else ""
        task_id = new_task_id()
        now = time.time()
        fields = {
            "id": task_id,
            "goal": goal,
            "status": TaskStatus.PLANNING,
            "options": json.dumps(_options_doc(options)),
            "priority": options.priority,
            "on_failure": options.on_failure,
            "stall": repr(options.stall_timeout),
            "max_replans": max_replans,
            "replans": 0,
            "version": 1,
            "created_at": repr(now),
            "updated_at": repr(now),
            "total": 0,
            "succeeded": 0,
            "max_tokens": options.max_tokens,
            "max_duration": f"{options.max_duration:g}",
            "ctx_tokens": options.context_tokens,
            "ctx_mode": options.context,
            "cache_ttl": int(cache_ttl),
            "traceparent": (trace or {}).get("traceparent", ""),
            "trace_id": _trace_id(trace),
            "owner": owner,
        }
        # One script: the fence, the idempotency key and the owner's limit are
        # checked in the same atomic step that writes the task (create.lua).
        payload = [
            task_id,
            idem,
            owner,
            max_in_flight,
            [str(x) for kv in fields.items() for x in kv],
            now + options.max_duration if options.max_duration else 0,
            goal[:200],
            _span_id(trace),
            _plan_payload(plan, result_from) if plan is not None else False,
            offer or False,
            {task_id: options.max_parallel} if options.max_parallel > 0 else {},
            options.priority,
        ]
        found, created, reply = await self._run("create", payload, now=now)
        if created < 0:
            raise ResourceExhausted(
                f"{owner} already has {max_in_flight:,} unfinished tasks, the limit "
                "(TASKLOOM_MAX_TASKS_IN_FLIGHT); wait for some to end or cancel them",
                subject="max_tasks_in_flight",
            )
        if not created:
            return str(found), False, Outcome()
        return task_id, True, _outcome(_dict(reply))

    @_translated
    async def set_plan(
        self,
        task_id: str,
        plan: Plan,
        *,
        result_from: Sequence[str],
        priority: int,
    ) -> list[ReadyItem] | None:
        """Store the graph of a PLANNING task and start it; None if it is no
        longer PLANNING (cancelled while the model thought: it stays so)."""
        ready = await self._run("plan", [task_id, *_plan_payload(plan, result_from)])
        if ready is False:
            return None
        return _ready(task_id, plan, ready, priority)

    @_translated
    async def note(
        self, task_id: str, expected: TaskStatus, type_: EventType, message: str, span: str = ""
    ) -> bool:
        """Log an event while the task is still in the ``expected`` state."""
        return bool(await self._run("note", [task_id, expected, type_, message, span]))

    @_translated
    async def trace_of(self, task_id: str) -> dict[str, str]:
        """The W3C trace context of the task's root span (empty if it has none)."""
        if not _plain(task_id):
            return {}
        raw = await self._redis.hget(self.keys.task(task_id), "traceparent")
        return {"traceparent": raw} if raw else {}

    # -- transitions -----------------------------------------------------------

    @_translated
    async def assign(
        self, items: Sequence[tuple[ReadyItem, str, str, str]]
    ) -> tuple[list[Assignment | None], Outcome]:
        """READY → ASSIGNED for each ``(item, worker_id, worker_name, fingerprint)``.

        Returns the assignments (None where stale or answered from the cache)
        and what cache hits changed: subtasks made READY, tasks finished.
        """
        reply = await self._run(
            "assign",
            [[item.task_id, item.subtask_id, wid, name, fp] for item, wid, name, fp in items],
        )
        out: list[Assignment | None] = [None] * len(items)
        now = time.time()
        for index, *row in _list(reply["assigned"]):
            item = items[index - 1][0]
            out[index - 1] = _assignment(item.task_id, item.subtask_id, row, reply, now)
        hits = _list(reply["hits"])
        outcome = _outcome({"committed": [1] * len(hits), **reply})
        outcome.cached = [items[i - 1][0].capability for i in hits]
        return out, outcome

    @_translated
    async def start(self, refs: Sequence[AttemptRef], worker_id: str = "") -> list[bool]:
        """ASSIGNED → RUNNING; False where the report is stale (or, with
        ``worker_id``, the attempt was given to another worker)."""
        reply = await self._run(
            "start", [[r.task_id, r.subtask_id, r.attempt, worker_id] for r in refs]
        )
        return [bool(x) for x in _list(reply)]

    @_translated
    async def progress(self, updates: Sequence[ProgressUpdate], worker_id: str = "") -> list[bool]:
        """Log progress and streamed output; False where the report is stale."""
        reply = await self._run(
            "progress",
            [
                [u.ref.task_id, u.ref.subtask_id, u.ref.attempt, u.message, u.text, worker_id]
                for u in updates
            ],
        )
        return [bool(x) for x in _list(reply)]

    @_translated
    async def complete(
        self,
        results: Sequence[SubtaskResult],
        worker_id: str = "",
        *,
        offer: OfferedSlots | None = None,
        limits: Mapping[str, int] | None = None,
    ) -> Outcome:
        """Commit results, unlock dependents, finish tasks whose last subtask this
        was. With ``worker_id``, only results for attempts given to that worker.
        Dependents that become READY go at once to the workers in ``offer``
        (``outcome.handed``), no more per task than ``limits`` says."""
        payload = [
            [
                r.ref.task_id,
                r.ref.subtask_id,
                r.ref.attempt,
                r.output,
                _usage_doc(r.usage),
                worker_id,
            ]
            for r in results
        ]
        return _outcome(await self._run("complete", [payload, offer or False, limits or {}]))

    @_translated
    async def fail(self, failures: Sequence[SubtaskFailure], worker_id: str = "") -> Outcome:
        """Commit failures: retry while attempts remain, else fail the task.
        With ``worker_id``, only failures of attempts given to that worker."""
        payload = [
            [
                f.ref.task_id,
                f.ref.subtask_id,
                f.ref.attempt,
                f.error,
                int(f.retryable),
                int(f.counts),
                _usage_doc(f.usage),
                worker_id,
            ]
            for f in failures
        ]
        return _outcome(await self._run("fail", payload))

    @_translated
    async def finish(
        self,
        task_id: str,
        status: TaskStatus,
        error: str,
        event: EventType,
        *,
        expected: Iterable[TaskStatus],
        reason: FailureReason = FailureReason.NONE,
    ) -> tuple[bool, TaskStatus | None, list[AttemptRef]]:
        """End a task that is in one of the ``expected`` states.

        Returns ``(changed, status found, attempts held by workers)``.
        """
        reply = await self._run(
            "finish", [task_id, status, error, event, list(expected), str(reason)]
        )
        found = TaskStatus(reply["status"]) if reply["status"] else None
        held = [AttemptRef(t, s, int(a)) for t, s, a in _list(reply.get("held"))]
        return bool(reply["changed"]), found, held

    @_translated
    async def spend(self, task_id: str, usage: Usage) -> tuple[bool, list[AttemptRef]]:
        """Add a planning call's usage to the task's; ``(True, held)`` if that
        took it past its max_tokens and ended it."""
        reply = await self._run("spend", [task_id, _usage_doc(usage)])
        held = [AttemptRef(t, s, int(a)) for t, s, a in _list(reply.get("held"))]
        return bool(reply["over"]), held

    @_translated
    async def expire_overdue(self, limit: int = 100) -> Outcome:
        """End the tasks past their max_duration (BUDGET_EXCEEDED)."""
        reply = await self._run("expire", [limit])
        return _outcome({"committed": [], "ready": [], **reply})

    @_translated
    async def cancel_subtask(
        self, task_id: str, subtask_id: str, reason: str
    ) -> tuple[TaskStatus | None, SubtaskStatus | None, Outcome | None]:
        """Cancel one subtask of a running task and skip its dependents.

        Returns ``(task status, subtask status found, outcome)``; the outcome
        is None when nothing changed.
        """
        reply = await self._run("cancel_subtask", [task_id, subtask_id, reason])
        task = TaskStatus(reply["task"]) if reply["task"] else None
        sub = SubtaskStatus(reply["sub"]) if reply["sub"] else None
        if not reply["changed"]:
            return task, sub, None
        return task, sub, _outcome({"committed": [1], **reply})

    @_translated
    async def revise_plan(
        self,
        task_id: str,
        failed: str,
        version: int,
        subtasks: Sequence[PlannedSubtask],
        sinks: Sequence[str],
        message: str,
    ) -> list[ReadyItem] | None:
        """Replace the failed subtask with ``subtasks`` (ids already unique);
        None if the task moved on (ended, or was revised already)."""
        payload = [
            task_id,
            failed,
            version,
            [_subtask_row(s) for s in subtasks],
            list(sinks),
            message,
        ]
        reply = await self._run("revise", payload)
        if not reply["ok"]:
            return None
        return [ReadyItem(t, s, cap, int(prio)) for t, s, cap, prio in _list(reply["ready"])]

    @_translated
    async def stopped(self, refs: Sequence[AttemptRef], worker: str) -> None:
        """Log that a worker stopped these attempts after a Cancel."""
        await self._run("stopped", [[r.task_id, r.subtask_id, r.attempt, worker] for r in refs])

    # -- reading ---------------------------------------------------------------

    @_translated
    async def get_task(self, task_id: str, *, subtasks: bool = True) -> Task:
        """One task, with its subtasks unless ``subtasks`` is False."""
        raw = await self._redis.hgetall(self.keys.task(task_id)) if _plain(task_id) else {}
        if not raw:
            raise TaskNotFound(task_id)
        children: tuple[Subtask, ...] = ()
        if subtasks:
            ids = await self._redis.lrange(self.keys.subtasks(task_id), 0, -1)
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hgetall(self.keys.subtask(task_id, sid))
                rows = await pipe.execute()
            children = tuple(_subtask(row) for row in rows if row)
        return _task(raw, children)

    @_translated
    async def task_owner(self, task_id: str) -> str | None:
        """Who submitted the task, or None if there is no such task."""
        if not _plain(task_id):
            return None
        owner, status = await self._redis.hmget(self.keys.task(task_id), ["owner", "status"])
        return None if status is None else str(owner or "")

    @_translated
    async def task_status(self, task_id: str) -> TaskStatus | None:
        """The task's state, or None if there is no such task."""
        status = (
            await self._redis.hget(self.keys.task(task_id), "status") if _plain(task_id) else None
        )
        return TaskStatus(status) if status else None

    @_translated
    async def list_tasks(
        self,
        *,
        statuses: Iterable[TaskStatus] = (),
        page_size: int = 50,
        page_token: str = "",
        owner: str | None = None,
    ) -> tuple[list[Task], str]:
        """Tasks newest first (only ``owner``'s if given), ``page_size`` at a
        time; the token continues the listing."""
        index = self.keys.tasks_index if owner is None else self.keys.owner_tasks(owner)
        wanted = set(statuses)
        max_score, last_id = _decode_token(page_token)
        found: list[Task] = []
        offset = 0
        batch = max(page_size * 2, 100)
        while len(found) < page_size:
            entries = await self._redis.zrange(
                index,
                repr(max_score),
                "-inf",
                desc=True,
                byscore=True,
                offset=offset,
                num=batch,
                withscores=True,
            )
            if not entries:
                return found, ""
            offset += len(entries)
            # Equal scores come in reverse id order; skip those at or above the cursor.
            fresh = [
                (tid, score)
                for tid, score in entries
                if not (last_id and score == max_score and tid >= last_id)
            ]
            async with self._redis.pipeline(transaction=False) as pipe:
                for tid, _ in fresh:
                    pipe.hgetall(self.keys.task(tid))
                rows = await pipe.execute()
            missing = []
            for (tid, score), row in zip(fresh, rows, strict=True):
                if not row:
                    missing.append(tid)
                    continue
                task = _task(row, ())
                if wanted and task.status not in wanted:
                    continue
                found.append(task)
                if len(found) == page_size:
                    return found, _encode_token(score, tid)
            if missing:
                # Expired after the retention period: drop from the index too.
                await self._redis.zrem(index, *missing)
                offset -= len(missing)
        return found, ""

    @_translated
    async def read_events(self, task_id: str, after: str, count: int = 1000) -> list[Event]:
        """Up to ``count`` events after the cursor (``""`` or ``"0"``: from the start)."""
        start = f"({after}" if after and after != "0" else "-"
        entries = await self._redis.xrange(self.keys.events(task_id), start, "+", count=count)
        return [_decode_event(task_id, eid, fields) for eid, fields in entries]

    @_translated
    async def last_event_id(self, task_id: str) -> str:
        """The id of the task's newest event ("0" if none)."""
        entries = await self._redis.xrevrange(self.keys.events(task_id), count=1)
        return str(entries[0][0]) if entries else "0"

    @_translated
    async def endings(
        self, task_ids: Sequence[str], count: int
    ) -> dict[str, tuple[str | None, TaskStatus | None, list[Event]]]:
        """For each task, its owner and state (None, None if there is no such
        task) and, once it has ended, its newest ``count`` events, oldest
        first: in a few pipelined round trips, whatever the number of tasks."""
        found: dict[str, tuple[str | None, TaskStatus | None, list[Event]]] = {
            t: (None, None, []) for t in task_ids
        }
        plain = [t for t in found if _plain(t)]
        heads: list[Any] = []
        for start in range(0, len(plain), PIPELINE_CHUNK):
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id in plain[start : start + PIPELINE_CHUNK]:
                    pipe.hmget(self.keys.task(task_id), ["owner", "status"])
                heads += await pipe.execute()
        ended = []
        for task_id, (owner, status) in zip(plain, heads, strict=True):
            if status is not None:
                found[task_id] = (str(owner or ""), TaskStatus(status), [])
                if TaskStatus(status).terminal:
                    ended.append(task_id)
        for start in range(0, len(ended), PIPELINE_CHUNK):
            chunk = ended[start : start + PIPELINE_CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id in chunk:
                    pipe.xrevrange(self.keys.events(task_id), count=count)
                for task_id, entries in zip(chunk, await pipe.execute(), strict=True):
                    owner, status, _ = found[task_id]
                    events = [_decode_event(task_id, i, f) for i, f in reversed(entries)]
                    found[task_id] = (owner, status, events)
        return found

    @_translated
    async def last_events(self, task_id: str, count: int) -> list[Event]:
        """The task's newest ``count`` events, oldest first."""
        entries = await self._redis.xrevrange(self.keys.events(task_id), count=count)
        return [_decode_event(task_id, eid, fields) for eid, fields in reversed(entries)]

    @_translated
    async def read_streams(self, streams: Mapping[str, str], *, block_ms: int) -> dict[str, str]:
        """Block until any of the streams has entries after its id (or ``block_ms``
        passes); returns the last id read from each stream that had some.

        The one blocking read of the supervisor (see ``events.EventHub``), on
        its own connection so that it never holds up a transition.
        """
        # One entry per stream says it grew; its newest id comes from
        # XREVRANGE, so the events themselves are never read here.
        reply = await self._blocking.xread(dict(streams), count=1, block=block_ms)
        grown = [key for key, entries in reply or [] if entries]
        if not grown:
            return {}
        async with self._blocking.pipeline(transaction=False) as pipe:
            for key in grown:
                pipe.xrevrange(key, count=1)
            newest = await pipe.execute()
        return {key: last[0][0] for key, last in zip(grown, newest, strict=True) if last}

    @_translated
    async def poke(self, key: str) -> None:
        """Append to a wake-up stream (kept short, and gone within a day)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"w": "1"}, maxlen=10, approximate=True)
            pipe.expire(key, 86400)
            await pipe.execute()

    @_translated
    async def drop_key(self, key: str) -> None:
        await self._redis.delete(key)

    @_translated
    async def load_active(self) -> list[RecoveredTask]:
        """Every unfinished task with the state of its subtasks, for recovery at start-up."""
        ids = await self._redis.zrange(self.keys.active_index, 0, -1)
        recovered: list[RecoveredTask] = []
        for task_id in ids:
            raw = await self._redis.hgetall(self.keys.task(task_id))
            if not raw:
                await self._redis.zrem(self.keys.active_index, task_id)
                continue
            sids = await self._redis.lrange(self.keys.subtasks(task_id), 0, -1)
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in sids:
                    pipe.hmget(
                        self.keys.subtask(task_id, sid),
                        [
                            "status",
                            "attempt",
                            "worker_id",
                            "worker",
                            "capability",
                            "assigned_at",
                            "timeout",
                        ],
                    )
                rows = await pipe.execute()
            subs = tuple(
                RecoveredSubtask(
                    sid,
                    SubtaskStatus(st),
                    int(att or 0),
                    wid or "",
                    name or "",
                    cap or "",
                    float(at) + float(timeout) if at and timeout and float(timeout) else None,
                )
                for sid, (st, att, wid, name, cap, at, timeout) in zip(sids, rows, strict=True)
                if st
            )
            task = _task(raw, ())
            recovered.append(
                RecoveredTask(
                    task_id,
                    task.status,
                    task.goal,
                    task.options,
                    subs,
                    raw.get("replan_pending", ""),
                )
            )
        return recovered

    @_translated
    async def trim_indexes(self, now: float | None = None) -> int:
        """Drop tasks past their retention from the indexes; returns how many."""
        cutoff = (now or time.time()) - self.retention
        old = await self._redis.zrangebyscore(
            self.keys.finished_index, "-inf", cutoff, start=0, num=1000
        )
        if old:
            owners = await self._redis.smembers(self.keys.owners)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.keys.finished_index, *old)
                pipe.zrem(self.keys.tasks_index, *old)
                for owner in owners:
                    pipe.zrem(self.keys.owner_tasks(owner), *old)
                await pipe.execute()
        return len(old)


PIPELINE_CHUNK = 1_000
"""Commands per pipelined round trip when reading many tasks at once."""


def _lua(name: str) -> str:
    return resources.files("taskloom.supervisor").joinpath(f"lua/{name}.lua").read_text()


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _plain(task_id: str) -> bool:
    # Task ids are ours (hex); anything else cannot exist and must not be
    # spliced into a key name.
    return 0 < len(task_id) <= 64 and task_id.isalnum()


def _plan_payload(plan: Plan, result_from: Sequence[str]) -> list[Any]:
    """A plan as store_plan (lib.lua) takes it: each row, and whether the
    subtask runs even if some of its inputs failed (the synthesis step)."""
    return [
        list(result_from),
        [[*_subtask_row(s), int(s.id == SYNTHESIZE_ID)] for s in plan.subtasks],
    ]


def _subtask_row(s: PlannedSubtask) -> list[Any]:
    """A planned subtask as the scripts take it (plan.lua, create.lua, revise.lua)."""
    return [
        s.id,
        s.title,
        s.instruction,
        s.capability,
        list(s.depends_on),
        json.dumps(dict(s.params)),
        s.max_attempts or DEFAULT_MAX_ATTEMPTS,
        repr(s.timeout),
    ]


def _ready(task_id: str, plan: Plan, ids: Sequence[str], priority: int) -> list[ReadyItem]:
    """The READY subtasks plan.lua reported, for the scheduler's queue."""
    capability = {s.id: s.capability for s in plan.subtasks}
    return [ReadyItem(task_id, sid, capability[sid], priority) for sid in ids]


def _usage_doc(usage: Usage) -> str:
    """The usage as JSON; "" for none (a handler that used no LLM), which
    the scripts skip without decoding or checking the budget."""
    if not (usage.input_tokens or usage.output_tokens or usage.calls or usage.model):
        return ""
    return json.dumps(
        {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "model": usage.model,
            "seconds": round(usage.seconds, 6),
            "calls": usage.calls,
        }
    )


def _usage(doc: Mapping[str, Any]) -> Usage:
    return Usage(
        input_tokens=int(doc.get("input_tokens", 0)),
        output_tokens=int(doc.get("output_tokens", 0)),
        model=str(doc.get("model", "")),
        seconds=float(doc.get("seconds", 0.0)),
        calls=int(doc.get("calls", 0)),
    )


def _options_doc(options: TaskOptions) -> dict[str, Any]:
    return {
        "synthesize": options.synthesize,
        "priority": options.priority,
        "max_parallel": options.max_parallel,
        "on_failure": options.on_failure,
        "max_attempts": options.max_attempts,
        "subtask_timeout": options.subtask_timeout,
        "stall_timeout": options.stall_timeout,
        "fallback": options.fallback,
        "context_tokens": options.context_tokens,
        "context": options.context,
        "max_tokens": options.max_tokens,
        "max_duration": options.max_duration,
        "cache": options.cache,
    }


def _event(
    type_: EventType,
    *,
    sub: str = "",
    status: str = "",
    message: str = "",
    attempt: int = 0,
    worker: str = "",
    trace: str = "",
    span: str = "",
) -> dict[str, str]:
    return {
        "type": type_,
        "subtask": sub,
        "status": status,
        "message": message,
        "attempt": str(attempt),
        "worker": worker,
        "trace": trace,
        "span": span,
    }


def _trace_id(trace: Mapping[str, str] | None) -> str:
    """The trace id in a ``traceparent`` (``00-<trace>-<span>-<flags>``)."""
    parts = (trace or {}).get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else ""


def _span_id(trace: Mapping[str, str] | None) -> str:
    parts = (trace or {}).get("traceparent", "").split("-")
    return parts[2] if len(parts) == 4 else ""


def _decode_event(task_id: str, event_id: str, fields: Mapping[str, str]) -> Event:
    return Event(
        id=event_id,
        time=int(event_id.split("-", 1)[0]) / 1000.0,
        type=fields.get("type", ""),
        task_id=task_id,
        subtask_id=fields.get("subtask", ""),
        status=fields.get("status", ""),
        message=fields.get("message", ""),
        attempt=int(fields.get("attempt") or 0),
        worker=fields.get("worker", ""),
        trace_id=fields.get("trace", ""),
        span_id=fields.get("span", ""),
    )


def _assignment(
    task_id: str, subtask_id: str, row: Sequence[Any], reply: Mapping[str, Any], now: float
) -> Assignment:
    """An assignment as assign_one (lib.lua) returns it; ``reply`` has the
    goals and trace contexts of the script's tasks."""
    (attempt, title, instruction, capability, params, inputs, timeout, stall,
     context_tokens, context) = row  # fmt: skip
    traceparent = (reply.get("traces") or {}).get(task_id)
    return Assignment(
        task_id=task_id,
        subtask_id=subtask_id,
        attempt=int(attempt),
        capability=capability,
        title=title or "",
        instruction=instruction or "",
        goal=(reply.get("goals") or {}).get(task_id, ""),
        inputs=tuple(Input(d, t, o) for d, t, o in _list(inputs)),
        params=json.loads(params or "{}"),
        deadline=now + float(timeout) if timeout else None,
        timeout=float(timeout),
        stall_timeout=float(stall),
        context_tokens=int(context_tokens),
        context=ContextMode(context or ContextMode.TRUNCATE),
        trace_context={"traceparent": traceparent} if traceparent else {},
    )


def _outcome(reply: Mapping[str, Any]) -> Outcome:
    now = time.time()
    return Outcome(
        committed=[bool(x) for x in _list(reply.get("committed"))],
        ready=[
            ReadyItem(t, s, cap, int(prio), int(rest[0]) if rest else 0)
            for t, s, cap, prio, *rest in _list(reply.get("ready"))
        ],
        finished=list(_list(reply.get("finished"))),
        held=[AttemptRef(t, s, int(a)) for t, s, a in _list(reply.get("held"))],
        replan=[(t, s) for t, s in _list(reply.get("replan"))],
        finished_status=[str(s) for s in _list(reply.get("statuses"))],
        cached=[str(c) for c in _list(reply.get("cached"))],
        ended={
            task_id: _decode_event(
                task_id, eid, {"type": kind, "status": status, "message": message, "trace": trace}
            )
            for task_id, (eid, kind, status, message, trace) in _dict(reply.get("ended")).items()
        },
        handed=[
            Handed(ReadyItem(t, s, cap), int(w) - 1, _assignment(t, s, row, reply, now))
            for t, s, cap, w, row in _list(reply.get("handed"))
        ],
    )


def _time(value: str | None) -> float | None:
    return float(value) if value else None


def _task(raw: Mapping[str, str], subtasks: tuple[Subtask, ...]) -> Task:
    opts = json.loads(raw.get("options") or "{}")
    return Task(
        id=raw["id"],
        goal=raw.get("goal", ""),
        status=TaskStatus(raw["status"]),
        options=TaskOptions(
            synthesize=bool(opts.get("synthesize", True)),
            priority=int(opts.get("priority", 0)),
            max_parallel=int(opts.get("max_parallel", 0)),
            on_failure=OnFailure(opts.get("on_failure", OnFailure.FAIL)),
            max_attempts=int(opts.get("max_attempts", 0)),
            subtask_timeout=float(opts.get("subtask_timeout", 0.0)),
            stall_timeout=float(opts.get("stall_timeout", 0.0)),
            fallback=Fallback(opts.get("fallback", Fallback.NONE)),
            context_tokens=int(opts.get("context_tokens", 0)),
            context=ContextMode(opts.get("context", ContextMode.TRUNCATE)),
            max_tokens=int(opts.get("max_tokens", 0)),
            max_duration=float(opts.get("max_duration", 0.0)),
            cache=opts.get("cache"),
        ),
        created_at=float(raw.get("created_at") or 0.0),
        updated_at=float(raw.get("updated_at") or 0.0),
        result=raw.get("result", ""),
        error=raw.get("error", ""),
        finished_at=_time(raw.get("finished_at")),
        subtasks_total=int(raw.get("total") or 0),
        subtasks_succeeded=int(raw.get("succeeded") or 0),
        subtasks=subtasks,
        plan_version=int(raw.get("version") or 1),
        usage=Usage(
            input_tokens=int(raw.get("in_tokens") or 0),
            output_tokens=int(raw.get("out_tokens") or 0),
            model=raw.get("models", ""),
            seconds=float(raw.get("llm_seconds") or 0.0),
            calls=int(raw.get("llm_calls") or 0),
        ),
        failure_reason=FailureReason(raw.get("failure_reason") or ""),
        owner=raw.get("owner", ""),
    )


def _subtask(raw: Mapping[str, str]) -> Subtask:
    return Subtask(
        id=raw["id"],
        title=raw.get("title", ""),
        instruction=raw.get("instruction", ""),
        capability=raw.get("capability", ""),
        depends_on=tuple(json.loads(raw.get("deps") or "[]")),
        status=SubtaskStatus(raw["status"]),
        output=raw.get("output", ""),
        error=raw.get("error", ""),
        attempt=int(raw.get("attempt") or 0),
        worker=raw.get("worker", ""),
        progress=raw.get("progress", ""),
        params=json.loads(raw.get("params") or "{}"),
        usage=_usage(json.loads(raw.get("usage") or "{}")),
        started_at=_time(raw.get("started_at")),
        finished_at=_time(raw.get("finished_at")),
        cache_hit=raw.get("cache_hit") == "1",
    )


def _encode_token(score: float, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}:{task_id}".encode()).decode()


def _decode_token(token: str) -> tuple[float, str]:
    """The page token → (highest score to list, last task id listed)."""
    if not token:
        return float("inf"), ""
    try:
        score, task_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
        return float(score), task_id
    except ValueError:
        raise InvalidArgument("page_token is not one this server issued") from None
