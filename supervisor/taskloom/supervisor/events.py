"""One blocking reader for every watcher: the event hub.

A watcher replays a task's log with XRANGE and, once it has caught up, waits
for what comes next. Were each watcher to block in its own ``XREAD BLOCK``,
each would hold a Redis connection (and a file descriptor) for as long as it
watches: a thousand idle watch streams would mean a thousand connections.
Instead the hub runs one ``XREAD BLOCK`` over the streams of every task that
someone waits on, and wakes that task's waiters when it returns entries; they
then read with XRANGE from their own cursors, as before. So the number of
watchers costs memory only, never connections.

A new task joins the read at once: the hub XADDs to its own wake-up stream,
which is part of every read, so the read in flight returns and the next one
includes the new task.

Nothing can be missed: a waiter only waits after XRANGE found nothing after
its cursor, so whatever arrives later has an id above every id the hub reads
from, and an id the hub has seen already past the cursor returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

from taskloom.core.errors import StoreUnavailable
from taskloom.supervisor.store import Store

logger = logging.getLogger(__name__)

BLOCK_MS = 5_000
RETRY_AFTER = 0.5
"""After Redis failed, the hub tries again this soon (its waiters time out meanwhile)."""


def _after(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes after ``b`` (``""`` and ``"0"`` come first)."""

    def key(i: str) -> tuple[int, int]:
        ms, _, seq = (i or "0").partition("-")
        return int(ms), int(seq or 0)

    return key(a) > key(b)


@dataclass
class _Watched:
    since: str
    """Read entries after this id."""
    waiters: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class EventHub:
    """Wakes watchers when their task's stream grows, through one XREAD."""

    def __init__(self, store: Store, *, block_ms: int = BLOCK_MS) -> None:
        self._store = store
        self._block_ms = block_ms
        self._tasks: dict[str, _Watched] = {}
        self._wake_key = store.keys.hub(uuid.uuid4().hex)
        self._wake_since = "0"
        self._changed = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    @property
    def watched(self) -> int:
        """Tasks someone is waiting on right now."""
        return len(self._tasks)

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="taskloom-event-hub")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        for watched in self._tasks.values():
            watched.arrived.set()
        with contextlib.suppress(StoreUnavailable):
            await self._store.drop_key(self._wake_key)

    async def wait(self, task_id: str, cursor: str, patience: float) -> None:
        """Return when the task's stream has an entry after ``cursor``, or after
        ``patience`` seconds (the caller then reads and decides)."""
        watched = self._tasks.get(task_id)
        if watched is None:
            watched = self._tasks[task_id] = _Watched(since=cursor or "0")
            await self._wake()
        elif _after(watched.since, cursor):
            return  # the hub has seen an entry past this cursor already
        watched.waiters += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(patience):
                    await watched.arrived.wait()
        finally:
            watched.waiters -= 1
            if not watched.waiters and self._tasks.get(task_id) is watched:
                del self._tasks[task_id]

    async def _wake(self) -> None:
        """Make the read in flight return, so the next one covers a new task."""
        self._changed.set()
        if self._loop is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._store.poke(self._wake_key)

    async def _run(self) -> None:
        while True:
            if not self._tasks:
                self._changed.clear()
                await self._changed.wait()
                continue
            self._changed.clear()
            streams = {self._wake_key: self._wake_since}
            streams |= {
                self._store.keys.events(task_id): watched.since
                for task_id, watched in self._tasks.items()
            }
            try:
                arrived = await self._store.read_streams(streams, block_ms=self._block_ms)
            except StoreUnavailable as e:
                logger.warning("event hub: %s; retrying", e)
                await asyncio.sleep(RETRY_AFTER)
                continue
            for key, last in arrived.items():
                if key == self._wake_key:
                    self._wake_since = last
                    continue
                task_id = self._store.keys.task_of_events(key)
                watched = self._tasks.get(task_id)
                if watched is not None and _after(last, watched.since):
                    watched.since = last
                    # Wake this round's waiters; later ones wait for the next entry.
                    watched.arrived.set()
                    watched.arrived = asyncio.Event()
