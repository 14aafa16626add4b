"""A worker's reports are written to Redis together when they come faster
than Redis writes them (group commit): a slow fsync makes the writes bigger,
not the queue longer. A real supervisor, a real Redis held back with CLIENT
PAUSE, and a worker speaking the wire protocol by hand."""

from __future__ import annotations

from typing import Any

import grpc
import redis.asyncio as aioredis

from taskloom.client import TaskloomClient
from taskloom.core.localredis import LocalRedis
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.v1 import workers_pb2 as wpb
from taskloom.v1 import workers_pb2_grpc
from tests.helpers import plan, wait_status

N = 6


def _writes(supervisor: Supervisor, operation: str) -> float:
    value = supervisor.metrics.registry.get_sample_value(
        "taskloom_redis_operation_duration_seconds_count", {"operation": operation}
    )
    return value or 0.0


async def _acked(stream: Any) -> list[wpb.AttemptRef]:
    """The refs of the next Ack on ``stream`` (assignments before it are skipped)."""
    while True:
        message = await stream.read()
        assert message is not grpc.aio.EOF
        if message.HasField("ack"):
            return list(message.ack.refs)


async def test_reports_that_arrive_during_a_write_are_written_together(
    supervisor: Supervisor, client: TaskloomClient, redis_server: LocalRedis
) -> None:
    subtasks = [(f"s{i}", "echo", str(i)) for i in range(N)]
    raw = aioredis.Redis.from_url(redis_server.url)
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        stream: Any = workers_pb2_grpc.WorkerServiceStub(channel).Connect()
        hello = wpb.Hello(worker_id="by-hand", capabilities=["echo"], max_concurrency=N)
        await stream.write(wpb.ConnectRequest(hello=hello))
        assert (await stream.read()).HasField("welcome")
        task_id = await client.submit("together", plan=plan(*subtasks))
        given: list[wpb.Assignment] = []
        while len(given) < N:
            message = await stream.read()
            given += message.assign.assignments
        refs = [
            wpb.AttemptRef(task_id=a.task_id, subtask_id=a.subtask_id, attempt=a.attempt)
            for a in given
        ]
        before = _writes(supervisor, "complete")
        try:
            # Redis holds every script: the first report's write waits there
            # while the others arrive, one message each.
            await raw.client_pause(30_000, all=False)
            for ref in refs:
                result = wpb.SubtaskResult(ref=ref, output=f"out-{ref.subtask_id}")
                await stream.write(wpb.ConnectRequest(completed=wpb.Completed(results=[result])))
            # A heartbeat is answered as it is read: once its Ack is here,
            # every report before it has been read, and none written.
            await stream.write(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(running=N)))
            assert await _acked(stream) == []
        finally:
            await raw.client_unpause()
            await raw.aclose()
        acked: list[wpb.AttemptRef] = []
        while len(acked) < N:
            acked += await _acked(stream)
        stream.cancel()
    assert sorted(r.subtask_id for r in acked) == sorted(r.subtask_id for r in refs)
    # The first message alone, then the five that came during its write.
    assert _writes(supervisor, "complete") - before == 2
    task = await wait_status(client, task_id, TaskStatus.SUCCEEDED)
    assert {s.id: s.output for s in task.subtasks} == {f"s{i}": f"out-s{i}" for i in range(N)}
