"""The worker runtime against a real supervisor: handlers, retries, cancellation, drain, slots."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from taskloom.client import TaskloomClient
from taskloom.core.errors import ConfigError
from taskloom.core.model import Event, SubtaskStatus, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.worker import SubtaskContext, Worker, WorkerSettings
from taskloom.worker.worker import load_handlers
from tests.conftest import Processes
from tests.helpers import eventually, plan, wait_status, wait_subtask


async def test_a_retryable_failure_is_retried_until_it_succeeds(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    processes.worker(supervisor.address)
    task = await client.wait(await client.submit("flaky", plan=plan(("f", "flaky", "3"))))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    (f,) = task.subtasks
    assert (f.attempt, f.output) == (3, "ok on attempt 3")
    assert sorted(p.name for p in test_dir.glob("attempt-f-*")) == [
        "attempt-f-1",
        "attempt-f-2",
        "attempt-f-3",
    ]
    retries = [e for e in [e async for e in client.watch(task.id)] if e.type == "subtask.retrying"]
    assert [e.message for e in retries] == [
        "attempt 1 of 3 failed: RuntimeError: flaky failure on attempt 1",
        "attempt 2 of 3 failed: RuntimeError: flaky failure on attempt 2",
    ]


async def test_attempts_run_out_and_the_task_fails_with_the_last_error(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    task = await client.wait(await client.submit("flaky", plan=plan(("f", "flaky", "9"))))

    assert task.status == TaskStatus.FAILED
    assert task.error == (
        "subtask f (F) failed after 3 attempt(s): RuntimeError: flaky failure on attempt 3"
    )


async def test_a_permanent_failure_fails_the_task_and_cancels_running_subtasks(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    processes.worker(supervisor.address)
    task_id = await client.submit(
        "doomed",
        plan=plan(
            ("g", "gate", "wait"), ("b", "broken", "the impossible", "x"), ("x", "echo", "1")
        ),
    )
    task = await wait_status(client, task_id, TaskStatus.FAILED)

    assert task.error == "subtask b (B) failed: cannot do 'the impossible'"
    statuses = {s.id: s.status for s in task.subtasks}
    assert statuses == {
        "g": SubtaskStatus.CANCELLED,
        "b": SubtaskStatus.FAILED,
        "x": SubtaskStatus.SUCCEEDED,
    }
    # The cancellation reached the running handler.
    await eventually(lambda: (test_dir / "cancelled-g-1").exists())


async def test_cancelling_a_task_cancels_the_running_handler(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    processes.worker(supervisor.address)
    task_id = await client.submit(
        "stop me", plan=plan(("g", "gate", "1"), ("after", "echo", "2", "g"))
    )
    await wait_subtask(client, task_id, "g", "RUNNING")

    task = await client.cancel(task_id, "changed my mind")

    assert task.status == TaskStatus.CANCELLED
    assert task.error == "changed my mind"
    assert {s.status for s in task.subtasks} == {SubtaskStatus.CANCELLED}
    await eventually(lambda: (test_dir / "cancelled-g-1").exists())
    events = [e async for e in client.watch(task_id)]
    assert events[-1].type == "task.cancelled"
    # The worker acknowledged that the handler stopped.
    log = await eventually(
        lambda: _with_type(supervisor.store.read_events(task_id, ""), "subtask.stopped")
    )
    assert (log[0].subtask_id, log[0].attempt) == ("g", 1)
    # Cancelling again is harmless; the task stays as it ended.
    assert (await client.cancel(task_id)).status == TaskStatus.CANCELLED


async def test_sigterm_drains_the_worker_its_running_subtask_finishes_and_it_exits(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    draining = processes.worker(supervisor.address, name="draining")
    task_id = await client.submit(
        "drain", plan=plan(("first", "gate", "1"), ("second", "echo", "2", "first"))
    )
    await wait_subtask(client, task_id, "first", "RUNNING")
    draining.send_signal(signal.SIGTERM)
    await eventually(lambda: any(s.draining for s in supervisor.scheduler.sessions()))
    (test_dir / "open-first").touch()

    await eventually(lambda: draining.poll() is not None)
    assert draining.returncode == 0
    task = await client.get(task_id)
    first, second = task.subtasks
    assert (first.status, first.worker, first.attempt) == (SubtaskStatus.SUCCEEDED, "draining", 1)
    # The draining worker took no new work: `second` waits for another worker.
    assert second.status == SubtaskStatus.READY
    processes.worker(supervisor.address, name="fresh")
    task = await client.wait(task_id)
    assert task.status == TaskStatus.SUCCEEDED
    assert task.subtasks[1].worker == "fresh"


async def test_a_drain_that_runs_out_of_time_hands_the_subtask_back(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    quitter = processes.worker(
        supervisor.address, name="quitter", env={"TASKLOOM_DRAIN_TIMEOUT": "0.2"}
    )
    task_id = await client.submit("hand back", plan=plan(("g", "gate", "1")))
    await wait_subtask(client, task_id, "g", "RUNNING")
    quitter.send_signal(signal.SIGTERM)
    await eventually(lambda: quitter.poll() is not None)
    assert quitter.returncode == 0
    assert (test_dir / "cancelled-g-1").exists()

    processes.worker(supervisor.address, name="taker")
    await eventually(lambda: (test_dir / "started-g-2").exists())
    (test_dir / "open-g").touch()
    task = await client.wait(task_id)
    assert task.status == TaskStatus.SUCCEEDED
    assert (task.subtasks[0].attempt, task.subtasks[0].worker) == (2, "taker")
    events = [e async for e in client.watch(task_id)]
    retry = next(e for e in events if e.type == "subtask.retrying")
    assert "the worker shut down before finishing; handed back" in retry.message


def _worker(supervisor: Supervisor, name: str, concurrency: int) -> Worker:
    settings = WorkerSettings.load(
        supervisor=supervisor.address,
        capabilities="hold",
        concurrency=concurrency,
        name=name,
        ollama_host=supervisor.settings.ollama_host,
    )
    return Worker(settings)


async def test_workers_never_hold_more_than_their_concurrency_and_the_least_loaded_goes_first(
    supervisor: Supervisor, client: TaskloomClient
) -> None:
    running: dict[str, set[str]] = {"a": set(), "b": set()}
    peak = {"a": 0, "b": 0}
    release = asyncio.Event()
    workers = [_worker(supervisor, "a", 2), _worker(supervisor, "b", 3)]
    for worker in workers:

        @worker.handler("hold")
        async def hold(ctx: SubtaskContext, name: str = worker.settings.name) -> str:
            running[name].add(ctx.subtask_id)
            peak[name] = max(peak[name], len(running[name]))
            await ctx.progress("holding")
            await release.wait()
            running[name].discard(ctx.subtask_id)
            return name

    serving = [asyncio.create_task(w.serve()) for w in workers]
    try:
        await eventually(lambda: len(supervisor.scheduler.sessions()) == 2)
        subtasks = [(f"s{i}", "hold", str(i)) for i in range(8)]
        task_id = await client.submit("hold on", plan=plan(*subtasks))
        # Five slots in all: both workers fill up, three subtasks wait.
        await eventually(lambda: len(running["a"]) == 2 and len(running["b"]) == 3)
        task = await client.get(task_id)
        assert sorted(s.status for s in task.subtasks).count(SubtaskStatus.READY) == 3
        release.set()
        task = await client.wait(task_id)
    finally:
        for w in workers:
            await w.stop()
        await asyncio.gather(*serving)

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert peak == {"a": 2, "b": 3}
    progress = [e for e in [e async for e in client.watch(task_id)] if e.type == "subtask.progress"]
    assert len(progress) == 8 and {e.message for e in progress} == {"holding"}


async def test_least_loaded_worker_gets_the_next_subtask(
    supervisor: Supervisor, client: TaskloomClient
) -> None:
    release = asyncio.Event()
    holders: dict[str, str] = {}
    workers = [_worker(supervisor, "one", 4), _worker(supervisor, "two", 4)]
    for worker in workers:

        @worker.handler("hold")
        async def hold(ctx: SubtaskContext, name: str = worker.settings.name) -> str:
            holders[ctx.subtask_id] = name
            await release.wait()
            return name

    serving = [asyncio.create_task(w.serve()) for w in workers]
    try:
        await eventually(lambda: len(supervisor.scheduler.sessions()) == 2)
        task_id = await client.submit(
            "spread", plan=plan(*[(f"s{i}", "hold", "x") for i in range(4)])
        )
        await eventually(lambda: len(holders) == 4)
        release.set()
        await client.wait(task_id)
    finally:
        for w in workers:
            await w.stop()
        await asyncio.gather(*serving)

    assert sorted(holders.values()) == ["one", "one", "two", "two"]


def test_a_worker_refuses_to_start_without_a_handler_for_a_capability() -> None:
    worker = Worker(WorkerSettings.load(capabilities="llm,teleport"))
    with pytest.raises(ConfigError, match="no handler for teleport"):
        worker.check()


def test_handlers_load_from_module_and_attribute() -> None:
    registry = load_handlers("tests.handlers:registry")
    assert {"gate", "flaky", "broken"} <= set(registry)
    with pytest.raises(ConfigError, match="is not MODULE:ATTRIBUTE"):
        load_handlers("tests.handlers")
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        load_handlers("no_such_module:x")
    with pytest.raises(ConfigError, match="not a Worker or HandlerRegistry"):
        load_handlers("tests.handlers:gate")


async def _with_type(events: Awaitable[list[Event]], type_: str) -> list[Event]:
    return [e for e in await events if e.type == type_]


async def test_a_worker_with_json_logs_tags_its_lines_with_the_attempt(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, tmp_path: Path
) -> None:
    processes.worker(supervisor.address, name="json", env={"TASKLOOM_LOG_FORMAT": "json"})
    task = await client.wait(await client.submit("g", plan=plan(("a", "flaky", "2"))))
    assert task.status == TaskStatus.SUCCEEDED

    text = (tmp_path / "json.log").read_text().splitlines()
    lines = [json.loads(line) for line in text if line.startswith("{")]
    assert len(lines) >= len(text) - 1  # all of it, but for a stray line on stderr
    failed = [line for line in lines if line["message"].startswith("handler flaky failed")]
    assert failed and failed[0]["task_id"] == task.id
    assert (failed[0]["subtask_id"], failed[0]["attempt"]) == ("a", 1)
    assert "RuntimeError: flaky failure on attempt 1" in failed[0]["exception"]


@pytest.mark.parametrize(
    ("fields", "slots"),
    [
        ({"capabilities": "echo,noop"}, 64),  # async handlers: I/O-bound
        ({"capabilities": "llm"}, 8),  # a model server
        ({"capabilities": "llm,echo", "llm": "openai:gpt-4o-mini"}, 8),
        ({"capabilities": "llm", "llm": "embedded:smollm2"}, 1),  # one call at a time
        ({"capabilities": "echo", "concurrency": 3}, 3),  # said outright
    ],
)
def test_a_workers_slots_default_to_what_it_runs(fields: dict[str, Any], slots: int) -> None:
    assert WorkerSettings.load(**fields).concurrency == slots
