"""The whole loop on real parts: goal → plan from an Ollama-speaking server →
Redis → worker processes over bidirectional streams → synthesized answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from taskloom.client import TaskloomClient
from taskloom.core.errors import InvalidArgument, PlanError, StoreUnavailable, TaskNotFound
from taskloom.core.localredis import LocalRedis, free_port
from taskloom.core.model import Event, EventType, SubtaskStatus, Task, TaskStatus
from taskloom.supervisor import watching
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.scheduler import WorkerSession
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama, HTTPError
from tests.helpers import eventually, plan, wait_status, wait_subtask

DIAMOND = {
    "subtasks": [
        {"id": "facts", "title": "Facts", "instruction": "List the facts.", "capability": "llm",
         "depends_on": []},
        {"id": "pros", "title": "Pros", "instruction": "List the pros.", "capability": "llm",
         "depends_on": ["facts"]},
        {"id": "cons", "title": "Cons", "instruction": "List the cons.", "capability": "llm",
         "depends_on": ["facts"]},
        {"id": "verdict", "title": "Verdict", "instruction": "Weigh them.", "capability": "llm",
         "depends_on": ["pros", "cons"], "confidence": "ignored extra field"},
    ]
}  # fmt: skip
OUTPUTS = {"Facts": "FACT-1", "Pros": "PRO-1", "Cons": "CON-1", "Verdict": "VERDICT-1"}


def answered(call: ChatCall) -> float:
    assert call.responded_at is not None
    return call.responded_at


async def test_goal_planned_into_a_diamond_runs_on_two_workers(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    # Pros and Cons are answered only once both are being asked at the same
    # time: the task can only succeed if the two ran in parallel.
    both_in_flight = threading.Barrier(2, timeout=30)

    def respond(call: ChatCall) -> str | HTTPError:
        if call.planning:
            return json.dumps(DIAMOND)
        step = re.search(r"Your step: (.+)\n", call.prompt)
        title = step.group(1) if step else ""
        if title in ("Pros", "Cons"):
            both_in_flight.wait()
        return OUTPUTS.get(title, "FINAL ANSWER")

    fake_ollama.responder = respond
    processes.worker(supervisor.address, name="w1", concurrency=1)
    processes.worker(supervisor.address, name="w2", concurrency=1)
    await eventually(lambda: len(supervisor.scheduler.sessions()) == 2)

    task_id = await client.submit("Should I buy an e-bike?")
    task = await client.wait(task_id)

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == "FINAL ANSWER"
    subtasks = {s.id: s for s in task.subtasks}
    assert list(subtasks) == ["facts", "pros", "cons", "verdict", "synthesize"]
    assert subtasks["synthesize"].depends_on == ("verdict",)
    assert all(s.status == SubtaskStatus.SUCCEEDED and s.attempt == 1 for s in task.subtasks)
    assert {subtasks["pros"].worker, subtasks["cons"].worker} == {"w1", "w2"}
    assert subtasks["verdict"].output == "VERDICT-1"

    calls = {title: fake_ollama.step_calls(title) for title in OUTPUTS}
    assert all(len(c) == 1 for c in calls.values()), calls
    facts, pros, cons, verdict = (calls[t][0] for t in OUTPUTS)
    synthesis = fake_ollama.step_calls("Synthesize the final answer")[0]
    # Dependents start only after their dependencies answered...
    assert pros.received_at > answered(facts)
    assert cons.received_at > answered(facts)
    assert verdict.received_at > max(answered(pros), answered(cons))
    assert synthesis.received_at > answered(verdict)
    # ...and see their direct dependencies' outputs, and the goal.
    assert "FACT-1" in pros.prompt and "FACT-1" in cons.prompt
    assert "PRO-1" in verdict.prompt and "CON-1" in verdict.prompt
    assert "FACT-1" not in verdict.prompt
    assert "VERDICT-1" in synthesis.prompt
    assert "Should I buy an e-bike?" in verdict.prompt

    (planning,) = fake_ollama.planning_calls()
    assert planning.options["temperature"] == 0
    assert "<goal>\nShould I buy an e-bike?\n</goal>" in planning.prompt
    item = planning.format["properties"]["subtasks"]["items"]["properties"]
    assert set(item["capability"]["enum"]) >= {"llm", "echo", "gate"}
    assert "llm" in planning.system and "gate" in planning.system

    events = [e async for e in client.watch(task_id)]
    types = [e.type for e in events]
    assert types[:3] == ["task.submitted", "plan.requested", "plan.created"]
    assert types[-1] == "task.succeeded"
    ends = {e.subtask_id: i for i, e in enumerate(events) if e.type == "subtask.succeeded"}
    starts = {e.subtask_id: i for i, e in enumerate(events) if e.type == "subtask.assigned"}
    assert starts["verdict"] > max(ends["pros"], ends["cons"])


async def test_watch_resumed_from_its_last_event_gets_every_remaining_event_once(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    processes.worker(supervisor.address)
    task_id = await client.submit(
        "a chain",
        plan=plan(("a", "echo", "one"), ("g", "gate", "two", "a"), ("c", "echo", "3", "g")),
    )
    first: list[Event] = []
    async with contextlib.aclosing(client.watch(task_id)) as events:
        async for event in events:
            first.append(event)
            if event.subtask_id == "g" and event.type == "subtask.running":
                break
    (test_dir / "open-g").touch()

    rest = [e async for e in client.watch(task_id, after_event_id=first[-1].id)]
    whole = [e async for e in client.watch(task_id)]

    assert [e.id for e in first + rest] == [e.id for e in whole]
    assert len({e.id for e in whole}) == len(whole)
    assert rest[0].id > first[-1].id
    assert whole[-1].type == "task.succeeded"
    # A cursor past the terminal event ends at once.
    assert [e async for e in client.watch(task_id, after_event_id=whole[-1].id)] == []


async def test_waiting_for_the_end_alone_gets_only_the_terminal_event(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    test_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No periodic re-check: only the supervisor telling the watch can end it.
    monkeypatch.setattr(watching, "WATCH_WAIT", 3600.0)
    processes.worker(supervisor.address)
    task_id = await client.submit(
        "wait for me", plan=plan(("a", "echo", "one"), ("g", "gate", "two", "a"))
    )
    waiting = asyncio.create_task(_collect_terminal(client, task_id))
    await eventually(lambda: (test_dir / "started-g-1").exists())
    assert not waiting.done()
    (test_dir / "open-g").touch()
    (only,) = await asyncio.wait_for(waiting, 60)
    assert only.type == "task.succeeded"
    whole = [e async for e in client.watch(task_id)]
    assert only == whole[-1]
    # Once the task has ended it comes at once; the result is there too.
    assert [e.id async for e in client.watch(task_id, terminal_only=True)] == [only.id]
    assert (await client.wait(task_id)).result == "two[one]"


async def test_waiting_for_the_end_of_a_cancelled_task_gets_its_cancellation(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    test_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Cancelling returns no event to hand over: the watch reads it once woken.
    monkeypatch.setattr(watching, "WATCH_WAIT", 3600.0)
    processes.worker(supervisor.address)
    task_id = await client.submit("cancel me", plan=plan(("g", "gate", "one")))
    waiting = asyncio.create_task(_collect_terminal(client, task_id))
    await eventually(lambda: (test_dir / "started-g-1").exists())
    await client.cancel(task_id)
    (only,) = await asyncio.wait_for(waiting, 60)
    assert (only.type, only.status) == ("task.cancelled", "CANCELLED")


async def test_waiting_for_a_task_that_ended_unheard_of_sees_its_end(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    test_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The write that ends a task may lose its reply (Redis dies mid-way): the
    # supervisor, which thinks the task still runs, must not wait for ever.
    monkeypatch.setattr(watching, "WATCH_WAIT", 0.2)
    processes.worker(supervisor.address)
    task_id = await client.submit("end me quietly", plan=plan(("g", "gate", "one")))
    await eventually(lambda: (test_dir / "started-g-1").exists())
    _, ended = await supervisor.store.finish(
        task_id, TaskStatus.CANCELLED, "behind its back", EventType.TASK_CANCELLED,
        expected=(TaskStatus.RUNNING,),
    )  # fmt: skip
    assert ended.finished
    (only,) = await asyncio.wait_for(_collect_terminal(client, task_id), 30)
    assert (only.type, only.message) == ("task.cancelled", "behind its back")
    # Seen once, the end is remembered like any other.
    assert [e.id for e in await _collect_terminal(client, task_id)] == [only.id]
    (test_dir / "open-g").touch()


class _Clock:
    """``time`` for the watching module, counting its looks at the clock."""

    def __init__(self) -> None:
        self.looks = 0

    def monotonic(self) -> float:
        self.looks += 1
        return time.monotonic()


async def test_a_session_that_waits_for_nothing_costs_nothing(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A client's Session stream that has had its tasks' ends sleeps until the
    next periodic look (WATCH_WAIT away). It used to spin once that time had
    passed with nothing to wait for: each look at once timed out and looked
    again, 12 % of a loaded supervisor's CPU."""
    monkeypatch.setattr(watching, "WATCH_WAIT", 0.05)
    processes.worker(supervisor.address, capabilities="echo")
    task_id = await client.submit("one", plan=plan(("a", "echo", "1")))
    assert (await client.wait(task_id)).status == TaskStatus.SUCCEEDED
    clock = _Clock()
    monkeypatch.setattr(watching, "time", clock)
    began = time.monotonic()
    await asyncio.sleep(1.0)
    # A few looks per WATCH_WAIT at most (the spin made thousands a second).
    periods = (time.monotonic() - began) / watching.WATCH_WAIT + 1
    assert clock.looks <= 4 * periods, (clock.looks, periods)


