"""``python -m tests.chaos --runs 100 --seed 7``: random fault schedules, checked.

Each run draws 1-3 faults (``harness.FAULTS``; the partition only where
network namespaces can be made, the Redis primary's kill only where
``redis-sentinel`` is installed) at random times, runs the 200-subtask goal
through a fresh cluster, and checks I1-I4. One line per run, then a summary;
the exit status is 1 if any invariant was broken. Histories of failed runs
are kept under ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tests.chaos.harness import netns_unavailable, random_schedule, run
from tests.sentinel import MISSING, sentinel_binaries


async def main(runs: int, seed: int, keep: Path) -> int:
    rng = random.Random(seed)
    reason = netns_unavailable()
    if reason:
        print(f"partition faults skipped: {reason}", flush=True)
    sentinel = sentinel_binaries() is not None
    if not sentinel:
        print(f"replicated-Redis faults skipped: {MISSING}", flush=True)
    totals: Counter[str] = Counter()
    failed = 0
    for i in range(runs):
        schedule = random_schedule(rng, netns=reason is None, sentinel=sentinel)
        root = Path(tempfile.mkdtemp(prefix=f"taskloom-chaos-{seed}-{i}-"))
        result = await run(f"run {i + 1}/{runs}", root, schedule, seed=seed + i)
        print(result.line(), flush=True)
        for kind in {f.split("@")[0] for f in result.faults}:
            totals[f"fault {kind}"] += 1
        for name, found in result.verdict.violations.items():
            totals[f"{name} violated"] += bool(found)
        if result.verdict.ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            failed += 1
            target = keep / root.name
            shutil.move(root, target)
            print(f"  violations: {result.verdict.violations}\n  history: {target}", flush=True)
    print(f"\n{runs} runs, seed {seed}: {runs - failed} kept every invariant, {failed} did not")
    for key in sorted(totals):
        print(f"  {key}: {totals[key]}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=Path("chaos-failures"))
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    sys.exit(asyncio.run(main(args.runs, args.seed, args.keep)))
