"""Matching READY subtasks to worker slots, and keeping leases.

Everything here is a cache of Redis, rebuilt at start-up: a priority queue of
READY subtasks per capability, the connected worker sessions, and a lease per
assigned attempt.

Flow control is by credit: a worker's free slots are its ``max_concurrency``
minus the attempts it holds (and the ones being assigned to it right now), so
no worker ever holds more than it said it can run. Among the workers with the
capability and a free slot, the least loaded gets the next subtask.

A lease lives as long as its worker's session heartbeats. When a session ends
(stream broken, heartbeats missed) its leases are orphaned and expire
``lease_ttl`` after the worker was last heard from, unless the worker
reconnects and reports them in flight. A worker that holds nothing need not
heartbeat (it is told so in its Welcome): its silence counts only from the
moment it is given work, and a dead idle connection is found by HTTP/2
keepalive. So an idle fleet costs the supervisor no messages.

Expired leases go to the orchestrator, which puts their subtasks back to
READY. So do leases that are overdue while their worker is alive: past the
attempt's timeout, or without progress for its stall timeout.

Most subtasks are never queued here at all. A write that makes subtasks READY
(a new plan, a commit of results) is first offered free slots of the least
loaded workers (``offer``): its script assigns what it can in the same atomic
step and returns the assignments, which ``take`` leases and sends. That saves
the round trip to Redis that assigning from the queue costs. Nothing is
offered for a capability with subtasks queued, so the queue's order holds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from taskloom.core.errors import TaskloomError, Unavailable
from taskloom.core.model import (
    Assignment,
    AttemptRef,
    PlannedSubtask,
    WorkerInfo,
    satisfies,
    split_route,
)
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.outcomes import Handed, OfferedSlots, Outcome, ReadyItem, Stock
from taskloom.supervisor.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AssignBatch:
    assignments: tuple[Assignment, ...]


@dataclass(frozen=True, slots=True)
class CancelAttempts:
    refs: tuple[AttemptRef, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class AckReports:
    refs: tuple[AttemptRef, ...]


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """Tells a worker it is still heard (an Ack with no refs): a worker that
    hears nothing for the lease TTL stops its attempts."""


@dataclass(frozen=True, slots=True)
class DrainNotice:
    reason: str


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Ends the session's stream, with an error status if one is given."""

    error: TaskloomError | None = None


Outgoing = AssignBatch | CancelAttempts | AckReports | HeartbeatAck | DrainNotice | CloseSession


