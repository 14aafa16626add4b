"""The gRPC servicers: TaskService for clients, WorkerService for workers.

This is the edge: requests are converted to the domain model (``codec``),
handed to the orchestrator, and domain errors become gRPC statuses in one
place (``taskloom.core.status``). Nothing past this module sees protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeAlias, TypeVar

import grpc
from opentelemetry import trace

from taskloom.core import wire
from taskloom.core.auth import LOCAL_ADMIN, Principal
from taskloom.core.errors import InvalidArgument, PermissionDenied, TaskloomError, Unavailable
from taskloom.core.limits import batches, cut_text
from taskloom.core.model import (
    Assignment,
    AttemptRef,
    Event,
    ProgressUpdate,
    SubtaskFailure,
    SubtaskResult,
    Task,
)
from taskloom.core.plan import CAPABILITY_RE, LABEL_RE
from taskloom.core.prices import PriceTable
from taskloom.core.ratelimits import MAX_PAUSE, LimitTable
from taskloom.core.status import abort
from taskloom.core.tracing import parent, tracing
from taskloom.supervisor import codec
from taskloom.supervisor.auth import current_credential, current_principal
from taskloom.supervisor.orchestrator import Orchestrator
from taskloom.supervisor.quotas import Quotas
from taskloom.supervisor.scheduler import (
    AckReports,
    AssignBatch,
    CloseSession,
    HeartbeatAck,
    Outgoing,
    WorkerSession,
)
from taskloom.supervisor.sessions import SNAPSHOT_SUBTASKS, ClientSession, registered
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import tasks_pb2_grpc, workers_pb2_grpc
from taskloom.v1 import workers_pb2 as wpb

logger = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
ASSIGN_FRAME_BYTES = 1024 * 1024
"""About the most one Assign message carries: a worker accepts 64 MiB by
default and no less than 1 MiB (an assignment larger than this goes alone)."""
FRAME_BYTES = 1024 * 1024
"""About the most a WatchTask or WaitTasks message carries."""
EVENT_BYTES = 512 * 1024
EVENT_OVERHEAD = 256
"""An event's fields other than its message, generously."""
MAX_CONCURRENCY = 10_000
MAX_CAPABILITIES = 64
"""Capabilities one worker may offer."""
MAX_LABELS = 32
MAX_NAME_CHARS = 128
MAX_RATE_TOKENS = 10_000_000
"""The most tokens one TakeRate may take (a call's prompt or reply)."""
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
"""A worker's own id: plain, and without ``/``, which joins it to its principal."""
MAX_SUBMIT_BATCH = 1_000
"""Tasks one SubmitTasks call may carry (as tasks.proto says)."""
MAX_WAIT_BATCH = 10_000
"""Tasks one WaitTasks call may wait for (as tasks.proto says)."""
Current = Callable[[], Orchestrator]
"""The orchestrator of this leadership term; raises NotLeader on standby."""


