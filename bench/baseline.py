"""Baseline figures for taskloom alone: no-op throughput and a fan-out/fan-in makespan.

    python -m bench.baseline [--subtasks 2000] [--workers 2] [--concurrency 64]

Starts its own Redis (AOF, appendfsync always) on a free port, a supervisor in this
process and worker processes running the built-in ``echo`` handler, then
submits explicit plans and times them from submit to the task's end. The
side-by-side comparison with other systems is a separate, larger suite.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from taskloom.client import TaskloomClient
from taskloom.core.localredis import LocalRedis, free_port
from taskloom.core.model import Plan, PlannedSubtask, TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings


def independent(n: int) -> Plan:
    return Plan(tuple(PlannedSubtask(f"s{i}", "", "x", "echo") for i in range(n)), False)


def fan(n: int) -> Plan:
    middle = tuple(PlannedSubtask(f"m{i}", "", "x", "echo", ("root",)) for i in range(n - 2))
    root = PlannedSubtask("root", "", "x", "echo")
    sink = PlannedSubtask("sink", "", "x", "echo", tuple(s.id for s in middle))
    return Plan((root, *middle, sink), False)


async def timed(client: TaskloomClient, name: str, plan: Plan) -> float:
    start = time.perf_counter()
    task_id = await client.submit(name, plan=plan)
    task = await client.wait(task_id)
    elapsed = time.perf_counter() - start
    assert task.status == TaskStatus.SUCCEEDED, task.error
    return elapsed


async def measure(args: argparse.Namespace, redis_url: str, address: str) -> None:
    settings = SupervisorSettings.load(
        listen=address, redis_url=redis_url, capabilities="echo", log_level="WARNING"
    )
    async with Supervisor(settings) as supervisor:
        while len(supervisor.scheduler.sessions()) < args.workers:
            await asyncio.sleep(0.05)
        async with TaskloomClient(supervisor.address) as client:
            await timed(client, "warm-up", independent(200))
            for _ in range(args.repeat):
                n = args.subtasks
                took = await timed(client, "no-op", independent(n))
                print(f"no-op x{n}: {took:.2f}s = {n / took:,.0f} subtasks/s", flush=True)
                took = await timed(client, "fan", fan(1000))
                print(f"fan-out/fan-in 1 -> 998 -> 1: {took:.2f}s", flush=True)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    address = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp) / "redis") as redis:
        # Workers retry until the supervisor is up.
        command = [sys.executable, "-m", "taskloom.client", "worker", "--supervisor", address]
        command += ["--capabilities", "echo", "--concurrency", str(args.concurrency)]
        workers = [
            subprocess.Popen([*command, "--log-level", "warning"]) for _ in range(args.workers)
        ]
        try:
            asyncio.run(measure(args, redis.url, address))
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subtasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    main(parser.parse_args())