async def _collect_terminal(client: TaskloomClient, task_id: str) -> list[Event]:
    return [e async for e in client.watch(task_id, terminal_only=True)]


async def _collect(client: TaskloomClient, task_id: str) -> list[Event]:
    return [e async for e in client.watch(task_id)]


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
async def test_supervisor_stopped_mid_task_and_restarted_finishes_the_task(
    stop: signal.Signals,
    supervisor_settings: SupervisorSettings,
    processes: Processes,
    listen_address: str,
    test_dir: Path,
    tmp_path: Path,
) -> None:
    first = await processes.supervisor(
        supervisor_settings, listen=listen_address, name="supervisor-1"
    )
    processes.worker(listen_address, name="w1")
    async with TaskloomClient(listen_address) as client:
        task_id = await client.submit(
            "survive", plan=plan(("a", "gate", "A"), ("b", "gate", "B", "a"))
        )
        # A watcher that lives through the outage: it resumes by itself.
        watched = asyncio.create_task(_collect(client, task_id))
        await wait_subtask(client, task_id, "a", "RUNNING")
        first.send_signal(stop)
        assert await asyncio.to_thread(first.wait, 30) == (0 if stop == signal.SIGTERM else -stop)
        # The worker finishes `a` while no supervisor runs; it keeps the
        # unacknowledged result and reports it to the next supervisor.
        (test_dir / "open-a").touch()
        await eventually(lambda: (test_dir / "finished-a-1").exists())

        await processes.supervisor(supervisor_settings, listen=listen_address, name="supervisor-2")
        await wait_subtask(client, task_id, "b", "RUNNING")
        (test_dir / "open-b").touch()
        task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
        seen = await asyncio.wait_for(watched, 30)
        whole = [e async for e in client.watch(task_id)]

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert [e.id for e in seen] == [e.id for e in whole]
    assert seen[-1].type == "task.succeeded"
    subtasks = {s.id: s for s in task.subtasks}
    assert subtasks["a"].attempt == 1
    assert not (test_dir / "started-a-2").exists()
    assert subtasks["b"].output == "B[A]"
    if stop == signal.SIGTERM:
        log = (tmp_path / "w1.log").read_text()
        assert "supervisor is going away (the supervisor is shutting down)" in log


