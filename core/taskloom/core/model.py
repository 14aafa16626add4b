"""The domain model every component shares: tasks, subtasks, plans, events.

These are plain frozen dataclasses. Protocol buffers never get past the gRPC
edges (each side's ``codec.py``); the scheduler, planner and store see only
these types. Times are Unix seconds as floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, TypedDict

from taskloom.core.errors import InvalidArgument

SYNTHESIZE_ID = "synthesize"
"""The id of the synthesis subtask the supervisor appends to a plan."""


class TaskStatus(StrEnum):
    PLANNING = "PLANNING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_TASK


class SubtaskStatus(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_SUBTASK


_TERMINAL_TASK = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})
_TERMINAL_SUBTASK = frozenset(
    {
        SubtaskStatus.SUCCEEDED,
        SubtaskStatus.FAILED,
        SubtaskStatus.CANCELLED,
        SubtaskStatus.SKIPPED,
    }
)


class EventType(StrEnum):
    """The types of events in a task's log."""

    TASK_SUBMITTED = "task.submitted"
    PLAN_REQUESTED = "plan.requested"
    PLAN_REJECTED = "plan.rejected"
    PLAN_NORMALIZED = "plan.normalized"
    """The planner fixed something in the model's plan without asking it again."""
    PLAN_FALLBACK = "plan.fallback"
    """No valid plan: with fallback=single, one subtask carries the whole goal."""
    PLAN_CREATED = "plan.created"
    PLAN_REVISED = "plan.revised"
    SUBTASK_READY = "subtask.ready"
    SUBTASK_ASSIGNED = "subtask.assigned"
    SUBTASK_RUNNING = "subtask.running"
    SUBTASK_PROGRESS = "subtask.progress"
    SUBTASK_OUTPUT = "subtask.output"
    """Output as it is generated (streamed LLM tokens, coalesced)."""
    SUBTASK_RETRYING = "subtask.retrying"
    SUBTASK_SUCCEEDED = "subtask.succeeded"
    SUBTASK_FAILED = "subtask.failed"
    SUBTASK_CANCELLED = "subtask.cancelled"
    SUBTASK_SKIPPED = "subtask.skipped"
    SUBTASK_STOPPED = "subtask.stopped"
    """A worker acknowledged a Cancel: the attempt's handler has stopped."""
    TASK_SUCCEEDED = "task.succeeded"
    TASK_FAILED = "task.failed"
    TASK_CANCELLED = "task.cancelled"
    # Steering: each names who did it (``Event.actor``) and why.
    TASK_AWAITING_APPROVAL = "task.awaiting_approval"
    """The plan is stored; nothing runs until a person approves it."""
    PLAN_APPROVED = "plan.approved"
    PLAN_EDITED = "plan.edited"
    """A person replaced the plan while approving it."""
    SUBTASK_AWAITING_APPROVAL = "subtask.awaiting_approval"
    """Its inputs are ready; it runs once a person approves it."""
    SUBTASK_APPROVED = "subtask.approved"
    SUBTASK_REJECTED = "subtask.rejected"
    SUBTASK_RETRIED = "subtask.retried"
    """A person asked for it to run again (its dependents run again with it)."""
    SUBTASK_RESET = "subtask.reset"
    """It runs again because something upstream of it does."""
    SUBTASK_PROVIDED = "subtask.provided"
    """A person skipped it with an output its dependents run on."""
    TASK_REOPENED = "task.reopened"
    """A task that had ended runs again (a retry or a skip of what ended it)."""
    TASK_PAUSED = "task.paused"
    TASK_RESUMED = "task.resumed"

    @property
    def terminal(self) -> bool:
        """True for the event that ends a task's log."""
        return self in _TERMINAL_EVENTS


_TERMINAL_EVENTS = frozenset(
    {EventType.TASK_SUCCEEDED, EventType.TASK_FAILED, EventType.TASK_CANCELLED}
)


