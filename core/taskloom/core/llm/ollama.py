"""The Ollama backend, through the official ``ollama`` client."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama

from taskloom.core.errors import LLMError, LLMUnavailable, RateLimited
from taskloom.core.llm.base import DEFAULT_CONTEXT_TOKENS, LLM, ChatMessage, ChatReply, TextCallback
from taskloom.core.model import Usage

DEFAULT_PORT = 11434


def normalize_host(host: str) -> str:
    """``localhost`` → ``http://localhost:11434``, as Ollama's own CLI reads OLLAMA_HOST."""
    host = host.strip() or "127.0.0.1"
    if "://" not in host:
        host = f"http://{host}"
    parts = urlsplit(host)
    if parts.port is None:
        host = f"{parts.scheme}://{parts.hostname}:{DEFAULT_PORT}{parts.path}"
    return host.rstrip("/")


class OllamaLLM(LLM):
    """A model served by Ollama at ``host``."""

    provider = "ollama"

    def __init__(self, host: str, model: str, *, timeout: float = 300.0) -> None:
        self.host = normalize_host(host)
        self.model = model
        self._client = ollama.AsyncClient(
            host=self.host, timeout=httpx.Timeout(timeout, connect=5.0)
        )
        self._context_length: int | None = None

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
        payload = [{"role": m.role, "content": m.content} for m in messages]
        options: dict[str, float] = {"temperature": temperature}
        if max_tokens:
            options["num_predict"] = max_tokens
        if context_tokens:
            options["num_ctx"] = context_tokens
        fmt = dict(schema) if schema is not None else None
        started = time.monotonic()
        try:
            if on_text is None:
                response = await self._client.chat(
                    model=self.model, messages=payload, format=fmt, options=options
                )
                return ChatReply(
                    response.message.content or "",
                    self._usage(response, started),
                    model=response.model or "",
                    finish_reason=response.done_reason or "",
                )
            parts: list[str] = []
            last: ollama.ChatResponse | None = None
            stream = await self._client.chat(
                model=self.model, messages=payload, format=fmt, options=options, stream=True
            )
            try:
                async for chunk in stream:
                    last = chunk
                    text = chunk.message.content or ""
                    if text:
                        parts.append(text)
                        await on_text(text)
            finally:
                # When on_text stops the reply (a budget), the connection
                # closes now, and Ollama stops generating.
                await stream.aclose()  # type: ignore[attr-defined]  # an async generator
            return ChatReply(
                "".join(parts),
                self._usage(last, started),
                model=(last.model or "") if last is not None else "",
                finish_reason=(last.done_reason or "") if last is not None else "",
            )
        except (ConnectionError, httpx.TransportError) as e:
            raise self._unreachable(e) from None
        except ollama.ResponseError as e:
            raise self._refused(e) from None

    async def check(self) -> None:
        try:
            listing = await self._client.list()
        except (ConnectionError, httpx.TransportError) as e:
            raise self._unreachable(e) from None
        except ollama.ResponseError as e:
            raise self._refused(e) from None
        names = {m.model or "" for m in listing.models}
        wanted = {self.model, f"{self.model}:latest"}
        if not names & wanted:
            raise LLMError(
                f"model {self.model!r} is not pulled on Ollama at {self.host}; "
                f"run `ollama pull {self.model}` (or set TASKLOOM_MODEL to one of: "
                f"{', '.join(sorted(names)) or 'none pulled yet'})"
            )

    async def context_length(self) -> int:
        """The model's trained context length, from ``/api/show``."""
        if self._context_length is None:
            self._context_length = DEFAULT_CONTEXT_TOKENS
            try:
                shown = await self._client.show(self.model)
            except (ConnectionError, httpx.TransportError, ollama.ResponseError):
                return self._context_length  # not cached: ask again next time
            for key, value in (shown.modelinfo or {}).items():
                if key.endswith(".context_length") and isinstance(value, int):
                    self._context_length = value
        return self._context_length

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]

    def _usage(self, response: ollama.ChatResponse | None, started: float) -> Usage:
        seconds = time.monotonic() - started
        if response is None:
            return Usage(model=self.describe(), seconds=seconds, calls=1)
        return Usage(
            input_tokens=response.prompt_eval_count or 0,
            output_tokens=response.eval_count or 0,
            model=self.describe(),
            seconds=seconds,
            calls=1,
        )

    def _unreachable(self, error: BaseException) -> LLMUnavailable:
        reason = type(error).__name__ if isinstance(error, httpx.TimeoutException) else "no answer"
        return LLMUnavailable(
            f"cannot reach Ollama at {self.host} ({reason}); start it with `ollama serve` "
            "or point OLLAMA_HOST at a running server"
        )

    def _refused(self, error: ollama.ResponseError) -> LLMError | RateLimited:
        if error.status_code == 429:
            return RateLimited(f"Ollama at {self.host} is rate-limiting: {error.error}")
        if error.status_code == 404:
            return LLMError(
                f"Ollama at {self.host} does not have model {self.model!r}; "
                f"run `ollama pull {self.model}`"
            )
        return LLMError(f"Ollama at {self.host} answered {error.status_code}: {error.error}")
