"""The interface every LLM backend implements.

One call, ``chat``: messages in, text out, optionally constrained by a JSON
schema and optionally streamed through a callback. Backends translate their
client's errors into ``LLMUnavailable`` (cannot reach the server; retrying may
help) and ``LLMError`` (the server refused: unknown model, bad request).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from taskloom.core.model import Usage

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


class LLM(abc.ABC):
    """A chat model behind some server or library."""

    provider: str
    model: str

    @abc.abstractmethod
    async def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        schema: Mapping[str, Any] | None = None,
        temperature: float = 0.0,
        on_text: TextCallback | None = None,
    ) -> ChatReply:
        """Send ``messages``; with ``schema``, the reply is JSON meant to match it.

        With ``on_text`` the reply is streamed and each piece of text is passed to
        the callback as it arrives; the full text is still returned.
        """

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise ``LLMUnavailable`` or ``LLMError`` unless the model can answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    def describe(self) -> str:
        return f"{self.provider}:{self.model}"
