"""taskloom, Celery and Ray side by side on this machine.

    python -m bench run [--systems taskloom,celery,ray] [--repeat 3] [--quick]

Starts its own Redis (AOF, appendfsync always unless --redis-fsync everysec)
on a free port; each system runs its servers and workers in their own
process groups and is stopped by PID at the end. The systems take turns, in
a rotated order each repeat, with a warm-up first. Every system runs the
same no-op (it returns the time it started). Writes
``bench/results/latest.json`` and ``latest.md`` (median, min, max over the
repeats, and CPU seconds per 1,000 tasks per process group). Celery and Ray
come from the ``bench`` extra: ``pip install -e '.[bench]'``; a system that
is not installed is skipped with a note.

Scenarios: no-op throughput (pre-filled: all N at once; streaming: chunks of
100 submitted concurrently), N = 2,000 and 10,000; dispatch latency (READY to
the no-op's start) idle and under open-loop load at 50 % and 80 % of the
system's sustained peak (what it gets through when offered 1.5x its
streaming peak open-loop: the streaming peak is a burst's, which the per-task
work of an open-loop run cannot keep up); DAG makespan (fan-out/fan-in 1 -> 998 -> 1; 10
layers x 100, each node depending on the whole previous layer; a chain of
100); the overhead on a 1 s task (its makespan beyond the time its body took,
which each body measures itself, in per cent of 1 s);
scaling with 1, 2, 4 worker processes; taskloom's memory per 10,000
live subtasks and throughput with 500 idle workers connected; reference
rows for grpc.aio and redis-py on the same machine, and the latency floor
under a durable dispatch (a Redis write, then one grpc.aio message; see
``bench/reference.py``). ``--quick`` runs each at
a tiny N (what CI runs, so the suite cannot rot).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import client_side, systems
from bench.harness import Meter, Result, markdown, percentile
from taskloom.core.localredis import LocalRedis

HERE = Path(__file__).resolve().parent
ALL = ("taskloom", "celery", "ray")
OVERLOAD = 1.5
"""The open-loop rate, over the streaming peak, whose throughput is the sustained peak."""


def make(name: str, redis: LocalRedis, logs: Path) -> systems.System:
    assert redis.process is not None
    if name == "taskloom":
        return systems.Taskloom(redis.url, redis.process.pid, logs)
    if name == "celery":
        return systems.Celery(redis.url, redis.process.pid, logs)
    return systems.Ray(logs)


def _noop(system: systems.System, n: int, streaming: bool) -> Callable[[], None]:
    return lambda: system.noop(n, streaming=streaming)


def installed(name: str) -> bool:
    return name == "taskloom" or importlib.util.find_spec(name) is not None


class Run:
    def __init__(self, args: argparse.Namespace, redis: LocalRedis, logs: Path) -> None:
        self.args = args
        self.redis = redis
        self.logs = logs
        self.results: dict[tuple[str, str], Result] = {}
        self.rates: dict[tuple[str, str], list[float]] = {}
        q = args.quick
        self.sizes = (200,) if q else (2_000, 10_000)
        self.dags: list[tuple[str, systems.Dag]] = [
            ("fan-out/fan-in 1 -> 998 -> 1", systems.fan(100 if q else 1000)),
            ("10 layers x 100, full deps", systems.layers(3 if q else 10, 10 if q else 100)),
            ("chain of 100", systems.chain_of(10 if q else 100)),
        ]  # fmt: skip
        self.latency_samples = 10 if q else 200
        self.scaling = (1, 2) if q else (1, 2, 4)

    def result(self, system: str, scenario: str, unit: str) -> Result:
        key = (system, scenario)
        if key not in self.results:
            self.results[key] = Result(system, scenario, unit)
        return self.results[key]

    def timed(self, system: systems.System, scenario: str, tasks: int,
              work: Callable[[], None]) -> float:  # fmt: skip
        with Meter(system.groups()) as meter:
            work()
        self.result(system.name, scenario, "tasks/s").add(tasks / meter.seconds, meter, tasks)
        return tasks / meter.seconds

    def one_system(self, name: str) -> None:
        system = make(name, self.redis, self.logs)
        system.start(self.args.workers)
        try:
            peak = 0.0
            for n in self.sizes:
                self.timed(system, f"no-op x{n:,}, pre-filled", n, _noop(system, n, False))
                peak = self.timed(system, f"no-op x{n:,}, streaming", n, _noop(system, n, True))
            for label, dag in self.dags:
                with Meter(system.groups()) as meter:
                    system.dag(dag)
                self.result(name, f"makespan: {label}", "s").add(meter.seconds, meter, len(dag))
            seconds = 0.2 if self.args.quick else 1.0
            for _ in range(1 if self.args.quick else 5):
                overhead = system.sleep(seconds) / seconds * 100
                self.result(name, f"overhead on a {seconds:g} s task", "%").add(overhead)
            idle = system.latencies(self.latency_samples, None)
            self.latency(name, "idle", idle)
            # The sustained peak: offered open-loop past what it can take,
            # the rate it gets through (the streaming peak is a burst's).
            offered = peak * OVERLOAD
            count = int(offered * (1 if self.args.quick else 3))
            with Meter(system.groups()) as meter:
                seconds = system.open_loop(count, offered)
            sustained = count / seconds
            self.result(name, "open-loop sustained peak", "tasks/s").add(sustained, meter, count)
            for share in (0.5, 0.8):
                rate = sustained * share
                count = max(self.latency_samples, int(rate * (1 if self.args.quick else 3)))
                samples = system.latencies(count, rate)
                self.latency(name, f"open-loop {share:.0%} of peak", samples, rate)
        finally:
            system.stop()

    def latency(self, name: str, label: str, samples: list[float], rate: float = 0.0) -> None:
        ms = [s * 1000 for s in samples]
        if rate:
            self.rates.setdefault((name, label), []).append(rate)
        for q, value in (("p50", statistics.median(ms)), ("p99", percentile(ms, 0.99))):
            result = self.result(name, f"dispatch latency {label}: {q}", "ms")
            result.add(value)
            if rate:
                loads = "/".join(f"{r:,.0f}" for r in self.rates[(name, label)])
                result.note = f"at {loads} tasks/s"

    def scale(self, name: str) -> None:
        n = self.sizes[-1]
        for workers in self.scaling:
            system = make(name, self.redis, self.logs)
            system.start(workers)
            try:
                label = f"scaling: no-op x{n:,}, {workers} worker processes"
                self.timed(system, label, n, _noop(system, n, False))
            finally:
                system.stop()

    def taskloom_only(self) -> None:
        """Memory per 10k live subtasks; one task per no-op, alone and in
        batches; and 500 idle workers connected."""
        n = 1_000 if self.args.quick else 10_000
        assert self.redis.process is not None
        system = systems.Taskloom(self.redis.url, self.redis.process.pid, self.logs)
        system.start(self.args.workers)
        try:
            memory = system.loop.run_until_complete(_memory_per_live(system, n))
            for label, value in memory.items():
                self.result("taskloom", f"memory per 10k live subtasks: {label}", "MB").add(value)
            # After the memory: the heap these tasks grow would hide the live subtasks' cost.
            single = 200 if self.args.quick else 3_000
            for batched, how in ((False, "submit + WatchTask each"),
                                 (True, "SubmitTasks + WaitTasks")):  # fmt: skip
                label = f"no-op x{single:,}, one task each, {how}"
                self.timed(
                    system, label, single, functools.partial(system.tasks, single, batched=batched)
                )
            idle = 50 if self.args.quick else 500
            # The same supervisor and workers throughout: only the idle
            # connections differ. Back-to-back runs here swing by ±15 %, so
            # each side is run several times, and the baseline both just before
            # connecting them and just after they are gone, so that a drift of
            # the VM's speed in between is not taken for their cost.
            runs = 1 if self.args.quick else 3
            baseline = f"no-op x{n:,}, no idle workers (the baseline, run before and after them)"
            for _ in range(runs):
                self.timed(system, baseline, n, _noop(system, n, False))
            before = _connected(system)
            connectors = [
                subprocess.Popen(
                    [sys.executable, "-m", "bench.idle_workers", system.address, str(idle // 5)],
                    start_new_session=True,
                )
                for _ in range(5)
            ]
            try:
                system.loop.run_until_complete(_until_workers(system, before + idle))
                label = f"no-op x{n:,} with {idle} idle workers connected"
                for _ in range(2 * runs):
                    self.timed(system, label, n, _noop(system, n, False))
            finally:
                for c in connectors:
                    c.terminate()
                for c in connectors:
                    c.wait()
            system.loop.run_until_complete(_until_workers(system, before, at_most=True))
            for _ in range(runs):
                self.timed(system, baseline, n, _noop(system, n, False))
        finally:
            system.stop()


async def _memory_per_live(system: systems.Taskloom, n: int) -> dict[str, float]:
    """Supervisor RSS and Redis memory for ``n`` READY subtasks nobody can run."""
    import psutil
    from redis.asyncio import Redis

    from taskloom.core.model import Plan, PlannedSubtask

    redis = Redis.from_url(system.redis_url)
    supervisor = psutil.Process(system.supervisor.pid)
    try:
        before_rss = supervisor.memory_info().rss
        before_redis = int((await redis.info("memory"))["used_memory"])
        plan = Plan(tuple(PlannedSubtask(f"s{i}", "", "x", "nobody") for i in range(n)), False)
        task_id = await system.client.submit("live", plan=plan, cache=False)
        await asyncio.sleep(1.0)
        rss = supervisor.memory_info().rss - before_rss
        used = int((await redis.info("memory"))["used_memory"]) - before_redis
        await system.client.cancel(task_id)
    finally:
        await redis.aclose()
    scale = 10_000 / n / 1e6
    return {"supervisor RSS": rss * scale, "Redis used_memory": used * scale}


async def _until_workers(system: systems.Taskloom, count: int, *, at_most: bool = False) -> None:
    """Until the supervisor has at least (or with ``at_most``, at most)
    ``count`` connections on its gRPC port."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        connected = _connected(system)
        if (connected <= count) if at_most else (connected >= count):
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{'more' if at_most else 'fewer'} than {count} connections")


