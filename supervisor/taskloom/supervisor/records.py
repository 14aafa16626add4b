"""How tasks, subtasks and events are laid out in Redis, and read back.

The store talks to Redis; this module turns what it reads (hashes, stream
entries, script replies) into the domain model, and the domain model into
what it writes (a task's hash, a plan's rows). The fields of each hash are
listed here, once; the Lua scripts write the same names, and
``tests/supervisor/test_store.py`` checks that nothing else appears.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskloom.core.errors import InvalidArgument
from taskloom.core.model import (
    SYNTHESIZE_ID,
    Assignment,
    AttemptRef,
    ContextMode,
    Event,
    FailureReason,
    Input,
    Plan,
    PlannedSubtask,
    Subtask,
    SubtaskStatus,
    Task,
    TaskOptions,
    TaskStatus,
    Usage,
    split_route,
)
from taskloom.supervisor.outcomes import Handed, Outcome, ReadyItem
from taskloom.supervisor.scripts import (
    AssignmentRow,
    OutcomeReply,
    PlanArgs,
    SubtaskRow,
)

TASK_FIELDS = frozenset(
    {
        # set when the task is created (create.lua)
        "id", "goal", "status", "options", "priority", "on_failure", "stall",
        "max_replans", "replans", "version", "created_at", "updated_at", "total",
        "succeeded", "max_tokens", "max_duration", "ctx_tokens", "ctx_mode", "cache_ttl",
        "traceparent", "trace_id", "owner",
        # set as it runs
        "settled",  # subtasks that ended without succeeding
        "result_from",  # JSON list of the subtasks its result is taken from
        "result", "error", "finished_at", "failure_reason",
        "result_parts",  # set instead of result when it joins too many outputs (lib.lua)
        "first_failure",  # the first subtask failure, for the task's error
        "replan_pending",  # the failed subtask the planner is replacing
        "in_tokens", "out_tokens", "llm_calls", "llm_seconds", "models",  # LLM usage
        "cost", "costs",  # money: the sum, and a JSON map of it by model
        "max_cost",  # set when created, if it has one
        "approve_plan",  # 1: a person approves each plan before it runs
        "awaiting_since",  # when it began to wait for a plan's approval
        "paused",  # 1: nothing new starts
        "failed_by",  # the subtask whose failure ended the task
        "stored",  # bytes it stores, as its owner's budget counts them
        "archived",  # compacted: the finished_at it was compacted at (compact.lua)
    }
)  # fmt: skip
"""The fields of a task's hash (``keys.task``)."""

SUBTASK_FIELDS = frozenset(
    {
        # set when the plan is stored (store_plan in lib.lua, revise.lua)
        "id", "title", "instruction", "capability", "params", "max_attempts", "timeout",
        "created_at",
        "deps",  # JSON list of the ids it depends on
        "dependents",  # JSON list of the ids that depend on it
        "pending",  # how many of its dependencies have not settled
        "tolerant",  # 1: runs after a failed dependency (the synthesis step)
        # set as it runs
        "status", "attempt", "worker", "worker_id", "ready_at", "assigned_at",
        "started_at", "finished_at", "progress", "output", "error", "usage",
        "failures", "lost",  # failed attempts that counted, and attempts lost with a worker
        "retry_at",  # when its retry may start, after the backoff
        "cache_key", "cache_hit",
        "gated",  # 1: a person must approve it before it runs
        "approved",  # 1: a person did
        "provided",  # 1: a person skipped it with an output its dependents run on
        "ended_with_task",  # 1: cancelled because its task ended
        "streamed",  # bytes of streamed text it added to the log (TASKLOOM_MAX_STREAM_BYTES)
        "charged",  # the stopped attempt whose LLM usage was counted (stopped.lua)
    }
)  # fmt: skip
"""The fields of a subtask's hash (``keys.subtask``)."""

EVENT_FIELDS = ("type", "subtask", "status", "message", "attempt", "worker", "trace", "span")
"""The fields of each entry of a task's event stream (``keys.events``), as ``emit`` writes them;
an entry that records what a person did has one more, ``actor``."""

DEFAULT_MAX_ATTEMPTS = 3
"""For a planned subtask that does not say (the orchestrator always does)."""


