"""What a handler gets: the subtask, its inputs, a metered LLM, and ways to
report progress and stream output."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from taskloom.core.errors import TaskloomError
from taskloom.core.llm import LLM, ChatMessage, ChatReply, TextCallback
from taskloom.core.llm.base import WrappedLLM
from taskloom.core.metrics import InstrumentedLLM
from taskloom.core.model import Assignment, AttemptRef, ContextMode, Input, Usage
from taskloom.core.prices import PriceTable
from taskloom.core.ratelimits import RateLimiter

STREAM_INTERVAL = 0.1
"""Streamed output is sent at most this often per subtask (~10 messages/s)."""


class SubtaskError(TaskloomError):
    """Raise from a handler to fail the subtask with a message.

    ``retryable=False`` fails it for good; any other exception a handler
    raises is treated as retryable (up to the subtask's attempts).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ReplanRequested(SubtaskError):
    """Raised by ``SubtaskContext.replan``: the step is to be planned again."""


class SentBack(SubtaskError):
    """Raised by ``SubtaskContext.send_back``: a dependency is to run again."""

    def __init__(self, step: str, critique: str) -> None:
        super().__init__(critique)
        self.step = step


class BudgetExhausted(SubtaskError):
    """The task's budget (``max_tokens``, ``max_cost``) ran out in this
    attempt: the worker stops the generation and the task ends."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class MeteredLLM(WrappedLLM):
    """The worker's model, adding every call's usage to the subtask's, and
    holding every call to what the task's budget has left: the reply is
    capped there (``max_tokens``), and a streamed reply that passes it is
    stopped (for backends that do not honour the cap)."""

    def __init__(self, inner: LLM, context: SubtaskContext) -> None:
        super().__init__(inner)
        self._context = context

    def _room(self, prompt: int) -> int | None:
        """Output tokens the budget leaves after a prompt of ``prompt`` tokens
        (None: no limit); ``BudgetExhausted`` when it leaves none."""
        ctx, model = self._context, self.describe()
        rooms = []
        if ctx.assignment.budget_tokens:
            rooms.append(ctx.assignment.budget_tokens - ctx.usage.tokens - prompt)
        if ctx.assignment.budget_cost:
            price = ctx.prices.price(model)
            if price is None:
                raise SubtaskError(
                    f"{model} has no price, and this task has a max_cost: add the model "
                    "to the supervisor's TASKLOOM_PRICES_FILE",
                    retryable=False,
                )
            left = ctx.assignment.budget_cost - ctx.usage.cost - prompt * price.input / 1e6
            if price.output > 0:
                rooms.append(math.floor(left * 1e6 / price.output))
            elif left <= 0:
                rooms.append(0)
        if not rooms:
            return None
        room = min(rooms)
        if room < 1:
            raise BudgetExhausted(
                f"BUDGET_EXCEEDED: no room left for another LLM call (a prompt of about "
                f"{prompt} tokens)"
            )
        return room

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        schema: Mapping[str, Any] | None = None,
        temperature: float = 0.0,
        on_text: TextCallback | None = None,
        max_tokens: int = 0,
        context_tokens: int = 0,
    ) -> ChatReply:
        started = time.monotonic()
        model, limiter = self.describe(), self._context.limiter
        budgeted = bool(
            self._context.assignment.budget_tokens or self._context.assignment.budget_cost
        )
        limited = limiter is not None and limiter.limited(model)
        # Counted once, and only where a budget or a rate limit needs it (or
        # a call is stopped midway, below).
        prompt = sum(self.count_tokens(m.content) for m in messages) if budgeted or limited else -1
        room = self._room(prompt) if budgeted else None
        cap = max_tokens if room is None else min(max_tokens or room, room)
        # The cap stops a backend that honours it; a streamed reply from one
        # that does not is stopped here, by the tokens counted so far (an
        # estimate unless the backend has the tokenizer: hence the slack).
        stop_at = None if room is None else room * 3 // 2 + 16
        parts: list[str] = []
        chars = 0

        async def metered_text(piece: str) -> None:
            nonlocal chars
            parts.append(piece)
            chars += len(piece)
            # No token is shorter than a character: counting starts past that.
            if stop_at is not None and chars > stop_at:
                counted = self.count_tokens("".join(parts))
                if counted > stop_at:
                    raise BudgetExhausted(
                        f"BUDGET_EXCEEDED: its reply was stopped after about {counted} tokens"
                    )
            await on_text(piece)  # type: ignore[misc]  # only passed on with on_text

        async def make() -> ChatReply:
            return await self.inner.chat(
                messages,
                schema=schema,
                temperature=temperature,
                on_text=metered_text if on_text is not None else None,
                max_tokens=cap,
                context_tokens=context_tokens,
            )

        try:
            if limiter is None:
                reply = await make()
            else:
                # Its waits are the subtask's progress (so it is not stalled).
                tokens = prompt if limited else 0
                reply = await limiter.call(model, tokens, make, self._context.progress)
        except (asyncio.CancelledError, BudgetExhausted):
            # Stopped mid-call: the tokens sent and streamed were spent, as
            # far as they can be counted here.
            self._context.usage += self._charge(
                Usage(
                    input_tokens=prompt
                    if prompt >= 0
                    else sum(self.count_tokens(m.content) for m in messages),
                    output_tokens=self.count_tokens("".join(parts)) if parts else 0,
                    model=model,
                    seconds=time.monotonic() - started,
                    calls=1,
                )
            )
            raise
        except BaseException:
            # A call that failed still took time.
            self._context.usage += Usage(model=model, seconds=time.monotonic() - started, calls=1)
            raise
        self._context.usage += reply.usage
        if room is not None and cap == room and reply.usage.output_tokens >= room:
            raise BudgetExhausted(
                f"BUDGET_EXCEEDED: its reply was stopped after {reply.usage.output_tokens} tokens"
            )
        return reply

    def _charge(self, usage: Usage) -> Usage:
        inner = self.inner
        if isinstance(inner, InstrumentedLLM):
            return inner.charge(usage)
        return self._context.prices.costed(usage)

    async def close(self) -> None:
        """The worker's model outlives the subtask: nothing to close here."""


@dataclass(slots=True)
class SubtaskContext:
    """One attempt of one subtask, as its handler sees it."""

    assignment: Assignment
    model: LLM
    """The worker's model, unmetered; handlers use ``llm``."""
    logger: logging.Logger
    _report: Callable[[str, str], Awaitable[None]]
    usage: Usage = field(default_factory=Usage)
    """What the subtask's LLM calls cost so far; every call through ``llm`` adds to it."""
    prices: PriceTable = field(default_factory=PriceTable)
    """What the worker prices LLM calls with (the supervisor's table)."""
    limiter: RateLimiter | None = None
    """Keeps LLM calls to the shared rate limits and waits out a provider's 429."""
    _pending: list[str] = field(default_factory=list)
    _last_stream: float = 0.0
    _llm: MeteredLLM | None = None
    _lease: Callable[[], bool] = lambda: True

    @property
    def lease_valid(self) -> bool:
        """Whether this attempt still holds its lease, as far as the worker
        can tell: the supervisor has been heard within the lease TTL. When it
        has not, the supervisor gives the attempt to another worker, and the
        worker cancels this handler. A handler about to do something that must
        not happen twice (send a mail, charge a card) asks first."""
        return self._lease()

    def replan(self, reason: str) -> NoReturn:
        """Ask the planner to replace this step, with ``reason`` (what was
        surprising: the data is not what the plan assumed, the step cannot be
        done as asked). The attempt ends here; the planner revises the step
        with the finished steps' outputs in view, and the steps that needed
        this one wait for the replacement. Granted whatever the task's
        ``on_failure``, while the task has replans left (``TASKLOOM_MAX_REPLANS``);
        after that the step fails as the task's ``on_failure`` says."""
        raise ReplanRequested(reason.strip() or "the handler asked for a replan")

    def send_back(self, step: str, critique: str) -> NoReturn:
        """Send ``step``, one of this subtask's inputs, back for another attempt
        with ``critique`` added to its instruction (with its previous answer);
        this subtask runs again once it is done. Once per subtask: its next
        attempt has ``params["reviewed"] == "1"``, and a second send-back is
        committed as a failure."""
        if step not in {i.subtask_id for i in self.inputs}:
            raise SubtaskError(f"cannot send back {step!r}: it is not one of this step's inputs")
        raise SentBack(step, critique.strip() or "the reviewer asked for another attempt")

    @property
    def llm(self) -> LLM:
        """The model the worker is configured with (``TASKLOOM_LLM``), metered:
        each call's tokens and time count towards the subtask and its task."""
        if self._llm is None:
            self._llm = MeteredLLM(self.model, self)
        return self._llm

    @property
    def ref(self) -> AttemptRef:
        return self.assignment.ref

    @property
    def task_id(self) -> str:
        return self.assignment.task_id

    @property
    def subtask_id(self) -> str:
        return self.assignment.subtask_id

    @property
    def attempt(self) -> int:
        return self.assignment.attempt

    @property
    def title(self) -> str:
        return self.assignment.title

    @property
    def instruction(self) -> str:
        return self.assignment.instruction

    @property
    def goal(self) -> str:
        return self.assignment.goal

    @property
    def inputs(self) -> tuple[Input, ...]:
        """Outputs of the subtask's direct dependencies, in the order it lists them."""
        return self.assignment.inputs

    @property
    def params(self) -> Mapping[str, str]:
        return self.assignment.params

    @property
    def context_tokens(self) -> int:
        """The task's context budget for one llm call; 0: the model's."""
        return self.assignment.context_tokens

    @property
    def context_mode(self) -> ContextMode:
        return self.assignment.context

    async def progress(self, message: str) -> None:
        """Report progress; it appears in the task's events."""
        await self._report(message, "")

    async def stream(self, text: str) -> None:
        """Stream output as it is produced (``subtask.output`` events). Pieces are
        coalesced: at most one message per ``STREAM_INTERVAL``."""
        self._pending.append(text)
        if time.monotonic() - self._last_stream >= STREAM_INTERVAL:
            await self.flush()

    async def flush(self) -> None:
        """Send what ``stream`` holds back (the worker calls it when the handler ends)."""
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self._last_stream = time.monotonic()
            await self._report("", text)
