"""Many tasks at once: SubmitTasks and WaitTasks, through the SDK and on the
wire, with a real supervisor, Redis and worker processes."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from taskloom.client import TaskloomClient
from taskloom.client import client as sdk
from taskloom.client.settings import ClientSettings
from taskloom.core.errors import InvalidArgument, OutcomeUnknown, PlanError, TaskNotFound
from taskloom.core.localredis import LocalRedis
from taskloom.core.model import Event, EventType, TaskStatus
from taskloom.supervisor import watching
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import tasks_pb2_grpc
from tests.conftest import Processes
from tests.helpers import eventually, plan

CYCLE = plan(("a", "echo", "x", "b"), ("b", "echo", "y", "a"))


async def _ends(client: TaskloomClient, task_ids: list[str]) -> list[Event]:
    return [e async for e in client.wait_many(task_ids)]


async def test_tasks_submitted_in_one_call_run_and_are_waited_for_together(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    items: list[str | dict[str, object]] = [
        {"goal": f"echo {i}", "plan": plan(("a", "echo", f"n{i}"))} for i in range(40)
    ]
    items[5] = "   "
    items[17] = {"goal": "loop", "plan": CYCLE}
    results = await client.submit_many(items, priority=3)

    assert len(results) == 40
    empty, cycle = results[5].error, results[17].error
    assert isinstance(empty, InvalidArgument)
    assert (empty.field, results[5].task_id) == ("goal", "")
    assert isinstance(cycle, PlanError)
    assert "cycle" in str(cycle)
    stored = {i: r.task_id for i, r in enumerate(results) if i not in (5, 17)}
    assert all(results[i].created and results[i].error is None for i in stored)
    assert len(set(stored.values())) == 38

    ended = await asyncio.wait_for(_ends(client, list(stored.values())), 60)
    assert sorted(e.task_id for e in ended) == sorted(stored.values())
    assert {(e.type, e.status) for e in ended} == {("task.succeeded", "SUCCEEDED")}
    for i, task_id in stored.items():
        task = await client.get(task_id)
        assert (task.result, task.options.priority) == (f"n{i}", 3)
    # Tasks that have ended are answered at once, with the same events.
    again = await asyncio.wait_for(_ends(client, list(stored.values())), 10)
    assert sorted(e.id for e in again) == sorted(e.id for e in ended)


async def test_a_batch_sent_again_with_its_keys_stores_nothing_twice(
    client: TaskloomClient,
) -> None:
    items = [
        {"goal": f"once {i}", "plan": plan(("a", "gate", "x")), "idempotency_key": f"k{i}"}
        for i in range(3)
    ]
    first = await client.submit_many(items)
    again = await client.submit_many(items)
    assert [r.created for r in first] == [True] * 3
    assert [r.created for r in again] == [False] * 3
    assert [r.task_id for r in again] == [r.task_id for r in first]
    assert len({r.task_id for r in first}) == 3


async def test_waiting_for_an_unknown_task_says_which(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    known = await client.submit("known", plan=plan(("a", "echo", "1")))
    with pytest.raises(TaskNotFound, match="no-such-task"):
        await _ends(client, [known, "no-such-task"])
    # The supervisor keeps serving.
    assert [e.task_id for e in await _ends(client, [known])] == [known]


async def test_batches_out_of_bounds_are_refused_and_the_supervisor_keeps_serving(
    supervisor: Supervisor, client: TaskloomClient
) -> None:
    async with grpc.aio.insecure_channel(supervisor.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        for count in (0, 1_001):
            request = pb.SubmitTasksRequest(tasks=[pb.SubmitTaskRequest(goal="g")] * count)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitTasks(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{count:,} tasks in one SubmitTasks call; send 1 to 1,000" in (
                caught.value.details() or ""
            )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.WaitTasks(pb.WaitTasksRequest()):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "send 1 to 10,000" in (caught.value.details() or "")
    assert not [t for t in await client.list() if t.goal == "g"]
    assert await client.submit("still serving", plan=plan(("a", "gate", "x")))


async def test_the_sdk_splits_large_batches_and_merges_their_waits(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sdk, "SUBMIT_BATCH", 7)
    monkeypatch.setattr(sdk, "WAIT_BATCH", 5)
    processes.worker(supervisor.address)
    results = await client.submit_many(
        [f"split {i}" for i in range(30)], plan=plan(("a", "echo", "e"))
    )
    assert all(r.created for r in results)
    ids = [r.task_id for r in results]
    ended = await asyncio.wait_for(_ends(client, ids + ids[:3]), 60)
    assert sorted(e.task_id for e in ended) == sorted(ids)
    assert {e.status for e in ended} == {"SUCCEEDED"}
    # A task of more than SUBMIT_BYTES goes in a call of its own.
    big = "x" * (sdk.SUBMIT_BYTES // 2)
    batches = sdk._batches([sdk._request_of({"goal": big}), sdk._request_of({"goal": big})])
    assert [len(b) for b in batches] == [1, 1]


async def test_a_wait_hears_of_each_end_however_it_comes(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    test_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No periodic re-check: only the supervisor handing the ends over can end these.
    monkeypatch.setattr(watching, "WATCH_WAIT", 3600.0)
    processes.worker(supervisor.address)
    results = await client.submit_many(
        [f"gated {i}" for i in range(3)], plan=plan(("g", "gate", "x"))
    )
    ids = [r.task_id for r in results]
    waiting = asyncio.create_task(_ends(client, ids))
    await eventually(lambda: (test_dir / "started-g-1").exists())
    # A cancel hands over no event: the wait reads it.
    await client.cancel(ids[0], "not this one")
    (test_dir / "open-g").touch()
    ended = {e.task_id: e for e in await asyncio.wait_for(waiting, 60)}
    assert set(ended) == set(ids)
    assert (ended[ids[0]].status, ended[ids[0]].message) == ("CANCELLED", "not this one")
    assert {ended[i].status for i in ids[1:]} == {"SUCCEEDED"}


async def test_a_wait_sees_a_task_that_ended_unheard_of(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    test_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watching, "WATCH_WAIT", 0.2)
    processes.worker(supervisor.address)
    (quiet,) = await client.submit_many(["end me quietly"], plan=plan(("g", "gate", "x")))
    await eventually(lambda: (test_dir / "started-g-1").exists())
    waiting = asyncio.create_task(_ends(client, [quiet.task_id]))
    _, ended = await supervisor.store.finish(
        quiet.task_id, TaskStatus.CANCELLED, "behind its back", EventType.TASK_CANCELLED,
        expected=(TaskStatus.RUNNING,),
    )  # fmt: skip
    assert ended.finished
    (only,) = await asyncio.wait_for(waiting, 30)
    assert (only.task_id, only.message) == (quiet.task_id, "behind its back")
    (test_dir / "open-g").touch()


async def test_a_wait_outlives_a_supervisor_restart(
    supervisor_settings: SupervisorSettings,
    processes: Processes,
    listen_address: str,
    test_dir: Path,
) -> None:
    first = await processes.supervisor(
        supervisor_settings, listen=listen_address, name="supervisor-1"
    )
    processes.worker(listen_address, name="w1")
    async with TaskloomClient(listen_address) as client:
        results = await client.submit_many(
            [f"survive {i}" for i in range(3)], plan=plan(("a", "gate", "A"))
        )
        ids = [r.task_id for r in results]
        waiting = asyncio.create_task(_ends(client, ids))
        await eventually(lambda: (test_dir / "started-a-1").exists())
        first.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(first.wait, 30) == -signal.SIGKILL
        assert not waiting.done()
        await processes.supervisor(supervisor_settings, listen=listen_address, name="supervisor-2")
        (test_dir / "open-a").touch()
        ended = await asyncio.wait_for(waiting, 60)
    assert sorted(e.task_id for e in ended) == sorted(ids)
    assert {e.status for e in ended} == {"SUCCEEDED"}


async def test_a_submit_that_times_out_while_its_write_lands_late_stores_one_task(
    supervisor: Supervisor, redis_server: LocalRedis
) -> None:
    """Redis holds the write past the client's deadline: the client cannot
    tell whether the task was stored, tries again with the same key, and the
    second try finds the first one's task."""
    quick = ClientSettings.load(supervisor=supervisor.address, timeout=0.5)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with TaskloomClient(settings=quick) as client:
            await raw.client_pause(2000, all=False)
            task_id = await client.submit("late", plan=plan(("a", "echo", "x")))
            await raw.client_unpause()
            ours = await client.list(limit=100)
    finally:
        await raw.client_unpause()
        await raw.aclose()
    assert [t.id for t in ours if t.goal == "late"] == [task_id]


async def test_a_submit_whose_outcome_cannot_be_told_says_so_and_names_its_key(
    supervisor: Supervisor, redis_server: LocalRedis
) -> None:
    quick = ClientSettings.load(supervisor=supervisor.address, timeout=0.3, unavailable_grace=0.5)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with TaskloomClient(settings=quick) as client:
            await raw.client_pause(3000, all=False)
            with pytest.raises(OutcomeUnknown, match="retrying with the same idempotency key") as e:
                await client.submit("unknown", plan=plan(("a", "echo", "x")), idempotency_key="k-1")
            assert e.value.idempotency_key == "k-1"
            await raw.client_unpause()
            # Repeating it with its key is safe: one task either way.
            first = await client.submit(
                "unknown", plan=plan(("a", "echo", "x")), idempotency_key="k-1"
            )
            again = await client.submit(
                "unknown", plan=plan(("a", "echo", "x")), idempotency_key="k-1"
            )
            assert first == again
    finally:
        await raw.client_unpause()
        await raw.aclose()