def new_task_id() -> str:
    """Time-ordered and unguessable: 12 hex digits of milliseconds, 8 random."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def plain(task_id: str) -> bool:
    """Whether ``task_id`` could be one of ours (hex). Anything else cannot
    exist and must not be spliced into a key name."""
    return 0 < len(task_id) <= 64 and task_id.isalnum()


def listed(value: Any) -> list[Any]:
    """A list from a script's reply (cjson writes an empty table as ``{}``)."""
    return value if isinstance(value, list) else []


def mapped(value: Any) -> dict[str, Any]:
    """A map from a script's reply (cjson writes an empty table as ``{}``)."""
    return value if isinstance(value, dict) else {}


# -- writing ---------------------------------------------------------------------------


def task_fields(
    task_id: str,
    goal: str,
    options: TaskOptions,
    *,
    now: float,
    max_replans: int,
    cache_ttl: float,
    trace: Mapping[str, str] | None,
    owner: str,
) -> list[str]:
    """A new task's hash (PLANNING), as a flat HSET list."""
    fields = {
        "id": task_id,
        "goal": goal,
        "status": TaskStatus.PLANNING,
        "options": json.dumps(options.to_doc()),
        "priority": options.priority,
        "on_failure": options.on_failure,
        "stall": repr(options.stall_timeout),
        "max_replans": max_replans,
        "replans": 0,
        "version": 1,
        "created_at": repr(now),
        "updated_at": repr(now),
        "total": 0,
        "succeeded": 0,
        "max_tokens": options.max_tokens,
        "max_duration": f"{options.max_duration:g}",
        "ctx_tokens": options.context_tokens,
        "ctx_mode": options.context,
        "cache_ttl": int(cache_ttl),
        "traceparent": (trace or {}).get("traceparent", ""),
        "trace_id": trace_id(trace),
        "owner": owner,
        "approve_plan": int(options.approve_plan),
        # Only with a budget in money: the scripts read it as 0 when missing.
        **({"max_cost": repr(options.max_cost)} if options.max_cost else {}),
    }
    return [str(x) for kv in fields.items() for x in kv]


def plan_args(plan: Plan, result_from: Sequence[str]) -> PlanArgs:
    """A plan as store_plan (lib.lua) takes it; the synthesis step is tolerant."""
    return PlanArgs(
        list(result_from),
        [subtask_row(s, tolerant=s.id == SYNTHESIZE_ID) for s in plan.subtasks],
    )


def subtask_row(s: PlannedSubtask, *, tolerant: bool = False) -> SubtaskRow:
    return SubtaskRow(
        s.id,
        s.title,
        s.instruction,
        s.route,
        list(s.depends_on),
        json.dumps(dict(s.params)),
        s.max_attempts or DEFAULT_MAX_ATTEMPTS,
        repr(s.timeout),
        int(tolerant),
        int(s.requires_approval),
    )


def ready_items(task_id: str, plan: Plan, ids: Sequence[str], priority: int) -> list[ReadyItem]:
    """The READY subtasks plan.lua reported, for the scheduler's queue."""
    route = {s.id: s.route for s in plan.subtasks}
    return [ReadyItem(task_id, sid, route[sid], priority) for sid in ids]


def usage_doc(usage: Usage) -> str:
    """The usage as JSON; "" for none (a handler that used no LLM), which
    the scripts skip without decoding or checking the budget."""
    if not (usage.input_tokens or usage.output_tokens or usage.calls or usage.model):
        return ""
    return json.dumps(
        {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "model": usage.model,
            "seconds": round(usage.seconds, 6),
            "calls": usage.calls,
            **({"costs": dict(usage.costs)} if usage.costs else {}),
        }
    )


def trace_id(trace: Mapping[str, str] | None) -> str:
    """The trace id in a ``traceparent`` (``00-<trace>-<span>-<flags>``)."""
    parts = (trace or {}).get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else ""


def span_id(trace: Mapping[str, str] | None) -> str:
    parts = (trace or {}).get("traceparent", "").split("-")
    return parts[2] if len(parts) == 4 else ""


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecoveredSubtask:
    subtask_id: str
    status: SubtaskStatus
    attempt: int
    worker_id: str
    worker: str
    capability: str
    deadline: float | None = None
    """When the held attempt's timeout ends (Unix time)."""
    ready_at: float | None = None
    """When it became READY or began to wait for approval (Unix time)."""
    retry_at: float = 0.0
    """When its retry may start (Unix time; 0: at once)."""


