"""What every system's benchmark shares: process groups, CPU accounting,
timing, and the tables.

Each system runs its servers and workers as child processes in their own
process groups; the load generator is this process. CPU is reported per
process group (and for the load generator), because everything shares the
same two cores: a system that is fast only by burning the load generator's
CPU should show it.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass
class Group:
    """A named set of processes whose CPU is counted together."""

    name: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    extra_pids: list[int] = field(default_factory=list)
    """Processes started by others (Ray's raylet, a Redis found by port)."""
    descendants: bool = True
    """Count the processes' children too. Not for the load generator: every
    system under test is its child, and would be counted twice."""

    def pids(self) -> list[int]:
        roots = [p.pid for p in self.processes if p.poll() is None] + self.extra_pids
        if not self.descendants:
            return roots
        out: list[int] = []
        for pid in roots:
            try:
                root = psutil.Process(pid)
                out += [pid, *(c.pid for c in root.children(recursive=True))]
            except psutil.NoSuchProcess:
                continue
        return out

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
                if self.descendants:
                    total += times.children_user + times.children_system
            except psutil.NoSuchProcess:
                continue
        return total

    def rss(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total


def spawn(args: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    """A child in its own process group (so it and its children stop together)."""
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            list(args),
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )
    finally:
        if log is not None and not isinstance(out, int):
            out.close()


def stop(processes: Iterable[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """SIGTERM each process group, then SIGKILL what is left."""
    processes = [p for p in processes if p.poll() is None]
    for p in processes:
        _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in processes:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p.pid, signal.SIGKILL)
            p.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


class Meter:
    """Wall time and CPU per group over one measured run."""

    def __init__(self, groups: Sequence[Group]) -> None:
        self.groups = [
            *groups,
            Group("load generator", extra_pids=[os.getpid()], descendants=False),
        ]

    def __enter__(self) -> Meter:
        self._cpu = {g.name: g.cpu() for g in self.groups}
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu = {g.name: g.cpu() - self._cpu[g.name] for g in self.groups}


@dataclass
class Result:
    """One scenario of one system, over the repeats."""

    system: str
    scenario: str
    unit: str
    values: list[float] = field(default_factory=list)
    cpu_per_1k: dict[str, list[float]] = field(default_factory=dict)
    """Group → CPU seconds per 1,000 tasks, per repeat."""
    note: str = ""

    def add(self, value: float, meter: Meter | None = None, tasks: int = 0) -> None:
        self.values.append(value)
        if meter is not None and tasks:
            for name, cpu in meter.cpu.items():
                self.cpu_per_1k.setdefault(name, []).append(cpu / tasks * 1000)

    def summary(self) -> dict[str, Any]:
        values = self.values or [float("nan")]
        return {
            "system": self.system,
            "scenario": self.scenario,
            "unit": self.unit,
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "runs": len(self.values),
            "cpu_s_per_1k_tasks": {k: statistics.median(v) for k, v in self.cpu_per_1k.items()},
            "note": self.note,
        }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table, scenarios grouped, systems side by side."""
    lines = [
        "| scenario | system | median | min | max | unit | CPU s / 1k tasks, per process group |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_s_per_1k_tasks"].items())
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(
            f"| {r['scenario']} | {r['system']} | {_fmt(r['median'])} | {_fmt(r['min'])} | "
            f"{_fmt(r['max'])} | {r['unit']}{note} | {cpu or '-'} |"
        )
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"
