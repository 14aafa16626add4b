"""One Redis connection that carries every script call, auto-pipelined.

Redis answers each connection's commands in the order they were sent, so
calls need not take turns: each call writes its command at once and queues a
future, and the connection's protocol hands the replies out in order as the
event loop reads them (no reader task to wake in between). Calls made while
others are in flight go out back to back and come back in one read -- the
pipelining a burst needs, with no batching window and nothing to tune -- and
a lone call pays one write and one read, without a pool checkout, a task per
timeout or redis-py's command layer (``docs/benchmarks.md``).

The connection is opened here, from the same URL as the rest of the store
(``redis://``, ``rediss://`` with its TLS options, ``unix://``; a password,
a user and a database), with AUTH and SELECT sent as its first commands.
Replies are parsed with hiredis, and errors become the redis-py exceptions
the rest of the store knows. A connection that fails or stops answering for
``timeout`` seconds fails every call waiting on it with
``redis.exceptions.ConnectionError`` or ``TimeoutError``; the next call opens
a new one. A call that is cancelled leaves its reply to be read and dropped,
so the replies of the others stay in step.

Where the store asks for replicas, a call returns only after ``WAIT`` says
enough replicas have its write; a server that answers ``READONLY`` (demoted in
a failover) has its connection closed, so the next call finds the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis.exceptions as rexc

_ERRORS: tuple[tuple[str, type[rexc.RedisError]], ...] = (
    ("NOSCRIPT", rexc.NoScriptError),
    ("LOADING", rexc.BusyLoadingError),
    ("READONLY", rexc.ReadOnlyError),
    ("NOAUTH", rexc.AuthenticationError),
    ("WRONGPASS", rexc.AuthenticationError),
    ("NOPERM", rexc.NoPermissionError),
    ("EXECABORT", rexc.ExecAbortError),
)
"""Error replies that mean something to the caller, by their first word."""


def error_of(reply: str) -> rexc.RedisError:
    """The redis-py exception for an error reply (``ResponseError`` by default)."""
    word = reply.split(" ", 1)[0]
    for prefix, cls in _ERRORS:
        if word == prefix:
            return cls(reply)
    return rexc.ResponseError(reply)


def pack(args: Sequence[str | int | bytes]) -> bytes:
    """A command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a Redis server listens and how to log in, from a ``redis://``,
    ``rediss://`` or ``unix://`` URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""
    """A Unix socket, instead of host and port."""
    username: str = ""
    password: str = ""
    db: int = 0
    tls: ssl.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        db = int(query.get("db") or 0)
        if parts.scheme == "unix":
            return cls(
                path=unquote(parts.path),
                username=unquote(parts.username or ""),
                password=unquote(parts.password or ""),
                db=db,
            )
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            username=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            db=db,
            tls=_tls(query) if parts.scheme == "rediss" else None,
        )

    def moved(self, host: str, port: int) -> Endpoint:
        """The same login at another address (a primary that Sentinel names)."""
        return Endpoint(host, port, "", self.username, self.password, self.db, self.tls)


def _tls(query: dict[str, str]) -> ssl.SSLContext:
    """The TLS context of a ``rediss://`` URL (redis-py's query options)."""
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
    if query.get("ssl_cert_reqs", "required").lower() in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif query.get("ssl_check_hostname", "true").lower() in ("false", "0", "no"):
        context.check_hostname = False
    if query.get("ssl_certfile"):
        context.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
    return context


