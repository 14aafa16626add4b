"""The physical limits on this machine, measured the same way as the systems:
a grpc.aio bidi stream echoing messages (one per frame, and 100 per frame),
and redis-py commands (one at a time, and pipelined 100 at a time).

And the floor under dispatch latency: the two hops a durable dispatch cannot
skip, with none of taskloom's code. A process writes to Redis (one SET on a
bare connection, no client library) and, once Redis has answered, sends one
grpc.aio stream message to a second process; the latency runs from before
the write to the moment the receiver's ``read()`` returns, on this machine's
clock, like the systems' own. Measured back to back (idle) and one every
10 ms, the tick of taskloom's open-loop load, so that every process sleeps
in between as it does there."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any
from urllib.parse import urlparse

import grpc
from redis.asyncio import Redis

from bench.harness import percentile, spawn, stop

ECHO = "/bench.Echo/Stream"
FLOOR = "/bench.Floor/Stream"
TICK = 0.01


async def _stream_server(service: str, handler: Any, port: int) -> grpc.aio.Server:
    """A started grpc.aio server on ``port`` whose one method, ``Stream``, is
    bidirectional and runs ``handler`` on raw bytes."""
    server = grpc.aio.server()
    methods: dict[str, Any] = {"Stream": grpc.stream_stream_rpc_method_handler(handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def _server(port: int) -> None:
    async def serve() -> None:
        async def echo(requests, context):  # type: ignore[no-untyped-def]
            async for request in requests:
                yield request

        server = await _stream_server("bench.Echo", echo, port)
        await server.wait_for_termination()

    asyncio.run(serve())


async def grpc_echo(port: int, messages: int, batch: int) -> float:
    """Items per second through an echo stream, ``batch`` items per message."""
    payload = b"x" * 64
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(ECHO)()
        frames = messages // batch
        body = payload * batch
        started = time.perf_counter()

        async def send() -> None:
            for _ in range(frames):
                await call.write(body)
            await call.done_writing()

        sender = asyncio.create_task(send())
        received = 0
        while received < frames:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                break
            received += 1
        await sender
        return frames * batch / (time.perf_counter() - started)


async def redis_ops(url: str, ops: int, pipelined: bool) -> float:
    client = Redis.from_url(url)
    try:
        started = time.perf_counter()
        if pipelined:
            for start in range(0, ops, 100):
                async with client.pipeline(transaction=False) as pipe:
                    for i in range(start, min(ops, start + 100)):
                        pipe.set(f"bench:ref:{i % 1000}", i)
                    await pipe.execute()
        else:
            for i in range(ops):
                await client.set(f"bench:ref:{i % 1000}", i)
        return ops / (time.perf_counter() - started)
    finally:
        await client.aclose()


def _receiver(port: int) -> None:
    """The worker's side of the floor: answers each message with the time
    its ``read()`` returned."""

    async def receive() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(FLOOR)()
            await call.write(b"ready")
            while True:
                message = await call.read()
                received = time.time()
                if message is grpc.aio.EOF:
                    return
                await call.write(repr(received).encode())

    asyncio.run(receive())


async def latency_floor(redis_url: str, samples: int, tick: float | None) -> list[float]:
    """Seconds from before a Redis write to the receiver's ``read()`` of the
    message sent once Redis answered: back to back (``tick`` None), or one
    every ``tick`` seconds."""
    from taskloom.core.localredis import free_port

    url = urlparse(redis_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 6379)
    latencies: list[float] = []
    done = asyncio.get_running_loop().create_future()

    async def sample(context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        await context.read()  # the receiver is connected
        start = time.monotonic()
        for i in range(samples):
            if tick is not None:
                await asyncio.sleep(max(0.0, start + i * tick - time.monotonic()))
            sent = time.time()
            writer.write(b"*3\r\n$3\r\nSET\r\n$11\r\nbench:floor\r\n$1\r\n1\r\n")
            answer = await reader.readline()
            if answer != b"+OK\r\n":
                raise RuntimeError(f"latency floor: Redis answered the SET with {answer!r}")
            await context.write(b"%r" % sent)
            latencies.append(float(await context.read()) - sent)

    async def handle(requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        try:
            await sample(context)
            done.set_result(None)
        except Exception as e:
            done.set_exception(e)

    port = free_port()
    server = await _stream_server("bench.Floor", handle, port)
    receive = f"from bench.reference import _receiver; _receiver({port})"
    receiver = spawn([sys.executable, "-c", receive])
    try:
        limit = 60 + samples * (tick or 0.01)
        try:
            async with asyncio.timeout(limit):
                await done
        except TimeoutError:
            raise RuntimeError(
                f"latency floor: no result within {limit:.0f}s; the receiver process "
                f"exited with {receiver.poll()} (None: still running)"
            ) from None
        return latencies
    finally:
        stop([receiver])
        await server.stop(None)
        writer.close()


def measure(redis_url: str, *, quick: bool) -> dict[str, float]:
    """Every reference rate, in items per second, and the latency floor's
    p50 and p99 (keys ending in "(ms)")."""
    from taskloom.core.localredis import free_port

    port = free_port()
    server = spawn([sys.executable, "-c", f"from bench.reference import _server; _server({port})"])
    try:
        time.sleep(1.0)
        n = 2_000 if quick else 20_000
        rates = {
            "grpc.aio stream echo, 1 per message": asyncio.run(grpc_echo(port, n, 1)),
            "grpc.aio stream echo, 100 per message": asyncio.run(grpc_echo(port, n * 10, 100)),
            "redis-py SET, one at a time": asyncio.run(redis_ops(redis_url, n, False)),
            "redis-py SET, pipelined 100": asyncio.run(redis_ops(redis_url, n * 5, True)),
        }
    finally:
        stop([server])
    samples = 50 if quick else 2_000
    for label, tick in (("back to back", None), ("one every 10 ms", TICK)):
        ms = [s * 1000 for s in asyncio.run(latency_floor(redis_url, samples, tick))]
        name = f"floor: Redis SET, then one grpc.aio message, {label}"
        rates[f"{name}: p50 (ms)"] = statistics.median(ms)
        rates[f"{name}: p99 (ms)"] = percentile(ms, 0.99)
    return rates
