"""How long a standby takes to serve after the leader dies: ``python -m bench.failover``.

Starts Redis and two ``taskloom supervisor`` processes with the default leader
lease, kills the leader (SIGKILL, then SIGTERM), and polls the standby's
``grpc.health.v1`` until it says SERVING.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskloom.client.local import wait_serving
from taskloom.core.localredis import LocalRedis, free_port


def _supervisor(redis_url: str, port: int, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "taskloom.client", "supervisor", "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "TASKLOOM_REDIS_URL": redis_url, "TASKLOOM_SUPERVISOR_ID": name},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp) / "redis") as redis:
        ports = [free_port(), free_port()]
        leader = _supervisor(redis.url, ports[0], "first")
        wait_serving(f"127.0.0.1:{ports[0]}", 30, leader)
        standby = _supervisor(redis.url, ports[1], "second")
        wait_serving(f"127.0.0.1:{ports[1]}", 30, standby, standby=True)
        try:
            for sig in (signal.SIGKILL, signal.SIGTERM):
                started = time.monotonic()
                leader.send_signal(sig)
                leader.wait()
                while not _serving(ports[1]):
                    time.sleep(0.02)
                print(
                    f"leader {sig.name}: the standby serves after "
                    f"{time.monotonic() - started:.2f}s",
                    flush=True,
                )
                # The dead one comes back as the new standby.
                leader = _supervisor(redis.url, ports[0], f"again-{sig.name}")
                wait_serving(f"127.0.0.1:{ports[0]}", 30, leader, standby=True)
                leader, standby = standby, leader
                ports.reverse()
        finally:
            for process in (leader, standby):
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
