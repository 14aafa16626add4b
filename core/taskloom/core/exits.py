"""The exit codes of every ``taskloom`` command, in one table.

0    success
1    the task failed or was cancelled (``submit --wait``, ``watch``)
2    bad usage, input or configuration
3    a service is unreachable (the supervisor, Redis, the LLM)
4    no such task
5    any other error
6    not authenticated, or not allowed
7    a limit was reached
130  interrupted (Ctrl-C)
"""

from __future__ import annotations

from taskloom.core.errors import (
    ConfigError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    TaskloomError,
    TaskNotFound,
    Unauthenticated,
    Unavailable,
)

OK = 0
TASK_FAILED = 1
USAGE = 2
UNAVAILABLE = 3
NOT_FOUND = 4
ERROR = 5
DENIED = 6
LIMIT = 7
INTERRUPTED = 130

_BY_ERROR: tuple[tuple[type[TaskloomError] | tuple[type[TaskloomError], ...], int], ...] = (
    ((InvalidArgument, ConfigError), USAGE),
    (Unavailable, UNAVAILABLE),
    (TaskNotFound, NOT_FOUND),
    ((Unauthenticated, PermissionDenied), DENIED),
    (ResourceExhausted, LIMIT),
)


def exit_code(error: TaskloomError) -> int:
    """The exit code a command ends with when ``error`` stops it."""
    for kinds, code in _BY_ERROR:
        if isinstance(error, kinds):
            return code
    return ERROR
