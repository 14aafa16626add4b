"""The bench's CPU accounting: each process group counts its own processes,
and the load generator (this process) only itself, although every system
under test is its child."""

from __future__ import annotations

import subprocess
import sys

from bench.harness import Group, Meter

BURN = """
import sys, time
while time.process_time() < 0.5:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


def test_a_child_s_cpu_counts_for_its_group_and_not_for_the_load_generator() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as child:
        assert child.stdout is not None
        try:
            with Meter([Group("system", [child])]) as meter:
                assert child.stdout.readline() == b"burnt\n"
        finally:
            child.kill()
    assert meter.cpu["system"] >= 0.4
    assert meter.cpu["load generator"] < 0.25
