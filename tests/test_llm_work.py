"""LLM work made visible and bounded, through the real cluster: tokens per
subtask and task, token and time budgets, streamed output, context budgets,
and the result cache."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from taskloom.client import TaskloomClient
from taskloom.core.model import Event, FailureReason, SubtaskStatus, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import eventually, plan, planned, wait_status

SUMMARY_REQUEST = "Summarise the text below"


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Holds back the fake model's answers for chosen steps until set."""
    event = threading.Event()
    yield event
    event.set()


async def events_of(client: TaskloomClient, task_id: str) -> list[Event]:
    return [e async for e in client.watch(task_id)]


async def test_tokens_are_counted_per_call_per_subtask_and_per_task(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    def respond(call: ChatCall) -> str:
        if call.planning:
            return planned(
                ("s1", "llm", "Gather the key facts."), ("s2", "llm", "Write more from them.", "s1")
            )
        return "an answer"

    fake_ollama.responder = respond
    processes.worker(supervisor.address)
    task = await client.wait(await client.submit("a goal"))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert [s.id for s in task.subtasks] == ["s1", "s2", "synthesize"]
    for sub in task.subtasks:
        assert (sub.usage.calls, sub.usage.output_tokens, sub.usage.model) == (
            1,
            7,
            "ollama:llama3.2",
        )
        assert sub.usage.input_tokens > 0
    (planning,) = fake_ollama.planning_calls()
    planning_input = sum(len(m["content"]) // 4 for m in planning.messages)
    assert task.usage.calls == 4
    assert task.usage.output_tokens == 4 * 7
    assert task.usage.input_tokens == planning_input + sum(
        s.usage.input_tokens for s in task.subtasks
    )
    assert task.usage.model == "ollama:llama3.2"


async def test_a_task_out_of_tokens_stops_starting_work_and_cancels_what_runs(
    supervisor: Supervisor,
    client: TaskloomClient,
    fake_ollama: FakeOllama,
    processes: Processes,
    gate: threading.Event,
) -> None:
    def respond(call: ChatCall) -> str:
        if "Your step: SLOW" in call.prompt:
            gate.wait(60)
        return "an answer"

    fake_ollama.responder = respond
    processes.worker(supervisor.address)
    # What the worker reckons fast's prompt takes (it errs high: the fake
    # counts 4 characters a token, the worker 3).
    await client.wait(await client.submit("g", plan=plan(("fast", "llm", "quick"))))
    (first,) = fake_ollama.step_calls("FAST")
    reckoned = sum((len(m["content"]) + 2) // 3 for m in first.messages)
    # Room for fast's prompt and reply (7 tokens), not for next's prompt after it.
    task_id = await client.submit(
        "g",
        plan=plan(
            ("fast", "llm", "quick"), ("slow", "llm", "long"), ("next", "llm", "then", "fast")
        ),
        max_tokens=reckoned + 8,
    )
    task = await wait_status(client, task_id, TaskStatus.FAILED, TaskStatus.SUCCEEDED)

    assert task.status == TaskStatus.FAILED
    assert task.failure_reason == FailureReason.BUDGET_EXCEEDED
    assert task.error.startswith("BUDGET_EXCEEDED: the task's budget ran out (")
    assert "; in next, no room left for another LLM call" in task.error
    subtasks = {s.id: s for s in task.subtasks}
    assert subtasks["fast"].status == SubtaskStatus.SUCCEEDED
    assert subtasks["slow"].status == SubtaskStatus.CANCELLED
    assert subtasks["next"].status == SubtaskStatus.CANCELLED
    # next never called the model: its prompt alone would have passed the budget.
    assert fake_ollama.step_calls("NEXT") == []

    # The worker was told to stop the slow step, and did (logged after the task's end).
    async def slow_stopped() -> bool:
        events = await supervisor.store.read_events(task_id, "")
        return any(e.type == "subtask.stopped" and e.subtask_id == "slow" for e in events)

    await eventually(slow_stopped)


async def test_planning_that_uses_up_max_tokens_ends_the_task_before_any_subtask(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.responder = lambda call: "not a plan"
    task_id = await client.submit("g", max_tokens=5)
    task = await wait_status(client, task_id, TaskStatus.FAILED)

    assert task.failure_reason == FailureReason.BUDGET_EXCEEDED
    assert len(fake_ollama.calls) == 1  # no repair was asked for once the budget was gone
    assert task.subtasks == ()
    assert task.usage.calls == 1


async def test_a_task_past_its_max_duration_fails_and_its_running_subtask_stops(
    supervisor: Supervisor,
    client: TaskloomClient,
    fake_ollama: FakeOllama,
    processes: Processes,
    gate: threading.Event,
) -> None:
    def respond(call: ChatCall) -> str:
        gate.wait(60)
        return "too late"

    fake_ollama.responder = respond
    processes.worker(supervisor.address)
    task_id = await client.submit("g", plan=plan(("long", "llm", "take a while")), max_duration=1.0)
    task = await wait_status(client, task_id, TaskStatus.FAILED)

    assert task.failure_reason == FailureReason.BUDGET_EXCEEDED
    assert "max_duration" in task.error
    assert task.subtasks[0].status == SubtaskStatus.CANCELLED

    async def stopped() -> bool:
        events = await supervisor.store.read_events(task_id, "")
        return any(e.type == "subtask.stopped" for e in events)

    await eventually(stopped)


async def test_llm_output_streams_as_events_coalesced_and_complete(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    text = "".join(f"word{i} " for i in range(150))
    fake_ollama.responder = lambda call: text
    processes.worker(supervisor.address)
    task_id = await client.submit("g", plan=plan(("s1", "llm", "write")))
    task = await client.wait(task_id)

    assert task.status == TaskStatus.SUCCEEDED
    streamed = [e for e in await events_of(client, task_id) if e.type == "subtask.output"]
    assert "".join(e.message for e in streamed) == text == task.result
    pieces = -(-len(text) // 16)  # the fake server sends 16 characters per chunk
    assert 1 <= len(streamed) <= pieces
    assert all(e.subtask_id == "s1" and e.attempt == 1 for e in streamed)


async def test_inputs_over_the_context_budget_are_cut_with_a_marker_and_reported(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    fake_ollama.responder = lambda call: "done"
    processes.worker(supervisor.address)
    long_text = "fact " * 4000  # about 6,700 estimated tokens
    task_id = await client.submit(
        "g",
        plan=plan(("a", "echo", long_text), ("b", "llm", "use it", "a")),
        context_tokens=1000,
    )
    task = await client.wait(task_id)

    assert task.status == TaskStatus.SUCCEEDED, task.error
    (call,) = fake_ollama.step_calls("B")
    assert "[… cut: about" in call.prompt and "kept to fit the context budget]" in call.prompt
    assert len(call.prompt) < 3 * 1000
    assert call.options["num_ctx"] == 1000
    progress = [e.message for e in await events_of(client, task_id) if e.subtask_id == "b"]
    assert any("input a cut from about" in m for m in progress), progress


async def test_with_context_summarize_inputs_are_summarised_before_they_are_cut(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    def respond(call: ChatCall) -> str:
        return "SHORT SUMMARY" if call.prompt.startswith(SUMMARY_REQUEST) else "done"

    fake_ollama.responder = respond
    processes.worker(supervisor.address)
    task_id = await client.submit(
        "g",
        plan=plan(("a", "echo", "fact " * 4000), ("b", "llm", "use it", "a")),
        context_tokens=1000,
        context="summarize",
    )
    task = await client.wait(task_id)

    assert task.status == TaskStatus.SUCCEEDED, task.error
    summaries = [c for c in fake_ollama.calls if c.prompt.startswith(SUMMARY_REQUEST)]
    assert summaries and all(len(c.prompt) < 3 * 1000 for c in summaries)
    (call,) = fake_ollama.step_calls("B")
    assert "SHORT SUMMARY" in call.prompt and "[… cut" not in call.prompt
    b = next(s for s in task.subtasks if s.id == "b")
    assert b.usage.calls == len(summaries) + 1  # the summaries count towards the subtask


async def test_a_goal_too_big_for_the_context_budget_fails_the_subtask_clearly(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    task_id = await client.submit(
        "a goal " * 1000, plan=plan(("b", "llm", "answer")), context_tokens=1000
    )
    task = await wait_status(client, task_id, TaskStatus.FAILED)

    (b,) = task.subtasks
    assert b.attempt == 1  # not retried: it would not fit next time either
    assert "context budget" in b.error and "--context-tokens" in b.error
    assert task.failure_reason == FailureReason.SUBTASK_FAILED
    assert fake_ollama.calls == []


async def test_an_identical_llm_subtask_reuses_the_cached_output(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    answers = iter(["first answer", "second answer", "third answer"])
    fake_ollama.responder = lambda call: next(answers)
    processes.worker(supervisor.address)
    steps = plan(("s1", "llm", "what is 2+2?"))

    first = await client.wait(await client.submit("g", plan=steps))
    again_id = await client.submit("g", plan=steps)
    again = await client.wait(again_id)
    fresh = await client.wait(await client.submit("g", plan=steps, cache=False))
    other = await client.wait(await client.submit("another goal", plan=steps))

    assert (first.result, first.subtasks[0].cache_hit) == ("first answer", False)
    assert (again.result, again.subtasks[0].cache_hit) == ("first answer", True)
    assert again.subtasks[0].attempt == 0 and again.usage.calls == 0
    assert (fresh.result, fresh.subtasks[0].cache_hit) == ("second answer", False)
    # The goal is part of what the llm handler sees, so it is part of the key.
    assert (other.result, other.subtasks[0].cache_hit) == ("third answer", False)
    assert len(fake_ollama.calls) == 3
    hit = [e for e in await events_of(client, again_id) if e.type == "subtask.succeeded"]
    assert hit[0].message.startswith("cache_hit")


async def test_subtasks_of_handlers_not_marked_cacheable_always_run(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    steps = plan(("s1", "echo", "hello"))
    first = await client.wait(await client.submit("g", plan=steps))
    second = await client.wait(await client.submit("g", plan=steps))
    assert [t.subtasks[0].cache_hit for t in (first, second)] == [False, False]
    assert [t.subtasks[0].attempt for t in (first, second)] == [1, 1]


async def test_a_cluster_on_an_openai_compatible_server_plans_and_answers(
    supervisor_settings: SupervisorSettings, fake_ollama: FakeOllama, processes: Processes
) -> None:
    def respond(call: ChatCall) -> str:
        if call.planning:
            return planned(
                ("s1", "llm", "Gather the key facts."), ("s2", "llm", "Write more from them.", "s1")
            )
        return "answer from the OpenAI API"

    fake_ollama.responder = respond
    openai = {
        "TASKLOOM_LLM": "openai:llama3.2",
        "TASKLOOM_OPENAI_BASE_URL": f"{fake_ollama.url}/v1",
    }
    settings = supervisor_settings.model_copy(
        update={
            "llm": openai["TASKLOOM_LLM"],
            "openai_base_url": openai["TASKLOOM_OPENAI_BASE_URL"],
        }
    )
    server = Supervisor(settings)
    await server.start()
    try:
        processes.worker(server.address, env=openai)
        async with TaskloomClient(server.address) as client:
            task = await client.wait(await client.submit("a goal"))
    finally:
        await server.stop(grace=0.5)

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == "answer from the OpenAI API"
    assert {c.api for c in fake_ollama.calls} == {"openai"}
    assert fake_ollama.planning_calls()[0].format["properties"]["subtasks"]
    assert task.usage.model == "openai:llama3.2" and task.usage.calls == 4
    streamed = [c for c in fake_ollama.calls if not c.planning]
    assert all(c.stream for c in streamed)
