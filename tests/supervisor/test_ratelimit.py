"""The shared token bucket of a rate limit (ratelimit.lua on a real Redis),
its table and its parsing; the cluster's use of it is in tests/test_rate_limits.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from taskloom.core.errors import ConfigError
from taskloom.core.llm.openai import retry_after
from taskloom.core.localredis import LocalRedis
from taskloom.core.ratelimits import Limit, LimitTable, parse_limits
from taskloom.supervisor.store import Store

T = 1_800_000_000.0


@pytest.fixture
async def store(redis_server: LocalRedis, prefix: str) -> AsyncIterator[Store]:
    s = Store(redis_server.url, prefix=prefix, retention=3600)
    await s.connect()
    yield s
    await s.close()


async def test_requests_per_minute_hold_ten_seconds_worth_and_refill(store: Store) -> None:
    limit = Limit(requests=60)  # one a second; the bucket holds 10

    async def take(at: float) -> float:
        return await store.take_rate("m:*", limit, 1, 0, 0.0, now=T + at)

    assert [await take(0) for _ in range(10)] == [0.0] * 10
    assert await take(0) == pytest.approx(1.0)  # nothing taken while it waits
    assert await take(0.5) == pytest.approx(0.5)
    assert await take(1.0) == 0.0
    assert await take(1.0) == pytest.approx(1.0)
    # Idle long enough, it is full again, and no fuller.
    assert [await take(100) for _ in range(10)] == [0.0] * 10
    assert await take(100) > 0


async def test_tokens_are_taken_before_and_after_a_call(store: Store) -> None:
    limit = Limit(requests=600, tokens=6000)  # 1,000 tokens held, 100 a second

    async def take(requests: int, tokens: int, at: float) -> float:
        return await store.take_rate("m", limit, requests, tokens, 0.0, now=T + at)

    assert await take(1, 400, 0) == 0.0  # a prompt
    assert await take(0, 900, 0) == 0.0  # its reply, taken whatever is left: -300
    assert await take(1, 100, 0) == pytest.approx(4.0)  # 400 short: 4 s
    assert await take(1, 100, 4) == 0.0
    # A call larger than the bucket fits when the bucket is full.
    assert await take(1, 5000, 100) == 0.0


async def test_a_pause_refuses_everyone_until_it_ends(store: Store) -> None:
    limit = Limit(requests=600)
    assert await store.take_rate("m", limit, 0, 0, 3.0, now=T) == 0.0
    assert await store.take_rate("m", limit, 1, 0, 0.0, now=T + 1) == pytest.approx(2.0)
    assert await store.take_rate("m", limit, 1, 0, 0.0, now=T + 3) == 0.0
    # Another bucket is not paused.
    assert await store.take_rate("n", limit, 1, 0, 0.0, now=T + 1) == 0.0


def test_limits_parse_and_match_the_longest_pattern() -> None:
    limits = parse_limits("openai:*=500/30000, openai:gpt-4o=100 ,ollama:*=60")
    assert limits == {
        "openai:*": Limit(500, 30000),
        "openai:gpt-4o": Limit(100, 0),
        "ollama:*": Limit(60, 0),
    }
    table = LimitTable(limits)
    assert table.find("openai:gpt-4o") == ("openai:gpt-4o", Limit(100, 0))
    assert table.find("openai:gpt-4.1") == ("openai:*", Limit(500, 30000))
    assert table.find("embedded:smollm2") is None
    with pytest.raises(ConfigError, match=r"'openai=fast' is not MODEL=RPM\[/TPM\]"):
        parse_limits("openai=fast")


def test_a_429_says_how_long_to_wait_in_seconds_milliseconds_or_a_date() -> None:
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # past
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None
