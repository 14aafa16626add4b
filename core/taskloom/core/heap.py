"""Keep Python's cyclic garbage collector out of the hot path.

A long-running process carries its start-up heap (modules, gRPC, protobuf,
pydantic, OpenTelemetry) for ever, and every full collection walks all of it:
pauses of the supervisor's and workers' event loops of tens of milliseconds
under load, which were the p99 of dispatch. ``settle`` (as Instagram does with
``gc.freeze``) moves what exists once the process is set up into a permanent
generation the collector never visits, and collects young objects less often.
Nothing is leaked: garbage is collected first, and later garbage as before.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Allocations between young collections (CPython's default: 700)."""


def settle() -> None:
    """Call once the process is set up, just before it starts serving."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
