"""``taskloom up`` never leaves its cluster behind, whichever way it ends:
Ctrl-C while its stderr is piped to a reader that Ctrl-C killed too, SIGTERM,
closing the terminal (SIGHUP), the stream it writes to going away, or being
killed outright (its children watch their parent). And its default address
is not lost for a minute to the connections of a cluster that just stopped."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskloom.client.local import default_port
from taskloom.core.localredis import free_port
from tests.conftest import REPO
from tests.fake_ollama import FakeOllama

GUARD = 90.0
"""Only so that a regression fails instead of hanging the suite."""


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for a parent to reap it."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"still not so after {GUARD:.0f}s: {what}")
        time.sleep(0.1)


def start_up(
    tmp_path: Path, fake_ollama: FakeOllama, said: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], set[int]]:
    """``up`` with one worker, its stderr piped to us; returns it once it has
    printed where its console is, with the pids of its cluster."""
    up = subprocess.Popen(
        [sys.executable, "-m", "taskloom.client", "up", "--workers", "1",
         "--listen", f"127.0.0.1:{free_port()}", "--console-port", str(free_port()),
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO,
        env={**os.environ, "OLLAMA_HOST": fake_ollama.url},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert up.stderr is not None
    seen = b""
    deadline = time.monotonic() + GUARD
    while b"console:" not in seen:
        line = up.stderr.readline()
        assert line and time.monotonic() < deadline, f"up did not start: {seen.decode()}"
        seen += line
    if said is not None:
        said.append(seen.decode())
    cluster = children_of(up.pid)
    assert len(cluster) == 3, cluster  # Redis, the supervisor, one worker
    worker_log = tmp_path / "data" / "logs" / "worker-1.log"
    wait_until(lambda: "connected to supervisor" in worker_log.read_text(), "the worker connected")
    return up, cluster


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def close_stderr(up: subprocess.Popen[bytes]) -> None:
    assert up.stderr is not None
    up.stderr.close()


@pytest.mark.parametrize(
    "how",
    [
        "ctrl-c with its stderr reader gone",
        "sigterm",
        "closing the terminal (sighup)",
        "its stderr reader going away",
        "being killed outright",
    ],
)
def test_up_stops_its_whole_cluster_whichever_way_it_ends(
    how: str, tmp_path: Path, fake_ollama: FakeOllama, cleanup: list[int]
) -> None:
    up, cluster = start_up(tmp_path, fake_ollama)
    cleanup += [up.pid, *cluster]
    if how == "ctrl-c with its stderr reader gone":
        # `taskloom up 2>&1 | tee log`, then Ctrl-C: tee dies with it.
        close_stderr(up)
        up.send_signal(signal.SIGINT)
    elif how == "sigterm":
        up.send_signal(signal.SIGTERM)
    elif how == "closing the terminal (sighup)":
        up.send_signal(signal.SIGHUP)
    elif how == "its stderr reader going away":
        close_stderr(up)
    else:
        up.send_signal(signal.SIGKILL)
    up.wait(GUARD)
    if up.stderr is not None and not up.stderr.closed:
        up.stderr.close()
    wait_until(lambda: not any(running(pid) for pid in cluster), f"{cluster} all stopped")
    if how != "being killed outright":
        assert up.returncode in (0, 130), up.returncode
        # Stopped in order: the worker drained, Redis flushed its AOF.
        log = (tmp_path / "data" / "logs" / "worker-1.log").read_text()
        assert "draining" in log, log
    else:
        # The children found themselves without a parent and stopped.
        log = (tmp_path / "data" / "logs" / "supervisor.log").read_text()
        assert "stopping" in log, log


def test_a_taskloom_process_stops_when_its_parent_is_gone_on_any_os(tmp_path: Path) -> None:
    # What stands in for the kernel's parent-death signal off Linux: the
    # child polls its parent (TASKLOOM_PARENT_PID).
    child = (
        "from taskloom.core.parent import watch_parent; import time; "
        "watch_parent(); time.sleep(600)"
    )
    middle = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time; "
         f"p = subprocess.Popen([sys.executable, '-c', {child!r}], "
         "env={**os.environ, 'TASKLOOM_PARENT_PID': str(os.getpid())}); "
         "print(p.pid, flush=True); time.sleep(600)"],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert middle.stdout is not None
    pid = int(middle.stdout.readline())
    try:
        assert running(pid)
        middle.kill()
        middle.wait()
        wait_until(lambda: not running(pid), f"{pid} stopped after its parent died")
    finally:
        middle.stdout.close()
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_default_port_is_free_while_a_stopped_clusters_connections_linger() -> None:
    # A server that closes its side first leaves the connection in TIME_WAIT
    # on its port for a minute; binding with SO_REUSEADDR, as the servers do,
    # still works, so `up` keeps its default address.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc's servers do
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first: TIME_WAIT on `port`
        client.close()
    with pytest.raises(OSError), socket.socket() as plain:
        plain.bind(("127.0.0.1", port))  # the probe as it was
    assert default_port(port) == port


def test_up_stops_the_rest_and_says_so_when_its_supervisor_dies(
    tmp_path: Path, fake_ollama: FakeOllama, cleanup: list[int]
) -> None:
    up, cluster = start_up(tmp_path, fake_ollama)
    cleanup += [up.pid, *cluster]
    commands = {pid: (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
                for pid in cluster}  # fmt: skip
    (supervisor,) = [pid for pid, argv in commands.items() if argv[3:4] == [b"supervisor"]]
    os.kill(supervisor, signal.SIGKILL)
    assert up.stderr is not None
    said = up.stderr.read().decode()
    up.wait(GUARD)
    up.stderr.close()
    wait_until(lambda: not any(running(pid) for pid in cluster), f"{cluster} all stopped")
    assert "the supervisor exited with status -9; see" in said, said
    assert up.returncode == 3


def test_the_redis_up_starts_wants_a_password_that_only_its_user_can_read(
    tmp_path: Path, fake_ollama: FakeOllama, cleanup: list[int]
) -> None:
    said: list[str] = []
    up, cluster = start_up(tmp_path, fake_ollama, said)
    cleanup += [up.pid, *cluster]
    try:
        data = tmp_path / "data"
        password = (data / "redis-password").read_text().strip()
        assert len(password) >= 24
        private = {p: p.stat().st_mode & 0o777 for p in (data, data / "redis", data / "logs")}
        assert set(private.values()) == {0o700}, private
        assert (data / "redis-password").stat().st_mode & 0o777 == 0o600
        assert all(p.stat().st_mode & 0o077 == 0 for p in (data / "redis").rglob("*"))
        # The password is printed nowhere and on no command line.
        printed = re.search(r"Redis at redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", said[0])
        assert printed is not None, said[0]
        port = int(printed[1])
        assert password not in said[0]
        for pid in cluster:
            assert password.encode() not in (Path("/proc") / str(pid) / "cmdline").read_bytes()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(64).startswith(b"-NOAUTH")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(GUARD)
        if up.stderr is not None:
            up.stderr.close()
