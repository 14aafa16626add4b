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
    """Sleeps as many seconds as its instruction says: orchestration overhead
    is what a task takes beyond that."""
    await asyncio.sleep(float(ctx.instruction))
    return repr(time.time())
