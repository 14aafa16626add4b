"""An assignment crosses the wire whole: the supervisor's encoder against the worker's decoder."""

from __future__ import annotations

import pytest

from taskloom.core.model import Assignment, ContextMode, Input
from taskloom.supervisor.codec import outgoing_to_pb
from taskloom.supervisor.scheduler import AssignBatch
from taskloom.worker.codec import assignments_from_pb

FULL = Assignment(
    task_id="019a2b3c4d5e6f708192",
    subtask_id="summarise",
    attempt=3,
    capability="llm",
    title="Summarise",
    instruction="Summarise the findings",
    goal="Write a report",
    inputs=(Input("search", "Search", "found 3 papers"), Input("read", "Read", "é ✓")),
    params={"temperature": "0.2", "model": "smollm2"},
    deadline=1_790_000_000.25,
    trace_context={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    timeout=90.5,
    context_tokens=4000,
    context=ContextMode.SUMMARIZE,
)
BARE = Assignment(
    task_id="019a2b3c4d5e6f708193",
    subtask_id="s0",
    attempt=1,
    capability="noop",
    title="",
    instruction="",
    goal="",
)


@pytest.mark.parametrize("assignment", [FULL, BARE], ids=["every-field", "defaults"])
def test_an_assignment_decodes_to_what_was_encoded(assignment: Assignment) -> None:
    frame = outgoing_to_pb(AssignBatch((assignment, assignment)))
    wire = type(frame).FromString(frame.SerializeToString())
    assert assignments_from_pb(wire.assign) == [assignment, assignment]
