"""One trace per task: the span tree across supervisor and worker, with the
GenAI attributes, the trace context carried in the Assignment, gRPC spans,
and trace ids in the task's events. An in-memory exporter collects the spans
of an in-process supervisor and an in-process worker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from taskloom.client import TaskloomClient
from taskloom.core.llm import ChatMessage, OllamaLLM
from taskloom.core.metrics import InstrumentedLLM, LLMMetrics
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.sessions import SUBMIT_SPAN
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.worker import Worker, WorkerSettings
from tests.conftest import Processes
from tests.fake_ollama import ChatCall, FakeOllama
from tests.helpers import eventually, plan, planned


def children(spans: list[ReadableSpan], of: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == of.context.span_id]


async def test_a_task_is_one_trace_from_planning_to_the_llm_calls_of_each_attempt(
    supervisor: Supervisor,
    client: TaskloomClient,
    fake_ollama: FakeOllama,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def respond(call: ChatCall) -> str:
        if call.planning:
            return planned(
                ("s1", "llm", "Gather the key facts."), ("s2", "llm", "Write more from them.", "s1")
            )
        return "SECRET OUTPUT"

    fake_ollama.responder = respond
    worker = Worker(
        WorkerSettings.load(
            supervisor=supervisor.address,
            capabilities="llm",
            ollama_host=fake_ollama.url,
            model="llama3.2",
            name="traced",
        )
    )
    serving = asyncio.create_task(worker.serve())
    try:
        task_id = await client.submit("a goal")
        task = await client.wait(task_id)
        events = [e async for e in client.watch(task_id)]
    finally:
        await worker.stop()
        await serving
    assert task.status == TaskStatus.SUCCEEDED, task.error
    await eventually(lambda: any(s.name == "task" for s in spans.get_finished_spans()))
    finished = list(spans.get_finished_spans())

    (root,) = [s for s in finished if s.name == "task"]
    assert root.attributes is not None and root.attributes["taskloom.task_id"] == task_id
    trace_id = root.context.trace_id
    in_trace = [s for s in finished if s.context.trace_id == trace_id]

    (planning,) = [s for s in children(in_trace, root) if s.name == "plan"]
    attributes = dict(planning.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "llama3.2"
    assert attributes["gen_ai.provider.name"] == "ollama"
    assert attributes["gen_ai.usage.output_tokens"] == 7
    assert int(str(attributes["gen_ai.usage.input_tokens"])) > 0
    (plan_call,) = children(in_trace, planning)
    assert plan_call.name == "chat llama3.2" and plan_call.kind == trace.SpanKind.CLIENT

    attempts = [s for s in children(in_trace, root) if s.name == "subtask.attempt"]
    assert sorted(str(dict(s.attributes or {})["taskloom.subtask_id"]) for s in attempts) == [
        "s1", "s2", "synthesize"
    ]  # fmt: skip
    for attempt in attempts:
        assert dict(attempt.attributes or {})["taskloom.outcome"] == "succeeded"
        (call,) = children(in_trace, attempt)
        call_attributes = dict(call.attributes or {})
        assert call_attributes["gen_ai.usage.output_tokens"] == 7
        # Prompts and outputs stay out of spans unless TASKLOOM_TRACE_CONTENT=1.
        assert "taskloom.completion" not in call_attributes
        assert "SECRET OUTPUT" not in json.dumps(call_attributes)

    # The SDK submits on its Session: each submit has a server span there, in
    # the caller's trace (unary calls get theirs from the instrumentation).
    (submit,) = [s for s in in_trace if s.name == SUBMIT_SPAN]
    assert submit.kind == trace.SpanKind.SERVER
    assert root.parent is not None and root.parent.span_id == submit.context.span_id

    # The events name the trace; task.submitted and plan.requested their spans.
    trace_hex = f"{trace_id:032x}"
    assert {e.trace_id for e in events} == {trace_hex}
    submitted = next(e for e in events if e.type == "task.submitted")
    assert submitted.span_id == f"{root.context.span_id:016x}"
    requested = next(e for e in events if e.type == "plan.requested")
    assert requested.span_id == f"{planning.context.span_id:016x}"


async def test_prompts_and_outputs_are_recorded_only_when_asked(
    fake_ollama: FakeOllama, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_ollama.responder = lambda call: "the output"
    llm = InstrumentedLLM(OllamaLLM(fake_ollama.url, "llama3.2"), LLMMetrics(CollectorRegistry()),
                          "generate")  # fmt: skip
    await llm.chat([ChatMessage("user", "the prompt")])
    monkeypatch.setenv("TASKLOOM_TRACE_CONTENT", "1")
    await llm.chat([ChatMessage("user", "the prompt")])
    await llm.close()

    quiet, recorded = [dict(s.attributes or {}) for s in spans.get_finished_spans()]
    assert "taskloom.prompt" not in quiet and "taskloom.completion" not in quiet
    assert (recorded["taskloom.prompt"], recorded["taskloom.completion"]) == (
        "the prompt",
        "the output",
    )


async def test_a_task_that_ends_after_a_failover_ends_its_trace_too(
    supervisor_settings: SupervisorSettings,
    spans: InMemorySpanExporter,
    processes: Processes,
    test_dir: Path,
) -> None:
    """The leader that created the task hands it over (its root span ends,
    marked handed over); the next leader marks the task's end with a span in
    the same trace, linked to the root."""
    first = Supervisor(supervisor_settings)
    second = Supervisor(supervisor_settings)
    await first.start()
    await second.start()
    try:
        processes.worker(f"{first.address},{second.address}")
        async with TaskloomClient(f"{first.address},{second.address}") as client:
            task_id = await client.submit("over two terms", plan=plan(("g", "gate", "x")))
            await eventually(lambda: (test_dir / "started-g-1").exists())
            await first.stop(grace=0.5)  # hands the lease over at once
            await eventually(lambda: second.orchestrator is not None, timeout=15)
            (test_dir / "open-g").touch()
            task = await client.wait(task_id)
        assert task.status == TaskStatus.SUCCEEDED
        finished = spans.get_finished_spans()
        (root,) = [s for s in finished if s.name == "task"]
        assert root.attributes is not None and root.attributes["taskloom.handed_over"] is True
        ended = await eventually(lambda: [s for s in spans.get_finished_spans()
                                          if s.name == "task.ended"])  # fmt: skip
        (end,) = ended
        assert end.context.trace_id == root.context.trace_id
        assert end.parent is not None and end.parent.span_id == root.context.span_id
        assert [link.context.span_id for link in end.links] == [root.context.span_id]
        assert end.attributes is not None and end.attributes["taskloom.status"] == "SUCCEEDED"
    finally:
        await first.stop(grace=0.1)
        await second.stop(grace=0.1)
