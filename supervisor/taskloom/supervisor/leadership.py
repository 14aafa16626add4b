"""The leader lease: which supervisor decides, and how it stops deciding.

Several supervisors may run against one Redis; one holds the lease
(``keys.leader``, ``SET NX PX`` in ``lua/lead.lua``) and leads. Its token,
``<epoch>/<holder>``, is the fence: the store sends it with every write and
each script refuses a write whose token no longer holds the lease, so a
leader that was paused or cut off past its lease cannot change anything.

``Leadership`` campaigns for the lease, and while it leads renews it every
third of its TTL from a thread of its own, over a connection of its own: a
busy event loop (a slow handler, a long collection) must not cost the lease.
It steps down -- stops deciding, refuses writes, sends its workers elsewhere
-- as soon as it loses the lease or cannot renew it before it may have
lapsed. A lease that still names this supervisor (it stepped down while
Redis was away, or restarted with the same identity) is taken back at once,
under a new token. What a term of leadership runs is the caller's (``Term``):
the supervisor starts an orchestrator for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable
from typing import Protocol

from taskloom.core.errors import StoreUnavailable, TaskloomError
from taskloom.supervisor.store import Store

logger = logging.getLogger(__name__)

NO_LEASE = "-"
"""The store's fence while not leading: matches no lease, so every write is refused."""


class Term(Protocol):
    """What a supervisor does with the lease: lead while it holds it."""

    async def begin(self, token: str) -> bool:
        """Start leading with ``token`` as the fence; False if that failed
        (the lease is then given back)."""
        ...

    def end(self, reason: str) -> Awaitable[None]:
        """Stop taking requests at once; the awaitable winds the term down
        (no more decisions, workers sent elsewhere)."""
        ...


class Leadership:
    """Campaigns for the leader lease, keeps it, and steps down when it must."""

    def __init__(self, store: Store, holder: str, ttl: float, term: Term) -> None:
        self._store = store
        self.holder = holder
        """Who this supervisor is in the lease (``id@address``)."""
        self.ttl = ttl
        self._term = term
        self.token = ""
        """The lease's token while leading, else ''."""
        self.seen = ""
        """The token of whoever held the lease when last looked at."""
        self._valid_until = 0.0
        """Until when the lease surely holds (monotonic): the renewing thread
        moves it on; the event loop steps down once it is near."""
        self._ending: asyncio.Future[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        self._renewing: threading.Event | None = None
        """Set to stop this term's renewing thread."""
        self._stepping: asyncio.Future[None] | None = None
        store.fence = NO_LEASE

    @property
    def leading(self) -> bool:
        return bool(self.token)

    @property
    def leader(self) -> str:
        """Where the leader says it serves (from its token), or ''."""
        return self.seen.partition("/")[2]

    def start(self) -> None:
        """Campaign in the background: every third of the TTL."""
        if self._loop is None:
            self._loop = asyncio.create_task(self._forever(), name="taskloom-leadership")

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.campaign()
            except Exception:
                logger.exception("leadership round failed; trying again")

    async def campaign(self) -> None:
        """One round: try to take the lease if we do not lead; if we do (the
        thread renews it), give it up once it may lapse unrenewed."""
        if self.token:
            left = self._valid_until - time.monotonic()
            if left < self.ttl / 3:
                # Nobody can take the lease while Redis is away, but once it
                # is back ours may have expired: give up before it can have.
                await self.step_down(
                    f"cannot renew the leader lease (it lapses in {max(left, 0):.1f}s)"
                )
            return
        sent = time.monotonic()
        try:
            won, token = await self._store.acquire_lease(self.holder, self.ttl)
        except StoreUnavailable as e:
            logger.warning("leadership: %s", e)
            return
        self.seen = token
        if won:
            self._valid_until = sent + self.ttl
            await self._begin(token)

    def _renew_in_thread(self, token: str) -> threading.Event:
        """Renew the lease ``token`` holds every third of the TTL from a
        thread, until the returned event is set or the lease is lost."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        renewer = self._store.lease_renewer()

        def run() -> None:
            try:
                while not stop.wait(self.ttl / 3):
                    sent = time.monotonic()
                    try:
                        kept, holder = renewer.renew(token, self.ttl)
                    except StoreUnavailable as e:
                        logger.warning("leadership: %s", e)
                        continue
                    if stop.is_set():
                        return
                    if kept:
                        self._valid_until = sent + self.ttl
                        continue
                    loop.call_soon_threadsafe(self._lost, token, holder)
                    return
            except RuntimeError:
                pass  # the loop closed under us: the process is going away
            finally:
                renewer.close()

        threading.Thread(target=run, name="taskloom-lease", daemon=True).start()
        return stop

    def _lost(self, token: str, holder: str) -> None:
        """The renewing thread found the lease held by ``holder``."""
        if self.token == token:
            self.seen = holder
            self._stepping = asyncio.ensure_future(
                self.step_down(f"the leader lease is now held by {holder or 'nobody'}")
            )

    async def _begin(self, token: str) -> None:
        self._store.fence = token
        self.token = token
        self._renewing = self._renew_in_thread(token)
        if not await self._term.begin(token):
            self._stop_renewing()
            self._store.fence = NO_LEASE
            self.token = ""
            with contextlib.suppress(TaskloomError):
                await self._store.release_lease(token)
            return
        logger.info("leading (lease %s)", token)

    def _stop_renewing(self) -> None:
        if self._renewing is not None:
            self._renewing.set()
            self._renewing = None

    async def step_down(self, reason: str) -> None:
        """Stop deciding, refuse writes, send the workers elsewhere.

        The winding down runs to its end even if the caller is cancelled (a
        stop() during a step-down), or the term's loops would run on.
        """
        if self.token:
            self.token = ""
            self._stop_renewing()
            logger.warning("stepping down: %s", reason)
            self._ending = asyncio.ensure_future(self._wind_down(self._term.end(reason)))
        if self._ending is not None:
            await asyncio.shield(self._ending)

    async def _wind_down(self, ending: Awaitable[None]) -> None:
        await ending
        self._store.fence = NO_LEASE

    async def stop(self, wait: float) -> None:
        """Stop campaigning (waiting at most ``wait`` seconds for the round in
        flight), step down, and hand the lease over at once: a standby need
        not wait for it to expire."""
        if self._loop is not None:
            self._loop.cancel()
            _, stuck = await asyncio.wait([self._loop], timeout=wait)
            if stuck:
                logger.warning("leadership did not stop within %.0fs; going on", wait)
            self._loop = None
        token = self.token
        await self.step_down("the supervisor is shutting down")
        if token:
            with contextlib.suppress(TaskloomError):
                await self._store.release_lease(token)
