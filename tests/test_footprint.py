"""What a finished task keeps in Redis: the keys naming it, with the Redis
settings taskloom runs Redis with (``localredis.COMPACT``), before and after
it is compacted (``Store.compact``), and that a compacted task reads, watches
and runs again as before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from taskloom.client import TaskloomClient
from taskloom.core.localredis import LocalRedis
from taskloom.core.model import AttemptRef, TaskStatus, Usage
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.supervisor.store import Store
from tests.conftest import Processes, stop_or_explain
from tests.helpers import eventually, plan, wait_status


@pytest.fixture
async def raw_redis(redis_server: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield raw
    await raw.aclose()


async def footprint(raw: aioredis.Redis, prefix: str, task_id: str) -> dict[str, int]:
    keys = [k async for k in raw.scan_iter(f"{prefix}task:{task_id}*")]
    return {k.removeprefix(prefix): await raw.memory_usage(k, samples=0) or 0 for k in keys}


def echo_steps(count: int) -> dict[str, Any]:
    """A plan of ``count`` independent echo steps, s0, s1, ..."""
    return plan(*((f"s{i}", "echo", f"part {i}") for i in range(count)))


MOST_BYTES = 4_500
"""A finished one-subtask task's keys, at most (8,855 with Redis's defaults:
its hash a hashtable, its event log's node preallocated at 4 KiB)."""


async def test_a_finished_small_task_keeps_little_of_redis(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    raw_redis: aioredis.Redis,
    prefix: str,
) -> None:
    processes.worker(supervisor.address, capabilities="echo")
    task_id = await client.submit("small", plan=plan(("a", "echo", "some output")))
    assert (await client.wait(task_id)).status == TaskStatus.SUCCEEDED
    sizes = await footprint(raw_redis, prefix, task_id)
    encoding = await raw_redis.object("encoding", f"{prefix}task:{task_id}")
    assert len(sizes) == 4, sizes  # the task, its events, its subtask, their list
    assert encoding == "listpack", encoding
    assert sum(sizes.values()) <= MOST_BYTES, sizes


MOST_BYTES_PER_SUBTASK = 200
"""A compacted task's keys, per subtask (about 800 before: a hash of ~540
bytes and ~300 of log)."""