RECOVERY_FIELDS = (
    "status",
    "attempt",
    "worker_id",
    "worker",
    "capability",
    "assigned_at",
    "timeout",
    "ready_at",
    "retry_at",
)
"""What recovery reads of each subtask of an unfinished task."""


def recovered_subtask(subtask_id: str, row: Sequence[str | None]) -> RecoveredSubtask | None:
    """A subtask from its ``RECOVERY_FIELDS`` (None if it has no hash)."""
    status, attempt, worker_id, worker, capability, assigned_at, timeout, ready_at, retry_at = row
    if not status:
        return None
    deadline = None
    if assigned_at and timeout and float(timeout):
        deadline = float(assigned_at) + float(timeout)
    return RecoveredSubtask(
        subtask_id,
        SubtaskStatus(status),
        int(attempt or 0),
        worker_id or "",
        worker or "",
        capability or "",
        deadline,
        _time(ready_at),
        float(retry_at or 0.0),
    )


@dataclass(frozen=True, slots=True)
class RecoveredTask:
    """An unfinished task found at start-up."""

    task_id: str
    status: TaskStatus
    goal: str
    options: TaskOptions
    subtasks: tuple[RecoveredSubtask, ...]
    replan_pending: str = ""
    """A subtask whose replacement the planner was asked for when the supervisor stopped."""
    paused: bool = False
    awaiting_since: float | None = None
    """When it began to wait for its plan's approval (None: it does not)."""


def decode_event(task_id: str, event_id: str, fields: Mapping[str, str]) -> Event:
    return Event(
        id=event_id,
        time=int(event_id.split("-", 1)[0]) / 1000.0,
        type=fields.get("type", ""),
        task_id=task_id,
        subtask_id=fields.get("subtask", ""),
        status=fields.get("status", ""),
        message=fields.get("message", ""),
        attempt=int(fields.get("attempt") or 0),
        worker=fields.get("worker", ""),
        trace_id=fields.get("trace", ""),
        span_id=fields.get("span", ""),
        actor=fields.get("actor", ""),
    )


def _time(value: str | None) -> float | None:
    return float(value) if value else None


def decode_options(raw: str | None) -> TaskOptions:
    """The options a task was stored with (``options_doc``)."""
    return TaskOptions.from_doc(json.loads(raw or "{}"))


def decode_usage(doc: Mapping[str, Any]) -> Usage:
    return Usage(
        input_tokens=int(doc.get("input_tokens", 0)),
        output_tokens=int(doc.get("output_tokens", 0)),
        model=str(doc.get("model", "")),
        seconds=float(doc.get("seconds", 0.0)),
        calls=int(doc.get("calls", 0)),
        costs=_costs(doc.get("costs")),
    )


def _costs(doc: Any) -> dict[str, float]:
    return {str(m): float(c) for m, c in doc.items()} if isinstance(doc, dict) else {}


def join_result(from_ids: Sequence[str], outputs: Mapping[str, tuple[str, str]]) -> str:
    """A task's result as ``task_result`` in lib.lua makes it, from each
    subtask's (title, output): for a result the script left to its readers."""
    if len(from_ids) == 1:
        return outputs.get(from_ids[0], ("", ""))[1]
    parts = []
    for sid in from_ids:
        title, output = outputs.get(sid, ("", ""))
        parts.append(f"## {title or sid}\n\n{output}")
    return "\n\n".join(parts)


def result_from(raw: Mapping[str, str]) -> list[str]:
    """The ids a task's result is taken from."""
    return [str(i) for i in listed(json.loads(raw.get("result_from") or "[]"))]


