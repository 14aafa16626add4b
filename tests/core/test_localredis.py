"""The Redis that ``taskloom up`` and the tests run, killed as a crash would."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from taskloom.core.localredis import LocalRedis


def test_no_acknowledged_write_is_lost_when_redis_is_killed(tmp_path: Path) -> None:
    # The window appendfsync everysec leaves open: the first write in a new
    # second starts Redis's background fsync, and a write that comes while it
    # runs is held in Redis's memory (for up to 2 s), yet acknowledged. A
    # SIGKILL then loses it. With everysec the second write was lost in every
    # run here; the default (always) writes and fsyncs before it replies.
    server = LocalRedis(tmp_path / "redis")
    server.start()
    client = redis.Redis.from_url(server.url)
    started = client.time()[0]
    while client.time()[0] <= started:  # Redis's clock, polled: the next second
        time.sleep(0.01)
    client.set("first", 1)
    client.set("second", 2)
    client.close()
    server.kill()
    with LocalRedis(tmp_path / "redis", port=server.port) as again:
        client = redis.Redis.from_url(again.url)
        assert client.mget("first", "second") == [b"1", b"2"]
        client.close()
