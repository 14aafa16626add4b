"""The worker's settings: ``TASKLOOM_*`` variables, overridden by flags."""

from __future__ import annotations

import os
import socket
from typing import ClassVar, Self

from pydantic import Field, field_validator, model_validator

from taskloom.core.channel import DEFAULT_MAX_MESSAGE_BYTES
from taskloom.core.settings import (
    Addresses,
    ConnectionSettings,
    LabelMap,
    LLMSettings,
    Seconds,
    StrList,
)

SLOTS_EMBEDDED = 1
SLOTS_LLM = 8
SLOTS_ASYNC = 64
"""Default slots of a worker by what it runs (``WorkerSettings.concurrency``)."""


def default_concurrency(capabilities: tuple[str, ...], provider: str) -> int:
    """A worker's slots when ``--concurrency`` is not given: by its handlers."""
    slots = [SLOTS_ASYNC]
    if "llm" in capabilities:
        slots.append(SLOTS_EMBEDDED if provider == "embedded" else SLOTS_LLM)
    return min(slots)


class WorkerSettings(LLMSettings, ConnectionSettings):
    """Everything ``taskloom worker`` reads. Each field is ``TASKLOOM_<NAME>``."""

    flag_names: ClassVar[dict[str, str]] = {
        "supervisor": "--supervisor",
        "capabilities": "--capabilities",
        "concurrency": "--concurrency",
        "labels": "--labels",
        "name": "--name",
        "app": "--app",
        "ollama_host": "--ollama-host",
        "model": "--model",
        "llm": "--llm",
        "drain_timeout": "--drain-timeout",
        "metrics_port": "--metrics-port",
        "log_level": "--log-level",
        "log_format": "--log-format",
        "token": "--token",
        "token_file": "--token-file",
        "tls_ca": "--tls-ca",
        "tls_cert": "--tls-cert",
        "tls_key": "--tls-key",
    }

    supervisor: Addresses = ("127.0.0.1:50051",)
    """The supervisor's HOST:PORT; several, comma-separated, when standbys run
    (the worker connects to whichever leads)."""
    capabilities: StrList = ("llm",)
    """What this worker runs; each needs a handler (built in: llm, echo)."""
    concurrency: int = Field(default=0, ge=0, le=10_000)
    """Subtasks run at once. 0 (the default): by what the worker runs, the
    smallest that applies: 1 for ``llm`` on the embedded model (it answers one
    call at a time), 8 for ``llm`` on a model server, 64 for other handlers
    (async, I/O-bound: a slot waiting on a call costs nothing). Set it for
    handlers that burn CPU."""
    labels: LabelMap = Field(default_factory=dict)
    """What this worker is, as ``KEY=VALUE`` pairs (``gpu=true,zone=eu``): a
    subtask that ``requires`` labels runs only on workers with all of them. An
    ``llm`` worker also gets ``model=<its model>`` unless it sets one."""
    name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """Shown in tasks, events and logs."""
    app: str | None = None
    """``module:attribute`` holding a Worker or HandlerRegistry with custom handlers."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus metrics on this port at /metrics (unset: not served; 0: any port)."""
    metrics_host: str = "0.0.0.0"
    """The address the metrics endpoint binds to."""
    drain_timeout: Seconds = 30.0
    """On SIGTERM, how long running subtasks get to finish before they are handed back."""
    reconnect_max: Seconds = 10.0
    """Longest wait between reconnection attempts."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024 * 1024)
    """Largest message accepted from the supervisor (assignments carry their inputs)."""

    @field_validator("capabilities")
    @classmethod
    def _capabilities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one capability, e.g. llm")
        return value

    @model_validator(mode="after")
    def _slots(self) -> Self:
        if not self.concurrency:
            # Frozen settings: set once, here, as they are made.
            object.__setattr__(
                self, "concurrency", default_concurrency(tuple(self.capabilities), self.provider)
            )
        return self
