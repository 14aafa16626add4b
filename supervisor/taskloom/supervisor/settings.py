"""The supervisor's settings: ``TASKLOOM_*`` variables, overridden by flags."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from taskloom.core.auth import TokenTable
from taskloom.core.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_RECEIVE_BYTES,
    ServerLimits,
)
from taskloom.core.errors import ConfigError
from taskloom.core.plan import PlanLimits
from taskloom.core.ratelimits import LimitTable, parse_limits
from taskloom.core.settings import (
    Address,
    DurationMap,
    KeepaliveSettings,
    LLMSettings,
    Seconds,
    StrList,
)
from taskloom.core.status import valid_address
from taskloom.supervisor.keys import REDIS_TIMEOUT
from taskloom.supervisor.redistarget import RedisTarget


class SupervisorSettings(LLMSettings, KeepaliveSettings):
    """Everything ``taskloom supervisor`` reads. Each field is ``TASKLOOM_<NAME>``."""

    flag_names: ClassVar[dict[str, str]] = {
        "listen": "--listen",
        "advertise": "--advertise",
        "redis_url": "--redis-url",
        "redis_prefix": "--redis-prefix",
        "ollama_host": "--ollama-host",
        "model": "--model",
        "llm": "--llm",
        "heartbeat_interval": "--heartbeat-interval",
        "lease_ttl": "--lease-ttl",
        "leader_ttl": "--leader-ttl",
        "metrics_port": "--metrics-port",
        "health_port": "--health-port",
        "console_port": "--console-port",
        "log_level": "--log-level",
        "log_format": "--log-format",
        "tls_cert": "--tls-cert",
        "tls_key": "--tls-key",
        "tls_client_ca": "--tls-client-ca",
        "insecure": "--insecure",
    }

    listen: Address = "127.0.0.1:50051"
    """Where the gRPC server listens (port 0: any free port)."""
    advertise: str = ""
    """``HOST:PORT`` where clients and workers reach this supervisor directly
    (in Kubernetes: the pod's IP and port). A standby names the leader's in its
    refusals, and the SDK, CLI and workers follow it. Unset: the listen
    address, with this host's address in place of 0.0.0.0."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus metrics on this port at /metrics (unset: not served; 0: any port)."""
    metrics_host: str = "0.0.0.0"
    """The address the metrics endpoint binds to."""
    console_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve the web console on this port (unset: not served; 0: any free
    port), on the gRPC address's host: loopback unless tokens (or
    ``--insecure``) open the supervisor up; over HTTPS with its certificate."""
    health_port: int | None = Field(default=None, ge=0, le=65535)
    """Also serve grpc.health.v1 alone, in plaintext, on this port (on
    ``metrics_host``): for Kubernetes' gRPC probes, which cannot speak TLS.
    Service "" is SERVING only on the leader; "ready" on every supervisor that
    answers calls (a standby names the leader: Kubernetes' readiness);
    "liveness" whenever the process runs."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Where state lives: ``redis://``, ``rediss://`` (TLS) or ``unix://``, with a
    password and a database if needed; or a primary that Sentinel names,
    ``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER``."""
    redis_min_replicas: int | None = Field(default=None, ge=0, le=16)
    """A transition is acknowledged only once this many replicas have it
    (``WAIT``), so that it survives the loss of the primary. Unset: 1 with a
    ``redis+sentinel://`` URL, else 0."""
    redis_replica_timeout: Seconds = Field(default=1.0, gt=0, lt=REDIS_TIMEOUT)
    """How long a transition waits for its replicas before it fails as unknown."""
    redis_max_connections: int = Field(default=64, ge=2)
    """Redis connections for transitions and reads; more operations at once wait."""
    redis_prefix: str = Field(default="taskloom:", min_length=1)
    """Prefix of every Redis key, so several clusters or tests can share a server."""
    supervisor_id: str = Field(default_factory=socket.gethostname)
    """This supervisor's name in logs, in the leader lease and in Welcome (the
    host's, or pod's, name). With its address it is who holds the lease: a
    supervisor restarted on the same host and address takes its lease back at
    once instead of waiting it out, and its workers keep their running
    subtasks. Two live supervisors never share it: they cannot listen on one
    address."""

    heartbeat_interval: Seconds = 5.0
    """How often a worker that runs something heartbeats (an idle one is silent)."""
    lease_ttl: Seconds = 15.0
    """A worker silent this long loses its subtasks; they run again elsewhere.
    An idle worker's silence counts from when it is given work."""
    max_attempts: int = Field(default=3, ge=1, le=100)
    """Attempts per subtask before it fails for good (a task or subtask may say otherwise)."""
    max_replans: int = Field(default=2, ge=0, le=10)
    """With on_failure=replan: how often the planner may replace failed subtasks of one task."""
    subtask_timeout: Seconds = 1800.0
    """Longest one attempt may run, unless its task, subtask or capability says otherwise."""
    timeouts: DurationMap = Field(default_factory=lambda: {"echo": 60.0})
    """Default attempt timeout per capability, e.g. ``llm=10m,echo=30s``."""
    stall_timeout: Seconds = 600.0
    """A running attempt that reports no progress (no message, no tokens) this
    long is stopped and retried. Long silent handlers call ``ctx.progress()``."""
    leader_ttl: Seconds = 5.0
    """The leader lease: renewed every third of this; a standby takes over
    within about this long after the leader dies. Under REDIS_TIMEOUT."""
    retry_backoff: Seconds = 1.0
    """Wait before the 2nd attempt; doubles each attempt (with jitter), up to 60 s."""
    cache: bool = True
    """Reuse the outputs of identical earlier subtasks of cacheable capabilities
    (the built-in llm handler; custom handlers that say so). A task may opt out."""
    cache_ttl: Seconds = 86400.0
    """How long a cached output is kept."""
    retention: Seconds = 7 * 86400.0
    """How long finished tasks, their subtasks and events are kept."""
    unsuccessful_retention: Seconds = 86400.0
    """How long a task that failed or was cancelled is kept (at most ``retention``):
    what failed is looked at soon or not at all, and is what a runaway client makes most."""
    compact_after: Seconds = 60.0
    """How long after it ends a task is compacted: its subtasks and event log
    become one compressed string (tens of bytes a subtask instead of ~800).
    Reads are the same either way; a retry of a compacted task unpacks it first."""

    capabilities: StrList = ("llm",)
    """Capabilities plans may use even while no worker offering them is connected."""
    planner_capabilities: StrList = ()
    """The capabilities the planner may put in its plans (of those workers offer
    or ``capabilities`` lists); empty: all of them except the test-only ``echo``,
    which a model would otherwise pick for steps that then do no work."""
    roles_file: str | None = None
    """A TOML or JSON file of roles (name, description, system prompt) added to the
    built-in researcher, analyst, writer and critic; the planner gives llm steps one."""
    prices_file: str | None = None
    """A TOML or JSON price table, ``{"openai:gpt-4o": {input = 2.5, output = 10}}``
    per million tokens (``*`` patterns allowed), over the built-in one (local
    models free, a few hosted models at list price): what tasks' ``max_cost``
    and costs are counted in. Workers get it from the supervisor."""
    rate_limits: str = ""
    """Providers' limits, ``MODEL=RPM[/TPM]`` comma-separated (``openai:*=500/30000,
    ollama:llama3.2=60``; ``*`` patterns, one shared bucket each): requests and
    tokens per minute that every worker and the planner keep to together,
    waiting rather than failing."""
    approval_capabilities: StrList = ()
    """Capabilities whose every subtask a person must approve before it runs
    (e.g. ``shell,email``), whatever the plan says: a goal's text never
    reaches such a handler without a person."""
    approval_alert_after: Seconds = 3600.0
    """A plan or subtask waiting for approval longer than this raises the
    TaskloomApprovalWaiting alert (exported as
    ``taskloom_approval_alert_after_seconds``)."""
    max_goal_chars: int = Field(default=20_000, ge=1)
    """Longest goal, in characters."""
    max_plan_subtasks: int = Field(default=20_000, ge=1)
    """Largest explicit plan."""
    max_llm_plan_subtasks: int = Field(default=50, ge=1, le=500)
    """Largest plan accepted from the model."""
    plan_repairs: int = Field(default=3, ge=0, le=10)
    """How often the model is asked to fix a rejected plan."""
    planning_concurrency: int = Field(default=4, ge=1)
    """Plans requested from the LLM at once."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024 * 1024)
    """Largest message the supervisor sends (assignments carry their inputs)."""
    max_request_bytes: int = Field(default=DEFAULT_MAX_RECEIVE_BYTES, ge=64 * 1024)
    """Largest message the supervisor accepts; larger ones get RESOURCE_EXHAUSTED."""
    max_output_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest output of one subtask (UTF-8 bytes)."""
    output_overflow: Literal["fail", "truncate"] = "fail"
    """A larger output fails its subtask (for good), or is cut with a marker."""
    max_progress_bytes: int = Field(default=4096, ge=256)
    """Longest progress message (UTF-8 bytes); a longer one is cut with a marker."""
    max_stream_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Streamed text one subtask may add to its task's log (UTF-8 bytes); past
    it, its stream is cut with one marker (its output is not affected)."""
    max_progress_rate: float = Field(default=20.0, gt=0)
    """Progress and stream messages a worker may send per second for each of
    its slots (twice that in a burst); more are dropped and counted."""
    shutdown_grace: Seconds = 10.0
    """On SIGTERM, how long in-flight RPCs get to finish."""
    hello_timeout: Seconds = 5.0
    """A worker stream that does not say Hello this soon is closed."""

    # -- security ----------------------------------------------------------------
    tls_cert: Path | None = None
    """The server's certificate chain (PEM): with ``tls_key``, gRPC is served over TLS."""
    tls_key: Path | None = None
    """The key of ``tls_cert`` (PEM)."""
    tls_client_ca: Path | None = None
    """Mutual TLS: every peer must present a certificate signed by this CA."""
    metrics_tls: bool = False
    """Serve /metrics over HTTPS with the same certificate."""
    tokens_file: Path | None = None
    """Token hashes → principal and role, one ``sha256:<hex> NAME ROLE`` per line."""
    tokens: str = Field(default="", repr=False)
    """More entries like those of ``tokens_file``, separated by ``;``."""
    insecure: bool = False
    """Serve beyond loopback without tokens: anyone who can connect is admin."""

    # -- per-principal limits (clients; admins are exempt) -------------------------
    max_watches: int = Field(default=64, ge=1)
    """WatchTask streams one principal may hold open at once."""
    max_tasks_in_flight: int = Field(default=1_000, ge=1)
    """Unfinished tasks one principal may have."""
    max_priority: int = Field(default=100, ge=0)
    """A client's tasks run at a priority from minus this to this; what it asks
    beyond is brought within (admins: ``max_admin_priority``)."""
    max_admin_priority: int = Field(default=10_000, ge=0)
    """The priority range of an admin's tasks."""
    max_unfinished_subtasks: int = Field(default=100_000, ge=1)
    """Subtasks of one principal's unfinished tasks, at most (a submit past it
    gets RESOURCE_EXHAUSTED naming what is in use)."""
    max_stored_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Bytes one principal's tasks may keep in Redis (goals, plans, outputs,
    streamed text) until they expire, unfinished or retained."""
    admin_max_tasks_in_flight: int = Field(default=100_000, ge=1)
    """An admin's unfinished tasks, at most: admins get budgets too, larger."""
    admin_max_unfinished_subtasks: int = Field(default=1_000_000, ge=1)
    """An admin's unfinished subtasks, at most."""
    admin_max_stored_bytes: int = Field(default=4 * 1024**3, ge=1024)
    """The bytes an admin's tasks may keep."""
    admit_queue_wait: Seconds = 30.0
    """Refuse new tasks (RESOURCE_EXHAUSTED, ``backlog``), whoever submits
    them, while the oldest subtask that a connected worker could run has
    waited longer than this for a free slot: the cluster is past what it can
    run, and more work would queue without bound. 0: never refuse."""
    submit_rate: float = Field(default=2_000.0, gt=0)
    """Work one principal may submit per second on average, in subtasks: a
    task counts the subtasks of its explicit plan, 1 while its plan is still to
    be made. The default is about a third of what one supervisor on two cores
    runs (``docs/benchmarks.md``), so one client alone cannot take it all ..."""
    submit_burst: int = Field(default=20_000, ge=1)
    """... and at once (a larger plan goes once the allowance is full, leaving
    it in debt)."""

    # -- connections ------------------------------------------------------------
    max_connection_idle: Seconds = 300.0
    """A connection with no call this long is closed."""
    max_connection_age: Seconds = 7200.0
    """A connection is closed after this long (clients reconnect; workers resume) ..."""
    max_connection_age_grace: Seconds = 300.0
    """... after its calls had this long to finish."""
    max_streams_per_connection: int = Field(default=1_000, ge=1)
    """Calls open at once on one connection."""

    @field_validator("leader_ttl")
    @classmethod
    def _leader_ttl(cls, value: float) -> float:
        # A write that Redis answers after the supervisor gave up on it (a
        # stalled or frozen Redis) must find the lease lapsed and be refused
        # by the fence: the caller was told it failed.
        if value >= REDIS_TIMEOUT:
            raise ValueError(
                f"must be under {REDIS_TIMEOUT:g}s, the supervisor's Redis timeout: a write "
                "that Redis answers after the supervisor gave up on it could otherwise still "
                "land, after its caller was told it failed"
            )
        return value

    @field_validator("rate_limits")
    @classmethod
    def _rate_limits(cls, value: str) -> str:
        try:
            parse_limits(value)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("TASKLOOM_RATE_LIMITS: ")) from None
        return value

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: str) -> str:
        if value and not valid_address(value):
            raise ValueError(f"{value!r} is not HOST:PORT (e.g. 10.0.0.7:50051)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        try:
            RedisTarget.parse(value)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return value

    @property
    def replicas(self) -> int:
        """Replicas each transition waits for (``redis_min_replicas`` or its default)."""
        if self.redis_min_replicas is not None:
            return self.redis_min_replicas
        return 1 if RedisTarget.parse(self.redis_url).is_sentinel else 0

    def token_table(self) -> TokenTable:
        """The configured tokens (empty: authentication is off)."""
        return TokenTable.load(self.tokens_file, self.tokens)

    def server_limits(self) -> ServerLimits:
        return ServerLimits(
            max_receive_bytes=self.max_request_bytes,
            max_send_bytes=self.max_message_bytes,
            max_connection_idle_ms=int(self.max_connection_idle * 1000),
            max_connection_age_ms=int(self.max_connection_age * 1000),
            max_connection_age_grace_ms=int(self.max_connection_age_grace * 1000),
            max_concurrent_streams=self.max_streams_per_connection,
            keepalive=self.keepalive(),
        )

    def rate_limit_table(self) -> LimitTable:
        return LimitTable(parse_limits(self.rate_limits))

    def timeout_for(self, capability: str) -> float:
        return self.timeouts.get(capability, self.subtask_timeout)

    def explicit_plan_limits(self) -> PlanLimits:
        return PlanLimits(max_subtasks=self.max_plan_subtasks)

    @property
    def tiny_model(self) -> bool:
        """An embedded model: it keeps to JSON only under a very tight schema."""
        return self.provider == "embedded"

    def llm_plan_limits(self) -> PlanLimits:
        if self.tiny_model:
            return PlanLimits(
                max_subtasks=min(self.max_llm_plan_subtasks, 5),
                max_title_chars=60,
                max_instruction_chars=200,
                id_pattern="^s[1-9]$",
            )
        return PlanLimits(
            max_subtasks=self.max_llm_plan_subtasks,
            max_title_chars=120,
            max_instruction_chars=2_000,
        )

    @property
    def plan_reply_tokens(self) -> int:
        """Longest reply the planner accepts (enough for the plan limits)."""
        return 768 if self.tiny_model else 4096
