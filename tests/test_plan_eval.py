"""The planning evaluation: its goals, its rules, and a run against the scripted Ollama."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from bench.plan_eval import GOALS_FILE, depth, load_goals, score
from taskloom.core.model import Plan, PlannedSubtask
from tests.conftest import REPO
from tests.fake_ollama import FakeOllama
from tests.helpers import planned


def test_the_goal_set_is_public_varied_and_at_least_thirty() -> None:
    goals = load_goals()
    assert len(goals) >= 30 and len(set(goals)) == len(goals)
    assert GOALS_FILE.parent == REPO / "bench"


def test_plans_are_scored_by_the_rules() -> None:
    goal = "Plan a trip."
    good = Plan((
        PlannedSubtask("a", "Sights", "List the sights worth a visit.", "llm"),
        PlannedSubtask("b", "Budget", "Work out a daily budget.", "llm"),
        PlannedSubtask("c", "Schedule", "Put the sights into a schedule.", "llm", ("a", "b")),
    ))  # fmt: skip
    assert depth(good) == 2
    assert score(good, goal, {"llm"}).total == 1.0
    assert score(None, goal, {"llm"}).total == 0.0
    echoed = Plan((*good.subtasks[:2], PlannedSubtask("c", "Schedule", "x", "echo", ("a",))))
    assert score(echoed, goal, {"llm", "echo"}).allowed == 0  # never the test-only echo
    one = Plan((PlannedSubtask("a", "Trip", "Plan the whole trip in detail.", "llm"),))
    assert score(one, goal, {"llm"}).sane == 0  # a goal not broken up
    again = PlannedSubtask("b", "Again", "list the sights worth a visit!", "llm")
    copies = Plan((good.subtasks[0], again))
    assert score(copies, goal, {"llm"}).distinct == 0


async def test_a_run_against_a_model_prints_the_score_table(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    fake_ollama.responder = lambda call: planned(
        ("s1", "llm", "Gather the key facts."), ("s2", "echo", "Write them up.", "s1")
    )
    rows = tmp_path / "rows.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.plan_eval", "--goals", "2", "--json", str(rows),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TASKLOOM_LLM": "ollama:llama3.2", "OLLAMA_HOST": fake_ollama.url},
    )  # fmt: skip
    out, _ = await process.communicate()
    text = out.decode()
    assert process.returncode == 0, text
    # echo is not offered, so the model is asked again and the plans fail.
    assert "offered: llm" in text
    assert "| ollama:llama3.2 | 2 | 0.00 | 0 % | 0 % | 0 % | 0 % |" in text, text
    (first, _) = json.loads(rows.read_text())
    assert "unknown capability 'echo'" in first["error"]
