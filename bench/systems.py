"""The systems under test, behind one interface, each running the same no-op.

    taskloom  supervisor + worker processes, Redis (AOF), explicit plans
    celery    Celery 5 workers (prefork) with Redis as broker and result backend
    ray       Ray on this machine (ray.init), tasks and object-ref dependencies

Every method blocks until the work has completed and returns what the
scenario needs; ``groups()`` names the process groups whose CPU is counted.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from bench.harness import Group, spawn, stop

Dag = list[tuple[str, tuple[str, ...]]]
"""Nodes in topological order: (id, ids it depends on)."""

TICK = 0.01
"""Under open-loop load, taskloom gets a task this often (seconds) carrying
the subtasks due meanwhile. Shorter ticks mean smaller bursts but more tasks
per second, each a SubmitTask call: at 20 ms the bursts set the latency
(p50 8.6 ms at 50 % of peak), at 5 ms the per-task cost starts to."""


class System(Protocol):
    name: str

    def start(self, workers: int) -> None: ...
    def stop(self) -> None: ...
    def groups(self) -> list[Group]: ...
    def noop(self, n: int, *, streaming: bool) -> None: ...
    def dag(self, dag: Dag) -> None: ...
    def sleep(self, seconds: float) -> float:
        """Run one task that sleeps ``seconds``; returns the orchestration's
        overhead: the makespan less the time the task's body says it took
        (so a sleep that oversleeps is not counted against the system)."""
        ...

    def latencies(self, count: int, rate: float | None) -> list[float]:
        """Dispatch latency of ``count`` single tasks: one at a time when
        ``rate`` is None (idle), else submitted open-loop at ``rate``/s."""
        ...

    def open_loop(self, count: int, rate: float) -> float:
        """Submit ``count`` no-ops open-loop at ``rate``/s as ``latencies``
        does; returns the seconds from the first submit to the last end.
        Offered past its capacity, ``count`` over that is the sustained peak."""
        ...


# -- taskloom -----------------------------------------------------------------------------


class Taskloom:
    name = "taskloom"

    def __init__(self, redis_url: str, redis_pid: int, logs: Path, concurrency: int = 256) -> None:
        from taskloom.core.localredis import free_port

        self.redis_url = redis_url
        self.redis_pid = redis_pid
        self.logs = logs
        self.concurrency = concurrency
        self.address = f"127.0.0.1:{free_port()}"
        self.prefix = f"bench{free_port()}:"
        self.supervisor: Any = None
        self.workers: list[Any] = []
        self.loop = asyncio.new_event_loop()
        self.client: Any = None

    def _env(self) -> dict[str, str]:
        return {
            "TASKLOOM_LOG_LEVEL": "WARNING",
            "TASKLOOM_CAPABILITIES": "noop,sleep,nobody",
            "TASKLOOM_REDIS_PREFIX": self.prefix,
            "TASKLOOM_CACHE": "false",
            "TASKLOOM_MAX_PLAN_SUBTASKS": "100000",
        }

    def start(self, workers: int) -> None:
        from taskloom.client import TaskloomClient
        from taskloom.client.local import wait_serving

        command = [sys.executable, "-m", "taskloom.client"]
        self.supervisor = spawn(
            [*command, "supervisor", "--listen", self.address, "--redis-url", self.redis_url],
            env=self._env(),
            log=self.logs / "taskloom-supervisor.log",
        )
        wait_serving(self.address, 60, self.supervisor)
        self.workers = [
            spawn(
                [
                    *command,
                    "worker",
                    "--supervisor",
                    self.address,
                    "--app",
                    "bench.handlers:registry",
                    "--capabilities",
                    "noop,sleep",
                    "--concurrency",
                    str(self.concurrency),
                    "--name",
                    f"bench-{i}",
                ],
                env=self._env(),
                log=self.logs / f"taskloom-worker-{i}.log",
            )
            for i in range(workers)
        ]
        self.client = self.loop.run_until_complete(self._client(TaskloomClient))
        self.loop.run_until_complete(self._connected(workers))

    async def _client(self, cls: Any) -> Any:
        return cls(self.address)

    async def _connected(self, workers: int) -> None:
        from taskloom.core.model import Plan, PlannedSubtask

        # Warm-up, and proof that every worker took work.
        plan = Plan(
            tuple(PlannedSubtask(f"w{i}", "", "x", "noop") for i in range(50 * workers)), False
        )
        await self._run_plan(plan)

    def stop(self) -> None:
        if self.client is not None:
            self.loop.run_until_complete(self.client.close())
        stop([*self.workers, self.supervisor])
        self.loop.close()

    def groups(self) -> list[Group]:
        return [
            Group("supervisor", [self.supervisor]),
            Group("workers", list(self.workers)),
            Group("redis", extra_pids=[self.redis_pid]),
        ]

    async def _run_plan(self, plan: Any) -> str:
        task_id = str(await self.client.submit("bench", plan=plan, cache=False))
        await self._succeeded(task_id)
        return task_id

    async def _succeeded(self, task_id: str) -> None:
        async for event in self.client.watch(task_id, terminal_only=True):
            assert event.type == "task.succeeded", event

    def noop(self, n: int, *, streaming: bool) -> None:
        from taskloom.core.model import Plan, PlannedSubtask

        if not streaming:
            plan = Plan(tuple(PlannedSubtask(f"s{i}", "", "x", "noop") for i in range(n)), False)
            self.loop.run_until_complete(self._run_plan(plan))
            return
        chunk = Plan(tuple(PlannedSubtask(f"s{i}", "", "x", "noop") for i in range(100)), False)

        async def run() -> None:
            await asyncio.gather(*(self._run_plan(chunk) for _ in range(n // 100)))

        self.loop.run_until_complete(run())

    def tasks(self, n: int, *, batched: bool) -> None:
        """``n`` tasks of one no-op each: a SubmitTask and a terminal-only watch
        per task, at most 100 in flight; or ``batched``, SubmitTasks calls of
        1,000 and one WaitTasks stream for them all."""
        from taskloom.core.model import Plan, PlannedSubtask

        plan = Plan((PlannedSubtask("s", "", "x", "noop"),), False)

        async def one_by_one() -> None:
            slots = asyncio.Semaphore(100)

            async def one() -> None:
                async with slots:
                    await self._run_plan(plan)

            await asyncio.gather(*(one() for _ in range(n)))

        async def together() -> None:
            results = await self.client.submit_many(["bench"] * n, plan=plan, cache=False)
            refused = [r.error for r in results if r.error is not None]
            if refused:
                raise RuntimeError(f"{len(refused)} tasks refused, the first: {refused[0]}")
            async for event in self.client.wait_many(r.task_id for r in results):
                if event.status != "SUCCEEDED":
                    raise RuntimeError(f"task {event.task_id} ended {event.status}")

        self.loop.run_until_complete(together() if batched else one_by_one())

    def dag(self, dag: Dag) -> None:
        from taskloom.core.model import Plan, PlannedSubtask

        plan = Plan(tuple(PlannedSubtask(i, "", "x", "noop", deps) for i, deps in dag), False)
        self.loop.run_until_complete(self._run_plan(plan))

    def sleep(self, seconds: float) -> float:
        from taskloom.core.model import Plan, PlannedSubtask

        plan = Plan((PlannedSubtask("sleep", "", repr(seconds), "sleep"),), False)
        start = time.perf_counter()
        task_id = self.loop.run_until_complete(self._run_plan(plan))
        makespan = time.perf_counter() - start
        task = self.loop.run_until_complete(self.client.get(task_id))
        return makespan - float(task.result)

    def latencies(self, count: int, rate: float | None) -> list[float]:
        """Idle: single-subtask tasks one after another. Under load: every TICK
        a task of rate * TICK subtasks, open-loop: submitted without waiting,
        all waited for at the end. (Ray and Celery submit one task at a time;
        a taskloom task per subtask would measure task overhead instead.)
        Latency is from the moment a subtask became READY (its ``ready_at``,
        written by the step that created it) to the no-op's start on the
        worker, both on this machine's clock."""
        from taskloom.core.model import Plan, PlannedSubtask

        per = 1 if rate is None else max(1, round(rate * TICK))
        plan = Plan(tuple(PlannedSubtask(f"s{i}", "", "x", "noop") for i in range(per)), False)

        async def run() -> list[str]:
            if rate is None:
                return [await self._run_plan(plan) for _ in range(count)]
            return (await self._open_loop(plan, count, rate))[0]

        async def measured(task_ids: list[str]) -> list[float]:
            # Through the SDK: a task compacted meanwhile reads the same.
            out = []
            for task_id in task_ids:
                task = await self.client.get(task_id)
                out += [float(s.output) - (s.ready_at or 0.0) for s in task.subtasks]
            return out

        task_ids = self.loop.run_until_complete(run())
        return self.loop.run_until_complete(measured(task_ids))

    def open_loop(self, count: int, rate: float) -> float:
        from taskloom.core.model import Plan, PlannedSubtask

        per = max(1, round(rate * TICK))
        plan = Plan(tuple(PlannedSubtask(f"s{i}", "", "x", "noop") for i in range(per)), False)
        return self.loop.run_until_complete(self._open_loop(plan, count, rate))[1]

    async def _open_loop(self, plan: Any, count: int, rate: float) -> tuple[list[str], float]:
        """Every TICK a task of the subtasks due meanwhile, not waiting; then
        all waited for. Returns their ids and the seconds it all took."""
        per = len(plan.subtasks)
        jobs = []
        start = time.perf_counter()
        for i in range(max(1, count // per)):
            await asyncio.sleep(max(0.0, start + i * per / rate - time.perf_counter()))
            jobs.append(asyncio.ensure_future(self.client.submit("bench", plan=plan, cache=False)))
        task_ids = [str(t) for t in await asyncio.gather(*jobs)]
        for task_id in task_ids:
            await self._succeeded(task_id)
        return task_ids, time.perf_counter() - start


# -- Celery --------------------------------------------------------------------------------


class Celery:
    name = "celery"

    def __init__(self, redis_url: str, redis_pid: int, logs: Path) -> None:
        self.broker = redis_url.rsplit("/", 1)[0] + "/2"
        self.backend = redis_url.rsplit("/", 1)[0] + "/3"
        self.redis_pid = redis_pid
        self.logs = logs
        self.workers: list[Any] = []
        self.app: Any = None

    def _env(self) -> dict[str, str]:
        return {"BENCH_CELERY_BROKER": self.broker, "BENCH_CELERY_BACKEND": self.backend}

    def start(self, workers: int) -> None:
        import os

        os.environ.update(self._env())
        from bench import celery_app

        self.app = celery_app.app
        self.app.conf.broker_url = self.broker
        self.app.conf.result_backend = self.backend
        self.workers = [
            spawn(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench.celery_app",
                    "worker",
                    "--concurrency",
                    str(workers),
                    "--pool",
                    "prefork",
                    "--loglevel",
                    "WARNING",
                    "--prefetch-multiplier",
                    "64",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                env=self._env(),
                log=self.logs / "celery-worker.log",
            )
        ]
        # Until the worker answers.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                celery_app.noop.delay().get(timeout=2)
                break
            except Exception:
                time.sleep(0.2)
        else:
            raise RuntimeError("the Celery worker did not start; see celery-worker.log")
        self.noop(200, streaming=False)

    def stop(self) -> None:
        stop(self.workers)

    def groups(self) -> list[Group]:
        return [Group("workers", list(self.workers)), Group("redis", extra_pids=[self.redis_pid])]

    def noop(self, n: int, *, streaming: bool) -> None:
        from celery import group

        from bench.celery_app import noop

        if not streaming:
            group(noop.s() for _ in range(n)).apply_async().get(timeout=600)
            return
        results = [group(noop.s() for _ in range(100)).apply_async() for _ in range(n // 100)]
        for result in results:
            result.get(timeout=600)

    def dag(self, dag: Dag) -> None:
        from celery import chain, chord, group

        from bench.celery_app import noop

        # Celery expresses graphs as chains of groups (a group after a task is
        # a fan-out; a task after a group a chord): enough for the shapes here.
        layers: list[list[str]] = []
        depth: dict[str, int] = {}
        for node, deps in dag:
            depth[node] = 1 + max((depth[d] for d in deps), default=-1)
            if depth[node] == len(layers):
                layers.append([])
            layers[depth[node]].append(node)
        steps: list[Any] = []
        for layer in layers:
            steps.append(noop.si() if len(layer) == 1 else group(noop.si() for _ in layer))
        if len(steps) == 1:
            workflow = steps[0]
        else:
            parts: list[Any] = []
            for step in steps:
                if parts and isinstance(parts[-1], group) and not isinstance(step, group):
                    parts[-1] = chord(parts[-1], step)
                else:
                    parts.append(step)
            workflow = chain(*parts)
        workflow.apply_async().get(timeout=600, disable_sync_subtasks=False)

    def sleep(self, seconds: float) -> float:
        from bench.celery_app import sleep

        start = time.perf_counter()
        body = float(sleep.delay(seconds).get(timeout=60))
        return time.perf_counter() - start - body

    def latencies(self, count: int, rate: float | None) -> list[float]:
        from bench.celery_app import noop

        out: list[float] = []
        if rate is None:
            for _ in range(count):
                sent = time.time()
                out.append(float(noop.delay().get(timeout=60)) - sent)
            return out
        pending = []
        start = time.perf_counter()
        for i in range(count):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            pending.append((time.time(), noop.delay()))
        return [float(r.get(timeout=60)) - sent for sent, r in pending]

    def open_loop(self, count: int, rate: float) -> float:
        start = time.perf_counter()
        self.latencies(count, rate)
        return time.perf_counter() - start


# -- Ray -------------------------------------------------------------------------------------


class Ray:
    name = "ray"

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.ray: Any = None
        self.remote: Any = None

    def start(self, workers: int) -> None:
        import logging
        import os

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        self.ray = ray

        # Not as decorators: without Ray's types (CI does not install Ray)
        # mypy would call the functions untyped.
        self.remote = ray.remote(_ray_noop)
        self.remote_sleep = ray.remote(_ray_sleep)
        ray.get([self.remote.remote() for _ in range(200)])

    def stop(self) -> None:
        if self.ray is not None:
            self.ray.shutdown()

    def groups(self) -> list[Group]:
        import os

        import psutil

        me = os.getpid()
        others = [c.pid for c in psutil.Process(me).children(recursive=True)]
        return [Group("ray processes", extra_pids=others)]

    def noop(self, n: int, *, streaming: bool) -> None:
        if not streaming:
            self.ray.get([self.remote.remote() for _ in range(n)])
            return
        refs = []
        for _ in range(n // 100):
            refs += [self.remote.remote() for _ in range(100)]
        self.ray.get(refs)

    def dag(self, dag: Dag) -> None:
        refs: dict[str, Any] = {}
        for node, deps in dag:
            refs[node] = self.remote.remote(*(refs[d] for d in deps))
        self.ray.get(refs[dag[-1][0]])

    def sleep(self, seconds: float) -> float:
        start = time.perf_counter()
        body = float(self.ray.get(self.remote_sleep.remote(seconds)))
        return time.perf_counter() - start - body

    def latencies(self, count: int, rate: float | None) -> list[float]:
        out = []
        if rate is None:
            for _ in range(count):
                sent = time.time()
                out.append(self.ray.get(self.remote.remote()) - sent)
            return out
        pending = []
        start = time.perf_counter()
        for i in range(count):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            pending.append((time.time(), self.remote.remote()))
        return [self.ray.get(ref) - sent for sent, ref in pending]

    def open_loop(self, count: int, rate: float) -> float:
        start = time.perf_counter()
        self.latencies(count, rate)
        return time.perf_counter() - start


def _ray_noop(*deps: object) -> float:
    return time.time()


def _ray_sleep(seconds: float) -> float:
    start = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - start


def fan(n: int = 1000) -> Dag:
    middle = [(f"m{i}", ("root",)) for i in range(n - 2)]
    return [("root", ()), *middle, ("sink", tuple(m for m, _ in middle))]


def layers(depth: int = 10, width: int = 100) -> Dag:
    out: Dag = []
    previous: tuple[str, ...] = ()
    for d in range(depth):
        current = tuple(f"l{d}n{i}" for i in range(width))
        out += [(node, previous) for node in current]
        previous = current
    return out


def chain_of(n: int = 100) -> Dag:
    return [(f"c{i}", (f"c{i - 1}",) if i else ()) for i in range(n)]


def ids(dag: Dag) -> Sequence[str]:
    return [node for node, _ in dag]