@dataclass(frozen=True, slots=True)
class AttemptRef:
    """One attempt of one subtask: the unit of assignment and of reporting."""

    task_id: str
    subtask_id: str
    attempt: int

    def __str__(self) -> str:
        return f"{self.task_id}/{self.subtask_id}#{self.attempt}"


@dataclass(frozen=True, slots=True)
class PlannedSubtask:
    """One node of a plan as the planner or a caller wrote it."""

    id: str
    title: str
    instruction: str
    capability: str
    depends_on: tuple[str, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    max_attempts: int = 0
    """Attempts before it fails for good; 0: the task's setting."""
    timeout: float = 0.0
    """Seconds one attempt may run; 0: the task's, else the capability's default."""
    requires_approval: bool = False
    """A person must approve it before it runs (the supervisor may require it too)."""
    requires: Mapping[str, str] = field(default_factory=dict)
    """Worker labels it needs (``{"gpu": "true"}``): it runs only on a worker
    with every one of them (label routing)."""

    @property
    def route(self) -> str:
        """Where it may run: its capability, narrowed by its ``requires``."""
        return route_key(self.capability, self.requires)


def route_key(capability: str, requires: Mapping[str, str]) -> str:
    """The queue a subtask waits in: ``llm``, or ``llm[gpu=true,zone=eu]`` when
    it requires labels (sorted, so equal requirements share one queue). Label
    keys and values are plain names (``LABEL_RE``), so the key parses back."""
    if not requires:
        return capability
    return capability + "[" + ",".join(f"{k}={requires[k]}" for k in sorted(requires)) + "]"


def split_route(key: str) -> tuple[str, dict[str, str]]:
    """The capability and required labels of a ``route_key``."""
    if not key.endswith("]") or "[" not in key:
        return key, {}
    capability, _, inner = key[:-1].partition("[")
    return capability, dict(pair.partition("=")[::2] for pair in inner.split(",") if pair)


def satisfies(labels: Mapping[str, str], requires: Mapping[str, str]) -> bool:
    """Whether a worker with ``labels`` may run what ``requires`` these."""
    return all(labels.get(k) == v for k, v in requires.items())


@dataclass(frozen=True, slots=True)
class Plan:
    """A dependency graph of subtasks. ``synthesize`` None means "by the options"."""

    subtasks: tuple[PlannedSubtask, ...]
    synthesize: bool | None = None


class OnFailure(StrEnum):
    """What a task does when one of its subtasks fails for good."""

    FAIL = "fail"
    """The task fails; its other subtasks are cancelled."""
    SKIP = "skip"
    """Dependents of the failed subtask are skipped; the rest run on."""
    REPLAN = "replan"
    """The planner replaces the unfinished part of the graph."""


class Fallback(StrEnum):
    """What a task does when the model cannot produce a valid plan."""

    NONE = "none"
    SINGLE = "single"
    """One subtask carries the whole goal."""


class Aggregate(StrEnum):
    """How a task's final step makes one answer of its last steps' results."""

    SUMMARIZE = "summarize"
    """The model merges them into one answer (a ``synthesize`` llm step)."""
    CONCAT = "concat"
    """No model: the results one after another under their titles."""
    VOTE = "vote"
    """No model: the answer most of them gave (compared without case, spacing
    and end punctuation); with no majority, the most common, earliest first."""
    CRITIC = "critic"
    """A critic pass reviews them and may send one back for another attempt with
    its critique (once); then the model merges them, as ``summarize``."""


AGGREGATE_PARAM = "aggregate"
"""The param of a final step that tells the ``llm`` handler how to aggregate."""
REVIEWED_PARAM = "reviewed"
"""Set to "1" (by ``fail.lua``) on a step whose critic sent one of its inputs back:
its next attempt merges without reviewing again."""


class ContextMode(StrEnum):
    """How the llm handler fits inputs that exceed its context budget."""

    TRUNCATE = "truncate"
    SUMMARIZE = "summarize"


class FailureReason(StrEnum):
    """Why a task failed, for programs; the task's error says it in words."""

    NONE = ""
    PLAN_INVALID = "PLAN_INVALID"
    LLM_UNAVAILABLE = "LLM_UNAVAILABLE"
    SUBTASK_FAILED = "SUBTASK_FAILED"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    REPLAN_FAILED = "REPLAN_FAILED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How a task runs: what the SDK's ``submit`` takes, the CLI fills and
    the supervisor stores. Every field's zero value means "the default"."""

    synthesize: bool | None = None
    """Append a final step that merges the results; None: yes, unless the plan says not."""
    priority: int = 0
    max_parallel: int = 0
    on_failure: OnFailure = OnFailure.FAIL
    max_attempts: int = 0
    """Attempts per subtask; 0: the supervisor's default."""
    subtask_timeout: float = 0.0
    """Seconds one attempt may run; 0: the default for its capability."""
    stall_timeout: float = 0.0
    """Seconds without progress before an attempt is stopped; 0: the supervisor's default."""
    fallback: Fallback = Fallback.NONE
    context_tokens: int = 0
    """Context budget of one llm call; 0: the model's context length."""
    context: ContextMode = ContextMode.TRUNCATE
    max_tokens: int = 0
    """Tokens the task may use, planning included; 0: no limit."""
    max_duration: float = 0.0
    """Seconds from submission the task may take; 0: no limit."""
    cache: bool | None = None
    """Reuse outputs of identical earlier subtasks; None: the supervisor's default."""
    approve_plan: bool = False
    """Stop after planning until a person approves the plan; a replan asks again."""
    aggregate: Aggregate = Aggregate.SUMMARIZE
    """How the final step makes one answer (with ``synthesize``; without, the results
    are concatenated)."""
    max_cost: float = 0.0
    """Money the task's LLM calls may cost, planning included, in the price
    table's currency (``TASKLOOM_PRICES_FILE``); 0: no limit."""

    def check(self) -> None:
        """Each option in its range, or ``InvalidArgument`` naming the field."""
        if self.max_parallel < 0:
            raise InvalidArgument(
                "max_parallel must be 0 (no limit) or more", field="options.max_parallel"
            )
        if not 0 <= self.max_attempts <= 100:
            raise InvalidArgument(
                "max_attempts must be from 1 to 100 (0: the default)",
                field="options.max_attempts",
            )
        for name in ("subtask_timeout", "stall_timeout", "max_duration"):
            if getattr(self, name) < 0:
                raise InvalidArgument(
                    f"{name} must be positive (0: the default)", field=f"options.{name}"
                )
        if self.max_tokens < 0:
            raise InvalidArgument(
                "max_tokens must be positive (0: no limit)", field="options.max_tokens"
            )
        if not 0 <= self.max_cost < 1e12:
            raise InvalidArgument(
                "max_cost must be positive (0: no limit)", field="options.max_cost"
            )
        if self.context_tokens and not 256 <= self.context_tokens <= 10_000_000:
            raise InvalidArgument(
                "context_tokens must be from 256 to 10,000,000 (0: the model's)",
                field="options.context_tokens",
            )

    @classmethod
    def of(cls, base: TaskOptions | None = None, **fields: Any) -> TaskOptions:
        """``base`` (or the defaults) with ``fields`` set, the enums given as
        their values too (``on_failure="skip"``); an unknown field or value is
        ``InvalidArgument``."""
        unknown = sorted(set(fields) - set(OptionFields.__annotations__))
        if unknown:
            raise InvalidArgument(
                f"unknown task option {unknown[0]!r}; the options are "
                + ", ".join(sorted(OptionFields.__annotations__)),
                field=f"options.{unknown[0]}",
            )
        for name, kind in (("on_failure", OnFailure), ("fallback", Fallback),
                           ("context", ContextMode), ("aggregate", Aggregate)):  # fmt: skip
            if name in fields:
                try:
                    fields[name] = kind(fields[name])
                except ValueError:
                    allowed = ", ".join(v.value for v in kind)
                    raise InvalidArgument(
                        f"{name} {fields[name]!r} is not one of {allowed}", field=f"options.{name}"
                    ) from None
        return replace(base or cls(), **fields)

    def to_doc(self) -> dict[str, Any]:
        """The options as JSON-ready values (how the store keeps them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> TaskOptions:
        """The inverse of ``to_doc``; missing keys take their defaults."""
        return cls(
            synthesize=bool(doc.get("synthesize", True)),
            priority=int(doc.get("priority", 0)),
            max_parallel=int(doc.get("max_parallel", 0)),
            on_failure=OnFailure(doc.get("on_failure", OnFailure.FAIL)),
            max_attempts=int(doc.get("max_attempts", 0)),
            subtask_timeout=float(doc.get("subtask_timeout", 0.0)),
            stall_timeout=float(doc.get("stall_timeout", 0.0)),
            fallback=Fallback(doc.get("fallback", Fallback.NONE)),
            context_tokens=int(doc.get("context_tokens", 0)),
            context=ContextMode(doc.get("context", ContextMode.TRUNCATE)),
            max_tokens=int(doc.get("max_tokens", 0)),
            max_duration=float(doc.get("max_duration", 0.0)),
            cache=doc.get("cache"),
            approve_plan=bool(doc.get("approve_plan", False)),
            aggregate=Aggregate(doc.get("aggregate", Aggregate.SUMMARIZE)),
            max_cost=float(doc.get("max_cost", 0.0)),
        )


class OptionFields(TypedDict, total=False):
    """``TaskOptions``' fields as keyword arguments (``submit(goal, priority=2)``);
    enums may be given as their values."""

    synthesize: bool | None
    priority: int
    max_parallel: int
    on_failure: OnFailure | str
    max_attempts: int
    subtask_timeout: float
    stall_timeout: float
    fallback: Fallback | str
    context_tokens: int
    context: ContextMode | str
    max_tokens: int
    max_duration: float
    cache: bool | None
    approve_plan: bool
    aggregate: Aggregate | str
    max_cost: float


@dataclass(frozen=True, slots=True)
class Usage:
    """What LLM calls cost: tokens in and out, seconds spent waiting, calls
    made, and money by model (``taskloom.core.prices``)."""

    input_tokens: int = 0
    output_tokens: int = 0
    model: str = ""
    seconds: float = 0.0
    calls: int = 0
    costs: Mapping[str, float] = field(default_factory=dict)
    """Model (``provider:model``) → what its calls cost, in the price table's currency."""

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cost(self) -> float:
        return sum(self.costs.values(), 0.0)

    def __add__(self, other: Usage) -> Usage:
        models = dict.fromkeys(m for u in (self, other) for m in u.model.split(",") if m)
        costs = dict(self.costs)
        for model, cost in other.costs.items():
            costs[model] = costs.get(model, 0.0) + cost
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            model=",".join(models),
            seconds=self.seconds + other.seconds,
            calls=self.calls + other.calls,
            costs=costs,
        )


