"""Protocol buffers ↔ the domain model, on the supervisor's side of the wire."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from taskloom.core import wire
from taskloom.core.errors import TaskloomError
from taskloom.core.model import (
    Assignment,
    AttemptRef,
    Event,
    ProgressUpdate,
    Subtask,
    SubtaskFailure,
    SubtaskResult,
    Task,
    TaskStatus,
    Usage,
    WorkerInfo,
)
from taskloom.core.prices import Price
from taskloom.core.ratelimits import Limit
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


def statuses_from_pb(values: Iterable[pb.TaskStatus.ValueType]) -> list[TaskStatus]:
    return wire.task_statuses_from_pb(values)


def task_to_pb(task: Task) -> pb.Task:
    return pb.Task(
        id=task.id,
        goal=task.goal,
        status=wire.task_status_to_pb(task.status),
        result=task.result,
        error=task.error,
        options=wire.options_to_pb(task.options),
        created_at=wire.timestamp(task.created_at),
        updated_at=wire.timestamp(task.updated_at),
        finished_at=wire.timestamp(task.finished_at),
        subtasks_total=task.subtasks_total,
        subtasks_succeeded=task.subtasks_succeeded,
        plan_version=task.plan_version,
        subtasks=[_subtask_to_pb(s) for s in task.subtasks],
        usage=wire.usage_to_pb(task.usage),
        failure_reason=wire.failure_reason_to_pb(task.failure_reason),
        owner=task.owner,
        paused=task.paused,
    )


def _subtask_to_pb(sub: Subtask) -> pb.Subtask:
    return pb.Subtask(
        id=sub.id,
        title=sub.title,
        instruction=sub.instruction,
        capability=sub.capability,
        depends_on=list(sub.depends_on),
        status=wire.subtask_status_to_pb(sub.status),
        output=sub.output,
        error=sub.error,
        attempt=sub.attempt,
        worker=sub.worker,
        progress=sub.progress,
        params=dict(sub.params),
        usage=wire.usage_to_pb(sub.usage),
        started_at=wire.timestamp(sub.started_at),
        finished_at=wire.timestamp(sub.finished_at),
        requires_approval=sub.requires_approval,
        requires=dict(sub.requires),
        ready_at=wire.timestamp(sub.ready_at),
        cache_hit=sub.cache_hit,
    )


def event_to_pb(event: Event) -> pb.Event:
    return pb.Event(
        id=event.id,
        time=wire.timestamp(event.time),
        type=event.type,
        task_id=event.task_id,
        subtask_id=event.subtask_id,
        status=event.status,
        message=event.message,
        attempt=event.attempt,
        worker=event.worker,
        trace_id=event.trace_id,
        span_id=event.span_id,
        actor=event.actor,
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


ref_from_pb = wire.ref_from_pb
plan_from_pb = wire.plan_from_pb
options_from_pb = wire.options_from_pb


def worker_info_from_pb(hello: wpb.Hello) -> WorkerInfo:
    return WorkerInfo(
        worker_id=hello.worker_id,
        name=hello.name or hello.worker_id,
        capabilities=frozenset(hello.capabilities),
        max_concurrency=hello.max_concurrency,
        labels=dict(hello.labels),
        in_flight=tuple(wire.ref_from_pb(r) for r in hello.in_flight),
        version=hello.version,
        cache_keys=dict(hello.cache_keys),
    )


def progress_from_pb(message: wpb.Progress) -> list[ProgressUpdate]:
    return [ProgressUpdate(wire.ref_from_pb(u.ref), u.message, u.text) for u in message.updates]


def results_from_pb(message: wpb.Completed) -> list[SubtaskResult]:
    return [
        SubtaskResult(wire.ref_from_pb(r.ref), r.output, wire.usage_from_pb(r.usage))
        for r in message.results
    ]


def stopped_from_pb(message: wpb.Stopped) -> list[tuple[AttemptRef, Usage]]:
    """Each stopped attempt with what its LLM calls had used (none if not sent)."""
    usage = [wire.usage_from_pb(u) for u in message.usage]
    return [
        (wire.ref_from_pb(r), usage[i] if i < len(usage) else Usage())
        for i, r in enumerate(message.refs)
    ]


def failures_from_pb(message: wpb.Failed) -> list[SubtaskFailure]:
    return [
        SubtaskFailure(
            wire.ref_from_pb(f.ref),
            f.error,
            f.retryable,
            counts=not f.handed_back,
            usage=wire.usage_from_pb(f.usage),
            replan=f.replan,
            send_back=f.send_back,
            budget_exceeded=f.budget_exceeded,
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
    prices: Mapping[str, Price] | None = None,
    rate_limits: Mapping[str, Limit] | None = None,
) -> wpb.ConnectResponse:
    return wpb.ConnectResponse(
        welcome=wpb.Welcome(
            rate_limits={
                m: wpb.RateLimit(requests_per_minute=r.requests, tokens_per_minute=r.tokens)
                for m, r in (rate_limits or {}).items()
            },
            prices={
                m: wpb.Price(input=p.input, output=p.output) for m, p in (prices or {}).items()
            },
            session_id=session_id,
            supervisor_id=supervisor_id,
            heartbeat_interval=wire.duration(heartbeat_interval),
            lease_ttl=wire.duration(lease_ttl),
            max_output_bytes=max_output_bytes,
            truncate_output=truncate_output,
            idle_silence=True,
            heartbeat_acks=True,
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
            context=wire.context_to_pb(a.context),
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
            out.deadline.seconds, out.deadline.nanos = wire.split(a.deadline)
        if a.timeout:
            out.timeout.seconds, out.timeout.nanos = wire.split(a.timeout)
        if a.budget_tokens:
            out.budget_tokens = a.budget_tokens
        if a.budget_cost:
            out.budget_cost = a.budget_cost
    return message


def outgoing_to_pb(message: Outgoing) -> wpb.ConnectResponse:
    """One frame for the worker (CloseSession is not a frame; the caller handles it)."""
    match message:
        case AssignBatch(assignments):
            return wpb.ConnectResponse(assign=_assign_to_pb(assignments))
        case CancelAttempts(refs, reason):
            return wpb.ConnectResponse(
                cancel=wpb.Cancel(refs=[wire.ref_to_pb(r) for r in refs], reason=reason)
            )
        case AckReports(refs):
            return wpb.ConnectResponse(ack=wpb.Ack(refs=[wire.ref_to_pb(r) for r in refs]))
        case DrainNotice(reason):
            return wpb.ConnectResponse(drain=wpb.Drain(reason=reason))
    raise TypeError(f"not a frame: {message!r}")