def _unary(
    method: Callable[[Any, Request, Context], Awaitable[Response]],
) -> Callable[[Any, Request, Context], Awaitable[Response]]:
    """Turn taskloom errors into statuses; anything else is logged and INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: Context) -> Response:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except TaskloomError as e:
            await abort(context, e)
        except Exception:
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the supervisor log")
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def _streaming(
    method: Callable[[Any, Request, Context], AsyncGenerator[Response, None]],
) -> Callable[[Any, Request, Context], AsyncGenerator[Response, None]]:
    """``_unary`` for server-streaming methods."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Request, context: Context
    ) -> AsyncGenerator[Response, None]:
        try:
            # Closed with the stream, so that what it holds (a watch slot,
            # waits) is let go at once, not when the collector gets to it.
            async with contextlib.aclosing(method(self, request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except TaskloomError as e:
            await abort(context, e)
        except Exception:
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the supervisor log")

    return wrapper


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    """Submit, read, list, cancel and watch tasks: each caller only its own
    (``current_principal``), admins every one."""

    def __init__(self, current: Current, quotas: Quotas) -> None:
        self._current = current
        self._quotas = quotas

    @_unary
    async def SubmitTask(
        self, request: pb.SubmitTaskRequest, context: Context
    ) -> pb.SubmitTaskResponse:
        task_id, created = await self._submit(self._current(), request)
        return pb.SubmitTaskResponse(task_id=task_id, created=created)

    @_unary
    async def SubmitTasks(
        self, request: pb.SubmitTasksRequest, context: Context
    ) -> pb.SubmitTasksResponse:
        count = len(request.tasks)
        if not 1 <= count <= MAX_SUBMIT_BATCH:
            raise InvalidArgument(
                f"{count:,} tasks in one SubmitTasks call; send 1 to {MAX_SUBMIT_BATCH:,}",
                field="tasks",
            )
        orchestrator = self._current()

        async def one(item: pb.SubmitTaskRequest) -> pb.SubmitTaskResult:
            try:
                task_id, created = await self._submit(orchestrator, item)
            except TaskloomError as e:
                return pb.SubmitTaskResult(error=codec.error_to_pb(e))
            return pb.SubmitTaskResult(task_id=task_id, created=created)

        # All at once: their scripts go to Redis back to back on the script line.
        results = await asyncio.gather(*(one(item) for item in request.tasks))
        return pb.SubmitTasksResponse(results=results)

    async def _submit(
        self, orchestrator: Orchestrator, request: pb.SubmitTaskRequest
    ) -> tuple[str, bool]:
        principal = current_principal.get()
        self._quotas.admit_load(orchestrator.scheduler.backlog())
        work = len(request.plan.subtasks) if request.HasField("plan") else 1
        self._quotas.admit_submit(principal, max(work, 1))
        plan = codec.plan_from_pb(request.plan) if request.HasField("plan") else None
        return await orchestrator.commands.submit(
            request.goal,
            plan=plan,
            options=codec.options_from_pb(request.options),
            idempotency_key=request.idempotency_key,
            principal=principal,
        )

    @_unary
    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.GetTaskResponse:
        task = await self._current().commands.get(
            request.task_id,
            subtasks=request.view != pb.TASK_VIEW_SUMMARY,
            principal=current_principal.get(),
        )
        return pb.GetTaskResponse(task=codec.task_to_pb(task))

    @_unary
    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        tasks, token = await self._current().commands.list_tasks(
            statuses=codec.statuses_from_pb(request.statuses),
            page_size=request.page_size,
            page_token=request.page_token,
            principal=current_principal.get(),
        )
        return pb.ListTasksResponse(
            tasks=[codec.task_to_pb(t) for t in tasks], next_page_token=token
        )

    @_unary
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: Context
    ) -> pb.CancelTaskResponse:
        task = await self._current().commands.cancel(
            request.task_id,
            request.reason,
            subtask_id=request.subtask_id,
            principal=current_principal.get(),
        )
        return pb.CancelTaskResponse(task=codec.task_to_pb(task))

    @_unary
    async def ApproveTask(
        self, request: pb.ApproveTaskRequest, context: Context
    ) -> pb.ApproveTaskResponse:
        task = await self._current().commands.approve(
            request.task_id,
            subtask_id=request.subtask_id,
            plan=codec.plan_from_pb(request.plan) if request.HasField("plan") else None,
            reason=request.reason,
            principal=current_principal.get(),
        )
        return pb.ApproveTaskResponse(task=codec.task_to_pb(task))

    @_unary
    async def RejectTask(
        self, request: pb.RejectTaskRequest, context: Context
    ) -> pb.RejectTaskResponse:
        task = await self._current().commands.reject(
            request.task_id,
            subtask_id=request.subtask_id,
            reason=request.reason,
            principal=current_principal.get(),
        )
        return pb.RejectTaskResponse(task=codec.task_to_pb(task))

    @_unary
    async def RetrySubtask(
        self, request: pb.RetrySubtaskRequest, context: Context
    ) -> pb.RetrySubtaskResponse:
        task = await self._current().commands.retry(
            request.task_id,
            request.subtask_id,
            instruction=request.instruction if request.HasField("instruction") else None,
            reason=request.reason,
            principal=current_principal.get(),
        )
        return pb.RetrySubtaskResponse(task=codec.task_to_pb(task))

    @_unary
    async def SkipSubtask(
        self, request: pb.SkipSubtaskRequest, context: Context
    ) -> pb.SkipSubtaskResponse:
        task = await self._current().commands.skip(
            request.task_id,
            request.subtask_id,
            output=request.output,
            reason=request.reason,
            principal=current_principal.get(),
        )
        return pb.SkipSubtaskResponse(task=codec.task_to_pb(task))

    @_unary
    async def PauseTask(
        self, request: pb.PauseTaskRequest, context: Context
    ) -> pb.PauseTaskResponse:
        task = await self._current().commands.pause(
            request.task_id, reason=request.reason, principal=current_principal.get()
        )
        return pb.PauseTaskResponse(task=codec.task_to_pb(task))

    @_unary
    async def ResumeTask(
        self, request: pb.ResumeTaskRequest, context: Context
    ) -> pb.ResumeTaskResponse:
        task = await self._current().commands.resume(
            request.task_id, reason=request.reason, principal=current_principal.get()
        )
        return pb.ResumeTaskResponse(task=codec.task_to_pb(task))

    @_streaming
    async def WatchTask(
        self, request: pb.WatchTaskRequest, context: Context
    ) -> AsyncGenerator[pb.WatchTaskResponse, None]:
        principal = current_principal.get()
        orchestrator = self._current()
        await _join_traces(orchestrator, [request.task_id])
        with self._quotas.watching(principal):
            async for events in orchestrator.watching.watch(
                request.task_id,
                request.after_event_id,
                principal=principal,
                terminal_only=request.terminal_only,
            ):
                for frame in frames(events):
                    yield pb.WatchTaskResponse(events=[codec.event_to_pb(e) for e in frame])

    @_streaming
    async def WaitTasks(
        self, request: pb.WaitTasksRequest, context: Context
    ) -> AsyncGenerator[pb.WaitTasksResponse, None]:
        task_ids = list(dict.fromkeys(request.task_ids))
        if not 1 <= len(task_ids) <= MAX_WAIT_BATCH:
            raise InvalidArgument(
                f"{len(task_ids):,} tasks in one WaitTasks call; send 1 to {MAX_WAIT_BATCH:,}",
                field="task_ids",
            )
        principal = current_principal.get()
        orchestrator = self._current()
        await _join_traces(orchestrator, task_ids)
        with self._quotas.watching(principal):
            async for events in orchestrator.watching.wait_many(task_ids, principal=principal):
                for frame in frames(events):
                    yield pb.WaitTasksResponse(events=[codec.event_to_pb(e) for e in frame])

    @_streaming
    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: Context
    ) -> AsyncGenerator[pb.SessionResponse, None]:
        principal = current_principal.get()
        orchestrator = self._current()

        async def submit(request: pb.SubmitTaskRequest) -> tuple[str, bool]:
            return await self._submit(orchestrator, request)

        async def snapshots(task_ids: list[str]) -> dict[str, Task]:
            return await orchestrator.store.snapshots(task_ids, SNAPSHOT_SUBTASKS)

        watching = orchestrator.watching
        session = ClientSession(
            principal,
            current_credential.get(),
            submit,
            watching.waiter(principal),
            snapshots,
            self._quotas,
        )
        with registered(watching.sessions, session):
            async for response in session.serve(request_iterator):
                yield response


