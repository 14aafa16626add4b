"""Errors survive the trip through gRPC statuses as the same classes."""

from __future__ import annotations

import grpc
import pytest

from taskloom.core import errors
from taskloom.core.status import (
    ERROR_TYPE_KEY,
    error_detail,
    error_from_parts,
    from_rpc_error,
    status_code,
)


def rpc_error(code: grpc.StatusCode, details: str, error_type: str | None) -> grpc.aio.AioRpcError:
    trailing = (
        grpc.aio.Metadata((ERROR_TYPE_KEY, error_type)) if error_type else grpc.aio.Metadata()
    )
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


@pytest.mark.parametrize(
    "error",
    [
        errors.PlanError("invalid plan: cycle a → b → a"),
        errors.TaskNotFound("abc"),
        errors.StoreUnavailable("Redis at redis://x is unavailable"),
        errors.TaskFinished("already SUCCEEDED"),
        errors.InvalidArgument("the goal is empty"),
    ],
)
def test_an_error_comes_back_as_its_own_class_with_its_message(error: errors.TaskloomError) -> None:
    back = from_rpc_error(
        rpc_error(status_code(error), error.message, type(error).__name__), target="t:1"
    )
    assert type(back) is type(error)
    assert back.message == error.message


def test_statuses_without_a_class_map_by_code() -> None:
    down = from_rpc_error(
        rpc_error(grpc.StatusCode.UNAVAILABLE, "connect failed", None), target="h:1"
    )
    assert isinstance(down, errors.SupervisorUnavailable)
    assert "no supervisor answers at h:1" in down.message and "taskloom up" in down.message
    assert isinstance(
        from_rpc_error(rpc_error(grpc.StatusCode.NOT_FOUND, "x", None), target="h:1"),
        errors.TaskNotFound,
    )
    other = from_rpc_error(rpc_error(grpc.StatusCode.DATA_LOSS, "boom", None), target="h:1")
    assert type(other) is errors.TaskloomError and other.message == "DATA_LOSS: boom"
    assert status_code(errors.TaskloomError("x")) == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    "error",
    [
        errors.PlanError("invalid plan: cycle a → b → a", field="plan.subtasks"),
        errors.InvalidArgument("the goal is empty", field="goal"),
        errors.ResourceExhausted("too fast", subject="submit_rate"),
        errors.NotLeader("the leader is at h:2"),
        errors.StoreUnavailable("Redis at redis://x is unavailable"),
    ],
)
def test_an_item_of_a_batch_reply_comes_back_as_its_own_error(
    error: errors.TaskloomError,
) -> None:
    field, subject = error_detail(error)
    back = error_from_parts(
        type(error).__name__, status_code(error).value[0], error.message,
        field=field, subject=subject,
    )  # fmt: skip
    assert type(back) is type(error)
    assert (back.message, error_detail(back)) == (error.message, (field, subject))


def test_an_item_error_of_an_unknown_class_maps_by_code() -> None:
    assert isinstance(
        error_from_parts("FromTheFuture", grpc.StatusCode.NOT_FOUND.value[0], "gone"),
        errors.TaskNotFound,
    )
    other = error_from_parts("", grpc.StatusCode.DATA_LOSS.value[0], "boom")
    assert type(other) is errors.TaskloomError and other.message == "DATA_LOSS: boom"
