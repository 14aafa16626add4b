"""The physical limits on this machine, measured the same way as the systems:
a grpc.aio bidi stream echoing messages (one per frame, and 100 per frame),
and redis-py commands (one at a time, and pipelined 100 at a time)."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
from redis.asyncio import Redis

from bench.harness import spawn, stop

ECHO = "/bench.Echo/Stream"


def _server(port: int) -> None:
    async def serve() -> None:
        async def echo(requests, context):  # type: ignore[no-untyped-def]
            async for request in requests:
                yield request

        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
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


def measure(redis_url: str, *, quick: bool) -> dict[str, float]:
    """Every reference rate, in items per second."""
    from taskloom.core.localredis import free_port

    port = free_port()
    server = spawn([sys.executable, "-c", f"from bench.reference import _server; _server({port})"])
    try:
        time.sleep(1.0)
        n = 2_000 if quick else 20_000
        return {
            "grpc.aio stream echo, 1 per message": asyncio.run(grpc_echo(port, n, 1)),
            "grpc.aio stream echo, 100 per message": asyncio.run(grpc_echo(port, n * 10, 100)),
            "redis-py SET, one at a time": asyncio.run(redis_ops(redis_url, n, False)),
            "redis-py SET, pipelined 100": asyncio.run(redis_ops(redis_url, n * 5, True)),
        }
    finally:
        stop([server])
