"""Structured logs: JSON lines carrying the ids bound around the work."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace

from taskloom.core.logs import bind, bind_attempt, setup_logging
from taskloom.core.model import AttemptRef


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_bound_ids_and_the_exception(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out)
    log = logging.getLogger("taskloom.test")
    log.info("outside")
    with bind_attempt(AttemptRef("t1", "s2", 3)):
        log.warning("inside %s", "the attempt")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
    with bind(task_id="t9"):
        log.info("planning")

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [
        "outside", "inside the attempt", "it failed", "planning"
    ]  # fmt: skip
    assert "task_id" not in lines[0]
    assert (lines[1]["task_id"], lines[1]["subtask_id"], lines[1]["attempt"]) == ("t1", "s2", 3)
    assert lines[1]["level"] == "WARNING" and lines[1]["logger"] == "taskloom.test"
    assert "ValueError: boom" in lines[2]["exception"]
    assert lines[3]["task_id"] == "t9" and "subtask_id" not in lines[3]


def test_json_lines_carry_the_current_trace(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out)
    span = trace.NonRecordingSpan(trace.SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=False))
    with trace.use_span(span):
        logging.getLogger("taskloom.test").info("traced")
    line = json.loads(out.getvalue())
    assert (line["trace_id"], line["span_id"]) == (f"{0xABC:032x}", f"{0xDEF:016x}")


def test_text_lines_show_where(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out)
    with bind_attempt(AttemptRef("t1", "s2", 3)):
        logging.getLogger("taskloom.test").info("hello")
    assert out.getvalue().rstrip().endswith("taskloom.test: [t1/s2#3] hello")
