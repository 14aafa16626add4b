"""Watching tasks: a task's event log replayed and followed, and waits for ends.

``watch`` replays a task's log from a cursor and then follows it live
through the event hub (``events.EventHub``: one blocking read for every
watcher). ``wait_many`` hands out each task's terminal event as the task
ends, without reading logs: every task ends through this supervisor (it
leads; clients follow the leader), and the orchestrator tells ``Watching``
of each end with the terminal event the write that ended it returned.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from taskloom.core.auth import LOCAL_ADMIN, Principal
from taskloom.core.errors import InvalidArgument, TaskloomError, TaskNotFound, Unavailable
from taskloom.core.model import Event, EventType, TaskStatus
from taskloom.supervisor.events import EventHub
from taskloom.supervisor.store import Store

_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
WATCH_WAIT = 5.0
"""A watcher waiting for events checks its task and the supervisor this often."""
RECENT_ENDS = 2048
RECENT_ENDS_TTL = 60.0
"""How many ends of tasks, and for how long (seconds), a terminal-only watch is
answered from memory; older ones are read from Redis."""

Ended = Callable[[str, TaskStatus, Event | None], None]
"""Told when a wait finds that a task this term created has ended unheard of."""
Ending = tuple[Event | None, Any]
"""A task's terminal event (None: read it) and the task as it ended, as the
write that ended it returned it (``records.decode_snapshot``; None: none)."""


class Watching:
    """Watches and waits of one term of leadership."""

    def __init__(self, store: Store, ended: Ended) -> None:
        self._store = store
        self._unheard_end = ended
        self.events = EventHub(store)
        """Wakes watchers when their task's log grows (one blocking read for all)."""
        self._owners: dict[str, str] = {}
        """Owner of each task this term created, until it ends."""
        self._recent_ends: OrderedDict[str, tuple[str, Event, float]] = OrderedDict()
        """Owner, terminal event and time of the last RECENT_ENDS of those tasks
        to end: a client that waits for a task it just submitted often asks
        after the end."""
        self._ended: defaultdict[str, set[asyncio.Future[Ending]]] = defaultdict(set)
        """Who waits for each task's end (terminal-only watches)."""
        self._closing = asyncio.Event()
        self.sessions: set[Any] = set()
        """The clients' Session streams (``sessions.ClientSession``): closed
        when their token is revoked."""

    def start(self) -> None:
        self.events.start()

    async def stop(self) -> None:
        """End every watch and wait (their clients resume at the next leader)."""
        self._closing.set()
        for session in list(self.sessions):
            session.close(Unavailable("the supervisor is shutting down; the SDK resumes"))
        await self.events.stop()

    # -- what the orchestrator tells -------------------------------------------------

    def created(self, task_id: str, owner: str) -> None:
        """A task this term created: its end will be handed over, not read."""
        self._owners[task_id] = owner

    def ended(self, task_id: str, event: Event | None, snapshot: Any = None) -> None:
        """The task ended: tell who waits for its end (with its terminal
        event and the task as it ended, if the write that ended it returned
        them)."""
        for waiter in self._ended.pop(task_id, ()):
            if not waiter.done():
                waiter.set_result((event, snapshot))
        owner = self._owners.pop(task_id, None)
        if owner is not None and event is not None:
            self._recent_ends[task_id] = (owner, event, time.monotonic())
            if len(self._recent_ends) > RECENT_ENDS:
                self._recent_ends.popitem(last=False)

    def reopened(self, task_id: str) -> None:
        """A task that had ended runs again: its end is no longer the answer."""
        entry = self._recent_ends.pop(task_id, None)
        if entry is not None:
            self._owners[task_id] = entry[0]

    # -- clients ---------------------------------------------------------------------

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
        check_cursor(after)
        if terminal_only:
            async for ended in self.wait_many([task_id], principal=principal):
                yield ended
            return
        owner = await self._store.task_owner(task_id)
        _owned(task_id, owner, principal)
        cursor = after
        while True:
            if self._closing.is_set():
                raise Unavailable("the supervisor is shutting down; watch again to resume")
            events = await self._store.read_events(task_id, cursor)
            if not events:
                status = await self._store.task_status(task_id)
                if status is None:
                    raise TaskNotFound(task_id)
                if status.terminal:
                    # The terminal event is committed with the status; read
                    # once more in case it landed after our first read.
                    events = await self._store.read_events(task_id, cursor)
                    if not events:
                        return
                else:
                    await self.events.wait(task_id, cursor, WATCH_WAIT)
                    continue
            if _ends(events):
                # A task a person reopened (a retry or a skip of what ended
                # it) goes on after its terminal event: end with the last one,
                # and leave out what comes after it (a worker's "stopped").
                status = await self._store.task_status(task_id)
                if status is None or status.terminal:
                    last = max(i for i, e in enumerate(events) if e.terminal)
                    yield events[: last + 1]
                    return
            yield events
            cursor = events[-1].id

    async def wait_many(
        self, task_ids: Sequence[str], *, principal: Principal = LOCAL_ADMIN
    ) -> AsyncIterator[list[Event]]:
        """Each task's terminal event as the task ends, those that end together
        in one list, without reading their logs; done once every task has
        ended. An unknown task, or another principal's, raises TaskNotFound
        (what was yielded stands)."""
        waiter = self.waiter(principal)
        try:
            waiter.add(task_ids)
            while waiter.waiting:
                ends = await waiter.next()
                for _, end, _ in ends:
                    if isinstance(end, TaskloomError):
                        raise end
                yield [end for _, end, _ in ends if isinstance(end, Event)]
        finally:
            waiter.close()

    def waiter(self, principal: Principal = LOCAL_ADMIN) -> Waiter:
        """Waits for the ends of tasks added to it as it goes (a Session's)."""
        return Waiter(self, principal)


