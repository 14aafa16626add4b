"""The client's one Session stream, which ``submit()`` and ``wait()`` share.

Calls made while a message is being written wait for the next one, so
concurrent calls travel together: 64 coroutines each submitting and waiting
send a few large messages, not 64 small RPCs, and one call alone goes at
once. The stream is opened at the first call and kept; if the supervisor
goes away it is opened again at the next address that serves (following a
standby to its leader, for up to ``reconnect_timeout``), and whatever had no
answer is sent again: a submit carries its idempotency key, so it is never
stored twice, and a task that ended meanwhile is answered at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import propagate

from taskloom.client import codec
from taskloom.core.errors import NotLeader, TaskloomError, Unavailable
from taskloom.core.status import from_rpc_error
from taskloom.core.tracing import tracing
from taskloom.v1 import tasks_pb2 as pb

if TYPE_CHECKING:
    from taskloom.client.client import TaskloomClient

logger = logging.getLogger(__name__)

MESSAGE_SUBMITS = 1_000
"""Submits per SessionRequest (the supervisor's limit)."""
MESSAGE_WAITS = 10_000
"""Tasks to wait for per SessionRequest (the supervisor's limit)."""
MESSAGE_BYTES = 1024 * 1024
"""Bytes of submits per SessionRequest: well under the supervisor's 4 MiB default."""

FINAL = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
"""A stream that ends so is not opened again: what waits on it fails with why."""


class SessionUnsupported(Exception):
    """The supervisor has no Session (it is older than this SDK): the client
    falls back to unary calls."""


Ended = Callable[[pb.TaskEnded | Exception], None]
"""Told of a task's end, or of why it cannot be waited for any more."""


class Session:
    """Submits and waits of one ``TaskloomClient``, on one stream."""

    def __init__(self, client: TaskloomClient) -> None:
        self._client = client
        self._refs = itertools.count(1)
        self._submits: dict[int, tuple[pb.SessionSubmit, asyncio.Future[pb.SubmitTaskResult]]] = {}
        """Submits with no answer yet, sent or not."""
        self._retry_until: dict[int, tuple[float, int]] = {}
        """Submits refused as Unavailable: until when they are sent again,
        and how often they were."""
        self._resting: set[int] = set()
        """Of those, the ones waiting to be sent again."""
        self._doubted: set[int] = set()
        """Submits a try of which may have been stored unacknowledged (no
        answer came, or Redis was away): a final "none leads" does not tell
        their outcome."""
        self._waits: dict[str, list[Ended]] = {}
        """Tasks waited for with no answer yet, and who waits."""
        self._unsent_submits: list[int] = []
        self._unsent_waits: list[str] = []
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    # -- calls ---------------------------------------------------------------------------

    async def submit(self, request: pb.SubmitTaskRequest) -> pb.SubmitTaskResult:
        """Store one task; its result, or the error it was refused with."""
        ref = next(self._refs)
        future: asyncio.Future[pb.SubmitTaskResult] = asyncio.get_running_loop().create_future()
        item = pb.SessionSubmit(ref=ref, task=request)
        if tracing():
            carried: dict[str, str] = {}
            propagate.inject(carried)
            item.trace_context.update(carried)
        self._submits[ref] = (item, future)
        self._unsent_submits.append(ref)
        self._kick()
        try:
            result = await self._answer(ref, future)
            if result.HasField("error") and ref in self._doubted:
                error = codec.error_from_pb(result.error)
                if isinstance(error, NotLeader):
                    raise error
            return result
        except NotLeader as e:
            if ref not in self._doubted:
                raise  # every try was refused: it is surely not stored
            # None leads now, but an earlier try may have been stored: the
            # client makes this OutcomeUnknown.
            raise Unavailable(f"{e}; an earlier try may have been stored") from None
        finally:
            self._submits.pop(ref, None)
            self._retry_until.pop(ref, None)
            self._resting.discard(ref)
            self._doubted.discard(ref)

    async def _answer(
        self, ref: int, future: asyncio.Future[pb.SubmitTaskResult]
    ) -> pb.SubmitTaskResult:
        settings = self._client.settings
        given_up: float | None = None
        while True:
            # Each try has ``timeout`` to be answered, as a unary call would;
            # one that is not is sent again (its key makes that safe) until
            # ``unavailable_grace`` has passed.
            try:
                async with asyncio.timeout(settings.timeout):
                    return await asyncio.shield(future)
            except TimeoutError:
                self._doubted.add(ref)
                now = time.monotonic()
                given_up = given_up or now + settings.unavailable_grace
                if now >= given_up:
                    raise Unavailable(
                        f"the supervisor did not answer within {settings.timeout:g}s "
                        "(TASKLOOM_TIMEOUT)"
                    ) from None
                self._unsent_submits.append(ref)
                self._kick()

    def listen(self, task_ids: list[str], ended: Ended) -> None:
        """Call ``ended`` with each task's end, once, as it comes."""
        for task_id in task_ids:
            waiting = self._waits.get(task_id)
            if waiting is None:
                self._waits[task_id] = [ended]
                self._unsent_waits.append(task_id)
            else:
                waiting.append(ended)
        self._kick()

    def forget(self, task_id: str, ended: Ended) -> None:
        waiting = self._waits.get(task_id)
        if waiting is not None and ended in waiting:
            waiting.remove(ended)
            if not waiting:
                # The supervisor still answers; the answer is then dropped.
                del self._waits[task_id]

    async def close(self) -> None:
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        self._fail(Unavailable("the client was closed"))

    # -- the stream ----------------------------------------------------------------------

    def _kick(self) -> None:
        if self._closed:
            self._fail(Unavailable("the client was closed"))
            return
        self._wake.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    @property
    def _pending(self) -> bool:
        return bool(self._submits or self._waits)

    async def _run(self) -> None:
        client = self._client
        deadline: float | None = None
        broken_since: float | None = None
        delay = 0.2
        while self._pending:
            index = client._current
            call = client._stubs[index].Session(metadata=client._stream_metadata())
            # A new stream knows nothing: everything without an answer goes again.
            self._unsent_submits = [r for r in self._submits if r not in self._resting]
            self._unsent_waits = list(self._waits)
            self._wake.set()
            writer = asyncio.create_task(self._write(call))
            try:
                async for response in call:
                    deadline, broken_since, delay = None, None, 0.2
                    self._answered(response)
                # Ended by the supervisor (it is going away): open it again.
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # A supervisor older than the Session: the calls go unary.
                    self._fail(SessionUnsupported(e.details() or "no Session"))
                    return
                if e.code() in FINAL:
                    self._fail(from_rpc_error(e, target=client._addresses[index]))
                    return
                if not self._pending:
                    return  # nothing to resume; the next call opens a stream
                # Submits wait for a leader as long as a unary call would
                # (``unavailable_grace``), waits as long as a watch.
                now = time.monotonic()
                broken_since = broken_since or now
                if now - broken_since >= client.settings.unavailable_grace:
                    self._fail_submits(from_rpc_error(e, target=client._addresses[index]))
                try:
                    # Any other failure of the stream (a supervisor going
                    # away, a transport error gRPC reports as INTERNAL) is
                    # resumed: the stream holds nothing that is not sent again.
                    deadline, delay = await client._stream_broke(e, deadline, delay, resumable=True)
                except TaskloomError as error:
                    self._fail(error)
                    return
            finally:
                # What was sent on it and not answered may have been stored.
                unsent = set(self._unsent_submits)
                self._doubted.update(
                    r for r in self._submits if r not in unsent and r not in self._resting
                )
                writer.cancel()
                call.cancel()

    async def _write(self, call: Any) -> None:
        while True:
            await self._wake.wait()
            # One turn of the loop first: the calls made in the same turn as
            # the one that woke us (coroutines resumed together) go with it.
            await asyncio.sleep(0)
            self._wake.clear()
            while self._unsent_submits or self._unsent_waits:
                submits: list[pb.SessionSubmit] = []
                size = 0
                while self._unsent_submits and len(submits) < MESSAGE_SUBMITS:
                    ref = self._unsent_submits[0]
                    pending = self._submits.get(ref)
                    if pending is None:  # its caller gave up before it was sent
                        self._unsent_submits.pop(0)
                        continue
                    weight = pending[0].ByteSize()
                    if submits and size + weight > MESSAGE_BYTES:
                        break
                    self._unsent_submits.pop(0)
                    submits.append(pending[0])
                    size += weight
                waits = [t for t in self._unsent_waits[:MESSAGE_WAITS] if t in self._waits]
                del self._unsent_waits[:MESSAGE_WAITS]
                if not (submits or waits):
                    continue
                try:
                    await call.write(pb.SessionRequest(submits=submits, waits=waits))
                except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    return  # the stream broke: the reader sees why, and sends all again

    def _answered(self, response: pb.SessionResponse) -> None:
        for submitted in response.submitted:
            pending = self._submits.get(submitted.ref)
            if pending is None:
                continue
            result = submitted.result
            if result.HasField("error") and self._again(submitted.ref, result.error):
                continue
            if not pending[1].done():
                pending[1].set_result(result)
        for end in response.ended:
            for ended in self._waits.pop(end.task_id, ()):
                ended(end)

    def _again(self, ref: int, error: pb.TaskError) -> bool:
        """Whether a submit refused with ``error`` is sent again: while the
        supervisor steps down or Redis is away, for up to ``unavailable_grace``
        (its key makes a second store impossible)."""
        refused = codec.error_from_pb(error)
        if not isinstance(refused, Unavailable):
            return False
        if not isinstance(refused, NotLeader):
            self._doubted.add(ref)  # Redis away: the write may have landed
        now = time.monotonic()
        until, tries = self._retry_until.get(
            ref, (now + self._client.settings.unavailable_grace, 0)
        )
        if now >= until:
            return False
        self._retry_until[ref] = (until, tries + 1)
        self._resting.add(ref)
        asyncio.get_running_loop().call_later(min(0.1 * 2**tries, 1.0), self._resend, ref)
        return True

    def _fail_submits(self, error: Exception) -> None:
        for _, future in list(self._submits.values()):
            if not future.done():
                future.set_exception(error)

    def _resend(self, ref: int) -> None:
        self._resting.discard(ref)
        if ref in self._submits:
            self._unsent_submits.append(ref)
            self._kick()

    def _fail(self, error: Exception) -> None:
        """Answer everything pending with ``error``."""
        self._fail_submits(error)
        waits, self._waits = self._waits, {}
        for waiting in waits.values():
            for ended in waiting:
                ended(error)
