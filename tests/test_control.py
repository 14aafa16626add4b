"""A person steers a task: plan approval, approval gates on subtasks, retry,
skip, pause and resume. A real supervisor, real worker processes, the SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import pytest

from taskloom.client import TaskloomClient
from taskloom.core.errors import InvalidArgument, PlanError, TaskFinished, TaskNotFound
from taskloom.core.model import Event, SubtaskStatus, Task, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import eventually, plan, wait_status, wait_subtask


def subtask(task: Task, subtask_id: str) -> object:
    return next(s for s in task.subtasks if s.id == subtask_id)


async def events_of(supervisor: Supervisor, task_id: str) -> list[Event]:
    """The whole log, including what comes after a terminal event."""
    return await supervisor.store.read_events(task_id, "0")


# -- plan approval ---------------------------------------------------------------------


async def test_a_plan_that_must_be_approved_waits_then_runs_once_approved(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    steps = plan(("a", "echo", "one"), ("b", "echo", "two", "a"))
    task_id = await client.submit("careful", plan=steps, approve_plan=True)

    waiting = await wait_status(client, task_id, TaskStatus.AWAITING_APPROVAL)
    # The whole graph is there to review, and nothing ran.
    assert [(s.id, s.status) for s in waiting.subtasks] == [
        ("a", SubtaskStatus.PENDING),
        ("b", SubtaskStatus.PENDING),
    ]
    await asyncio.sleep(0.5)
    assert (await client.get(task_id)).status == TaskStatus.AWAITING_APPROVAL

    await client.approve(task_id, reason="looks right")
    done = await client.wait(task_id)
    assert done.status == TaskStatus.SUCCEEDED
    approved = [e for e in await events_of(supervisor, task_id) if e.type == "plan.approved"]
    assert [(e.actor, e.message) for e in approved] == [("local", "approved by local: looks right")]


async def test_a_rejected_plan_cancels_the_task_with_the_reason(
    supervisor: Supervisor, client: TaskloomClient
) -> None:
    task_id = await client.submit("no", plan=plan(("a", "echo", "x")), approve_plan=True)
    await wait_status(client, task_id, TaskStatus.AWAITING_APPROVAL)
    task = await client.reject(task_id, reason="not this week")
    assert task.status == TaskStatus.CANCELLED
    assert task.error == "the plan was rejected by local: not this week"
    # Only a waiting plan can be approved or rejected.
    with pytest.raises(TaskFinished, match="only a task whose plan waits"):
        await client.approve(task_id)


async def test_a_plan_edited_before_approval_replaces_the_waiting_one(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    task_id = await client.submit("edit me", plan=plan(("a", "echo", "old")), approve_plan=True)
    await wait_status(client, task_id, TaskStatus.AWAITING_APPROVAL)
    # An edited plan is checked like any explicit one; a bad one changes nothing.
    with pytest.raises(PlanError, match="depends on missing zz"):
        await client.approve(task_id, plan=plan(("x", "echo", "new", "zz")))
    assert (await client.get(task_id)).status == TaskStatus.AWAITING_APPROVAL

    await client.approve(task_id, plan=plan(("x", "echo", "new"), ("y", "echo", "newer", "x")))
    done = await client.wait(task_id)
    assert done.status == TaskStatus.SUCCEEDED
    assert [s.id for s in done.subtasks] == ["x", "y"] and done.result == "newer"
    kinds = [e.type for e in await events_of(supervisor, task_id)]
    # The edit is logged, then the new plan.
    edited = kinds.index("plan.edited")
    assert kinds[edited + 1] == "plan.created"


async def test_a_replan_of_a_task_whose_plans_need_approval_asks_again(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    replacement = '{"subtasks": [{"id": "r1", "title": "R", "instruction": "instead", '
    replacement += '"capability": "echo", "depends_on": []}]}'
    fake_ollama.responder = lambda call: replacement
    processes.worker(supervisor.address)
    steps = plan(("a", "broken", "x"), ("b", "echo", "after", "a"))
    task_id = await client.submit("g", plan=steps, on_failure="replan", approve_plan=True)
    await wait_status(client, task_id, TaskStatus.AWAITING_APPROVAL)
    await client.approve(task_id)
    # a fails for good; the planner replaces it; the revision waits for a person.
    revised = await wait_status(client, task_id, TaskStatus.AWAITING_APPROVAL)
    assert "v2-r1" in {s.id for s in revised.subtasks}
    assert subtask(revised, "v2-r1").status == SubtaskStatus.PENDING  # type: ignore[attr-defined]
    await client.approve(task_id)
    done = await client.wait(task_id)
    assert done.status == TaskStatus.SUCCEEDED and done.result == "after"


async def test_a_planned_task_that_needs_approval_waits_after_the_model_plans_it(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    def respond(call: ChatCall) -> str:
        if call.planning:
            return (
                '{"subtasks": [{"id": "s1", "title": "Answer", "instruction": "answer it", '
                '"capability": "llm", "depends_on": []}]}'
            )
        return "an answer"

    fake_ollama.responder = respond
    processes.worker(supervisor.address)
    task_id = await client.submit("plan then ask", approve_plan=True, synthesize=False)
    waiting = await wait_status(client, task_id, TaskStatus.AWAITING_APPROVAL)
    assert [s.id for s in waiting.subtasks] == ["s1"]
    assert not [c for c in fake_ollama.calls if not c.planning]
    await client.approve(task_id)
    assert (await client.wait(task_id)).result == "an answer"


# -- approval gates on subtasks ----------------------------------------------------------


@pytest.fixture
def gated_settings(supervisor_settings: SupervisorSettings) -> SupervisorSettings:
    # Every `picky` subtask needs a person, whatever the plan says.
    return supervisor_settings.model_copy(update={"approval_capabilities": ("picky",)})


async def test_gated_subtasks_wait_with_their_inputs_until_approved_or_rejected(
    gated_settings: SupervisorSettings, processes: Processes
) -> None:
    async with Supervisor(gated_settings) as supervisor:
        processes.worker(supervisor.address)
        async with TaskloomClient(supervisor.address) as client:
            steps = plan(
                ("a", "echo", "facts"),
                ("send", "picky", "send it", "a"),  # gated by capability
                ("log", "echo", "logged", "a"),
                ("after", "echo", "done", "send"),
                synthesize=True,  # runs with what there is, as with on_failure=skip
            )
            steps["subtasks"][2]["requires_approval"] = True  # gated by the plan
            task_id = await client.submit("g", plan=steps)

            waiting = await wait_subtask(client, task_id, "send", "AWAITING_APPROVAL")
            assert subtask(waiting, "a").output == "facts"  # type: ignore[attr-defined]
            assert subtask(waiting, "send").requires_approval  # type: ignore[attr-defined]
            await wait_subtask(client, task_id, "log", "AWAITING_APPROVAL")
            assert await _awaiting(supervisor) == {"subtask": 2}

            await client.approve(task_id, subtask_id="send")
            await wait_subtask(client, task_id, "after", "SUCCEEDED")
            task = await client.reject(task_id, subtask_id="log", reason="not needed")
            done = await client.wait(task_id)
            assert done.status == TaskStatus.SUCCEEDED
            log = subtask(done, "log")
            assert log.status == SubtaskStatus.SKIPPED  # type: ignore[attr-defined]
            assert log.error == "rejected by local: not needed"  # type: ignore[attr-defined]
            assert task.id == task_id and await _awaiting(supervisor) == {"subtask": 0}
            waits = supervisor.metrics.registry.get_sample_value(
                "taskloom_approval_wait_seconds_count", {"kind": "subtask"}
            )
            assert waits == 2


async def _awaiting(supervisor: Supervisor) -> dict[str, int]:
    return {
        kind: count
        for kind, (count, _) in supervisor.current().approvals().items()
        if kind == "subtask"
    }


# -- intervention --------------------------------------------------------------------------


async def test_retry_with_a_new_instruction_reopens_a_failed_task(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    processes.worker(supervisor.address)
    steps = plan(("a", "echo", "A"), ("p", "picky", "fail now", "a"), ("z", "echo", "Z", "p"))
    task_id = await client.submit("g", plan=steps)
    failed = await wait_status(client, task_id, TaskStatus.FAILED)
    assert subtask(failed, "z").status == SubtaskStatus.CANCELLED  # type: ignore[attr-defined]

    # Only the subtask whose failure ended the task can be retried.
    with pytest.raises(TaskFinished, match="failed because subtask p failed"):
        await client.retry(task_id, "z")
    with pytest.raises(InvalidArgument, match="has no subtask nope"):
        await client.retry(task_id, "nope")

    await client.retry(task_id, "p", instruction="all good", reason="fixed the input")
    done = await client.wait(task_id)
    assert done.status == TaskStatus.SUCCEEDED, done.error
    p = subtask(done, "p")
    assert (p.instruction, p.output, p.attempt) == ("all good", "all good[A]", 2)  # type: ignore[attr-defined]
    assert done.result == "Z" and done.error == ""
    kinds = [(e.type, e.subtask_id) for e in await events_of(supervisor, task_id)]
    assert kinds.index(("task.failed", "")) < kinds.index(("task.reopened", ""))
    assert ("subtask.retried", "p") in kinds and ("subtask.reset", "z") in kinds
    # A watch from the start follows the reopened task to its last end.
    events = [e async for e in client.watch(task_id)]
    assert events[-1].type == "task.succeeded"
    assert (test_dir / "attempt-p-2").read_text() == "all good"


async def test_skip_with_an_output_lets_the_dependents_run_on_it(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    steps = plan(("p", "picky", "fail please"), ("z", "picky", "use", "p"))
    task_id = await client.submit("g", plan=steps)
    await wait_status(client, task_id, TaskStatus.FAILED)
    task = await client.skip(task_id, "p", output="given by hand", reason="known answer")
    assert task.status == TaskStatus.RUNNING
    done = await client.wait(task_id)
    assert done.status == TaskStatus.SUCCEEDED
    assert subtask(done, "p").status == SubtaskStatus.SKIPPED  # type: ignore[attr-defined]
    assert done.result == "use[given by hand]"
    provided = [e for e in await events_of(supervisor, task_id) if e.type == "subtask.provided"]
    assert [e.actor for e in provided] == ["local"]


async def test_a_pending_subtask_can_be_skipped_before_it_runs(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    processes.worker(supervisor.address)
    steps = plan(("g", "gate", "wait"), ("x", "echo", "never", "g"), ("y", "echo", "Y", "x"))
    task_id = await client.submit("g", plan=steps)
    await eventually(lambda: (test_dir / "started-g-1").exists())
    with pytest.raises(TaskFinished, match="is RUNNING; cancel it first"):
        await client.skip(task_id, "g")
    await client.skip(task_id, "x", output="X by hand")
    (test_dir / "open-g").touch()
    done = await client.wait(task_id)
    assert done.status == TaskStatus.SUCCEEDED and done.result == "Y"
    assert subtask(done, "x").output == "X by hand"  # type: ignore[attr-defined]


async def test_pause_lets_running_attempts_finish_and_starts_nothing_until_resumed(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    processes.worker(supervisor.address)
    steps = plan(("g", "gate", "slow"), ("h", "gate", "next", "g"))
    task_id = await client.submit("g", plan=steps)
    await eventually(lambda: (test_dir / "started-g-1").exists())
    paused = await client.pause(task_id, reason="lunch")
    assert paused.paused and paused.status == TaskStatus.RUNNING
    (test_dir / "open-g").touch()
    (test_dir / "open-h").touch()
    # g finishes and commits; h is READY but nobody is given it.
    await wait_subtask(client, task_id, "g", "SUCCEEDED")
    await wait_subtask(client, task_id, "h", "READY")
    await asyncio.sleep(1.0)
    assert not (test_dir / "started-h-1").exists()
    assert (await client.get(task_id)).paused

    await client.resume(task_id)
    done = await client.wait(task_id)
    assert done.status == TaskStatus.SUCCEEDED and not done.paused
    kinds = [e.type for e in await events_of(supervisor, task_id)]
    assert kinds.count("task.paused") == 1 and kinds.count("task.resumed") == 1


async def test_steering_bad_requests_get_clear_errors_and_change_nothing(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    task_id = await client.submit("g", plan=plan(("a", "echo", "x")))
    await client.wait(task_id)
    with pytest.raises(TaskNotFound):
        await client.approve("0123456789abcdef0123")
    with pytest.raises(TaskNotFound):
        await client.pause("not a task id")
    with pytest.raises(TaskFinished, match="already SUCCEEDED"):
        await client.retry(task_id, "a")
    with pytest.raises(TaskFinished, match="already ended as SUCCEEDED"):
        await client.pause(task_id)
    with pytest.raises(InvalidArgument, match="name the subtask"):
        await client.skip(task_id, "")
    before = await events_of(supervisor, task_id)
    with pytest.raises(TaskFinished):
        await client.approve(task_id, subtask_id="a")
    assert await events_of(supervisor, task_id) == before


# -- across failovers ----------------------------------------------------------------------


async def _leading(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def _anyone_leads(addresses: Iterable[str]) -> bool:
    return any([await _leading(a) for a in addresses])


async def test_each_action_holds_across_a_failover_right_after_it(
    supervisor_settings: SupervisorSettings, processes: Processes, test_dir: Path
) -> None:
    """After each action the leader is SIGKILLed as soon as the action is
    acknowledged (what it had yet to do in memory is lost) and comes back as
    the standby; the other supervisor carries on from Redis."""
    from taskloom.core.localredis import free_port

    # A worker's lease must outlast a takeover (the leader's lease lapsing,
    # then the worker's backoff): docs/architecture.md gives the inequality.
    settings = supervisor_settings.model_copy(update={"leader_ttl": 2.0, "lease_ttl": 6.0})
    names = {f"127.0.0.1:{free_port()}": name for name in ("a", "b")}
    running = {}
    for i, (address, name) in enumerate(names.items()):
        running[address] = await processes.supervisor(
            settings, listen=address, name=name, standby=i > 0
        )
    addresses = ",".join(names)
    processes.worker(addresses, name="w")

    def sessions() -> int:
        return processes.log("w").count("connected to supervisor")

    async def failover() -> None:
        (leader,) = [a for a in names if await _leading(a)]
        before = sessions()
        running[leader].kill()
        running[leader].wait()
        running[leader] = await processes.supervisor(
            settings, listen=leader, name=names[leader], standby=True
        )
        # Either may win the lease now. The next action waits for the worker
        # to be back with it: the subject here is what the actions leave in
        # Redis, not whether a worker can ride two failovers a second apart.
        await eventually(lambda: _anyone_leads(names), timeout=30)
        await eventually(lambda: sessions() > before, timeout=30)

    async with TaskloomClient(addresses) as client:
        steps = plan(
            ("g", "gate", "wait"),
            ("s", "picky", "send", "g"),
            ("p", "picky", "fail first", "s"),
            ("z", "echo", "Z", "p"),
        )
        steps["subtasks"][1]["requires_approval"] = True
        main = await client.submit("main", plan=steps, approve_plan=True)
        other = await client.submit("other", plan=plan(("q", "picky", "fail")))
        doomed = await client.submit("doomed", plan=plan(("d", "echo", "x")), approve_plan=True)
        await wait_status(client, main, TaskStatus.AWAITING_APPROVAL)
        await wait_status(client, other, TaskStatus.FAILED)

        await client.approve(main)
        await failover()
        await eventually(lambda: (test_dir / "started-g-1").exists(), timeout=30)

        await client.pause(main)
        await failover()
        (test_dir / "open-g").touch()
        await wait_subtask(client, main, "s", "AWAITING_APPROVAL")
        assert (await client.get(main)).paused

        await client.approve(main, subtask_id="s")
        await failover()
        await wait_subtask(client, main, "s", "READY")
        await asyncio.sleep(1.0)
        assert not (test_dir / "attempt-s-1").exists()  # still paused

        await client.resume(main)
        await failover()
        await wait_status(client, main, TaskStatus.FAILED)  # p refuses

        await client.retry(main, "p", instruction="fine now")
        await failover()
        done = await wait_status(client, main, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
        assert done.status == TaskStatus.SUCCEEDED, done.error
        assert done.result == "Z"

        await client.skip(other, "q", output="by hand")
        await failover()
        assert (await wait_status(client, other, TaskStatus.SUCCEEDED)).result == "by hand"

        await client.reject(doomed, reason="no")
        await failover()
        assert (await client.get(doomed)).status == TaskStatus.CANCELLED
