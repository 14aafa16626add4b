"""The leader lease: which supervisor decides, and how it stops deciding.

Several supervisors may run against one Redis; one holds the lease
(``keys.leader``, ``SET NX PX`` in ``lua/lead.lua``) and leads. Its token,
``<epoch>/<holder>``, is the fence: the store sends it with every write and
each script refuses a write whose token no longer holds the lease, so a
leader that was paused or cut off past its lease cannot change anything.

``Leadership`` campaigns for the lease, renews it every third of its TTL
while it leads, and steps down -- stops deciding, refuses writes, sends its
workers elsewhere -- as soon as it loses the lease or cannot renew it before
it may have lapsed. What a term of leadership runs is the caller's
(``Term``): the supervisor starts an orchestrator for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
        self._ending: asyncio.Future[None] | None = None
        self._loop: asyncio.Task[None] | None = None
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
        """One round: renew the lease if we lead, else try to take it."""
        sent = time.monotonic()
        try:
            if not self.token:
                won, token = await self._store.acquire_lease(self.holder, self.ttl)
                self.seen = token
                if won:
                    self._valid_until = sent + self.ttl
                    await self._begin(token)
                return
            kept, token = await self._store.renew_lease(self.token, self.ttl)
        except StoreUnavailable as e:
            # Nobody can take the lease while Redis is away, but once it is
            # back ours may have expired: give up before it can have.
            if self.token and time.monotonic() > self._valid_until - self.ttl / 3:
                await self.step_down(f"cannot renew the leader lease: {e}")
            else:
                logger.warning("leadership: %s", e)
            return
        if kept:
            self._valid_until = sent + self.ttl
        else:
            self.seen = token
            await self.step_down(f"the leader lease is now held by {token or 'nobody'}")

    async def _begin(self, token: str) -> None:
        self._store.fence = token
        self.token = token
        if not await self._term.begin(token):
            self._store.fence = NO_LEASE
            self.token = ""
            with contextlib.suppress(TaskloomError):
                await self._store.release_lease(token)
            return
        logger.info("leading (lease %s)", token)

    async def step_down(self, reason: str) -> None:
        """Stop deciding, refuse writes, send the workers elsewhere.

        The winding down runs to its end even if the caller is cancelled (a
        stop() during a step-down), or the term's loops would run on.
        """
        if self.token:
            self.token = ""
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
