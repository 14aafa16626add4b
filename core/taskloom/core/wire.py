"""Protocol buffers ↔ the domain model: what every side of the wire shares.

Times, durations, usage, task options, plans, attempt references and the
status enums cross the wire in the same form whichever side sends them, so
they are encoded and decoded here, once. Each side's ``codec.py`` builds its
own messages from these pieces; nothing past the codecs sees protobuf.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from taskloom.core.errors import InvalidArgument
from taskloom.core.model import (
    Aggregate,
    AttemptRef,
    ContextMode,
    FailureReason,
    Fallback,
    OnFailure,
    Plan,
    PlannedSubtask,
    SubtaskStatus,
    TaskOptions,
    TaskStatus,
    Usage,
)
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import workers_pb2 as wpb


def split(seconds: float) -> tuple[int, int]:
    """Whole seconds and nanoseconds, as a Timestamp or Duration holds them.
    The fraction is taken before scaling: a Unix time times 1e9 is past the
    precision of a float, and would lose about 200 ns."""
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    if abs(nanos) == 1_000_000_000:  # the fraction rounded up to a whole second
        return whole + nanos // 1_000_000_000, 0
    return whole, nanos


def duration(seconds: float) -> Duration:
    whole, nanos = split(seconds)
    return Duration(seconds=whole, nanos=nanos)


def seconds(value: Duration | Timestamp) -> float:
    """A duration or a Unix time in seconds. (``ToNanoseconds() / 1e9`` would
    round the big integer to a float first, one float step off now and then.)"""
    return value.seconds + value.nanos / 1e9


def timestamp(at: float | None) -> Timestamp | None:
    if at is None:
        return None
    whole, nanos = split(at)
    return Timestamp(seconds=whole, nanos=nanos)


def time_of(message: object, field: str) -> float | None:
    """The Unix time in ``message.field``, or None if it is unset."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    return seconds(getattr(message, field))


# -- usage ---------------------------------------------------------------------------


def usage_to_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        model=usage.model,
        duration=duration(usage.seconds),
        calls=usage.calls,
        costs=dict(usage.costs),
    )


def usage_from_pb(message: pb.Usage) -> Usage:
    return Usage(
        input_tokens=message.input_tokens,
        output_tokens=message.output_tokens,
        model=message.model,
        seconds=seconds(message.duration),
        calls=message.calls,
        costs=_costs(message.costs),
    )


def _costs(costs: Mapping[str, float]) -> dict[str, float]:
    """Costs as sent: finite and not negative, whoever sent them."""
    return {m: c for m, c in costs.items() if math.isfinite(c) and c >= 0}


# -- options and plans -------------------------------------------------------------

_ON_FAILURE = {
    OnFailure.FAIL: pb.ON_FAILURE_FAIL,
    OnFailure.SKIP: pb.ON_FAILURE_SKIP,
    OnFailure.REPLAN: pb.ON_FAILURE_REPLAN,
}
_FALLBACK = {Fallback.NONE: pb.FALLBACK_NONE, Fallback.SINGLE: pb.FALLBACK_SINGLE}
_AGGREGATE = {
    Aggregate.SUMMARIZE: pb.AGGREGATE_SUMMARIZE,
    Aggregate.CONCAT: pb.AGGREGATE_CONCAT,
    Aggregate.VOTE: pb.AGGREGATE_VOTE,
    Aggregate.CRITIC: pb.AGGREGATE_CRITIC,
}
_CONTEXT = {
    ContextMode.TRUNCATE: pb.CONTEXT_MODE_TRUNCATE,
    ContextMode.SUMMARIZE: pb.CONTEXT_MODE_SUMMARIZE,
}


def _inverse(table: dict[object, int]) -> dict[int, object]:
    return {v: k for k, v in table.items()}


_ON_FAILURE_FROM = _inverse(_ON_FAILURE)  # type: ignore[arg-type]
_FALLBACK_FROM = _inverse(_FALLBACK)  # type: ignore[arg-type]
_CONTEXT_FROM = _inverse(_CONTEXT)  # type: ignore[arg-type]
_AGGREGATE_FROM = _inverse(_AGGREGATE)  # type: ignore[arg-type]


def context_to_pb(mode: ContextMode) -> pb.ContextMode.ValueType:
    return _CONTEXT[mode]


def context_from_pb(value: int) -> ContextMode:
    return _CONTEXT_FROM.get(value, ContextMode.TRUNCATE)  # type: ignore[return-value]


