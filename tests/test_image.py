"""The container image's contents, without a container engine: the Dockerfile
passes hadolint, and installing the way its build stage does (``pip install``
of the sources into a fresh virtualenv, then pip removed) gives a ``taskloom``
that runs a real supervisor and worker."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from taskloom.client import TaskloomClient
from taskloom.client.local import wait_serving
from taskloom.core.localredis import LocalRedis, free_port
from taskloom.core.model import TaskStatus
from tests.conftest import REPO
from tests.helpers import plan, wait_status

DOCKERFILE = REPO / "Dockerfile"


def test_the_dockerfile_passes_hadolint_and_keeps_to_its_promises() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    linted = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, re.MULTILINE)
    assert len(stages) == 2 and stages[0][1] == "build"
    final = text.split("\nFROM ")[-1]
    assert re.search(r"^USER 10001", final, re.MULTILINE)
    assert 'ENTRYPOINT ["taskloom"]' in final
    assert "COPY --from=build /opt/taskloom /opt/taskloom" in final
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final)
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.MULTILINE)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base)


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def test_an_install_like_the_image_runs_a_cluster(
    tmp_path: Path, redis_server: LocalRedis
) -> None:
    venv = tmp_path / "image"
    await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    installed = await asyncio.to_thread(
        subprocess.run,
        [*pip, "install", "--quiet", "--disable-pip-version-check", str(REPO)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    await asyncio.to_thread(
        subprocess.run, [*pip, "uninstall", "--yes", "--quiet", "pip"], check=True
    )
    taskloom = str(venv / "bin" / "taskloom")
    # Only what runs: no test or build tools came along.
    assert not (venv / "bin" / "pytest").exists()
    assert not (venv / "bin" / "pip").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKLOOM_", "PYTHONPATH"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    version = await asyncio.to_thread(
        subprocess.run, [taskloom, "--version"], capture_output=True, text=True, env=env
    )
    assert version.returncode == 0 and "version" in version.stdout

    address = f"127.0.0.1:{free_port()}"
    prefix = f"image-{free_port()}:"
    common = {**env, "TASKLOOM_REDIS_PREFIX": prefix, "TASKLOOM_LOG_FORMAT": "json"}
    # Run from an empty directory: nothing may come from the source tree.
    supervisor = start(
        [taskloom, "supervisor", "--listen", address, "--redis-url", redis_server.url],
        tmp_path,
        {**common, "TASKLOOM_CAPABILITIES": "echo"},
    )
    worker = start(
        [taskloom, "worker", "--supervisor", address, "--capabilities", "echo"], tmp_path, common
    )
    try:
        await asyncio.to_thread(wait_serving, address, 30.0, supervisor)
        async with TaskloomClient(address) as client:
            task_id = await client.submit("from the image", plan=plan(("a", "echo", "hello")))
            task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
        assert task.status == TaskStatus.SUCCEEDED
        assert task.result == "hello"
    finally:
        for process in (worker, supervisor):
            process.terminate()
        for process in (worker, supervisor):
            process.wait(timeout=30)
