"""A replicated Redis behind Sentinel: a primary, a replica and three
sentinels, real processes on loopback ports.

What taskloom acknowledges is on a replica before it is acknowledged (WAIT),
so SIGKILL of the primary loses none of it: Sentinel promotes the replica,
the store and the supervisor find the new primary, and the work goes on. A
write that no replica takes in time is not acknowledged.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from taskloom.client import ClientSettings, TaskloomClient
from taskloom.core.errors import StoreUnavailable
from taskloom.core.model import Plan, PlannedSubtask, TaskOptions, TaskStatus
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.supervisor.store import Store
from tests.conftest import Processes
from tests.helpers import eventually, plan, wait_status
from tests.sentinel import FAILOVER_BOUND, MISSING, ReplicatedRedis, sentinel_binaries

pytestmark = pytest.mark.skipif(sentinel_binaries() is None, reason=MISSING)

ONE = Plan((PlannedSubtask("a", "A", "x", "echo"),))


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[ReplicatedRedis]:
    cluster = ReplicatedRedis(tmp_path / "replicated")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def create(store: Store, goal: str) -> str:
    task_id, _, _ = await store.create_task(
        goal=goal, options=TaskOptions(), plan=ONE, result_from=["a"]
    )
    return task_id


async def test_what_the_store_acknowledged_survives_the_primary_and_it_goes_on(
    replicated: ReplicatedRedis,
) -> None:
    store = Store(replicated.url, prefix="p:", socket_timeout=2.0, min_replicas=1)
    await store.connect()
    try:
        before = [await create(store, f"before {i}") for i in range(20)]
        old = await asyncio.to_thread(replicated.kill_primary)
        new = await asyncio.to_thread(replicated.wait_promoted, old)
        assert new != old

        async def writes() -> str:
            try:
                return await create(store, "after")
            except StoreUnavailable:
                return ""  # still reconnecting

        after = await eventually(writes, timeout=60)
        # Every write acknowledged before the kill is on the new primary.
        for task_id in before:
            assert (await store.get_task(task_id)).goal.startswith("before")
        assert (await store.get_task(after)).goal == "after"
        direct = aioredis.Redis(port=replicated.ports[new], decode_responses=True)
        assert await direct.hget(f"p:task:{after}", "goal") == "after"
        await direct.aclose()
    finally:
        await store.close()


async def test_a_write_no_replica_takes_in_time_is_not_acknowledged(
    replicated: ReplicatedRedis,
) -> None:
    store = Store(
        replicated.url, prefix="p:", socket_timeout=2.0, min_replicas=2, replica_timeout=0.3
    )
    await store.connect()
    replica = replicated.nodes["b"]
    try:
        await create(store, "replicated")
        replica.send_signal(signal.SIGSTOP)
        with pytest.raises(StoreUnavailable, match=r"reached 1 of the 2 replicas"):
            await create(store, "only on the primary")
        replica.send_signal(signal.SIGCONT)
        assert await eventually(lambda: create(store, "replicated again"), timeout=30)
    finally:
        replica.send_signal(signal.SIGCONT)
        await store.close()


@pytest.mark.timeout(240)
async def test_a_cluster_on_sentinel_finishes_every_task_across_a_failover(
    replicated: ReplicatedRedis,
    supervisor_settings: SupervisorSettings,
    processes: Processes,
    listen_address: str,
    test_dir: Path,
) -> None:
    settings = supervisor_settings.model_copy(update={"redis_url": replicated.url})
    await processes.supervisor(settings, listen=listen_address)
    processes.worker(listen_address, concurrency=8)
    # Submits made during the failover wait for it, as a user who runs on
    # Sentinel is told to set up: a grace longer than a failover can take.
    patient = ClientSettings.load(supervisor=listen_address, unavailable_grace=FAILOVER_BOUND)
    async with TaskloomClient(settings=patient) as client:
        # Some tasks wait at a gate while the primary dies; others are
        # submitted around the failover.
        gated = [
            await client.submit(
                f"gated {i}", plan=plan(("g", "gate", "G"), ("e", "echo", "E", "g"))
            )
            for i in range(4)
        ]
        old = await asyncio.to_thread(replicated.kill_primary)
        during = asyncio.gather(
            *(client.submit(f"during {i}", plan=plan(("a", "echo", str(i)))) for i in range(10))
        )
        await asyncio.to_thread(replicated.wait_promoted, old)
        submitted = await during
        (test_dir / "open-g").touch()
        after = await client.submit("after", plan=plan(("a", "echo", "after")))
        for task_id in [*gated, *submitted, after]:
            task = await wait_status(
                client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED, timeout=120
            )
            assert task.status == TaskStatus.SUCCEEDED, (task.goal, task.error)
            # Each subtask's end was committed once.
            ends = [e async for e in client.watch(task_id) if e.type == "subtask.succeeded"]
            assert len(ends) == len(task.subtasks), ends
