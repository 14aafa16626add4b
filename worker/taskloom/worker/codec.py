"""Protocol buffers ↔ the domain model, on the worker's side of the wire."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from taskloom.core import wire
from taskloom.core.model import (
    Assignment,
    AttemptRef,
    Input,
    ProgressUpdate,
    SubtaskFailure,
    SubtaskResult,
    Usage,
)
from taskloom.v1 import workers_pb2 as wpb

M = TypeVar("M", wpb.SubtaskResult, wpb.SubtaskFailure, wpb.ProgressUpdate)
FRAME_BYTES = 2 * 1024 * 1024
"""Most report bytes per frame: well under the supervisor's 4 MiB default limit."""


@dataclass(frozen=True, slots=True)
class Accepted:
    ref: AttemptRef


@dataclass(frozen=True, slots=True)
class Stopped:
    """A cancelled attempt's handler has stopped, having used ``usage``."""

    ref: AttemptRef
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    running: int
    draining: bool


Report = SubtaskResult | SubtaskFailure
Outgoing = Accepted | Heartbeat | ProgressUpdate | SubtaskResult | SubtaskFailure | Stopped


_ref_to_pb = wire.ref_to_pb
_usage_to_pb = wire.usage_to_pb


def refs_from_pb(refs: Iterable[wpb.AttemptRef]) -> list[AttemptRef]:
    return [wire.ref_from_pb(r) for r in refs]


def hello_to_pb(
    *,
    worker_id: str,
    name: str,
    capabilities: Sequence[str],
    max_concurrency: int,
    labels: Mapping[str, str],
    in_flight: Iterable[AttemptRef],
    version: str,
    cache_keys: Mapping[str, str],
) -> wpb.ConnectRequest:
    return wpb.ConnectRequest(
        hello=wpb.Hello(
            worker_id=worker_id,
            name=name,
            capabilities=list(capabilities),
            max_concurrency=max_concurrency,
            labels=dict(labels),
            in_flight=[_ref_to_pb(r) for r in in_flight],
            version=version,
            cache_keys=dict(cache_keys),
        )
    )


def assignments_from_pb(message: wpb.Assign) -> list[Assignment]:
    # The hot path's decoder: empty repeated and map fields are not copied,
    # and durations are read as seconds and nanos (a quarter faster).
    out = []
    for a in message.assignments:
        deadline = a.deadline if a.HasField("deadline") else None
        timeout = a.timeout
        out.append(
            Assignment(
                task_id=a.task_id,
                subtask_id=a.subtask_id,
                attempt=a.attempt,
                capability=a.capability,
                title=a.title,
                instruction=a.instruction,
                goal=a.goal,
                inputs=tuple(Input(i.subtask_id, i.title, i.output) for i in a.inputs)
                if a.inputs
                else (),
                params=dict(a.params) if a.params else {},
                deadline=None if deadline is None else deadline.seconds + deadline.nanos / 1e9,
                timeout=timeout.seconds + timeout.nanos / 1e9,
                trace_context=dict(a.trace_context) if a.trace_context else {},
                context_tokens=a.context_tokens,
                context=wire.context_from_pb(a.context),
                budget_tokens=a.budget_tokens,
                budget_cost=a.budget_cost,
            )
        )
    return out


def frames_to_pb(items: Sequence[Outgoing]) -> list[wpb.ConnectRequest]:
    """Batch queued items into frames, in an order that keeps each attempt's story
    straight: heartbeat, accepted, progress, then results and failures.

    An attempt that ended before its start was sent is not reported as
    accepted: its result says it ran, and the supervisor saves a commit
    (ASSIGNED goes straight to SUCCEEDED or FAILED)."""
    frames: list[wpb.ConnectRequest] = []
    beats = [i for i in items if isinstance(i, Heartbeat)]
    if beats:
        last = beats[-1]
        frames.append(
            wpb.ConnectRequest(
                heartbeat=wpb.Heartbeat(running=last.running, draining=last.draining)
            )
        )
    ended = {i.ref for i in items if isinstance(i, SubtaskResult | SubtaskFailure)}
    accepted = [_ref_to_pb(i.ref) for i in items if isinstance(i, Accepted) and i.ref not in ended]
    if accepted:
        frames.append(wpb.ConnectRequest(accepted=wpb.Accepted(refs=accepted)))
    progress = [
        wpb.ProgressUpdate(ref=_ref_to_pb(i.ref), message=i.message, text=i.text)
        for i in items
        if isinstance(i, ProgressUpdate)
    ]
    for chunk in _by_size(progress):
        frames.append(wpb.ConnectRequest(progress=wpb.Progress(updates=chunk)))
    results = [
        wpb.SubtaskResult(
            ref=_ref_to_pb(i.ref),
            output=i.output,
            usage=_usage_to_pb(i.usage),
        )
        for i in items
        if isinstance(i, SubtaskResult)
    ]
    for done in _by_size(results):
        frames.append(wpb.ConnectRequest(completed=wpb.Completed(results=done)))
    failures = [
        wpb.SubtaskFailure(
            ref=_ref_to_pb(i.ref),
            error=i.error,
            retryable=i.retryable,
            handed_back=not i.counts,
            usage=_usage_to_pb(i.usage),
            replan=i.replan,
            send_back=i.send_back,
            budget_exceeded=i.budget_exceeded,
        )
        for i in items
        if isinstance(i, SubtaskFailure)
    ]
    for failed in _by_size(failures):
        frames.append(wpb.ConnectRequest(failed=wpb.Failed(failures=failed)))
    stopped = [i for i in items if isinstance(i, Stopped)]
    if stopped:
        frames.append(
            wpb.ConnectRequest(
                stopped=wpb.Stopped(
                    refs=[_ref_to_pb(i.ref) for i in stopped],
                    usage=[_usage_to_pb(i.usage) for i in stopped],
                )
            )
        )
    return frames


def _by_size(items: Sequence[M], budget: int = FRAME_BYTES) -> list[list[M]]:
    """Consecutive groups of ``items`` whose encoded sizes add up to at most
    ``budget`` (an item larger than that goes alone): the supervisor refuses
    messages over its limit (4 MiB by default), and a frame it refuses would
    end the stream and be sent again after every reconnect."""
    chunks: list[list[M]] = []
    size = budget
    for item in items:
        length = item.ByteSize() + 16
        if size + length > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += length
    return chunks
