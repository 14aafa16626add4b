"""The contract between the store and its Lua scripts, named on both sides.

Every script runs with five arguments (named at the top of ``lua/lib.lua``):
the key prefix, the time, the retention, the payload as JSON, and the
caller's fencing token. A payload, and each row inside it, is a JSON array
whose slots are the fields of one of the ``NamedTuple`` types below (a
NamedTuple encodes as an array, so the wire stays as small as positional
arguments). Each script unpacks them into locals of the same names, on a line
that says which type it reads::

    local task, sub, attempt, output, usage, worker_id = unpack(item) -- CompleteItem

and ``tests/supervisor/test_scripts.py`` holds the two sides to each other.
Every script replies with one JSON object, typed here as a ``TypedDict``.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, NotRequired, TypedDict

SCRIPTS = (
    "create",
    "plan",
    "assign",
    "start",
    "progress",
    "complete",
    "fail",
    "finish",
    "note",
    "lead",
    "cancel_subtask",
    "stopped",
    "revise",
    "spend",
    "expire",
    "approve",
    "reject",
    "rework",
    "pause",
    "stage",
    "release",
    "ratelimit",
    "snapshot",
    "compact",
    "restore",
)
"""The scripts in ``lua/``, each loaded with ``lib.lua`` in front of it."""

FENCED = "TASKLOOM_FENCED"
"""The start of the error a script returns when the caller does not hold the leader lease."""


# -- payloads ------------------------------------------------------------------------


class OfferedSlot(NamedTuple):
    """Free slots of one worker that a write may fill (see hand_out in lib.lua)."""

    worker_id: str
    worker: str
    fingerprint: str
    """What besides its inputs decides a cacheable subtask's output on this worker."""
    slots: int


Offer = dict[str, list[OfferedSlot]] | Literal[False]
"""Free worker slots by capability (``outcomes.OfferedSlots``), or false for none."""


class SubtaskRow(NamedTuple):
    """One planned subtask as store_plan (lib.lua) and revise.lua store it."""

    id: str
    title: str
    instruction: str
    capability: str
    deps: list[str]
    params: str
    """JSON object of the handler's parameters."""
    max_attempts: int
    timeout: str
    """Seconds, as ``repr(float)``."""
    tolerant: int
    """1: it runs even after a dependency failed (the synthesis step)."""
    gated: int
    """1: a person must approve it before it runs."""


class StagedPlan(NamedTuple):
    """A plan that stage.lua wrote in parts before create.lua makes it visible."""

    subtasks: int
    size: int
    """Its bytes, as its owner's budget counts them."""
    roots: list[list[str]]
    """[id, capability] of each subtask READY from the start."""
    waiting: list[str]
    """The first subtasks that wait for a person's approval."""


class PlanArgs(NamedTuple):
    result_from: list[str]
    rows: list[SubtaskRow]
    staged: StagedPlan | Literal[False] = False


class StageArgs(NamedTuple):
    task: str
    rows: list[SubtaskRow]
    dependents: dict[str, list[str]]
    """The ids that depend on each row's subtask (its dependents may be in
    other parts of the plan)."""
    hold: bool
    """The plan waits for approval: nothing is READY yet."""


class Budget(NamedTuple):
    """What the owner may have, and what the new task adds."""

    max_subtasks: int
    """Subtasks of the owner's unfinished tasks (0: no limit)."""
    max_bytes: int
    """Bytes the owner stores until they expire (0: no limit)."""
    subtasks: int
    size: int


class RateArgs(NamedTuple):
    bucket: str
    """The limit's model pattern (``TASKLOOM_RATE_LIMITS``)."""
    rpm: int
    tpm: int
    requests: int
    """0: take ``tokens`` whatever is left (a reply's, after its call)."""
    tokens: int
    pause: float
    """Seconds to refuse everyone (a provider's 429); 0: none."""
    burst: float
    """Seconds of its rate the bucket holds."""


class SnapshotArgs(NamedTuple):
    task_ids: list[str]
    max_subtasks: int
    """A task with more subtasks is left out of the reply."""


class CompactArgs(NamedTuple):
    """Compact a finished task as it was read (compact.lua)."""

    task: str
    token: str
    """The task's ``finished_at`` as read: compact only that ending of it."""
    blob: str
    """Its subtasks and log, as ``records.encode_archive`` packs them."""
    last_event: str
    """The id of its newest event as read ('' if none)."""
    subs: list[str]
    """The subtask hashes this call deletes."""
    first: int
    """1: the first call, which stores the archive; 0: a later one."""


class RestoreArgs(NamedTuple):
    """Put a compacted task back as it was (restore.lua)."""

    task: str
    token: str
    """Its ``archived`` field as read."""
    subtasks: list[list[str]]
    """Each subtask: its id, then its fields and values."""
    events: list[list[str]]
    """Each event: its id, then its fields and values."""