class WorkerSession:
    """One connected worker stream and the attempts it holds."""

    def __init__(self, info: WorkerInfo, now: float) -> None:
        self.id = uuid.uuid4().hex
        self.info = info
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.leases: set[AttemptRef] = set()
        self.reserved = 0
        self.last_seen = now
        self.writing = 0
        """Its reports being written to Redis now. Its later messages may wait
        unread meanwhile (once 4 MiB of them are read ahead), so its silence
        does not count (see ``reap``)."""
        self.draining = False
        self.closed = False
        self.credential = b""
        """The hash of the token it connected with (empty: none, or a certificate)."""
        self._progress_tokens: float | None = None
        self._progress_at = now

    def progress_allowance(self, wanted: int, rate: float, now: float) -> int:
        """How many of ``wanted`` progress messages this worker may log now: a
        token bucket of ``rate`` per second per slot, holding two seconds' worth."""
        per_second = rate * self.info.max_concurrency
        burst = 2 * per_second
        if self._progress_tokens is None:
            tokens = burst
        else:
            tokens = min(burst, self._progress_tokens + (now - self._progress_at) * per_second)
        self._progress_at = now
        allowed = min(wanted, int(tokens))
        self._progress_tokens = tokens - allowed
        return allowed

    @property
    def free(self) -> int:
        if self.draining or self.closed:
            return 0
        return self.info.max_concurrency - len(self.leases) - self.reserved

    @property
    def load(self) -> float:
        return (len(self.leases) + self.reserved) / self.info.max_concurrency

    def send(self, message: Outgoing) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)

    def close(self, error: TaskloomError | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(CloseSession(error))

    def __repr__(self) -> str:
        return f"<worker {self.info.name} session {self.id[:8]}>"


@dataclass(slots=True)
class Lease:
    """An attempt held by a worker. ``expires_at`` counts only while orphaned."""

    ref: AttemptRef
    worker_id: str
    worker_name: str
    session: WorkerSession | None
    expires_at: float
    deadline: float = float("inf")
    """When the attempt's timeout ends (scheduler clock)."""
    timeout: float = 0.0
    stall_timeout: float = 0.0
    active_at: float = 0.0
    """When the attempt last showed progress (assigned, accepted, progress)."""
    capability: str = ""
    assigned_at: float = 0.0
    """When it was assigned (scheduler clock); 0 for a lease restored from Redis."""
    overdue: bool = False
    """Reported as timed out or stalled; waiting for the failure to commit."""


@dataclass(slots=True)
class Offer:
    """Free worker slots reserved for the subtasks one write to Redis may make
    READY, so that the same script assigns them (see ``Scheduler.offer``)."""

    workers: dict[str, list[tuple[WorkerSession, int]]] = field(default_factory=dict)
    """Capability → (session, slots reserved on it)."""
    limits: dict[str, int] = field(default_factory=dict)
    """Task (with a max_parallel) → how many more of its attempts the write may assign."""

    def slots(self) -> OfferedSlots | None:
        """What the script is told (None: nothing offered)."""
        if not self.workers:
            return None
        return {
            capability: [
                (
                    s.info.worker_id,
                    s.info.name,
                    s.info.cache_keys.get(split_route(capability)[0], ""),
                    n,
                )
                for s, n in sessions
            ]
            for capability, sessions in self.workers.items()
        }


ExpiryHandler = Callable[[list[Lease]], Awaitable[None]]
OverdueHandler = Callable[[list[tuple[Lease, str]]], Awaitable[None]]
OutcomeHandler = Callable[[Outcome], None]

OFFER_SLACK = 16
"""A commit of n results is offered up to 2n + this many slots per capability."""

DEADLINE_GRACE = 2.0
"""The worker enforces the timeout itself; the supervisor steps in this much later."""


BACKLOG_LOOKS = 256
"""Queued subtasks ``Scheduler.backlog`` looks past (oldest first) for one a
connected worker could run."""


class Scheduler:
    """READY queues, worker sessions and leases; dispatches in batches."""

    def __init__(
        self,
        store: Store,
        *,
        lease_ttl: float,
        batch_size: int = 512,
        clock: Callable[[], float] = time.monotonic,
        metrics: SupervisorMetrics | None = None,
    ) -> None:
        self._store = store
        self.metrics = metrics
        self.lease_ttl = lease_ttl
        self.batch_size = batch_size
        self._clock = clock
        self._queues: dict[str, list[tuple[int, int, ReadyItem]]] = defaultdict(list)
        self._ready_since: dict[tuple[str, str], float] = {}
        """When each queued subtask became dispatchable: for queue wait and age
        (in the order they did: the first is the oldest)."""
        self._ready_route: dict[tuple[str, str], str] = {}
        """The route (queue key) of each of those."""
        self._delayed: list[tuple[float, int, ReadyItem]] = []
        self._waiting: Counter[str] = Counter()
        """Task → its entries in the queues and the delayed heap, so that
        forgetting a task with none (the usual end) scans nothing."""
        self._seq = itertools.count()
        self._rotation = 0
        self._sessions: dict[str, WorkerSession] = {}
        self._capable: defaultdict[str, dict[str, WorkerSession]] = defaultdict(dict)
        """Capability → the sessions that offer it: dispatch looks at these
        only, so idle workers of other capabilities cost it nothing. A route
        (``llm[gpu=true]``, see ``route_key``) is a key here too, once seen:
        the sessions of its capability whose labels it requires."""
        self._routes: dict[str, tuple[str, dict[str, str]]] = {}
        """Route → its capability and required labels, for the routes seen."""
        self._leases: dict[AttemptRef, Lease] = {}
        self._limits: dict[str, int] = {}
        self._followers: dict[str, frozenset[str]] = {}
        """Task → capabilities of its subtasks that wait for others: what a
        commit of its results may make READY, and so may be offered slots."""
        self._in_flight: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self.on_expired: ExpiryHandler | None = None
        self.on_overdue: OverdueHandler | None = None
        self.on_outcome: OutcomeHandler = self._on_its_own
        """Told what an assignment's cache hits changed (subtasks made READY,
        tasks ended): the orchestrator acts on every outcome in one place."""
        self.out_of_sync = asyncio.Event()
        """Set when a write to Redis failed without a reply: Redis may have
        done it, so this cache must be checked against Redis again."""

    # -- the queue ---------------------------------------------------------------

    def enqueue(self, items: Iterable[ReadyItem]) -> None:
        """Queue READY subtasks; a retry waits until its ``retry_at`` (the
        backoff the store decided, and keeps)."""
        now, wall = self._clock(), time.time()
        for item in items:
            if item.retry_at > wall:
                due = now + (item.retry_at - wall)
                heapq.heappush(self._delayed, (due, next(self._seq), item))
                self._waiting[item.task_id] += 1
            else:
                self._push(item)
        self._wake.set()

    def _push(self, item: ReadyItem) -> None:
        key = (item.task_id, item.subtask_id)
        self._ready_since.setdefault(key, self._clock())
        self._ready_route.setdefault(key, item.capability)
        heapq.heappush(self._queues[item.capability], (-item.priority, next(self._seq), item))
        self._waiting[item.task_id] += 1

    def _taken(self, task_id: str) -> None:
        """One of the task's entries left the queues (picked, or moved on)."""
        left = self._waiting[task_id] - 1
        if left > 0:
            self._waiting[task_id] = left
        else:
            del self._waiting[task_id]

    def queue_stats(self) -> dict[str, tuple[int, float]]:
        """Capability → (READY subtasks waiting for a worker, age of the oldest in seconds).

        Called from the metrics endpoint's thread: it works on copies, which
        are taken without releasing the GIL, so the event loop's changes
        cannot break the iteration."""
        now = self._clock()
        since = dict(self._ready_since)
        stats = {}
        for capability, queue in list(self._queues.items()):
            entries = list(queue)
            oldest = min(
                (since.get((e[2].task_id, e[2].subtask_id), now) for e in entries), default=now
            )
            stats[capability] = (len(entries), now - oldest)
        return stats

    def backlog(self) -> float:
        """How long (seconds) the oldest READY subtask that a connected worker
        could run has waited for a free slot; 0 if none waits. What waits for
        a worker nobody runs is not the cluster being behind: it is skipped."""
        now = self._clock()
        for looked, (key, since) in enumerate(self._ready_since.items()):
            route = self._ready_route.get(key)
            if route and (self._capable.get(route) or self._able(route)):
                return now - since
            if looked >= BACKLOG_LOOKS:
                break
        return 0.0

    def set_task_limit(self, task_id: str, max_parallel: int) -> None:
        """At most ``max_parallel`` attempts of the task in flight (0: no limit)."""
        if max_parallel > 0:
            self._limits[task_id] = max_parallel

    def set_graph(self, task_id: str, subtasks: Iterable[PlannedSubtask]) -> None:
        """Learn (or, after a replan, add to) what the task's commits may unlock."""
        waiting = {s.route for s in subtasks if s.depends_on}
        if waiting:
            self._followers[task_id] = self._followers.get(task_id, frozenset()) | waiting

    def forget_task(self, task_id: str) -> None:
        """The task ended: drop its queued subtasks and its limit."""
        self._limits.pop(task_id, None)
        self._followers.pop(task_id, None)
        if not self._waiting.pop(task_id, 0):
            return
        for capability, queue in self._queues.items():
            kept = [entry for entry in queue if entry[2].task_id != task_id]
            if len(kept) != len(queue):
                heapq.heapify(kept)
                self._queues[capability] = kept
        self._delayed = [entry for entry in self._delayed if entry[2].task_id != task_id]
        for key in [k for k in self._ready_since if k[0] == task_id]:
            del self._ready_since[key]
            self._ready_route.pop(key, None)
        heapq.heapify(self._delayed)

    # -- workers -------------------------------------------------------------------

    def connect(self, info: WorkerInfo) -> tuple[WorkerSession, list[AttemptRef]]:
        """Open a session. Returns it and the in-flight attempts the worker must drop.

        The worker's report of what it holds is the truth about it: leases it
        reports move to the new session, leases recorded for it that it does
        not report are lost (the Assignment never reached it) and expire now.
        """
        now = self._clock()
        for old in [s for s in self._sessions.values() if s.info.worker_id == info.worker_id]:
            old.close(Unavailable("this worker connected again; its new stream replaces this"))
            self.disconnect(old)
        session = WorkerSession(info, now)
        self._sessions[session.id] = session
        for capability in info.capabilities:
            self._capable[capability][session.id] = session
        for route, (capability, requires) in self._routes.items():
            if capability in info.capabilities and satisfies(info.labels, requires):
                self._capable[route][session.id] = session
        held = set(info.in_flight)
        stale: list[AttemptRef] = []
        for ref in info.in_flight:
            lease = self._leases.get(ref)
            if lease is not None and lease.worker_id == info.worker_id:
                lease.session = session
                session.leases.add(ref)
            else:
                stale.append(ref)
        for lease in self._leases.values():
            if lease.worker_id == info.worker_id and lease.ref not in held:
                lease.session = None
                lease.expires_at = now
        self._wake.set()
        return session, stale

    def held_elsewhere(self, own_id: str, bound_id: str) -> bool:
        """Whether a session is open for the worker id ``own_id`` under another
        principal than the one ``bound_id`` (see ``server.bound_worker_id``) names."""
        return any(
            s.info.worker_id.rpartition("/")[2] == own_id and s.info.worker_id != bound_id
            for s in self._sessions.values()
        )

    def disconnect(self, session: WorkerSession) -> None:
        """The session ended; its leases are orphaned and start to expire."""
        self._sessions.pop(session.id, None)
        for capability in session.info.capabilities:
            self._capable[capability].pop(session.id, None)
        for route, (capability, _) in self._routes.items():
            if capability in session.info.capabilities:
                self._capable[route].pop(session.id, None)
        session.closed = True
        for ref in session.leases:
            lease = self._leases.get(ref)
            if lease is not None and lease.session is session:
                lease.session = None
                lease.expires_at = session.last_seen + self.lease_ttl
        session.leases.clear()

    def heard_from(self, session: WorkerSession, *, draining: bool | None = None) -> None:
        """Any message from a worker renews all its leases (and so does the end
        of a write of its reports: what it sent meanwhile was not read)."""
        session.last_seen = self._clock()
        if draining is not None and draining != session.draining:
            session.draining = draining
            if draining:
                logger.info("%s is draining: no new work for it", session)

    def lease(self, ref: AttemptRef) -> Lease | None:
        return self._leases.get(ref)

    def lease_count(self) -> int:
        return len(self._leases)

    def busy_by_capability(self) -> dict[str, int]:
        """Capability → attempts workers hold (from the metrics thread: a copy)."""
        counts: dict[str, int] = {}
        for lease in list(self._leases.values()):
            counts[lease.capability] = counts.get(lease.capability, 0) + 1
        return counts

    def sessions(self) -> list[WorkerSession]:
        return list(self._sessions.values())

    def inventory(self) -> dict[str, Stock]:
        """Per capability, the workers connected that offer it, their free
        slots and their labels."""
        found: dict[str, Stock] = {}
        for capability, sessions in list(self._capable.items()):
            live = [s for s in list(sessions.values()) if not s.closed]
            if live and capability not in self._routes:
                labels: Counter[tuple[str, str]] = Counter(
                    pair for s in live for pair in s.info.labels.items()
                )
                found[capability] = Stock(
                    len(live), sum(max(s.free, 0) for s in live), dict(labels)
                )
        return found

    def capabilities(self) -> frozenset[str]:
        """What the connected workers can do (also read from the metrics thread:
        it iterates over a copy)."""
        routes = self._routes
        return frozenset(
            c for c, sessions in list(self._capable.items()) if sessions and c not in routes
        )

    # -- leases ----------------------------------------------------------------------

    def holds(self, ref: AttemptRef) -> bool:
        return ref in self._leases

    def holder(self, ref: AttemptRef) -> WorkerSession | None:
        lease = self._leases.get(ref)
        return lease.session if lease is not None else None

    def release(self, refs: Iterable[AttemptRef]) -> None:
        """These attempts are over (reported, stale or cancelled): free their slots."""
        for ref in refs:
            lease = self._leases.pop(ref, None)
            if lease is None:
                continue
            if lease.session is not None:
                lease.session.leases.discard(ref)
            self._in_flight[ref.task_id] -= 1
            if self._in_flight[ref.task_id] <= 0:
                del self._in_flight[ref.task_id]
        self._wake.set()

    def restore_lease(
        self,
        ref: AttemptRef,
        worker_id: str,
        worker_name: str,
        *,
        deadline: float | None = None,
        stall_timeout: float = 0.0,
        capability: str = "",
    ) -> None:
        """At start-up: an attempt Redis says a worker holds. It has one TTL to
        reconnect. ``deadline`` is when its timeout ends, in Unix time."""
        now = self._clock()
        lease = Lease(
            ref, worker_id, worker_name, None, now + self.lease_ttl, capability=capability
        )
        if deadline is not None:
            lease.deadline = now + (deadline - time.time())
        lease.stall_timeout = stall_timeout
        lease.active_at = now
        self._leases[ref] = lease
        self._in_flight[ref.task_id] += 1

    def touch(self, refs: Iterable[AttemptRef], worker_id: str = "") -> None:
        """These attempts showed progress: their stall clock starts again
        (only for those held by ``worker_id``, if given)."""
        now = self._clock()
        for ref in refs:
            lease = self._leases.get(ref)
            if lease is not None and (not worker_id or lease.worker_id == worker_id):
                lease.active_at = now

    async def reap(self) -> None:
        """Close silent sessions that hold attempts, and hand expired leases to
        ``on_expired``. (An idle worker may be silent; so may one whose reports
        wait for Redis, which is on our side.)"""
        now = self._clock()
        for session in list(self._sessions.values()):
            if session.leases and session.writing:
                # Its heartbeats wait unread behind the reports being written;
                # it is heard all the same, and must not fence itself.
                session.send(HeartbeatAck())
            if session.leases and not session.writing and now - session.last_seen > self.lease_ttl:
                logger.warning(
                    "%s sent nothing for %.1fs; closing it", session, now - session.last_seen
                )
                session.close()
                self.disconnect(session)
        expired: list[Lease] = []
        overdue: list[tuple[Lease, str]] = []
        for lease in self._leases.values():
            if lease.session is None:
                if lease.expires_at <= now:
                    expired.append(lease)
            elif lease.overdue:
                continue
            elif now > lease.deadline + DEADLINE_GRACE:
                limit = f" after {lease.timeout:g}s" if lease.timeout else ""
                overdue.append((lease, f"timed out{limit}; stopped it"))
            elif lease.stall_timeout and now - lease.active_at > lease.stall_timeout:
                overdue.append(
                    (lease, f"stalled: no progress for {lease.stall_timeout:g}s; stopped it")
                )
        for lease, _ in overdue:
            lease.overdue = True
        try:
            if expired and self.on_expired is not None:
                await self.on_expired(expired)
            if overdue and self.on_overdue is not None:
                await self.on_overdue(overdue)
        except TaskloomError as e:
            # The leases stay; the next round tries again.
            self.out_of_sync.set()
            for lease, _ in overdue:
                lease.overdue = False
            logger.warning("cannot end %d leases yet: %s", len(expired) + len(overdue), e)

    def _able(self, key: str) -> dict[str, WorkerSession]:
        """The sessions that may run what waits under ``key``: a capability,
        or a route whose sessions are found the first time it is seen."""
        sessions = self._capable.get(key)
        if sessions is not None:
            return sessions
        capability, requires = split_route(key)
        if not requires:
            return {}
        self._routes[key] = (capability, requires)
        sessions = self._capable[key] = {
            sid: s
            for sid, s in self._capable.get(capability, {}).items()
            if satisfies(s.info.labels, requires)
        }
        return sessions

    # -- assigning in the write that makes subtasks READY ----------------------------------

    def offer(self, wanted: Mapping[str, int]) -> Offer:
        """Reserve free slots for subtasks a write is about to make READY
        (``wanted``: capability → at most how many), so the write assigns
        them itself and dispatch saves a round trip to Redis. Nothing is
        offered for a capability whose queue is not empty: what waits there
        goes first. The offer is spread over the least loaded workers; it
        must be settled with ``take`` whatever the write's fate."""
        offer = Offer()
        for capability, n in wanted.items():
            if n <= 0 or self._queues.get(capability):
                continue
            free = [s for s in self._able(capability).values() if s.free > 0]
            if not free:
                continue
            share = -(-n // len(free))
            taken = []
            for session in heapq.nsmallest(n, free, key=lambda s: s.load):
                take = min(session.free, share, n)
                session.reserved += take
                taken.append((session, take))
                n -= take
                if n <= 0:
                    break
            offer.workers[capability] = taken
        return offer

    def offer_for(self, refs: Sequence[AttemptRef]) -> Offer:
        """An offer for a commit of these attempts' results: up to 2n +
        OFFER_SLACK slots for each capability their tasks have waiting
        subtasks of. Tasks without dependencies (or not learnt since a
        restart) get none: what they unlock goes through the queue."""
        wanted: set[str] = set()
        for task_id in {r.task_id for r in refs}:
            wanted |= self._followers.get(task_id, frozenset())
        offer = self.offer(dict.fromkeys(wanted, 2 * len(refs) + OFFER_SLACK))
        if offer.workers:
            # Tasks with a limit may run as many more as these attempts free.
            ending = Counter(r.task_id for r in refs if r in self._leases)
            offer.limits = {
                task_id: self._limits[task_id] - self._in_flight[task_id] + n
                for task_id, n in ending.items()
                if task_id in self._limits
            }
        return offer

    def take(self, offer: Offer, handed: Sequence[Handed]) -> None:
        """The write is done (or failed: nothing ``handed``): lease and send
        what it assigned, and free the slots it did not use."""
        for sessions in offer.workers.values():
            for session, n in sessions:
                session.reserved -= n
        rows = []
        for h in handed:
            session = offer.workers[h.item.capability][h.worker][0]
            self._in_flight[h.item.task_id] += 1
            rows.append((h.item, session, h.assignment))
        if self.metrics is not None:
            self.metrics.observe_queue_waits((h.item.capability, 0.0) for h in handed)
        self._lease_out(rows, self._clock())
        if offer.workers:
            self._wake.set()

    # -- dispatch ----------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch whenever something changes, and reap leases, until cancelled."""
        reaper = asyncio.create_task(self._reap_forever())
        try:
            while True:
                delay = self._delayed[0][0] - self._clock() if self._delayed else None
                if delay is None:
                    await self._wake.wait()
                elif delay > 0:
                    # Not asyncio.timeout: on 3.11 a cancel that lands as the
                    # timeout fires can come out as TimeoutError, and the loop
                    # would outlive its orchestrator.
                    woken = asyncio.ensure_future(self._wake.wait())
                    try:
                        await asyncio.wait({woken}, timeout=delay)
                    finally:
                        woken.cancel()
                self._wake.clear()
                while await self.dispatch():
                    pass
        finally:
            reaper.cancel()

    async def _reap_forever(self) -> None:
        interval = max(0.05, min(1.0, self.lease_ttl / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap()
            except Exception:
                logger.exception("lease reaper failed; trying again")

    async def dispatch(self) -> bool:
        """Assign one batch; True if it assigned anything (there may be more)."""
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            item = heapq.heappop(self._delayed)[2]
            self._taken(item.task_id)
            self._push(item)
        picks = self._pick()
        if not picks:
            return False
        started = self._clock()
        try:
            assignments, hits = await self._store.assign(
                [
                    (
                        item,
                        s.info.worker_id,
                        s.info.name,
                        s.info.cache_keys.get(split_route(item.capability)[0], ""),
                    )
                    for item, s in picks
                ]
            )
        except Unavailable as e:
            self.out_of_sync.set()
            logger.warning("cannot assign %d subtasks: %s", len(picks), e)
            for item, session in picks:
                session.reserved -= 1
                self._in_flight[item.task_id] -= 1
                self._push(item)
            await asyncio.sleep(1.0)
            self._wake.set()
            return False
        rows = []
        waits = []
        for (item, session), assignment in zip(picks, assignments, strict=True):
            session.reserved -= 1
            since = self._ready_since.pop((item.task_id, item.subtask_id), None)
            self._ready_route.pop((item.task_id, item.subtask_id), None)
            if since is not None and assignment is not None:
                waits.append((item.capability, now - since))
            if assignment is None:
                # Not READY any more (cancelled, or queued twice), or answered
                # from the cache: nothing to send.
                self._in_flight[item.task_id] -= 1
                continue
            rows.append((item, session, assignment))
        self._lease_out(rows, now)
        self.on_outcome(hits)
        if self.metrics is not None:
            self.metrics.observe_queue_waits(waits)
            self.metrics.dispatch_latency.observe(self._clock() - started)
        return True

    def _on_its_own(self, outcome: Outcome) -> None:
        """Without an orchestrator (tests of the scheduler alone): queue what
        became READY, forget the tasks that ended."""
        self.enqueue(outcome.ready)
        for task_id in outcome.finished:
            self.forget_task(task_id)

    def _lease_out(
        self, rows: Iterable[tuple[ReadyItem, WorkerSession, Assignment]], now: float
    ) -> None:
        """Lease each assignment to its session and send them, a batch per session."""
        batches: dict[WorkerSession, list[Assignment]] = defaultdict(list)
        for item, session, assignment in rows:
            lease = Lease(
                assignment.ref,
                session.info.worker_id,
                session.info.name,
                None,
                0.0,
                deadline=now + assignment.timeout if assignment.timeout else float("inf"),
                timeout=assignment.timeout,
                stall_timeout=assignment.stall_timeout,
                active_at=now,
                capability=item.capability,
                assigned_at=now,
            )
            self._leases[assignment.ref] = lease
            if session.closed:
                lease.expires_at = session.last_seen + self.lease_ttl
            else:
                if not session.leases:
                    # It may have been silent while idle: its silence counts from now.
                    session.last_seen = max(session.last_seen, now)
                lease.session = session
                session.leases.add(assignment.ref)
                batches[session].append(assignment)
        for session, batch in batches.items():
            session.send(AssignBatch(tuple(batch)))

    def _pick(self) -> list[tuple[ReadyItem, WorkerSession]]:
        picks: list[tuple[ReadyItem, WorkerSession]] = []
        for route in [r for r in self._routes if not self._queues.get(r)]:
            # A route nothing waits in is forgotten (found again when used):
            # requirements that come and go do not pile up here.
            self._queues.pop(route, None)
            self._capable.pop(route, None)
            del self._routes[route]
        capabilities = [c for c, q in self._queues.items() if q]
        if not capabilities:
            return picks
        # Rotate which capability goes first so none starves the others.
        self._rotation = (self._rotation + 1) % len(capabilities)
        for capability in capabilities[self._rotation :] + capabilities[: self._rotation]:
            queue = self._queues[capability]
            workers = [(s.load, s.id, s) for s in self._able(capability).values() if s.free > 0]
            heapq.heapify(workers)
            deferred = []
            while queue and workers and len(picks) < self.batch_size:
                entry = heapq.heappop(queue)
                item = entry[2]
                limit = self._limits.get(item.task_id, 0)
                if limit and self._in_flight[item.task_id] >= limit:
                    deferred.append(entry)
                    continue
                _, sid, session = heapq.heappop(workers)
                session.reserved += 1
                self._in_flight[item.task_id] += 1
                self._taken(item.task_id)
                picks.append((item, session))
                if session.free > 0:
                    heapq.heappush(workers, (session.load, sid, session))
            for entry in deferred:
                heapq.heappush(queue, entry)
        return picks
