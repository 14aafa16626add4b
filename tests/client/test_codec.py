"""Times cross the wire exactly: the client decodes what the supervisor sent to the same float."""

from __future__ import annotations

import random

from taskloom.client.codec import event_from_pb, task_from_pb
from taskloom.core.model import Event, Task, TaskOptions, TaskStatus
from taskloom.supervisor.codec import event_to_pb, task_to_pb


def _times() -> list[float]:
    rng = random.Random(11)
    return [rng.uniform(1.7e9, 1.8e9) for _ in range(2_000)] + [1_700_000_000.9999999999]


def test_event_times_reach_the_client_as_the_supervisor_had_them() -> None:
    for t in _times():
        assert event_from_pb(event_to_pb(Event("1-0", t, "task.submitted", "t"))).time == t


def test_task_times_reach_the_client_as_the_supervisor_had_them() -> None:
    for t in _times()[:200]:
        task = Task(
            id="t",
            goal="g",
            status=TaskStatus.SUCCEEDED,
            options=TaskOptions(),
            created_at=t,
            updated_at=t + 0.5,
            finished_at=t + 1.25,
        )
        back = task_from_pb(task_to_pb(task))
        assert (back.created_at, back.updated_at, back.finished_at) == (t, t + 0.5, t + 1.25)
