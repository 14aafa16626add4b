"""The benchmark is not a test, but it must not rot: one quick run of every
scenario at a tiny N, for taskloom and Celery (Ray is too heavy to install
for CI; `pip install -e '.[bench]'` and `python -m bench run` cover it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_a_quick_run_measures_every_scenario(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--quick", "--repeat", "1",
         "--systems", "taskloom,celery", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    document = json.loads((tmp_path / "latest.json").read_text())
    rows = document["results"]
    scenarios = {(r["system"], r["scenario"].split(":")[0].split(" (")[0]) for r in rows}
    for system in ("taskloom", "celery"):
        for kind in ("no-op x200, pre-filled", "no-op x200, streaming", "scaling",
                     "makespan", "dispatch latency idle", "overhead on a 0.2 s task",
                     "open-loop sustained peak",
                     "dispatch latency open-loop 80% of peak"):  # fmt: skip
            assert (system, kind) in scenarios, (system, kind)
    assert ("taskloom", "memory per 10k live subtasks") in scenarios
    one_each = [r for r in rows if "one task each" in r["scenario"]]
    assert [r["system"] for r in one_each] == ["taskloom", "taskloom"]
    assert any(r["scenario"].endswith("idle workers connected") for r in rows)
    # The idle workers' baseline brackets them: one run before, one after.
    assert [r["runs"] for r in rows if "idle workers" in r["scenario"]] == [2, 2]
    assert all(r["median"] > 0 for r in rows)
    assert set(document["reference"]) >= {
        "grpc.aio stream echo, 1 per message",
        "redis-py SET, pipelined 100",
        "floor: Redis SET, then one grpc.aio message, back to back: p50 (ms)",
        "floor: Redis SET, then one grpc.aio message, one every 10 ms: p99 (ms)",
    }
    assert all(v > 0 for v in document["reference"].values())
    assert "| scenario | system |" in (tmp_path / "latest.md").read_text()


def test_a_quick_client_side_run_gives_every_figure_and_the_loads(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "client", "--quick", "--systems", "taskloom,celery",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    document = json.loads((tmp_path / "client.json").read_text())
    rows = {r["scenario"]: r for r in document["rows"]}
    assert set(rows) == {
        "100 tasks, submit + wait, 64 coroutines",
        "100 tasks, submit_many + results",
        "one task at rest, submit -> result, p50",
        "one task at rest, submit -> result, p99",
        "chain of 10, makespan",
    }
    for row in rows.values():
        for system in ("taskloom", "celery"):
            assert row[system]["median"] > 0, (row, system)
    assert len(document["load_average_before_rounds"]) == 1
    assert "| scenario | taskloom | celery |" in (tmp_path / "client.md").read_text()
