"""One Redis connection that carries every script call, auto-pipelined.

Redis answers each connection's commands in the order they were sent, so
calls need not take turns: each call writes its command at once and queues a
future, and the connection's protocol hands the replies out in order as the
event loop reads them (no reader task to wake in between). Calls made while
others are in flight go out back to back and come back in one read -- the
pipelining a burst needs, with no batching window and nothing to tune -- and
a lone call pays one write and one read, without a pool checkout, a task per
timeout or redis-py's command layer (about 0.15 ms of a one-subtask create's
0.5 ms round trip through redis-py on a 2-core VM; ``bench/RESULTS.md``).

redis-py still opens the connection and shakes hands, so every URL form, TLS,
AUTH and SELECT work as for the rest of the store; then its transport is
taken over (``set_protocol``). Replies are parsed with hiredis
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


def pack(args: Sequence[str | int | bytes]) -> bytes:
    """A command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Replies(asyncio.Protocol):
    """One open connection, as the event loop's protocol for its transport:
    replies are parsed and handed to the waiting calls, in order, in the
    loop's own read callback (no reader task to wake in between)."""

    def __init__(self, streams: tuple[Any, Any], timeout: float, closed: Any) -> None:
        # redis-py's stream pair is kept only so that it is not collected:
        # a StreamWriter closes its transport when it is.
        self._streams = streams
        self.transport: asyncio.Transport = streams[1].transport
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.timeout = timeout
        self._closed = closed
        self._parser = hiredis.Reader(encoding="utf-8", errors="strict")
        self._loop = asyncio.get_running_loop()
        self._deadline: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self.open = True

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Write ``command``; the future of its reply."""
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
        if abort:
            self.transport.abort()
        else:
            self.transport.close()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)
        self.resume_writing()


class ScriptLine:
    """Script calls over one auto-pipelined connection (see the module doc)."""

    def __init__(self, pool: aioredis.ConnectionPool, timeout: float) -> None:
        self._pool: Any = pool
        self.timeout = timeout
        self._connection: _Replies | None = None
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
        future = connection.send(command)
        try:
            await connection.drained()
            reply = await future
        except BaseException:
            future.cancel()  # its reply, or its failure, is nobody's now
            raise
        if isinstance(reply, hiredis.ReplyError):
            raise _parse_error(str(reply))
        return reply

    async def _open(self) -> _Replies:
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
            # redis-py opened the connection and shook hands (TLS, AUTH,
            # SELECT); its transport is ours from here on, and redis-py's
            # connection object forgets it.
            connection = _Replies((opened._reader, opened._writer), self.timeout, self._closed)
            opened._reader = opened._writer = None
            connection.transport.set_protocol(connection)
            if connection.transport.is_closing():
                connection.fail(rexc.ConnectionError("Redis closed the connection"))
                raise rexc.ConnectionError("Redis closed the connection")
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
