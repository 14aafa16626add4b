"""Settings shared by every process, and the machinery to load them.

Each process has one settings class (``SupervisorSettings``, ``WorkerSettings``,
``ClientSettings``) built on ``TaskloomSettings``: fields are read from
``TASKLOOM_<FIELD>`` environment variables (or the alias a field names, such
as ``OLLAMA_HOST``), CLI flags override them, and a bad value fails at start-up
with a ``ConfigError`` naming the variable. Durations accept plain seconds or a
unit: ``250ms``, ``15s``, ``5m``, ``2h``, ``7d``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self

from pydantic import AfterValidator, AliasChoices, BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from taskloom.core.channel import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS, ClientTLS, Keepalive
from taskloom.core.errors import ConfigError
from taskloom.core.plan import LABEL_RE

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """``"15s"`` → 15.0; numbers pass through; anything else is left for pydantic to reject."""
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; write e.g. 30, 250ms, 15s, 5m, 2h, 7d")
        return float(match.group(1)) * _UNITS[match.group(2)]
    return value


def split_list(value: Any) -> Any:
    """``"llm, echo"`` → ``("llm", "echo")``."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def check_address(value: str) -> str:
    """``HOST:PORT``, as gRPC wants it."""
    scheme, found, rest = value.strip().partition("://")
    if found:
        # A URL is the usual slip: say what to write instead.
        tls = " and, for TLS, --tls-ca" if scheme in ("https", "grpcs") else ""
        raise ValueError(
            f"{value!r} is a URL; give HOST:PORT ({rest.split('/')[0] or '127.0.0.1:50051'}){tls}"
        )
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    return value.strip()


def parse_duration_map(value: Any) -> Any:
    """``"llm=10m, echo=30s"`` → ``{"llm": 600.0, "echo": 30.0}``."""
    if isinstance(value, str):
        out: dict[str, float] = {}
        for part in value.split(","):
            if not part.strip():
                continue
            key, sep, duration = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{part.strip()!r} is not NAME=DURATION (e.g. llm=10m)")
            out[key.strip()] = parse_duration(duration)
        return out
    return value


def parse_label_map(value: Any) -> Any:
    """``"gpu=true, zone=eu"`` → ``{"gpu": "true", "zone": "eu"}``, each key and
    value a label name (``LABEL_RE``: what a subtask can require)."""
    if isinstance(value, str):
        pairs: dict[str, str] = {}
        for part in value.split(","):
            if part.strip():
                key, sep, label = (x.strip() for x in part.partition("="))
                if not sep:
                    raise ValueError(f"{part.strip()!r} is not KEY=VALUE (e.g. gpu=true)")
                pairs[key] = label
        value = pairs
    if isinstance(value, dict):
        for key, label in value.items():
            if not (LABEL_RE.match(str(key)) and LABEL_RE.match(str(label))):
                raise ValueError(
                    f"label {key}={label} is not KEY=VALUE of 1-64 letters, digits and "
                    "_.:/- starting with a letter or digit"
                )
    return value


def check_addresses(value: tuple[str, ...]) -> tuple[str, ...]:
    """One or more ``HOST:PORT``, tried in turn (several supervisors, one leader)."""
    if not value:
        raise ValueError("name at least one HOST:PORT")
    return tuple(check_address(v) for v in value)


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Address = Annotated[str, AfterValidator(check_address)]
StrList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(split_list)]
DurationMap = Annotated[
    dict[str, Annotated[float, Field(gt=0)]], NoDecode, BeforeValidator(parse_duration_map)
]
LabelMap = Annotated[dict[str, str], NoDecode, BeforeValidator(parse_label_map)]
Addresses = Annotated[
    tuple[str, ...], NoDecode, BeforeValidator(split_list), AfterValidator(check_addresses)
]


class TaskloomSettings(BaseSettings):
    """Base of each process's settings: environment first, then overrides."""

    model_config = SettingsConfigDict(
        env_prefix="TASKLOOM_",
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        # Each field's docstring is its description: the flags' help and the
        # configuration reference are made from it.
        use_attribute_docstrings=True,
    )
    flag_names: ClassVar[dict[str, str]] = {}
    """Field name → CLI flag, so errors can name both."""

    log_level: str = Field(default="INFO", pattern=r"(?i)^(debug|info|warning|error|critical)$")
    """The least important log lines written: debug, info, warning or error."""
    log_format: str = Field(default="text", pattern=r"^(text|json)$")
    """``json``: one object per line with the task, subtask and trace ids."""

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Read the environment, apply non-None overrides (CLI flags win), validate."""
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            raise ConfigError(cls._describe(e)) from None

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable a field is read from."""
        info = cls.model_fields[field]
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            return str(alias.choices[0])
        if isinstance(alias, str):
            return alias
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    def read_file(self, field: str) -> bytes | None:
        """The contents of the file a path setting names (None if unset)."""
        path: Path | None = getattr(self, field)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as e:
            name = self.env_name(field)
            if field in self.flag_names:
                name += f" / {self.flag_names[field]}"
            raise ConfigError(f"{name}: cannot read {path}: {e.strerror}") from None

    @classmethod
    def _describe(cls, error: ValidationError) -> str:
        lines = []
        for problem in error.errors():
            field = str(problem["loc"][0]) if problem["loc"] else ""
            if field in cls.model_fields:
                name = cls.env_name(field)
                if field in cls.flag_names:
                    name += f" / {cls.flag_names[field]}"
            else:
                name = field or "settings"
            message = str(problem["msg"]).removeprefix("Value error, ")
            lines.append(f"{name}: {message} (got {problem.get('input')!r})")
        return "invalid configuration:\n  " + "\n  ".join(lines)


