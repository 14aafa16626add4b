"""The auto-pipelined script connection, against a real Redis server."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

from taskloom.core.errors import StoreUnavailable
from taskloom.core.localredis import LocalRedis
from taskloom.core.model import Plan, PlannedSubtask, TaskOptions
from taskloom.supervisor.scriptline import Endpoint, ScriptLine, pack
from taskloom.supervisor.store import Store
from tests.helpers import eventually

ECHO = "return {ARGV[1], redis.call('INCR', KEYS[1] or 'line:calls')}"
FENCED = "return redis.error_reply('TASKLOOM_FENCED the lease is held by ' .. ARGV[1])"


def sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


@pytest.fixture
async def line(redis_server: LocalRedis) -> AsyncIterator[ScriptLine]:
    line = ScriptLine(Endpoint.from_url(redis_server.url), timeout=2.0)
    yield line
    await line.close()


@pytest.fixture
async def raw(redis_server: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield r
    await r.aclose()


def test_commands_are_packed_as_resp_arrays_of_bulk_strings() -> None:
    assert pack(["EVALSHA", "ab", 0, "é"]) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n$2\r\n\xc3\xa9\r\n"
    )


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    line: ScriptLine, raw: aioredis.Redis
) -> None:
    await line.eval(ECHO, sha(ECHO), ["connect"])
    await raw.delete("line:calls")
    replies = await asyncio.gather(*(line.eval(ECHO, sha(ECHO), [f"call {i}"]) for i in range(500)))
    assert [r[0] for r in replies] == [f"call {i}" for i in range(500)]
    # Redis ran them in the order they were made, one after another.
    assert [r[1] for r in replies] == list(range(1, 501))
    clients = await raw.client_list()
    assert sum(1 for c in clients if c["cmd"] in ("evalsha", "eval")) == 1


async def test_calls_larger_than_the_socket_buffer_wait_for_it_to_drain(line: ScriptLine) -> None:
    length = "return string.len(ARGV[1])"
    big = ["x" * (4 << 20), "y" * (3 << 20), "z" * 10]
    replies = await asyncio.gather(*(line.eval(length, sha(length), [arg]) for arg in big))
    assert replies == [4 << 20, 3 << 20, 10]


async def test_error_replies_become_redis_py_exceptions_and_the_line_stays_usable(
    line: ScriptLine,
) -> None:
    with pytest.raises(rexc.ResponseError, match=r"^TASKLOOM_FENCED the lease is held by w2"):
        await line.eval(FENCED, sha(FENCED), ["w2"])
    assert (await line.eval(ECHO, sha(ECHO), ["after"]))[0] == "after"


async def test_a_script_redis_forgot_is_sent_again_in_full(
    line: ScriptLine, raw: aioredis.Redis
) -> None:
    assert (await line.eval(ECHO, sha(ECHO), ["first"]))[0] == "first"
    await raw.script_flush()
    assert (await line.eval(ECHO, sha(ECHO), ["again"]))[0] == "again"
    assert await raw.script_exists(sha(ECHO)) == [True]


async def test_a_cancelled_call_leaves_the_replies_of_the_others_in_step(
    line: ScriptLine,
) -> None:
    calls = [asyncio.ensure_future(line.eval(ECHO, sha(ECHO), [str(i)])) for i in range(50)]
    await asyncio.sleep(0)  # every call has written its command
    calls[10].cancel()
    calls[30].cancel()
    for i, call in enumerate(calls):
        if i in (10, 30):
            with pytest.raises(asyncio.CancelledError):
                await call
        else:
            assert (await call)[0] == str(i)


async def test_a_connection_redis_closed_while_idle_is_replaced_before_the_next_call(
    line: ScriptLine, raw: aioredis.Redis
) -> None:
    await line.eval(ECHO, sha(ECHO), ["before"])
    (ours,) = [c for c in await raw.client_list() if c["cmd"] in ("evalsha", "eval")]
    await raw.client_kill_filter(_id=ours["id"])
    # The line notices on its own, with no call waiting...
    await eventually(lambda: not line.connected)
    # ...so the next call opens a new connection and nothing fails.
    assert (await line.eval(ECHO, sha(ECHO), ["after"]))[0] == "after"


async def test_calls_waiting_on_a_redis_that_stopped_answering_time_out_then_it_recovers(
    redis_server: LocalRedis, raw: aioredis.Redis
) -> None:
    line = ScriptLine(Endpoint.from_url(redis_server.url), timeout=0.3)
    try:
        await line.eval(ECHO, sha(ECHO), ["warm"])
        await raw.client_pause(1500, all=False)  # write commands wait; scripts write
        waiting = [line.eval(ECHO, sha(ECHO), [str(i)]) for i in range(3)]
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, rexc.TimeoutError) for r in results), results
        await raw.client_unpause()
        assert (await line.eval(ECHO, sha(ECHO), ["later"]))[0] == "later"
    finally:
        await raw.client_unpause()
        await line.close()


async def test_store_scripts_survive_a_redis_restart(tmp_path: Path) -> None:
    redis = LocalRedis(tmp_path / "redis")
    redis.start()
    store = Store(redis.url, prefix="p:", socket_timeout=2.0)
    await store.connect()
    plan = Plan((PlannedSubtask("a", "A", "x", "echo"),))
    options = TaskOptions()
    first, _, _ = await store.create_task(goal="g", options=options, plan=plan, result_from=["a"])
    redis.kill()
    with pytest.raises(StoreUnavailable, match=rf"Redis at {redis.url} is unavailable"):
        await store.create_task(goal="g", options=options, plan=plan, result_from=["a"])
    # Back on the same port and data (AOF), with an empty script cache: the
    # next script call opens a new connection and loads its script again.
    with LocalRedis(tmp_path / "redis", port=redis.port):
        second, created, outcome = await store.create_task(
            goal="g2", options=options, plan=plan, result_from=["a"]
        )
        assert created and [r.subtask_id for r in outcome.ready] == ["a"]
        await store.close()
        check = aioredis.Redis.from_url(redis.url, decode_responses=True)
        assert await check.hget(f"p:task:{first}", "goal") == "g"
        assert await check.hget(f"p:task:{second}", "goal") == "g2"
        await check.aclose()


async def test_reads_on_connections_from_before_a_redis_restart_do_not_fail(
    tmp_path: Path,
) -> None:
    redis = LocalRedis(tmp_path / "redis")
    redis.start()
    store = Store(redis.url, prefix="p:", socket_timeout=2.0)
    await store.connect()
    plan = Plan((PlannedSubtask("a", "A", "x", "echo"),))
    task_id, _, _ = await store.create_task(
        goal="g", options=TaskOptions(), plan=plan, result_from=["a"]
    )
    # Several pooled connections, all of which the restart closes.
    await asyncio.gather(*(store.get_task(task_id) for _ in range(4)))
    redis.kill()
    with LocalRedis(tmp_path / "redis", port=redis.port):
        for _ in range(6):
            assert (await store.get_task(task_id)).goal == "g"
            assert await store.read_events(task_id, "0")
        await store.close()