@dataclass(frozen=True, slots=True)
class Subtask:
    id: str
    title: str
    instruction: str
    capability: str
    depends_on: tuple[str, ...]
    status: SubtaskStatus
    output: str = ""
    error: str = ""
    attempt: int = 0
    worker: str = ""
    progress: str = ""
    params: Mapping[str, str] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    started_at: float | None = None
    finished_at: float | None = None
    cache_hit: bool = False
    requires_approval: bool = False
    """A person must approve it before it runs."""
    ready_at: float | None = None
    """When its dependencies were done (it became READY, or AWAITING_APPROVAL)."""
    requires: Mapping[str, str] = field(default_factory=dict)
    """Worker labels it needs (label routing)."""


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    goal: str
    status: TaskStatus
    options: TaskOptions
    created_at: float
    updated_at: float
    result: str = ""
    error: str = ""
    finished_at: float | None = None
    subtasks_total: int = 0
    subtasks_succeeded: int = 0
    subtasks: tuple[Subtask, ...] = ()
    plan_version: int = 1
    """Goes up each time the planner replaces a failed subtask."""
    usage: Usage = field(default_factory=Usage)
    """Planning and every attempt, failed ones included."""
    failure_reason: FailureReason = FailureReason.NONE
    owner: str = ""
    """The principal that submitted the task; only it (and admins) may see it."""
    paused: bool = False
    """No new subtask starts until the task is resumed."""


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a task's event log; ``id`` is its Redis stream id."""

    id: str
    time: float
    type: str
    task_id: str
    subtask_id: str = ""
    status: str = ""
    message: str = ""
    attempt: int = 0
    worker: str = ""
    trace_id: str = ""
    """The task's OpenTelemetry trace (hex), when tracing is on."""
    span_id: str = ""
    """The span this event belongs to, where there is one (task, planning)."""
    actor: str = ""
    """Who took the action the event records (approve, retry, pause, ...), if a person did."""

    @property
    def terminal(self) -> bool:
        return self.type in _TERMINAL_EVENTS