End = tuple[str, Event | TaskloomError, Any]
"""A task waited for, its terminal event or why it cannot be waited for, and
the task as it ended if the write that ended it returned it (``Ending``)."""


class Waiter:
    """The ends of the tasks added to it, as they come.

    A task this term created needs no read at first: its owner is known,
    and its end will be handed over, or was, a moment ago
    (``Watching._recent_ends``). The others are read, and every task still
    waited for is read again each WATCH_WAIT, so a task ended some other way
    is seen; the reads of all the tasks waiting are one pipelined batch."""

    def __init__(self, watching: Watching, principal: Principal) -> None:
        self._watching = watching
        self._principal = principal
        self._arrived: asyncio.Queue[tuple[str, Ending]] = asyncio.Queue()
        self._waits = _Waits(watching._ended, self._arrived)
        self._ready: list[End] = []
        self._unread: list[str] = []
        self._read_at = time.monotonic()

    @property
    def waiting(self) -> int:
        """Tasks added whose end has not been handed out yet."""
        return len(self._waits.waiting) + len(self._ready)

    def add(self, task_ids: Iterable[str]) -> None:
        """Wait for these too (a task waited for already counts once)."""
        watching = self._watching
        for task_id in task_ids:
            if task_id in self._waits.waiting:
                continue
            self._waits.listen(task_id)
            recent = watching._recent_ends.get(task_id)
            if recent is not None and time.monotonic() - recent[2] < RECENT_ENDS_TTL:
                self._settle(task_id, recent[0], recent[1])
            elif task_id in watching._owners:
                if not _may_see(watching._owners[task_id], self._principal):
                    self._settle(task_id, None, None)
            else:
                self._unread.append(task_id)
        self._arrived.put_nowait(("", (None, None)))  # wakes ``next``

    def _settle(
        self, task_id: str, owner: str | None, event: Event | None, snapshot: Any = None
    ) -> None:
        self._waits.forget(task_id)
        if event is None or not _may_see(owner, self._principal):
            self._ready.append((task_id, TaskNotFound(task_id), None))
        else:
            self._ready.append((task_id, event, snapshot))

    async def next(self) -> list[End]:
        """The next ends, those that came together; waits until there is one.
        Raises Unavailable when the supervisor steps down."""
        while True:
            if time.monotonic() - self._read_at >= WATCH_WAIT:
                # Also when nothing waits: the next look is a WATCH_WAIT away
                # (a session that waits for nothing must not spin).
                self._read_at = time.monotonic()
                self._unread = list(dict.fromkeys([*self._unread, *self._waits.waiting]))
            if self._unread:
                unread, self._unread = self._unread, []
                self._read_at = time.monotonic()
                await self._read_ends(unread)
            if self._ready:
                ready, self._ready = self._ready, []
                return ready
            if self._watching._closing.is_set():
                raise Unavailable("the supervisor is shutting down; wait or watch again to resume")
            try:
                async with asyncio.timeout(max(0.0, self._read_at + WATCH_WAIT - time.monotonic())):
                    news = [await self._arrived.get()]
            except TimeoutError:
                continue
            while not self._arrived.empty():
                news.append(self._arrived.get_nowait())
            for task_id, (event, snapshot) in news:
                if task_id not in self._waits.waiting:
                    continue  # a wake-up, or handed out already
                if event is not None:
                    self._waits.forget(task_id)
                    self._ready.append((task_id, event, snapshot))
                else:  # ended with no event to hand over: read it
                    self._waits.forget(task_id)
                    self._waits.listen(task_id)
                    self._unread.append(task_id)

    async def _read_ends(self, task_ids: list[str]) -> None:
        """Read from Redis which of ``task_ids`` have ended."""
        found = await self._watching._store.endings(task_ids, 10)
        for task_id in task_ids:
            if task_id not in self._waits.waiting:
                continue  # its end arrived during the read
            owner, status, events = found[task_id]
            if not _may_see(owner, self._principal):
                self._settle(task_id, None, None)
                continue
            if status is None or not status.terminal:
                continue
            last = next((e for e in reversed(events) if e.terminal), None)
            if task_id in self._watching._owners:
                # It ended before we heard of it (the reply of its write was
                # lost, or is on its way): end it here.
                self._watching._unheard_end(task_id, status, last)
            if last is not None:
                self._settle(task_id, owner, last)

    def close(self) -> None:
        self._waits.close()


