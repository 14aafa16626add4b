"""One tenant cannot hurt the others: what a worker may add to a task's log
is capped (a progress message, a streamed piece, a subtask's whole stream,
a worker's rate), and watching any task's log goes in messages of bounded
size. Raw gRPC streams play the hostile worker, as an attacker would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from taskloom.client import TaskloomClient
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.server import FRAME_BYTES
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import tasks_pb2_grpc, workers_pb2_grpc
from taskloom.v1 import workers_pb2 as wpb
from tests.conftest import Processes, stop_or_explain
from tests.helpers import eventually, plan, wait_status

MIB = 1024 * 1024


@pytest.fixture
async def capped(supervisor_settings: SupervisorSettings) -> AsyncIterator[Supervisor]:
    server = Supervisor(
        supervisor_settings.model_copy(
            update={"max_stream_bytes": 256 * 1024, "max_progress_rate": 20.0}
        )
    )
    await server.start()
    yield server
    await stop_or_explain(server)


async def held_attempt(
    server: Supervisor, client: TaskloomClient
) -> tuple[Any, wpb.AttemptRef, str]:
    """A raw worker stream holding the one attempt of a new task."""
    channel = grpc.aio.insecure_channel(
        server.address, options=[("grpc.max_send_message_length", 8 * MIB)]
    )
    stream: Any = workers_pb2_grpc.WorkerServiceStub(channel).Connect()
    await stream.write(
        wpb.ConnectRequest(
            hello=wpb.Hello(worker_id="raw", capabilities=["gate"], max_concurrency=1)
        )
    )
    assert (await stream.read()).HasField("welcome")
    task_id = await client.submit("noisy", plan=plan(("a", "gate", "x")))
    given = (await stream.read()).assign.assignments[0]
    ref = wpb.AttemptRef(task_id=given.task_id, subtask_id=given.subtask_id, attempt=given.attempt)
    return stream, ref, task_id


def progress(ref: wpb.AttemptRef, *, message: str = "", text: str = "", n: int = 1) -> Any:
    update = wpb.ProgressUpdate(ref=ref, message=message, text=text)
    return wpb.ConnectRequest(progress=wpb.Progress(updates=[update] * n))


def done(ref: wpb.AttemptRef, output: str = "done") -> Any:
    return wpb.ConnectRequest(
        completed=wpb.Completed(results=[wpb.SubtaskResult(ref=ref, output=output)])
    )


async def test_huge_progress_and_stream_text_are_cut_and_the_log_stays_watchable(
    capped: Supervisor,
) -> None:
    async with TaskloomClient(capped.address) as client:
        stream, ref, task_id = await held_attempt(capped, client)
        huge = "x" * MIB
        for _ in range(8):
            await stream.write(progress(ref, message=huge))
            await stream.write(progress(ref, text=huge))
        await stream.write(done(ref))
        task = await wait_status(client, task_id, TaskStatus.SUCCEEDED)
        assert task.result == "done"
        stream.cancel()

        events = [e async for e in client.watch(task_id)]
        said = [e.message for e in events if e.type == "subtask.progress"]
        streamed = [e.message for e in events if e.type == "subtask.output"]
        assert len(said) == 8 and all(len(m.encode()) <= 4096 for m in said)
        assert all("cut to 4,096 of 1,048,576 bytes" in m for m in said)
        # 64 KiB pieces until the subtask's 256 KiB budget, then one marker.
        assert sum(len(m.encode()) for m in streamed[:-1]) <= 256 * 1024
        assert "stream cut" in streamed[-1] and "TASKLOOM_MAX_STREAM_BYTES" in streamed[-1]
        cut = capped.metrics.registry.get_sample_value
        assert cut("taskloom_progress_cut_total", {"reason": "message"}) == 8
        assert cut("taskloom_progress_cut_total", {"reason": "chunk"}) == 8


async def test_a_worker_over_its_progress_rate_loses_the_excess(capped: Supervisor) -> None:
    async with TaskloomClient(capped.address) as client:
        stream, ref, task_id = await held_attempt(capped, client)
        # 2,000 updates in one message: one slot at 20 a second may burst 40.
        await stream.write(progress(ref, message="tick", n=2000))
        await stream.write(progress(ref, message="last"))  # sent at once, over the rate too
        registry = capped.metrics.registry

        def dropped() -> float:
            return registry.get_sample_value("taskloom_progress_cut_total", {"reason": "rate"}) or 0

        await eventually(lambda: dropped() >= 1960)
        await stream.write(done(ref))
        await wait_status(client, task_id, TaskStatus.SUCCEEDED)
        stream.cancel()
        events = [e async for e in client.watch(task_id) if e.type == "subtask.progress"]
        assert 40 <= len(events) <= 41


async def test_watching_a_big_log_goes_in_messages_of_bounded_size(
    supervisor_settings: SupervisorSettings,
) -> None:
    server = Supervisor(
        supervisor_settings.model_copy(
            update={"max_stream_bytes": 64 * MIB, "max_progress_rate": 1000.0}
        )
    )
    await server.start()
    try:
        async with TaskloomClient(server.address) as client:
            stream, ref, task_id = await held_attempt(server, client)
            piece = "y" * (60 * 1024)
            for _ in range(10):
                await stream.write(progress(ref, text=piece, n=20))  # 12 MB of log in all
            await stream.write(done(ref, "ok"))
            await wait_status(client, task_id, TaskStatus.SUCCEEDED)
            stream.cancel()
        async with grpc.aio.insecure_channel(server.address) as channel:
            replies = tasks_pb2_grpc.TaskServiceStub(channel).WatchTask(
                pb.WatchTaskRequest(task_id=task_id)
            )
            sizes, outputs = [], 0
            async for reply in replies:
                sizes.append(reply.ByteSize())
                outputs += sum(1 for e in reply.events if e.type == "subtask.output")
        assert outputs == 200
        assert max(sizes) <= FRAME_BYTES + 64 * 1024, sizes
        assert len(sizes) >= 12
    finally:
        await stop_or_explain(server)


async def test_many_assignments_of_a_large_goal_reach_a_worker_in_frames_it_accepts(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    # 200 subtasks of a goal of 20,000 four-byte characters: 16 MB of
    # assignments, ready at once, for a worker that accepts 2 MiB a message.
    processes.worker(
        supervisor.address,
        capabilities="echo",
        concurrency=200,
        env={"TASKLOOM_MAX_MESSAGE_BYTES": str(2 * MIB)},
    )
    steps = plan(*((f"s{i}", "echo", f"step {i}") for i in range(200)))
    task_id = await client.submit("\U0001d11e" * 20_000, plan=steps)
    task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED, timeout=120)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert all(s.attempt == 1 for s in task.subtasks)
    assert "RESOURCE_EXHAUSTED" not in processes.log("worker-1")
