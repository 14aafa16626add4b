"""Per-task limits and priorities, with in-process workers on a real supervisor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from taskloom.client import TaskloomClient
from taskloom.core.model import SubtaskStatus, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.worker import SubtaskContext, Worker, WorkerSettings
from tests.helpers import eventually, plan


@pytest.fixture
async def hold_worker(
    supervisor: Supervisor,
) -> AsyncIterator[Callable[[int], tuple[Worker, list[str], dict[str, asyncio.Event]]]]:
    """Start an in-process worker whose `hold` subtasks wait for the test to release them."""
    started: list[Worker] = []
    serving: list[asyncio.Task[None]] = []

    def start(concurrency: int) -> tuple[Worker, list[str], dict[str, asyncio.Event]]:
        worker = Worker(
            WorkerSettings.load(
                supervisor=supervisor.address, capabilities="hold", concurrency=concurrency
            )
        )
        order: list[str] = []
        gates: dict[str, asyncio.Event] = {}

        @worker.handler("hold")
        async def hold(ctx: SubtaskContext) -> str:
            order.append(ctx.instruction)
            await gates.setdefault(ctx.instruction, asyncio.Event()).wait()
            return ctx.instruction

        started.append(worker)
        serving.append(asyncio.create_task(worker.serve()))
        return worker, order, gates

    yield start
    for worker in started:
        await worker.stop()
    await asyncio.gather(*serving)


def release(gates: dict[str, asyncio.Event], *names: str) -> None:
    for name in names:
        gates.setdefault(name, asyncio.Event()).set()


async def test_max_parallel_bounds_a_task_however_many_slots_are_free(
    supervisor: Supervisor, client: TaskloomClient, hold_worker: Callable[..., tuple]
) -> None:
    _, order, gates = hold_worker(8)
    await eventually(lambda: supervisor.scheduler.sessions())
    names = [f"s{i}" for i in range(6)]
    task_id = await client.submit(
        "two at a time", plan=plan(*[(n, "hold", n) for n in names]), max_parallel=2
    )
    for held in range(2, 7, 2):

        def holding(held: int = held) -> bool:
            return len(order) == held

        await eventually(holding)
        # Without the limit all six would have left in one batch; with it,
        # the rest stay READY while two are held.
        task = await client.get(task_id)
        assert [s.status for s in task.subtasks].count(SubtaskStatus.READY) == 6 - held
        release(gates, *order[held - 2 : held])
    task = await client.wait(task_id)
    assert task.status == TaskStatus.SUCCEEDED
    assert task.options.max_parallel == 2


async def test_higher_priority_subtasks_go_first(
    supervisor: Supervisor, client: TaskloomClient, hold_worker: Callable[..., tuple]
) -> None:
    _, order, gates = hold_worker(1)
    await eventually(lambda: supervisor.scheduler.sessions())
    blocker = await client.submit("blocker", plan=plan(("b", "hold", "blocker")))
    await eventually(lambda: order == ["blocker"])
    low = await client.submit("low", plan=plan(("l1", "hold", "low-1"), ("l2", "hold", "low-2")))
    high = await client.submit(
        "high", plan=plan(("h1", "hold", "high-1"), ("h2", "hold", "high-2")), priority=5
    )
    release(gates, "blocker", "low-1", "low-2", "high-1", "high-2")
    for task_id in (blocker, low, high):
        assert (await client.wait(task_id)).status == TaskStatus.SUCCEEDED
    assert order == ["blocker", "high-1", "high-2", "low-1", "low-2"]
