"""heap.settle: the start-up heap leaves the collector's sight; garbage does not."""

from __future__ import annotations

import gc
import weakref

from taskloom.core import heap


def test_settle_freezes_what_exists_and_collects_young_objects_less_often() -> None:
    thresholds = gc.get_threshold()

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    garbage = weakref.ref(Cycle())  # only a collection frees a cycle
    try:
        heap.settle()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] > thresholds[0]  # young collections are rarer
        assert garbage() is None  # collected, not frozen for ever
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