MAX_TRACE_LINKS = 32
"""Tasks whose traces a WaitTasks call's span links to (the first ones)."""


async def _join_traces(orchestrator: Orchestrator, task_ids: list[str]) -> None:
    """Link the call's server span to the traces of the tasks it watches, so
    that a watch shows in the task's trace instead of as an orphan one."""
    if not tracing():
        return
    span = trace.get_current_span()
    if not span.is_recording():
        return
    for task_id in task_ids[:MAX_TRACE_LINKS]:
        carried = parent(await orchestrator.store.trace_of(task_id))
        if carried is not None:
            linked = trace.get_current_span(carried).get_span_context()
            span.add_link(linked, {"taskloom.task_id": task_id})


class WorkerServicer(workers_pb2_grpc.WorkerServiceServicer):
    """One bidirectional stream per worker: assignments down, reports up."""

    def __init__(
        self,
        current: Current,
        settings: SupervisorSettings,
        prices: PriceTable | None = None,
        rate_limits: LimitTable | None = None,
    ) -> None:
        self._current = current
        self._settings = settings
        self._prices = prices or PriceTable()
        self._limits = rate_limits or LimitTable()

    @_unary
    async def TakeRate(
        self, request: wpb.TakeRateRequest, context: Context
    ) -> wpb.TakeRateResponse:
        found = self._limits.find(request.model)
        if found is None:
            raise InvalidArgument(
                f"{request.model[:128]!r} has no rate limit here (TASKLOOM_RATE_LIMITS)",
                field="model",
            )
        pause = request.pause.ToNanoseconds() / 1e9
        if request.requests not in (0, 1) or not 0 <= request.tokens <= MAX_RATE_TOKENS:
            raise InvalidArgument(
                f"take 0 or 1 requests and 0 to {MAX_RATE_TOKENS:,} tokens", field="tokens"
            )
        if not 0 <= pause <= MAX_PAUSE:
            raise InvalidArgument(f"a pause is 0 to {MAX_PAUSE:g} seconds", field="pause")
        store = self._current().store
        wait = await store.take_rate(*found, request.requests, request.tokens, pause)
        return wpb.TakeRateResponse(wait=wire.duration(wait))

    async def Connect(self, request_iterator: Any, context: Context) -> None:  # type: ignore[override]
        # Reads go through context.read() (the reader task), writes through
        # context.write() (this coroutine): one of each at a time, as grpc.aio allows.
        del request_iterator
        try:
            orchestrator = self._current()
        except TaskloomError as e:
            await abort(context, e)
        hello = await self._hello(context)
        info = codec.worker_info_from_pb(hello)
        # A worker is who its credentials say, not what its Hello says: its id
        # is joined to its principal, so that another principal's worker can
        # neither take over its session nor report on its attempts.
        principal = current_principal.get()
        worker_id = bound_worker_id(principal, hello.worker_id)
        if orchestrator.scheduler.held_elsewhere(hello.worker_id, worker_id):
            await abort(
                context,
                PermissionDenied(
                    "another principal's worker is connected with this worker_id; "
                    "a worker's id is its own"
                ),
            )
        beyond = sorted(c for c in info.capabilities if not principal.may_use(c))
        if beyond:
            await abort(
                context,
                PermissionDenied(
                    f"{principal.name} may not offer {', '.join(b[:64] for b in beyond[:8])} "
                    "(its token is limited to other capabilities)"
                ),
            )
        info = dataclasses.replace(info, worker_id=worker_id)
        # The session belongs to this term: when the supervisor steps down
        # the stream ends and the worker looks for the new leader.
        session = orchestrator.worker_connected(info)
        session.credential = current_credential.get()
        reader = asyncio.create_task(
            self._read(orchestrator, session, context), name=f"read-{session.id[:8]}"
        )
        try:
            await context.write(
                codec.welcome_to_pb(
                    session.id,
                    self._settings.supervisor_id,
                    self._settings.heartbeat_interval,
                    self._settings.lease_ttl,
                    max_output_bytes=self._settings.max_output_bytes,
                    truncate_output=self._settings.output_overflow == "truncate",
                    prices=self._prices.prices,
                    rate_limits=self._limits.limits,
                )
            )
            await _send(session, context)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            orchestrator.worker_disconnected(session)

    async def _hello(self, context: Context) -> wpb.Hello:
        try:
            async with asyncio.timeout(self._settings.hello_timeout):
                first = await context.read()
        except TimeoutError:
            await abort(
                context,
                InvalidArgument(f"no Hello within {self._settings.hello_timeout:g}s; closing"),
            )
        if first is grpc.aio.EOF or first.WhichOneof("message") != "hello":
            await abort(context, InvalidArgument("a Connect stream must start with Hello"))
        hello: wpb.Hello = first.hello
        problem = hello_problem(hello)
        if problem:
            await abort(context, InvalidArgument(problem))
        return hello

    async def _read(
        self, orchestrator: Orchestrator, session: WorkerSession, context: Context
    ) -> None:
        """Write a worker's reports as they come, several messages at once.

        A receiver reads the stream ahead into an ``_Inbox``; the reports
        that arrive while one write is in Redis go together in the next
        (group commit). A slow Redis (an fsync that takes milliseconds)
        then gets bigger writes, not a longer queue of small ones: the
        worker's results are committed at the pace they come, not one
        message per round trip."""
        inbox = _Inbox()
        receiver = asyncio.create_task(
            _receive(orchestrator, session, context, inbox), name=f"receive-{session.id[:8]}"
        )
        try:
            while messages := await inbox.take():
                # However long Redis takes to write them, that is not the
                # worker's silence (the receiver may be waiting for room).
                session.writing += 1
                try:
                    await _report(orchestrator, session, messages)
                finally:
                    session.writing -= 1
                    orchestrator.heard_from(session)
        except Unavailable as e:
            # Redis is away or we lost the lease. Nothing was acknowledged:
            # the worker reconnects (here or to the new leader) and sends again.
            logger.warning("closing %s: %s", session, e)
            session.close(e)
            return
        except Exception:
            logger.exception("error on %s", session)
            session.close(TaskloomError("internal error in the supervisor; see its log"))
            return
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        session.close()


