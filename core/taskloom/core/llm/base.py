"""The interface every LLM backend implements.

One call, ``chat``: messages in, text out, optionally constrained by a JSON
schema and optionally streamed through a callback. Every reply carries its
``Usage``: prompt and completion tokens, seconds and the model. Backends
translate their client's errors into ``LLMUnavailable`` (cannot reach the
server; retrying may help) and ``LLMError`` (the server refused: unknown
model, bad request).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from taskloom.core.model import Usage

TINY_NOTICE = "SmolLM2-135M, a tiny offline model: expect rough answers"
"""What is said wherever the embedded SmolLM2 answers."""

Role = Literal["system", "user", "assistant"]
TextCallback = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ChatReply:
    text: str
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    """The model that answered, as the provider names it ('' if it does not say)."""
    response_id: str = ""
    """The provider's id of this reply ('' if it gives none)."""
    finish_reason: str = ""
    """Why the generation stopped (``stop``, ``length``, ...; '' if not given)."""


class LLM(abc.ABC):
    """A chat model behind some server or library."""

    provider: str
    model: str
    context_is_fixed = False
    """True when the context window is set at load time, not per call."""

    @abc.abstractmethod
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
        """Send ``messages``; with ``schema``, the reply is JSON meant to match it.

        With ``on_text`` the reply is streamed and each piece of text is passed to
        the callback as it arrives; the full text is still returned.
        ``max_tokens`` bounds the reply (0: the backend's default);
        ``context_tokens`` asks for a context window that large where the
        backend lets the caller choose (Ollama's ``num_ctx``).
        """

    async def context_length(self) -> int:
        """Tokens the model can attend to (prompt and reply), as far as is known."""
        return DEFAULT_CONTEXT_TOKENS

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes; an estimate that errs high unless the backend
        has the model's tokenizer at hand."""
        return estimate_tokens(text)

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise ``LLMUnavailable`` or ``LLMError`` unless the model can answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    def describe(self) -> str:
        return f"{self.provider}:{self.model}"


class WrappedLLM(LLM):
    """Forwards everything to ``inner``; subclasses add to ``chat``."""

    def __init__(self, inner: LLM) -> None:
        self.inner = inner
        self.provider = inner.provider
        self.model = inner.model
        self.context_is_fixed = inner.context_is_fixed

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
        return await self.inner.chat(
            messages,
            schema=schema,
            temperature=temperature,
            on_text=on_text,
            max_tokens=max_tokens,
            context_tokens=context_tokens,
        )

    async def context_length(self) -> int:
        return await self.inner.context_length()

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    async def check(self) -> None:
        await self.inner.check()

    async def close(self) -> None:
        await self.inner.close()


DEFAULT_CONTEXT_TOKENS = 4096
"""The context assumed when a backend cannot say: Ollama's default ``num_ctx``."""


def estimate_tokens(text: str) -> int:
    """About one token per 3 characters of English (tokenizers average ~4), so
    a budget computed with it is not overrun."""
    return (len(text) + 2) // 3