class CompactReply(TypedDict):
    done: list[int]
    """For each item: 1 if it was compacted (or its part deleted)."""


class RateReply(TypedDict):
    wait: float
    """0: taken; else seconds until the bucket would have it."""


class ReleaseArgs(NamedTuple):
    tasks: list[str]
    """Tasks whose keys have expired: their bytes leave their owners' usage."""


class CreateArgs(NamedTuple):
    task: str
    idem: str
    """The idempotency key's Redis key ('' for none)."""
    owner: str
    max_in_flight: int
    """The owner's limit on unfinished tasks (0: none)."""
    fields: list[str]
    """The task hash, as a flat HSET list."""
    deadline: float
    """When max_duration runs out (Unix seconds; 0: never)."""
    message: str
    span: str
    plan: PlanArgs | Literal[False]
    offer: Offer
    limits: dict[str, int]
    """Task → how many more attempts may run (max_parallel)."""
    priority: int
    budget: Budget


class StorePlanArgs(NamedTuple):
    task: str
    result_from: list[str]
    rows: list[SubtaskRow]


class AssignItem(NamedTuple):
    task: str
    sub: str
    worker_id: str
    worker: str
    fingerprint: str


class StartItem(NamedTuple):
    task: str
    sub: str
    attempt: int
    worker_id: str


class ProgressItem(NamedTuple):
    task: str
    sub: str
    attempt: int
    message: str
    text: str
    worker_id: str
    stream_budget: int
    """Bytes of streamed text the subtask may add to the log in all."""


class CompleteItem(NamedTuple):
    task: str
    sub: str
    attempt: int
    output: str
    usage: str
    """JSON of the attempt's LLM usage, '' for none."""
    worker_id: str
    """'' for the supervisor's own verdicts; else only that worker's attempts count."""


class CompleteArgs(NamedTuple):
    items: list[CompleteItem]
    offer: Offer
    limits: dict[str, int]


class FailItem(NamedTuple):
    task: str
    sub: str
    attempt: int
    error: str
    retryable: int
    counts: int
    """0: the attempt was lost with its worker and does not use up an attempt."""
    usage: str
    worker_id: str
    jitter: float
    """The share of the backoff this retry waits (0.5 to 1)."""
    wants_replan: int = 0
    """1: the handler asked for the step to be planned again."""
    send_back: str = ""
    """A dependency the handler sends back for another attempt ('' for none)."""
    budget_exceeded: int = 0
    """1: the worker stopped the attempt where the task's budget ran out."""


class FailArgs(NamedTuple):
    items: list[FailItem]
    backoff: float
    """Seconds before the second attempt; it doubles for each failure ..."""
    backoff_max: float
    """... up to this."""


class FinishArgs(NamedTuple):
    task: str
    status: str
    error: str
    event_type: str
    expected: list[str]
    failure_reason: str


class NoteArgs(NamedTuple):
    task: str
    expected: str
    event_type: str
    message: str
    span: str


class LeadArgs(NamedTuple):
    op: Literal["acquire", "renew", "release"]
    holder: str
    """acquire: who asks; renew and release: the token held."""
    ttl_ms: int


class CancelSubtaskArgs(NamedTuple):
    task: str
    sub: str
    reason: str


class StoppedItem(NamedTuple):
    task: str
    sub: str
    attempt: int
    worker: str
    usage: str
    """What the attempt's LLM calls had used (``usage_doc``)."""
    worker_id: str


class ReviseArgs(NamedTuple):
    task: str
    failed: str
    version: int
    rows: list[SubtaskRow]
    sinks: list[str]
    message: str


class SpendArgs(NamedTuple):
    task: str
    usage: str


class ExpireArgs(NamedTuple):
    limit: int


class ApproveArgs(NamedTuple):
    """A plan's approval (``sub`` ''), or a subtask's."""

    task: str
    sub: str
    actor: str
    reason: str
    plan: PlanArgs | Literal[False]
    """An edited plan replacing the one waiting (only before anything ran)."""


class RejectArgs(NamedTuple):
    task: str
    sub: str
    actor: str
    reason: str


class ReworkArgs(NamedTuple):
    """Run a subtask again (``retry``), or skip it with an output (``skip``)."""

    op: Literal["retry", "skip"]
    task: str
    sub: str
    actor: str
    reason: str
    text: str | Literal[False]
    """retry: a new instruction (false: the same); skip: the output."""


class PauseArgs(NamedTuple):
    task: str
    paused: int
    """1: pause; 0: resume."""
    actor: str
    reason: str