READ_AHEAD = 4 * 1024 * 1024
"""Report bytes read from one worker and not written yet, at most (a message
larger than this is let in alone): beyond it the stream is not read, and
HTTP/2 flow control slows the worker."""
WRITE_BYTES = 2 * 1024 * 1024
"""Report bytes written together, at most (a worker's frames are up to 2 MiB)."""
ACK_DELAY = 0.02
"""How long a worker's acknowledgements wait to go together, at most."""
MERGED = frozenset({"accepted", "progress", "completed", "failed"})
"""Reports written together; a ``stopped`` goes alone, in its place."""


class _Inbox:
    """A worker's report messages, read and not yet written (``READ_AHEAD``)."""

    def __init__(self) -> None:
        self._messages: deque[tuple[wpb.ConnectRequest, int]] = deque()
        self._bytes = 0
        self._ended = False
        self._changed = asyncio.Condition()

    async def put(self, message: wpb.ConnectRequest) -> None:
        """Keep ``message``; waits while the inbox is full."""
        size = message.ByteSize()
        async with self._changed:
            await self._changed.wait_for(
                lambda: not self._messages or self._bytes + size <= READ_AHEAD
            )
            self._messages.append((message, size))
            self._bytes += size
            self._changed.notify_all()

    async def end(self) -> None:
        """Nothing more comes: ``take`` returns what is left, then nothing."""
        async with self._changed:
            self._ended = True
            self._changed.notify_all()

    async def take(self) -> list[wpb.ConnectRequest]:
        """The next messages to write together, in the order they came:
        those of ``MERGED`` kinds up to ``WRITE_BYTES``, or one other.
        Waits for one; ``[]`` once the stream has ended and all were taken."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._messages) or self._ended)
            taken: list[wpb.ConnectRequest] = []
            size = 0
            while self._messages:
                message, n = self._messages[0]
                merged = message.WhichOneof("message") in MERGED
                if taken and (not merged or size + n > WRITE_BYTES):
                    break
                self._messages.popleft()
                taken.append(message)
                size += n
                if not merged:
                    break
            self._bytes -= size
            self._changed.notify_all()
            return taken


async def _receive(
    orchestrator: Orchestrator, session: WorkerSession, context: Context, inbox: _Inbox
) -> None:
    """Read a worker's stream: heartbeats are answered here, reports go to ``inbox``."""
    try:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                break
            kind = request.WhichOneof("message")
            draining = request.heartbeat.draining if kind == "heartbeat" else None
            orchestrator.heard_from(session, draining=draining)
            if kind == "heartbeat":
                session.send(HeartbeatAck())
                continue
            if kind == "hello":
                session.close(InvalidArgument("Hello may only be sent once per stream"))
                break
            await inbox.put(request)
    except grpc.aio.AioRpcError:
        pass
    await inbox.end()


