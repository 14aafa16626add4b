"""Prometheus metrics after real tasks: counters, histograms and gauges of a
supervisor (fresh registry, scraped over HTTP too) and of a worker process."""

from __future__ import annotations

import asyncio
import functools
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from taskloom.client import TaskloomClient
from taskloom.core.errors import TaskNotFound
from taskloom.core.localredis import LocalRedis, free_port
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import eventually, plan, planned

MODEL = "ollama:llama3.2"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def test_a_task_shows_up_in_the_supervisors_and_the_workers_metrics(
    supervisor_settings: SupervisorSettings, fake_ollama: FakeOllama, processes: Processes
) -> None:
    def respond(call: ChatCall) -> str:
        if call.planning:
            return planned(
                ("s1", "llm", "Gather the key facts."), ("s2", "llm", "Write more from them.", "s1")
            )
        return "an answer"

    fake_ollama.responder = respond
    registry = CollectorRegistry()
    settings = supervisor_settings.model_copy(update={"metrics_port": 0})
    worker_port = free_port()
    async with Supervisor(settings, metrics=SupervisorMetrics(registry)) as supervisor:
        processes.worker(
            supervisor.address,
            capabilities="llm",
            env={"TASKLOOM_METRICS_PORT": str(worker_port)},
        )
        await eventually(lambda: supervisor.scheduler.sessions())
        async with TaskloomClient(supervisor.address) as client:
            task = await client.wait(await client.submit("a goal"))
            assert task.status == TaskStatus.SUCCEEDED, task.error
            # A subtask no connected worker can run waits in the READY queue.
            waiting = await client.submit("wait", plan=plan(("x", "echo", "1")))

            def get(name: str, **labels: str) -> float | None:
                return registry.get_sample_value(name, labels)

            await eventually(lambda: get("taskloom_ready_subtasks", capability="echo") == 1)
            await eventually(
                lambda: (get("taskloom_ready_oldest_age_seconds", capability="echo") or 0) > 0
            )
            await client.cancel(waiting)

            assert get("taskloom_tasks_submitted_total") == 2
            assert get("taskloom_tasks_finished_total", outcome="succeeded") == 1
            await eventually(lambda: get("taskloom_tasks_finished_total", outcome="cancelled") == 1)
            llm = {"capability": "llm"}
            assert get("taskloom_subtasks_finished_total", outcome="succeeded", **llm) == 3
            assert get("taskloom_subtask_duration_seconds_count", **llm) == 3
            assert get("taskloom_subtask_queue_wait_seconds_count", **llm) == 3
            assert (get("taskloom_dispatch_duration_seconds_count") or 0) >= 1
            assert get("taskloom_planner_runs_total", kind="plan", outcome="ok") == 1
            assert get("taskloom_planner_repairs_total") == 0
            plan_call = {"model": MODEL, "operation": "plan"}
            assert get("taskloom_llm_requests_total", outcome="ok", **plan_call) == 1
            assert get("taskloom_llm_request_duration_seconds_count", **plan_call) == 1
            assert get("taskloom_llm_tokens_total", model=MODEL, direction="output") == 7
            assert (get("taskloom_redis_operation_duration_seconds_count", operation="complete")
                    or 0) >= 1  # fmt: skip
            assert get("taskloom_leader") == 1
            assert get("taskloom_workers_connected") == 1
            assert get("taskloom_worker_slots", state="total") == 4

            # The same over HTTP, as Prometheus sees it.
            text = scrape(supervisor.metrics_port)
            assert value(text, "taskloom_tasks_submitted_total") == 2
            assert value(text, "taskloom_leader") == 1

            # Every process says how it does itself, and no series is a _created one.
            assert (value(text, "process_resident_memory_bytes") or 0) > 0
            assert "python_info{" in text and "_created" not in text

            worker = scrape(worker_port)
            assert (value(worker, "process_resident_memory_bytes") or 0) > 0
            assert "_created" not in worker
            assert (
                value(
                    worker, "taskloom_worker_attempts_total", capability="llm", outcome="succeeded"
                )
                == 3
            )
            assert value(
                worker, "taskloom_llm_requests_total", model=MODEL, operation="generate",
                outcome="ok",
            ) == 3  # fmt: skip
            assert value(worker, "taskloom_llm_tokens_total", model=MODEL, direction="output") == 21
            assert value(worker, "taskloom_worker_connected") == 1
            assert value(worker, "taskloom_worker_concurrency") == 4


def test_no_label_can_carry_an_id_and_names_follow_the_rules() -> None:
    registry = CollectorRegistry()
    SupervisorMetrics(registry)
    for family in registry.collect():
        assert family.name.startswith("taskloom_"), family.name
        for sample in family.samples:
            assert not {"task", "task_id", "subtask", "subtask_id"} & set(sample.labels)
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian prometheus)")
async def test_promtool_finds_nothing_wrong_with_a_live_scrape(
    supervisor_settings: SupervisorSettings, fake_ollama: FakeOllama, processes: Processes
) -> None:
    settings = supervisor_settings.model_copy(update={"metrics_port": 0})
    async with Supervisor(settings, metrics=SupervisorMetrics(CollectorRegistry())) as supervisor:
        processes.worker(supervisor.address, capabilities="echo")
        async with TaskloomClient(supervisor.address) as client:
            await client.wait(await client.submit("g", plan=plan(("a", "echo", "1"))))
        text = scrape(supervisor.metrics_port)
    result = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


