"""The ``taskloom`` command, run as a process, against a real supervisor and workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from taskloom.client import SyncTaskloomClient, TaskloomClient
from taskloom.client.local import wait_serving
from taskloom.core.localredis import free_port
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from tests.conftest import REPO, Processes
from tests.fake_ollama import FakeOllama
from tests.helpers import plan, planned, wait_subtask
from tests.test_real_model import embedded_model_present

TASK_KEYS = {
    "id", "status", "goal", "result", "error", "failure_reason", "paused", "usage", "subtasks"
}  # fmt: skip
SUBTASK_KEYS = {
    "id", "title", "instruction", "capability", "role", "depends_on", "status", "output", "error",
    "attempts", "worker", "cache_hit", "requires_approval", "requires", "usage",
}  # fmt: skip
EVENT_KEYS = {
    "event_id", "time", "type", "task_id", "subtask_id", "status", "message", "trace_id",
    "span_id", "actor",
}  # fmt: skip


async def taskloom(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskloom.client",
        *args,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return await process.wait(), out.decode(), err.decode()


def write_plan(tmp_path: Path, document: object) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    return str(path)


async def test_submit_wait_json_prints_the_finished_task(
    supervisor: Supervisor, processes: Processes, tmp_path: Path
) -> None:
    processes.worker(supervisor.address)
    plan_file = write_plan(tmp_path, plan(("a", "echo", "one"), ("b", "echo", "two", "a")))
    code, out, err = await taskloom(
        "submit",
        "count",
        "--plan",
        plan_file,
        "--wait",
        "--json",
        "--supervisor",
        supervisor.address,
    )
    assert code == 0, err
    task = json.loads(out)
    assert set(task) == TASK_KEYS
    assert (task["status"], task["goal"], task["result"], task["error"]) == (
        "SUCCEEDED", "count", "two", ""
    )  # fmt: skip
    assert [set(s) for s in task["subtasks"]] == [SUBTASK_KEYS, SUBTASK_KEYS]
    assert task["failure_reason"] is None
    assert task["usage"] == {
        "input_tokens": 0, "output_tokens": 0, "calls": 0, "seconds": 0.0, "models": [],
        "cost": 0.0, "costs": {},
    }  # fmt: skip
    b = task["subtasks"][1]
    assert (b["id"], b["depends_on"], b["status"], b["output"], b["attempts"]) == (
        "b", ["a"], "SUCCEEDED", "two", 1
    )  # fmt: skip
    assert b["worker"].startswith("worker-")


async def test_submit_prints_the_id_and_get_watch_tasks_follow_it(
    supervisor: Supervisor, processes: Processes, tmp_path: Path
) -> None:
    env = {"TASKLOOM_SUPERVISOR": supervisor.address}
    plan_file = write_plan(tmp_path, plan(("a", "echo", "one")))
    code, out, err = await taskloom("submit", "just one", "--plan", plan_file, env=env)
    assert code == 0, err
    task_id = out.strip()
    assert len(task_id) == 20

    processes.worker(supervisor.address)
    code, out, err = await taskloom("watch", task_id, "--json", env=env)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert all(set(e) == EVENT_KEYS for e in events)
    assert events[0]["type"] == "task.submitted" and events[-1]["type"] == "task.succeeded"
    assert {e["task_id"] for e in events} == {task_id}
    assert events[-1]["time"].endswith("Z")

    code, out, _ = await taskloom(
        "watch", task_id, "--after", events[-2]["event_id"], "--json", env=env
    )
    assert [json.loads(line)["event_id"] for line in out.splitlines()] == [events[-1]["event_id"]]

    code, out, _ = await taskloom("get", task_id, "--json", env=env)
    assert code == 0 and json.loads(out)["result"] == "one"
    code, out, _ = await taskloom("get", task_id, env=env)
    assert code == 0 and "SUCCEEDED" in out and "one" in out
    code, out, _ = await taskloom("tasks", env=env)
    header, row = out.splitlines()[:2]
    assert code == 0 and header.split() == ["ID", "CREATED", "STATUS", "DONE", "GOAL"]
    assert row.startswith(task_id) and "just one" in row and "1/1" in row
    code, out, _ = await taskloom("tasks", "--json", env=env)
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert listed["id"] == task_id and listed["subtasks_total"] == 1 and "subtasks" not in listed
    code, out, err = await taskloom("tasks", "--status", "failed", "--json", env=env)
    assert code == 0 and out == ""
    code, out, err = await taskloom("tasks", "--status", "failed", env=env)
    assert code == 0 and out == "" and err.strip() == "no tasks in FAILED"


async def test_submit_wait_follows_progress_and_exits_1_when_the_task_fails(
    supervisor: Supervisor, processes: Processes, tmp_path: Path
) -> None:
    processes.worker(supervisor.address)
    plan_file = write_plan(tmp_path, plan(("a", "echo", "fine"), ("b", "broken", "this", "a")))
    code, out, err = await taskloom(
        "submit", "doomed", "--plan", plan_file, "--wait", "--supervisor", supervisor.address
    )
    assert code == 1
    assert "subtask.failed" in out and "task.failed" in out
    assert "error: subtask b (B) failed: cannot do 'this'" in out
    assert "following it" in err


async def test_no_synthesize_skips_the_synthesis_step_and_plans_get_it_by_default(
    supervisor: Supervisor, processes: Processes, tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    fake_ollama.responder = lambda call: "MERGED"
    processes.worker(supervisor.address)
    plan_file = write_plan(tmp_path, {"subtasks": plan(("a", "echo", "x"))["subtasks"]})
    args = ("--plan", plan_file, "--wait", "--json", "--supervisor", supervisor.address)
    code, out, _ = await taskloom("submit", "g", *args)
    task = json.loads(out)
    assert code == 0 and [s["id"] for s in task["subtasks"]] == ["a", "synthesize"]
    assert task["result"] == "MERGED"
    code, out, _ = await taskloom("submit", "g", "--no-synthesize", *args)
    task = json.loads(out)
    assert code == 0 and [s["id"] for s in task["subtasks"]] == ["a"] and task["result"] == "x"


async def test_errors_are_one_line_with_distinct_exit_codes(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    at = ("--supervisor", supervisor.address)
    code, _, err = await taskloom("submit", "g", "--plan", str(tmp_path / "missing.json"), *at)
    assert code == 2 and err.startswith("error: cannot read the plan file")
    cyclic = write_plan(tmp_path, plan(("a", "echo", "x", "b"), ("b", "echo", "y", "a")))
    code, _, err = await taskloom("submit", "g", "--plan", cyclic, *at)
    assert (code, err) == (2, "error: invalid plan: cycle a → b → a\n")
    code, _, err = await taskloom("submit", "", *at)
    assert (code, err) == (2, "error: the goal is empty; say what you want done\n")
    code, _, err = await taskloom("get", "0123456789abcdef", *at)
    assert (code, err) == (4, "error: no task with id '0123456789abcdef' (it may have expired)\n")
    code, _, err = await taskloom("cancel", "0123456789abcdef", *at)
    assert code == 4
    nobody = f"127.0.0.1:{free_port()}"
    quick = {"TASKLOOM_UNAVAILABLE_GRACE": "1"}
    code, _, err = await taskloom("tasks", "--supervisor", nobody, env=quick)
    # It says it waits, and for how long, then why it gave up.
    waiting, error = err.splitlines()[:2]
    assert waiting == (
        f"no leading supervisor answers at {nobody} yet; trying for up to 1s "
        "(TASKLOOM_UNAVAILABLE_GRACE) …"
    )
    assert code == 3 and error.startswith(f"error: no supervisor answers at {nobody}")
    assert "Traceback" not in err
    code, _, err = await taskloom("tasks", "--supervisor", "nowhere")
    assert code == 2 and "TASKLOOM_SUPERVISOR" in err
    code, _, err = await taskloom("tasks", "--supervisor", "http://127.0.0.1:50051")
    assert code == 2 and "is a URL; give HOST:PORT (127.0.0.1:50051)" in err
    code, _, err = await taskloom("supervisor", "--leader-ttl", "12s")
    # A configuration error is a usage error (2), like every command's (1 means a task failed).
    assert code == 2 and "TASKLOOM_LEADER_TTL / --leader-ttl: must be under 10s" in err


async def test_submit_many_stores_each_line_and_waits_for_them_all(
    supervisor: Supervisor, processes: Processes, tmp_path: Path
) -> None:
    processes.worker(supervisor.address)
    env = {"TASKLOOM_SUPERVISOR": supervisor.address}
    shared = write_plan(tmp_path, plan(("a", "echo", "shared")))
    own = {"goal": "own plan", "plan": plan(("a", "echo", "mine")), "priority": 5}
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"first goal\n# a comment, then a blank line\n\n{json.dumps(own)}\n")
    code, out, err = await taskloom("submit-many", str(tasks), "--plan", shared, "--wait", env=env)
    assert code == 0, err
    lines = out.splitlines()
    ids = lines[:2]
    assert all(len(i) == 20 for i in ids)
    assert sorted(line.split("  ")[:2] for line in lines[2:]) == sorted(
        [i, "SUCCEEDED"] for i in ids
    )
    async with TaskloomClient(supervisor.address) as client:
        done = [await client.get(i) for i in ids]
    assert [(t.result, t.options.priority) for t in done] == [("shared", 0), ("mine", 5)]

    # A refused task is named by its place, and sets the exit status.
    tasks.write_text(f"{json.dumps({'goal': '   '})}\nanother\n")
    code, out, err = await taskloom(
        "submit-many", str(tasks), "--plan", shared, "--wait", "--json", env=env
    )
    assert code == 2, err
    stored = [json.loads(line) for line in out.splitlines()[:2]]
    assert [s["task"] for s in stored] == [1, 2]
    assert stored[0]["task_id"] == "" and "the goal is empty" in stored[0]["error"]
    (ended,) = [json.loads(line) for line in out.splitlines()[2:]]
    assert (ended["task_id"], ended["status"]) == (stored[1]["task_id"], "SUCCEEDED")

    # A malformed line stops the command before anything is sent.
    before = len(await asyncio.to_thread(_count_tasks, supervisor.address))
    tasks.write_text('fine goal\n{"goal": "x", "colour": "red"}\n')
    code, _, err = await taskloom("submit-many", str(tasks), env=env)
    assert code == 2 and f"{tasks}:2: unknown fields colour" in err
    assert len(await asyncio.to_thread(_count_tasks, supervisor.address)) == before


def _count_tasks(address: str) -> list[str]:
    with SyncTaskloomClient(address) as client:
        return [t.id for t in client.list(limit=1000)]


async def test_cancel_from_the_command_line(
    supervisor: Supervisor, processes: Processes, client: TaskloomClient
) -> None:
    processes.worker(supervisor.address)
    task_id = await client.submit("long", plan=plan(("g", "gate", "x")))
    await wait_subtask(client, task_id, "g", "RUNNING")
    code, out, _ = await taskloom(
        "cancel", task_id, "--reason", "enough", "--supervisor", supervisor.address
    )
    assert (code, out) == (0, f"{task_id} CANCELLED\n")
    assert (await client.get(task_id)).error == "enough"


async def test_a_person_steers_a_task_from_the_command_line(
    supervisor: Supervisor, processes: Processes, client: TaskloomClient, tmp_path: Path
) -> None:
    processes.worker(supervisor.address)
    at = ("--supervisor", supervisor.address)
    steps = write_plan(
        tmp_path, plan(("g", "gate", "x"), ("p", "picky", "fail it", "g"), ("z", "echo", "Z", "p"))
    )
    code, out, _ = await taskloom("submit", "steer me", "--plan", steps, "--approve-plan", *at)
    task_id = out.strip()
    await wait_subtask(client, task_id, "g", "PENDING")
    assert (await client.get(task_id)).status == TaskStatus.AWAITING_APPROVAL

    edited = write_plan(tmp_path, plan(("g", "gate", "x"), ("p", "picky", "fail it", "g"),
                                       ("z", "echo", "Z2", "p")))  # fmt: skip
    code, out, _ = await taskloom("approve", task_id, "--plan", edited, "--reason", "ok", *at)
    assert (code, out) == (0, f"{task_id} RUNNING\n")
    await wait_subtask(client, task_id, "g", "RUNNING")
    code, out, _ = await taskloom("pause", task_id, *at)
    assert (code, out) == (0, f"{task_id} RUNNING (paused)\n")
    code, out, _ = await taskloom("resume", task_id, "--json", *at)
    assert code == 0 and json.loads(out)["paused"] is False
    (processes.test_dir / "open-g").touch()
    await wait_subtask(client, task_id, "p", "FAILED")
    code, out, _ = await taskloom("retry", task_id, "--subtask", "p", "--instruction", "fine", *at)
    assert code == 0 and out.startswith(f"{task_id} p ")
    done = await client.wait(task_id)
    assert (done.status, done.result) == (TaskStatus.SUCCEEDED, "Z2")
    # Refusals are one line with the exit code of their kind.
    code, _, err = await taskloom("skip", task_id, "--subtask", "p", *at)
    assert code == 5  # the task already succeeded: nothing to skip
    assert err.startswith("error: task ") and "already SUCCEEDED" in err
    code, _, err = await taskloom("reject", "ffffffffffffffffffff", *at)
    assert code == 4


async def test_the_sync_client_does_what_the_async_one_does(
    supervisor: Supervisor, processes: Processes
) -> None:
    processes.worker(supervisor.address)

    def use() -> tuple[str, list[str], TaskStatus, int]:
        with SyncTaskloomClient(supervisor.address) as client:
            task_id = client.submit("sync", plan=plan(("a", "echo", "hi")))
            types = [e.type for e in client.watch(task_id)]
            task = client.wait(task_id)
            listed = len(client.list(statuses=[TaskStatus.SUCCEEDED]))
            many = client.submit_many(["x", "y"], plan=plan(("a", "echo", "hi")))
            ended = {e.task_id for e in client.wait_many(r.task_id for r in many)}
            assert ended == {r.task_id for r in many} and len(ended) == 2
            return task.result, types, task.status, listed

    result, types, status, listed = await asyncio.to_thread(use)
    assert (result, status, listed) == ("hi", TaskStatus.SUCCEEDED, 1)
    assert types[0] == "task.submitted" and types[-1] == "task.succeeded"


async def test_up_runs_a_whole_cluster_and_ctrl_c_stops_all_of_it(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    console = free_port()
    up = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "taskloom.client", "up", "--workers", "1", "--listen", address,
        "--data-dir", str(tmp_path / "data"), "--console-port", str(console),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_serving, address, 60.0)
        async with TaskloomClient(address) as client:
            task = await client.wait(await client.submit("up", plan=plan(("a", "echo", "up!"))))
        assert (task.status, task.result) == (TaskStatus.SUCCEEDED, "up!")
        # The console is up too, on loopback.
        page = await asyncio.to_thread(
            urllib.request.urlopen, f"http://127.0.0.1:{console}/tasks/{task.id}", timeout=10
        )
        assert b"/static/console.js" in page.read()
        assert (tmp_path / "data" / "redis" / "appendonly.aof").exists() or any(
            (tmp_path / "data" / "redis").glob("appendonlydir/*")
        )
        up.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(up.communicate(), 60)
    finally:
        if up.returncode is None:
            up.terminate()
            await asyncio.wait_for(up.communicate(), 60)
    assert up.returncode == 0, err.decode()
    assert f"console: http://127.0.0.1:{console}/" in err.decode()
    # No Ollama here: up says so at once and stands the embedded model in,
    # as the demo does, rather than failing the first goal.
    said = " ".join(err.decode().split())
    assert "No usable Ollama" in said
    assert "Using the embedded model instead" in said or "No embedded model either" in said
    host, port = address.split(":")
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=1):
        pass
    logs = (tmp_path / "data" / "logs" / "worker-1.log").read_text()
    assert "draining" in logs


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_demo_without_ollama_says_so_and_runs_anyway(tmp_path: Path) -> None:
    """With the embedded extra (as `make demo` installs it) the tiny offline
    model stands in; without it, an explicit plan of echo subtasks."""
    env = {"OLLAMA_HOST": f"127.0.0.1:{free_port()}"}
    code, out, err = await asyncio.wait_for(
        taskloom("up", "--workers", "1", "--data-dir", str(tmp_path), "--demo", "a goal", env=env),
        800,
    )
    assert code == 0, err
    assert "No usable Ollama: cannot reach Ollama at http://127.0.0.1:" in err
    assert "https://ollama.com/download" in err and "ollama pull llama3.2" in err
    assert "Traceback" not in err
    assert "SUCCEEDED" in out
    assert re.search(r"watch it at http://127\.0\.0\.1:\d+/tasks/[0-9a-f]{20}", err), err
    if embedded_model_present():
        assert "Using the embedded model instead: SmolLM2-135M, a tiny offline model" in err
        assert "note: answered by SmolLM2-135M, a tiny offline model" in out
    else:
        assert "Combine outline and examples." in out


async def test_demo_with_ollama_plans_and_answers_with_the_model(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    fake_ollama.responder = lambda call: (
        planned(("s1", "llm", "Think it over.")) if call.planning else "THE ANSWER"
    )
    code, out, err = await asyncio.wait_for(
        taskloom(
            "up", "--workers", "1", "--data-dir", str(tmp_path), "--demo", "a goal",
            env={"OLLAMA_HOST": fake_ollama.url},
        ),
        120,
    )  # fmt: skip
    assert code == 0, err
    assert "No usable Ollama" not in err
    assert "THE ANSWER" in out
    assert len(fake_ollama.planning_calls()) == 1


def _submit_and_interrupt(address: str, plan_file: Path, answer: str) -> tuple[int, str]:
    """Run ``submit --wait`` on a terminal, press Ctrl-C, answer the question.

    The child gets a pseudo-terminal from ``subprocess`` (fork and exec in C):
    forking this process in Python, as pexpect does, is unsafe while gRPC
    threads run in it.
    """
    master, slave = os.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "taskloom.client", "submit", "interrupt me", "--plan",
         str(plan_file), "--wait", "--supervisor", address],
        cwd=REPO, env={**os.environ, "COLUMNS": "200"},
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    output = ""

    def read_until(pattern: str, timeout: float = 30.0) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while not re.search(pattern, output):
            if time.monotonic() > deadline or (child.poll() is not None and not _readable(master)):
                raise AssertionError(f"no {pattern!r} in the output:\n{output}")
            if _readable(master):
                try:
                    output += os.read(master, 65536).decode(errors="replace")
                except OSError:  # EIO: the child has closed the terminal
                    time.sleep(0.05)

    try:
        read_until("following it")
        read_until("RUNNING")
        child.send_signal(signal.SIGINT)
        read_until(r"cancel task \w+\? \[y/N\]")
        os.write(master, f"{answer}\n".encode())
        read_until("CANCELLED" if answer == "y" else "goes on")
        code = child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
    return code, output


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0.1)[0])


@pytest.mark.parametrize("answer", ["y", "n"])
async def test_ctrl_c_on_submit_wait_asks_whether_to_cancel(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    tmp_path: Path,
    answer: str,
) -> None:
    processes.worker(supervisor.address)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan(("g", "gate", "wait for ever"))))

    code, output = await asyncio.to_thread(
        _submit_and_interrupt, supervisor.address, plan_file, answer
    )

    assert code == 130, output
    (task,) = await client.list()
    if answer == "y":
        assert f"task {task.id} CANCELLED" in output
        assert task.status == TaskStatus.CANCELLED
    else:
        assert f"task {task.id} goes on" in output
        assert task.status == TaskStatus.RUNNING


async def test_brackets_in_goals_titles_and_outputs_are_printed_as_text(
    supervisor: Supervisor, processes: Processes, tmp_path: Path
) -> None:
    # Rich would read these as markup: '[/]' alone made get and tasks crash.
    processes.worker(supervisor.address)
    document = plan(("a", "echo", "say [red]hi[/]"))
    document["subtasks"][0]["title"] = "close [/] tag"
    args = ("--supervisor", supervisor.address)
    code, out, err = await taskloom(
        "submit", "[bold]goal[/]", "--plan", write_plan(tmp_path, document), "--wait", *args
    )
    assert code == 0, err
    assert "say [red]hi[/]" in out
    code, out, err = await taskloom("tasks", *args)
    assert code == 0, err
    assert "[bold]goal[/]" in out
    task_id = out.splitlines()[1].split()[0]
    code, out, err = await taskloom("get", task_id, *args)
    assert code == 0, err
    assert "close [/] tag" in out and "[bold]goal[/]" in out
