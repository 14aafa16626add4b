"""Handlers that worker processes in the tests load with ``--app tests.handlers:registry``.

They talk to the test through files in ``TASKLOOM_TEST_DIR``: a ``gate``
subtask runs until the file ``open-<subtask>`` appears, and handlers leave
``started-``, ``finished-``, ``cancelled-`` and ``attempt-`` marks the test can poll for.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from taskloom.worker import HandlerRegistry, SubtaskContext, SubtaskError

registry = HandlerRegistry()


def _dir() -> Path:
    return Path(os.environ["TASKLOOM_TEST_DIR"])


def _mark(name: str, content: str = "") -> None:
    (_dir() / name).write_text(content)


@registry.handler("gate")
async def gate(ctx: SubtaskContext) -> str:
    """Runs until the test opens its gate; returns its instruction and its inputs."""
    _mark(f"started-{ctx.subtask_id}-{ctx.attempt}", os.environ.get("TASKLOOM_NAME", ""))
    try:
        while not (_dir() / f"open-{ctx.subtask_id}").exists():
            await asyncio.sleep(0.02)
    except asyncio.CancelledError:
        _mark(f"cancelled-{ctx.subtask_id}-{ctx.attempt}")
        raise
    _mark(f"finished-{ctx.subtask_id}-{ctx.attempt}")
    inputs = ",".join(i.output for i in ctx.inputs)
    return f"{ctx.instruction}[{inputs}]" if inputs else ctx.instruction


@registry.handler("flaky")
async def flaky(ctx: SubtaskContext) -> str:
    """Fails (retryably) on attempts before the one its instruction names."""
    _mark(f"attempt-{ctx.subtask_id}-{ctx.attempt}")
    if ctx.attempt < int(ctx.instruction):
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    return f"ok on attempt {ctx.attempt}"


@registry.handler("doubt")
async def doubt(ctx: SubtaskContext) -> str:
    """Asks for its step to be planned again, its instruction the reason."""
    ctx.replan(ctx.instruction)


@registry.handler("broken")
async def broken(ctx: SubtaskContext) -> str:
    """Fails for good."""
    raise SubtaskError(f"cannot do {ctx.instruction!r}", retryable=False)


@registry.handler("stall")
async def stall(ctx: SubtaskContext) -> str:
    """Hangs without a word on its first attempt; answers on later ones."""
    _mark(f"attempt-{ctx.subtask_id}-{ctx.attempt}")
    if ctx.attempt == 1:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            _mark(f"cancelled-{ctx.subtask_id}-{ctx.attempt}")
            raise
    return f"answered on attempt {ctx.attempt}"


@registry.handler("pulse")
async def pulse(ctx: SubtaskContext) -> str:
    """Works for as many seconds as its instruction says, reporting progress all along."""
    loop = asyncio.get_running_loop()
    end = loop.time() + float(ctx.instruction)
    while loop.time() < end:
        await ctx.progress(f"{end - loop.time():.1f}s to go")
        await asyncio.sleep(0.1)
    return f"pulsed on attempt {ctx.attempt}"


@registry.handler("picky")
async def picky(ctx: SubtaskContext) -> str:
    """Fails for good if its instruction says "fail"; else returns it and its inputs."""
    _mark(f"attempt-{ctx.subtask_id}-{ctx.attempt}", ctx.instruction)
    if "fail" in ctx.instruction:
        raise SubtaskError(f"refused: {ctx.instruction}", retryable=False)
    inputs = ",".join(i.output for i in ctx.inputs)
    return f"{ctx.instruction}[{inputs}]" if inputs else ctx.instruction


@registry.handler("ledger")
async def ledger(ctx: SubtaskContext) -> str:
    """Works for as many seconds as its instruction says, writing to the file
    ``ledger`` one line when an attempt starts and one when it ends (however
    it ends), with the time: so a test can tell whether two ever overlapped."""
    path = _dir() / "ledger"
    who = os.environ.get("TASKLOOM_NAME", "")

    def write(what: str) -> None:
        with path.open("a") as f:
            f.write(f"{what} {ctx.subtask_id} {ctx.attempt} {time.time():.6f} {who}\n")

    write("start")
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + float(ctx.instruction)
        while loop.time() < end:
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        write("stop")
        raise
    write("end")
    return f"worked on attempt {ctx.attempt}, lease valid: {ctx.lease_valid}"


@registry.handler("count", cacheable="shared")
async def count(ctx: SubtaskContext) -> str:
    """The number of words of its instruction, and which worker counted them:
    a pure function of public input, so its outputs are shared across owners."""
    return f"{len(ctx.instruction.split())} words, counted by {os.environ.get('TASKLOOM_NAME', '')}"
