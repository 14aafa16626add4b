"""Protocol buffers ↔ the domain model, on the client's side of the wire."""

from __future__ import annotations

from taskloom.core import wire
from taskloom.core.errors import TaskloomError
from taskloom.core.model import Event, Subtask, Task
from taskloom.core.status import error_from_parts
from taskloom.v1 import tasks_pb2 as pb

plan_to_pb = wire.plan_to_pb
options_to_pb = wire.options_to_pb
status_to_pb = wire.task_status_to_pb


def task_from_pb(message: pb.Task) -> Task:
    return Task(
        id=message.id,
        goal=message.goal,
        status=wire.task_status_from_pb(message.status),
        options=wire.options_from_pb(message.options),
        created_at=wire.seconds(message.created_at),
        updated_at=wire.seconds(message.updated_at),
        result=message.result,
        error=message.error,
        finished_at=wire.time_of(message, "finished_at"),
        subtasks_total=message.subtasks_total,
        subtasks_succeeded=message.subtasks_succeeded,
        plan_version=message.plan_version or 1,
        subtasks=tuple(_subtask_from_pb(s) for s in message.subtasks),
        usage=wire.usage_from_pb(message.usage),
        failure_reason=wire.failure_reason_from_pb(message.failure_reason),
        owner=message.owner,
        paused=message.paused,
    )


def _subtask_from_pb(message: pb.Subtask) -> Subtask:
    return Subtask(
        id=message.id,
        title=message.title,
        instruction=message.instruction,
        capability=message.capability,
        depends_on=tuple(message.depends_on),
        status=wire.subtask_status_from_pb(message.status),
        output=message.output,
        error=message.error,
        attempt=message.attempt,
        worker=message.worker,
        progress=message.progress,
        params=dict(message.params),
        usage=wire.usage_from_pb(message.usage),
        cache_hit=message.cache_hit,
        started_at=wire.time_of(message, "started_at"),
        finished_at=wire.time_of(message, "finished_at"),
        requires_approval=message.requires_approval,
        requires=dict(message.requires),
        ready_at=wire.time_of(message, "ready_at"),
    )


def event_from_pb(message: pb.Event) -> Event:
    return Event(
        id=message.id,
        time=wire.seconds(message.time),
        type=message.type,
        task_id=message.task_id,
        subtask_id=message.subtask_id,
        status=message.status,
        message=message.message,
        attempt=message.attempt,
        worker=message.worker,
        trace_id=message.trace_id,
        span_id=message.span_id,
        actor=message.actor,
    )


def error_from_pb(message: pb.TaskError) -> TaskloomError:
    """The error of one refused item of a batch call."""
    return error_from_parts(
        message.type, message.code, message.message, field=message.field, subject=message.subject
    )