def options_to_pb(options: TaskOptions) -> pb.TaskOptions:
    """The options as sent; unset durations and a None ``synthesize`` or
    ``cache`` are left out (the receiver's defaults apply)."""
    message = pb.TaskOptions(
        priority=options.priority,
        max_parallel=options.max_parallel,
        on_failure=_ON_FAILURE[options.on_failure],
        max_attempts=options.max_attempts,
        fallback=_FALLBACK[options.fallback],
        context_tokens=options.context_tokens,
        context=_CONTEXT[options.context],
        max_tokens=options.max_tokens,
        approve_plan=options.approve_plan,
        aggregate=_AGGREGATE[options.aggregate],
        max_cost=options.max_cost,
    )
    for name in ("subtask_timeout", "stall_timeout", "max_duration"):
        value = getattr(options, name)
        if value:
            getattr(message, name).CopyFrom(duration(value))
    if options.synthesize is not None:
        message.synthesize = options.synthesize
    if options.cache is not None:
        message.cache = options.cache
    return message


def options_from_pb(message: pb.TaskOptions) -> TaskOptions:
    return TaskOptions(
        synthesize=message.synthesize if message.HasField("synthesize") else None,
        priority=message.priority,
        max_parallel=message.max_parallel,
        on_failure=_ON_FAILURE_FROM.get(message.on_failure, OnFailure.FAIL),  # type: ignore[arg-type]
        max_attempts=message.max_attempts,
        subtask_timeout=seconds(message.subtask_timeout),
        stall_timeout=seconds(message.stall_timeout),
        fallback=_FALLBACK_FROM.get(message.fallback, Fallback.NONE),  # type: ignore[arg-type]
        context_tokens=message.context_tokens,
        context=context_from_pb(message.context),
        max_tokens=message.max_tokens,
        max_duration=seconds(message.max_duration),
        cache=message.cache if message.HasField("cache") else None,
        approve_plan=message.approve_plan,
        aggregate=_AGGREGATE_FROM.get(message.aggregate, Aggregate.SUMMARIZE),  # type: ignore[arg-type]
        max_cost=message.max_cost,
    )


def plan_to_pb(plan: Plan) -> pb.Plan:
    message = pb.Plan()
    for s in plan.subtasks:
        out = message.subtasks.add(
            id=s.id,
            title=s.title,
            instruction=s.instruction,
            capability=s.capability,
            depends_on=list(s.depends_on),
            params=dict(s.params),
            max_attempts=s.max_attempts,
            requires_approval=s.requires_approval,
            requires=dict(s.requires),
        )
        if s.timeout:
            out.timeout.CopyFrom(duration(s.timeout))
    return message


def plan_from_pb(message: pb.Plan) -> Plan:
    return Plan(
        subtasks=tuple(
            PlannedSubtask(
                id=s.id,
                title=s.title,
                instruction=s.instruction,
                capability=s.capability,
                depends_on=tuple(s.depends_on),
                params=dict(s.params),
                max_attempts=s.max_attempts,
                timeout=seconds(s.timeout),
                requires_approval=s.requires_approval,
                requires=dict(s.requires),
            )
            for s in message.subtasks
        )
    )


# -- statuses ------------------------------------------------------------------------


def task_status_to_pb(status: TaskStatus) -> pb.TaskStatus.ValueType:
    return pb.TaskStatus.Value(f"TASK_STATUS_{status}")


def task_status_from_pb(value: int) -> TaskStatus:
    return TaskStatus(pb.TaskStatus.Name(value).removeprefix("TASK_STATUS_"))  # type: ignore[arg-type]


def task_statuses_from_pb(values: Iterable[int]) -> list[TaskStatus]:
    """Statuses a caller asked for; 0 (unspecified) is ignored, an unknown
    number is ``InvalidArgument``."""
    known = pb.TaskStatus.values()
    unknown = [v for v in values if v not in known]
    if unknown:
        raise InvalidArgument(f"statuses: {unknown[0]} is not a TaskStatus", field="statuses")
    return [task_status_from_pb(v) for v in values if v]


def subtask_status_to_pb(status: SubtaskStatus) -> pb.SubtaskStatus.ValueType:
    return pb.SubtaskStatus.Value(f"SUBTASK_STATUS_{status}")


def subtask_status_from_pb(value: int) -> SubtaskStatus:
    return SubtaskStatus(
        pb.SubtaskStatus.Name(value).removeprefix("SUBTASK_STATUS_")  # type: ignore[arg-type]
    )


def failure_reason_to_pb(reason: FailureReason) -> pb.FailureReason.ValueType:
    if not reason:
        return pb.FAILURE_REASON_UNSPECIFIED
    return pb.FailureReason.Value(f"FAILURE_REASON_{reason.value}")


def failure_reason_from_pb(value: int) -> FailureReason:
    if not value:
        return FailureReason.NONE
    return FailureReason(
        pb.FailureReason.Name(value).removeprefix("FAILURE_REASON_")  # type: ignore[arg-type]
    )


# -- attempts --------------------------------------------------------------------------


def ref_to_pb(ref: AttemptRef) -> wpb.AttemptRef:
    return wpb.AttemptRef(task_id=ref.task_id, subtask_id=ref.subtask_id, attempt=ref.attempt)


def ref_from_pb(message: wpb.AttemptRef) -> AttemptRef:
    return AttemptRef(message.task_id, message.subtask_id, message.attempt)
