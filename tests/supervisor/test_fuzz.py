"""Property-based fuzzing of the supervisor over real gRPC.

Every request type is built by hypothesis from its protobuf descriptor (every
field, nested messages, maps, enums with unknown values, huge strings, ids of
real tasks mixed with made-up ones), and so are worker-stream message
sequences (out of order, duplicated, stale attempts, unknown ids). Whatever
comes in, the supervisor answers with a status other than UNKNOWN or INTERNAL,
keeps serving, and leaves alone the subtask an honest worker holds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskloom.client import TaskloomClient
from taskloom.core.model import SubtaskStatus, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import tasks_pb2_grpc, workers_pb2_grpc
from taskloom.v1 import workers_pb2 as wpb
from tests.helpers import plan

BROKEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
HUGE = "x" * 300_000
LOCAL_WRITE_FAILURE = "Internal error from Core"
EXAMPLES = int(os.environ.get("TASKLOOM_FUZZ_EXAMPLES", "60"))
"""Examples per test: 60 in CI; ``make fuzz N=2000`` for a long search."""
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def messages(cls: type[Message], strings: Sequence[str], depth: int = 0) -> st.SearchStrategy[Any]:
    """Any message of type ``cls``: each field set or not, with hostile values."""
    text = st.one_of(st.sampled_from(list(strings)), st.text(max_size=30), st.just(HUGE))
    descriptor: Any = cls.DESCRIPTOR
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        value = _field(field, text, strings, depth)
        if value is not None:
            fields[field.name] = value
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls, values))


def _field(
    field: FieldDescriptor, text: st.SearchStrategy[str], strings: Sequence[str], depth: int
) -> st.SearchStrategy[Any] | None:
    message_type = field.message_type
    if message_type is not None and message_type.GetOptions().map_entry:
        return st.dictionaries(text, text, max_size=3)
    one: st.SearchStrategy[Any]
    if message_type is not None:
        if depth >= 3:
            return None
        one = messages(message_type._concrete_class, strings, depth + 1)  # type: ignore[attr-defined]
    elif field.type == FieldDescriptor.TYPE_STRING:
        one = text
    elif field.type == FieldDescriptor.TYPE_BYTES:
        one = st.binary(max_size=64)
    elif field.type == FieldDescriptor.TYPE_BOOL:
        one = st.booleans()
    elif field.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values] if field.enum_type else [0]
        one = st.one_of(st.sampled_from(known), st.integers(-5, 1000))
    elif field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        one = st.floats(allow_nan=True, allow_infinity=True, width=32)
    else:
        low, high = _INT_RANGES.get(field.type, (-(2**31), 2**31 - 1))
        one = st.one_of(st.integers(-3, 5), st.integers(low, high))
    if field.is_repeated:
        return st.lists(one, max_size=4)
    return one


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target.update(value)
        elif field.is_repeated:
            if field.message_type is not None:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


async def serving(supervisor: Supervisor) -> bool:
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Held:
    """A task whose one subtask an honest worker holds on a raw stream."""

    def __init__(self, task_id: str, ref: wpb.AttemptRef, call: Any) -> None:
        self.task_id = task_id
        self.ref = ref
        self.call = call

    @property
    def strings(self) -> list[str]:
        return [
            self.task_id, "a", "synthesize", "honest-twin", "", "0-0", "1700000000000-0",
            "18446744073709551615-18446744073709551615",  # the last id a stream can have
            base64.urlsafe_b64encode(b"nan:x").decode(),  # page tokens of the wrong kind
            base64.urlsafe_b64encode(b"inf:" + self.task_id.encode()).decode(),
        ]  # fmt: skip


@pytest.fixture
async def held(supervisor: Supervisor, client: TaskloomClient) -> AsyncIterator[Held]:
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        call = workers_pb2_grpc.WorkerServiceStub(channel).Connect()
        await call.write(
            wpb.ConnectRequest(
                hello=wpb.Hello(worker_id="honest", capabilities=["gate"], max_concurrency=1)
            )
        )
        welcome: Any = await call.read()
        assert welcome.HasField("welcome")
        task_id = await client.submit("hold this", plan=plan(("a", "gate", "wait")))
        assigned: Any = await call.read()
        given = assigned.assign.assignments[0]
        ref = wpb.AttemptRef(
            task_id=given.task_id, subtask_id=given.subtask_id, attempt=given.attempt
        )
        await call.write(wpb.ConnectRequest(accepted=wpb.Accepted(refs=[ref])))

        async def beat() -> None:
            while True:
                await call.write(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(running=1)))
                await asyncio.sleep(0.3)

        beating = asyncio.create_task(beat())
        yield Held(task_id, ref, call)
        beating.cancel()
        call.cancel()


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the supervisor logged as its own failure (an exception it did not expect)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("taskloom.supervisor")
    ]


async def untouched(client: TaskloomClient, held: Held) -> None:
    task = await client.get(held.task_id)
    assert task.status == TaskStatus.RUNNING
    (sub,) = [s for s in task.subtasks if s.id == "a"]
    assert sub.status in (SubtaskStatus.ASSIGNED, SubtaskStatus.RUNNING)
    assert sub.attempt == held.ref.attempt
    assert sub.output == ""


_SERVICE: Any = pb.DESCRIPTOR.services_by_name["TaskService"]
_REQUESTS = st.sampled_from(
    [
        # every RPC of TaskService, and whether it streams requests and answers
        (m.name, m.input_type._concrete_class, m.client_streaming, m.server_streaming)
        for m in _SERVICE.methods
    ]
)
WITNESS_SAFE = {"GetTask", "ListTasks", "WatchTask", "WaitTasks", "SubmitTask", "SubmitTasks"}
"""Calls that may name the witness task: they leave it as it is."""
MAX_DETAILS = 2_000
"""What an error may say at most, however large the request it echoes."""


@FUZZ
@given(data=st.data())
async def test_any_request_gets_a_status_and_the_supervisor_keeps_serving(
    supervisor: Supervisor,
    client: TaskloomClient,
    held: Held,
    data: st.DataObject,
    caplog: pytest.LogCaptureFixture,
) -> None:
    method, cls, sending, streaming = data.draw(_REQUESTS)
    request = data.draw(messages(cls, [*held.strings, "llm", "gate", "echo"]))
    if getattr(request, "task_id", None) == held.task_id and method not in WITNESS_SAFE:
        request.task_id += "-not"  # changing it is allowed; it is the witness here
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        try:
            if streaming:
                sent = iter([request]) if sending else request  # a Session: one message
                async for _ in getattr(stub, method)(sent, timeout=0.5):
                    pass
            else:
                await getattr(stub, method)(request, timeout=30)
        except grpc.aio.AioRpcError as e:
            answer: tuple[grpc.StatusCode, str] = (e.code(), e.details() or "")
        else:
            answer = (grpc.StatusCode.OK, "ok")
    if streaming and answer[0] == grpc.StatusCode.DEADLINE_EXCEEDED:
        answer = (answer[0], answer[1] or "still following")
    assert answer[0] not in BROKEN, f"{method}: {answer}"
    assert answer[1], f"{method}: {answer[0]} without a message"
    assert len(answer[1]) <= MAX_DETAILS, f"{method} echoed {len(answer[1]):,} characters"
    assert await serving(supervisor)
    await untouched(client, held)
    assert not failures(caplog)


@settings(FUZZ, max_examples=max(1, EXAMPLES * 2 // 3))
@given(data=st.data())
async def test_any_worker_stream_is_answered_and_changes_nothing_it_does_not_hold(
    supervisor: Supervisor,
    client: TaskloomClient,
    held: Held,
    data: st.DataObject,
    caplog: pytest.LogCaptureFixture,
) -> None:
    strings = held.strings
    refs = st.one_of(
        st.just(held.ref),
        st.builds(
            wpb.AttemptRef,
            task_id=st.sampled_from(strings),
            subtask_id=st.sampled_from(strings),
            attempt=st.integers(-1, 3),
        ),
    )
    hello = st.builds(
        wpb.Hello,
        worker_id=st.sampled_from(["fuzzer", "", "honest-twin", HUGE]),
        capabilities=st.lists(st.sampled_from(["gate", "llm", "", HUGE]), max_size=3),
        max_concurrency=st.integers(-1, 20_000),
        in_flight=st.lists(refs, max_size=3),
    )
    report = st.one_of(
        st.builds(lambda h: wpb.ConnectRequest(hello=h), hello),
        st.builds(
            lambda r, running, draining: wpb.ConnectRequest(
                heartbeat=wpb.Heartbeat(running=running, draining=draining)
            ),
            refs,
            st.integers(-5, 5),
            st.booleans(),
        ),
        st.builds(lambda r: wpb.ConnectRequest(accepted=wpb.Accepted(refs=r)), st.lists(refs)),
        st.builds(
            lambda r, m, t: wpb.ConnectRequest(
                progress=wpb.Progress(updates=[wpb.ProgressUpdate(ref=r, message=m, text=t)])
            ),
            refs,
            st.text(max_size=20),
            st.sampled_from(["", "tok", HUGE]),
        ),
        st.builds(
            lambda r, o: wpb.ConnectRequest(
                completed=wpb.Completed(results=[wpb.SubtaskResult(ref=r, output=o)])
            ),
            refs,
            st.sampled_from(["forged", HUGE, ""]),
        ),
        st.builds(
            lambda r, retry: wpb.ConnectRequest(
                failed=wpb.Failed(
                    failures=[wpb.SubtaskFailure(ref=r, error="forged", retryable=retry)]
                )
            ),
            refs,
            st.booleans(),
        ),
        st.builds(lambda r: wpb.ConnectRequest(stopped=wpb.Stopped(refs=r)), st.lists(refs)),
        messages(wpb.ConnectRequest, strings),
    )
    first = data.draw(st.one_of(st.builds(lambda h: wpb.ConnectRequest(hello=h), hello), report))
    sequence = [first, *data.draw(st.lists(report, max_size=6))]
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        call = workers_pb2_grpc.WorkerServiceStub(channel).Connect()
        try:
            try:
                for message in sequence:
                    await call.write(message)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the supervisor ended the stream; its status says why
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                async with asyncio.timeout(2):
                    while await call.read() is not grpc.aio.EOF:
                        pass
            if call.done():
                code, details = await call.code(), await call.details()
                # A write that races the supervisor's close fails in the client's
                # own gRPC core with this; it is not an answer from the server.
                if details != LOCAL_WRITE_FAILURE:
                    assert code not in BROKEN, f"{code} {details}"
        finally:
            call.cancel()
    assert await serving(supervisor)
    await untouched(client, held)
    assert not failures(caplog)