def decode_task(raw: Mapping[str, str], subtasks: tuple[Subtask, ...]) -> Task:
    result = raw.get("result", "")
    if raw.get("result_parts") and subtasks:
        result = join_result(result_from(raw), {s.id: (s.title, s.output) for s in subtasks})
    return Task(
        id=raw["id"],
        goal=raw.get("goal", ""),
        status=TaskStatus(raw["status"]),
        options=decode_options(raw.get("options")),
        created_at=float(raw.get("created_at") or 0.0),
        updated_at=float(raw.get("updated_at") or 0.0),
        result=result,
        error=raw.get("error", ""),
        finished_at=_time(raw.get("finished_at")),
        subtasks_total=int(raw.get("total") or 0),
        subtasks_succeeded=int(raw.get("succeeded") or 0),
        subtasks=subtasks,
        plan_version=int(raw.get("version") or 1),
        usage=Usage(
            input_tokens=int(raw.get("in_tokens") or 0),
            output_tokens=int(raw.get("out_tokens") or 0),
            model=raw.get("models", ""),
            seconds=float(raw.get("llm_seconds") or 0.0),
            calls=int(raw.get("llm_calls") or 0),
            costs=_costs(json.loads(raw.get("costs") or "{}")),
        ),
        failure_reason=FailureReason(raw.get("failure_reason") or ""),
        owner=raw.get("owner", ""),
        paused=raw.get("paused") == "1",
    )


def decode_subtask(raw: Mapping[str, str]) -> Subtask:
    # The stored capability is the subtask's route (see ``route_key``).
    capability, requires = split_route(raw.get("capability", ""))
    return Subtask(
        id=raw["id"],
        title=raw.get("title", ""),
        instruction=raw.get("instruction", ""),
        capability=capability,
        requires=requires,
        depends_on=tuple(json.loads(raw.get("deps") or "[]")),
        status=SubtaskStatus(raw["status"]),
        output=raw.get("output", ""),
        error=raw.get("error", ""),
        attempt=int(raw.get("attempt") or 0),
        worker=raw.get("worker", ""),
        progress=raw.get("progress", ""),
        params=json.loads(raw.get("params") or "{}"),
        usage=decode_usage(json.loads(raw.get("usage") or "{}")),
        started_at=_time(raw.get("started_at")),
        finished_at=_time(raw.get("finished_at")),
        cache_hit=raw.get("cache_hit") == "1",
        requires_approval=raw.get("gated") == "1",
        ready_at=_time(raw.get("ready_at")),
    )


def decode_assignment(
    task_id: str,
    subtask_id: str,
    row: AssignmentRow,
    goals: Mapping[str, str],
    traces: Mapping[str, str],
    now: float,
) -> Assignment:
    """An assignment as assign_one (lib.lua) returns it; ``goals`` and
    ``traces`` are what the script's tasks share."""
    (attempt, title, instruction, capability, params, inputs, timeout, stall,
     context_tokens, context, budget_tokens, budget_cost) = row  # fmt: skip
    traceparent = traces.get(task_id)
    return Assignment(
        task_id=task_id,
        subtask_id=subtask_id,
        attempt=int(attempt),
        capability=split_route(capability)[0],
        title=title or "",
        instruction=instruction or "",
        goal=goals.get(task_id, ""),
        inputs=tuple(Input(d, t, o) for d, t, o in listed(inputs)),
        params=json.loads(params or "{}"),
        deadline=now + float(timeout) if timeout else None,
        timeout=float(timeout),
        stall_timeout=float(stall),
        context_tokens=int(context_tokens),
        context=ContextMode(context or ContextMode.TRUNCATE),
        trace_context={"traceparent": traceparent} if traceparent else {},
        budget_tokens=int(budget_tokens),
        budget_cost=float(budget_cost),
    )


def held_refs(rows: Any) -> list[AttemptRef]:
    return [AttemptRef(t, s, int(a)) for t, s, a in listed(rows)]


