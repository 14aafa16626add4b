"""Waiting for conditions, and building plans, in tests."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable
from typing import Any

from taskloom.client import TaskloomClient
from taskloom.core.model import Task, TaskStatus


async def eventually(
    check: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """Call ``check`` until it returns something truthy without raising AssertionError.

    Returns that value; after ``timeout`` raises the last AssertionError (or
    one saying the condition never held).
    """
    deadline = time.monotonic() + timeout
    last: AssertionError | None = None
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = None
        except AssertionError as e:
            last = e
        if time.monotonic() >= deadline:
            raise last or AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(interval)


async def wait_status(
    client: TaskloomClient, task_id: str, *statuses: TaskStatus, timeout: float = 60.0
) -> Task:
    """Poll until the task is in one of ``statuses``."""

    async def reached() -> Task | None:
        task = await client.get(task_id)
        return task if task.status in statuses else None

    task: Task = await eventually(reached, timeout=timeout)
    return task


async def wait_subtask(
    client: TaskloomClient, task_id: str, subtask_id: str, status: str, timeout: float = 60.0
) -> Task:
    """Poll until one subtask is in ``status``."""

    async def reached() -> Task | None:
        task = await client.get(task_id)
        sub = next((s for s in task.subtasks if s.id == subtask_id), None)
        return task if sub is not None and sub.status == status else None

    task: Task = await eventually(reached, timeout=timeout)
    return task


def planned(*subtasks: tuple[Any, ...]) -> str:
    """A model's plan reply from ``(id, capability, instruction, depends_on...)``
    tuples: like ``plan``, with titles that pass the planner's content checks."""
    document = plan(*subtasks)
    for item in document["subtasks"]:
        item["title"] = f"Work on {item['id']}"
    return json.dumps(document)


def plan(*subtasks: tuple[Any, ...], synthesize: bool = False) -> dict[str, Any]:
    """A plan document from ``(id, capability, instruction, depends_on...)`` tuples."""
    return {
        "subtasks": [
            {
                "id": sid,
                "title": sid.upper(),
                "instruction": instruction,
                "capability": capability,
                "depends_on": list(deps),
            }
            for sid, capability, instruction, *deps in subtasks
        ],
        "synthesize": synthesize,
    }


TWO_STEPS = planned(
    ("s1", "llm", "Gather the key facts."), ("s2", "llm", "Write more from them.", "s1")
)
"""A model's reply planning two llm steps, the second on the first."""
