"""Idle workers for the benchmark: N Connect streams from one process, each
says Hello (a capability nobody uses) and then does what an idle worker does:
nothing, or heartbeats if the supervisor's Welcome asks for them. Each has its
own connection with a worker's channel options (keepalive included).

    python -m bench.idle_workers HOST:PORT N
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from taskloom.core.channel import client_options
from taskloom.v1 import workers_pb2 as wpb
from taskloom.v1 import workers_pb2_grpc

OWN_CONNECTION = [*client_options(), ("grpc.use_local_subchannel_pool", 1)]


async def idle(address: str, index: int) -> None:
    # One connection each, as separate worker processes would have.
    async with grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as channel:
        call = workers_pb2_grpc.WorkerServiceStub(channel).Connect()
        hello = wpb.Hello(worker_id=f"idle-{index}", name=f"idle-{index}",
                          capabilities=["idle"], max_concurrency=1)  # fmt: skip
        await call.write(wpb.ConnectRequest(hello=hello))
        welcome: Any = await call.read()
        interval = welcome.welcome.heartbeat_interval.ToNanoseconds() / 1e9 or 5.0
        if welcome.welcome.idle_silence:
            await call.read()  # until the stream ends
            return
        while True:
            await call.write(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(running=0)))
            await asyncio.sleep(interval)


async def main(address: str, count: int) -> None:
    base = id(object()) % 100_000
    await asyncio.gather(*(idle(address, base * 1000 + i) for i in range(count)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