def _connected(system: systems.Taskloom) -> int:
    """Established connections on the supervisor's gRPC port (one per worker)."""
    import psutil

    supervisor = psutil.Process(system.supervisor.pid)
    port = int(system.address.rpartition(":")[2])
    return sum(
        1
        for c in supervisor.net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the suite")
    run.add_argument("--systems", default=",".join(ALL))
    run.add_argument("--repeat", type=int, default=3)
    run.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    run.add_argument("--quick", action="store_true", help="tiny N: a smoke run")
    run.add_argument("--out", type=Path, default=HERE / "results")
    run.add_argument("--no-reference", action="store_true")
    run.add_argument(
        "--redis-fsync",
        choices=("always", "everysec"),
        default="always",
        help="the bench Redis's appendfsync (default always: nothing acknowledged is lost)",
    )
    client = sub.add_parser(
        "client", help="per-task speed from the client's side, systems interleaved by rounds"
    )
    client.add_argument("--systems", default=",".join(ALL))
    client.add_argument("--rounds", type=int, default=11)
    client.add_argument("--tasks", type=int, default=3_000, help="tasks per throughput figure")
    client.add_argument("--samples", type=int, default=200, help="tasks at rest per round")
    client.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    client.add_argument("--quick", action="store_true", help="tiny N: a smoke run")
    client.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(names) - set(ALL)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))} (known: {', '.join(ALL)})")
    skipped = [n for n in names if not installed(n)]
    names = [n for n in names if n not in skipped]
    for name in skipped:
        print(f"skipping {name}: not installed (pip install -e '.[bench]')", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "client":
        client_rounds(args, names, skipped)
        return
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalRedis(Path(tmp) / "redis", appendfsync=args.redis_fsync) as redis,
    ):
        logs = Path(tmp) / "logs"
        logs.mkdir()
        bench = Run(args, redis, logs)
        reference: dict[str, float] = {}
        if not args.no_reference:
            from bench.reference import measure

            print("reference rows ...", flush=True)
            reference = measure(redis.url, quick=args.quick)
        for repeat in range(args.repeat):
            order = names[repeat % len(names) :] + names[: repeat % len(names)] if names else []
            for name in order:
                print(f"repeat {repeat + 1}/{args.repeat}: {name} ...", flush=True)
                bench.one_system(name)
                bench.scale(name)
            if "taskloom" in names:
                bench.taskloom_only()
        rows = [r.summary() for r in sorted(bench.results.values(), key=_order)]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    commit = _commit()
    document: dict[str, Any] = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "commit": commit,
        "machine": machine,
        "redis_fsync": args.redis_fsync,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": rows,
        "reference": reference,
        "skipped": skipped,
    }
    (args.out / "latest.json").write_text(json.dumps(document, indent=2) + "\n")
    table = markdown(rows)
    ref = "\n".join(_reference_row(k, v) for k, v in reference.items())
    text = (
        f"Machine: {machine}; commit {commit}; {document['date']}; "
        f"Redis appendfsync {args.redis_fsync}.\n"
        f"Command: `{document['command']}`\n\n{table}\n"
        + (f"\nReference (same machine):\n\n| path | figure |\n|---|---:|\n{ref}\n" if ref else "")
    )
    (args.out / "latest.md").write_text(text)
    print(text)


