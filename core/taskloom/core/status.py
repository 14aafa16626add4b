"""Where taskloom errors meet gRPC status codes, both ways.

The supervisor aborts an RPC with ``abort``; the SDK turns the status back into
the same exception class with ``from_rpc_error``. The class travels in trailing
metadata so a ``PlanError`` comes back as a ``PlanError``, not just as
INVALID_ARGUMENT; a status without it (from a proxy, or a dead connection) is
mapped by code.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from taskloom.core import errors
from taskloom.core.errors import TaskloomError

ERROR_TYPE_KEY = "taskloom-error-type"

_CODES: dict[type[TaskloomError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.TaskNotFound: grpc.StatusCode.NOT_FOUND,
    errors.TaskFinished: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.LLMError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
}

_BY_NAME: dict[str, type[TaskloomError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, TaskloomError)
}

_BY_CODE: dict[grpc.StatusCode, type[TaskloomError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.TaskNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.TaskFinished,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.SupervisorUnavailable,
}


def status_code(error: TaskloomError) -> grpc.StatusCode:
    """The gRPC status code for a taskloom error (INTERNAL if none is mapped)."""
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


async def abort(
    context: grpc.aio.ServicerContext[object, object], error: TaskloomError
) -> NoReturn:
    """End the RPC with the status for ``error``, carrying its class."""
    await context.abort(
        status_code(error),
        error.message,
        trailing_metadata=((ERROR_TYPE_KEY, type(error).__name__),),
    )
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def from_rpc_error(error: grpc.aio.AioRpcError, *, target: str) -> TaskloomError:
    """The taskloom error a failed RPC stands for."""
    code = error.code()
    details = error.details() or code.name
    name = dict(error.trailing_metadata() or ()).get(ERROR_TYPE_KEY)
    cls = _BY_NAME.get(str(name)) if name else None
    if cls is None:
        if code == grpc.StatusCode.UNAVAILABLE:
            return errors.SupervisorUnavailable(
                f"no supervisor answers at {target} ({details}); start one with "
                "`taskloom up` or `taskloom supervisor`, or set TASKLOOM_SUPERVISOR"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return errors.Unavailable(f"the supervisor at {target} did not answer in time")
        cls = _BY_CODE.get(code)
        if cls is None:
            return TaskloomError(f"{code.name}: {details}")
    return _rebuild(cls, details)


def _rebuild(cls: type[TaskloomError], message: str) -> TaskloomError:
    # Some classes build their message from other arguments; bypass their
    # __init__ and restore the message the server already rendered.
    error = cls.__new__(cls)
    TaskloomError.__init__(error, message)
    if isinstance(error, errors.PlanError):
        error.violations = []
    if isinstance(error, errors.TaskNotFound):
        error.task_id = ""
    return error
