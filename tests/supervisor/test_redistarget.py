"""Redis URLs, Sentinel's included: what is parsed from them, what is refused
and with what message, and what a log may show of them."""

from __future__ import annotations

import pytest

from taskloom.core.errors import ConfigError
from taskloom.supervisor.redistarget import RedisTarget
from taskloom.supervisor.settings import SupervisorSettings


def test_a_sentinel_url_names_the_sentinels_the_master_the_login_and_the_database() -> None:
    target = RedisTarget.parse(
        "redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380,s3:26381/orders/2"
        "?sentinel_password=watch"
    )
    assert target.is_sentinel
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380), ("s3", 26381))
    assert target.master == "orders"
    assert (target.endpoint.username, target.endpoint.password, target.endpoint.db) == (
        "app",
        "s@cret",
        2,
    )
    assert dict(target.sentinel_login) == {"password": "watch"}
    assert "s@cret" not in target.safe_url and "watch" not in target.safe_url
    assert target.safe_url == (
        "redis+sentinel://app:***@10.0.0.1:26379,::1:26380,s3:26381/orders/2"
    )


def test_a_plain_url_is_one_server() -> None:
    target = RedisTarget.parse("redis://:pw@db:6380/3")
    assert not target.is_sentinel
    assert (target.endpoint.host, target.endpoint.port, target.endpoint.db) == ("db", 6380, 3)
    assert target.safe_url == "redis://:***@db:6380/3"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://x", "must start with redis://, rediss://, unix:// or redis+sentinel://"),
        ("redis+sentinel://h:26379", "names no master"),
        ("redis+sentinel://h:26379/", "names no master"),
        ("redis+sentinel://h/m", "h: each sentinel is HOST:PORT"),
        ("redis+sentinel://h:0/m", "h:0: each sentinel is HOST:PORT"),
        ("redis+sentinel://h:1,,k:2/m", "(empty): each sentinel is HOST:PORT"),
        ("redis+sentinel://h:1/m/x", "'x': the database after the master's name is a number"),
    ],
)
def test_a_bad_url_is_refused_saying_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        RedisTarget.parse(url)
    assert message in str(raised.value)


def test_a_sentinel_url_waits_for_one_replica_unless_told_otherwise() -> None:
    sentinel = "redis+sentinel://127.0.0.1:26379/m"
    assert SupervisorSettings.load(redis_url=sentinel).replicas == 1
    assert SupervisorSettings.load(redis_url=sentinel, redis_min_replicas="2").replicas == 2
    assert SupervisorSettings.load(redis_url="redis://h:1/0").replicas == 0
    with pytest.raises(ConfigError, match="names no master"):
        SupervisorSettings.load(redis_url="redis+sentinel://h:1")