def client_rounds(args: argparse.Namespace, names: list[str], skipped: list[str]) -> None:
    """``python -m bench client``: every system started once, then rounds of
    every scenario on each in turn (rotated), ratios per round."""
    n = 100 if args.quick else args.tasks
    samples = 10 if args.quick else args.samples
    rounds = client_side.Rounds()
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalRedis(Path(tmp) / "redis", appendfsync="always") as redis,
    ):
        logs = Path(tmp) / "logs"
        logs.mkdir()
        started: dict[str, Any] = {}
        try:
            for name in names:
                started[name] = make(name, redis, logs)
                started[name].start(args.workers)
            chain = systems.chain_of(10 if args.quick else 100)
            for i in range(1 if args.quick else args.rounds):
                order = names[i % len(names) :] + names[: i % len(names)]
                print(f"round {i + 1}: {', '.join(order)} ...", flush=True)
                client_side.run_round(rounds, started, order, n=n, samples=samples, chain=chain)
        finally:
            for system in started.values():
                system.stop()
    summary = rounds.summary(names)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    document = {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "commit": _commit(),
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "redis_fsync": "always",
        "skipped": skipped,
        **summary,
        "per_round": {f"{k[0]} / {k[1]}": v for k, v in rounds.figures.items()},
    }
    (args.out / "client.json").write_text(json.dumps(document, indent=2) + "\n")
    text = (
        f"Machine: {document['machine']}; commit {document['commit']}; {document['date']}; "
        "Redis appendfsync always (Ray in memory).\n"
        f"Command: `{document['command']}`. Median (min-max) over the rounds; the ratio is "
        "taken in each round.\n\n" + client_side.markdown(summary, names)
    )
    (args.out / "client.md").write_text(text)
    print(text)


def _reference_row(name: str, value: float) -> str:
    if name.endswith(" (ms)"):
        return f"| {name.removesuffix(' (ms)')} | {value:.2f} ms |"
    return f"| {name} | {value:,.0f} items/s |"


def _order(result: Result) -> tuple[str, str]:
    return (result.scenario, result.system)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=HERE, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
