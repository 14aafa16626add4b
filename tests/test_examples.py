"""The examples run as `make demo` runs them: `taskloom up --app … --demo-plan …`,
real processes, the scripted Ollama writing the one llm step."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.client.test_cli import taskloom
from tests.conftest import REPO
from tests.fake_ollama import ChatCall, FakeOllama

REPORT = REPO / "examples" / "report"
NARRATIVE = "Margins held up while revenue grew; liquidity stayed sound."


def report_plan(tmp_path: Path, csv: Path) -> Path:
    """The example's plan, writing under ``tmp_path`` and reading ``csv``."""
    document = json.loads((REPORT / "plan.json").read_text())
    for step in document["subtasks"]:
        if "out" in step.get("params", {}):
            step["params"]["out"] = str(tmp_path / "out")
        if "csv" in step.get("params", {}):
            step["params"]["csv"] = str(csv)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    return path


async def run_report(tmp_path: Path, fake_ollama: FakeOllama, csv: Path) -> tuple[int, str, str]:
    prompts: list[str] = []

    def respond(call: ChatCall) -> str:
        prompts.append(call.prompt)
        return NARRATIVE

    fake_ollama.responder = respond
    return await asyncio.wait_for(
        taskloom(
            "up", "--workers", "1", "--data-dir", str(tmp_path / "data"),
            "--app", "examples.report.handlers:registry",
            "--demo-plan", str(report_plan(tmp_path, csv)), "--demo", "Report on the quarters",
            env={"OLLAMA_HOST": fake_ollama.url},
        ),
        180,
    )  # fmt: skip


async def test_the_report_demo_writes_a_report_with_its_charts_and_the_models_narrative(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    code, out, err = await run_report(tmp_path, fake_ollama, REPORT / "quarterly.csv")

    assert code == 0, err + out
    report = tmp_path / "out" / "report.md"
    assert f"The report is at {report}" in out
    text = report.read_text()
    # The handlers' figures (2024-Q1: gross 828/1840 = 45.0 %; current 2310/1405 = 1.64) ...
    assert "Gross margin went from 45.0 % in 2024-Q1 to 44.0 % in 2025-Q4." in text
    assert "| 2024-Q1 | 45.0 % | 17.2 % | 12.4 % | 1.64 | 0.46 |" in text
    assert "| 2025-Q1 | 2,210 | -7.1 % | +20.1 % | 296 |" in text
    # ... the model's narrative, written from them ...
    assert NARRATIVE in text
    (call,) = [c for c in fake_ollama.calls if not c.planning]
    assert "Gross margin went from 45.0 %" in call.prompt and "+12.5 %" in call.prompt
    assert not fake_ollama.planning_calls()  # the plan was given
    # ... and the charts it embeds, drawn as PNG files beside it.
    for name in ("revenue", "margins", "liquidity"):
        assert f"![{name}]({name}.png)" in text
        assert (tmp_path / "out" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_a_csv_that_is_not_the_figures_fails_the_task_saying_why(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("quarter,revenue\n2024-Q1,100\n")

    code, out, err = await run_report(tmp_path, fake_ollama, bad)

    assert code != 0
    assert "lacks the column(s) cost_of_sales, operating_expenses" in out + err
    assert not (tmp_path / "out" / "report.md").exists()


async def test_the_software_demo_runs_each_step_with_its_role(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    software = REPO / "examples" / "software"

    def respond(call: ChatCall) -> str:
        if call.format and "verdict" in call.format.get("properties", {}):  # the critic
            return json.dumps({"verdict": "revise", "step": "fix", "critique": "handle 'X'"})
        if "Your step: Review, then synthesize" in call.prompt:
            return "THE FINAL CODE"
        if "Their critique:\nhandle 'X'" in call.prompt:
            return "<fixed again>"
        return f"<{call.system.split('.')[0]}>"  # "<You are a code reviewer>"

    fake_ollama.responder = respond
    code, out, err = await asyncio.wait_for(
        taskloom(
            "up", "--workers", "1", "--data-dir", str(tmp_path / "data"),
            "--demo-plan", str(software / "plan.json"), "--demo-aggregate", "critic",
            "--demo", "Write an ISBN-10 check",
            env={"OLLAMA_HOST": fake_ollama.url,
                 "TASKLOOM_ROLES_FILE": str(software / "roles.toml")},
        ),
        180,
    )  # fmt: skip

    assert code == 0, err + out
    calls = {
        c.prompt.rsplit("Your step: ", 1)[1].split("\n")[0]: c
        for c in fake_ollama.calls
        if "Your step: " in c.prompt and "Their critique" not in c.prompt
    }
    assert calls["Write the requirements"].system.startswith("You are a product owner.")
    assert calls["Design it"].system.startswith("You are a software architect.")
    assert calls["Review the code"].system.startswith("You are a code reviewer.")
    fix = calls["Fix what the review found"]
    assert fix.system.startswith("You are a Python developer.")
    assert "<You are a code reviewer>" in fix.prompt  # the review is among its inputs
    assert "product-owner" in out and "reviewer" in out  # the role column
    # The critic sent the fixed code back once; then the final step merged.
    assert "the critic sends fix back: handle 'X'" in out
    assert "THE FINAL CODE" in out
