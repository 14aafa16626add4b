"""Providers' rate limits through a cluster: workers keep to a bucket they
share through the supervisor, waiting (a progress event each time) rather
than failing; the planner keeps to it too; a provider's 429 is waited out
as it asks, or with a backoff."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from taskloom.client import TaskloomClient
from taskloom.core.model import EventType, SubtaskStatus, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama, HTTPError
from tests.helpers import eventually, plan, planned

MODEL = "ollama:llama3.2"
WAITING = "for the rate limit of ollama:*"


async def test_workers_share_a_rate_limit_and_wait_for_it(
    supervisor_settings: SupervisorSettings, fake_ollama: FakeOllama, processes: Processes
) -> None:
    # 30 a minute: the bucket holds 5 and gains one every 2 s.
    settings = supervisor_settings.model_copy(update={"rate_limits": "ollama:*=30"})
    fake_ollama.responder = lambda call: "an answer"
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        processes.worker(supervisor.address, name="one")
        processes.worker(supervisor.address, name="two")
        await eventually(lambda: len(supervisor.scheduler.sessions()) == 2)
        steps = [(f"s{i}", "llm", f"Write part {i}.") for i in range(8)]
        task_id = await client.submit("eight parts", plan=plan(*steps))
        task = await client.wait(task_id)
        events = [e async for e in client.watch(task_id)]

    assert task.status == TaskStatus.SUCCEEDED, task.error
    waited = {e.subtask_id for e in events if WAITING in e.message}
    # Eight calls at once on two workers: the bucket let five through.
    assert len(waited) >= 3, [e.message for e in events if e.type == "subtask.progress"]
    assert all(s.attempt == 1 for s in task.subtasks)  # waited, not failed
    assert {s.worker for s in task.subtasks} == {"one", "two"}


async def test_a_429_is_waited_out_by_the_planner_and_the_workers(
    supervisor_settings: SupervisorSettings, fake_ollama: FakeOllama, processes: Processes
) -> None:
    refused: set[str] = set()

    def respond(call: ChatCall) -> str | HTTPError:
        kind = "plan" if call.planning else "step"
        if kind not in refused:  # the first call of each kind is refused
            refused.add(kind)
            return HTTPError(429, "slow down")
        return TWO if call.planning else "an answer"

    fake_ollama.responder = respond
    registry = CollectorRegistry()
    async with (
        Supervisor(supervisor_settings, metrics=SupervisorMetrics(registry)) as supervisor,
        TaskloomClient(supervisor.address) as client,
    ):
        processes.worker(supervisor.address)
        await eventually(lambda: supervisor.scheduler.sessions())
        task_id = await client.submit("two steps", synthesize=False)
        task = await client.wait(task_id)
        events = [e async for e in client.watch(task_id)]

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert all(s.status == SubtaskStatus.SUCCEEDED and s.attempt == 1 for s in task.subtasks)
    # Ollama says no more than 429: a backoff, reported as the step's progress.
    (backoff,) = [e for e in events if "refused the call for its rate limit" in e.message]
    assert backoff.type == EventType.SUBTASK_PROGRESS
    assert backoff.message.endswith("waiting 1.0s (backing off)")
    # The planner waited it out too.
    waits = {"model": MODEL, "reason": "provider"}
    assert registry.get_sample_value("taskloom_llm_rate_limit_waits_total", waits) == 1
    assert len(fake_ollama.planning_calls()) == 2


async def test_an_openai_429_is_waited_out_as_long_as_it_asks(
    supervisor_settings: SupervisorSettings, fake_ollama: FakeOllama, processes: Processes
) -> None:
    calls = []

    def respond(call: ChatCall) -> str | HTTPError:
        calls.append(call)
        if len(calls) == 1:
            return HTTPError(429, "Rate limit reached", {"Retry-After": "2"})
        return "an answer"

    fake_ollama.responder = respond
    env = {"TASKLOOM_LLM": "openai:llama3.2", "TASKLOOM_OPENAI_BASE_URL": f"{fake_ollama.url}/v1"}
    settings = supervisor_settings.model_copy(update={"rate_limits": "openai:*=600/100000"})
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        processes.worker(supervisor.address, env=env)
        await eventually(lambda: supervisor.scheduler.sessions())
        task_id = await client.submit("one step", plan=plan(("s1", "llm", "Write it.")))
        task = await client.wait(task_id)
        events = [e async for e in client.watch(task_id)]

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert any(
        e.message == "openai:llama3.2 refused the call for its rate limit; waiting 2.0s as it asked"
        for e in events
    )
    assert len(calls) == 2


TWO = planned(("s1", "llm", "Gather the key facts."), ("s2", "llm", "Write it up.", "s1"))
