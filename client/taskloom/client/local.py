"""``taskloom up``: Redis, a supervisor and N workers on this machine, in one command.

Each runs as a child process in its own session (a Ctrl-C in the terminal
reaches ``up`` alone, which stops them in order), logging to a file in the
data folder; ``stop()`` sends SIGTERM (so workers drain and Redis flushes its
AOF) and SIGKILLs whatever lingers. Each child also ends when ``up`` dies
without stopping it (``taskloom.core.parent``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskloom.core import parent
from taskloom.core.errors import ConfigError
from taskloom.core.localredis import LocalRedis, free_port

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_CONSOLE_PORT = 8080


def default_port(port: int) -> int:
    """``port`` on 127.0.0.1 if it is free, else any free port.

    Probed as the servers bind it, with ``SO_REUSEADDR``: connections of a
    cluster that just stopped, in TIME_WAIT for a minute, do not make it taken."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        return port
    except OSError:
        return free_port()


def default_listen() -> str:
    """127.0.0.1:50051 if it is free, else any free port."""
    return f"127.0.0.1:{default_port(DEFAULT_PORT)}"


def wait_serving(
    address: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    *,
    standby: bool = False,
) -> None:
    """Poll the gRPC health service until it says SERVING (or, with
    ``standby``, until it answers at all: a standby says NOT_SERVING)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ConfigError(f"the supervisor exited with status {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if standby or reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise ConfigError(f"the supervisor at {address} was not serving within {timeout:.0f}s")


class LocalCluster:
    """Redis + supervisor + workers as child processes."""

    def __init__(
        self,
        *,
        data_dir: Path,
        workers: int = 2,
        listen: str | None = None,
        redis_url: str | None = None,
        capabilities: str = "llm,echo",
        concurrency: int = 0,
        redis_fsync: str = "always",
        llm: str | None = None,
        console_port: int | None = None,
        app: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.app = app
        self.console_port = (
            console_port if console_port is not None else default_port(DEFAULT_CONSOLE_PORT)
        )
        self.llm = llm
        self.redis_fsync = redis_fsync
        self.n_workers = workers
        self.listen = listen or default_listen()
        self.capabilities = capabilities
        self.concurrency = concurrency
        self.redis: LocalRedis | None = None
        self.redis_url = redis_url or ""
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    @property
    def address(self) -> str:
        return self.listen

    @property
    def console_url(self) -> str:
        """Where the web console is (a task's page is ``{console_url}tasks/ID``)."""
        return f"http://{self.listen.rpartition(':')[0]}:{self.console_port}/"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_dir.chmod(0o700)  # logs name tasks and goals: this user's only
        if not self.redis_url:
            self.redis = LocalRedis(
                self.data_dir / "redis",
                appendfsync=self.redis_fsync,
                die_with_parent=True,
                password=self._redis_password(),
            )
            self.redis.start()
            self.redis_url = self.redis.url
        # The supervisor learns its workers' capabilities when they connect;
        # telling it up front lets plans be submitted before they have.
        # The Redis URL holds its password: in the environment, not on the
        # command line, where `ps` shows it to every user.
        self.supervisor = self._spawn(
            "supervisor",
            ["supervisor", "--listen", self.listen, "--console-port", str(self.console_port)],
            {"TASKLOOM_CAPABILITIES": self.capabilities, "TASKLOOM_REDIS_URL": self.redis_url},
        )
        wait_serving(self.listen, 30.0, self.supervisor)
        for i in range(1, self.n_workers + 1):
            self.workers.append(
                self._spawn(
                    f"worker-{i}",
                    [
                        "worker",
                        "--supervisor",
                        self.listen,
                        "--capabilities",
                        self.capabilities,
                        # 0: the worker's default, by what it runs.
                        "--concurrency",
                        str(self.concurrency),
                        "--name",
                        f"worker-{i}",
                        *(["--app", self.app] if self.app else []),
                    ],
                )
            )

    def _redis_password(self) -> str:
        """The password of the Redis this starts: made once, kept in the data
        folder (mode 0600), so a restarted cluster finds its data again."""
        path = self.data_dir / "redis-password"
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_dir.chmod(0o700)
        if path.exists():
            return path.read_text().strip()
        password = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        return password

    @property
    def safe_redis_url(self) -> str:
        """Where Redis is, without its password."""
        return re.sub(r"//([^@/]*):[^@/]*@", r"//\1:***@", self.redis_url)

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "taskloom.client", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=parent.die_with_parent(),
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                parent.PARENT_PID: str(os.getpid()),
                **({"TASKLOOM_LLM": self.llm} if self.llm else {}),
                **(env or {}),
            },
        )

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Every process of the cluster, Redis last."""
        found = [*self.workers, *([self.supervisor] if self.supervisor else [])]
        if self.redis is not None and self.redis.process is not None:
            found.append(self.redis.process)
        return found

    def exited(self) -> str:
        """Which of the supervisor and Redis has exited, with its status ('' if none)."""
        if self.supervisor is not None and self.supervisor.poll() is not None:
            return f"the supervisor exited with status {self.supervisor.returncode}"
        redis = self.redis.process if self.redis is not None else None
        if redis is not None and redis.poll() is not None:
            return f"Redis exited with status {redis.returncode}"
        return ""

    def stop(self, timeout: float = 40.0) -> None:
        """Workers first (they drain), then the supervisor, then Redis."""
        _terminate(self.workers, timeout)
        _terminate([self.supervisor] if self.supervisor else [], timeout)
        if self.redis is not None:
            self.redis.stop()
        for log in self._logs:
            log.close()

    def kill(self) -> None:
        """SIGKILL every process of the cluster now (a second Ctrl-C)."""
        for p in self.processes():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.processes():
            p.wait()


def _terminate(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
