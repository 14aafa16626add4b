"""A client's Session: many submits and waits on one stream.

The SDK's ``submit()`` and ``wait()`` travel on one Session per client, so
that concurrent calls share messages and none pays for an RPC of its own (a
unary call costs about a millisecond here, a message on an open stream a
fraction of that). Each submit runs as SubmitTask would (its own quota,
checks and idempotency key) and is answered with the caller's ref; each task
waited for is answered once, when it ends, with its terminal event and the
task as it ended (read in one batch for all the tasks that ended together),
so a wait needs no GetTask. What is ready goes out together: one message
carries every answer there is when the last one has been written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from opentelemetry import propagate
from opentelemetry.trace import SpanKind

from taskloom.core.auth import Principal
from taskloom.core.errors import InvalidArgument, ResourceExhausted, TaskloomError
from taskloom.core.limits import batches, cut_text
from taskloom.core.model import Event, Task
from taskloom.core.tracing import tracer, tracing
from taskloom.supervisor import codec
from taskloom.supervisor.quotas import Quotas
from taskloom.supervisor.records import decode_snapshot
from taskloom.supervisor.watching import Waiter
from taskloom.v1 import tasks_pb2 as pb

logger = logging.getLogger(__name__)

MAX_SESSION_SUBMITS = 1_000
"""Submits one SessionRequest may carry (as tasks.proto says)."""
MAX_SESSION_WAIT_IDS = 10_000
"""Tasks one SessionRequest may add to its waits."""
MAX_SESSION_WAITS = 100_000
"""Tasks one Session may wait for at once; more are refused (RESOURCE_EXHAUSTED)."""
SUBMITS_IN_FLIGHT = 2_000
"""Submits of one Session being stored at once; past it the Session reads no
more requests, and gRPC's flow control holds the client back."""
SNAPSHOT_SUBTASKS = 100
"""A task with more subtasks is not sent with its end (the client reads it)."""
SNAPSHOT_BYTES = 256 * 1024
"""Nor one whose encoding is larger."""
FRAME_BYTES = 1024 * 1024
"""About the most one SessionResponse carries."""
EVENT_BYTES = 512 * 1024
"""An event message longer than this goes out cut (only logs written before the caps)."""

SUBMIT_SPAN = "taskloom.v1.TaskService/Session submit"
"""The server span of one submit on a Session (a unary call has its RPC's)."""

Submit = Callable[[pb.SubmitTaskRequest], Awaitable[tuple[str, bool]]]
Snapshots = Callable[[list[str]], Awaitable[dict[str, Task]]]


