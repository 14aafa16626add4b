"""The wheel carries every taskloom.* package as one PEP 420 namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

from tests.conftest import REPO


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