async def test_a_compacted_task_keeps_a_fraction_and_reads_watches_and_waits_the_same(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    raw_redis: aioredis.Redis,
    prefix: str,
) -> None:
    processes.worker(supervisor.address, capabilities="echo")
    steps = echo_steps(100)
    task_id = await client.submit("many", plan=steps)
    before = await client.wait(task_id)
    assert before.status == TaskStatus.SUCCEEDED
    events = [e async for e in client.watch(task_id)]
    loose = await footprint(raw_redis, prefix, task_id)
    assert len(loose) == 103  # the task, its log, its list, 100 subtasks

    assert await supervisor.store.compact(task_id) > 0
    # Compacting it again changes nothing.
    assert await supervisor.store.compact(task_id) == 0
    packed = await footprint(raw_redis, prefix, task_id)
    assert sorted(packed) == [f"task:{task_id}", f"task:{task_id}:archive", f"task:{task_id}:subs"]
    assert sum(packed.values()) / 100 <= MOST_BYTES_PER_SUBTASK, packed
    assert sum(loose.values()) > 5 * sum(packed.values()), (loose, packed)
    ttl = await raw_redis.ttl(f"{prefix}task:{task_id}")
    assert ttl > 0 and await raw_redis.ttl(f"{prefix}task:{task_id}:archive") >= ttl - 1

    # The same task, whichever way it is read.
    assert await client.get(task_id) == before
    assert await client.wait(task_id) == before
    assert [e async for e in client.watch(task_id)] == events
    # A watch that resumes from a cursor gets what came after it.
    middle = events[len(events) // 2]
    resumed = [e async for e in client.watch(task_id, after_event_id=middle.id)]
    assert resumed == events[len(events) // 2 + 1 :]
    # A late report from a worker leaves no stray key behind.
    await supervisor.store.stopped([(AttemptRef(task_id, "s1", 1), Usage())], "w", "wid")
    assert sorted(await footprint(raw_redis, prefix, task_id)) == sorted(packed)


async def test_a_compacted_failed_task_is_retried_as_if_it_never_was(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    raw_redis: aioredis.Redis,
    prefix: str,
) -> None:
    processes.worker(supervisor.address)
    steps = plan(("a", "echo", "A"), ("p", "picky", "fail now", "a"), ("z", "echo", "Z", "p"))
    task_id = await client.submit("g", plan=steps)
    failed = await wait_status(client, task_id, TaskStatus.FAILED)
    logged = [e async for e in client.watch(task_id)]
    assert await supervisor.store.compact(task_id) > 0

    await client.retry(task_id, "p", instruction="all good", reason="fixed the input")
    done = await client.wait(task_id)
    assert done.status == TaskStatus.SUCCEEDED, done.error
    assert done.result == "Z"
    # What had succeeded kept its output; the retried step is on its second attempt.
    before, after = failed.subtasks, done.subtasks
    assert (after[0].output, after[0].attempt) == (before[0].output, before[0].attempt) == ("A", 1)
    assert (after[1].instruction, after[1].attempt) == ("all good", 2)
    # Its log is the one it had, then the retry's.
    events = [e async for e in client.watch(task_id)]
    assert events[: len(logged)] == logged
    assert ("task.reopened", "") in [(e.type, e.subtask_id) for e in events]
    # Ended again, it is compacted again.
    assert await supervisor.store.compact(task_id) > 0
    assert await client.get(task_id) == done


@pytest.fixture
def compacting(supervisor_settings: SupervisorSettings) -> SupervisorSettings:
    return supervisor_settings.model_copy(update={"compact_after": 0.0})


async def test_the_supervisor_compacts_what_ended_by_itself(
    compacting: SupervisorSettings,
    processes: Processes,
    raw_redis: aioredis.Redis,
    prefix: str,
) -> None:
    server = Supervisor(compacting)
    await server.start()
    try:
        processes.worker(server.address, capabilities="echo")
        async with TaskloomClient(server.address) as client:
            task_id = await client.submit("x", plan=plan(("a", "echo", "out")))
            done = await client.wait(task_id)

            async def compacted() -> bool:
                keys = await footprint(raw_redis, prefix, task_id)
                assert f"task:{task_id}:archive" in keys, keys
                return True

            await eventually(compacted)
            assert await client.get(task_id) == done
            assert await raw_redis.zcard(f"{prefix}compact") == 0
    finally:
        await stop_or_explain(server)


async def test_a_read_that_compaction_overtakes_reads_the_archive(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader finds the task not compacted, then its subtasks gone: the
    compaction landed between its two reads. It reads the archive instead of
    returning a task without subtasks (the supervisor's own loop can get
    there at any moment)."""
    processes.worker(supervisor.address, capabilities="echo")
    task_id = await client.submit("raced", plan=plan(("a", "echo", "A"), ("b", "echo", "B")))
    done = await client.wait(task_id)
    reads = Store._subtask_hashes
    overtaken: list[str] = []

    async def compacted_first(self: Store, task: str, ids: Any) -> AsyncIterator[Any]:
        if not overtaken:
            overtaken.append(task)
            await self.compact(task)
        async for rows in reads(self, task, ids):
            yield rows

    monkeypatch.setattr(Store, "_subtask_hashes", compacted_first)
    assert await client.get(task_id) == done
    assert overtaken == [task_id]


async def test_a_large_task_is_compacted_at_once_and_in_parts(
    supervisor: Supervisor,
    client: TaskloomClient,
    processes: Processes,
    raw_redis: aioredis.Redis,
    prefix: str,
) -> None:
    # More subtasks than the script that ends a task gives expiries to one by
    # one (EXPIRE_EACH in lib.lua), and than compact.lua deletes at a time.
    processes.worker(supervisor.address, capabilities="echo")
    steps = echo_steps(1_100)
    task_id = await client.submit("large", plan=steps)
    done = await client.wait(task_id)
    assert done.status == TaskStatus.SUCCEEDED
    # Its result joins more outputs than the script that ends it writes
    # (RESULT_JOIN_MAX): its readers join them, the same in every view.
    assert await raw_redis.hget(f"{prefix}task:{task_id}", "result") is None
    joined = "\n\n".join(f"## {s.title or s.id}\n\n{s.output}" for s in done.subtasks)
    assert done.result == joined and done.subtasks[-1].output in joined
    assert (await client.get(task_id, subtasks=False)).result == joined
    listed = [t for t in await client.list() if t.id == task_id]
    assert [t.result for t in listed] == [joined]
    # Due at once, whatever compact_after says (the supervisor's own loop
    # may get there first).
    due = await raw_redis.zscore(f"{prefix}compact", task_id)
    assert due is None or due == 0
    await supervisor.store.compact(task_id)
    keys = await footprint(raw_redis, prefix, task_id)
    assert sorted(keys) == [f"task:{task_id}", f"task:{task_id}:archive", f"task:{task_id}:subs"]
    assert await client.get(task_id) == done
    assert (await client.get(task_id, subtasks=False)).result == joined
