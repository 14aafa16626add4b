"""A real HTTP server that speaks Ollama's API, scripted by the test.

It serves ``/api/chat`` (streamed as NDJSON or not, with ``format``),
``/api/tags``, ``/api/show`` and ``/api/version`` on a free loopback port,
from a thread of its own, so supervisors and worker processes reach it as
they would reach Ollama. It also speaks the OpenAI-compatible API under
``/v1`` (``/v1/chat/completions`` streamed as server-sent events or not, with
``response_format``; ``/v1/models``), as vLLM or llama.cpp's server would.
Every chat call is recorded; the test's ``responder`` decides each reply and
may block (to hold a subtask open) or return an ``HTTPError``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ChatCall:
    model: str
    messages: list[dict[str, Any]]
    format: Any
    stream: bool
    options: dict[str, Any]
    api: str = "ollama"
    received_at: float = field(default_factory=time.monotonic)
    responded_at: float | None = None
    chunks_sent: int = 0
    cut: bool = False
    """The client closed a streamed reply before its end."""

    @property
    def system(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "system"), "")

    @property
    def prompt(self) -> str:
        """The last user message."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @property
    def planning(self) -> bool:
        return self.format is not None


@dataclass
class HTTPError:
    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


Responder = Callable[[ChatCall], "str | HTTPError"]


