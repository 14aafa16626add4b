"""The taskloom SDK: submit goals, follow them, read their results.

    async with TaskloomClient("127.0.0.1:50051") as client:
        task_id = await client.submit("Compare three e-bike motors for hill climbing")
        async for event in client.watch(task_id):
            print(event.type, event.subtask_id, event.message)
        task = await client.get(task_id)
        print(task.status, task.result)

``SyncTaskloomClient`` offers the same calls without ``await``. Every failure
is a ``TaskloomError`` subclass (``TaskNotFound``, ``PlanError``,
``SupervisorUnavailable``, ...), never a raw ``grpc.RpcError``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc
from opentelemetry import propagate

from taskloom.client import codec
from taskloom.client.session import Session, SessionUnsupported
from taskloom.client.settings import ClientSettings
from taskloom.core.auth import token_metadata
from taskloom.core.channel import followed_tls, is_loopback, open_channel
from taskloom.core.errors import (
    InvalidArgument,
    NotLeader,
    OutcomeUnknown,
    SupervisorUnavailable,
    TaskloomError,
    Unavailable,
)
from taskloom.core.model import Event, OptionFields, Plan, Task, TaskOptions, TaskStatus
from taskloom.core.plan import parse_plan
from taskloom.core.status import from_rpc_error
from taskloom.core.tracing import tracing
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import tasks_pb2_grpc

logger = logging.getLogger(__name__)
waiting_logger = logging.getLogger(f"{__name__}.waiting")
"""Says (at INFO) when a call starts waiting for a supervisor, and for how long
it will; the CLI shows it, so that its wait is never silent."""
T = TypeVar("T")
PlanLike = Plan | Mapping[str, Any] | str


SUBMIT_BATCH = 1_000
"""Tasks per SubmitTasks call (the supervisor's limit)."""
SUBMIT_BYTES = 1024 * 1024
"""Bytes of tasks per SubmitTasks call: well under the supervisor's 4 MiB
default (``TASKLOOM_MAX_REQUEST_BYTES``)."""
WAIT_BATCH = 10_000
"""Tasks per WaitTasks stream (the supervisor's limit)."""
MAX_FOLLOWED = 4
"""Leaders' addresses a client keeps channels to beside its configured ones."""


@dataclass(frozen=True)
class Submitted:
    """What became of one task of ``submit_many``."""

    task_id: str = ""
    """Empty when the task was refused."""
    created: bool = False
    """False when its idempotency key named an earlier task (or it was refused)."""
    error: TaskloomError | None = None
    """Why it was refused: what ``submit`` would have raised."""


class TaskloomClient:
    """Async client for a supervisor, a Service in front of several, or a list
    of supervisors (``"host1:50051,host2:50051"``): calls go to whichever leads,
    and move on when it goes away."""

    def __init__(
        self, address: str | None = None, *, settings: ClientSettings | None = None
    ) -> None:
        self.settings = settings or ClientSettings.load(supervisor=address)
        self._addresses = builtins.list(self.settings.supervisor)
        self._configured = len(self._addresses)
        """The first addresses are the configured ones; after them, leaders
        that standbys named (at most ``MAX_FOLLOWED``)."""
        tls = self.settings.client_tls()
        self._tls = tls
        token = self.settings.bearer_token()
        if token and tls is None:
            exposed = [a for a in self._addresses if not is_loopback(a)]
            if exposed:
                logger.warning(
                    "sending a token without TLS to %s: anyone on the path can read it; "
                    "set TASKLOOM_TLS_CA",
                    ", ".join(exposed),
                )
        self._metadata = token_metadata(token)
        self._channels = [
            open_channel(a, self.settings.max_message_bytes, tls, self.settings.keepalive())
            for a in self._addresses
        ]
        self._stubs: list[Any] = [tasks_pb2_grpc.TaskServiceStub(c) for c in self._channels]
        self._current = 0
        self._session: Session | None = None
        self._sessionless = False
        """The supervisor has no Session (older than this SDK): unary calls."""

    async def __aenter__(self) -> TaskloomClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        for channel in self._channels:
            await channel.close()

    async def _call(
        self,
        pick: Callable[[Any], Callable[..., Awaitable[T]]],
        request: Any,
        *,
        repeatable: bool = False,
    ) -> T:
        """Call the supervisor that answers: on UNAVAILABLE try each other address;
        when none can be reached or none leads, try the round again for
        ``unavailable_grace`` seconds (a supervisor restarting, a standby taking
        over, a channel still in its reconnect backoff) before giving up. The
        grace counts from the first round that failed, not from the call: an
        attempt that waited long for its answer leaves it whole.

        A ``repeatable`` call (a submit: its idempotency keys make a second
        store impossible) is also tried again when its outcome is unknown -- a
        deadline, Redis away; the error it ends with is then its caller's to
        turn into ``OutcomeUnknown``."""
        deadline: float | None = None
        pause = 0.1
        doubt: TaskloomError | None = None
        """A repeatable call's first try that may have taken effect unanswered."""
        while True:
            errors: builtins.list[TaskloomError] = []
            order = [(self._current + step) % len(self._stubs) for step in range(len(self._stubs))]
            follows = 0
            while order:
                index = order.pop(0)
                try:
                    reply = await pick(self._stubs[index])(
                        request, timeout=self.settings.timeout, metadata=self._metadata
                    )
                except grpc.aio.AioRpcError as e:
                    error = from_rpc_error(e, target=self._addresses[index])
                    if not isinstance(error, Unavailable):
                        self._current = index
                        raise error from None
                    errors.append(error)
                    if doubt is None and not isinstance(error, NotLeader):
                        doubt = error
                    # A standby names the leader: go there next, at once.
                    followed = await self._follow(error, index) if follows < 2 else None
                    if followed is not None:
                        follows += 1
                        order = [followed, *(i for i in order if i != followed)]
                    continue
                self._current = index
                return reply
            # Redis being down is reported at once, unless the call is a
            # submit, which its key makes safe to repeat; a supervisor that
            # cannot be reached, or a standby, is always worth waiting for.
            waiting = repeatable or all(
                isinstance(e, SupervisorUnavailable | NotLeader) for e in errors
            )
            if deadline is None:
                deadline = time.monotonic() + self.settings.unavailable_grace
                if waiting:
                    waiting_logger.info(
                        "no leading supervisor answers at %s yet; trying for up to %gs "
                        "(TASKLOOM_UNAVAILABLE_GRACE)",
                        ", ".join(self._addresses),
                        self.settings.unavailable_grace,
                    )
            if not waiting or time.monotonic() + pause > deadline:
                last = _most_telling(errors)
                if repeatable and doubt is not None and isinstance(last, NotLeader):
                    # None leads now, but an earlier try may have been stored.
                    raise Unavailable(
                        f"{last}; an earlier try may have been stored: {doubt}"
                    ) from None
                raise last from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _stream_metadata(self) -> tuple[tuple[str, str], ...]:
        """The call's metadata, plus the current trace context: the gRPC
        instrumentation covers unary calls only, so streams carry it here and
        the supervisor's span of a watch joins the caller's trace."""
        if not tracing():
            return tuple(self._metadata)
        carried: dict[str, str] = {}
        propagate.inject(carried)
        return (*self._metadata, *carried.items())

    async def _follow(self, error: TaskloomError, index: int) -> int | None:
        """The index of the leader a standby's ``NotLeader`` names, with a
        channel opened to it if it is new; None if it names none (or the
        address it came from)."""
        if not isinstance(error, NotLeader) or not error.leader:
            return None
        if error.leader in self._addresses:
            found = self._addresses.index(error.leader)
            return None if found == index else found
        if len(self._addresses) - self._configured >= MAX_FOLLOWED:
            # Forget the oldest leader followed: leaders come and go.
            oldest = self._configured
            await self._channels.pop(oldest).close()
            del self._addresses[oldest], self._stubs[oldest]
            if self._current >= oldest:
                self._current = max(self._current - 1, 0)
            index -= index > oldest
        tls = followed_tls(self._tls, self._addresses[index])
        channel = open_channel(
            error.leader, self.settings.max_message_bytes, tls, self.settings.keepalive()
        )
        logger.debug("following the leader to %s", error.leader)
        self._addresses.append(error.leader)
        self._channels.append(channel)
        self._stubs.append(tasks_pb2_grpc.TaskServiceStub(channel))
        return len(self._stubs) - 1

    async def submit(
        self,
        goal: str,
        *,
        plan: PlanLike | None = None,
        options: TaskOptions | None = None,
        idempotency_key: str = "",
        **fields: Unpack[OptionFields],
    ) -> str:
        """Submit a goal; returns the task id as soon as the task is stored.

        Without ``plan`` the supervisor asks its LLM for one. A plan may be a
        ``Plan``, its JSON form, or a JSON string; a ``"synthesize"`` field in
        it counts unless ``synthesize`` is given.

        The task's options are ``options`` (a ``TaskOptions``) with any of its
        fields given as keywords on top (``priority=2``, ``on_failure="skip"``,
        ``max_tokens=5000``, ...; see ``TaskOptions`` for each). Every submit
        carries an idempotency key (one is made unless given), so a retried
        call never stores the task twice.
        """
        request = _submit_request(goal, plan, TaskOptions.of(options, **fields), idempotency_key)
        # On the shared Session: concurrent submits travel together.
        try:
            if self._sessionless:
                raise SessionUnsupported
            result = await self._shared().submit(request)
        except Unavailable as e:
            raise _unknown(e, request.idempotency_key) from None
        except SessionUnsupported:
            self._sessionless = True
            try:
                response: pb.SubmitTaskResponse = await self._call(
                    lambda s: s.SubmitTask, request, repeatable=True
                )
            except Unavailable as e:
                raise _unknown(e, request.idempotency_key) from None
            return response.task_id
        if result.HasField("error"):
            error = codec.error_from_pb(result.error)
            if isinstance(error, Unavailable):
                raise _unknown(error, request.idempotency_key) from None
            raise error
        return result.task_id

    def _shared(self) -> Session:
        """The Session stream ``submit`` and ``wait`` share (opened at first use)."""
        if self._session is None:
            self._session = Session(self)
        return self._session

    async def submit_many(
        self, tasks: Iterable[str | Mapping[str, Any]], **defaults: Any
    ) -> builtins.list[Submitted]:
        """Submit many tasks in few calls (SubmitTasks, 1,000 tasks a call, the
        calls concurrent): the cheap way to run thousands of small tasks.

        Each item is a goal, or a mapping of ``submit``'s arguments (``goal``,
        ``plan``, ``priority``, ...); ``defaults`` are ``submit``'s keyword
        arguments for the items that do not set them. Each task is stored or
        refused on its own: the result, in the order of ``tasks``, has its id
        or its ``error`` (the exception ``submit`` would have raised). Every
        item gets an idempotency key unless it has one, so a call retried on
        another supervisor stores nothing twice.
        """
        requests = [
            _request_of({**defaults, **({"goal": t} if isinstance(t, str) else t)}) for t in tasks
        ]
        replies = await asyncio.gather(*(self._submit_chunk(c) for c in _batches(requests)))
        return [result for reply in replies for result in reply]

    async def _submit_chunk(
        self, requests: builtins.list[pb.SubmitTaskRequest]
    ) -> builtins.list[Submitted]:
        """One SubmitTasks call; tasks refused because the supervisor was
        stepping down are sent again, as ``_call`` does with whole calls."""
        results: builtins.list[Submitted] = [Submitted() for _ in requests]
        pending = builtins.list(range(len(requests)))
        deadline: float | None = None
        pause = 0.1
        while True:
            request = pb.SubmitTasksRequest(tasks=[requests[i] for i in pending])
            try:
                reply: pb.SubmitTasksResponse = await self._call(
                    lambda s: s.SubmitTasks, request, repeatable=True
                )
            except Unavailable as e:
                for index in pending:
                    results[index] = Submitted(error=_unknown(e, requests[index].idempotency_key))
                return results
            again = []
            for index, result in zip(pending, reply.results, strict=True):
                if not result.HasField("error"):
                    results[index] = Submitted(result.task_id, result.created)
                    continue
                error = codec.error_from_pb(result.error)
                results[index] = Submitted(error=error)
                # Each task has its own key: trying it again stores it once.
                if isinstance(error, Unavailable):
                    again.append(index)
            if not again:
                return results
            if deadline is None:
                deadline = time.monotonic() + self.settings.unavailable_grace
            if time.monotonic() + pause > deadline:
                for index in again:
                    last = results[index].error
                    if isinstance(last, Unavailable):
                        key = requests[index].idempotency_key
                        results[index] = Submitted(error=_unknown(last, key))
                return results
            pending = again
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def get(self, task_id: str, *, subtasks: bool = True) -> Task:
        """The task, with its subtasks unless ``subtasks`` is False."""
        view = pb.TASK_VIEW_FULL if subtasks else pb.TASK_VIEW_SUMMARY
        response: pb.GetTaskResponse = await self._call(
            lambda s: s.GetTask, pb.GetTaskRequest(task_id=task_id, view=view)
        )
        return codec.task_from_pb(response.task)

    async def list(
        self, *, statuses: Iterable[TaskStatus] = (), limit: int = 50
    ) -> builtins.list[Task]:
        """Up to ``limit`` tasks, newest first, optionally only in some states."""
        tasks: builtins.list[Task] = []
        token = ""
        while len(tasks) < limit:
            request = pb.ListTasksRequest(
                page_size=min(limit - len(tasks), 1000),
                page_token=token,
                statuses=[codec.status_to_pb(s) for s in statuses],
            )
            response: pb.ListTasksResponse = await self._call(lambda s: s.ListTasks, request)
            tasks += [codec.task_from_pb(t) for t in response.tasks]
            token = response.next_page_token
            if not token:
                break
        return tasks

    async def cancel(self, task_id: str, reason: str = "", *, subtask_id: str = "") -> Task:
        """Cancel an unfinished task, or with ``subtask_id`` one of its subtasks
        (whose dependents are then skipped); returns the task."""
        response: pb.CancelTaskResponse = await self._call(
            lambda s: s.CancelTask,
            pb.CancelTaskRequest(task_id=task_id, reason=reason, subtask_id=subtask_id),
        )
        return codec.task_from_pb(response.task)

    # -- steering a task ----------------------------------------------------------------

    async def approve(
        self,
        task_id: str,
        *,
        subtask_id: str = "",
        plan: PlanLike | None = None,
        reason: str = "",
    ) -> Task:
        """Start a task whose plan waits for approval (submitted with
        ``approve_plan=True``), after replacing its plan with ``plan`` if given
        (checked like any explicit plan; only before any of it has run); or,
        with ``subtask_id``, let a subtask that waits for approval run."""
        request = pb.ApproveTaskRequest(task_id=task_id, subtask_id=subtask_id, reason=reason)
        if plan is not None:
            request.plan.CopyFrom(
                codec.plan_to_pb(plan if isinstance(plan, Plan) else parse_plan(plan))
            )
        response: pb.ApproveTaskResponse = await self._call(lambda s: s.ApproveTask, request)
        return codec.task_from_pb(response.task)

    async def reject(self, task_id: str, *, subtask_id: str = "", reason: str = "") -> Task:
        """End a task whose plan waits for approval (CANCELLED, with ``reason``);
        or, with ``subtask_id``, skip a waiting subtask and its dependents."""
        response: pb.RejectTaskResponse = await self._call(
            lambda s: s.RejectTask,
            pb.RejectTaskRequest(task_id=task_id, subtask_id=subtask_id, reason=reason),
        )
        return codec.task_from_pb(response.task)

    async def retry(
        self, task_id: str, subtask_id: str, *, instruction: str | None = None, reason: str = ""
    ) -> Task:
        """Run a FAILED, SKIPPED or CANCELLED subtask again, with a new
        ``instruction`` if given, and everything downstream of it; a task that
        had failed runs again."""
        request = pb.RetrySubtaskRequest(task_id=task_id, subtask_id=subtask_id, reason=reason)
        if instruction is not None:
            request.instruction = instruction
        response: pb.RetrySubtaskResponse = await self._call(lambda s: s.RetrySubtask, request)
        return codec.task_from_pb(response.task)

    async def skip(
        self, task_id: str, subtask_id: str, *, output: str = "", reason: str = ""
    ) -> Task:
        """Mark a pending, waiting or failed subtask SKIPPED with ``output``,
        which its dependents run on."""
        response: pb.SkipSubtaskResponse = await self._call(
            lambda s: s.SkipSubtask,
            pb.SkipSubtaskRequest(
                task_id=task_id, subtask_id=subtask_id, output=output, reason=reason
            ),
        )
        return codec.task_from_pb(response.task)

    async def pause(self, task_id: str, *, reason: str = "") -> Task:
        """Start nothing new of the task until it is resumed; what runs finishes."""
        response: pb.PauseTaskResponse = await self._call(
            lambda s: s.PauseTask, pb.PauseTaskRequest(task_id=task_id, reason=reason)
        )
        return codec.task_from_pb(response.task)

    async def resume(self, task_id: str, *, reason: str = "") -> Task:
        """Let a paused task go on."""
        response: pb.ResumeTaskResponse = await self._call(
            lambda s: s.ResumeTask, pb.ResumeTaskRequest(task_id=task_id, reason=reason)
        )
        return codec.task_from_pb(response.task)

    async def watch(
        self, task_id: str, *, after_event_id: str = "", terminal_only: bool = False
    ) -> AsyncGenerator[Event, None]:
        """The task's events after the cursor, then live, until its terminal event
        (with ``terminal_only``, that event alone, once the task ends).

        If the supervisor goes away the watch resumes from the last event it
        delivered, at the next address that serves (for up to
        ``reconnect_timeout``), so no event is missed or delivered twice.
        """
        cursor = after_event_id
        deadline: float | None = None
        delay = 0.2
        while True:
            stub = self._stubs[self._current]
            call = stub.WatchTask(
                pb.WatchTaskRequest(
                    task_id=task_id, after_event_id=cursor, terminal_only=terminal_only
                ),
                metadata=self._stream_metadata(),
            )
            try:
                # The supervisor ends the stream after the task's last
                # terminal event (a reopened task goes on past an earlier one).
                async for response in call:
                    deadline, delay = None, 0.2
                    for message in response.events:
                        event = codec.event_from_pb(message)
                        cursor = event.id
                        yield event
                return
            except grpc.aio.AioRpcError as e:
                deadline, delay = await self._stream_broke(e, deadline, delay)
            finally:
                call.cancel()

    async def _stream_broke(
        self,
        e: grpc.aio.AioRpcError,
        deadline: float | None,
        delay: float,
        *,
        resumable: bool = False,
    ) -> tuple[float, float]:
        """After a stream failed: raise its error unless the supervisor went
        away (or the stream is ``resumable`` whatever broke it); else move to
        the next address and pause. Returns the deadline (``reconnect_timeout``
        from the first failure) and the next pause."""
        error = from_rpc_error(e, target=self._addresses[self._current])
        # A server that stops cancels the streams it still has open:
        # from here that is the supervisor going away, not our cancel.
        gone = resumable or e.code() == grpc.StatusCode.CANCELLED
        if not (gone or isinstance(error, Unavailable)):
            raise error from None
        followed = await self._follow(error, self._current)
        if followed is not None:
            self._current = followed  # a standby named the leader: at once
            return deadline or time.monotonic() + self.settings.reconnect_timeout, delay
        self._current = (self._current + 1) % len(self._stubs)
        now = time.monotonic()
        deadline = deadline or now + self.settings.reconnect_timeout
        if now >= deadline:
            raise error from None
        await asyncio.sleep(delay)
        return deadline, min(delay * 2, 5.0)

    async def wait(self, task_id: str) -> Task:
        """Block until the task ends; returns it with its subtasks.

        Waits on the shared Session stream, whose answer carries the task as
        it ended (a task too large for one message is read with ``get``)."""
        async with contextlib.aclosing(self.finished([task_id])) as ended:
            async for task in ended:
                return task
        raise AssertionError("finished() ended without the task")  # pragma: no cover

    async def finished(self, task_ids: Iterable[str]) -> AsyncGenerator[Task, None]:
        """Each task, with its subtasks and result, as it ends (in the order
        they end), until every one has: ``wait`` for many tasks at once, on
        the shared Session stream. An unknown task, or another caller's,
        raises ``TaskNotFound``."""
        ids = builtins.list(dict.fromkeys(task_ids))
        if self._sessionless:
            async for event in self.wait_many(ids):
                yield await self.get(event.task_id)
            return
        arrived: asyncio.Queue[pb.TaskEnded | Exception] = asyncio.Queue()
        session = self._shared()
        session.listen(ids, arrived.put_nowait)
        try:
            for _ in ids:
                end = await arrived.get()
                if isinstance(end, SessionUnsupported):
                    # A supervisor older than the Session (this comes before
                    # any answer): wait for them unary.
                    self._sessionless = True
                    async for event in self.wait_many(ids):
                        yield await self.get(event.task_id)
                    return
                if isinstance(end, Exception):
                    raise end
                if end.HasField("error"):
                    raise codec.error_from_pb(end.error)
                if end.HasField("task"):
                    yield codec.task_from_pb(end.task)
                else:
                    yield await self.get(end.task_id)
        finally:
            for task_id in ids:
                session.forget(task_id, arrived.put_nowait)

    async def wait_many(self, task_ids: Iterable[str]) -> AsyncGenerator[Event, None]:
        """Each task's terminal event as the task ends, until every one has
        ended (WaitTasks: 10,000 tasks a stream, the streams concurrent).

        If the supervisor goes away, the tasks not heard of yet are waited for
        again at the next address that serves (for up to
        ``reconnect_timeout``); each event comes once. An unknown task, or
        another caller's, raises ``TaskNotFound``.
        """
        ids = builtins.list(dict.fromkeys(task_ids))
        chunks = [ids[i : i + WAIT_BATCH] for i in range(0, len(ids), WAIT_BATCH)]
        arrived: asyncio.Queue[Event | Exception | None] = asyncio.Queue()

        async def pump(chunk: builtins.list[str]) -> None:
            try:
                async for event in self._wait_chunk(chunk):
                    arrived.put_nowait(event)
                arrived.put_nowait(None)
            except Exception as e:  # raised to the caller, below
                arrived.put_nowait(e)

        pumps = [asyncio.create_task(pump(c)) for c in chunks]
        try:
            running = len(pumps)
            while running:
                item = await arrived.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    running -= 1
                else:
                    yield item
        finally:
            for task in pumps:
                task.cancel()

    async def _wait_chunk(self, task_ids: builtins.list[str]) -> AsyncGenerator[Event, None]:
        left = dict.fromkeys(task_ids)
        deadline: float | None = None
        delay = 0.2
        while left:
            call = self._stubs[self._current].WaitTasks(
                pb.WaitTasksRequest(task_ids=builtins.list(left)), metadata=self._stream_metadata()
            )
            try:
                async for response in call:
                    deadline, delay = None, 0.2
                    for message in response.events:
                        if message.task_id in left:
                            del left[message.task_id]
                            yield codec.event_from_pb(message)
            except grpc.aio.AioRpcError as e:
                deadline, delay = await self._stream_broke(e, deadline, delay)
            finally:
                call.cancel()


def _batches(
    requests: builtins.list[pb.SubmitTaskRequest],
) -> builtins.list[builtins.list[pb.SubmitTaskRequest]]:
    """``requests`` cut into SubmitTasks calls of at most SUBMIT_BATCH tasks
    and SUBMIT_BYTES (a larger task goes alone)."""
    batches: builtins.list[builtins.list[pb.SubmitTaskRequest]] = []
    size = 0
    for request in requests:
        n = request.ByteSize()
        if not batches or len(batches[-1]) >= SUBMIT_BATCH or size + n > SUBMIT_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(request)
        size += n
    return batches


def _submit_request(
    goal: str, plan: PlanLike | None, options: TaskOptions, idempotency_key: str
) -> pb.SubmitTaskRequest:
    """A submit's arguments as a request."""
    # A key of our own makes the call safe to retry on another supervisor:
    # if the first one stored the task before it went away, the retry
    # finds that task instead of creating a second.
    request = pb.SubmitTaskRequest(goal=goal, idempotency_key=idempotency_key or uuid.uuid4().hex)
    if plan is not None:
        parsed = plan if isinstance(plan, Plan) else parse_plan(plan)
        request.plan.CopyFrom(codec.plan_to_pb(parsed))
        if options.synthesize is None and parsed.synthesize is not None:
            options = replace(options, synthesize=parsed.synthesize)
    request.options.CopyFrom(codec.options_to_pb(options))
    return request


SUBMIT_ARGUMENTS = frozenset({"goal", "plan", "options", "idempotency_key"}) | frozenset(
    OptionFields.__annotations__
)
"""What one item of ``submit_many`` may set: ``submit``'s arguments."""


def _request_of(item: Mapping[str, Any]) -> pb.SubmitTaskRequest:
    """One item of ``submit_many`` (``submit``'s arguments) as a request."""
    fields = dict(item)
    unknown = sorted(set(fields) - SUBMIT_ARGUMENTS)
    if unknown:
        raise InvalidArgument(
            f"unknown argument {unknown[0]!r}; an item takes " + ", ".join(sorted(SUBMIT_ARGUMENTS))
        )
    goal = fields.pop("goal", None)
    if not isinstance(goal, str):
        raise InvalidArgument('each item needs a "goal"', field="goal")
    plan = fields.pop("plan", None)
    base = fields.pop("options", None)
    key = fields.pop("idempotency_key", "")
    return _submit_request(goal, plan, TaskOptions.of(base, **fields), key)


def _unknown(error: Unavailable, key: str) -> Unavailable:
    """What a submit that got no trustworthy answer raises: ``OutcomeUnknown``
    (safe to repeat with ``key``), unless nothing could have been stored: every
    try was refused by a standby, or fenced (``NotLeader``). After a try that
    may have been stored, the callers raise a plain ``Unavailable`` instead."""
    if isinstance(error, NotLeader | OutcomeUnknown):
        return error
    return OutcomeUnknown(str(error), key)


def _most_telling(errors: builtins.list[TaskloomError]) -> TaskloomError:
    """Of the errors from each address, the one that says most: the leader's own
    (say, Redis is down), else a standby's (it names the leader), else unreachable."""

    def rank(error: TaskloomError) -> int:
        return 2 if isinstance(error, SupervisorUnavailable) else int(isinstance(error, NotLeader))

    return sorted(errors, key=rank)[0]


class SyncTaskloomClient:
    """The same client without ``await``, for scripts and notebooks.

    It runs an event loop on a background thread; close it (or use ``with``).
    """

    def __init__(
        self, address: str | None = None, *, settings: ClientSettings | None = None
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> TaskloomClient:
            return TaskloomClient(address, settings=settings)

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(
        self,
        goal: str,
        *,
        plan: PlanLike | None = None,
        options: TaskOptions | None = None,
        idempotency_key: str = "",
        **fields: Unpack[OptionFields],
    ) -> str:
        return self._run(
            self._client.submit(
                goal, plan=plan, options=options, idempotency_key=idempotency_key, **fields
            )
        )

    def submit_many(
        self, tasks: Iterable[str | Mapping[str, Any]], **defaults: Any
    ) -> builtins.list[Submitted]:
        return self._run(self._client.submit_many(tasks, **defaults))

    def get(self, task_id: str, *, subtasks: bool = True) -> Task:
        return self._run(self._client.get(task_id, subtasks=subtasks))

    def list(self, *, statuses: Iterable[TaskStatus] = (), limit: int = 50) -> builtins.list[Task]:
        return self._run(self._client.list(statuses=statuses, limit=limit))

    def cancel(self, task_id: str, reason: str = "", *, subtask_id: str = "") -> Task:
        return self._run(self._client.cancel(task_id, reason, subtask_id=subtask_id))

    def approve(
        self,
        task_id: str,
        *,
        subtask_id: str = "",
        plan: PlanLike | None = None,
        reason: str = "",
    ) -> Task:
        return self._run(
            self._client.approve(task_id, subtask_id=subtask_id, plan=plan, reason=reason)
        )

    def reject(self, task_id: str, *, subtask_id: str = "", reason: str = "") -> Task:
        return self._run(self._client.reject(task_id, subtask_id=subtask_id, reason=reason))

    def retry(
        self, task_id: str, subtask_id: str, *, instruction: str | None = None, reason: str = ""
    ) -> Task:
        return self._run(
            self._client.retry(task_id, subtask_id, instruction=instruction, reason=reason)
        )

    def skip(self, task_id: str, subtask_id: str, *, output: str = "", reason: str = "") -> Task:
        return self._run(self._client.skip(task_id, subtask_id, output=output, reason=reason))

    def pause(self, task_id: str, *, reason: str = "") -> Task:
        return self._run(self._client.pause(task_id, reason=reason))

    def resume(self, task_id: str, *, reason: str = "") -> Task:
        return self._run(self._client.resume(task_id, reason=reason))

    def watch(self, task_id: str, *, after_event_id: str = "") -> Iterator[Event]:
        return self._iterate(self._client.watch(task_id, after_event_id=after_event_id))

    def wait_many(self, task_ids: Iterable[str]) -> Iterator[Event]:
        return self._iterate(self._client.wait_many(task_ids))

    def finished(self, task_ids: Iterable[str]) -> Iterator[Task]:
        return self._iterate(self._client.finished(task_ids))

    def _iterate(self, events: AsyncGenerator[T, None]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(anext(events))
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())

    def wait(self, task_id: str) -> Task:
        return self._run(self._client.wait(task_id))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncTaskloomClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
