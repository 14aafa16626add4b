"""Roles through a cluster: the planner gives llm steps a role, the worker's
model gets the role's prompt, and get shows it; a roles file adds roles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from taskloom.client import TaskloomClient
from taskloom.client.display import task_json, task_text
from taskloom.core.errors import InvalidArgument
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import eventually, plan, planned

REVIEWER = "You are the reviewer of this test: find one flaw."


async def test_the_planner_gives_steps_roles_and_the_model_plays_them(
    supervisor_settings: SupervisorSettings,
    fake_ollama: FakeOllama,
    processes: Processes,
    tmp_path: Path,
) -> None:
    roles = tmp_path / "roles.toml"
    roles.write_text(f'[reviewer]\ndescription = "finds flaws"\nprompt = "{REVIEWER}"\n')
    settings = supervisor_settings.model_copy(update={"roles_file": str(roles)})

    def respond(call: ChatCall) -> str:
        if call.planning:
            document = json.loads(
                planned(("s1", "llm", "Write the draft."), ("s2", "llm", "Review it.", "s1"))
            )
            document["subtasks"][0]["role"] = "writer"
            document["subtasks"][1]["role"] = "reviewer"
            return json.dumps(document)
        return f"done by: {call.system.splitlines()[0]}"

    fake_ollama.responder = respond
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        processes.worker(supervisor.address)
        await eventually(lambda: len(supervisor.scheduler.sessions()) == 1)
        task = await client.wait(await client.submit("Write and review a limerick"))

        assert task.status == TaskStatus.SUCCEEDED, task.error
        s1, s2, _ = task.subtasks
        assert (s1.params["role"], s2.params["role"]) == ("writer", "reviewer")
        assert (
            s1.output == "done by: You are a clear, plain writer. Turn what you are given "
            "into well-organised prose for the intended reader: short sentences, no filler, "
            "nothing invented."
        )
        assert s2.output == f"done by: {REVIEWER}"
        planning = fake_ollama.planning_calls()[0].system
        assert "  - reviewer: finds flaws" in planning
        # The planner sees the live inventory: workers and free slots per capability.
        assert re.search(r"  - llm: a general language model.*\(1 worker, 4 free slots\)", planning)
        # taskloom get shows it, as a column and in --json.
        console = Console(record=True, width=200)
        console.print(task_text(task))
        assert re.search(r"s2\W+Work on s2\W+llm\W+reviewer\W+SUCCEEDED", console.export_text())
        assert [s["role"] for s in task_json(task)["subtasks"]] == ["writer", "reviewer", ""]

        # An explicit plan may give a role too, but only one there is.
        bad = plan(("a", "llm", "Do it well."))
        bad["subtasks"][0]["params"] = {"role": "chef"}
        with pytest.raises(InvalidArgument, match="a has role 'chef'; the roles are: analyst"):
            await client.submit("cook", plan=bad)
