"""Protocol buffers ↔ the domain model, on the supervisor's side of the wire."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from taskloom.core.errors import InvalidArgument, TaskloomError
from taskloom.core.model import (
    Assignment,
    AttemptRef,
    ContextMode,
    Event,
    Fallback,
    OnFailure,
    Plan,
    PlannedSubtask,
    ProgressUpdate,
    Subtask,
    SubtaskFailure,
    SubtaskResult,
    SubtaskStatus,
    Task,
    TaskOptions,
    TaskStatus,
    Usage,
    WorkerInfo,
)
from taskloom.core.status import error_detail, status_code
from taskloom.supervisor.scheduler import (
    AckReports,
    AssignBatch,
    CancelAttempts,
    DrainNotice,
    Outgoing,
)
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import workers_pb2 as wpb


def _split(seconds: float) -> tuple[int, int]:
    """Whole seconds and nanoseconds, as a Timestamp or Duration holds them.
    The fraction is taken before scaling: a Unix time times 1e9 is past the
    precision of a float, and would lose about 200 ns."""
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    if abs(nanos) == 1_000_000_000:  # the fraction rounded up to a whole second
        return whole + nanos // 1_000_000_000, 0
    return whole, nanos


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    whole, nanos = _split(seconds)
    return Timestamp(seconds=whole, nanos=nanos)


def _duration(seconds: float) -> Duration:
    whole, nanos = _split(seconds)
    return Duration(seconds=whole, nanos=nanos)


# -- tasks --------------------------------------------------------------------


def options_from_pb(message: pb.TaskOptions) -> TaskOptions:
    return TaskOptions(
        synthesize=message.synthesize if message.HasField("synthesize") else True,
        priority=message.priority,
        max_parallel=message.max_parallel,
        on_failure=_ON_FAILURE.get(message.on_failure, OnFailure.FAIL),
        max_attempts=message.max_attempts,
        subtask_timeout=message.subtask_timeout.ToNanoseconds() / 1e9,
        stall_timeout=message.stall_timeout.ToNanoseconds() / 1e9,
        fallback=Fallback.SINGLE if message.fallback == pb.FALLBACK_SINGLE else Fallback.NONE,
        context_tokens=message.context_tokens,
        context=_CONTEXT_FROM_PB.get(message.context, ContextMode.TRUNCATE),
        max_tokens=message.max_tokens,
        max_duration=message.max_duration.ToNanoseconds() / 1e9,
        cache=message.cache if message.HasField("cache") else None,
    )


_CONTEXT_FROM_PB = {
    pb.CONTEXT_MODE_TRUNCATE: ContextMode.TRUNCATE,
    pb.CONTEXT_MODE_SUMMARIZE: ContextMode.SUMMARIZE,
}
_CONTEXT_TO_PB = {v: k for k, v in _CONTEXT_FROM_PB.items()}


def usage_to_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        model=usage.model,
        duration=_duration(usage.seconds),
        calls=usage.calls,
    )


def usage_from_pb(message: pb.Usage) -> Usage:
    return Usage(
        input_tokens=message.input_tokens,
        output_tokens=message.output_tokens,
        model=message.model,
        seconds=message.duration.ToNanoseconds() / 1e9,
        calls=message.calls,
    )


_ON_FAILURE = {
    pb.ON_FAILURE_FAIL: OnFailure.FAIL,
    pb.ON_FAILURE_SKIP: OnFailure.SKIP,
    pb.ON_FAILURE_REPLAN: OnFailure.REPLAN,
}


def _options_to_pb(options: TaskOptions) -> pb.TaskOptions:
    return pb.TaskOptions(
        synthesize=options.synthesize,
        priority=options.priority,
        max_parallel=options.max_parallel,
        on_failure=pb.OnFailure.Value(f"ON_FAILURE_{options.on_failure.name}"),
        max_attempts=options.max_attempts,
        subtask_timeout=_duration(options.subtask_timeout),
        stall_timeout=_duration(options.stall_timeout),
        fallback=pb.FALLBACK_SINGLE if options.fallback == Fallback.SINGLE else pb.FALLBACK_NONE,
        context_tokens=options.context_tokens,
        context=_CONTEXT_TO_PB[options.context],
        max_tokens=options.max_tokens,
        max_duration=_duration(options.max_duration),
        cache=options.cache,
    )


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
                timeout=s.timeout.ToNanoseconds() / 1e9,
            )
            for s in message.subtasks
        )
    )


def statuses_from_pb(values: Iterable[pb.TaskStatus.ValueType]) -> list[TaskStatus]:
    known = pb.TaskStatus.values()
    unknown = [v for v in values if v not in known]
    if unknown:
        raise InvalidArgument(f"statuses: {unknown[0]} is not a TaskStatus", field="statuses")
    return [TaskStatus(pb.TaskStatus.Name(v).removeprefix("TASK_STATUS_")) for v in values if v]


def task_to_pb(task: Task) -> pb.Task:
    return pb.Task(
        id=task.id,
        goal=task.goal,
        status=pb.TaskStatus.Value(f"TASK_STATUS_{task.status}"),
        result=task.result,
        error=task.error,
        options=_options_to_pb(task.options),
        created_at=_timestamp(task.created_at),
        updated_at=_timestamp(task.updated_at),
        finished_at=_timestamp(task.finished_at),
        subtasks_total=task.subtasks_total,
        subtasks_succeeded=task.subtasks_succeeded,
        plan_version=task.plan_version,
        subtasks=[_subtask_to_pb(s) for s in task.subtasks],
        usage=usage_to_pb(task.usage),
        failure_reason=pb.FailureReason.Value(f"FAILURE_REASON_{task.failure_reason.value}")
        if task.failure_reason
        else pb.FAILURE_REASON_UNSPECIFIED,
        owner=task.owner,
    )


def _subtask_to_pb(sub: Subtask) -> pb.Subtask:
    return pb.Subtask(
        id=sub.id,
        title=sub.title,
        instruction=sub.instruction,
        capability=sub.capability,
        depends_on=list(sub.depends_on),
        status=_subtask_status(sub.status),
        output=sub.output,
        error=sub.error,
        attempt=sub.attempt,
        worker=sub.worker,
        progress=sub.progress,
        params=dict(sub.params),
        usage=usage_to_pb(sub.usage),
        started_at=_timestamp(sub.started_at),
        finished_at=_timestamp(sub.finished_at),
        cache_hit=sub.cache_hit,
    )


def _subtask_status(status: SubtaskStatus) -> pb.SubtaskStatus.ValueType:
    return pb.SubtaskStatus.Value(f"SUBTASK_STATUS_{status}")


def event_to_pb(event: Event) -> pb.Event:
    return pb.Event(
        id=event.id,
        time=_timestamp(event.time),
        type=event.type,
        task_id=event.task_id,
        subtask_id=event.subtask_id,
        status=event.status,
        message=event.message,
        attempt=event.attempt,
        worker=event.worker,
        trace_id=event.trace_id,
        span_id=event.span_id,
    )


# -- workers ------------------------------------------------------------------


def error_to_pb(error: TaskloomError) -> pb.TaskError:
    """One refused item of a batch call, as SubmitTask's status would have said it."""
    field, subject = error_detail(error)
    return pb.TaskError(
        code=status_code(error).value[0],
        message=error.message,
        type=type(error).__name__,
        field=field,
        subject=subject,
    )