class _Replies(asyncio.Protocol):
    """One open connection, as the event loop's protocol for its transport:
    replies are parsed and handed to the waiting calls, in order, in the
    loop's own read callback (no reader task to wake in between)."""

    def __init__(self, timeout: float, closed: Callable[[_Replies], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.timeout = timeout
        self._closed = closed
        self._parser = hiredis.Reader(encoding="utf-8", errors="strict")
        self._loop = asyncio.get_running_loop()
        self._deadline: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Write ``command``; the future of its reply."""
        assert self.transport is not None
        future = self._loop.create_future()
        self.transport.write(command)
        self.pending.append(future)
        if self._deadline is None:
            self._deadline = self._loop.call_later(self.timeout, self._timed_out)
        return future

    async def drained(self) -> None:
        """Wait while the transport holds more than its high-water mark."""
        if self._drained is not None:
            await asyncio.shield(self._drained)

    def data_received(self, data: bytes) -> None:
        parser, pending = self._parser, self.pending
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                future = pending.popleft()
                if not future.done():
                    future.set_result(reply)
        except Exception as e:  # a reply nobody asked for, or bytes that are not RESP
            self.fail(rexc.ConnectionError(f"the connection to Redis is out of step: {e!r}"))
            return
        # The deadline runs while calls wait, from the last sign of progress.
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if pending:
            self._deadline = self._loop.call_later(self.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._deadline = None
        self.fail(rexc.TimeoutError(f"Redis did not answer in {self.timeout:g} s"))

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"lost the connection to Redis: {exc}" if exc else "Redis closed the connection"
        self.fail(rexc.ConnectionError(why))

    def fail(self, error: Exception, *, abort: bool = True) -> None:
        """Close the connection and fail the calls waiting on it."""
        if not self.open:
            return
        self.open = False
        self._closed(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)
        self.resume_writing()


class NotReplicated(rexc.ConnectionError):
    """A write that too few replicas acknowledged in time (``WAIT``)."""


Locate = Callable[[], Awaitable[Endpoint]]
"""Where to connect now (Sentinel's current primary, or a fixed address)."""


class ScriptLine:
    """Script calls over one auto-pipelined connection (see the module doc)."""

    def __init__(
        self,
        endpoint: Endpoint | Locate,
        timeout: float,
        *,
        connect_timeout: float = 5.0,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        if isinstance(endpoint, Endpoint):
            fixed = endpoint

            async def locate() -> Endpoint:
                return fixed

            self._locate: Locate = locate
        else:
            self._locate = endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._connection: _Replies | None = None
        self._opening = asyncio.Lock()
        self.replicas = replicas
        """A call returns only once this many replicas have its write (``WAIT``)."""
        self.replica_timeout = replica_timeout
        self._sent = 0
        """Commands written so far (on any connection), numbering each call's."""
        self._barrier: tuple[_Replies, int, asyncio.Future[Any]] | None = None
        """The last WAIT sent: its connection, the commands it covers, its reply."""

    @property
    def connected(self) -> bool:
        """Whether a connection is open (one is opened by the first call after it closed)."""
        return self._connection is not None

    async def eval(self, script: str, sha: str, args: Sequence[str | int]) -> Any:
        """Run ``script`` (by its SHA-1 ``sha`` when Redis has it) with no keys."""
        try:
            return await self.call(pack(["EVALSHA", sha, 0, *args]))
        except rexc.NoScriptError:
            # Redis restarted (the script cache is not persisted): EVAL loads it again.
            return await self.call(pack(["EVAL", script, 0, *args]))

    async def call(self, command: bytes) -> Any:
        """Send one packed command; its reply, or the redis-py exception for its error.

        With ``replicas``, the reply is returned only once that many replicas
        have acknowledged the write (``NotReplicated`` otherwise). One WAIT
        covers every command sent before it on its connection, so the calls
        whose replies arrive together share one."""
        connection = self._connection or await self._open()
        self._sent += 1
        mark = self._sent
        try:
            reply = await _ask(connection, command)
        except rexc.ReadOnlyError:
            # The server was demoted (a failover): the next call connects to
            # the primary that is named now.
            connection.fail(rexc.ConnectionError("the server is a replica now"))
            raise
        if self.replicas:
            await self._replicated(connection, mark)
        return reply

    async def _replicated(self, connection: _Replies, mark: int) -> None:
        barrier = self._barrier
        if barrier is None or barrier[0] is not connection or barrier[1] < mark:
            command = pack(["WAIT", self.replicas, max(1, int(self.replica_timeout * 1000))])
            barrier = self._barrier = (connection, self._sent, connection.send(command))
        reply = await asyncio.shield(barrier[2])
        if isinstance(reply, hiredis.ReplyError):
            raise error_of(str(reply))
        if int(reply) < self.replicas:
            raise NotReplicated(
                f"the write reached {reply} of the {self.replicas} replicas asked for "
                f"(TASKLOOM_REDIS_MIN_REPLICAS) within {self.replica_timeout:g} s: the "
                "primary has it, a failover now would lose it; its outcome is unknown"
            )

    async def _open(self) -> _Replies:
        async with self._opening:
            if self._connection is not None:
                return self._connection
            endpoint = await self._locate()
            loop = asyncio.get_running_loop()
            connection = _Replies(self.timeout, self._closed)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if endpoint.path:
                        await loop.create_unix_connection(lambda: connection, endpoint.path)
                    else:
                        await loop.create_connection(
                            lambda: connection,
                            endpoint.host,
                            endpoint.port,
                            ssl=endpoint.tls,
                            server_hostname=endpoint.host if endpoint.tls else None,
                        )
                    await _handshake(connection, endpoint)
            except TimeoutError:
                connection.fail(rexc.TimeoutError("no connection"))
                raise rexc.TimeoutError(
                    f"Redis did not accept a connection in {self.connect_timeout:g} s"
                ) from None
            except OSError as e:
                connection.fail(rexc.ConnectionError(str(e)))
                raise rexc.ConnectionError(f"cannot connect to Redis: {e}") from None
            except BaseException as e:
                connection.fail(rexc.ConnectionError(f"the handshake failed: {e}"))
                raise
            self._connection = connection
            return connection

    def _closed(self, connection: _Replies) -> None:
        if self._connection is connection:
            self._connection = None

    async def close(self) -> None:
        """Close the connection: what was written is still sent; calls waiting fail."""
        connection = self._connection
        if connection is not None:
            connection.fail(rexc.ConnectionError("the store was closed"), abort=False)


async def _ask(connection: _Replies, command: bytes) -> Any:
    future = connection.send(command)
    try:
        await connection.drained()
        reply = await future
    except BaseException:
        future.cancel()  # its reply, or its failure, is nobody's now
        raise
    if isinstance(reply, hiredis.ReplyError):
        raise error_of(str(reply))
    return reply


async def _handshake(connection: _Replies, endpoint: Endpoint) -> None:
    """Log in and pick the database, as the connection's first commands."""
    if endpoint.password:
        login = [endpoint.username, endpoint.password] if endpoint.username else [endpoint.password]
        await _ask(connection, pack(["AUTH", *login]))
    if endpoint.db:
        await _ask(connection, pack(["SELECT", endpoint.db]))
    with contextlib.suppress(rexc.ResponseError):  # older servers, or a renamed command
        await _ask(connection, pack(["CLIENT", "SETNAME", "taskloom-scripts"]))
