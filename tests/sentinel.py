"""A replicated Redis on loopback ports: a primary, two replicas and three
sentinels (Debian's ``redis-server`` and ``redis-sentinel``, which ``make
test`` installs where missing), for the Sentinel tests and the chaos fault
that kills the primary.

Two replicas, so that one is left to acknowledge writes (``WAIT``) after the
other is promoted. Sentinel is tuned to act fast (a primary silent for 1 s is down; two of the
three sentinels must agree), so that a failover takes a few seconds. An election that splits
the votes is tried again after twice ``failover-timeout``: 4 s here (Sentinel's default is
6 minutes), which a slow CI machine did hit with 5 s.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from taskloom.core.localredis import free_port

MASTER = "taskloom"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 2000
FAILOVER_BOUND = 30.0
"""How long a failover may take here, at worst: detection, two split
elections, promotion. What a client given this grace must live through."""
GUARD = 60.0
"""Only so that a broken setup fails instead of hanging."""


def sentinel_binaries() -> tuple[str, str] | None:
    server, sentinel = shutil.which("redis-server"), shutil.which("redis-sentinel")
    return (server, sentinel) if server and sentinel else None


MISSING = (
    "needs redis-server and redis-sentinel (Debian: apt-get install redis-server redis-sentinel)"
)


class ReplicatedRedis:
    """A primary, two replicas and three sentinels; ``url`` is the Sentinel URL."""

    def __init__(self, data_dir: Path) -> None:
        binaries = sentinel_binaries()
        assert binaries is not None, MISSING
        self.server, self.sentinel = binaries
        self.data_dir = data_dir
        self.ports = {"a": free_port(), "b": free_port(), "c": free_port()}
        """The data nodes; ``a`` starts as the primary."""
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}"

    def start(self) -> None:
        self.start_node("a")
        self.start_node("b", replica_of=self.ports["a"])
        self.start_node("c", replica_of=self.ports["a"])
        for i, port in enumerate(self.sentinel_ports):
            folder = self.data_dir / f"sentinel-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"logfile {folder / 'sentinel.log'}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.ports['a']} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self.sentinels.append(self._spawn([self.sentinel, str(conf)]))
        self.wait_until(self._settled, "the sentinels know each other and the replica")

    def start_node(self, name: str, *, replica_of: int = 0) -> None:
        folder = self.data_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        args = [
            self.server,
            "--port", str(self.ports[name]), "--bind", "127.0.0.1",
            "--dir", str(folder), "--logfile", str(folder / "redis.log"),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            # A replica that cannot resync in part (after a failover, one that
            # had more of the log than the promoted one) starts a full sync at
            # once, not after Redis 7's 5 s wait for more replicas to join it.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if replica_of:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.nodes[name] = self._spawn(args)
        self.wait_until(lambda: self._answers(self.ports[name]), f"node {name} answers")

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _answers(self, port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def ask(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], decode_responses=True, socket_timeout=2)

    def primary(self) -> str:
        """The node the sentinels name as primary now (``a`` or ``b``)."""
        with self.ask() as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(MASTER)
        return next(name for name, p in self.ports.items() if p == int(port))

    def _settled(self) -> bool:
        for i in range(3):
            try:
                with self.ask(i) as sentinel:
                    state = sentinel.sentinel_master(MASTER)
                    replicas = sentinel.sentinel_slaves(MASTER)
            except redis.RedisError:
                return False
            linked = [r for r in replicas if "s_down" not in r["flags"]
                      and r["master-link-status"] == "ok"]  # fmt: skip
            if int(state["num-other-sentinels"]) < 2 or len(linked) < 2:
                return False
        return True

    def kill_primary(self) -> str:
        """SIGKILL the primary; returns its name."""
        name = self.primary()
        self.nodes[name].send_signal(signal.SIGKILL)
        self.nodes[name].wait()
        return name

    def wait_promoted(self, other_than: str) -> str:
        """Wait until Sentinel names a primary other than ``other_than``, it
        takes writes and the other replica follows it; returns its name."""

        def promoted() -> bool:
            try:
                name = self.primary()
                if name == other_than:
                    return False
                with redis.Redis(port=self.ports[name], socket_timeout=2) as node:
                    role = node.execute_command("ROLE")
                # ROLE on a primary: "master", its offset, its replicas.
                return role[0] in (b"master", "master") and len(role[2]) >= 1
            except (redis.RedisError, StopIteration):
                return False

        self.wait_until(promoted, "Sentinel promotes the replica")
        return self.primary()

    def restart_as_replica(self, name: str) -> None:
        """Start a node that was killed again: Sentinel makes it a replica of the new primary."""
        self.start_node(name)

    def wait_until(self, check: object, what: str, timeout: float = GUARD) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"not so after {timeout:.0f}s: {what}")
            time.sleep(0.1)

    def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes.values()]:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()
