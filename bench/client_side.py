"""Per-task speed as the client sees it: from the first submit call to the
results in the client's hands, the systems interleaved round by round.

    python -m bench client [--systems taskloom,celery,ray] [--rounds 11] [--quick]

Every system is started once and stays up; each round runs every scenario on
every system in turn (the order rotates each round), records the load average
before the round, and the ratio taskloom / Ray of each scenario *in that
round*. The summary gives each figure's and each ratio's median and range.

Scenarios, each a task of one no-op per unit of work, results in hand:
  plain     N tasks by ``submit`` + ``wait`` from 64 coroutines (Celery:
            ``delay().get()`` from 64 threads; Ray: ``await f.remote()``)
  batched   N tasks by ``submit_many`` + ``finished`` (Ray: N ``.remote()``
            then one ``ray.get``; Celery: a group)
  at rest   one task at a time, submit -> result, p50 and p99
  chain     a chain of 100 no-ops, each depending on the last, makespan
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import systems
from bench.harness import percentile

COROUTINES = 64


def taskloom_plain(system: systems.Taskloom, n: int) -> None:
    from taskloom.core.model import Plan, PlannedSubtask

    plan = Plan((PlannedSubtask("s", "", "x", "noop"),), False)
    client = system.client
    todo = iter(range(n))

    async def runner() -> None:
        for _ in todo:
            task = await client.wait(await client.submit("bench", plan=plan, cache=False))
            if not task.result:
                raise RuntimeError(f"task {task.id} ended {task.status} with no result")

    async def run() -> None:
        await asyncio.gather(*(runner() for _ in range(COROUTINES)))

    system.loop.run_until_complete(run())


def taskloom_batched(system: systems.Taskloom, n: int) -> None:
    from taskloom.core.model import Plan, PlannedSubtask

    plan = Plan((PlannedSubtask("s", "", "x", "noop"),), False)
    client = system.client

    async def run() -> None:
        submitted = await client.submit_many(["bench"] * n, plan=plan, cache=False)
        refused = [s.error for s in submitted if s.error is not None]
        if refused:
            raise RuntimeError(f"{len(refused)} tasks refused, the first: {refused[0]}")
        count = 0
        async for task in client.finished(s.task_id for s in submitted):
            if not task.result:
                raise RuntimeError(f"task {task.id} ended {task.status} with no result")
            count += 1
        assert count == n

    system.loop.run_until_complete(run())


def taskloom_at_rest(system: systems.Taskloom, count: int) -> list[float]:
    from taskloom.core.model import Plan, PlannedSubtask

    plan = Plan((PlannedSubtask("s", "", "x", "noop"),), False)
    client = system.client

    async def run() -> list[float]:
        out = []
        for _ in range(count):
            start = time.perf_counter()
            task = await client.wait(await client.submit("bench", plan=plan, cache=False))
            out.append(time.perf_counter() - start)
            assert task.result
        return out

    return system.loop.run_until_complete(run())


def ray_plain(system: systems.Ray, n: int) -> None:
    remote = system.remote
    todo = iter(range(n))

    async def runner() -> None:
        for _ in todo:
            if not await remote.remote():
                raise RuntimeError("no result")

    async def run() -> None:
        await asyncio.gather(*(runner() for _ in range(COROUTINES)))

    asyncio.run(run())


def ray_batched(system: systems.Ray, n: int) -> None:
    results = system.ray.get([system.remote.remote() for _ in range(n)])
    assert len(results) == n
    assert all(results)


def ray_at_rest(system: systems.Ray, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        assert system.ray.get(system.remote.remote())
        out.append(time.perf_counter() - start)
    return out


def celery_plain(system: systems.Celery, n: int) -> None:
    from bench.celery_app import noop

    lock = threading.Lock()
    left = [n]

    def runner() -> None:
        while True:
            with lock:
                if not left[0]:
                    return
                left[0] -= 1
            if not noop.delay().get(timeout=60):
                raise RuntimeError("no result")

    with ThreadPoolExecutor(COROUTINES) as pool:
        for future in [pool.submit(runner) for _ in range(COROUTINES)]:
            future.result()


def celery_batched(system: systems.Celery, n: int) -> None:
    from celery import group

    from bench.celery_app import noop

    results = group(noop.s() for _ in range(n)).apply_async().get(timeout=600)
    assert len(results) == n
    assert all(results)


def celery_at_rest(system: systems.Celery, count: int) -> list[float]:
    from bench.celery_app import noop

    out = []
    for _ in range(count):
        start = time.perf_counter()
        assert noop.delay().get(timeout=60)
        out.append(time.perf_counter() - start)
    return out


PLAIN: dict[str, Callable[[Any, int], None]] = {
    "taskloom": taskloom_plain, "ray": ray_plain, "celery": celery_plain,
}  # fmt: skip
BATCHED: dict[str, Callable[[Any, int], None]] = {
    "taskloom": taskloom_batched, "ray": ray_batched, "celery": celery_batched,
}  # fmt: skip
AT_REST: dict[str, Callable[[Any, int], list[float]]] = {
    "taskloom": taskloom_at_rest, "ray": ray_at_rest, "celery": celery_at_rest,
}  # fmt: skip


class Rounds:
    """Figures per (scenario, system), one per round, and the load average
    before each round."""

    def __init__(self) -> None:
        self.figures: dict[tuple[str, str], list[float]] = {}
        self.units: dict[str, str] = {}
        self.loads: list[float] = []

    def add(self, scenario: str, unit: str, system: str, value: float) -> None:
        self.units[scenario] = unit
        self.figures.setdefault((scenario, system), []).append(value)

    def ratios(self, scenario: str, a: str, b: str) -> list[float]:
        """a's figure over b's, round by round."""
        xs, ys = self.figures.get((scenario, a), []), self.figures.get((scenario, b), [])
        return [x / y for x, y in zip(xs, ys, strict=False) if y]

    def summary(self, names: list[str]) -> dict[str, Any]:
        rows = []
        for scenario, unit in self.units.items():
            row: dict[str, Any] = {"scenario": scenario, "unit": unit}
            for name in names:
                values = self.figures.get((scenario, name))
                if values:
                    row[name] = _spread(values)
            if "taskloom" in names and "ray" in names:
                ratios = self.ratios(scenario, "taskloom", "ray")
                if ratios:
                    row["taskloom/ray"] = _spread(ratios)
            rows.append(row)
        return {"rows": rows, "load_average_before_rounds": self.loads}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


def run_round(
    rounds: Rounds, started: dict[str, Any], order: list[str], *, n: int, samples: int,
    chain: systems.Dag,
) -> None:  # fmt: skip
    rounds.loads.append(os.getloadavg()[0])
    for name in order:
        system = started[name]
        start = time.perf_counter()
        PLAIN[name](system, n)
        rounds.add(f"{n:,} tasks, submit + wait, {COROUTINES} coroutines", "tasks/s", name,
                   n / (time.perf_counter() - start))  # fmt: skip
        start = time.perf_counter()
        BATCHED[name](system, n)
        rounds.add(f"{n:,} tasks, submit_many + results", "tasks/s", name,
                   n / (time.perf_counter() - start))  # fmt: skip
        ms = [s * 1000 for s in AT_REST[name](system, samples)]
        rounds.add("one task at rest, submit -> result, p50", "ms", name, statistics.median(ms))
        rounds.add("one task at rest, submit -> result, p99", "ms", name, percentile(ms, 0.99))
        start = time.perf_counter()
        system.dag(chain)
        rounds.add(f"chain of {len(chain)}, makespan", "s", name, time.perf_counter() - start)


def markdown(summary: dict[str, Any], names: list[str]) -> str:
    head = ["scenario", *names] + (["taskloom / ray"] if "taskloom/ray" in str(summary) else [])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in summary["rows"]:
        cells = [f"{row['scenario']} ({row['unit']})"]
        for key in [*names, "taskloom/ray"][: len(head) - 1]:
            s = row.get(key)
            cells.append(
                "" if s is None else f"{_fmt(s['median'])} ({_fmt(s['min'])}-{_fmt(s['max'])})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    loads = ", ".join(f"{x:.2f}" for x in summary["load_average_before_rounds"])
    return "\n".join(lines) + f"\n\nLoad average (1 min) before each round: {loads}\n"


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
