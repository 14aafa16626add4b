"""The public API's names, written out: renaming one by accident fails here
(as httpx's test_exported_members does)."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "taskloom.client": {
        "ClientSettings",
        "Submitted",
        "SyncTaskloomClient",
        "TaskloomClient",
    },
    "taskloom.worker": {
        "HandlerRegistry",
        "SubtaskContext",
        "SubtaskError",
        "Worker",
        "WorkerSettings",
    },
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_each_package_exports_exactly_its_public_names(package: str) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) == PUBLIC[package]
    for name in module.__all__:
        member = getattr(module, name)
        assert member.__module__.startswith(package), f"{package}.{name} is not its own"
        assert member.__doc__, f"{package}.{name} has no docstring"


def test_the_errors_users_catch_are_one_tree() -> None:
    from taskloom.core import errors

    public = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.TaskloomError)
    }
    assert public == {
        "TaskloomError", "ConfigError", "InvalidArgument", "PlanError", "TaskNotFound",
        "TaskFinished", "Unauthenticated", "PermissionDenied", "ResourceExhausted",
        "BudgetSpent", "Unavailable", "StoreUnavailable", "LLMUnavailable",
        "SupervisorUnavailable", "NotLeader", "OutcomeUnknown", "LLMError", "RateLimited",
    }  # fmt: skip
    # The module docstring draws the tree: every class is in it.
    for name in public:
        assert name in (errors.__doc__ or ""), f"{name} is missing from the tree in errors.py"
