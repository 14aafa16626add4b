"""Protocol buffers ↔ the domain model, on the client's side of the wire."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from taskloom.core.errors import TaskloomError
from taskloom.core.model import (
    ContextMode,
    Event,
    FailureReason,
    Fallback,
    OnFailure,
    Plan,
    Subtask,
    SubtaskStatus,
    Task,
    TaskOptions,
    TaskStatus,
    Usage,
)
from taskloom.core.status import error_from_parts
from taskloom.v1 import tasks_pb2 as pb


def _seconds(ts: Timestamp) -> float:
    """A Unix time as the supervisor sent it. ``ToNanoseconds() / 1e9`` would
    round the big integer to a float first, one float step off now and then."""
    return ts.seconds + ts.nanos / 1e9


def plan_to_pb(plan: Plan) -> pb.Plan:
    return pb.Plan(
        subtasks=[
            pb.PlannedSubtask(
                id=s.id,
                title=s.title,
                instruction=s.instruction,
                capability=s.capability,
                depends_on=list(s.depends_on),
                params=dict(s.params),
                max_attempts=s.max_attempts,
                timeout=_duration(s.timeout) if s.timeout else None,
            )
            for s in plan.subtasks
        ]
    )


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def options_to_pb(options: TaskOptions, *, synthesize: bool | None) -> pb.TaskOptions:
    """The options to send; ``synthesize`` None leaves the choice to the supervisor."""
    message = pb.TaskOptions(
        priority=options.priority,
        max_parallel=options.max_parallel,
        on_failure=pb.OnFailure.Value(f"ON_FAILURE_{options.on_failure.name}"),
        max_attempts=options.max_attempts,
    )
    if options.subtask_timeout:
        message.subtask_timeout.CopyFrom(_duration(options.subtask_timeout))
    if options.stall_timeout:
        message.stall_timeout.CopyFrom(_duration(options.stall_timeout))
    if synthesize is not None:
        message.synthesize = synthesize
    if options.fallback == Fallback.SINGLE:
        message.fallback = pb.FALLBACK_SINGLE
    message.context_tokens = options.context_tokens
    if options.context == ContextMode.SUMMARIZE:
        message.context = pb.CONTEXT_MODE_SUMMARIZE
    message.max_tokens = options.max_tokens
    if options.max_duration:
        message.max_duration.CopyFrom(_duration(options.max_duration))
    if options.cache is not None:
        message.cache = options.cache
    return message


def _usage_from_pb(message: pb.Usage) -> Usage:
    return Usage(
        input_tokens=message.input_tokens,
        output_tokens=message.output_tokens,
        model=message.model,
        seconds=message.duration.ToNanoseconds() / 1e9,
        calls=message.calls,
    )


def status_to_pb(status: TaskStatus) -> pb.TaskStatus.ValueType:
    return pb.TaskStatus.Value(f"TASK_STATUS_{status}")


def task_from_pb(message: pb.Task) -> Task:
    return Task(
        id=message.id,
        goal=message.goal,
        status=TaskStatus(pb.TaskStatus.Name(message.status).removeprefix("TASK_STATUS_")),
        options=TaskOptions(
            synthesize=message.options.synthesize,
            priority=message.options.priority,
            max_parallel=message.options.max_parallel,
            on_failure=OnFailure[
                pb.OnFailure.Name(message.options.on_failure).removeprefix("ON_FAILURE_")
            ]
            if message.options.on_failure
            else OnFailure.FAIL,
            max_attempts=message.options.max_attempts,
            subtask_timeout=message.options.subtask_timeout.ToNanoseconds() / 1e9,
            stall_timeout=message.options.stall_timeout.ToNanoseconds() / 1e9,
            fallback=Fallback.SINGLE
            if message.options.fallback == pb.FALLBACK_SINGLE
            else Fallback.NONE,
            context_tokens=message.options.context_tokens,
            context=ContextMode.SUMMARIZE
            if message.options.context == pb.CONTEXT_MODE_SUMMARIZE
            else ContextMode.TRUNCATE,
            max_tokens=message.options.max_tokens,
            max_duration=message.options.max_duration.ToNanoseconds() / 1e9,
            cache=message.options.cache if message.options.HasField("cache") else None,
        ),
        created_at=_seconds(message.created_at),
        updated_at=_seconds(message.updated_at),
        result=message.result,
        error=message.error,
        finished_at=_seconds(message.finished_at) if message.HasField("finished_at") else None,
        subtasks_total=message.subtasks_total,
        subtasks_succeeded=message.subtasks_succeeded,
        plan_version=message.plan_version or 1,
        subtasks=tuple(_subtask_from_pb(s) for s in message.subtasks),
        usage=_usage_from_pb(message.usage),
        failure_reason=FailureReason(
            pb.FailureReason.Name(message.failure_reason).removeprefix("FAILURE_REASON_")
        )
        if message.failure_reason
        else FailureReason.NONE,
        owner=message.owner,
    )


def _subtask_from_pb(message: pb.Subtask) -> Subtask:
    return Subtask(
        id=message.id,
        title=message.title,
        instruction=message.instruction,
        capability=message.capability,
        depends_on=tuple(message.depends_on),
        status=SubtaskStatus(pb.SubtaskStatus.Name(message.status).removeprefix("SUBTASK_STATUS_")),
        output=message.output,
        error=message.error,
        attempt=message.attempt,
        worker=message.worker,
        progress=message.progress,
        params=dict(message.params),
        usage=_usage_from_pb(message.usage),
        cache_hit=message.cache_hit,
        started_at=_seconds(message.started_at) if message.HasField("started_at") else None,
        finished_at=_seconds(message.finished_at) if message.HasField("finished_at") else None,
    )


def event_from_pb(message: pb.Event) -> Event:
    return Event(
        id=message.id,
        time=_seconds(message.time),
        type=message.type,
        task_id=message.task_id,
        subtask_id=message.subtask_id,
        status=message.status,
        message=message.message,
        attempt=message.attempt,
        worker=message.worker,
        trace_id=message.trace_id,
        span_id=message.span_id,
    )


def error_from_pb(message: pb.TaskError) -> TaskloomError:
    """The error of one refused item of a batch call."""
    return error_from_parts(
        message.type, message.code, message.message, field=message.field, subject=message.subject
    )