def decode_outcome(reply: OutcomeReply) -> Outcome:
    now = time.time()
    goals, traces = mapped(reply.get("goals")), mapped(reply.get("traces"))
    return Outcome(
        committed=[bool(x) for x in listed(reply.get("committed"))],
        ready=[
            ReadyItem(
                t,
                s,
                cap,
                int(prio),
                int(rest[0]) if rest else 0,
                float(rest[1]) if len(rest) > 1 else 0.0,
            )
            for t, s, cap, prio, *rest in listed(reply.get("ready"))
        ],
        finished=list(listed(reply.get("finished"))),
        held=held_refs(reply.get("held")),
        replan=[(t, s) for t, s in listed(reply.get("replan"))],
        finished_status=[str(s) for s in listed(reply.get("statuses"))],
        cached=[str(c) for c in listed(reply.get("cached"))],
        ended={
            task_id: decode_event(
                task_id, eid, {"type": kind, "status": status, "message": message, "trace": trace}
            )
            for task_id, (eid, kind, status, message, trace, *_) in mapped(
                reply.get("ended")
            ).items()
        },
        snapshots={
            task_id: entry[5]
            for task_id, entry in mapped(reply.get("ended")).items()
            if len(entry) > 5
        },
        awaiting=[(t, s) for t, s in listed(reply.get("awaiting"))],
        approved=[(t, s, float(w)) for t, s, w in listed(reply.get("approved"))],
        reopened=[str(t) for t in listed(reply.get("reopened"))],
        handed=[
            Handed(
                ReadyItem(t, s, cap),
                int(w) - 1,
                decode_assignment(t, s, row, goals, traces, now),
            )
            for t, s, cap, w, row in listed(reply.get("handed"))
        ],
    )


def encode_page_token(score: float, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}:{task_id}".encode()).decode()


def decode_snapshot(raw: Any) -> Task:
    """A task as ``snapshot.lua`` (or a script that ended it) read it:
    ``{task: {field: value}, subtasks: [{field: value}, ...]}``."""
    entry = mapped(raw)
    subtasks = tuple(decode_subtask(row) for row in listed(entry.get("subtasks")) if row)
    return decode_task(mapped(entry.get("task")), subtasks)


@dataclass(frozen=True)
class Archive:
    """A compacted task's subtask hashes (in plan order) and its event log."""

    subtasks: list[dict[str, str]]
    events: list[tuple[str, dict[str, str]]]

    def events_after(self, after: str, count: int) -> list[tuple[str, dict[str, str]]]:
        """Up to ``count`` events after the cursor (``""`` or ``"0"``: from the start)."""
        if not after or after == "0":
            return self.events[:count]
        cursor = _stream_id(after)
        return [e for e in self.events if _stream_id(e[0]) > cursor][:count]


def _stream_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)


class ArchiveWriter:
    """What compact.lua stores: JSON, zlib, base64 (Redis is read as text here),
    written a part at a time so that a large task is never all in memory as
    objects. Subtasks of one plan and the entries of one log repeat their
    words, so a subtask with its log takes tens of bytes instead of about 800."""

    def __init__(self) -> None:
        self._zip = zlib.compressobj(6)
        self._parts = [self._zip.compress(b'{"v":1,"subtasks":[')]
        self._section = "subtasks"
        self._first = True

    def _write(self, item: Any) -> None:
        text = json.dumps(item, separators=(",", ":"))
        self._parts.append(self._zip.compress((text if self._first else "," + text).encode()))
        self._first = False

    def subtasks(self, rows: Iterable[Mapping[str, str]]) -> None:
        for row in rows:
            self._write(row)

    def events(self, entries: Iterable[tuple[str, Mapping[str, str]]]) -> None:
        if self._section == "subtasks":
            self._parts.append(self._zip.compress(b'],"events":['))
            self._section, self._first = "events", True
        for event_id, fields in entries:
            self._write([event_id, fields])

    def close(self) -> str:
        self.events(())
        self._parts.append(self._zip.compress(b"]}") + self._zip.flush())
        return base64.b64encode(b"".join(self._parts)).decode()


def encode_archive(
    subtasks: Sequence[Mapping[str, str]], events: Sequence[tuple[str, Mapping[str, str]]]
) -> str:
    """A whole archive at once (``ArchiveWriter``)."""
    writer = ArchiveWriter()
    writer.subtasks(subtasks)
    writer.events(events)
    return writer.close()


def decode_archive(blob: str) -> Archive:
    doc = json.loads(zlib.decompress(base64.b64decode(blob)))
    return Archive(
        [dict(row) for row in doc.get("subtasks", [])],
        [(str(i), dict(f)) for i, f in doc.get("events", [])],
    )


def decode_page_token(token: str) -> tuple[float, str]:
    """The page token → (highest score to list, last task id listed)."""
    if not token:
        return float("inf"), ""
    try:
        score, task_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
        value = float(score)
    except ValueError:
        value, task_id = math.nan, ""
    if not math.isfinite(value) or not plain(task_id):
        raise InvalidArgument("page_token is not one this server issued", field="page_token")
    return value, task_id
