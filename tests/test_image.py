"""The container image's contents, without a container engine: the Dockerfile
passes hadolint and pins what it builds from, the lock agrees with
pyproject.toml, and installing the way its build stage does (the locked
dependencies with their hashes, a wheel built by the locked hatchling, then
pip removed) gives a ``taskloom`` that runs a real supervisor and worker and
answers the image's HEALTHCHECK."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    # The base by digest; the base's own pip removed; a health check.
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.MULTILINE)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base)
    assert re.search(r"^RUN python -m pip uninstall --yes [^\n]*pip", final, re.MULTILINE)
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["taskloom", "health"\]', final, re.MULTILINE)
    # Every dependency with its hash, and taskloom built by a pinned hatchling.
    build = text.split("\nFROM ")[1]
    assert build.count("--require-hashes") == 2
    assert "-r requirements/server.txt" in build and "-r requirements/build.txt" in build


def locked(name: str) -> dict[str, str]:
    """Package → version in requirements/NAME.txt, every one with a hash."""
    text = (REPO / "requirements" / f"{name}.txt").read_text()
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=[a-z0-9])", text.split("\n", 2)[2]):
        first = block.split()[0]
        package, _, version = first.partition("==")
        assert version and "--hash=sha256:" in block, block[:200]
        pins[canonicalize_name(package)] = version
    return pins


def test_the_lock_holds_what_pyproject_asks_for_the_server() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["server"], *extras["otel"]]
    pins = locked("server")
    for line in wanted:
        requirement = Requirement(line)
        if requirement.name == "taskloom":
            continue
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in requirements/server.txt"
        assert requirement.specifier.contains(version), f"{line}: locked {version}"
    assert "hatchling" in locked("build")


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def test_an_install_like_the_image_runs_a_cluster(
    tmp_path: Path, redis_server: LocalRedis
) -> None:
    venv, builder = tmp_path / "image", tmp_path / "build"
    for each in (venv, builder):
        await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "venv", str(each)], check=True
        )
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    quiet = ["--quiet", "--disable-pip-version-check"]

    async def run(*args: str) -> None:
        done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    requirements = REPO / "requirements"
    await run(*pip, "install", *quiet, "--require-hashes", "--no-deps",
              "-r", str(requirements / "server.txt"))  # fmt: skip
    await run(str(builder / "bin" / "python"), "-m", "pip", "install", *quiet,
              "--require-hashes", "--no-deps", "-r", str(requirements / "build.txt"))  # fmt: skip
    await run(str(builder / "bin" / "python"), "-m", "hatchling", "build", "--target", "wheel",
              "--directory", str(tmp_path / "dist"))  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("taskloom-*.whl")
    await run(*pip, "install", *quiet, "--no-deps", str(wheel))
    # Nothing missing from the lock: pip's own check of what is installed.
    await run(*pip, "check")
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
    metrics = str(free_port())
    # Run from an empty directory: nothing may come from the source tree.
    supervisor = start(
        [taskloom, "supervisor", "--listen", address, "--redis-url", redis_server.url],
        tmp_path,
        {**common, "TASKLOOM_CAPABILITIES": "echo", "TASKLOOM_METRICS_PORT": metrics},
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
        # The image's HEALTHCHECK: the process answers on its metrics port, or not.
        for port, code in ((metrics, 0), (str(free_port()), 1)):
            health = await asyncio.to_thread(
                subprocess.run, [taskloom, "health"], capture_output=True, text=True,
                env={**env, "TASKLOOM_METRICS_PORT": port},
            )  # fmt: skip
            assert health.returncode == code, health.stdout + health.stderr
    finally:
        for process in (worker, supervisor):
            process.terminate()
        for process in (worker, supervisor):
            process.wait(timeout=30)