PROVIDERS = ("ollama", "openai", "embedded")


def check_llm(value: str) -> str:
    """``provider:model`` with a known provider; a bare name means Ollama."""
    value = value.strip()
    if not value:
        return value
    provider, sep, model = value.partition(":")
    if not sep or provider not in PROVIDERS:
        return f"ollama:{value}"
    if not model.strip():
        raise ValueError(f"{value!r} names no model; write e.g. ollama:llama3.2")
    return value


class LLMSettings(TaskloomSettings):
    """Which LLM, and where. Used by the planner and by the built-in ``llm`` handler."""

    llm: Annotated[str, AfterValidator(check_llm)] = ""
    """``provider:model``: ``ollama:llama3.2``, ``openai:gpt-4o-mini``,
    ``embedded:smollm2``. Empty: ``ollama:`` + ``model``."""
    model: str = Field(default="llama3.2", min_length=1)
    """The Ollama model when ``llm`` is not set (kept for TASKLOOM_MODEL)."""
    ollama_host: str = Field(
        default="http://127.0.0.1:11434",
        validation_alias=AliasChoices("OLLAMA_HOST", "ollama_host"),
    )
    """The Ollama server (read from ``OLLAMA_HOST``, as Ollama itself does)."""
    openai_base_url: str = "https://api.openai.com/v1"
    """Any OpenAI-compatible server: vLLM, llama.cpp's server, OpenAI itself."""
    openai_api_key: str = Field(
        default="",
        validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key"),
        repr=False,
    )
    """The key of the OpenAI-compatible server (read from ``OPENAI_API_KEY``); never logged."""
    llm_timeout: Seconds = 300.0
    """Longest wait for one LLM reply."""
    context_tokens: int = Field(default=0, ge=0)
    """The context budget of one LLM call; 0: the model's context length, at most
    ``MAX_DEFAULT_CONTEXT`` (a larger window costs memory on the server)."""
    max_output_tokens: int = Field(default=1024, ge=16)
    """Longest reply of one LLM call, so a looping model stops."""

    @property
    def provider(self) -> str:
        return self.llm_spec[0]

    @property
    def llm_spec(self) -> tuple[str, str]:
        """``(provider, model)``."""
        provider, _, model = (self.llm or f"ollama:{self.model}").partition(":")
        return provider, model


class KeepaliveSettings(TaskloomSettings):
    """HTTP/2 keepalive, the same on every process: how a dead peer on a quiet
    connection is found (an idle worker sends nothing)."""

    keepalive_interval: Seconds = Field(default=KEEPALIVE_TIME_MS / 1000, ge=1.0)
    """A connection quiet this long is pinged ..."""
    keepalive_timeout: Seconds = Field(default=KEEPALIVE_TIMEOUT_MS / 1000, gt=0)
    """... and closed if the ping goes unanswered this long."""

    def keepalive(self) -> Keepalive:
        return Keepalive(int(self.keepalive_interval * 1000), int(self.keepalive_timeout * 1000))


class ConnectionSettings(KeepaliveSettings):
    """How a client or worker reaches the supervisor securely."""

    token: str = Field(default="", repr=False)
    """Bearer token sent with every call; never logged. A command line shows
    in ``ps``: prefer ``token_file`` or the environment."""
    token_file: Path | None = None
    """A file holding the bearer token (read when the settings are loaded)."""
    tls: bool = False
    """Use TLS even without ``tls_ca`` (trusting the system's CAs)."""
    tls_ca: Path | None = None
    """CA bundle (PEM) that signed the supervisor's certificate; implies TLS."""
    tls_cert: Path | None = None
    """This process's certificate (PEM) for mutual TLS."""
    tls_key: Path | None = None
    """The key of ``tls_cert`` (PEM)."""
    tls_server_name: str = ""
    """Expect this name in the supervisor's certificate (default: the address's host)."""

    def bearer_token(self) -> str:
        """``token``, or what ``token_file`` holds."""
        if self.token or self.token_file is None:
            return self.token
        data = self.read_file("token_file") or b""
        token = data.decode(errors="replace").strip()
        if not token:
            raise ConfigError(f"TASKLOOM_TOKEN_FILE: {self.token_file} is empty")
        return token

    def client_tls(self) -> ClientTLS | None:
        """The TLS material to connect with, or None for plaintext."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TASKLOOM_TLS_CERT and TASKLOOM_TLS_KEY: give both or neither")
        if not (self.tls or self.tls_ca or self.tls_cert):
            return None
        return ClientTLS(
            ca=self.read_file("tls_ca"),
            cert=self.read_file("tls_cert"),
            key=self.read_file("tls_key"),
            server_name=self.tls_server_name,
        )
