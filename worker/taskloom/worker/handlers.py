"""The handler registry and the built-in handlers ``echo`` and ``llm``.

A handler is an async function of a ``SubtaskContext`` that returns the
subtask's output: a string, or anything JSON can encode.

    registry = HandlerRegistry()

    @registry.handler("summarize")
    async def summarize(ctx: SubtaskContext) -> str:
        ...
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from taskloom.core.errors import LLMError, LLMUnavailable
from taskloom.core.llm import ChatMessage
from taskloom.worker.context import SubtaskContext, SubtaskError

Handler = Callable[[SubtaskContext], Awaitable[object]]

LLM_SYSTEM_PROMPT = (
    "You are one member of a team working towards a larger goal. Carry out only the step "
    "you are given, thoroughly and concisely, and use the results of earlier steps where "
    "they help. Reply with the result itself, without preamble."
)
TRUNCATED = "\n[… truncated to fit the context budget]"


class HandlerRegistry:
    """Capability name → handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: register ``fn`` as the handler for capability ``name``."""

        def register(fn: Handler) -> Handler:
            self._handlers[name] = fn
            return fn

        return register

    def add(self, name: str, fn: Handler) -> None:
        self._handlers[name] = fn

    def update(self, other: HandlerRegistry) -> None:
        self._handlers.update(other._handlers)

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._handlers))


async def echo(ctx: SubtaskContext) -> str:
    """Returns the instruction unchanged: for tests and benchmarks."""
    return ctx.instruction


def llm_handler(*, max_context_chars: int, progress_interval: float) -> Handler:
    """The built-in ``llm`` handler: the instruction, the goal and the inputs to the model."""

    async def run(ctx: SubtaskContext) -> str:
        generated = 0
        last_report = time.monotonic()

        async def on_text(text: str) -> None:
            nonlocal generated, last_report
            generated += len(text)
            now = time.monotonic()
            if now - last_report >= progress_interval:
                last_report = now
                await ctx.progress(f"{generated} characters generated")

        messages = [
            ChatMessage("system", LLM_SYSTEM_PROMPT),
            ChatMessage("user", build_prompt(ctx, max_context_chars)),
        ]
        temperature = float(ctx.params.get("temperature", "0") or 0)
        try:
            reply = await ctx.llm.chat(messages, temperature=temperature, on_text=on_text)
        except LLMUnavailable as e:
            raise SubtaskError(str(e), retryable=True) from None
        except LLMError as e:
            raise SubtaskError(str(e), retryable=False) from None
        ctx.usage = reply.usage
        return reply.text

    return run


def build_prompt(ctx: SubtaskContext, budget: int) -> str:
    """The user message for an llm subtask; dependency outputs share ``budget`` characters."""
    parts = [f"Overall goal:\n{ctx.goal}"]
    if ctx.inputs:
        share = budget // len(ctx.inputs)
        parts.append("Results of earlier steps:")
        for item in ctx.inputs:
            output = item.output
            if len(output) > share:
                output = output[: max(0, share - len(TRUNCATED))] + TRUNCATED
            parts.append(f"### {item.title or item.subtask_id} ({item.subtask_id})\n{output}")
    parts.append(f"Your step: {ctx.title}\n{ctx.instruction}" if ctx.title else ctx.instruction)
    return "\n\n".join(parts)
