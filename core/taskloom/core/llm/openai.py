"""Any OpenAI-compatible chat server: OpenAI itself, vLLM, llama.cpp's server.

Spoken over plain HTTP (``httpx``), as the API is small and stable. Structured
output goes through ``response_format`` (``json_schema``); a server that
rejects it is asked again without it (the planner validates what comes back
anyway) and is not sent it again. Streaming uses server-sent events with
``stream_options.include_usage``, so token counts arrive with the last chunk.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from taskloom.core.errors import LLMError, LLMUnavailable, RateLimited
from taskloom.core.llm.base import LLM, ChatMessage, ChatReply, TextCallback
from taskloom.core.model import Usage


class OpenAILLM(LLM):
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    provider = "openai"

    def __init__(
        self, base_url: str, model: str, *, api_key: str = "", timeout: float = 300.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0)
        )
        self.structured_output = True
        """False once the server has refused ``response_format``."""

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
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": temperature,
        }
        if max_tokens:
            body["max_tokens"] = max_tokens
        if schema is not None and self.structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": dict(schema)},
            }
        started = time.monotonic()
        try:
            try:
                return await self._send(body, on_text, started)
            except OpenAIRefused as e:
                if "response_format" not in body or e.status != 400:
                    raise
                # The server has no structured output: ask with the prompt alone.
                self.structured_output = False
                del body["response_format"]
                return await self._send(body, on_text, started)
        except httpx.TransportError as e:
            raise LLMUnavailable(
                f"cannot reach the OpenAI-compatible server at {self.base_url} "
                f"({type(e).__name__}); check TASKLOOM_OPENAI_BASE_URL"
            ) from None

    async def _send(
        self, body: dict[str, Any], on_text: TextCallback | None, started: float
    ) -> ChatReply:
        if on_text is None:
            response = await self._client.post("/chat/completions", json=body)
            self._raise_for(response)
            payload = response.json()
            choice = (payload.get("choices") or [{}])[0]
            text = choice.get("message", {}).get("content") or ""
            return ChatReply(
                text,
                self._usage(payload.get("usage"), started),
                model=str(payload.get("model") or ""),
                response_id=str(payload.get("id") or ""),
                finish_reason=str(choice.get("finish_reason") or ""),
            )
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        parts: list[str] = []
        usage: Mapping[str, Any] | None = None
        model = response_id = finish_reason = ""
        async with self._client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                self._raise_for(response)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                model = str(chunk.get("model") or model)
                response_id = str(chunk.get("id") or response_id)
                for choice in chunk.get("choices") or []:
                    finish_reason = str(choice.get("finish_reason") or finish_reason)
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        parts.append(text)
                        await on_text(text)
        return ChatReply(
            "".join(parts),
            self._usage(usage, started),
            model=model,
            response_id=response_id,
            finish_reason=finish_reason,
        )

    async def check(self) -> None:
        try:
            response = await self._client.get("/models")
        except httpx.TransportError as e:
            raise LLMUnavailable(
                f"cannot reach the OpenAI-compatible server at {self.base_url} "
                f"({type(e).__name__}); check TASKLOOM_OPENAI_BASE_URL"
            ) from None
        if response.status_code == 404:
            return  # some servers do not list models; the first chat will tell
        self._raise_for(response)
        names = {m.get("id", "") for m in response.json().get("data") or []}
        if names and self.model not in names:
            raise LLMError(
                f"the server at {self.base_url} has no model {self.model!r}; "
                f"it offers: {', '.join(sorted(names))}"
            )

    async def close(self) -> None:
        await self._client.aclose()

    def _usage(self, usage: Mapping[str, Any] | None, started: float) -> Usage:
        usage = usage or {}
        return Usage(
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            model=self.describe(),
            seconds=time.monotonic() - started,
            calls=1,
        )

    def _raise_for(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = response.json().get("error")
            detail = error.get("message") if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError):
            detail = response.text[:300]
        if response.status_code in (401, 403):
            raise OpenAIRefused(
                response.status_code,
                f"the server at {self.base_url} refused the API key ({detail}); set OPENAI_API_KEY",
            )
        if response.status_code == 429:
            raise RateLimited(
                f"the server at {self.base_url} is rate-limiting: {detail}",
                retry_after(response.headers),
            )
        if response.status_code >= 500:
            raise LLMUnavailable(
                f"the server at {self.base_url} answered {response.status_code}: {detail}"
            )
        raise OpenAIRefused(
            response.status_code,
            f"the server at {self.base_url} answered {response.status_code}: {detail}",
        )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """How long a 429 asks to wait: ``retry-after-ms``, else ``Retry-After`` in
    seconds or as an HTTP date; None when it does not say."""
    try:
        if "retry-after-ms" in headers:
            return max(float(headers["retry-after-ms"]) / 1000, 0.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(float(value), 0.0)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(when.timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


class OpenAIRefused(LLMError):
    """An HTTP error answer; ``status`` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
