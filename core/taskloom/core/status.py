"""Where taskloom errors meet gRPC status codes, both ways.

The supervisor aborts an RPC with ``abort``; the SDK turns the status back into
the same exception class with ``from_rpc_error``. The class travels in trailing
metadata so a ``PlanError`` comes back as a ``PlanError``, not just as
INVALID_ARGUMENT; a status without it (from a proxy, or a dead connection) is
mapped by code. The standard rich details ride along too (``grpc-status-
details-bin``, as grpcio-status writes them): ``ErrorInfo`` with the class,
``BadRequest`` naming the field at fault, ``QuotaFailure`` naming the limit,
so any gRPC client can act on them.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from taskloom.core import errors
from taskloom.core.errors import TaskloomError

ERROR_TYPE_KEY = "taskloom-error-type"
LEADER_KEY = "leader"
"""``ErrorInfo.metadata`` key of a standby's refusal: where the leader serves."""
DOMAIN = "taskloom.dev"

_CODES: dict[type[TaskloomError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.TaskNotFound: grpc.StatusCode.NOT_FOUND,
    errors.TaskFinished: grpc.StatusCode.FAILED_PRECONDITION,
    errors.BudgetSpent: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
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
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
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
    """End the RPC with the status for ``error``, carrying its class and details."""
    code = status_code(error)
    await context.abort(code, error.message, trailing_metadata=trailing_metadata(error, code))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def trailing_metadata(
    error: TaskloomError, code: grpc.StatusCode | None = None
) -> tuple[tuple[str, str | bytes], ...]:
    """The error's class and its ``google.rpc.Status`` with details."""
    code = code or status_code(error)
    info = error_details_pb2.ErrorInfo(reason=type(error).__name__, domain=DOMAIN)
    if isinstance(error, errors.NotLeader) and error.leader:
        info.metadata[LEADER_KEY] = error.leader
    details = [info]
    if isinstance(error, errors.InvalidArgument) and error.field:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.message
                    )
                ]
            )
        )
    if isinstance(error, errors.ResourceExhausted) and error.subject:
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=error.subject, description=error.message
                    )
                ]
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=error.message, details=packed)
    )
    return ((ERROR_TYPE_KEY, type(error).__name__), *status.trailing_metadata)


def _rich_details(metadata: object) -> tuple[str, str, str]:
    """``(field, subject, leader)`` from a status's rich details, if it has them."""
    field = subject = leader = ""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a garbled trailer says nothing; keep the code
            return "", "", ""
        for holder in status.details:
            if holder.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                holder.Unpack(info)
                leader = info.metadata.get(LEADER_KEY, leader)
            if holder.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                holder.Unpack(bad)
                field = next((v.field for v in bad.field_violations), field)
            elif holder.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                holder.Unpack(quota)
                subject = next((v.subject for v in quota.violations), subject)
    return field, subject, leader


def from_rpc_error(error: grpc.aio.AioRpcError, *, target: str) -> TaskloomError:
    """The taskloom error a failed RPC stands for."""
    code = error.code()
    details = error.details() or code.name
    error_metadata = error.trailing_metadata() or ()
    name = dict(error_metadata).get(ERROR_TYPE_KEY)
    cls = _BY_NAME.get(str(name)) if name else None
    if cls is None:
        if code == grpc.StatusCode.UNAVAILABLE:
            return errors.SupervisorUnavailable(
                f"no supervisor answers at {target} ({details}); start one with "
                "`taskloom up` or `taskloom supervisor`, or set TASKLOOM_SUPERVISOR"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return errors.Unavailable(f"the supervisor at {target} did not answer in time")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # gRPC's own refusal of an oversized message, or a proxy's.
            details += " (the supervisor refuses larger messages: TASKLOOM_MAX_REQUEST_BYTES)"
        cls = _BY_CODE.get(code)
        if cls is None:
            return TaskloomError(f"{code.name}: {details}")
    field, subject, leader = _rich_details(error_metadata)
    rebuilt = _with_details(_rebuild(cls, details), field, subject)
    if isinstance(rebuilt, errors.NotLeader) and valid_address(leader):
        rebuilt.leader = leader
    return rebuilt


def leader_of(error: grpc.aio.AioRpcError) -> str:
    """Where the leader serves, from a standby's refusal (``''`` if it does not say)."""
    leader = _rich_details(error.trailing_metadata())[2]
    return leader if valid_address(leader) else ""


def valid_address(address: str) -> bool:
    """Whether a redirect names a plain ``HOST:PORT`` (what a client will
    follow; anything else a server sends is ignored)."""
    host, _, port = address.rpartition(":")
    return (
        0 < len(address) <= 262
        and port.isdigit()
        and 0 < int(port) < 65536
        and bool(host)
        and all(c.isalnum() or c in ".-_[]:" for c in host)
    )


def error_detail(error: TaskloomError) -> tuple[str, str]:
    """``(field, subject)``: the request field at fault and the limit reached, if any."""
    field = error.field if isinstance(error, errors.InvalidArgument) else ""
    subject = error.subject if isinstance(error, errors.ResourceExhausted) else ""
    return field, subject


def error_from_parts(
    name: str, code: int, message: str, *, field: str = "", subject: str = ""
) -> TaskloomError:
    """The taskloom error that one item of a batch reply stands for (a
    ``TaskError`` of SubmitTasks): its class by name, else by status code."""
    cls = _BY_NAME.get(name)
    if cls is None:
        status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        cls = _BY_CODE.get(status)
        if cls is None:
            return TaskloomError(f"{status.name}: {message}")
    return _with_details(_rebuild(cls, message), field, subject)


def _with_details(error: TaskloomError, field: str, subject: str) -> TaskloomError:
    if isinstance(error, errors.InvalidArgument):
        error.field = field
    if isinstance(error, errors.ResourceExhausted):
        error.subject = subject
    return error


def _rebuild(cls: type[TaskloomError], message: str) -> TaskloomError:
    # Some classes build their message from other arguments; bypass their
    # __init__ and restore the message the server already rendered.
    error = cls.__new__(cls)
    TaskloomError.__init__(error, message)
    if isinstance(error, errors.PlanError):
        error.violations = []
    if isinstance(error, errors.TaskNotFound | errors.BudgetSpent):
        error.task_id = ""
    if isinstance(error, errors.OutcomeUnknown):
        error.idempotency_key = ""
    if isinstance(error, errors.NotLeader):
        error.leader = ""
    return error
