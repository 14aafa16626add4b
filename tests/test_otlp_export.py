"""Traces as an operator configures them: the standard ``OTEL_*`` variables,
real processes (CLI, supervisor, worker) exporting to a real OTLP receiver
over gRPC and over HTTP, one trace from the command to the worker's LLM call,
and a watch linked to the task's trace rather than an orphan one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taskloom.core.localredis import free_port
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from tests.client.test_cli import taskloom as cli
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import eventually
from tests.otlp import Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = await Receiver().start()
    yield started
    await started.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_a_task_from_the_cli_is_one_trace_across_processes_on_a_real_receiver(
    protocol: str,
    receiver: Receiver,
    supervisor_settings: SupervisorSettings,
    processes: Processes,
    fake_ollama: FakeOllama,
    tmp_path: Path,
) -> None:
    def respond(call: ChatCall) -> str:
        return "a short answer"

    fake_ollama.responder = respond
    env = receiver.env(protocol)
    address = f"127.0.0.1:{free_port()}"
    await processes.supervisor(supervisor_settings, listen=address, env=env)
    processes.worker(address, capabilities="llm,echo,flaky", env=env)
    plan_file = tmp_path / "plan.json"
    steps = [{"id": "a", "capability": "llm", "instruction": "answer"},
             {"id": "b", "capability": "flaky", "instruction": "2"}]  # fmt: skip
    plan_file.write_text(json.dumps({"subtasks": steps}))
    code, out, err = await cli(
        "submit", "traced", "--plan", str(plan_file), "--wait", "--json",
        "--supervisor", address, env=env,
    )  # fmt: skip
    assert code == 0, err
    task_id = json.loads(out)["id"]
    code, _, err = await cli("watch", task_id, "--supervisor", address, env=env)
    assert code == 0, err

    got = receiver.received

    def arrived() -> bool:
        return bool(
            got.named("taskloom submit", "taskloom-cli")
            and got.named("task", "taskloom-supervisor")
            and got.named("subtask.attempt", "taskloom-worker")
            and [s for s in got.spans if s.name.endswith("WatchTask") and s.links]
        )

    await eventually(arrived, timeout=60, interval=0.2)
    (command,) = got.named("taskloom submit", "taskloom-cli")
    (command,) = got.named("taskloom submit", "taskloom-cli")
    (root,) = got.named("task", "taskloom-supervisor")
    assert command.attributes["taskloom.command"] == "submit"
    assert command.attributes["process.exit.code"] == 0
    # One trace: the command, the task's root span, the attempts (a, b twice,
    # the synthesis) and their LLM calls.
    assert root.trace_id == command.trace_id
    assert root.attributes["taskloom.task_id"] == task_id
    attempts = got.named("subtask.attempt", "taskloom-worker")
    assert len(attempts) == 4 and {s.parent_span_id for s in attempts} == {root.span_id}
    assert {s.trace_id for s in attempts} == {command.trace_id}
    # The failed attempt records its exception; the retry links to it.
    first, second = sorted(
        (s for s in attempts if s.attributes["taskloom.subtask_id"] == "b"),
        key=lambda s: s.attributes["taskloom.attempt"],
    )
    assert "exception" in first.events and "exception" not in second.events
    assert second.links == [(first.trace_id, first.span_id)]
    chats = [s for s in got.spans if s.name.startswith("chat ") and s.service == "taskloom-worker"]
    assert len(chats) == 2 and {s.trace_id for s in chats} == {command.trace_id}
    assert chats[0].attributes["gen_ai.response.model"] == "llama3.2"
    assert list(chats[0].attributes["gen_ai.response.finish_reasons"].values) == [_string("stop")]
    # A watch is a trace of its own command (the stream carries its context),
    # linked to the task's.
    (watch_command,) = got.named("taskloom watch", "taskloom-cli")
    (watch,) = [s for s in got.spans if s.name.endswith("WatchTask")
                and s.trace_id == watch_command.trace_id]  # fmt: skip
    assert (root.trace_id, root.span_id) in watch.links
    assert got.protocols == {protocol}


def _string(value: str) -> object:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    return AnyValue(string_value=value)


async def test_the_standard_variables_choose_the_exporter_and_the_sampler(
    receiver: Receiver, supervisor: Supervisor
) -> None:
    address = supervisor.address
    # console: spans on stderr, stdout left to what the command prints.
    code, out, err = await cli(
        "tasks", "--json", "--supervisor", address, env={"OTEL_TRACES_EXPORTER": "console"}
    )
    assert code == 0, err
    assert '"name": "taskloom tasks"' in err and "trace_id" not in out
    # none, or a sampler that keeps nothing: an endpoint alone sends nothing.
    for off in ({"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_TRACES_SAMPLER": "always_off"}):
        code, _, err = await cli(
            "tasks", "--supervisor", address, env={**receiver.env("grpc"), **off}
        )
        assert code == 0, err
    # An endpoint alone means OTLP over gRPC; the process flushes before it exits.
    code, _, err = await cli("tasks", "--supervisor", address, env=receiver.env("grpc"))
    assert code == 0, err
    await asyncio.sleep(0)
    assert len(receiver.received.named("taskloom tasks", "taskloom-cli")) == 1
    # What taskloom cannot do is said, with what it can.
    for bad, words in (
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin is not an exporter taskloom has"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
         "'http/json' is not supported; use grpc or http/protobuf"),
    ):  # fmt: skip
        code, _, err = await cli("tasks", "--supervisor", address, env=bad)
        assert code == 2 and words in err, err
