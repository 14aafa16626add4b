"""A handler that finds the plan wrong asks for a replan (ctx.replan), and the
llm handler does when the model says a step cannot be done as asked."""

from __future__ import annotations

from taskloom.client import TaskloomClient
from taskloom.core.model import SubtaskStatus, TaskStatus
from taskloom.supervisor.app import Supervisor
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import plan, planned
from tests.test_failures import events_of


async def test_a_handler_asks_for_a_replan_and_gets_one_whatever_on_failure_says(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, fake_ollama: FakeOllama
) -> None:
    fake_ollama.responder = lambda call: planned(("fix", "echo", "FIXED", "a"))
    processes.worker(supervisor.address)
    doc = plan(
        ("a", "echo", "A-OUT"),
        ("b", "doubt", "the figures are from 2019, not 2026", "a"),
        ("c", "echo", "C", "b"),
    )
    task = await client.wait(await client.submit("recover", plan=doc))  # on_failure=fail

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.plan_version == 2
    subs = {s.id: s for s in task.subtasks}
    assert (subs["b"].status, subs["b"].attempt) == (SubtaskStatus.FAILED, 1)  # not retried
    assert subs["c"].depends_on == ("v2-fix",)
    (failed,) = await events_of(supervisor, task.id, "subtask.failed")
    assert failed.message == "asked to be planned again: the figures are from 2019, not 2026"
    (call,) = fake_ollama.planning_calls()
    assert "error: the figures are from 2019, not 2026" in call.prompt
    assert '<done id="a" title="A">\nA-OUT' in call.prompt


async def test_the_llm_handler_asks_when_the_model_says_it_cannot_and_replans_run_out(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, fake_ollama: FakeOllama
) -> None:
    def respond(call: ChatCall) -> str:
        if call.planning:
            return planned(("other", "llm", "Estimate the total from the trend."))
        if "Sum the sales." in call.prompt:
            return "CANNOT: no sales figures were given"
        return "ABOUT 42"

    fake_ollama.responder = respond
    processes.worker(supervisor.address)
    task = await client.wait(
        await client.submit("total", plan=plan(("s1", "llm", "Sum the sales.")))
    )

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == "ABOUT 42"
    assert "CANNOT:" in fake_ollama.calls[0].system  # the model is told how to say so
    call = fake_ollama.planning_calls()[0]
    assert "the model cannot do this step as asked: no sales figures were given" in call.prompt

    # A handler that keeps asking gets max_replans (2) replacements, then the
    # task fails as on_failure says.
    fake_ollama.responder = lambda call: planned(("again", "doubt", "still wrong"))
    doomed = await client.wait(await client.submit("x", plan=plan(("d", "doubt", "wrong"))))
    assert doomed.status == TaskStatus.FAILED
    assert doomed.plan_version == 3
    assert "asked to be planned again: still wrong" in doomed.error