async def test_a_redis_that_stops_answering_for_a_while_costs_time_not_work(
    supervisor_settings: SupervisorSettings,
    redis_server: LocalRedis,
    processes: Processes,
    listen_address: str,
    test_dir: Path,
) -> None:
    """Redis frozen (a stalled disk under ``appendfsync always``, a long
    fork): its connections stay open and nothing answers. The leader's lease
    lapses meanwhile. When Redis answers again the task goes on: the result
    the worker reported during the freeze is kept, nothing runs twice, a
    submit made during the freeze either went through or said why, and the
    watcher missed nothing."""
    await processes.supervisor(supervisor_settings, listen=listen_address)
    processes.worker(listen_address, name="w1")
    assert redis_server.process is not None
    async with TaskloomClient(listen_address) as client:
        task_id = await client.submit(
            "survive a frozen redis", plan=plan(("a", "gate", "A"), ("b", "gate", "B", "a"))
        )
        watched = asyncio.create_task(_collect(client, task_id))
        await wait_subtask(client, task_id, "a", "RUNNING")
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            (test_dir / "open-a").touch()
            await eventually(lambda: (test_dir / "finished-a-1").exists())
            during = asyncio.create_task(
                client.submit("submitted during the freeze", plan=plan(("c", "echo", "C")))
            )
            # The fault: frozen past the leader's lease.
            await asyncio.sleep(supervisor_settings.leader_ttl + 2)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        await wait_subtask(client, task_id, "b", "RUNNING")
        (test_dir / "open-b").touch()
        task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
        seen = await asyncio.wait_for(watched, 30)
        whole = [e async for e in client.watch(task_id)]
        other: Task | StoreUnavailable
        try:
            other = await wait_status(client, await during, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
        except StoreUnavailable as e:
            other = e

    if isinstance(other, StoreUnavailable):
        # On a machine slow enough, the freeze outlasted Redis's timeout,
        # and the submit said so.
        assert "Redis at" in str(other), other
    else:
        # The supervisor stepped down when its lease turned out to have
        # lapsed, and leads again: the SDK waited for it.
        assert other.status == TaskStatus.SUCCEEDED, other.error

    assert task.status == TaskStatus.SUCCEEDED, task.error
    subtasks = {s.id: s for s in task.subtasks}
    assert subtasks["a"].attempt == 1 and not (test_dir / "started-a-2").exists()
    assert subtasks["b"].output == "B[A]"
    assert [e.id for e in seen] == [e.id for e in whole]
    # The worker, holding a result not yet acknowledged, kept beating: the
    # supervisor never took it for dead.
    assert "sent nothing" not in processes.log("supervisor")


async def test_work_of_a_worker_that_never_comes_back_runs_again_elsewhere(
    supervisor_settings: SupervisorSettings,
    processes: Processes,
    listen_address: str,
    test_dir: Path,
) -> None:
    first = await processes.supervisor(
        supervisor_settings, listen=listen_address, name="supervisor-1"
    )
    lost = processes.worker(listen_address, name="lost")
    async with TaskloomClient(listen_address) as client:
        task_id = await client.submit("orphan", plan=plan(("x", "gate", "X")))
        await wait_subtask(client, task_id, "x", "RUNNING")
        for process in (first, lost):
            process.kill()
            process.wait()

        await processes.supervisor(supervisor_settings, listen=listen_address, name="supervisor-2")
        processes.worker(listen_address, name="survivor")
        await eventually(lambda: (test_dir / "started-x-2").exists())
        (test_dir / "open-x").touch()
        task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
        events = [e async for e in client.watch(task_id)]

    assert task.status == TaskStatus.SUCCEEDED, task.error
    (x,) = task.subtasks
    assert (x.attempt, x.worker) == (2, "survivor")
    assert (test_dir / "started-x-2").read_text() == "survivor"
    retry = next(e for e in events if e.type == "subtask.retrying")
    assert "lost stopped answering and its lease expired" in retry.message


async def test_bad_requests_get_clear_errors_and_the_supervisor_keeps_serving(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    with pytest.raises(InvalidArgument, match="the goal is empty"):
        await client.submit("   ")
    with pytest.raises(InvalidArgument, match=r"20,001 characters; the limit is 20,000"):
        await client.submit("x" * 20_001)
    with pytest.raises(PlanError, match="cycle a → b → a"):
        await client.submit("g", plan=plan(("a", "echo", "1", "b"), ("b", "echo", "2", "a")))
    with pytest.raises(PlanError, match="a uses unknown capability 'teleport'"):
        await client.submit("g", plan=plan(("a", "teleport", "1")))
    with pytest.raises(PlanError, match="a depends on missing nine"):
        await client.submit("g", plan=plan(("a", "echo", "1", "nine")))
    with pytest.raises(PlanError, match="the plan has no subtasks"):
        await client.submit("g", plan={"subtasks": []})
    with pytest.raises(TaskNotFound, match="no task with id 'feedfacefeedface'"):
        await client.get("feedfacefeedface")
    with pytest.raises(TaskNotFound):
        await client.cancel("feedfacefeedface")
    with pytest.raises(TaskNotFound):
        [e async for e in client.watch("no/such:task")]
    task_id = await client.submit("fine", plan=plan(("a", "echo", "ok")))
    with pytest.raises(InvalidArgument, match="is not an event id"):
        [e async for e in client.watch(task_id, after_event_id="yesterday")]

    processes.worker(supervisor.address)
    task = await client.wait(task_id)
    assert (task.status, task.result) == (TaskStatus.SUCCEEDED, "ok")


BAD_PLANS = {
    "capability": (plan(("a", "teleport", "x")), "a uses unknown capability 'teleport'"),
    # (A dependency on a missing id, a cycle and a duplicate id are fixed at
    # the last attempt instead: see test_planning_robustness.)
    "placeholder": (plan(("a", "llm", "s1")), "a's instruction 's1' is a placeholder"),
    "not json": ("this is not a plan", "not valid JSON"),
}


@pytest.mark.parametrize("kind", BAD_PLANS)
async def test_a_model_that_keeps_returning_a_bad_plan_fails_the_task_with_the_reason(
    kind: str, client: TaskloomClient, fake_ollama: FakeOllama
) -> None:
    document, reason = BAD_PLANS[kind]
    reply = document if isinstance(document, str) else json.dumps(document)
    fake_ollama.responder = lambda call: reply
    task_id = await client.submit("do something")
    task = await wait_status(client, task_id, TaskStatus.FAILED)

    assert "did not produce a valid plan after 3 repairs" in task.error
    assert reason in task.error
    calls = fake_ollama.planning_calls()
    assert len(calls) == 4
    assert reason in calls[-1].prompt and "Return the whole corrected plan" in calls[-1].prompt
    events = [e async for e in client.watch(task_id)]
    assert [e.type for e in events].count("plan.rejected") == 4
    assert events[-1].type == "task.failed"


async def test_a_bad_plan_is_repaired_by_the_model(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    duplicated = plan(("s1", "echo", "one"), ("s1", "echo", "two"))
    fixed = plan(("s1", "echo", "one"), ("s2", "echo", "two", "s1"))
    fake_ollama.responder = lambda call: json.dumps(
        fixed if len(fake_ollama.planning_calls()) > 1 else duplicated
    )
    processes.worker(supervisor.address)
    task_id = await client.submit("count to two", synthesize=False)
    task = await client.wait(task_id)

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == "two"
    repair = fake_ollama.planning_calls()[1]
    assert "duplicate id s1" in repair.prompt
    assert any(m["role"] == "assistant" for m in repair.messages)
    events = [e async for e in client.watch(task_id)]
    rejected = [e for e in events if e.type == "plan.rejected"]
    assert len(rejected) == 1 and "duplicate id s1" in rejected[0].message


async def test_an_unreachable_ollama_fails_the_task_readably_and_explicit_plans_still_run(
    supervisor_settings: SupervisorSettings, processes: Processes
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = supervisor_settings.model_copy(update={"ollama_host": dead})
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        task_id = await client.submit("needs a model")
        task = await wait_status(client, task_id, TaskStatus.FAILED)
        assert task.error == (
            f"planning failed: cannot reach Ollama at {dead} (no answer); start it with "
            "`ollama serve` or point OLLAMA_HOST at a running server"
        )
        processes.worker(supervisor.address)
        task = await client.wait(await client.submit("no model", plan=plan(("a", "echo", "ok"))))
        assert task.status == TaskStatus.SUCCEEDED


async def test_an_explicit_plan_of_ten_thousand_subtasks_runs_to_the_end(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    """Fan-out/fan-in: one root, 9,998 in the middle, one sink that needs them all."""
    middle = [(f"m{i}", "echo", f"v{i}", "root") for i in range(9_998)]
    document = plan(
        ("root", "echo", "r"), *middle, ("sink", "echo", "done", *[m[0] for m in middle])
    )
    processes.worker(supervisor.address, concurrency=64)
    processes.worker(supervisor.address, concurrency=64)
    task = await client.wait(await client.submit("big", plan=document))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert (task.subtasks_total, task.subtasks_succeeded, task.result) == (10_000, 10_000, "done")
    assert len(task.subtasks) == 10_000
    assert {s.attempt for s in task.subtasks} == {1}
    assert task.subtasks[-1].depends_on == tuple(m[0] for m in middle)


async def test_a_task_cancelled_while_the_model_plans_stays_cancelled(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama
) -> None:
    planning = threading.Event()
    cancelled = threading.Event()

    def respond(call: ChatCall) -> str:
        planning.set()
        cancelled.wait(30)
        return json.dumps(plan(("a", "echo", "too late")))

    fake_ollama.responder = respond
    task_id = await client.submit("slow to plan")
    await eventually(planning.is_set)
    task = await client.cancel(task_id, "no longer needed")
    cancelled.set()
    # The plan arrives after the cancellation; wait until the planner is done with it.
    await eventually(lambda: not supervisor.current().planning.jobs)
    log = await supervisor.store.read_events(task_id, "")

    assert (task.status, task.error) == (TaskStatus.CANCELLED, "no longer needed")
    assert [e.type for e in log] == ["task.submitted", "plan.requested", "task.cancelled"]
    final = await client.get(task_id)
    assert (final.status, final.subtasks) == (TaskStatus.CANCELLED, ())


def _session(supervisor: Supervisor, name: str) -> WorkerSession | None:
    """The connected session of the worker called ``name``, if any."""
    return next((s for s in supervisor.scheduler.sessions() if s.info.name == name), None)


async def test_an_idle_worker_is_silent_and_kept_and_a_frozen_one_loses_the_work_it_is_given(
    supervisor_settings: SupervisorSettings, processes: Processes, test_dir: Path
) -> None:
    """A worker that runs nothing sends nothing, and the supervisor keeps it
    past any number of lease TTLs. If it has in fact died (frozen here: its
    stream stays open), the work it is then given moves on one TTL later."""
    ttl = 1.0
    settings = supervisor_settings.model_copy(update={"lease_ttl": ttl, "heartbeat_interval": 0.1})
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        idle = processes.worker(supervisor.address, name="idle")
        session = await eventually(lambda: _session(supervisor, "idle"))
        heard = session.last_seen
        # What is shown is that nothing happens, so this waits a fixed time:
        # three TTLs, thirty heartbeat intervals. Nothing heard, nothing reaped.
        await asyncio.sleep(3 * ttl)
        assert supervisor.scheduler.sessions() == [session] and not session.closed
        assert session.last_seen == heard

        idle.send_signal(signal.SIGSTOP)
        try:
            task_id = await client.submit("to a frozen worker", plan=plan(("x", "gate", "X")))
            # Given the work, its silence counts: one TTL later it is closed.
            await eventually(lambda: session.closed)
            processes.worker(supervisor.address, name="healthy")
            await eventually(lambda: (test_dir / "started-x-2").exists())
            (test_dir / "open-x").touch()
            task = await client.wait(task_id)
        finally:
            idle.send_signal(signal.SIGCONT)
        assert task.status == TaskStatus.SUCCEEDED
        assert (task.subtasks[0].attempt, task.subtasks[0].worker) == (2, "healthy")
        events = await supervisor.store.read_events(task_id, "")
        assigned = [e.worker for e in events if e.type == "subtask.assigned"]
        assert assigned == ["idle", "healthy"]
        retry = next(e for e in events if e.type == "subtask.retrying")
        assert "worker idle stopped answering and its lease expired" in retry.message


async def test_an_idle_worker_that_stops_answering_is_dropped_by_keepalive_and_comes_back(
    supervisor_settings: SupervisorSettings, processes: Processes
) -> None:
    """A frozen idle worker holds nothing, so no lease finds it: the server's
    keepalive ping does, and closes its connection. Thawed, it reconnects."""
    settings = supervisor_settings.model_copy(
        update={"keepalive_interval": 1.0, "keepalive_timeout": 1.0}
    )
    async with Supervisor(settings) as supervisor:
        idle = processes.worker(supervisor.address, name="idle")
        first = await eventually(lambda: _session(supervisor, "idle"))
        idle.send_signal(signal.SIGSTOP)
        try:
            await eventually(lambda: first.closed and _session(supervisor, "idle") is None)
        finally:
            idle.send_signal(signal.SIGCONT)
        second = await eventually(lambda: _session(supervisor, "idle"))
        assert second is not first and not second.closed


async def test_a_worker_finds_a_frozen_supervisor_by_keepalive_and_comes_back(
    supervisor_settings: SupervisorSettings,
    processes: Processes,
    listen_address: str,
    tmp_path: Path,
) -> None:
    """The stream to a supervisor that stops answering (frozen here; cut off by
    the network alike) carries nothing an idle worker would notice: the
    worker's own keepalive ping finds it, and the worker reconnects."""
    keepalive = {"keepalive_interval": 1.0, "keepalive_timeout": 1.0}
    frozen = await processes.supervisor(
        supervisor_settings.model_copy(update=keepalive), listen=listen_address
    )
    processes.worker(
        listen_address,
        name="w",
        env={"TASKLOOM_KEEPALIVE_INTERVAL": "1s", "TASKLOOM_KEEPALIVE_TIMEOUT": "1s"},
    )
    log = tmp_path / "w.log"
    async with TaskloomClient(listen_address) as client:
        first = await client.wait(await client.submit("one", plan=plan(("a", "echo", "A"))))
        assert first.status == TaskStatus.SUCCEEDED
        before = len(log.read_text())
        frozen.send_signal(signal.SIGSTOP)
        try:
            # These timings take about 2 s; the defaults up to 10 s (a ping
            # every 5 s, 5 s to answer).
            await eventually(lambda: "reconnecting" in log.read_text()[before:], timeout=8)
        finally:
            frozen.send_signal(signal.SIGCONT)
        second = await client.wait(await client.submit("two", plan=plan(("b", "echo", "B"))))
    assert second.status == TaskStatus.SUCCEEDED


async def test_a_frozen_worker_loses_its_lease_and_its_late_result_changes_nothing(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    frozen = processes.worker(supervisor.address, name="frozen")
    task_id = await client.submit("freeze", plan=plan(("x", "gate", "X")))
    await eventually(lambda: (test_dir / "started-x-1").exists())
    # Its stream stays open, but no heartbeat comes: after the lease TTL the
    # subtask runs again elsewhere.
    frozen.send_signal(signal.SIGSTOP)
    processes.worker(supervisor.address, name="healthy")
    await eventually(lambda: (test_dir / "started-x-2").exists())
    (test_dir / "open-x").touch()
    task = await client.wait(task_id)
    assert task.status == TaskStatus.SUCCEEDED
    assert (task.subtasks[0].attempt, task.subtasks[0].worker) == (2, "healthy")

    # Thawed, it finishes attempt 1, reconnects and reports: the report is stale.
    frozen.send_signal(signal.SIGCONT)
    await eventually(lambda: (test_dir / "finished-x-1").exists())
    await eventually(lambda: _session(supervisor, "frozen"))
    after = await client.get(task_id)
    assert (after.subtasks[0].attempt, after.subtasks[0].worker) == (2, "healthy")
    events = await supervisor.store.read_events(task_id, "")
    assert [e.worker for e in events if e.type == "subtask.succeeded"] == ["healthy"]
    retry = next(e for e in events if e.type == "subtask.retrying")
    assert "worker frozen stopped answering and its lease expired" in retry.message
    # Its late attempt was rejected, and counted.
    assert supervisor.current().stale_reports >= 1
