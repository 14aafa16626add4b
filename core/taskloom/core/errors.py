"""The one error hierarchy of taskloom.

Every error a user can meet is a ``TaskloomError`` with a message that says what
went wrong and what to do. Lower layers translate what they catch (Redis,
gRPC, HTTP) into these classes at one seam each: the store for Redis, the LLM
providers for their clients, ``taskloom.core.status`` for gRPC.

    TaskloomError
    ├── ConfigError              a setting is missing or malformed
    ├── InvalidArgument          the request itself is wrong
    │   └── PlanError            a plan breaks the rules (also: planning failed)
    ├── TaskNotFound             no task with that id (or it expired)
    ├── TaskFinished             the task already ended; the request needs a live one
    ├── Unauthenticated          no valid token (or none at all) came with the call
    ├── PermissionDenied         the caller's role may not do this
    ├── ResourceExhausted        a limit was reached; try later or ask for less
    ├── BudgetSpent              a task used up its token, time or money budget and ended
    ├── Unavailable              a dependency cannot be reached; retrying may help
    │   ├── StoreUnavailable     Redis
    │   ├── LLMUnavailable       the LLM server
    │   │   └── RateLimited      it refused the call for its rate limit (429)
    │   ├── SupervisorUnavailable
    │   ├── NotLeader            this supervisor is a standby, or lost its lease
    │   └── OutcomeUnknown       a submit may or may not have been stored; retry with its key
    └── LLMError                 the LLM answered, but with an error
"""

from __future__ import annotations


class TaskloomError(Exception):
    """Base of every error taskloom raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(TaskloomError):
    """A setting is missing or malformed; the message names the variable or flag."""


class InvalidArgument(TaskloomError):
    """The request is malformed: an empty goal, an oversized field, a bad id.

    ``field`` names the request field at fault (``goal``, ``plan.subtasks``),
    sent to clients as a ``google.rpc.BadRequest`` field violation.
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class PlanError(InvalidArgument):
    """A plan breaks the rules, or no valid plan could be obtained from the model.

    ``violations`` lists each problem in words the model (or a person) can act on.
    """

    def __init__(
        self, message: str, violations: list[str] | None = None, *, field: str = ""
    ) -> None:
        super().__init__(message, field=field)
        self.violations = list(violations or [])


class TaskNotFound(TaskloomError):
    """No task has this id, or it expired after the retention period."""

    def __init__(self, task_id: str) -> None:
        # What the caller sent is echoed, but never more than an id's worth.
        shown = task_id if len(task_id) <= 64 else task_id[:64] + "…"
        super().__init__(f"no task with id {shown!r} (it may have expired)")
        self.task_id = task_id


class TaskFinished(TaskloomError):
    """The task has already ended, so it cannot be changed."""


class Unauthenticated(TaskloomError):
    """The call carried no valid credentials."""


class PermissionDenied(TaskloomError):
    """The caller is not allowed to do this."""


class ResourceExhausted(TaskloomError):
    """A limit was reached. ``subject`` names it (``submit_rate``, ``max_watches``),
    sent to clients as a ``google.rpc.QuotaFailure`` violation."""

    def __init__(self, message: str, *, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject


class BudgetSpent(TaskloomError):
    """A task used up its budget (``max_tokens``, ``max_duration``) and ended
    with ``BUDGET_EXCEEDED``: planning it, or running it, stops here."""

    def __init__(self, task_id: str, message: str = "") -> None:
        super().__init__(message or f"task {task_id} used up its budget")
        self.task_id = task_id


class Unavailable(TaskloomError):
    """Something taskloom depends on cannot be reached right now."""


class StoreUnavailable(Unavailable):
    """Redis cannot be reached or refused the operation."""


class LLMUnavailable(Unavailable):
    """The LLM server cannot be reached."""


class RateLimited(LLMUnavailable):
    """The provider refused the call for its rate limit (HTTP 429);
    ``retry_after``: how long it asked to wait, if it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SupervisorUnavailable(Unavailable):
    """No supervisor answers at the configured address."""


class NotLeader(Unavailable):
    """This supervisor is on standby or has lost the leader lease; another one serves.

    ``leader`` is where the leader says it serves (``HOST:PORT``, its
    ``TASKLOOM_ADVERTISE``), when the standby knows it: sent to clients in the
    status's ``ErrorInfo`` metadata, and followed by the SDK, CLI and workers."""

    def __init__(self, message: str, *, leader: str = "") -> None:
        super().__init__(message)
        self.leader = leader


class OutcomeUnknown(Unavailable):
    """A submit got no answer it can trust (a deadline, Redis away): the task
    may have been stored or not. Submitting again with ``idempotency_key``
    is safe: it returns the task if it was stored, and stores it if not."""

    def __init__(self, message: str, idempotency_key: str) -> None:
        super().__init__(
            f"outcome unknown: {message}; retrying with the same idempotency key "
            f"({idempotency_key}) is safe"
        )
        self.idempotency_key = idempotency_key


class LLMError(TaskloomError):
    """The LLM server answered with an error (unknown model, bad request, ...)."""
