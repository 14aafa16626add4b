"""The orchestrator acts on every write's outcome in one place (``apply``):
whichever path ends a task, its waiters hear of it at once and its root span
ends. A real supervisor, real worker processes, the scripted model."""

from __future__ import annotations

import signal

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskloom.client import TaskloomClient
from taskloom.core.model import Event, TaskStatus
from taskloom.supervisor import watching
from taskloom.supervisor.app import Supervisor
from tests.conftest import Processes
from tests.fake_ollama import FakeOllama
from tests.helpers import eventually, plan


async def test_a_task_ended_by_a_cache_hit_at_dispatch_is_announced_at_once(
    supervisor: Supervisor,
    client: TaskloomClient,
    fake_ollama: FakeOllama,
    processes: Processes,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A wait hears of a task's end only from the write that ended it: no
    # re-reads to fall back on while it waits.
    monkeypatch.setattr(watching, "WATCH_WAIT", 3600.0)
    fake_ollama.responder = lambda call: "the answer"
    steps = plan(("s1", "llm", "what is 2+2?"))
    worker = processes.worker(supervisor.address, name="first")
    first = await client.wait(await client.submit("g", plan=steps))
    assert first.status == TaskStatus.SUCCEEDED
    worker.send_signal(signal.SIGTERM)
    worker.wait()
    await eventually(lambda: not supervisor.scheduler.sessions())

    # No worker: the same subtask waits in the queue. The worker that comes
    # next is asked for it, and the cache answers in the assigning step.
    again_id = await client.submit("g", plan=steps)
    processes.worker(supervisor.address, name="second")
    again = await client.wait(again_id)

    assert again.status == TaskStatus.SUCCEEDED
    assert (again.result, again.subtasks[0].cache_hit) == ("the answer", True)
    assert len(fake_ollama.calls) == 1
    roots = [s for s in spans.get_finished_spans() if s.name == "task"]
    ended = {(s.attributes or {}).get("taskloom.task_id") for s in roots}
    assert again_id in ended, "the root span of the task the cache ended is still open"


async def test_a_cancelled_task_is_announced_to_waiters_and_its_attempts_stopped(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    test_dir: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watching, "WATCH_WAIT", 3600.0)
    processes.worker(supervisor.address)
    task_id = await client.submit("hold", plan=plan(("g", "gate", "one")))
    await eventually(lambda: supervisor.scheduler.lease_count() == 1)
    await client.cancel(task_id, "enough")
    task = await client.wait(task_id)
    assert task.status == TaskStatus.CANCELLED and task.error == "enough"

    # The worker was told to stop, and says so in the task's log (after its
    # terminal event, where a watch has ended: read the log itself).
    async def stopped() -> list[Event]:
        events = await supervisor.store.read_events(task_id, "0")
        return [e for e in events if e.type == "subtask.stopped"]

    (acknowledged,) = await eventually(stopped, timeout=30)
    assert acknowledged.subtask_id == "g" and supervisor.scheduler.lease_count() == 0