def ref_from_pb(message: wpb.AttemptRef) -> AttemptRef:
    return AttemptRef(message.task_id, message.subtask_id, message.attempt)


def _ref_to_pb(ref: AttemptRef) -> wpb.AttemptRef:
    return wpb.AttemptRef(task_id=ref.task_id, subtask_id=ref.subtask_id, attempt=ref.attempt)


def worker_info_from_pb(hello: wpb.Hello) -> WorkerInfo:
    return WorkerInfo(
        worker_id=hello.worker_id,
        name=hello.name or hello.worker_id,
        capabilities=frozenset(hello.capabilities),
        max_concurrency=hello.max_concurrency,
        labels=dict(hello.labels),
        in_flight=tuple(ref_from_pb(r) for r in hello.in_flight),
        version=hello.version,
        cache_keys=dict(hello.cache_keys),
    )


def progress_from_pb(message: wpb.Progress) -> list[ProgressUpdate]:
    return [ProgressUpdate(ref_from_pb(u.ref), u.message, u.text) for u in message.updates]


def results_from_pb(message: wpb.Completed) -> list[SubtaskResult]:
    return [
        SubtaskResult(ref_from_pb(r.ref), r.output, usage_from_pb(r.usage)) for r in message.results
    ]


def stopped_from_pb(message: wpb.Stopped) -> list[AttemptRef]:
    return [ref_from_pb(r) for r in message.refs]


