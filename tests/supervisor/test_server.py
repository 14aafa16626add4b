"""The supervisor's gRPC surface: health, reflection, worker-stream protocol, Redis outages."""

from __future__ import annotations

import asyncio
import functools
import re
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from taskloom.client import TaskloomClient
from taskloom.core.errors import ConfigError, NotLeader, OutcomeUnknown, StoreUnavailable
from taskloom.core.localredis import LocalRedis, free_port
from taskloom.core.model import Assignment, AttemptRef, TaskStatus, WorkerInfo
from taskloom.supervisor import server
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.scheduler import (
    AckReports,
    AssignBatch,
    CancelAttempts,
    HeartbeatAck,
    WorkerSession,
)
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.v1 import workers_pb2 as wpb
from taskloom.v1 import workers_pb2_grpc
from tests.conftest import Processes
from tests.helpers import eventually, plan


async def test_health_and_reflection_are_served(supervisor: Supervisor) -> None:
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "taskloom.v1.TaskService", "taskloom.v1.WorkerService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {"taskloom.v1.TaskService", "taskloom.v1.WorkerService"} <= names


async def _connect(supervisor: Supervisor, *frames: wpb.ConnectRequest) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        call = workers_pb2_grpc.WorkerServiceStub(channel).Connect()
        for frame in frames:
            await call.write(frame)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                if await call.read() is grpc.aio.EOF:
                    break
        return caught.value


def _hello(**fields: object) -> wpb.ConnectRequest:
    defaults: dict[str, object] = {"worker_id": "w", "capabilities": ["echo"], "max_concurrency": 1}
    return wpb.ConnectRequest(hello=wpb.Hello(**(defaults | fields)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ((wpb.ConnectRequest(heartbeat=wpb.Heartbeat()),), "must start with Hello"),
        ((_hello(capabilities=[]),), "Hello lists no capabilities"),
        ((_hello(worker_id=""),), "Hello needs a worker_id"),
        ((_hello(max_concurrency=0),), "max_concurrency must be between 1 and 10000"),
        ((_hello(), _hello()), "Hello may only be sent once per stream"),
        ((_hello(labels={"gpu": "yes, two"}),), "each key and value 1-64 letters"),
    ],
)
async def test_a_malformed_worker_stream_is_refused_with_the_reason(
    supervisor: Supervisor, frames: tuple[wpb.ConnectRequest, ...], message: str
) -> None:
    error = await _connect(supervisor, *frames)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")


async def test_a_worker_that_never_says_hello_is_closed(
    supervisor_settings: SupervisorSettings,
) -> None:
    settings = supervisor_settings.model_copy(update={"hello_timeout": 0.2})
    async with Supervisor(settings) as supervisor:
        error = await _connect(supervisor)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no Hello within 0.2s" in (error.details() or "")


