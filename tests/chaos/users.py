"""What users do while the faults fire: submits (single and ``submit_many``),
plans that wait for approval and are approved, tasks that are cancelled.

Each operation goes through the SDK as a user's would, with its own
idempotency key. A submit that returned an id was acknowledged: its task
must end, as the operation expects (SUCCEEDED with its last subtask's output
as its result; CANCELLED once a cancel was acknowledged). A submit whose
outcome stayed unknown (``OutcomeUnknown``, or an outage past the SDK's
grace) is submitted again with the same key once the faults are over, and
must then be acknowledged; one that stored a task must not store a second.
The checker's verdict gets an I1 violation for each task that does not end
as expected.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from taskloom.client import TaskloomClient
from taskloom.core.errors import TaskFinished, TaskloomError, Unavailable
from taskloom.core.model import Task, TaskStatus
from tests.chaos.checker import Verdict

T = TypeVar("T")
OPERATIONS = ("submit", "submit_many", "approve", "cancel")
PAUSE = (0.2, 0.6)
"""Seconds between one user operation and the next."""
RESULT = re.compile(r"^b#\d+@w\d+$")
"""What the chaos handler returns for the last subtask of a user's plan."""


def small_plan(length: int = 2) -> dict[str, Any]:
    """A chain of ``chaos`` subtasks ``a → … → b`` (longer for tasks to cancel)."""
    ids = ["a", *(f"m{i}" for i in range(1, length - 1)), "b"]
    return {
        "subtasks": [
            {"id": sid, "title": sid, "instruction": "work", "capability": "chaos",
             "depends_on": [ids[i - 1]] if i else []}
            for i, sid in enumerate(ids)
        ],
        "synthesize": False,
    }  # fmt: skip


@dataclass
class Expectation:
    task_id: str
    operation: str
    ends: TaskStatus = TaskStatus.SUCCEEDED


@dataclass
class Users:
    """One simulated user; ``run`` until told to stop, then ``check``."""

    addresses: Callable[[], str]
    rng: random.Random
    expected: dict[str, Expectation] = field(default_factory=dict)
    unknown: list[tuple[str, str, int]] = field(default_factory=list)
    """Submits whose outcome stayed unknown: (operation, key, plan length)."""
    counts: dict[str, int] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            operation = self.rng.choice(OPERATIONS)
            self.counts[operation] = self.counts.get(operation, 0) + 1
            try:
                await getattr(self, f"_{operation}")()
            except TaskloomError as e:  # what a user would see, recorded by the checks
                self.counts[f"{operation} error {type(e).__name__}"] = (
                    self.counts.get(f"{operation} error {type(e).__name__}", 0) + 1
                )
            await asyncio.sleep(self.rng.uniform(*PAUSE))

    async def _call(self, call: Callable[[TaskloomClient], Awaitable[T]]) -> T:
        async with TaskloomClient(self.addresses()) as client:
            return await call(client)

    async def _submit_one(self, operation: str, length: int = 2, **options: Any) -> str | None:
        key = uuid.uuid4().hex
        try:
            task_id = await self._call(
                lambda c: c.submit(
                    f"{operation} by a user", plan=small_plan(length), idempotency_key=key,
                    **options,
                )
            )  # fmt: skip
        except Unavailable:
            self.unknown.append((operation, key, length))
            return None
        self.expected[task_id] = Expectation(task_id, operation)
        return task_id

    async def _submit(self) -> None:
        await self._submit_one("submit")

    async def _submit_many(self) -> None:
        keys = [uuid.uuid4().hex for _ in range(3)]
        items = [
            {"goal": f"submit_many {i}", "plan": small_plan(), "idempotency_key": key}
            for i, key in enumerate(keys)
        ]
        try:
            results = await self._call(lambda c: c.submit_many(items))
        except Unavailable:
            self.unknown += [("submit_many", key, 2) for key in keys]
            return
        for key, result in zip(keys, results, strict=True):
            if result.task_id:
                self.expected[result.task_id] = Expectation(result.task_id, "submit_many")
            elif isinstance(result.error, Unavailable):
                self.unknown.append(("submit_many", key, 2))
            else:
                raise result.error or AssertionError("neither an id nor an error")

    async def _approve(self) -> None:
        task_id = await self._submit_one("approve", approve_plan=True)
        if task_id is not None:
            await self._approved(task_id)

    async def _cancel(self) -> None:
        task_id = await self._submit_one("cancel", length=6)
        if task_id is None:
            return
        await asyncio.sleep(self.rng.uniform(0.1, 1.0))
        try:
            await self._until_done(lambda c: c.cancel(task_id, "a user changed their mind"),
                                   task_id, None)  # fmt: skip
        except TaskFinished:
            return  # it ended first: it must have SUCCEEDED
        self.expected[task_id].ends = TaskStatus.CANCELLED

    async def _until_done(
        self,
        action: Callable[[TaskloomClient], Awaitable[Any]],
        task_id: str,
        waiting_in: TaskStatus | None,
        timeout: float = 90.0,
    ) -> None:
        """Do ``action`` until it is acknowledged; an action whose first try
        landed unseen finds the task past ``waiting_in`` on the next."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._call(action)
                return
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)
            except TaskloomError as e:
                # The SDK sends a call again when a failover lost its answer,
                # so a conflict may be our own first try having landed.
                if waiting_in is None:
                    raise
                task = await self._call(lambda c: c.get(task_id))
                if task.status != waiting_in:
                    return  # an earlier try landed
                raise e from None

    async def settle(self, timeout: float = 120.0) -> None:
        """After the faults: submit again what stayed unknown, with its key."""
        for operation, key, length in self.unknown:
            task_id = await self._resubmit(operation, key, length, timeout)
            self.expected.setdefault(task_id, Expectation(task_id, f"{operation} (resubmitted)"))
            if operation == "approve":
                await self._approved(task_id)

    async def _resubmit(self, operation: str, key: str, length: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with TaskloomClient(self.addresses()) as client:
                    return await client.submit(
                        f"{operation} by a user", plan=small_plan(length), idempotency_key=key
                    )
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def _approved(self, task_id: str) -> None:
        async def approve(client: TaskloomClient) -> Task:
            return await client.approve(task_id)

        await self._until_done(approve, task_id, TaskStatus.AWAITING_APPROVAL)

    async def check(self, verdict: Verdict, timeout: float = 120.0) -> None:
        """Every acknowledged task ends as expected (I1)."""
        deadline = time.monotonic() + timeout
        for expectation in self.expected.values():
            task = await self._wait(expectation.task_id, deadline)
            what = f"user task {task.id} ({expectation.operation})"
            if task.status != expectation.ends:
                verdict.add("I1", f"{what} ended {task.status}, expected {expectation.ends}: "
                            f"{task.error}")  # fmt: skip
            elif task.status == TaskStatus.SUCCEEDED and not RESULT.match(task.result):
                verdict.add("I1", f"{what} succeeded with result {task.result!r}")
        verdict.stats["user_tasks"] = len(self.expected)
        verdict.stats["user_resubmitted"] = len(self.unknown)

    async def _wait(self, task_id: str, deadline: float) -> Task:
        while True:
            try:
                task = await self._call(lambda c: c.get(task_id))
                if task.status.terminal or time.monotonic() > deadline:
                    return task
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)
