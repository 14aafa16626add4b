"""Where the store's Redis is: one server, or a primary that Sentinel names.

``redis://``, ``rediss://`` and ``unix://`` URLs name one server.
``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]``
names the sentinels and the master's name: every connection asks a sentinel
for the current primary when it opens, and a connection that finds its server
demoted (``READONLY``) or gone is replaced by one to the primary Sentinel names
next. The login in the URL is the data nodes'; sentinels that want one of their
own take ``?sentinel_username=...&sentinel_password=...``.

Each kind of connection the store uses is made here, so that all of them follow
the primary together: the pooled commands, the blocking reads of the event
hub, the lease renewer's blocking connection, and the script line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel as sync_sentinel

from taskloom.core.errors import ConfigError
from taskloom.supervisor.scriptline import Endpoint, Locate

SENTINEL_SCHEME = "redis+sentinel"
SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL (see the module doc)."""

    url: str
    endpoint: Endpoint
    """The server (one server), or the login and database of the data nodes (Sentinel)."""
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    sentinel_login: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        scheme = url.partition("://")[0]
        if scheme not in SCHEMES:
            raise ConfigError(
                "must start with redis://, rediss://, unix:// or "
                "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER"
            )
        if scheme != SENTINEL_SCHEME:
            return cls(url, Endpoint.from_url(url))
        rest = url.partition("://")[2]
        netloc, _, tail = rest.partition("/")
        path, _, query_string = tail.partition("?")
        userinfo, _, hosts = netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        sentinels = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"{item.strip() or '(empty)'}: each sentinel is HOST:PORT")
            sentinels.append((host.strip("[]"), int(port)))
        master, _, db = path.partition("/")
        if not master:
            raise ConfigError("names no master: redis+sentinel://HOST:PORT[,...]/MASTER")
        if db and not db.isdigit():
            raise ConfigError(f"{db!r}: the database after the master's name is a number")
        query = {k: v[-1] for k, v in parse_qs(query_string).items()}
        login = {
            k: query[f"sentinel_{k}"] for k in ("username", "password") if f"sentinel_{k}" in query
        }
        endpoint = Endpoint(username=unquote(username), password=unquote(password), db=int(db or 0))
        return cls(url, endpoint, tuple(sentinels), unquote(master), login)

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def safe_url(self) -> str:
        """The URL without its passwords, for logs and errors."""
        if self.is_sentinel:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            login = f"{quote(self.endpoint.username)}:***@" if self.endpoint.password else ""
            db = f"/{self.endpoint.db}" if self.endpoint.db else ""
            return f"{SENTINEL_SCHEME}://{login}{hosts}/{self.master}{db}"
        parts = urlsplit(self.url)
        if parts.password:
            netloc = f"{parts.username or ''}:***@{parts.hostname}"
            if parts.port:
                netloc += f":{parts.port}"
            return urlunsplit(parts._replace(netloc=netloc))
        return self.url

    # -- connections -----------------------------------------------------------

    def _login(self) -> dict[str, Any]:
        return {
            "username": self.endpoint.username or None,
            "password": self.endpoint.password or None,
            "db": self.endpoint.db,
        }

    def _sentinel_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        sockets = {k: v for k, v in options.items() if k.startswith("socket_")}
        return {**sockets, **self.sentinel_login, "decode_responses": True}

    def async_manager(self, **options: Any) -> async_sentinel.Sentinel:
        """The sentinels, asked for the primary by every async connection made from it."""
        return async_sentinel.Sentinel(
            self.sentinels, sentinel_kwargs=self._sentinel_options(options)
        )

    def async_client(
        self,
        manager: async_sentinel.Sentinel | None,
        *,
        max_connections: int | None = None,
        pool_timeout: float | None = None,
        **options: Any,
    ) -> aioredis.Redis:
        """A client of the primary; with ``max_connections``, a pool that makes
        a burst wait for a free connection (``pool_timeout``) rather than fail."""
        blocking = max_connections is not None
        if manager is None:
            if blocking:
                pool = aioredis.BlockingConnectionPool.from_url(
                    self.url, max_connections=max_connections, timeout=pool_timeout, **options
                )
                return aioredis.Redis.from_pool(pool)
            return aioredis.Redis.from_url(self.url, **options)
        extra = {"max_connections": max_connections, "timeout": pool_timeout} if blocking else {}
        client: aioredis.Redis = manager.master_for(
            self.master,
            redis_class=aioredis.Redis,
            connection_pool_class=_BlockingSentinelPool if blocking else _SentinelPool,
            **self._login(),
            **options,
            **extra,
        )
        return client

    def sync_client(self, **options: Any) -> redis.Redis:
        """A blocking client of the primary (the lease renewer's thread)."""
        if not self.is_sentinel:
            return redis.Redis.from_url(self.url, **options)
        manager = sync_sentinel.Sentinel(
            self.sentinels, sentinel_kwargs=self._sentinel_options(options), **options
        )
        client: redis.Redis = manager.master_for(self.master, **self._login(), **options)
        return client

    def locator(self, manager: async_sentinel.Sentinel | None) -> Endpoint | Locate:
        """For the script line: the endpoint, or how to find the primary now."""
        if manager is None:
            return self.endpoint

        async def locate() -> Endpoint:
            host, port = await manager.discover_master(self.master)
            return self.endpoint.moved(str(host), int(port))

        return locate


class _SentinelPool(async_sentinel.SentinelConnectionPool):
    """redis-py's Sentinel pool (named here so both pools read alike)."""


class _BlockingSentinelPool(async_sentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A Sentinel pool that makes a burst wait for a free connection, as the
    store's pool for one server does (redis-py's fails past its limit)."""