class ReadyRow(NamedTuple):
    """A subtask made READY, in replies; rows from fail.lua add the attempt
    that failed (for the backoff), the others stop at ``priority``."""

    task: str
    sub: str
    capability: str
    priority: int
    failed_attempt: int
    retry_at: float
    """When the retry may start (Unix seconds; 0: at once)."""


PAYLOADS: tuple[type[tuple[Any, ...]], ...] = (
    OfferedSlot,
    ReadyRow,
    SubtaskRow,
    PlanArgs,
    CreateArgs,
    StorePlanArgs,
    AssignItem,
    StartItem,
    ProgressItem,
    CompleteItem,
    CompleteArgs,
    FailItem,
    FailArgs,
    FinishArgs,
    NoteArgs,
    LeadArgs,
    CancelSubtaskArgs,
    StoppedItem,
    ReviseArgs,
    SpendArgs,
    RateArgs,
    SnapshotArgs,
    CompactArgs,
    RestoreArgs,
    ExpireArgs,
    ApproveArgs,
    RejectArgs,
    ReworkArgs,
    PauseArgs,
    StagedPlan,
    StageArgs,
    Budget,
    ReleaseArgs,
)
"""Every row type of payloads and replies; each is unpacked by name in at least one script."""


# -- replies ---------------------------------------------------------------------------

HeldRow = list[Any]
"""``[task, sub, attempt]``: an attempt a worker holds in a task that just ended."""
EndedRow = list[str]
"""``[event id, type, status, message, trace id]``: a task's terminal event."""
HandedRow = list[Any]
"""``[task, sub, capability, worker (1-based), AssignmentRow]``."""
AssignmentRow = list[Any]
"""``[attempt, title, instruction, capability, params, inputs, timeout, stall,
context_tokens, context, budget_tokens, budget_cost]``, inputs being ``[[dep,
title, output], ...]``."""


class OutcomeReply(TypedDict, total=False):
    """What a transition changed (every key may be missing: cjson writes an
    empty table as ``{}``, a list or a map alike)."""

    committed: list[int]
    ready: list[list[Any]]
    finished: list[str]
    statuses: list[str]
    held: list[HeldRow]
    replan: list[list[str]]
    cached: list[str]
    handed: list[HandedRow]
    ended: dict[str, EndedRow]
    goals: dict[str, str]
    """Task → goal, for the assignments in ``handed``."""
    traces: dict[str, str]
    """Task → traceparent, for the assignments in ``handed``."""
    awaiting: list[list[str]]
    """``[task, sub]`` that began to wait for approval (sub '' for a plan)."""
    approved: list[list[Any]]
    """``[task, sub, seconds waited]`` approved or rejected by a person."""
    reopened: list[str]
    """Tasks that had ended and run again."""


class CreateReply(TypedDict):
    task: str
    """The new task, or the one the idempotency key names."""
    created: int
    """1: created; 0: the idempotency key named ``task``; -1: the owner is at its
    limit of unfinished tasks; -2: of unfinished subtasks; -3: of stored bytes."""
    outcome: OutcomeReply
    in_use: NotRequired[int]
    """With -2 and -3: what the owner has now."""


class StorePlanReply(TypedDict, total=False):
    ok: int
    """0: the task is no longer PLANNING."""
    ready: list[str]
    awaiting: list[list[str]]


class AssignReply(OutcomeReply, total=False):
    assigned: list[list[Any]]
    """``[index (1-based), *AssignmentRow]`` per item assigned."""
    hits: list[int]
    """Indexes of the items answered from the cache."""


class CommittedReply(TypedDict):
    committed: list[int]
    """Per item: 1 if it counted, 0 if it was stale."""


class FinishReply(OutcomeReply, total=False):
    status: str
    """What the task was in ('' if there is no such task)."""


class OkReply(TypedDict):
    ok: int


class LeadReply(TypedDict, total=False):
    ok: int
    token: str
    """The token holding the lease now ('' for none)."""
    was: str
    """After an acquire: the token of this holder's earlier lease it replaced ('' for none)."""


class CancelSubtaskReply(OutcomeReply, total=False):
    task_status: str
    sub_status: str
    changed: int


class ReviseReply(OutcomeReply, total=False):
    ok: int


class ControlReply(OutcomeReply, total=False):
    """What an action of a person changed, or why it changed nothing."""

    task_status: str
    """The task's status as found ('' if there is no such task)."""
    sub_status: str
    """The subtask's status as found ('' if there is no such subtask)."""
    refused: str
    """Why nothing changed, in words ('' if the action was taken)."""
    conflict: int
    """1: refused for the state of the task or subtask (else: a bad request)."""
    archived: int
    """1: nothing changed, the task is compacted (rework: restore it, ask again)."""
