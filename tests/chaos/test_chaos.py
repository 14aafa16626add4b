"""The fault-injection suite: each scenario runs a 200-subtask graph through a
cluster of real processes while faults fire, then checks the invariants on
the recorded history (see ``checker``). ``make chaos N=100`` runs N random
fault schedules; here a small N runs (``TASKLOOM_CHAOS_N``, default 2)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from taskloom.core.model import TaskStatus
from tests.chaos.harness import SCENARIOS, netns_unavailable, random_schedule, run
from tests.sentinel import MISSING, sentinel_binaries

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario_keeps_every_invariant(name: str, tmp_path: Path) -> None:
    faults = SCENARIOS[name]
    if any(kind == "partition" for _, kind in faults):
        reason = netns_unavailable()
        if reason:
            print(f"skipping {name}: {reason}")
            pytest.skip(reason)
    if any(kind == "kill_primary" for _, kind in faults) and sentinel_binaries() is None:
        pytest.skip(MISSING)
    result = await run(name, tmp_path / name, faults, seed=len(name))
    print(result.line())

    assert result.verdict.ok, f"{result.line()}\n{result.verdict.violations}\nhistory: {tmp_path}"
    assert result.task.status == TaskStatus.SUCCEEDED
    assert result.verdict.stats["subtasks"] >= 200
    # Users submitted, approved and cancelled while the faults fired.
    assert result.verdict.stats["user_tasks"] > 0, result.line()
    if name in ("worker_sigkill", "worker_partitioned"):
        # The faults hit running work, which ran again.
        assert result.verdict.stats["retries"] > 0, result.line()
    if name == "worker_link_latency":
        # The slow worker (the last one started) kept its leases and did its share.
        assert result.verdict.stats["retries"] == 0, result.line()
        assert result.verdict.stats["runs_on_w4"] > 0, result.line()
    if name == "worker_partitioned":
        # The cut-off worker finished attempts that had moved on: late results,
        # which (I2 above) changed nothing.
        assert result.verdict.stats["stale_results"] > 0, result.line()


async def test_random_fault_schedules_keep_every_invariant(tmp_path: Path) -> None:
    runs = int(os.environ.get("TASKLOOM_CHAOS_N", "2"))
    seed = int(os.environ.get("TASKLOOM_CHAOS_SEED", "1"))
    rng = random.Random(seed)
    netns = netns_unavailable() is None
    sentinel = sentinel_binaries() is not None
    failed = []
    for i in range(runs):
        schedule = random_schedule(rng, netns=netns, sentinel=sentinel)
        result = await run(f"random-{seed}-{i}", tmp_path / f"run{i}", schedule, seed=seed + i)
        print(result.line())
        if not result.verdict.ok:
            failed.append(f"{result.line()}\n{result.verdict.violations}")
    assert not failed, "\n".join(failed)
