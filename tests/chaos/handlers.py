"""The chaos suite's handler: worker processes load it with
``--app tests.chaos.handlers:registry``.

Each attempt writes what it did to the worker's own history file in
``TASKLOOM_CHAOS_DIR`` (JSON lines, appended and flushed as it happens, so a
SIGKILL loses at most the line being written): ``run`` when it starts,
``result`` with its output just before returning it. The output names the
attempt and the worker, so the checker can tell which attempt's result was
committed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from taskloom.worker import HandlerRegistry, SubtaskContext

registry = HandlerRegistry()
_WORKER = os.environ.get("TASKLOOM_NAME", f"pid{os.getpid()}")
_FILE: Any = None


def _record(kind: str, ctx: SubtaskContext, **extra: Any) -> None:
    global _FILE
    if _FILE is None:
        path = Path(os.environ["TASKLOOM_CHAOS_DIR"]) / f"worker-{_WORKER}-{os.getpid()}.jsonl"
        _FILE = path.open("a", buffering=1)
    line = {
        "source": "worker",
        "kind": kind,
        "time": time.time(),
        "worker": _WORKER,
        "task": ctx.task_id,
        "sub": ctx.subtask_id,
        "attempt": ctx.attempt,
        **extra,
    }
    _FILE.write(json.dumps(line) + "\n")


@registry.handler("chaos")
async def chaos(ctx: SubtaskContext) -> str:
    """Works for 0.1-0.8 s (seeded by subtask and attempt), reporting progress."""
    _record("run", ctx)
    rng = random.Random(f"{ctx.subtask_id}/{ctx.attempt}")
    for _ in range(4):
        await asyncio.sleep(rng.uniform(0.025, 0.2))
        await ctx.progress("working")
    output = f"{ctx.subtask_id}#{ctx.attempt}@{_WORKER}"
    _record("result", ctx, output=output)
    return output