async def _send(session: WorkerSession, context: Context) -> None:
    """Send a session's messages, merged as they queue up. Acknowledgements
    are not urgent (a worker only forgets the reports they confirm, and
    hears that the supervisor lives): they wait up to ``ACK_DELAY`` to go
    as one, where each commit would otherwise cost a message of its own
    (a grpc.aio write costs about a quarter of a millisecond here)."""
    outbox = session.outbox
    acks: list[Outgoing] = []
    due = 0.0
    loop = asyncio.get_running_loop()
    while True:
        pending: list[Outgoing] = []
        if not acks:
            pending.append(await outbox.get())
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    pending.append(await outbox.get())
        while not outbox.empty():
            pending.append(outbox.get_nowait())
        for message in pending:
            if isinstance(message, AckReports | HeartbeatAck):
                if not acks:
                    due = loop.time() + ACK_DELAY
                acks.append(message)
        rest: list[Outgoing] = [m for m in pending if not isinstance(m, AckReports | HeartbeatAck)]
        # A cancel, a drain or a close takes the acknowledgements with it.
        if acks and (loop.time() >= due or any(not isinstance(m, AssignBatch) for m in rest)):
            rest, acks = [*acks, *rest], []
        for message in _coalesce(rest):
            if isinstance(message, CloseSession):
                if message.error is not None:
                    await abort(context, message.error)
                return
            await context.write(codec.outgoing_to_pb(message))


