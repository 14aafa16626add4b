"""Several supervisors on one Redis: one leads, standbys refuse and take over,
and a leader that lost its lease cannot write."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskloom.client import TaskloomClient
from taskloom.core.errors import NotLeader
from taskloom.core.localredis import free_port
from taskloom.core.model import Event, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.helpers import eventually, plan, wait_status


async def health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        return int(reply.status)


@pytest.fixture
def supervisor_settings(supervisor_settings: SupervisorSettings) -> SupervisorSettings:
    """Quick failover: a standby takes over within about 1.5 s."""
    return supervisor_settings.model_copy(update={"leader_ttl": 1.5})


@pytest.fixture
def standby_settings(supervisor_settings: SupervisorSettings) -> SupervisorSettings:
    return supervisor_settings.model_copy(update={"supervisor_id": "standby"})


async def _collect(events: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in events]


async def test_a_standby_refuses_work_and_names_the_leader(
    supervisor: Supervisor, standby_settings: SupervisorSettings
) -> None:
    async with Supervisor(standby_settings) as standby:
        assert supervisor.orchestrator is not None
        assert standby.orchestrator is None
        assert await health(supervisor.address) == health_pb2.HealthCheckResponse.SERVING
        assert await health(standby.address) == health_pb2.HealthCheckResponse.NOT_SERVING

        async with TaskloomClient(standby.address) as alone:
            with pytest.raises(NotLeader, match=supervisor.settings.supervisor_id):
                await alone.submit("anything", plan=plan(("a", "echo", "x")))

        # Given both addresses, standby first, calls find the leader.
        async with TaskloomClient(f"{standby.address},{supervisor.address}") as both:
            task_id = await both.submit("via the list", plan=plan(("a", "echo", "x")))
            assert (await both.get(task_id)).goal == "via the list"


async def test_a_clean_shutdown_hands_over_and_the_task_finishes(
    supervisor_settings: SupervisorSettings,
    standby_settings: SupervisorSettings,
    processes: Processes,
) -> None:
    leader = Supervisor(supervisor_settings)
    await leader.start()
    standby = Supervisor(standby_settings)
    await standby.start()
    try:
        addresses = f"{leader.address},{standby.address}"
        processes.worker(addresses, name="w1")
        await eventually(lambda: leader.scheduler.sessions())
        async with TaskloomClient(addresses) as client:
            task_id = await client.submit(
                "two steps across a handover",
                plan=plan(("a", "gate", "A"), ("b", "echo", "B", "a")),
            )
            await eventually(lambda: (processes.test_dir / "started-a-1").exists())
            # A watcher started on the leader follows the task across the handover.
            watched = asyncio.create_task(_collect(client.watch(task_id)))

            await leader.stop(grace=0.5)
            await eventually(lambda: standby.orchestrator is not None, timeout=10)
            await eventually(lambda: standby.scheduler.sessions(), timeout=10)

            (processes.test_dir / "open-a").write_text("")
            task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
            events = await asyncio.wait_for(watched, 30)
        assert task.status == TaskStatus.SUCCEEDED, task.error
        # The worker kept its attempt across the handover: it ran once.
        assert [s.attempt for s in task.subtasks] == [1, 1]
        # The watcher missed nothing and saw nothing twice.
        ids = [e.id for e in events]
        assert len(ids) == len(set(ids)) and events[-1].type == "task.succeeded"
        assert [e.type for e in events].count("subtask.succeeded") == 2
    finally:
        await leader.stop(grace=0.1)
        await standby.stop(grace=0.1)


async def test_a_leader_that_lost_its_lease_cannot_write_and_steps_down(
    supervisor: Supervisor, client: TaskloomClient
) -> None:
    # As if the leader had been paused past its lease and another had taken it.
    keys = supervisor.store.keys
    await supervisor.store._redis.set(keys.leader, "999/usurper@elsewhere", px=60_000)

    with pytest.raises(NotLeader, match="usurper"):
        await client.submit("too late", plan=plan(("a", "echo", "x")))
    assert not await supervisor.store._redis.zcard(keys.tasks_index)

    await eventually(lambda: supervisor.orchestrator is None, timeout=10)
    assert await health(supervisor.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(NotLeader, match="usurper@elsewhere"):
        await client.get("0" * 20)

    # When the usurper's lease is gone, the old leader takes over again.
    await supervisor.store._redis.delete(keys.leader)
    await eventually(lambda: supervisor.orchestrator is not None, timeout=10)
    assert supervisor.terms == 2


async def test_a_standby_takes_over_from_a_killed_leader(
    supervisor_settings: SupervisorSettings,
    standby_settings: SupervisorSettings,
    processes: Processes,
) -> None:
    leader_address = f"127.0.0.1:{free_port()}"
    leader = await processes.supervisor(supervisor_settings, listen=leader_address)
    async with Supervisor(standby_settings) as standby:
        assert standby.orchestrator is None
        addresses = f"{leader_address},{standby.address}"
        processes.worker(addresses, name="w1")
        async with TaskloomClient(addresses) as client:
            task_id = await client.submit(
                "survives its supervisor",
                plan=plan(("a", "gate", "A"), ("b", "echo", "B", "a")),
            )
            await eventually(lambda: (processes.test_dir / "started-a-1").exists())
            leader.send_signal(signal.SIGKILL)
            leader.wait()

            await eventually(lambda: standby.orchestrator is not None, timeout=15)
            (processes.test_dir / "open-a").write_text("")
            task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
        assert task.status == TaskStatus.SUCCEEDED, task.error
        assert task.subtasks[0].attempt == 1
