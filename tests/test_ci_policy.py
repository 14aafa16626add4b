"""In CI every test runs: a skip is a failure there (``TASKLOOM_REQUIRE_ALL=1``,
set by ``.ci/run``), while a developer's machine may still skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SKIPPING = """
import pytest

def test_needs_a_tool():
    pytest.skip("no such tool here")
"""


@pytest.mark.parametrize(("require_all", "outcome"), [("1", "1 failed"), ("", "1 skipped")])
def test_a_skip_fails_only_where_every_test_must_run(
    tmp_path: Path, require_all: str, outcome: str
) -> None:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_makereport  # noqa: F401\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "TASKLOOM_REQUIRE_ALL": require_all, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert outcome in result.stdout, result.stdout + result.stderr
    if require_all:
        assert "no such tool here" in result.stdout


def test_ci_sets_it() -> None:
    assert "export TASKLOOM_REQUIRE_ALL=1" in (REPO / ".ci" / "run").read_text()