def assignment_size(a: Assignment) -> int:
    """An upper bound of an assignment's encoded size (UTF-8 at most 4 bytes a character)."""
    text = len(a.goal) + len(a.instruction) + len(a.title)
    text += sum(len(i.title) + len(i.output) + len(i.subtask_id) for i in a.inputs)
    text += sum(len(k) + len(v) for k, v in a.params.items())
    return 4 * text + 512


def frames(events: list[Event]) -> Iterator[list[Event]]:
    """``events`` in messages of at most about ``FRAME_BYTES``, so that no
    message nears a channel's limit however large the log; an event larger
    than ``EVENT_BYTES`` (only logs written before the caps) goes out cut."""

    def fitted(event: Event) -> Event:
        message, cut = cut_text(event.message, EVENT_BYTES, "too large to send")
        return dataclasses.replace(event, message=message) if cut else event

    def weight(event: Event) -> int:
        return min(len(event.message) * 4, EVENT_BYTES) + EVENT_OVERHEAD

    yield from batches(map(fitted, events), weight, FRAME_BYTES)


def hello_problem(hello: wpb.Hello) -> str:
    """What is wrong with a Hello ('' if nothing): names a worker chooses
    reach logs, metric labels and the planner's prompt, so they are checked."""
    bad = [c for c in hello.capabilities if not CAPABILITY_RE.match(c)]
    if not WORKER_ID_RE.match(hello.worker_id):
        return "Hello needs a worker_id of up to 128 letters, digits and _.:- (no /)"
    if not hello.capabilities:
        return "Hello lists no capabilities"
    if len(hello.capabilities) > MAX_CAPABILITIES:
        return f"a worker may offer at most {MAX_CAPABILITIES} capabilities"
    if bad:
        return (
            f"capability {bad[0][:64]!r} is not a name: up to 64 letters, digits and _.-, "
            "starting with a letter"
        )
    if not 1 <= hello.max_concurrency <= MAX_CONCURRENCY:
        return f"max_concurrency must be between 1 and {MAX_CONCURRENCY}"
    if len(hello.name) > MAX_NAME_CHARS or not hello.name.isprintable():
        return f"a worker's name is printable and at most {MAX_NAME_CHARS} characters"
    if len(hello.labels) > MAX_LABELS or not all(
        LABEL_RE.match(k) and LABEL_RE.match(v) for k, v in hello.labels.items()
    ):
        return (
            f"at most {MAX_LABELS} labels, each key and value 1-64 letters, digits and _.:/- "
            "starting with a letter or digit"
        )
    return ""


