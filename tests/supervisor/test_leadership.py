"""Several supervisors on one Redis: one leads, standbys refuse and take over,
and a leader that lost its lease cannot write."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskloom.client import TaskloomClient
from taskloom.core.errors import ConfigError, NotLeader, OutcomeUnknown
from taskloom.core.localredis import free_port
from taskloom.core.model import AttemptRef, Event, EventType, TaskStatus
from taskloom.core.status import leader_of
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import tasks_pb2_grpc
from tests.client.test_cli import taskloom as cli
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


def _names(supervisor: Supervisor) -> list[str]:
    """The workers connected to ``supervisor``."""
    return sorted(s.info.name for s in supervisor.scheduler.sessions())


async def _collect(events: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in events]


async def test_a_standby_names_the_leader_and_the_sdk_cli_and_workers_follow_it(
    supervisor: Supervisor, standby_settings: SupervisorSettings, processes: Processes
) -> None:
    """Both supervisors answer (as Ready pods behind one Service); a standby
    refuses with UNAVAILABLE and the leader's address in the status details,
    and whoever was given only the standby's address ends up at the leader."""
    async with Supervisor(standby_settings) as standby:
        assert supervisor.orchestrator is not None
        assert standby.orchestrator is None
        assert await health(supervisor.address) == health_pb2.HealthCheckResponse.SERVING
        assert await health(standby.address) == health_pb2.HealthCheckResponse.NOT_SERVING

        async with grpc.aio.insecure_channel(standby.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await tasks_pb2_grpc.TaskServiceStub(channel).GetTask(
                    pb.GetTaskRequest(task_id="0" * 20), timeout=5
                )
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert leader_of(raised.value) == supervisor.address
        assert supervisor.settings.supervisor_id in (raised.value.details() or "")

        processes.worker(standby.address, name="follower")
        await eventually(lambda: _names(supervisor) == ["follower"], timeout=30)
        assert "following the leader to " + supervisor.address in processes.log("follower")
        async with TaskloomClient(standby.address) as alone:
            task_id = await alone.submit("via the standby", plan=plan(("a", "echo", "x")))
            assert (await alone.wait(task_id)).status == TaskStatus.SUCCEEDED
        # A watch opened on the standby follows too (a fresh client).
        async with TaskloomClient(standby.address) as watcher:
            events = await asyncio.wait_for(_collect(watcher.watch(task_id)), 30)
        assert events[-1].type == "task.succeeded"
        code, out, err = await cli("get", task_id, "--json", "--supervisor", standby.address)
        assert code == 0, err
        assert json.loads(out)["status"] == "SUCCEEDED"


async def test_a_redirect_is_only_followed_to_a_plain_address(
    supervisor: Supervisor, client: TaskloomClient
) -> None:
    """What a standby names is checked before anything connects to it: a
    lease naming no HOST:PORT (or one not worth trusting) is no redirect."""
    keys = supervisor.store.keys
    for holder in ("usurper@elsewhere", "usurper@http://x:1/", "usurper@a b:1"):
        await supervisor.store._redis.set(keys.leader, f"999/{holder}", px=60_000)
        await eventually(lambda: supervisor.orchestrator is None, timeout=10)
        with pytest.raises(NotLeader, match="usurper") as raised:
            await client.get("0" * 20)
        assert raised.value.leader == ""
    await supervisor.store._redis.delete(keys.leader)
    await eventually(lambda: supervisor.orchestrator is not None, timeout=10)


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

    # Its writes are fenced, and the error says who leads and what to do.
    with pytest.raises(
        NotLeader,
        match=r"^this supervisor lost the leader lease \(now held by 999/usurper@elsewhere\); "
        "a supervisor takes the lead within TASKLOOM_LEADER_TTL, try again$",
    ):
        await supervisor.store.note("0" * 20, TaskStatus.RUNNING, EventType.TASK_SUBMITTED, "x")
    # Refused by the fence, so surely not stored: NotLeader -- unless a retry
    # was in flight when the supervisor stepped down, which leaves it unknown.
    with pytest.raises((NotLeader, OutcomeUnknown), match="usurper"):
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


async def test_a_busy_event_loop_does_not_cost_the_lease(
    supervisor: Supervisor, client: TaskloomClient
) -> None:
    """A handler of ours that holds the event loop past the lease's TTL (a
    slow one, a long pause): a thread renews the lease all the same."""
    token = supervisor.leadership.token
    ttl = supervisor.settings.leader_ttl
    await asyncio.to_thread(lambda: None)  # the loop is idle before
    asyncio.get_running_loop().call_soon(time.sleep, ttl * 1.6)
    await asyncio.sleep(0.1)  # the loop was blocked through this
    assert supervisor.leadership.token == token and supervisor.terms == 1
    assert await supervisor.store._redis.get(supervisor.store.keys.leader) == token
    assert await client.submit("still leading", plan=plan(("a", "echo", "x")))


async def test_a_supervisor_that_stepped_down_takes_back_a_lease_that_still_names_it(
    supervisor: Supervisor,
) -> None:
    old = supervisor.leadership.token
    await supervisor.leadership.step_down("Redis was away for a moment")
    assert supervisor.orchestrator is None
    # One round, long before its lease would have lapsed: it leads again,
    # under a new token, so writes fenced with the old one stay refused.
    await supervisor.leadership.campaign()
    assert supervisor.orchestrator is not None and supervisor.terms == 2
    assert supervisor.leadership.token != old
    assert supervisor.leadership.token.partition("/")[2] == old.partition("/")[2]


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


async def test_workers_leave_a_frozen_leader_for_the_standby_before_its_leases_lapse(
    supervisor_settings: SupervisorSettings, processes: Processes
) -> None:
    """A leader that stops answering without closing its connections (frozen
    here; a host that dies or is cut off alike) leaves its workers' streams
    open. With the default keepalive, lease TTL and heartbeats, every worker,
    busy or idle, finds out and moves to the standby before the leases the
    standby restored can lapse: the work in flight is kept, and the idle
    worker is there to take more."""
    defaults = {
        name: SupervisorSettings.model_fields[name].default
        for name in ("lease_ttl", "heartbeat_interval", "keepalive_interval", "keepalive_timeout")
    }
    settings = supervisor_settings.model_copy(update=defaults)
    leader_address = f"127.0.0.1:{free_port()}"
    leader = await processes.supervisor(settings, listen=leader_address)
    async with Supervisor(settings.model_copy(update={"supervisor_id": "standby"})) as standby:
        addresses = f"{leader_address},{standby.address}"
        processes.worker(addresses, name="busy", concurrency=1)
        async with TaskloomClient(addresses) as client:
            task_id = await client.submit(
                "survives a frozen supervisor",
                plan=plan(("a", "gate", "A"), ("b", "echo", "B", "a")),
            )
            await eventually(lambda: (processes.test_dir / "started-a-1").exists())
            processes.worker(addresses, name="idle")
            await eventually(lambda: "connected to" in processes.log("idle"))
            leader.send_signal(signal.SIGSTOP)
            try:
                # The standby takes over and restores the attempt's lease: the
                # busy worker has until it lapses to come back.
                ref = AttemptRef(task_id, "a", 1)
                restored = await eventually(
                    lambda: standby.orchestrator is not None and standby.scheduler.lease(ref),
                    timeout=15,
                )
                lapses = restored.expires_at
                await eventually(lambda: _names(standby) == ["busy", "idle"], timeout=60)
                assert time.monotonic() < lapses, "a worker came back after the lease lapsed"
                (processes.test_dir / "open-a").write_text("")
                task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
            finally:
                leader.send_signal(signal.SIGCONT)
        events = await standby.store.read_events(task_id, "")
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.subtasks[0].attempt == 1
    assert not [e for e in events if e.type == "subtask.retrying"]


async def test_a_call_made_while_the_standby_takes_over_waits_for_it(
    supervisor_settings: SupervisorSettings, processes: Processes
) -> None:
    """With the default leader TTL and the SDK's default grace, a submit sent
    the moment the leader dies is not refused: the SDK keeps trying until the
    standby leads, and the task runs there."""
    settings = supervisor_settings.model_copy(
        update={"leader_ttl": SupervisorSettings.model_fields["leader_ttl"].default}
    )
    leader_address = f"127.0.0.1:{free_port()}"
    leader = await processes.supervisor(settings, listen=leader_address)
    async with Supervisor(settings.model_copy(update={"supervisor_id": "standby"})) as standby:
        addresses = f"{leader_address},{standby.address}"
        processes.worker(addresses, name="w1")
        async with TaskloomClient(addresses) as client:
            await client.submit("before", plan=plan(("a", "echo", "A")))
            leader.send_signal(signal.SIGKILL)
            leader.wait()
            assert standby.orchestrator is None
            task_id = await client.submit("during the takeover", plan=plan(("b", "echo", "B")))
            task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
        assert standby.orchestrator is not None
    assert task.status == TaskStatus.SUCCEEDED, task.error


async def test_a_supervisor_restarted_at_once_leads_at_once_and_its_workers_keep_their_work(
    supervisor_settings: SupervisorSettings, processes: Processes
) -> None:
    # A lease that would take 9 s to lapse, workers that fence their attempts
    # after 6 s without their supervisor: waiting the lease out would cost
    # every running subtask a second attempt.
    settings = supervisor_settings.model_copy(
        update={"leader_ttl": 9.0, "lease_ttl": 6.0, "heartbeat_interval": 1.0}
    )
    address = f"127.0.0.1:{free_port()}"
    first = await processes.supervisor(settings, listen=address, name="first")
    processes.worker(address, name="w1")
    async with TaskloomClient(address) as client:
        steps = [(f"g{i}", "gate", f"G{i}") for i in range(4)]
        task_id = await client.submit("survives a restart", plan=plan(*steps))
        started = [processes.test_dir / f"started-g{i}-1" for i in range(4)]
        await eventually(lambda: all(p.exists() for p in started))
        first.send_signal(signal.SIGKILL)
        first.wait()
        # The same host and address: the same identity in the lease.
        await processes.supervisor(settings, listen=address, name="again")
        for i in range(4):
            (processes.test_dir / f"open-g{i}").write_text("")
        task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert [s.attempt for s in task.subtasks] == [1, 1, 1, 1]
    assert "took back its own leader lease" in processes.log("again")


async def test_two_supervisors_cannot_listen_on_one_address(
    supervisor_settings: SupervisorSettings,
) -> None:
    async with Supervisor(supervisor_settings) as first:
        taken = supervisor_settings.model_copy(update={"listen": first.address})
        with pytest.raises(ConfigError, match="cannot listen"):
            await Supervisor(taken).start()
