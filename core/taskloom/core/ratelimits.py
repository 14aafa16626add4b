"""Providers' rate limits, shared by every process that calls the model.

``TASKLOOM_RATE_LIMITS`` names requests and tokens per minute for models or
providers: ``openai:*=500/30000, ollama:llama3.2=60`` (``PATTERN=RPM[/TPM]``;
the longest matching pattern wins after an exact name). Each pattern is one
bucket in Redis, a token bucket in a script: every worker and the planner take
from the same one, so a fleet stays under the provider's limit together. A
bucket holds ten seconds' worth (a sixth of a minute's, at least one request),
so a burst cannot take a whole minute's allowance at once.

A call first takes one request and its prompt's tokens, waiting (not failing)
until the bucket has them; its reply's tokens are taken after it (the bucket
may go below zero, and the next callers wait). A provider's 429 pauses the
whole bucket for as long as it asked (``Retry-After``), or with an exponential
backoff when it did not say, and the call is made again.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskloom.core.errors import ConfigError, RateLimited
from taskloom.core.llm.base import LLM, ChatMessage, ChatReply, TextCallback, WrappedLLM
from taskloom.core.metrics import LLMMetrics
from taskloom.core.prices import entry_for, patterns_of

logger = logging.getLogger(__name__)

BURST_SECONDS = 10.0
"""A bucket holds this much of its rate."""
MAX_PAUSE = 120.0
"""The longest a 429 pauses a bucket, whatever the provider asked."""
RETRIES_ON_429 = 6
"""Calls made again after a 429 before the call fails (retryably)."""


@dataclass(frozen=True, slots=True)
class Limit:
    """Per minute; 0: no limit on that."""

    requests: int
    tokens: int = 0


_SPEC_RE = re.compile(r"^\s*([^=\s]+)\s*=\s*(\d+)\s*(?:/\s*(\d+)\s*)?$")


def parse_limits(value: str) -> dict[str, Limit]:
    """``"openai:*=500/30000, ollama:llama3.2=60"`` → limits by pattern."""
    limits = {}
    for part in value.split(","):
        if not part.strip():
            continue
        m = _SPEC_RE.match(part)
        if m is None:
            raise ConfigError(
                f"TASKLOOM_RATE_LIMITS: {part.strip()!r} is not MODEL=RPM[/TPM] "
                "(e.g. openai:*=500/30000)"
            )
        limits[m.group(1)] = Limit(int(m.group(2)), int(m.group(3) or 0))
    return limits


class LimitTable:
    """Model → (its bucket, the limit): an exact name first, else the longest pattern."""

    def __init__(self, limits: Mapping[str, Limit] | None = None) -> None:
        self.limits = dict(limits or {})
        self._patterns = patterns_of(self.limits)

    def find(self, model: str) -> tuple[str, Limit] | None:
        key = entry_for(model, self.limits, self._patterns)
        return None if key is None else (key, self.limits[key])


Acquire = Callable[[str, Limit, int, int, float], Awaitable[float]]
"""``(bucket, limit, requests, tokens, pause)`` → seconds to wait (0: taken).
With ``requests`` 0 the tokens are taken whatever the bucket holds; with
``pause`` the bucket refuses everyone for that long."""
WaitCallback = Callable[[str], Awaitable[None]]


class RateLimiter:
    """Takes from the shared buckets before and after each call (``acquire``:
    a script in Redis, or the supervisor's ``Acquire`` for a worker)."""

    def __init__(
        self, table: LimitTable, acquire: Acquire, metrics: LLMMetrics | None = None
    ) -> None:
        self.table = table
        self._acquire = acquire
        self._metrics = metrics
        """``LLMMetrics``: waits and seconds waited, by model and reason."""

    def limited(self, model: str) -> bool:
        return self.table.find(model) is not None

    async def turn(self, model: str, tokens: int, on_wait: WaitCallback | None = None) -> None:
        """Wait until ``model``'s bucket has a request and ``tokens`` for it."""
        found = self.table.find(model)
        if found is None:
            return
        bucket, limit = found
        while True:
            wait = await self._acquire(bucket, limit, 1, tokens, 0.0)
            if wait <= 0:
                return
            message = f"waiting {wait:.1f}s for the rate limit of {bucket}"
            await self._waited(model, "limit", wait, on_wait, message)

    async def spent(self, model: str, tokens: int) -> None:
        """A reply's tokens, taken from the bucket after the call."""
        found = self.table.find(model)
        if found is not None and tokens > 0:
            await self._acquire(found[0], found[1], 0, tokens, 0.0)

    async def refused(
        self, model: str, error: RateLimited, attempt: int, on_wait: WaitCallback | None
    ) -> None:
        """A 429: pause the model's bucket (if it has one) as the provider
        asked, or back off exponentially, and wait that long here."""
        wait = error.retry_after if error.retry_after is not None else min(2.0**attempt, 60.0)
        wait = min(max(wait, 0.1), MAX_PAUSE)
        found = self.table.find(model)
        if found is not None:
            wait = max(wait, await self._acquire(found[0], found[1], 0, 0, wait))
        how = "as it asked" if error.retry_after is not None else "(backing off)"
        message = f"{model} refused the call for its rate limit; waiting {wait:.1f}s {how}"
        await self._waited(model, "provider", wait, on_wait, message)

    async def _waited(
        self, model: str, reason: str, wait: float, on_wait: WaitCallback | None, message: str
    ) -> None:
        if self._metrics is not None:
            self._metrics.rate_waits.labels(model, reason).inc()
            self._metrics.rate_wait_seconds.labels(model).inc(wait)
        if on_wait is not None:
            await on_wait(message)
        else:
            logger.info("%s", message)
        await asyncio.sleep(wait)

    async def call(
        self,
        model: str,
        prompt_tokens: int,
        make: Callable[[], Awaitable[ChatReply]],
        on_wait: WaitCallback | None = None,
    ) -> ChatReply:
        """``make()`` the call within the limits: a turn first, again after
        each 429 (up to ``RETRIES_ON_429``), the reply's tokens after."""
        for attempt in range(RETRIES_ON_429 + 1):
            await self.turn(model, prompt_tokens, on_wait)
            try:
                reply = await make()
            except RateLimited as e:
                if attempt == RETRIES_ON_429:
                    raise
                await self.refused(model, e, attempt, on_wait)
                continue
            await self.spent(model, reply.usage.output_tokens)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover


class RateLimitedLLM(WrappedLLM):
    """A model whose calls keep to the shared rate limits and wait out a
    provider's 429 (the planner's; a worker's ``MeteredLLM`` does the same)."""

    def __init__(self, inner: LLM, limiter: RateLimiter) -> None:
        super().__init__(inner)
        self.limiter = limiter

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
        async def make() -> ChatReply:
            return await self.inner.chat(
                messages,
                schema=schema,
                temperature=temperature,
                on_text=on_text,
                max_tokens=max_tokens,
                context_tokens=context_tokens,
            )

        model = self.describe()
        limited = self.limiter.limited(model)
        prompt = sum(self.count_tokens(m.content) for m in messages) if limited else 0
        return await self.limiter.call(model, prompt, make)