async def test_busy_subtasks_count_the_work_workers_hold_per_capability(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, test_dir: Path
) -> None:
    """What autoscalers scale on: READY plus held, per capability."""

    def get(name: str, capability: str) -> float | None:
        return supervisor.metrics.registry.get_sample_value(name, {"capability": capability})

    processes.worker(supervisor.address, capabilities="gate", concurrency=2)
    task_id = await client.submit(
        "hold", plan=plan(("a", "gate", "A"), ("b", "gate", "B"), ("c", "gate", "C"))
    )
    await eventually(lambda: get("taskloom_busy_subtasks", "gate") == 2)
    assert get("taskloom_ready_subtasks", "gate") == 1
    for sid in "abc":
        (test_dir / f"open-{sid}").touch()
    await client.wait(task_id)
    # Zero, not absent: an autoscaler's sum must see the idle pool.
    await eventually(lambda: get("taskloom_busy_subtasks", "gate") == 0)
    assert get("taskloom_ready_subtasks", "gate") == 0


async def test_the_leader_says_whether_redis_can_lose_what_it_acknowledges(
    supervisor_settings: SupervisorSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The session's Redis runs with the defaults (appendfsync always).
    registry = CollectorRegistry()
    durable = functools.partial(registry.get_sample_value, "taskloom_redis_durable")
    async with Supervisor(supervisor_settings, metrics=SupervisorMetrics(registry)):
        await eventually(lambda: durable() == 1)
    assert durable() == -1  # no longer the leader: it does not know
    assert "appendfsync" not in caplog.text
    with LocalRedis(tmp_path / "redis", appendfsync="everysec") as lax:
        registry = CollectorRegistry()
        settings = supervisor_settings.model_copy(update={"redis_url": lax.url})
        async with Supervisor(settings, metrics=SupervisorMetrics(registry)):
            await eventually(lambda: registry.get_sample_value("taskloom_redis_durable") == 0)
    assert f"Redis at {lax.url} runs with appendonly yes and appendfsync everysec" in caplog.text
    assert "Run it with appendonly yes and appendfsync always" in caplog.text


async def test_a_redis_that_refuses_config_get_is_said_to_be_unknown(
    supervisor_settings: SupervisorSettings,
    redis_server: LocalRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As on managed Redis services: a user that may do everything but CONFIG.
    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.acl_setuser(
        "no-config", enabled=True, passwords=["+secret"], commands=["+@all", "-config"],
        keys=["*"], channels=["*"],
    )  # fmt: skip
    await admin.aclose()
    url = redis_server.url.replace("redis://", "redis://no-config:secret@")
    registry = CollectorRegistry()
    settings = supervisor_settings.model_copy(update={"redis_url": url})
    async with (
        Supervisor(settings, metrics=SupervisorMetrics(registry)) as supervisor,
        TaskloomClient(supervisor.address) as client,
    ):
        await eventually(lambda: "CONFIG GET is refused" in caplog.text)
        assert registry.get_sample_value("taskloom_redis_durable") == -1
        # The supervisor serves as ever.
        task_id = await client.submit("g", plan=plan(("a", "echo", "1")))
        assert (await client.get(task_id)).goal == "g"


async def test_grpc_calls_are_counted_by_method_type_and_code(
    supervisor_settings: SupervisorSettings, processes: Processes
) -> None:
    """The gRPC server metrics every gRPC dashboard knows, from a real server:
    unary calls by their code, a watch stream once it ends, the worker stream."""
    settings = supervisor_settings.model_copy(update={"metrics_port": 0})
    async with Supervisor(settings, metrics=SupervisorMetrics(CollectorRegistry())) as supervisor:
        processes.worker(supervisor.address, capabilities="echo")
        async with TaskloomClient(supervisor.address) as client:
            task_id = await client.submit("counted", plan=plan(("a", "echo", "1")))
            [_ async for _ in client.watch(task_id)]
            for _ in range(2):
                with pytest.raises(TaskNotFound):
                    await client.get("0" * 20)

        text = ""

        def handled(
            method: str, kind: str, code: str, service: str = "TaskService"
        ) -> float | None:
            return value(text, "grpc_server_handled_total", grpc_service=f"taskloom.v1.{service}",
                         grpc_method=method, grpc_type=kind, grpc_code=code)  # fmt: skip

        # The SDK submits on its Session stream, which counts once, when the
        # server sees the client close it: that happens after the client's
        # close returns, so the scrape waits for it.
        async def session_counted() -> bool:
            nonlocal text
            text = await asyncio.to_thread(scrape, supervisor.metrics_port)
            return handled("Session", "bidi_stream", "CANCELLED") is not None

        await eventually(session_counted)

    assert handled("Session", "bidi_stream", "CANCELLED") == 1
    assert handled("SubmitTask", "unary", "OK") is None
    assert handled("GetTask", "unary", "NOT_FOUND") == 2
    assert handled("WatchTask", "server_stream", "OK") == 1
    tasks = {"grpc_service": "taskloom.v1.TaskService", "grpc_type": "unary"}
    assert value(text, "grpc_server_started_total", grpc_method="GetTask", **tasks) == 2
    assert value(text, "grpc_server_handling_seconds_count", grpc_method="GetTask", **tasks) == 2
    # The worker's stream has started (it ends when the supervisor stops).
    started = value(text, "grpc_server_started_total", grpc_service="taskloom.v1.WorkerService",
                    grpc_method="Connect", grpc_type="bidi_stream")  # fmt: skip
    assert started is not None and started >= 1
