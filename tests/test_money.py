"""Money through a cluster: the supervisor's price table prices planning and
every subtask's LLM calls (workers get it in their Welcome), costs show per
subtask, per task and per model in the SDK, the CLI and the metrics, a
``max_cost`` is enforced while a reply streams, and a cancelled attempt's
tokens count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from taskloom.client import TaskloomClient
from taskloom.core.errors import ConfigError, InvalidArgument
from taskloom.core.localredis import free_port
from taskloom.core.model import FailureReason, TaskStatus, Usage
from taskloom.core.prices import BUILTIN_PRICES, Price, PriceTable, load_prices
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.settings import SupervisorSettings
from tests.client.test_cli import taskloom
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import eventually, plan, planned, wait_subtask
from tests.test_metrics import scrape, value

MODEL = "ollama:llama3.2"
LONG = "word " * 800
"""A reply of about 1,000 tokens (4 characters each, as the fake counts)."""


def prices(tmp_path: Path, input_: float, output: float) -> str:
    path = tmp_path / "prices.toml"
    path.write_text(f'["ollama:llama3.*"]\ninput = {input_}\noutput = {output}\n')
    return str(path)


def cost_of(call: ChatCall, output_tokens: int, input_: float, output: float) -> float:
    """What the fake reports a call used, priced per million tokens."""
    prompt = sum(len(m["content"]) // 4 for m in call.messages)
    return (prompt * input_ + output_tokens * output) / 1e6


async def test_costs_per_subtask_task_and_model_in_the_sdk_cli_and_metrics(
    supervisor_settings: SupervisorSettings,
    fake_ollama: FakeOllama,
    processes: Processes,
    tmp_path: Path,
) -> None:
    fake_ollama.responder = lambda call: (
        planned(("s1", "llm", "Gather the key facts."), ("s2", "llm", "Write it up.", "s1"))
        if call.planning
        else "an answer"
    )
    settings = supervisor_settings.model_copy(
        update={
            "prices_file": prices(tmp_path, 1000, 2000),
            "metrics_port": 0,
            "console_port": 0,
        }
    )
    registry = CollectorRegistry()
    worker_port = free_port()
    async with (
        Supervisor(settings, metrics=SupervisorMetrics(registry)) as supervisor,
        TaskloomClient(supervisor.address) as client,
    ):
        processes.worker(supervisor.address, env={"TASKLOOM_METRICS_PORT": str(worker_port)})
        await eventually(lambda: supervisor.scheduler.sessions())
        task = await client.wait(await client.submit("Write a report", synthesize=False))

        assert task.status == TaskStatus.SUCCEEDED, task.error
        expected = [cost_of(c, 7, 1000, 2000) for c in fake_ollama.calls]
        s1, s2 = task.subtasks
        assert s1.usage.costs == {MODEL: pytest.approx(expected[1])}
        assert s2.usage.cost == pytest.approx(expected[2])
        # The task's: planning and both steps, by model.
        assert task.usage.costs == {MODEL: pytest.approx(sum(expected))}
        assert task.usage.cost == pytest.approx(sum(expected))

        # The planner's calls in the supervisor's metrics, the steps' in the worker's.
        planned_cost = registry.get_sample_value("taskloom_llm_cost_total", {"model": MODEL})
        assert planned_cost == pytest.approx(expected[0])
        worker = scrape(worker_port)
        assert value(worker, "taskloom_llm_cost_total", model=MODEL) == pytest.approx(
            expected[1] + expected[2]
        )

        args = ("--supervisor", supervisor.address)
        code, out, err = await taskloom("get", task.id, "--json", *args)
        assert code == 0, err
        document = json.loads(out)
        assert document["usage"]["cost"] == pytest.approx(sum(expected))
        assert document["usage"]["costs"] == {MODEL: pytest.approx(sum(expected))}
        assert document["subtasks"][0]["usage"]["cost"] == pytest.approx(expected[1])
        code, out, err = await taskloom("get", task.id, *args)
        assert code == 0, err
        assert "cost" in out.splitlines()[2]  # a column of the subtasks' table
        # And the web console's task view.
        assert supervisor.console is not None
        page = f"http://127.0.0.1:{supervisor.console.port}/api/tasks/{task.id}"
        async with aiohttp.ClientSession() as http, http.get(page) as got:
            assert (await got.json())["usage"]["costs"] == {MODEL: pytest.approx(sum(expected))}
        assert f"cost {sum(expected):.4g} ({MODEL} {sum(expected):.4g})" in out


async def test_a_reply_stops_where_the_tasks_max_cost_runs_out(
    supervisor_settings: SupervisorSettings,
    fake_ollama: FakeOllama,
    processes: Processes,
    tmp_path: Path,
) -> None:
    # Output at 1,000 per million tokens: a max_cost of 0.05 leaves 50 tokens.
    settings = supervisor_settings.model_copy(update={"prices_file": prices(tmp_path, 0, 1000)})
    fake_ollama.responder = lambda call: LONG
    fake_ollama.counts_tokens = True  # like Ollama: num_predict stops the generation
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        processes.worker(supervisor.address)
        await eventually(lambda: supervisor.scheduler.sessions())
        document = plan(("s1", "llm", "Write at length."))
        task = await client.wait(await client.submit("long", plan=document, max_cost=0.05))

    assert task.status == TaskStatus.FAILED
    assert task.failure_reason == FailureReason.BUDGET_EXCEEDED
    assert re.fullmatch(
        r"BUDGET_EXCEEDED: the task's budget ran out \(\d+ tokens, cost 0.05 of its max_cost "
        r"0.05\); in s1, its reply was stopped after 50 tokens",
        task.error,
    )
    (call,) = fake_ollama.calls
    assert call.options["num_predict"] == 50
    assert task.usage.output_tokens == 50
    assert task.usage.cost == pytest.approx(0.05)


async def test_a_backend_that_ignores_the_cap_is_cut_off_mid_stream(
    supervisor_settings: SupervisorSettings,
    fake_ollama: FakeOllama,
    processes: Processes,
    tmp_path: Path,
) -> None:
    settings = supervisor_settings.model_copy(update={"prices_file": prices(tmp_path, 0, 1000)})
    fake_ollama.responder = lambda call: LONG
    fake_ollama.chunk_delay = 0.02  # 250 chunks: five seconds, unless cut
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        processes.worker(supervisor.address)
        await eventually(lambda: supervisor.scheduler.sessions())
        document = plan(("s1", "llm", "Write at length."))
        task = await client.wait(await client.submit("long", plan=document, max_cost=0.05))

    assert task.failure_reason == FailureReason.BUDGET_EXCEEDED, task.error
    (call,) = fake_ollama.calls
    assert call.options["num_predict"] == 50  # ignored by this backend
    await eventually(lambda: call.cut)  # the worker closed the stream
    assert call.chunks_sent < 50
    assert "its max_cost is 0.05; in s1, its reply was stopped after about" in task.error
    # Its tokens count, as far as the worker could count them.
    assert task.usage.output_tokens > 0


async def test_a_cancelled_attempts_tokens_count(
    supervisor_settings: SupervisorSettings,
    fake_ollama: FakeOllama,
    processes: Processes,
    tmp_path: Path,
) -> None:
    settings = supervisor_settings.model_copy(update={"prices_file": prices(tmp_path, 0, 1000)})
    fake_ollama.responder = lambda call: LONG
    fake_ollama.chunk_delay = 0.1
    async with Supervisor(settings) as supervisor, TaskloomClient(supervisor.address) as client:
        processes.worker(supervisor.address)
        await eventually(lambda: supervisor.scheduler.sessions())
        task_id = await client.submit("long", plan=plan(("s1", "llm", "Write at length.")))
        await wait_subtask(client, task_id, "s1", "RUNNING")
        await eventually(lambda: fake_ollama.calls and fake_ollama.calls[0].chunks_sent >= 5)
        await client.cancel(task_id)

        async def charged() -> Usage | None:
            usage = (await client.get(task_id)).usage
            return usage if usage.output_tokens else None

        usage = await eventually(charged)
        task = await client.get(task_id)
    assert task.status == TaskStatus.CANCELLED
    assert usage.cost > 0 and usage.costs.keys() == {MODEL}
    # The stopped attempt shows what it used, as a finished one does.
    assert task.subtasks[0].usage == usage


async def test_a_model_without_a_price_cannot_spend_a_money_budget(
    supervisor_settings: SupervisorSettings, fake_ollama: FakeOllama, processes: Processes
) -> None:
    # An OpenAI-compatible server's model the built-in table does not price.
    env = {"TASKLOOM_LLM": "openai:llama3.2", "TASKLOOM_OPENAI_BASE_URL": f"{fake_ollama.url}/v1"}
    async with (
        Supervisor(supervisor_settings) as supervisor,
        TaskloomClient(supervisor.address) as client,
    ):
        processes.worker(supervisor.address, env=env)
        await eventually(lambda: supervisor.scheduler.sessions())
        document = plan(("s1", "llm", "Write it."))
        task = await client.wait(await client.submit("unpriced", plan=document, max_cost=1.0))
        assert task.status == TaskStatus.FAILED
        assert "openai:llama3.2 has no price, and this task has a max_cost" in task.error
        # Without a budget in money it runs, at no cost it can see.
        free = await client.wait(await client.submit("unpriced", plan=document))
        assert free.status == TaskStatus.SUCCEEDED, free.error
        assert free.usage.costs == {}
        with pytest.raises(InvalidArgument, match="max_cost must be positive"):
            await client.submit("negative", plan=document, max_cost=-1.0)


def test_the_price_table_matches_names_then_the_longest_pattern(tmp_path: Path) -> None:
    table = PriceTable({**BUILTIN_PRICES, "openai:*": Price(1, 1), "ollama:big*": Price(5, 7)})
    assert table.price("openai:gpt-4o") == Price(2.5, 10.0)
    assert table.price("openai:other") == Price(1, 1)
    assert table.price("ollama:bigmodel") == Price(5, 7)
    assert table.price("ollama:llama3.2") == Price(0, 0)
    assert table.price("acme:x") is None
    assert table.cost("ollama:bigmodel", 1_000_000, 2_000_000) == 19
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"openai:gpt-4o": {"input": 3, "output": 12}}))
    assert load_prices(str(path)).price("openai:gpt-4o") == Price(3, 12)
    path.write_text(json.dumps({"openai:gpt-4o": {"input": -3}}))
    with pytest.raises(ConfigError, match="prices must be numbers of at least 0"):
        load_prices(str(path))
    path.write_text(json.dumps({"openai:gpt-4o": {"in": 3}}))
    with pytest.raises(ConfigError, match="needs input and output"):
        load_prices(str(path))


def test_usage_adds_costs_by_model() -> None:
    a = Usage(input_tokens=1, costs={"x:a": 0.5})
    b = Usage(output_tokens=2, costs={"x:a": 0.25, "y:b": 1.0})
    assert (a + b).costs == {"x:a": 0.75, "y:b": 1.0}
    assert (a + b).cost == 1.75
