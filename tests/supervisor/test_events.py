"""The event hub's one blocking XREAD against a Redis that freezes (a stalled
disk, a VM pause): its connection stays open and nothing answers. The read has
a socket timeout past its block, so the hub finds out, and goes on once Redis
answers again, instead of leaving every watcher waiting forever."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from taskloom.core.errors import StoreUnavailable
from taskloom.core.localredis import LocalRedis
from taskloom.supervisor.events import EventHub
from taskloom.supervisor.store import Store

HANG_GUARD = 90.0
"""Only so that a regression fails instead of hanging the suite."""


@pytest.fixture
async def frozen_redis(tmp_path: Path) -> AsyncIterator[LocalRedis]:
    redis = LocalRedis(tmp_path / "redis")
    redis.start()
    try:
        yield redis
    finally:
        assert redis.process is not None
        redis.process.send_signal(signal.SIGCONT)
        redis.stop()


async def test_a_blocking_read_on_a_frozen_redis_fails_instead_of_hanging(
    frozen_redis: LocalRedis,
) -> None:
    store = Store(frozen_redis.url, prefix="p:", socket_timeout=0.5)
    await store.connect()
    try:
        assert await store.read_streams({"p:s": "0"}, block_ms=50) == {}
        assert frozen_redis.process is not None
        frozen_redis.process.send_signal(signal.SIGSTOP)
        async with asyncio.timeout(HANG_GUARD):
            with pytest.raises(StoreUnavailable):
                await store.read_streams({"p:s": "0"}, block_ms=50)
        frozen_redis.process.send_signal(signal.SIGCONT)
        async with asyncio.timeout(HANG_GUARD):
            assert await store.read_streams({"p:s": "0"}, block_ms=50) == {}
    finally:
        await store.close()


async def test_a_long_block_on_a_healthy_redis_is_no_timeout(redis_server: LocalRedis) -> None:
    # The blocking connection's timeout is the store's plus a slack past the
    # longest block the hub asks for, so a quiet stream is not an error.
    store = Store(redis_server.url, prefix="p:", socket_timeout=0.5)
    await store.connect()
    try:
        assert await store.read_streams({"p:quiet": "0"}, block_ms=2_000) == {}
    finally:
        await store.close()


async def test_the_hub_wakes_its_watchers_after_redis_thaws(
    frozen_redis: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(frozen_redis.url, prefix="p:", socket_timeout=0.5)
    await store.connect()
    hub = EventHub(store, block_ms=100)
    hub.start()
    writer = aioredis.Redis.from_url(frozen_redis.url)
    try:
        waiting = asyncio.create_task(hub.wait("t1", "0", patience=10 * HANG_GUARD))
        while not hub.watched:
            await asyncio.sleep(0.01)
        assert frozen_redis.process is not None
        frozen_redis.process.send_signal(signal.SIGSTOP)
        async with asyncio.timeout(HANG_GUARD):
            while "event hub:" not in caplog.text:
                await asyncio.sleep(0.05)  # the read in flight failed: the hub knows
        frozen_redis.process.send_signal(signal.SIGCONT)
        await writer.xadd(store.keys.events("t1"), {"e": "1"})
        # Woken by the entry (its patience is far longer than the guard).
        async with asyncio.timeout(HANG_GUARD):
            await waiting
    finally:
        await writer.aclose()
        await hub.stop()
        await store.close()
