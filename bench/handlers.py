"""The no-op task body every system runs: it returns the time it started,
so dispatch latency can be read from the result. For taskloom workers:
``taskloom worker --app bench.handlers:registry --capabilities noop``."""

from __future__ import annotations

import asyncio
import time

from taskloom.worker import HandlerRegistry, SubtaskContext

registry = HandlerRegistry()


@registry.handler("noop")
async def noop(ctx: SubtaskContext) -> str:
    return repr(time.time())


@registry.handler("sleep")
async def sleep(ctx: SubtaskContext) -> str:
    """Sleeps as many seconds as its instruction says; returns how long it
    took, as the body sees it: orchestration overhead is what the task takes
    beyond that (asyncio's timers alone oversleep by about a millisecond)."""
    start = time.perf_counter()
    await asyncio.sleep(float(ctx.instruction))
    return repr(time.perf_counter() - start)