class ClientSession:
    """One Session stream: the submits it carries, the tasks it waits for."""

    def __init__(
        self,
        principal: Principal,
        credential: bytes,
        submit: Submit,
        waiter: Waiter,
        snapshots: Snapshots,
        quotas: Quotas,
    ) -> None:
        self.principal = principal
        self.credential = credential
        """The hash of the token that opened it: it is closed when that is revoked."""
        self._submit = submit
        self._waiter = waiter
        self._snapshots = snapshots
        self._quotas = quotas
        self._holding = False
        """Whether it holds one of its principal's watch streams: while it
        waits for something (a Session that only submits holds none)."""
        self._out: list[tuple[int, Any]] = []
        """Answers not yet written: (weight, SessionSubmitted or TaskEnded)."""
        self._news = asyncio.Event()
        self._failed: Exception | None = None
        self._slots = asyncio.Semaphore(SUBMITS_IN_FLIGHT)
        self._submitting: set[asyncio.Task[None]] = set()
        self._read_all = False

    def __str__(self) -> str:
        return f"the session of {self.principal.name}"

    def close(self, error: TaskloomError) -> None:
        """End the stream with ``error`` (its token was revoked, ...)."""
        self._fail(error)

    def _fail(self, error: Exception) -> None:
        if self._failed is None:
            self._failed = error
        self._news.set()

    def _put(self, weight: int, answer: Any) -> None:
        self._out.append((weight, answer))
        self._news.set()

    async def serve(
        self, requests: AsyncIterator[pb.SessionRequest]
    ) -> AsyncIterator[pb.SessionResponse]:
        """The answers, as they come, until the client has stopped sending
        and everything it sent is answered."""
        helpers = [
            asyncio.create_task(self._guarded(self._read(requests))),
            asyncio.create_task(self._guarded(self._ends())),
        ]
        try:
            while True:
                await self._news.wait()
                self._news.clear()
                if self._out:
                    out, self._out = self._out, []
                    for frame in batches(out, lambda item: item[0], FRAME_BYTES):
                        yield pb.SessionResponse(
                            submitted=[a for _, a in frame if isinstance(a, pb.SessionSubmitted)],
                            ended=[a for _, a in frame if isinstance(a, pb.TaskEnded)],
                        )
                if self._failed is not None:
                    raise self._failed
                if self._read_all and not self._submitting and not self._waiter.waiting:
                    return
        finally:
            for helper in helpers:
                helper.cancel()
            for submitting in list(self._submitting):
                submitting.cancel()
            self._waiter.close()
            self._release()

    async def _guarded(self, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as e:  # raised by ``serve``: the stream ends with it
            self._fail(e)

    async def _read(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        async for request in requests:
            if len(request.submits) > MAX_SESSION_SUBMITS:
                raise InvalidArgument(
                    f"{len(request.submits):,} submits in one SessionRequest; send at most "
                    f"{MAX_SESSION_SUBMITS:,}",
                    field="submits",
                )
            if len(request.waits) > MAX_SESSION_WAIT_IDS:
                raise InvalidArgument(
                    f"{len(request.waits):,} waits in one SessionRequest; send at most "
                    f"{MAX_SESSION_WAIT_IDS:,}",
                    field="waits",
                )
            for item in request.submits:
                await self._slots.acquire()
                task = asyncio.create_task(self._submitted(item))
                self._submitting.add(task)
                task.add_done_callback(self._submitting.discard)
            if request.waits:
                self._wait(list(request.waits))
        self._read_all = True
        self._news.set()

    def _refuse(self, task_ids: list[str], error: TaskloomError) -> None:
        for task_id in task_ids:
            self._put(*_answer(task_id, error, None))

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._quotas.give_watch(self.principal)

    def _wait(self, task_ids: list[str]) -> None:
        if not self._holding:
            try:
                self._quotas.take_watch(self.principal)
            except ResourceExhausted as e:
                self._refuse(task_ids, e)
                return
            self._holding = True
        room = max(0, MAX_SESSION_WAITS - self._waiter.waiting)
        if task_ids[room:]:
            full = ResourceExhausted(
                f"this session already waits for {MAX_SESSION_WAITS:,} tasks; wait for "
                "fewer at once",
                subject="session_waits",
            )
            self._refuse(task_ids[room:], full)
        self._waiter.add(task_ids[:room])
        if not self._waiter.waiting:
            self._release()

    async def _submitted(self, item: pb.SessionSubmit) -> None:
        try:
            with contextlib.ExitStack() as stack:
                if tracing():
                    # The span a unary SubmitTask would have had, in the
                    # caller's trace: the task's own trace starts under it.
                    carried = propagate.extract(dict(item.trace_context))
                    span = tracer().start_as_current_span(
                        SUBMIT_SPAN,
                        context=carried,
                        kind=SpanKind.SERVER,
                        attributes={"rpc.system": "grpc", "rpc.method": "Session"},
                    )
                    stack.enter_context(span)
                try:
                    task_id, created = await self._submit(item.task)
                    result = pb.SubmitTaskResult(task_id=task_id, created=created)
                except TaskloomError as e:
                    result = pb.SubmitTaskResult(error=codec.error_to_pb(e))
            self._put(128, pb.SessionSubmitted(ref=item.ref, result=result))
        finally:
            self._slots.release()
            if self._read_all:
                self._news.set()

    async def _ends(self) -> None:
        while True:
            ends = await self._waiter.next()
            # The writes that ended small tasks returned them; the others are
            # read, all in one script.
            tasks = {t: decode_snapshot(raw) for t, end, raw in ends if raw is not None}
            unread = [t for t, end, _ in ends if isinstance(end, Event) and t not in tasks]
            if unread:
                tasks.update(await self._snapshots(unread))
            for task_id, end, _ in ends:
                self._put(*_answer(task_id, end, tasks.get(task_id)))
            if not self._waiter.waiting:
                self._release()
            if self._read_all:
                self._news.set()


def _answer(task_id: str, end: Event | TaskloomError, task: Task | None) -> tuple[int, Any]:
    if isinstance(end, TaskloomError):
        return 256, pb.TaskEnded(task_id=task_id[:64], error=codec.error_to_pb(end))
    text, _ = cut_text(end.message, EVENT_BYTES, "too large to send")
    message = pb.TaskEnded(task_id=task_id, event=codec.event_to_pb(replace(end, message=text)))
    weight = 256 + len(text) * 4
    if task is not None:
        snapshot = codec.task_to_pb(task)
        size = snapshot.ByteSize()
        if size <= SNAPSHOT_BYTES:
            message.task.CopyFrom(snapshot)
            weight += size
    return weight, message


@contextlib.contextmanager
def registered(sessions: set[ClientSession], session: ClientSession) -> Any:
    """The session is in ``sessions`` for the block (so that a revoked token closes it)."""
    sessions.add(session)
    try:
        yield session
    finally:
        sessions.discard(session)
