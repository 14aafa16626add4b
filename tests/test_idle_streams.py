"""A thousand idle streams held open on one supervisor process: health checks
and a normal task keep working, and the supervisor's memory stays bounded.

The figures (health-check latency percentiles, RSS before and after) are
printed; run with ``-s`` to see them, and TASKLOOM_IDLE_STREAMS=N for more.
Nothing here asserts a time: speed is for ``bench/``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from taskloom.client import TaskloomClient
from taskloom.core.model import TaskStatus
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import tasks_pb2_grpc
from tests.conftest import Processes
from tests.helpers import eventually, plan, wait_status

STREAMS = int(os.environ.get("TASKLOOM_IDLE_STREAMS", "1000"))
PER_CHANNEL = 100
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
"""gRPC shares one connection between channels to the same address; the
server allows 1,000 streams per connection, so each channel gets its own."""
RSS_GROWTH_LIMIT = 256 * 1024 * 1024
"""Far above what 1,000 streams cost (a few tens of MB); a leak per stream
or per message would cross it."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def redis_clients(url: str) -> int:
    client = Redis.from_url(url)
    try:
        return int((await client.info("clients"))["connected_clients"])
    finally:
        await client.aclose()


async def health_latencies(address: str, count: int) -> list[float]:
    async with grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        out = []
        for _ in range(count):
            started = time.perf_counter()
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
            out.append(time.perf_counter() - started)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return out


async def test_a_thousand_idle_streams_leave_health_checks_and_tasks_working(
    supervisor_settings: SupervisorSettings, processes: Processes, listen_address: str
) -> None:
    process = await processes.supervisor(supervisor_settings, listen=listen_address)
    rss = psutil.Process(process.pid).memory_info
    async with TaskloomClient(listen_address) as client:
        long = await client.submit("held open", plan=plan(("a", "gate", "wait")))
        before = await health_latencies(listen_address, 200)
        rss_before = rss().rss
        redis_clients_before = await redis_clients(supervisor_settings.redis_url)

        channels = [
            grpc.aio.insecure_channel(listen_address, options=OWN_CONNECTION)
            for _ in range(-(-STREAMS // PER_CHANNEL))
        ]
        opened = 0
        first_events: list[asyncio.Future[object]] = []
        calls = []
        for n in range(STREAMS):
            stub = tasks_pb2_grpc.TaskServiceStub(channels[n // PER_CHANNEL])
            call = stub.WatchTask(pb.WatchTaskRequest(task_id=long))
            calls.append(call)
            first_events.append(asyncio.ensure_future(call.read()))
        try:
            # Every stream is open once it has delivered the task's first event.
            for future in first_events:
                await future
                opened += 1
            assert opened == STREAMS
            during = await health_latencies(listen_address, 200)
            rss_during = rss().rss
            # Watchers share the event hub's one blocking read, not a connection
            # each: at most the supervisor's pool (which bursts may fill) is open.
            pool = supervisor_settings.redis_max_connections
            redis_clients_during = await redis_clients(supervisor_settings.redis_url)
            assert redis_clients_during <= redis_clients_before + pool + 2

            processes.worker(listen_address, capabilities="echo", concurrency=1)
            task_id = await client.submit("a normal task", plan=plan(("a", "echo", "done")))
            task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
            assert task.status == TaskStatus.SUCCEEDED
            dropped = [c for c in calls if c.done()]
            assert not dropped, f"{len(dropped)} streams dropped: {await dropped[0].details()}"
        finally:
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close()
        await client.cancel(long)
        await eventually(lambda: rss().rss > 0)

    growth = rss_during - rss_before
    print(
        f"\n{STREAMS} idle WatchTask streams on one supervisor:"
        f"\n  health check p50/p99 before: {statistics.median(before) * 1e3:.2f}"
        f"/{percentile(before, 0.99) * 1e3:.2f} ms"
        f"\n  health check p50/p99 during: {statistics.median(during) * 1e3:.2f}"
        f"/{percentile(during, 0.99) * 1e3:.2f} ms"
        f"\n  supervisor RSS: {rss_before / 2**20:.1f} MiB before, {rss_during / 2**20:.1f} MiB"
        f" with the streams (+{growth / 2**20:.1f} MiB, {growth / STREAMS / 1024:.1f} KiB each)"
        f"\n  Redis connections: {redis_clients_before} before, {redis_clients_during} during"
    )
    assert growth < RSS_GROWTH_LIMIT
