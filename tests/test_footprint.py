"""What a finished task keeps in Redis: the keys naming it, with the Redis
settings taskloom runs Redis with (``localredis.COMPACT``)."""

from __future__ import annotations

import redis.asyncio as aioredis

from taskloom.client import TaskloomClient
from taskloom.core.localredis import LocalRedis
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from tests.conftest import Processes
from tests.helpers import plan

MOST_BYTES = 4_500
"""A finished one-subtask task's keys, at most (8,855 with Redis's defaults:
its hash a hashtable, its event log's node preallocated at 4 KiB)."""


async def test_a_finished_small_task_keeps_little_of_redis(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    redis_server: LocalRedis,
    prefix: str,
) -> None:
    processes.worker(supervisor.address, capabilities="echo")
    task_id = await client.submit("small", plan=plan(("a", "echo", "some output")))
    assert (await client.wait(task_id)).status == TaskStatus.SUCCEEDED
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        keys = [k async for k in raw.scan_iter(f"{prefix}task:{task_id}*")]
        sizes = {k: await raw.memory_usage(k, samples=0) or 0 for k in keys}
        encoding = await raw.object("encoding", f"{prefix}task:{task_id}")
    finally:
        await raw.aclose()
    assert len(keys) == 4, keys  # the task, its events, its subtask, their list
    assert encoding == "listpack", encoding
    assert sum(sizes.values()) <= MOST_BYTES, sizes