async def test_a_supervisor_without_redis_says_so_at_start(
    supervisor_settings: SupervisorSettings,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    settings = supervisor_settings.model_copy(update={"redis_url": url})
    with pytest.raises(StoreUnavailable, match=rf"Redis at {url} is unavailable"):
        await Supervisor(settings).start()


@pytest.mark.parametrize("unary", [False, True], ids=["session", "unary"])
async def test_while_redis_is_down_calls_fail_fast_and_work_resumes_when_it_returns(
    supervisor_settings: SupervisorSettings, tmp_path: Path, processes: Processes, unary: bool
) -> None:
    redis = LocalRedis(tmp_path / "redis")
    redis.start()
    settings = supervisor_settings.model_copy(update={"redis_url": redis.url})
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        # unary: submit as against a supervisor older than the Session stream.
        client._sessionless = unary
        processes.worker(supervisor.address)
        done = await client.wait(await client.submit("before", plan=plan(("a", "echo", "1"))))
        assert done.status == TaskStatus.SUCCEEDED

        redis.kill()
        for call in (client.get(done.id), client.list()):
            with pytest.raises(StoreUnavailable, match=r"Redis at .* is unavailable"):
                await asyncio.wait_for(call, 30)
        # A submit is safe to repeat (its idempotency key), so the SDK tries it
        # for its grace period, then says the outcome is unknown -- even if the
        # supervisor stepped down meanwhile (its lease lapsed) and the last try
        # found none leading: an earlier try reached the leader.
        with pytest.raises(OutcomeUnknown) as raised:
            await asyncio.wait_for(client.submit("during", plan=plan(("a", "echo", "1"))), 30)
        assert raised.value.idempotency_key
        assert re.search(r"Redis at|standby|leader lease", str(raised.value)), raised.value

        with LocalRedis(tmp_path / "redis", port=redis.port):
            # If the outage outlasted its leader lease the supervisor stepped
            # down; it leads again within a third of the lease.
            async def readable() -> bool:
                try:
                    return (await client.get(done.id)).status == TaskStatus.SUCCEEDED
                except NotLeader:
                    return False

            assert await eventually(readable, timeout=10)
            task = await client.wait(await client.submit("after", plan=plan(("b", "echo", "2"))))
            assert (task.status, task.result) == (TaskStatus.SUCCEEDED, "2")


async def test_a_port_in_use_is_a_clear_configuration_error(
    supervisor_settings: SupervisorSettings,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        server = Supervisor(supervisor_settings.model_copy(update={"listen": address}))
        with pytest.raises(ConfigError, match=f"cannot listen on {address}: .*another process"):
            await server.start()
        await server.stop(grace=0)


class _Sent:
    """A stream's write side, keeping what was written (a pure unit test of
    how ``_send`` merges a session's messages)."""

    def __init__(self) -> None:
        self.messages: list[wpb.ConnectResponse] = []

    async def write(self, message: wpb.ConnectResponse) -> None:
        self.messages.append(message)


def _acks(message: wpb.ConnectResponse) -> list[str]:
    assert message.HasField("ack"), message
    return [r.subtask_id for r in message.ack.refs]


async def test_acknowledgements_wait_to_go_together_and_assignments_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "ACK_DELAY", 3600.0)
    session = WorkerSession(WorkerInfo("w", "w", frozenset({"echo"}), 4), 0.0)
    sent = _Sent()
    ref = functools.partial(AttemptRef, "t")
    work = Assignment("t", "x", 1, "echo", "", "do", "g")
    for message in (AckReports((ref("a", 1),)), HeartbeatAck(), AssignBatch((work,))):
        session.send(message)
    sending = asyncio.create_task(server._send(session, sent))  # type: ignore[arg-type]
    try:
        # The assignment goes at once; the acknowledgements wait.
        await eventually(lambda: len(sent.messages) >= 1)
        assert sent.messages[0].HasField("assign")
        session.send(AckReports((ref("b", 1), ref("c", 2))))
        await asyncio.sleep(0.1)
        assert len(sent.messages) == 1
        # A cancel takes them with it, all in one Ack, first.
        session.send(CancelAttempts((ref("x", 1),), "stop"))
        await eventually(lambda: len(sent.messages) >= 3)
        assert _acks(sent.messages[1]) == ["a", "b", "c"]
        assert sent.messages[2].HasField("cancel")
        # Alone, they go when their time is up.
        monkeypatch.setattr(server, "ACK_DELAY", 0.01)
        session.send(AckReports((ref("d", 1),)))
        await eventually(lambda: len(sent.messages) >= 4)
        assert _acks(sent.messages[3]) == ["d"]
        # A close takes what waits with it.
        monkeypatch.setattr(server, "ACK_DELAY", 3600.0)
        session.send(AckReports((ref("e", 1),)))
        session.close()
        await asyncio.wait_for(sending, 5)
        assert len(sent.messages) == 5 and _acks(sent.messages[4]) == ["e"]
    finally:
        sending.cancel()
