"""Times leave the supervisor exact: seconds and nanoseconds that add back up to the float."""

from __future__ import annotations

import random

from taskloom.core.model import Event
from taskloom.supervisor.codec import event_to_pb


def test_event_times_split_into_seconds_and_nanos_that_add_back_up_exactly() -> None:
    rng = random.Random(7)
    times = [rng.uniform(1.7e9, 1.8e9) for _ in range(2_000)] + [1_700_000_000.9999999999]
    for t in times:
        stamp = event_to_pb(Event("1-0", t, "task.submitted", "t")).time
        assert 0 <= stamp.nanos < 1_000_000_000
        assert stamp.seconds + stamp.nanos / 1e9 == t