class _Waits:
    """One ``wait_many``'s futures, one per task it waits for, registered
    where ``Watching.ended`` finds them."""

    def __init__(
        self,
        registry: defaultdict[str, set[asyncio.Future[Ending]]],
        arrived: asyncio.Queue[tuple[str, Ending]],
    ) -> None:
        self._registry = registry
        self._arrived = arrived
        self._loop = asyncio.get_running_loop()
        self.waiting: dict[str, asyncio.Future[Ending]] = {}

    def listen(self, task_id: str) -> None:
        # Registered before any read: an end between the two still reaches us.
        future: asyncio.Future[Ending] = self._loop.create_future()
        future.add_done_callback(
            lambda f: None if f.cancelled() else self._arrived.put_nowait((task_id, f.result()))
        )
        self._registry[task_id].add(future)
        self.waiting[task_id] = future

    def forget(self, task_id: str) -> None:
        future = self.waiting.pop(task_id)
        future.cancel()
        waiters = self._registry.get(task_id)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self._registry[task_id]

    def close(self) -> None:
        for task_id in list(self.waiting):
            self.forget(task_id)


LAST_ID = 2**64 - 1
"""The largest part of a Redis stream id: nothing can come after ``LAST_ID-LAST_ID``."""


def check_cursor(after: str) -> None:
    """InvalidArgument unless ``after`` is '' or '0' or an event id that
    something may follow (``<ms>-<seq>``, each part within 64 bits)."""
    if not after or after == "0":
        return
    match = _EVENT_ID.match(after)
    parts = [int(p) for p in after.split("-")] if match else []
    if not parts or max(parts) > LAST_ID or parts == [LAST_ID, LAST_ID]:
        raise InvalidArgument(
            f"after_event_id {after[:40]!r} is not an event id like 1700000000000-0",
            field="after_event_id",
        )


def _ends(events: Sequence[Event]) -> bool:
    """Whether the task's log ends within ``events``: a terminal event that no
    ``task.reopened`` follows."""
    for event in reversed(events):
        if event.type == EventType.TASK_REOPENED:
            return False
        if event.terminal:
            return True
    return False


def _owned(task_id: str, owner: str | None, principal: Principal) -> None:
    """TaskNotFound unless the task exists and is the caller's (or the caller
    is an admin): another principal's task does not exist, as far as a
    client can tell."""
    if not _may_see(owner, principal):
        raise TaskNotFound(task_id)


def _may_see(owner: str | None, principal: Principal) -> bool:
    return owner is not None and (principal.admin or owner == principal.name)
