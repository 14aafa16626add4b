"""Label routing through a cluster: workers send labels, a subtask that
requires labels runs only on a worker with all of them (also when a commit
makes it READY), waits while no such worker is connected, and the planner
sees the labels that tell workers apart and may route by them."""

from __future__ import annotations

import json

import aiohttp
import pytest
from rich.console import Console

from taskloom.client import TaskloomClient
from taskloom.client.display import task_json, task_text
from taskloom.core.errors import ConfigError, InvalidArgument
from taskloom.core.model import SubtaskStatus, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.worker.settings import WorkerSettings
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import eventually, plan, planned, wait_subtask


def _requiring(document: dict[str, object], **requires: dict[str, str]) -> dict[str, object]:
    for item in document["subtasks"]:  # type: ignore[attr-defined]
        if item["id"] in requires:
            item["requires"] = requires[item["id"]]
    return document


async def test_a_subtask_that_requires_labels_runs_only_where_they_are(
    supervisor_settings: SupervisorSettings, processes: Processes
) -> None:
    settings = supervisor_settings.model_copy(update={"console_port": 0})
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        await _route_by_labels(supervisor, client, processes)


async def _route_by_labels(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address, name="plain")
    processes.worker(supervisor.address, name="gpu", env={"TASKLOOM_LABELS": "gpu=true"})
    await eventually(lambda: len(supervisor.scheduler.sessions()) == 2)
    labels = {s.info.name: dict(s.info.labels) for s in supervisor.scheduler.sessions()}
    # An llm worker says which model it runs; the labels it was given come too.
    assert labels == {
        "plain": {"model": "llama3.2"},
        "gpu": {"gpu": "true", "model": "llama3.2"},
    }
    roots = [(f"g{i}", "echo", f"on the gpu {i}") for i in range(6)]
    free = [(f"f{i}", "echo", f"anywhere {i}") for i in range(6)]
    # after: unlocked by a commit, so the write that commits g0 offers it slots.
    document = plan(*roots, *free, ("after", "echo", "after g0", "g0"))
    requires = {s[0]: {"gpu": "true"} for s in roots} | {"after": {"gpu": "true"}}
    task = await client.wait(await client.submit("route", plan=_requiring(document, **requires)))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    by_id = {s.id: s for s in task.subtasks}
    assert {by_id[i].worker for i in requires} == {"gpu"}
    assert by_id["after"].requires == {"gpu": "true"}
    assert by_id["f0"].requires == {}
    # get shows what a subtask requires: next to its capability, and in --json.
    console = Console(record=True, width=200)
    console.print(task_text(task))
    assert "echo[gpu=true]" in console.export_text()
    assert next(s for s in task_json(task)["subtasks"] if s["id"] == "g0")["requires"] == {
        "gpu": "true"
    }
    # And so does the web console's subtask view.
    assert supervisor.console is not None
    page = f"http://127.0.0.1:{supervisor.console.port}/api/tasks/{task.id}/subtasks/g0"
    async with aiohttp.ClientSession() as http, http.get(page) as got:
        assert (await got.json())["requires"] == {"gpu": "true"}


async def test_a_subtask_waits_for_a_worker_with_its_labels(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address, name="plain")
    await eventually(lambda: len(supervisor.scheduler.sessions()) == 1)
    document = _requiring(
        plan(("a", "echo", "needs eu"), ("b", "echo", "anywhere")), a={"zone": "eu"}
    )
    task_id = await client.submit("wait for eu", plan=document)
    await wait_subtask(client, task_id, "b", SubtaskStatus.SUCCEEDED)
    task = await client.get(task_id)
    assert next(s for s in task.subtasks if s.id == "a").status == SubtaskStatus.READY

    processes.worker(supervisor.address, name="eu", env={"TASKLOOM_LABELS": "zone=eu"})
    task = await client.wait(task_id)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert next(s for s in task.subtasks if s.id == "a").worker == "eu"


async def test_a_label_that_cannot_route_is_refused_with_the_reason(
    client: TaskloomClient,
) -> None:
    document = _requiring(plan(("a", "echo", "x")), a={"gpu": "yes please"})
    with pytest.raises(InvalidArgument, match="a requires label 'gpu=yes please'"):
        await client.submit("bad label", plan=document)
    with pytest.raises(ConfigError, match="'gpu' is not KEY=VALUE"):
        WorkerSettings.load(labels="gpu")


async def test_the_planner_sees_the_labels_that_tell_workers_apart_and_routes_by_them(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, fake_ollama: FakeOllama
) -> None:
    def respond(call: ChatCall) -> str:
        if not call.planning:
            return "an answer"
        document = json.loads(
            planned(("s1", "llm", "Render the frames."), ("s2", "llm", "Describe them.", "s1"))
        )
        # First a label no worker has: sent back, then the one on offer.
        wanted = "a100" if len(fake_ollama.planning_calls()) == 1 else "true"
        document["subtasks"][0]["requires"] = {"gpu": wanted}
        return json.dumps(document)

    fake_ollama.responder = respond
    processes.worker(supervisor.address, name="plain")
    processes.worker(supervisor.address, name="gpu", env={"TASKLOOM_LABELS": "gpu=true"})
    await eventually(lambda: len(supervisor.scheduler.sessions()) == 2)
    task = await client.wait(await client.submit("Render and describe an animation"))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    s1 = next(s for s in task.subtasks if s.id == "s1")
    assert (s1.requires, s1.worker) == ({"gpu": "true"}, "gpu")
    first, repair = fake_ollama.planning_calls()[:2]
    # Only the label some workers lack is listed: both run llama3.2.
    assert "gpu=true on 1 worker" in first.system
    assert "model=llama3.2" not in first.system
    assert "requires" in json.dumps(first.format)
    assert "s1 requires gpu=a100, which no connected llm worker has" in repair.prompt
