"""What a handler gets: the subtask, its inputs, and a way to report progress."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from taskloom.core.errors import TaskloomError
from taskloom.core.llm import LLM
from taskloom.core.model import Assignment, AttemptRef, Input, Usage


class SubtaskError(TaskloomError):
    """Raise from a handler to fail the subtask with a message.

    ``retryable=False`` fails it for good; any other exception a handler
    raises is treated as retryable (up to the subtask's attempts).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(slots=True)
class SubtaskContext:
    """One attempt of one subtask, as its handler sees it."""

    assignment: Assignment
    llm: LLM
    """The model the worker is configured with (``OLLAMA_HOST``, ``TASKLOOM_MODEL``)."""
    logger: logging.Logger
    _report: Callable[[str], Awaitable[None]]
    usage: Usage = field(default_factory=Usage)
    """Set by handlers that spend tokens, so the usage is recorded with the result."""

    @property
    def ref(self) -> AttemptRef:
        return self.assignment.ref

    @property
    def task_id(self) -> str:
        return self.assignment.task_id

    @property
    def subtask_id(self) -> str:
        return self.assignment.subtask_id

    @property
    def attempt(self) -> int:
        return self.assignment.attempt

    @property
    def title(self) -> str:
        return self.assignment.title

    @property
    def instruction(self) -> str:
        return self.assignment.instruction

    @property
    def goal(self) -> str:
        return self.assignment.goal

    @property
    def inputs(self) -> tuple[Input, ...]:
        """Outputs of the subtask's direct dependencies, in the order it lists them."""
        return self.assignment.inputs

    @property
    def params(self) -> Mapping[str, str]:
        return self.assignment.params

    async def progress(self, message: str) -> None:
        """Report progress; it appears in the task's events."""
        await self._report(message)