def failures_from_pb(message: wpb.Failed) -> list[SubtaskFailure]:
    return [
        SubtaskFailure(
            ref_from_pb(f.ref),
            f.error,
            f.retryable,
            counts=not f.handed_back,
            usage=usage_from_pb(f.usage),
        )
        for f in message.failures
    ]


def welcome_to_pb(
    session_id: str,
    supervisor_id: str,
    heartbeat_interval: float,
    lease_ttl: float,
    *,
    max_output_bytes: int = 0,
    truncate_output: bool = False,
) -> wpb.ConnectResponse:
    return wpb.ConnectResponse(
        welcome=wpb.Welcome(
            session_id=session_id,
            supervisor_id=supervisor_id,
            heartbeat_interval=_duration(heartbeat_interval),
            lease_ttl=_duration(lease_ttl),
            max_output_bytes=max_output_bytes,
            truncate_output=truncate_output,
            idle_silence=True,
        )
    )


def _assign_to_pb(assignments: Iterable[Assignment]) -> wpb.Assign:
    # The hot path's encoder (about 11% of the supervisor under load): fields
    # are set in place, and the empty ones not at all, which is twice as fast
    # as building each message and submessage from keyword arguments.
    message = wpb.Assign()
    add = message.assignments.add
    for a in assignments:
        out = add(
            task_id=a.task_id,
            subtask_id=a.subtask_id,
            attempt=a.attempt,
            capability=a.capability,
            title=a.title,
            instruction=a.instruction,
            goal=a.goal,
            context_tokens=a.context_tokens,
            context=_CONTEXT_TO_PB[a.context],
        )
        if a.inputs:
            out.inputs.extend(
                wpb.Input(subtask_id=i.subtask_id, title=i.title, output=i.output) for i in a.inputs
            )
        if a.params:
            out.params.update(a.params)
        if a.trace_context:
            out.trace_context.update(a.trace_context)
        if a.deadline is not None:
            out.deadline.seconds, out.deadline.nanos = _split(a.deadline)
        if a.timeout:
            out.timeout.seconds, out.timeout.nanos = _split(a.timeout)
    return message


def outgoing_to_pb(message: Outgoing) -> wpb.ConnectResponse:
    """One frame for the worker (CloseSession is not a frame; the caller handles it)."""
    match message:
        case AssignBatch(assignments):
            return wpb.ConnectResponse(assign=_assign_to_pb(assignments))
        case CancelAttempts(refs, reason):
            return wpb.ConnectResponse(
                cancel=wpb.Cancel(refs=[_ref_to_pb(r) for r in refs], reason=reason)
            )
        case AckReports(refs):
            return wpb.ConnectResponse(ack=wpb.Ack(refs=[_ref_to_pb(r) for r in refs]))
        case DrainNotice(reason):
            return wpb.ConnectResponse(drain=wpb.Drain(reason=reason))
    raise TypeError(f"not a frame: {message!r}")
