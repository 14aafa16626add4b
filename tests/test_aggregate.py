"""Aggregation strategies: how a task's final step makes one answer
(summarize with the model; concat and vote without it)."""

from __future__ import annotations

import json

import pytest

from taskloom.client import TaskloomClient
from taskloom.core.errors import InvalidArgument
from taskloom.core.model import Aggregate, EventType, TaskOptions, TaskStatus
from taskloom.core.wire import options_from_pb, options_to_pb
from taskloom.supervisor.app import Supervisor
from taskloom.worker.handlers import majority
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import plan, planned

ANSWERS = plan(("a", "echo", "42"), ("b", "echo", " 42. "), ("c", "echo", "41"), synthesize=True)
"""Three steps answering the same question (echo returns its instruction)."""


def test_the_answer_most_gave_wins_and_a_tie_goes_to_the_earliest() -> None:
    assert majority([("a", "Paris"), ("b", "paris."), ("c", "Lyon")]) == ("Paris", ["a", "b"])
    assert majority([("a", "yes"), ("b", "no"), ("c", "No!")]) == ("no", ["b", "c"])
    assert majority([("a", "x"), ("b", "y")]) == ("x", ["a"])


def test_the_option_travels_and_a_wrong_value_is_refused() -> None:
    options = TaskOptions.of(aggregate="vote")
    assert options.aggregate == Aggregate.VOTE
    assert options_from_pb(options_to_pb(options)).aggregate == Aggregate.VOTE
    assert options_from_pb(options_to_pb(TaskOptions())).aggregate == Aggregate.SUMMARIZE
    assert TaskOptions.from_doc(options.to_doc()).aggregate == Aggregate.VOTE
    with pytest.raises(InvalidArgument, match="aggregate 'mean' is not one of summarize, concat"):
        TaskOptions.of(aggregate="mean")


async def test_vote_takes_the_majority_answer_without_the_model(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    task = await client.wait(await client.submit("What is 6 x 7?", plan=ANSWERS, aggregate="vote"))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == "42"
    final = task.subtasks[-1]
    assert (final.id, final.title, final.depends_on) == ("synthesize", "Vote on the answer",
                                                         ("a", "b", "c"))  # fmt: skip
    assert fake_ollama.calls == []  # no model call, no tokens
    assert task.usage.calls == 0
    events = [e async for e in client.watch(task.id)]
    notes = [e.message for e in events if e.type == EventType.SUBTASK_PROGRESS]
    assert "2 of 3 answers agree (a, b)" in notes


async def test_concat_puts_the_results_one_after_another_without_the_model(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    task = await client.wait(await client.submit("Count", plan=ANSWERS, aggregate="concat"))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == "## A\n\n42\n\n## B\n\n 42. \n\n## C\n\n41"
    assert [s.id for s in task.subtasks] == ["a", "b", "c"]
    assert fake_ollama.calls == []


async def test_summarize_stays_the_default_and_the_planner_is_told_about_a_vote(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    fake_ollama.responder = lambda call: (
        planned(("s1", "llm", "Answer the question."), ("s2", "llm", "Answer it another way."))
        if call.planning
        else "MERGED"
        if "Synthesize" in call.prompt
        else "an answer"
    )
    processes.worker(supervisor.address)
    merged = await client.wait(await client.submit("What is 6 x 7?"))
    assert merged.status == TaskStatus.SUCCEEDED, merged.error
    assert merged.result == "MERGED"
    assert merged.subtasks[-1].title == "Synthesize the final answer"

    voted = await client.wait(await client.submit("What is 6 x 7?", aggregate="vote"))
    assert voted.status == TaskStatus.SUCCEEDED, voted.error
    assert voted.result == "an answer"
    planning = fake_ollama.planning_calls()
    assert "taken by majority vote" not in planning[0].system
    assert "taken by majority vote of the subtasks nothing depends on" in planning[1].system


async def test_a_critic_sends_one_step_back_with_its_critique_then_the_model_merges(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    verdicts = iter([
        {"verdict": "revise", "step": "b", "critique": "give the figures in euros"},
        {"verdict": "accept", "step": "a", "critique": ""},
    ])  # fmt: skip
    reviews: list[ChatCall] = []

    def respond(call: ChatCall) -> str:
        if call.format and "verdict" in call.format.get("properties", {}):
            reviews.append(call)
            return json.dumps(next(verdicts))
        if "Your step: Review, then synthesize" in call.prompt:
            return "FINAL"
        if "Your step: B" in call.prompt:
            return "B2 in euros" if "give the figures in euros" in call.prompt else "B1"
        return "A1"

    fake_ollama.responder = respond
    processes.worker(supervisor.address)
    steps = plan(("a", "llm", "Find the facts."), ("b", "llm", "Give the numbers."),
                 synthesize=True)  # fmt: skip
    task = await client.wait(await client.submit("Report", plan=steps, aggregate="critic"))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == "FINAL"
    subs = {s.id: s for s in task.subtasks}
    assert (subs["a"].attempt, subs["a"].output) == (1, "A1")
    assert (subs["b"].attempt, subs["b"].output) == (2, "B2 in euros")
    assert "Their critique:\ngive the figures in euros" in subs["b"].instruction
    assert "Your previous answer:\nB1" in subs["b"].instruction
    final = subs["synthesize"]
    assert (final.title, final.attempt, final.params["reviewed"]) == (
        "Review, then synthesize",
        2,
        "1",
    )
    assert len(reviews) == 1  # one round: the second attempt merges
    assert '<result step="b" title="B">\nB1' in reviews[0].prompt
    events = [e async for e in client.watch(task.id)]
    (retried,) = [e for e in events if e.type == "subtask.retried"]
    assert (retried.subtask_id, retried.message) == (
        "b",
        "sent back by synthesize (attempt 1): give the figures in euros",
    )
    assert "the critic sends b back: give the figures in euros" in [e.message for e in events]

    # A critic that accepts lets the same attempt merge.
    accepted = await client.wait(await client.submit("Again", plan=steps, aggregate="critic"))
    assert accepted.status == TaskStatus.SUCCEEDED, accepted.error
    assert (accepted.result, accepted.subtasks[-1].attempt) == ("FINAL", 1)


async def test_a_critic_reply_that_is_not_a_verdict_accepts_the_results(
    supervisor: Supervisor, client: TaskloomClient, fake_ollama: FakeOllama, processes: Processes
) -> None:
    fake_ollama.responder = lambda call: (
        '["not", "a", "verdict"]' if call.format else "MERGED" if "Review" in call.prompt else "x"
    )
    processes.worker(supervisor.address)
    steps = plan(("a", "llm", "Find the facts."), synthesize=True)
    task = await client.wait(await client.submit("Report", plan=steps, aggregate="critic"))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert (task.result, task.subtasks[-1].attempt) == ("MERGED", 1)
