"""Protocol buffers ↔ the domain model, on the client's side of the wire."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from taskloom.core.model import (
    Event,
    Plan,
    Subtask,
    SubtaskStatus,
    Task,
    TaskOptions,
    TaskStatus,
    Usage,
)
from taskloom.v1 import tasks_pb2 as pb


def _seconds(ts: Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


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
            )
            for s in plan.subtasks
        ]
    )


def options_to_pb(*, synthesize: bool | None, priority: int, max_parallel: int) -> pb.TaskOptions:
    options = pb.TaskOptions(priority=priority, max_parallel=max_parallel)
    if synthesize is not None:
        options.synthesize = synthesize
    return options


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
        ),
        created_at=_seconds(message.created_at),
        updated_at=_seconds(message.updated_at),
        result=message.result,
        error=message.error,
        finished_at=_seconds(message.finished_at) if message.HasField("finished_at") else None,
        subtasks_total=message.subtasks_total,
        subtasks_succeeded=message.subtasks_succeeded,
        subtasks=tuple(_subtask_from_pb(s) for s in message.subtasks),
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
        usage=Usage(message.usage.input_tokens, message.usage.output_tokens, message.usage.model),
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
    )
