"""The Session stream that the SDK's submit() and wait() share: a real
supervisor, Redis and worker processes, and the raw stream for bad input."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from taskloom.client import TaskloomClient
from taskloom.core.errors import ResourceExhausted, TaskNotFound
from taskloom.core.model import Task, TaskStatus
from taskloom.supervisor import sessions
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import tasks_pb2_grpc
from tests.conftest import Processes
from tests.helpers import eventually, plan
from tests.test_metrics import scrape, value


async def test_concurrent_submits_and_waits_share_one_stream_and_need_no_reads(
    supervisor_settings: SupervisorSettings, processes: Processes
) -> None:
    """200 coroutines, each submitting a task and waiting for it: one Session
    stream carries them all, each wait returns the task with its result and
    subtasks, and no GetTask, SubmitTask or WatchTask call is made."""
    settings = supervisor_settings.model_copy(update={"metrics_port": 0})
    async with Supervisor(settings, metrics=SupervisorMetrics(CollectorRegistry())) as supervisor:
        processes.worker(supervisor.address, capabilities="echo")
        async with TaskloomClient(supervisor.address) as client:

            async def one(i: int) -> None:
                task = await client.wait(
                    await client.submit(f"echo {i}", plan=plan(("a", "echo", f"n{i}")))
                )
                assert task.status == TaskStatus.SUCCEEDED, task.error
                assert task.result == f"n{i}"
                ((subtask,),) = [task.subtasks]
                assert (subtask.id, subtask.output, subtask.attempt) == ("a", f"n{i}", 1)

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 120)
        text = await asyncio.to_thread(scrape, supervisor.metrics_port)

    def started(method: str) -> float:
        return sum(
            value(text, "grpc_server_started_total", grpc_service="taskloom.v1.TaskService",
                  grpc_method=method, grpc_type=kind) or 0
            for kind in ("unary", "server_stream", "bidi_stream")
        )  # fmt: skip

    assert started("Session") == 1
    assert started("SubmitTask") + started("GetTask") + started("WatchTask") == 0


async def test_a_task_too_large_to_send_with_its_end_is_read_instead(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address, capabilities="echo")
    size = sessions.SNAPSHOT_SUBTASKS + 1
    wide = plan(*((f"s{i}", "echo", f"x{i}") for i in range(size)))
    small = plan(("a", "echo", "y"))
    big_id, small_id = await client.submit("wide", plan=wide), await client.submit("s", plan=small)
    tasks = {t.id: t async for t in client.finished([big_id, small_id, big_id])}
    assert set(tasks) == {big_id, small_id}
    assert len(tasks[big_id].subtasks) == size
    assert tasks[big_id].status == TaskStatus.SUCCEEDED
    assert tasks[small_id].result == "y"


async def test_bad_waits_are_answered_one_by_one_and_the_stream_goes_on(
    supervisor: Supervisor, client: TaskloomClient
) -> None:
    mine = await client.submit("gated", plan=plan(("a", "echo", "x")), approve_plan=True)
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        call = tasks_pb2_grpc.TaskServiceStub(channel).Session()
        await call.write(pb.SessionRequest(waits=["0" * 20, "no such/../key", mine]))
        response = await _read(call)
        refused = {e.task_id: e.error for e in response.ended}
        assert set(refused) == {"0" * 20, "no such/../key"}
        assert {e.code for e in refused.values()} == {grpc.StatusCode.NOT_FOUND.value[0]}
        # The stream goes on: a submit, then the end of the waited-for task.
        request = pb.SubmitTaskRequest(goal="more", idempotency_key="k")
        request.plan.subtasks.add(id="a", capability="echo", instruction="x")
        await call.write(pb.SessionRequest(submits=[pb.SessionSubmit(ref=7, task=request)]))
        response = await _read(call)
        assert response.submitted[0].ref == 7
        assert response.submitted[0].result.task_id
        await client.reject(mine, reason="no")
        response = await _read(call)
        ((ended,),) = [response.ended]
        assert (ended.task_id, ended.event.type, ended.task.status) == (
            mine, "task.cancelled", pb.TASK_STATUS_CANCELLED
        )  # fmt: skip
        call.cancel()


async def test_an_oversized_request_ends_the_stream_with_a_clear_error(
    supervisor: Supervisor,
) -> None:
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        call = tasks_pb2_grpc.TaskServiceStub(channel).Session()
        too_many = [pb.SessionSubmit(ref=i) for i in range(sessions.MAX_SESSION_SUBMITS + 1)]
        await call.write(pb.SessionRequest(submits=too_many))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1,001 submits in one SessionRequest" in str(e.value.details())


async def test_a_wait_and_a_submit_survive_a_supervisor_restart(
    supervisor_settings: SupervisorSettings, listen_address: str
) -> None:
    """The stream breaks while a wait is pending; the SDK opens it again at
    the next supervisor and the wait gets its answer there."""
    settings = supervisor_settings.model_copy(update={"listen": listen_address})
    first = Supervisor(settings)
    await first.start()
    async with TaskloomClient(listen_address) as client:
        gated = plan(("a", "echo", "x"))
        task_id = await client.submit("held", plan=gated, approve_plan=True)
        waiting = asyncio.ensure_future(client.wait(task_id))

        def waited() -> bool:
            current = first.orchestrator
            return current is not None and any(s._waiter.waiting for s in current.watching.sessions)

        await eventually(waited)
        await first.stop(grace=0.5)
        assert not waiting.done()
        second = Supervisor(settings)
        await second.start()
        try:
            # A submit on the broken stream goes to the new supervisor.
            other = await client.submit("after", plan=gated, approve_plan=True)
            await client.reject(task_id, reason="no")
            task = await asyncio.wait_for(waiting, 30)
            assert (task.id, task.status) == (task_id, TaskStatus.CANCELLED)
            assert (await client.get(other)).status == TaskStatus.AWAITING_APPROVAL
        finally:
            await second.stop(grace=0.5)


async def test_another_callers_task_cannot_be_waited_for(
    supervisor: Supervisor, client: TaskloomClient
) -> None:
    """Without tokens every caller is the local admin; the ownership checks
    themselves are in test_security. Here: an unknown id raises TaskNotFound
    from wait() and finished(), and the session goes on."""
    with pytest.raises(TaskNotFound):
        await client.wait("0" * 20)
    with pytest.raises(TaskNotFound):
        [t async for t in client.finished(["1" * 20])]
    task_id = await client.submit("ok", plan=plan(("a", "echo", "x")), approve_plan=True)
    await client.reject(task_id)
    assert (await client.wait(task_id)).status == TaskStatus.CANCELLED


async def test_past_its_capacity_the_cluster_refuses_new_work_until_it_catches_up(
    supervisor_settings: SupervisorSettings, processes: Processes, test_dir: Path
) -> None:
    """A worker with one slot, held; a second subtask waits for it. Once that
    has waited past TASKLOOM_ADMIT_QUEUE_WAIT, submits are refused with
    RESOURCE_EXHAUSTED (whoever sends them), and taken again once it runs.
    Work nobody can run (no worker offers it) is not a backlog."""
    settings = supervisor_settings.model_copy(update={"admit_queue_wait": 0.5})
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        processes.worker(supervisor.address, capabilities="gate", concurrency=1)
        orphan = await client.submit("nobody runs it", plan=plan(("x", "echo", "x")))
        task_id = await client.submit("two", plan=plan(("a", "gate", "A"), ("b", "gate", "B")))
        await eventually(lambda: supervisor.orchestrator is not None
                         and supervisor.orchestrator.scheduler.backlog() > 0.6)  # fmt: skip
        with pytest.raises(ResourceExhausted) as refused:
            await client.submit("more", plan=plan(("c", "gate", "C")))
        assert refused.value.subject == "backlog"
        assert "TASKLOOM_ADMIT_QUEUE_WAIT" in str(refused.value)
        for gate in "abc":
            (test_dir / f"open-{gate}").touch()
        assert (await client.wait(task_id)).status == TaskStatus.SUCCEEDED
        late = await client.submit("more", plan=plan(("c", "gate", "C")))
        assert (await client.wait(late)).status == TaskStatus.SUCCEEDED
        assert (await client.get(orphan)).status == TaskStatus.RUNNING


async def _read(call: Any) -> pb.SessionResponse:
    response = await call.read()
    assert isinstance(response, pb.SessionResponse), response
    return response


async def test_a_small_task_comes_with_its_end_and_a_larger_one_is_read(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    """The write that ends a task of up to 8 subtasks returns it as it ended,
    so a wait reads nothing; a larger one is read once, when it ends."""
    processes.worker(supervisor.address, capabilities="echo")
    reads: list[list[str]] = []
    read = supervisor.store.snapshots

    async def counted(task_ids: Sequence[str], max_subtasks: int) -> dict[str, Task]:
        reads.append(list(task_ids))
        return await read(task_ids, max_subtasks)

    supervisor.store.snapshots = counted  # type: ignore[method-assign]

    async def run(size: int) -> None:
        steps = plan(*((f"s{i}", "echo", f"x{i}") for i in range(size)))
        task_id = await client.submit(f"{size}", plan=steps, approve_plan=True)
        waiting = asyncio.ensure_future(client.wait(task_id))

        def waited() -> bool:
            current = supervisor.orchestrator
            return current is not None and any(s._waiter.waiting for s in current.watching.sessions)

        await eventually(waited)  # the wait is in before the task can end
        await client.approve(task_id)
        task = await asyncio.wait_for(waiting, 30)
        assert task.status == TaskStatus.SUCCEEDED
        assert [s.output for s in task.subtasks] == [f"x{i}" for i in range(size)]

    await run(8)
    assert reads == []
    await run(9)
    assert len(reads) == 1


class _OldSupervisor(tasks_pb2_grpc.TaskServiceServicer):
    """A supervisor from before the Session: the unary calls and WatchTask,
    relayed to a real one; Session is left to the generated base class, which
    answers UNIMPLEMENTED."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    async def SubmitTask(self, request: Any, context: Any) -> Any:
        return await self._stub.SubmitTask(request)

    async def GetTask(self, request: Any, context: Any) -> Any:
        return await self._stub.GetTask(request)

    async def WatchTask(self, request: Any, context: Any) -> Any:
        async for response in self._stub.WatchTask(request):
            yield response

    async def WaitTasks(self, request: Any, context: Any) -> Any:
        async for response in self._stub.WaitTasks(request):
            yield response


async def test_against_a_supervisor_without_sessions_the_sdk_goes_unary(
    supervisor: Supervisor, processes: Processes
) -> None:
    processes.worker(supervisor.address, capabilities="echo")
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        old = grpc.aio.server()
        # The stubs call every method abstract; the old server lacks the new ones.
        relay = _OldSupervisor(tasks_pb2_grpc.TaskServiceStub(channel))  # type: ignore[abstract]
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(relay, old)
        port = old.add_insecure_port("127.0.0.1:0")
        await old.start()
        try:
            async with TaskloomClient(f"127.0.0.1:{port}") as client:
                task_id = await client.submit("old", plan=plan(("a", "echo", "x")))
                assert (await client.wait(task_id)).result == "x"
                more = [
                    await client.submit(f"{i}", plan=plan(("a", "echo", f"{i}"))) for i in range(3)
                ]
                results = {t.id: t.result async for t in client.finished(more)}
                assert results == {t: str(i) for i, t in enumerate(more)}
        finally:
            await old.stop(0)
