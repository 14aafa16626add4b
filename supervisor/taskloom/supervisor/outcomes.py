"""What a write to the store changed, as the scheduler, the metrics and the
orchestrator all read it.

These types sit below the store, the scheduler and the metrics, which import
them from here and not from each other, so no two of those modules import
each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from taskloom.core.model import Assignment, AttemptRef, Event


@dataclass(frozen=True, slots=True)
class ReadyItem:
    """A READY subtask waiting for a worker."""

    task_id: str
    subtask_id: str
    capability: str
    priority: int = 0
    failed_attempt: int = 0
    """Failures so far, for a retry; 0 for a first run."""
    retry_at: float = 0.0
    """When a retry may start (Unix seconds; 0: at once), kept in Redis."""


@dataclass(frozen=True, slots=True)
class Handed:
    """A subtask the script that made it READY gave at once to an offered
    worker (see ``Scheduler.offer`` and hand_out in lib.lua)."""

    item: ReadyItem
    worker: int
    """Which of the workers offered for ``item.capability`` (0-based)."""
    assignment: Assignment


OfferedSlots = Mapping[str, Sequence[tuple[str, str, str, int]]]
"""Free worker slots a write may fill with the subtasks it makes READY:
capability → ``(worker_id, name, cache fingerprint, slots)`` per worker."""


@dataclass(slots=True)
class Outcome:
    """What a write changed: a batch of reports, an assignment, a new task."""

    committed: list[bool] = field(default_factory=list)
    ready: list[ReadyItem] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    held: list[AttemptRef] = field(default_factory=list)
    """Attempts workers still hold in tasks that just ended: to be cancelled."""
    replan: list[tuple[str, str]] = field(default_factory=list)
    """``(task, subtask)``: failed for good in a task that replans; ask the planner."""
    finished_status: list[str] = field(default_factory=list)
    """The status each of ``finished`` ended with."""
    cached: list[str] = field(default_factory=list)
    """Capabilities of subtasks answered from the cache."""
    handed: list[Handed] = field(default_factory=list)
    """Subtasks that became READY and were assigned at once to offered workers."""
    ended: dict[str, Event] = field(default_factory=dict)
    """The terminal event of each task in ``finished``."""
    snapshots: dict[str, Any] = field(default_factory=dict)
    """Each of those with few subtasks, as it ended (``records.decode_snapshot``)."""
    awaiting: list[tuple[str, str]] = field(default_factory=list)
    """``(task, subtask)`` that began to wait for a person's approval (subtask
    '' for a task's plan)."""
    approved: list[tuple[str, str, float]] = field(default_factory=list)
    """``(task, subtask, seconds it waited)`` that a person approved or rejected."""
    reopened: list[str] = field(default_factory=list)
    """Tasks that had ended and run again (a person's retry or skip)."""


class Stock(NamedTuple):
    """What the connected workers of one capability offer the planner."""

    workers: int
    free: int
    """Slots free now."""
    labels: dict[tuple[str, str], int]
    """(key, value) → how many of the workers have that label."""
