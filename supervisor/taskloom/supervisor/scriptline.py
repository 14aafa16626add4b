"""One Redis connection that carries every script call, auto-pipelined.

Redis answers each connection's commands in the order they were sent, so
calls need not take turns: each call writes its command at once and queues a
future, and one reader task hands the replies out in order. Calls made while
others are in flight go out back to back and come back in one read -- the
pipelining a burst needs, with no batching window and nothing to tune -- and
a lone call pays one write and one read, without a pool checkout, a task per
timeout or redis-py's command layer (about 0.1 ms of the 0.2 ms a script
round trip takes through redis-py on a 2-core VM; ``bench/RESULTS.md``).

redis-py still opens the connection, so every URL form, TLS, AUTH and SELECT
work as they do for the rest of the store; replies are parsed with hiredis
and errors become the same redis-py exceptions. A connection that fails or
stops answering for ``timeout`` seconds fails every call waiting on it with
``redis.exceptions.ConnectionError`` or ``TimeoutError``; the next call opens
a new one. A call that is cancelled leaves its reply to be read and dropped,
so the replies of the others stay in step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis._parsers.base import BaseParser

_parse_error: Any = BaseParser.parse_error
"""redis-py's mapping of an error reply to its exception (NOSCRIPT, LOADING, READONLY...)."""

_READ_SIZE = 1 << 16
_HIGH_WATER = 1 << 20
"""Bytes queued for Redis past which a caller waits for the socket to drain."""


def pack(args: Sequence[str | int | bytes]) -> bytes:
    """A command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Connection:
    """One open connection: its writer and the calls waiting for replies, in order."""

    __slots__ = ("deadline", "pending", "reading", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.deadline: asyncio.Timeout | None = None
        """The running read's deadline, which runs only while calls wait."""
        self.reading: asyncio.Task[None] | None = None


class ScriptLine:
    """Script calls over one auto-pipelined connection (see the module doc)."""

    def __init__(self, pool: aioredis.ConnectionPool, timeout: float) -> None:
        self._pool: Any = pool
        self.timeout = timeout
        self._connection: _Connection | None = None
        self._opening = asyncio.Lock()

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
        """Send one packed command; its reply, or the redis-py exception for its error."""
        connection = self._connection or await self._open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # Written and queued with no await between, so replies match futures.
        connection.writer.write(command)
        connection.pending.append(future)
        if len(connection.pending) == 1 and connection.deadline is not None:
            connection.deadline.reschedule(loop.time() + self.timeout)
        try:
            if connection.writer.transport.get_write_buffer_size() > _HIGH_WATER:
                await connection.writer.drain()
            reply = await future
        except OSError as e:
            future.cancel()  # its reply, or its failure, is nobody's now
            raise rexc.ConnectionError(f"lost the connection to Redis: {e}") from None
        except BaseException:
            future.cancel()
            raise
        if isinstance(reply, hiredis.ReplyError):
            raise _parse_error(str(reply))
        return reply

    async def _open(self) -> _Connection:
        async with self._opening:
            if self._connection is not None:
                return self._connection
            opened = self._pool.make_connection()
            try:
                await opened.connect()
            except BaseException:
                with contextlib.suppress(Exception):
                    await opened.disconnect()
                raise
            # The streams redis-py opened and shook hands on; from here on
            # this class alone reads, writes and closes them.
            reader: asyncio.StreamReader = opened._reader
            connection = _Connection(opened._writer)
            opened._reader = opened._writer = None
            connection.reading = asyncio.create_task(
                self._read(connection, reader), name="taskloom-redis-replies"
            )
            self._connection = connection
            return connection

    async def _read(self, connection: _Connection, reader: asyncio.StreamReader) -> None:
        """Hand replies to the calls in order. It reads even with no call
        waiting, so a connection Redis closed while idle is dropped before a
        call is written to it."""
        parser = hiredis.Reader(encoding="utf-8", errors="strict")
        pending = connection.pending
        loop = asyncio.get_running_loop()
        error: Exception
        try:
            while True:
                try:
                    async with asyncio.timeout(None) as deadline:
                        connection.deadline = deadline
                        if pending:
                            deadline.reschedule(loop.time() + self.timeout)
                        data = await reader.read(_READ_SIZE)
                except TimeoutError:
                    error = rexc.TimeoutError(f"Redis did not answer in {self.timeout:g} s")
                    break
                finally:
                    connection.deadline = None
                if not data:
                    error = rexc.ConnectionError("Redis closed the connection")
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future = pending.popleft()
                    if not future.done():
                        future.set_result(reply)
        except OSError as e:
            error = rexc.ConnectionError(f"lost the connection to Redis: {e}")
        except asyncio.CancelledError:
            self._drop(connection, rexc.ConnectionError("the store was closed"), abort=False)
            raise
        except Exception as e:  # a reply nobody asked for, or bytes that are not RESP
            error = rexc.ConnectionError(f"the connection to Redis is out of step: {e!r}")
        self._drop(connection, error)

    def _drop(self, connection: _Connection, error: Exception, *, abort: bool = True) -> None:
        """Close ``connection`` and fail the calls waiting on it; the next call opens another."""
        if self._connection is connection:
            self._connection = None
        if abort:
            connection.writer.transport.abort()
        else:
            connection.writer.close()
        while connection.pending:
            future = connection.pending.popleft()
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Close the connection: what was written is still sent; calls waiting fail."""
        connection = self._connection
        if connection is None or connection.reading is None:
            return
        connection.reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connection.reading
        with contextlib.suppress(OSError):
            await connection.writer.wait_closed()