def bound_worker_id(principal: Principal, worker_id: str) -> str:
    """The id a worker's session and attempts go by: its own, joined to its
    principal's name when authentication is on."""
    return worker_id if principal is LOCAL_ADMIN else f"{principal.name}/{worker_id}"


async def _report(
    orchestrator: Orchestrator, session: WorkerSession, messages: list[wpb.ConnectRequest]
) -> None:
    """Write a worker's report messages as one: the starts, the progress,
    the results, then the failures (the order each attempt's reports come
    in); results and failures are acknowledged once written. An attempt
    that ended in the same messages is not written as started: its end says
    it ran, as a worker's own batching does."""
    # Reports count only for attempts given to this worker (see held_by).
    worker_id = session.info.worker_id
    accepted: list[AttemptRef] = []
    progress: list[ProgressUpdate] = []
    results: list[SubtaskResult] = []
    failures: list[SubtaskFailure] = []
    for message in messages:
        kind = message.WhichOneof("message")
        if kind == "accepted":
            accepted += [codec.ref_from_pb(r) for r in message.accepted.refs]
        elif kind == "progress":
            progress += codec.progress_from_pb(message.progress)
        elif kind == "completed":
            results += codec.results_from_pb(message.completed)
        elif kind == "failed":
            failures += codec.failures_from_pb(message.failed)
        elif kind == "stopped":
            await orchestrator.stopped(session, codec.stopped_from_pb(message.stopped))
    ended = {r.ref for r in results} | {f.ref for f in failures}
    started = [r for r in accepted if r not in ended]
    if started:
        await orchestrator.accepted(started, worker_id)
    if progress:
        await orchestrator.progress(progress, worker_id, session=session)
    acks: list[AttemptRef] = []
    if results:
        acks += await orchestrator.completed(results, worker_id)
    if failures:
        acks += await orchestrator.failed(failures, worker_id)
    if results or failures:
        session.send(AckReports(tuple(acks)))


def _coalesce(messages: list[Outgoing]) -> list[Outgoing]:
    """Merge queued assignments and acks into as few frames as possible."""
    assignments = [a for m in messages if isinstance(m, AssignBatch) for a in m.assignments]
    acks = [r for m in messages if isinstance(m, AckReports) for r in m.refs]
    heard = any(isinstance(m, HeartbeatAck) for m in messages)
    rest = [m for m in messages if not isinstance(m, AssignBatch | AckReports | HeartbeatAck)]
    merged: list[Outgoing] = []
    if acks or heard:
        # One Ack: the reports it confirms, or none, to answer a heartbeat.
        merged.append(AckReports(tuple(acks)))
    # Assignments carry their goal and inputs: split so that no frame nears
    # the worker's limit however many share a large goal.
    merged += [
        AssignBatch(tuple(part))
        for part in batches(assignments, assignment_size, ASSIGN_FRAME_BYTES)
    ]
    # Cancels and drains after the assignments they may refer to; a close last.
    merged += [m for m in rest if not isinstance(m, CloseSession)]
    merged += [m for m in rest if isinstance(m, CloseSession)][:1]
    return merged
