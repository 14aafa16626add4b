"""One tenant cannot hurt the others: what a worker may add to a task's log
is capped (a progress message, a streamed piece, a subtask's whole stream,
a worker's rate), and watching any task's log goes in messages of bounded
size. Raw gRPC streams play the hostile worker, as an attacker would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from taskloom.client import TaskloomClient
from taskloom.client.settings import ClientSettings
from taskloom.core.auth import hash_token
from taskloom.core.errors import ResourceExhausted
from taskloom.core.localredis import LocalRedis
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


# -- budgets -------------------------------------------------------------------------

PEOPLE = {"alice": "tl_alice-budget-1", "bob": "tl_bob-budget-2", "root": "tl_root-budget-3"}


@pytest.fixture
async def budgeted(supervisor_settings: SupervisorSettings) -> AsyncIterator[Supervisor]:
    tokens = "; ".join(
        f"{hash_token(t)} {n} {'admin' if n == 'root' else 'client'}" for n, t in PEOPLE.items()
    )
    server = Supervisor(
        supervisor_settings.model_copy(
            update={
                "tokens": tokens,
                "max_unfinished_subtasks": 100,
                "max_stored_bytes": 40_000,
                "admin_max_unfinished_subtasks": 150,
                "unsuccessful_retention": 2.0,
            }
        )
    )
    await server.start()
    yield server
    await stop_or_explain(server)


def as_(server: Supervisor, who: str) -> TaskloomClient:
    return TaskloomClient(
        settings=ClientSettings.load(supervisor=server.address, token=PEOPLE[who])
    )


def gates(n: int) -> dict[str, Any]:
    return plan(*((f"g{i}", "gate", "wait") for i in range(n)))


async def test_unfinished_subtasks_are_budgeted_per_principal(budgeted: Supervisor) -> None:
    async with as_(budgeted, "alice") as alice, as_(budgeted, "bob") as bob:
        first = await alice.submit("sixty", plan=gates(60))
        with pytest.raises(ResourceExhausted) as refused:
            await alice.submit("sixty more", plan=gates(60))
        message = str(refused.value)
        assert "alice has 60 subtasks in unfinished tasks and this task adds 60" in message
        assert "the budget is 100 (TASKLOOM_MAX_UNFINISHED_SUBTASKS)" in message
        await bob.submit("bob is not alice", plan=gates(60))  # his own budget
        await alice.cancel(first)
        await alice.submit("sixty again", plan=gates(60))  # a finished task frees its subtasks
    async with as_(budgeted, "root") as root:
        await root.submit("an admin", plan=gates(100))
        with pytest.raises(ResourceExhausted, match="the budget is 150"):
            await root.submit("has a budget too", plan=gates(60))


async def test_stored_bytes_are_budgeted_until_they_expire_sooner_when_cancelled(
    budgeted: Supervisor, redis_server: LocalRedis, prefix: str
) -> None:
    async with as_(budgeted, "alice") as alice:
        big = await alice.submit("x" * 19_000, plan=gates(1))
        done = await alice.submit("y" * 19_000, plan=plan(("a", "echo", "e")))
        with pytest.raises(ResourceExhausted) as refused:
            await alice.submit("z" * 5_000, plan=gates(1))
        assert "TASKLOOM_MAX_STORED_BYTES" in str(refused.value)
        assert "alice stores 38," in str(refused.value)
        await alice.cancel(big)
        # Cancelled, it still stores its bytes until it expires ...
        with pytest.raises(ResourceExhausted):
            await alice.submit("z" * 5_000, plan=gates(1))
        raw = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            # ... which comes sooner than for what succeeds (or would run).
            assert 0 < await raw.ttl(f"{prefix}task:{big}") <= 2
            assert await raw.ttl(f"{prefix}task:{done}") == -1  # still running: no expiry

            async def expired() -> bool:
                return await raw.exists(f"{prefix}task:{big}") == 0

            await eventually(expired, timeout=30)
            assert budgeted.orchestrator is not None
            await budgeted.orchestrator.store.trim_indexes()  # the janitor's round
        finally:
            await raw.aclose()
        await alice.submit("z" * 5_000, plan=gates(1))


async def test_a_large_plan_is_written_in_parts_and_appears_all_at_once(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, redis_server: LocalRedis,
    prefix: str,
) -> None:  # fmt: skip
    raw = Redis.from_url(redis_server.url, decode_responses=True)

    async def scripts_run() -> int:
        stats = await raw.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))

    # 5,000 subtasks of 150-character instructions, in 50 chains of 100.
    steps = plan(
        *(
            (f"s{c}-{i}", "echo", "e" * 150, *([f"s{c}-{i - 1}"] if i else []))
            for c in range(50)
            for i in range(100)
        )
    )
    before = await scripts_run()
    task_id = await client.submit("large", plan=steps)
    # At least one script per 500 subtasks, and then the one that shows the task.
    assert await scripts_run() - before >= 11
    assert await raw.zcard(f"{prefix}staging") == 0
    processes.worker(supervisor.address, capabilities="echo", concurrency=50)
    task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED, timeout=240)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert len(task.subtasks) == 5_000
    # The same submit again (its key) stores nothing more and leaves nothing behind.
    keys_before = await raw.dbsize()
    again = await client.submit("large", plan=steps, idempotency_key="big-one")
    twice = await client.submit("large", plan=steps, idempotency_key="big-one")
    assert again == twice
    assert await raw.zcard(f"{prefix}staging") == 0
    assert await raw.dbsize() - keys_before < 5_000 + 10  # one plan's keys, not two
    await raw.aclose()


async def test_the_janitor_removes_a_plan_whose_submit_never_finished(
    supervisor: Supervisor, redis_server: LocalRedis, prefix: str
) -> None:
    from taskloom.core.model import Plan, PlannedSubtask

    store = supervisor.store
    large = Plan(tuple(PlannedSubtask(f"s{i}", "S", "x", "echo") for i in range(2_500)))
    await store._stage("0123456789abcdef0123", large, ["s0"], 0, False)  # and then it died
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await raw.llen(f"{prefix}task:0123456789abcdef0123:subs") == 2_500
        assert await store.sweep_staging(older_than=0) == 1
        left = [k async for k in raw.scan_iter(f"{prefix}task:0123456789abcdef0123*")]
        assert left == [] and await raw.zcard(f"{prefix}staging") == 0
    finally:
        await raw.aclose()


async def test_a_large_plan_of_independent_subtasks_runs_them_all(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    # 1,200 subtasks ready at once: more than the step that shows the task
    # hands out; the rest are queued by the supervisor.
    processes.worker(supervisor.address, capabilities="echo", concurrency=100)
    task_id = await client.submit(
        "wide", plan=plan(*((f"w{i}", "echo", "w") for i in range(1_200)))
    )
    task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED, timeout=240)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert all(s.attempt == 1 for s in task.subtasks)