class FakeOllama:
    """Ollama's HTTP API on ``url``; set ``responder`` to script replies."""

    def __init__(
        self, models: tuple[str, ...] = ("llama3.2:latest",), *, context_length: int = 8192
    ) -> None:
        self.models = models
        self.context_length = context_length
        self.structured_output = True
        """False: the OpenAI API refuses response_format, like servers without it."""
        self.api_key = ""
        """Set: the OpenAI API wants this bearer token."""
        self.calls: list[ChatCall] = []
        self.responder: Responder = lambda call: f"echo: {call.prompt[-200:]}"
        self.chunk_delay = 0.0
        """Seconds between streamed chunks (Ollama's API), like a model generating."""
        self.counts_tokens = False
        """True: like Ollama, a reply counts 4 characters a token, stops at
        ``num_predict`` (done_reason "length") and reports what it generated;
        False: every reply is 7 tokens, whatever it says."""
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/api/version":
                    self._json(200, {"version": "0.12.0"})
                elif self.path == "/api/tags":
                    self._json(200, {"models": [_model(m) for m in fake.models]})
                elif self.path == "/v1/models":
                    if self._authorized():
                        self._json(200, {"object": "list", "data": [
                            {"id": m.removesuffix(":latest"), "object": "model"}
                            for m in fake.models
                        ]})  # fmt: skip
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                known = {m.removesuffix(":latest") for m in fake.models} | set(fake.models)
                if self.path == "/api/show":
                    if body.get("model") not in known:
                        self._json(404, {"error": f"model '{body.get('model')}' not found"})
                        return
                    info = {"general.architecture": "llama",
                            "llama.context_length": fake.context_length}  # fmt: skip
                    self._json(200, {"modelfile": "", "template": "", "model_info": info})
                    return
                if self.path == "/v1/chat/completions":
                    self._openai_chat(body, known)
                    return
                if self.path != "/api/chat":
                    self._json(404, {"error": "not found"})
                    return
                if body.get("model") not in known:
                    self._json(404, {"error": f"model '{body.get('model')}' not found"})
                    return
                call = ChatCall(
                    model=body["model"],
                    messages=body.get("messages", []),
                    format=body.get("format"),
                    stream=bool(body.get("stream", True)),
                    options=body.get("options") or {},
                )
                reply = fake.answer(call)
                predict = int(call.options.get("num_predict") or 0)
                if fake.counts_tokens and isinstance(reply, str) and predict:
                    reply = reply[: predict * 4]
                if isinstance(reply, HTTPError):
                    self._json(reply.status, {"error": reply.message})
                elif call.stream:
                    self._stream(call, reply)
                else:
                    self._json(200, _chunk(call, reply, done=True, fake=fake, text=reply))

            def _authorized(self) -> bool:
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._json(401, {"error": {"message": "Incorrect API key provided"}})
                    return False
                return True

            def _openai_chat(self, body: dict[str, Any], known: set[str]) -> None:
                if not self._authorized():
                    return
                if body.get("model") not in known:
                    error = {"message": f"The model `{body.get('model')}` does not exist"}
                    self._json(404, {"error": error})
                    return
                response_format = body.get("response_format")
                if response_format is not None and not fake.structured_output:
                    self._json(400, {"error": {"message": "response_format is not supported"}})
                    return
                schema = (response_format or {}).get("json_schema", {}).get("schema")
                call = ChatCall(
                    model=body["model"],
                    messages=body.get("messages", []),
                    format=schema,
                    stream=bool(body.get("stream", False)),
                    options={k: body[k] for k in ("temperature", "max_tokens") if k in body},
                    api="openai",
                )
                reply = fake.answer(call)
                if isinstance(reply, HTTPError):
                    refusal: dict[str, Any] = {"error": {"message": reply.message}}
                    self._json(reply.status, refusal, reply.headers)
                    return
                usage = {"prompt_tokens": sum(len(m["content"]) // 4 for m in call.messages),
                         "completion_tokens": 7}  # fmt: skip
                if not call.stream:
                    self._json(200, {
                        "id": "chatcmpl-1", "object": "chat.completion", "model": call.model,
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": reply}}],
                        "usage": usage,
                    })  # fmt: skip
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                events: list[dict[str, Any]] = [
                    {"choices": [{"index": 0, "delta": {"content": reply[i : i + 16]}}]}
                    for i in range(0, len(reply), 16)
                ]
                events.append({"choices": [], "usage": usage})
                lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
                for line in lines:
                    data = line.encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

            def _json(
                self, status: int, payload: Any, headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, call: ChatCall, text: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                pieces = [text[i : i + 16] for i in range(0, len(text), 16)] or [""]
                lines = [_chunk(call, p, done=False) for p in pieces]
                lines.append(_chunk(call, "", done=True, fake=fake, text=text))
                try:
                    for line in lines:
                        data = (json.dumps(line) + "\n").encode()
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                        call.chunks_sent += 1
                        if fake.chunk_delay:
                            time.sleep(fake.chunk_delay)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    call.cut = True
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeOllama:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, call: ChatCall) -> str | HTTPError:
        """Record the call and ask the test's responder for the reply."""
        with self._lock:
            self.calls.append(call)
        try:
            reply = self.responder(call)
        except Exception as e:
            reply = HTTPError(500, f"responder failed: {e!r}")
        call.responded_at = time.monotonic()
        return reply

    def planning_calls(self) -> list[ChatCall]:
        with self._lock:
            return [c for c in self.calls if c.planning]

    def step_calls(self, title: str) -> list[ChatCall]:
        """Calls of the built-in llm handler for the step with this title."""
        with self._lock:
            return [c for c in self.calls if f"Your step: {title}\n" in c.prompt]


def _model(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": "2026-01-01T00:00:00Z",
        "size": 1,
        "digest": "0" * 64,
        "details": {"format": "gguf", "family": "llama"},
    }


def _chunk(
    call: ChatCall,
    content: str,
    *,
    done: bool,
    fake: FakeOllama | None = None,
    text: str = "",
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "model": call.model,
        "created_at": "2026-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": content},
        "done": done,
    }
    if done:
        counted = fake is not None and fake.counts_tokens
        predict = int(call.options.get("num_predict") or 0)
        generated = -(-len(text) // 4) if counted else 7
        chunk |= {
            "done_reason": "length" if counted and predict and generated >= predict else "stop",
            "prompt_eval_count": sum(len(m["content"]) // 4 for m in call.messages),
            "eval_count": generated,
        }
    return chunk