@dataclass(frozen=True, slots=True)
class Input:
    """The output of a dependency, as its dependent receives it."""

    subtask_id: str
    title: str
    output: str


@dataclass(frozen=True, slots=True)
class Assignment:
    """One attempt of a subtask handed to a worker."""

    task_id: str
    subtask_id: str
    attempt: int
    capability: str
    title: str
    instruction: str
    goal: str
    inputs: tuple[Input, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    deadline: float | None = None
    trace_context: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 0.0
    """Seconds the attempt may run (``deadline`` is when that ends)."""
    stall_timeout: float = 0.0
    """Seconds without progress before the supervisor stops the attempt (0: never)."""
    context_tokens: int = 0
    context: ContextMode = ContextMode.TRUNCATE
    budget_tokens: int = 0
    """Tokens the task may still use when the attempt starts (0: no limit)."""
    budget_cost: float = 0.0
    """Money the task may still spend when the attempt starts (0: no limit)."""
    ref: AttemptRef = field(init=False, repr=False, compare=False)
    """Which attempt this is (made once: it keys leases and running handlers)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", AttemptRef(self.task_id, self.subtask_id, self.attempt))


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    ref: AttemptRef
    message: str
    text: str = ""
    """Output generated since the last update."""


@dataclass(frozen=True, slots=True)
class SubtaskResult:
    ref: AttemptRef
    output: str
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True)
class SubtaskFailure:
    ref: AttemptRef
    error: str
    retryable: bool = True
    counts: bool = True
    """False when the attempt ended for a reason outside the subtask (its worker
    died or shut down): it does not use up one of the subtask's attempts."""
    usage: Usage = field(default_factory=Usage)
    replan: bool = False
    """The handler asked for the step to be planned again (``ctx.replan``)."""
    send_back: str = ""
    """A dependency the handler (a critic) sends back for another attempt, with
    ``error`` as the critique (``ctx.send_back``)."""
    budget_exceeded: bool = False
    """The attempt stopped where the task's budget ran out: the task ends."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker says about itself in Hello."""

    worker_id: str
    name: str
    capabilities: frozenset[str]
    max_concurrency: int
    labels: Mapping[str, str] = field(default_factory=dict)
    in_flight: tuple[AttemptRef, ...] = ()
    version: str = ""
    cache_keys: Mapping[str, str] = field(default_factory=dict)
    """Capability → fingerprint (handler version, model) for cacheable capabilities."""
