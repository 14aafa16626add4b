"""The worker's stream to its supervisor, kept open for the worker's whole life.

A session: Hello (with the attempts the worker still holds), Welcome, then
assignments down and batched reports up, with heartbeats while it runs
anything (always, if the supervisor does not allow idle silence). When the
stream breaks, the connection waits a jittered, exponentially growing delay
(full jitter, capped at ``reconnect_max``) and opens a new one; reports that
were never acknowledged are sent again on it. The delay never exceeds a third of
the lease TTL the supervisor announced, so a worker is back before the leases
it holds expire, even when the supervisor restarts. Given several supervisor
addresses, a session that fails or ends moves on to the next one. A standby
refuses workers, naming the leader where it knows it: the worker goes
there at once (over TLS it expects the certificate of the address it was
given), and back to its addresses when that session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from importlib.metadata import version
from typing import Protocol

import grpc

from taskloom.core.auth import token_metadata
from taskloom.core.channel import followed_tls, open_channel
from taskloom.core.model import Assignment, AttemptRef
from taskloom.core.prices import Price
from taskloom.core.ratelimits import Limit
from taskloom.core.status import leader_of
from taskloom.core.wire import duration
from taskloom.v1 import workers_pb2 as wpb
from taskloom.v1 import workers_pb2_grpc
from taskloom.worker import codec
from taskloom.worker.codec import Heartbeat, Outgoing, Report
from taskloom.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

WELCOME_TIMEOUT = 10.0
RATE_TIMEOUT = 10.0
"""How long a TakeRate may take."""
RATE_RETRY = 1.0
"""While no supervisor answers TakeRate, how long a call waits before asking again."""
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class SessionHandler(Protocol):
    """What the connection needs from the worker."""

    def in_flight(self) -> list[AttemptRef]: ...
    def cache_keys(self) -> dict[str, str]: ...
    def labels(self) -> dict[str, str]: ...
    def on_prices(self, prices: dict[str, Price]) -> None: ...
    def on_rate_limits(self, limits: dict[str, Limit]) -> None: ...
    def unacked(self) -> list[Report]: ...
    def running(self) -> int: ...
    def draining(self) -> bool: ...
    def on_assign(self, assignments: Sequence[Assignment]) -> None: ...
    def on_cancel(self, refs: Sequence[AttemptRef], reason: str) -> None: ...
    def on_ack(self, refs: Sequence[AttemptRef]) -> None: ...


class Connection:
    """Connects, and reconnects, to the supervisor until ``close()``."""

    def __init__(self, settings: WorkerSettings, worker_id: str, handler: SessionHandler) -> None:
        self._settings = settings
        self._worker_id = worker_id
        self._handler = handler
        self._queue: asyncio.Queue[Outgoing] | None = None
        self._call: grpc.aio.StreamStreamCall[wpb.ConnectRequest, wpb.ConnectResponse] | None = None
        self._closing = asyncio.Event()
        self.connected = asyncio.Event()
        self._stub: workers_pb2_grpc.WorkerServiceAsyncStub | None = None
        """The stub of the session that was welcomed last (for TakeRate)."""
        self.heartbeat_interval = 5.0
        self.lease_ttl = 15.0
        self.max_output_bytes = 0
        """The largest output the supervisor accepts (0: no limit), from its Welcome."""
        self.truncate_output = False
        self.idle_silence = False
        """Whether the supervisor lets this worker skip heartbeats while it runs
        nothing (from its Welcome)."""
        self.heartbeat_acks = False
        """Whether the supervisor answers heartbeats (from its Welcome), so that
        silence from it means it no longer hears this worker."""
        self.last_contact = time.monotonic()
        """When the supervisor was last heard from (any message)."""

    async def take_rate(
        self, bucket: str, limit: Limit, requests: int, tokens: int, pause: float
    ) -> float:
        """Take from a rate limit's shared bucket through the supervisor
        (``TakeRate``): seconds to wait, 0 if taken. While no supervisor
        answers, a second (the caller asks again)."""
        del limit  # the supervisor's table is the one that counts
        stub, model = self._stub, bucket
        if stub is None:
            return RATE_RETRY
        try:
            reply = await stub.TakeRate(
                wpb.TakeRateRequest(
                    model=model, requests=requests, tokens=tokens, pause=duration(pause)
                ),
                metadata=token_metadata(self._settings.bearer_token()),
                timeout=RATE_TIMEOUT,
            )
        except grpc.aio.AioRpcError as e:
            logger.warning("cannot take from the rate limit of %s: %s", model, e.details())
            return RATE_RETRY
        return reply.wait.ToNanoseconds() / 1e9

    def send(self, item: Outgoing) -> None:
        """Queue an item for the current session; dropped while disconnected
        (reports are kept by the worker and sent again after reconnecting)."""
        if self._queue is not None:
            self._queue.put_nowait(item)

    async def close(self) -> None:
        self._closing.set()
        if self._call is not None:
            self._call.cancel()

    async def run(self) -> None:
        addresses = self._settings.supervisor
        tls = self._settings.client_tls()
        keepalive = self._settings.keepalive()
        max_bytes = self._settings.max_message_bytes
        channels = [open_channel(a, max_bytes, tls, keepalive) for a in addresses]
        stubs: list[workers_pb2_grpc.WorkerServiceAsyncStub] = [
            workers_pb2_grpc.WorkerServiceStub(c) for c in channels
        ]
        followed: tuple[str, grpc.aio.Channel] | None = None
        """The leader a standby named, tried next; dropped once its session ends."""
        follows = 0
        failures = 0
        index = 0
        try:
            while not self._closing.is_set():
                welcomed = False
                if followed is not None:
                    address, stub = followed[0], workers_pb2_grpc.WorkerServiceStub(followed[1])
                else:
                    address, stub = addresses[index], stubs[index]
                leader = ""
                try:
                    welcomed = await self._session(stub, address)
                except grpc.aio.AioRpcError as e:
                    leader = leader_of(e) if followed is None else ""
                    if leader and leader != address and not self._closing.is_set():
                        logger.info(
                            "supervisor at %s is a standby; following the leader to %s",
                            address,
                            leader,
                        )
                    elif e.code() in _REFUSED and not self._closing.is_set():
                        # Not a passing fault: say so every time, with what to do.
                        logger.error(
                            "supervisor at %s refused this worker: %s; check TASKLOOM_TOKEN "
                            "(it needs the worker role) and the TLS settings",
                            address,
                            e.details(),
                        )
                    elif not self._closing.is_set():
                        level = logging.WARNING if failures == 0 else logging.DEBUG
                        logger.log(
                            level,
                            "supervisor at %s: %s (%s); reconnecting",
                            address,
                            e.code().name,
                            e.details(),
                        )
                except TimeoutError:
                    logger.warning("supervisor at %s sent no Welcome", address)
                finally:
                    self.connected.clear()
                if self._closing.is_set():
                    break
                if followed is not None:
                    # The leader's session ended (or it no longer answers):
                    # back to the given addresses, from the one after the
                    # standby that named it.
                    await followed[1].close()
                    followed = None
                    index = (index + 1) % len(addresses)
                elif leader and leader != address:
                    follows += 1
                    channel = open_channel(leader, max_bytes, followed_tls(tls, address), keepalive)
                    followed = (leader, channel)
                    if follows <= 2:
                        continue  # at once; past that, pause first (below)
                else:
                    index = (index + 1) % len(addresses)
                if welcomed:
                    follows = 0
                failures = 0 if welcomed else failures + 1
                if index != 0 and followed is None:
                    continue  # try every address once before waiting
                cap = min(self._settings.reconnect_max, self.lease_ttl / 3, 0.1 * 2**failures)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), random.uniform(0.05, cap))
                follows = 0
        finally:
            if followed is not None:
                await followed[1].close()
            for channel in channels:
                await channel.close()

    async def _session(self, stub: workers_pb2_grpc.WorkerServiceAsyncStub, address: str) -> bool:
        call = stub.Connect(metadata=token_metadata(self._settings.bearer_token()))
        self._call = call
        handler = self._handler
        try:
            await call.write(
                codec.hello_to_pb(
                    worker_id=self._worker_id,
                    name=self._settings.name,
                    capabilities=self._settings.capabilities,
                    max_concurrency=self._settings.concurrency,
                    labels=handler.labels(),
                    in_flight=handler.in_flight(),
                    version=version("taskloom"),
                    cache_keys=handler.cache_keys(),
                )
            )
            async with asyncio.timeout(WELCOME_TIMEOUT):
                first = await call.read()
            if not isinstance(first, wpb.ConnectResponse) or not first.HasField("welcome"):
                return False
            welcome = first.welcome
            self.heartbeat_interval = welcome.heartbeat_interval.ToNanoseconds() / 1e9 or 5.0
            self.lease_ttl = welcome.lease_ttl.ToNanoseconds() / 1e9 or 15.0
            self.max_output_bytes = welcome.max_output_bytes
            self.truncate_output = welcome.truncate_output
            self.idle_silence = welcome.idle_silence
            self.heartbeat_acks = welcome.heartbeat_acks
            if welcome.prices:
                handler.on_prices({m: Price(p.input, p.output) for m, p in welcome.prices.items()})
            handler.on_rate_limits(
                {
                    m: Limit(r.requests_per_minute, r.tokens_per_minute)
                    for m, r in welcome.rate_limits.items()
                }
            )
            self._stub = stub
            self.last_contact = time.monotonic()
            logger.info(
                "connected to supervisor %s at %s",
                welcome.supervisor_id,
                address,
            )
            queue: asyncio.Queue[Outgoing] = asyncio.Queue()
            for report in handler.unacked():
                queue.put_nowait(report)
            if handler.draining():
                queue.put_nowait(Heartbeat(handler.running(), True))
            self._queue = queue
            self.connected.set()
            sender = asyncio.create_task(self._send_forever(call, queue))
            beats = asyncio.create_task(self._beat_forever(queue))
            try:
                await self._receive(call)
            finally:
                self._queue = None
                for task in (sender, beats):
                    task.cancel()
                await asyncio.gather(sender, beats, return_exceptions=True)
            return True
        finally:
            self._call = None
            call.cancel()

    async def _receive(
        self, call: grpc.aio.StreamStreamCall[wpb.ConnectRequest, wpb.ConnectResponse]
    ) -> None:
        handler = self._handler
        while True:
            message = await call.read()
            if not isinstance(message, wpb.ConnectResponse):
                logger.info("supervisor closed the stream")
                return
            self.last_contact = time.monotonic()
            kind = message.WhichOneof("message")
            if kind == "assign":
                handler.on_assign(codec.assignments_from_pb(message.assign))
            elif kind == "ack":
                handler.on_ack(codec.refs_from_pb(message.ack.refs))
            elif kind == "cancel":
                handler.on_cancel(codec.refs_from_pb(message.cancel.refs), message.cancel.reason)
            elif kind == "drain":
                logger.info("supervisor is going away (%s); reconnecting", message.drain.reason)
                return

    async def _send_forever(
        self,
        call: grpc.aio.StreamStreamCall[wpb.ConnectRequest, wpb.ConnectResponse],
        queue: asyncio.Queue[Outgoing],
    ) -> None:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            for frame in codec.frames_to_pb(items):
                await call.write(frame)

    async def _beat_forever(self, queue: asyncio.Queue[Outgoing]) -> None:
        # A worker that runs nothing stays silent if the supervisor allows it:
        # a fleet of idle workers then costs the supervisor no messages. Its
        # leases start when it is given work, and it beats from then on.
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            running = self._handler.running()
            if running or not self.idle_silence:
                queue.put_nowait(Heartbeat(running, self._handler.draining()))
