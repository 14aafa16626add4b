"""Keepalive between a real grpc.aio server and client with the options every
process uses: a stream that carries nothing for a while (an idle worker is
silent) stays open while the client's pings keep to the server's limit, and a
client that pings faster is cut off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from taskloom.core.channel import (
    ClientTLS,
    Keepalive,
    ServerLimits,
    client_options,
    followed_tls,
    server_options,
)
from taskloom.core.status import valid_address

METHOD = "/test.Echo/Stream"


async def _echo(
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext[bytes, bytes],
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _silent_stream(limits: ServerLimits, ping_every_ms: int, quiet: float) -> str:
    """Open a stream, send nothing for ``quiet`` seconds while the client pings
    every ``ping_every_ms``, then send one more message: returns its echo, or
    how the stream ended if it was closed meanwhile (at once, when it is).
    What the first test shows is that nothing happens, so it waits the whole
    time."""
    server = grpc.aio.server(options=server_options(limits))
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", {"Stream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    options = client_options(keepalive=Keepalive(time_ms=ping_every_ms))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(METHOD)()
            await call.write(b"hello")
            assert await call.read() == b"hello"
            # Quiet for that long, unless the stream is closed sooner.
            deadline = asyncio.get_running_loop().time() + quiet
            while not call.done() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            if call.done():
                return f"{(await call.code()).name}: {await call.details()}"
            await call.write(b"still here")
            reply = await call.read()
            await call.done_writing()
            assert isinstance(reply, bytes)
            return reply.decode()
    finally:
        await server.stop(None)


async def test_a_quiet_stream_outlives_pings_that_keep_to_the_servers_limit() -> None:
    # A ping a second (grpc's floor for keepalive) against a limit of one every
    # 0.5 s: no strike. (With the limit's key misspelt, grpc's default of one
    # every 5 minutes applied, and the fourth ping closed the connection.)
    limits = ServerLimits(min_ping_interval_ms=500)
    assert await _silent_stream(limits, ping_every_ms=1_000, quiet=5.0) == "still here"


async def test_a_client_that_pings_faster_than_the_limit_is_cut_off() -> None:
    # Past two strikes (pings under 2 s apart), the server sends GOAWAY.
    limits = ServerLimits(min_ping_interval_ms=2_000)
    ended = await _silent_stream(limits, ping_every_ms=1_000, quiet=30.0)
    assert ended == "UNAVAILABLE: Too many pings"


def test_a_followed_leader_must_carry_the_name_the_caller_expected() -> None:
    tls = ClientTLS(ca=b"ca")
    assert followed_tls(tls, "taskloom-supervisor:50051") == ClientTLS(
        ca=b"ca", server_name="taskloom-supervisor"
    )
    assert followed_tls(tls, "[::1]:50051") == ClientTLS(ca=b"ca", server_name="::1")
    named = ClientTLS(ca=b"ca", server_name="given")
    assert followed_tls(named, "x:1") is named
    assert followed_tls(None, "x:1") is None


@pytest.mark.parametrize(
    ("address", "valid"),
    [
        ("10.0.0.7:50051", True),
        ("taskloom-0.taskloom.svc:50051", True),
        ("[::1]:50051", True),
        ("elsewhere", False),
        ("http://x:1/", False),
        ("a b:1", False),
        ("x:0", False),
        ("x:65536", False),
        (":50051", False),
        ("x" * 300 + ":1", False),
    ],
)
def test_a_redirect_names_a_plain_host_and_port(address: str, valid: bool) -> None:
    assert valid_address(address) is valid
