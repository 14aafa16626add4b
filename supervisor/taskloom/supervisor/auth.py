"""Who may call what: the authentication interceptor and the caller's principal.

Every RPC passes through ``Authenticator`` before any servicer runs. It reads
``authorization: Bearer <token>``, looks the token's hash up in the tokens
table, checks the principal's role against the method, and either refuses the
call (UNAUTHENTICATED, PERMISSION_DENIED) or runs it with the principal in
``current_principal``, where the servicers read it for ownership and limits.

    method                               client  worker  admin   no token
    TaskService/*                          yes      -      yes      -
    WorkerService/Connect, TakeRate         -      yes     yes      -
    grpc.reflection.*                      yes     yes     yes      -
    grpc.health.v1.Health/*                yes     yes     yes     yes

Health stays open so that load balancers and Kubernetes probes, which send no
metadata, can ask. With mutual TLS, a call without a token is its client
certificate's principal (``urn:taskloom:<role>:<name>``; a certificate that
names none gets no role). With neither tokens nor mutual TLS, authentication
is off and every caller is the local admin (the supervisor then listens on
loopback only, unless told ``--insecure``).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from cryptography import x509

from taskloom.core.auth import (
    LOCAL_ADMIN,
    Principal,
    Role,
    TokenTable,
    bearer,
    hash_token,
    principal_of_uris,
)
from taskloom.core.errors import PermissionDenied, TaskloomError, Unauthenticated
from taskloom.core.status import abort

logger = logging.getLogger(__name__)

current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "taskloom_principal", default=LOCAL_ADMIN
)
"""The caller of the RPC being served."""
current_credential: contextvars.ContextVar[bytes] = contextvars.ContextVar(
    "taskloom_credential", default=b""
)
"""The hash of the token the caller presented (empty: none), so that a long
stream opened with it can be closed when it is revoked or expires."""

OPEN_PREFIX = "/grpc.health.v1.Health/"
WORKER_METHODS = frozenset(
    {"/taskloom.v1.WorkerService/Connect", "/taskloom.v1.WorkerService/TakeRate"}
)
CLIENT_PREFIX = "/taskloom.v1.TaskService/"
ANY_ROLE_PREFIX = "/grpc.reflection."
LOG_EVERY = 10.0
"""Refusals are logged at most once per this many seconds (plus a count)."""


def allowed(role: Role, method: str) -> bool:
    """Whether ``role`` may call ``method`` (its full gRPC name)."""
    if role is Role.ADMIN or method.startswith(ANY_ROLE_PREFIX):
        return True
    if method in WORKER_METHODS:
        return role is Role.WORKER
    return role is Role.CLIENT and method.startswith(CLIENT_PREFIX)


Continuation: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"
)
Refused: TypeAlias = Callable[[str], None]


class Authenticator(grpc.aio.ServerInterceptor):
    """Checks the credentials (a bearer token, or with mutual TLS a client
    certificate) and the role of every call but health checks."""

    def __init__(
        self,
        tokens: Callable[[], TokenTable],
        refused: Refused | None = None,
        *,
        mutual_tls: bool = False,
    ) -> None:
        self._tokens = tokens
        """The table now (it is reloaded when its file changes)."""
        self._mutual_tls = mutual_tls
        self._refused = refused or (lambda reason: None)
        self._last_log = 0.0
        self._unlogged = 0

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        tokens = self._tokens()
        if handler is None or not (tokens or self._mutual_tls) or method.startswith(OPEN_PREFIX):
            return handler
        token = bearer(handler_call_details.invocation_metadata or ())
        error: TaskloomError
        if token is None or not tokens:
            if self._mutual_tls:
                return self._certified(handler, method)
            error = Unauthenticated(
                "this supervisor needs a token: pass --token or set TASKLOOM_TOKEN"
            )
            return self._refuse(handler, error, "missing", method)
        entry = tokens.entry(token) if token else None
        if entry is None:
            error = Unauthenticated(
                "the token is not valid (unknown, revoked or malformed); "
                "ask the operator for a new one"
            )
            return self._refuse(handler, error, "invalid", method)
        if entry.expired(time.time()):
            error = Unauthenticated(
                f"the token of {entry.principal.name} expired at "
                f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(entry.expires))}; "
                "ask the operator for a new one"
            )
            return self._refuse(handler, error, "expired", method, entry.principal)
        problem = self._forbidden(entry.principal, method)
        if problem is not None:
            return self._refuse(handler, problem, "forbidden", method, entry.principal)
        return _as(entry.principal, handler, hash_token(token).encode())

    @staticmethod
    def _forbidden(principal: Principal, method: str) -> TaskloomError | None:
        if allowed(principal.role, method):
            return None
        return PermissionDenied(
            f"{principal.name} has the {principal.role} role, which may not call "
            f"{method.rsplit('/', 1)[-1]}"
        )

    def _certified(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler, run as the principal the client certificate names
        (known only once the call runs, from its TLS session)."""

        def decide(context: Any) -> Principal | TaskloomError:
            principal = certificate_principal(context)
            if principal is None:
                self._note("no role", method)
                return PermissionDenied(
                    "no token, and the client certificate names no taskloom role: present "
                    "a token, or a certificate whose subject alternative names include "
                    "urn:taskloom:<role>:<name> (as `taskloom certs` writes them)"
                )
            problem = self._forbidden(principal, method)
            if problem is not None:
                self._note("forbidden", method, principal)
                return problem
            return principal

        return _as(decide, handler)

    def _note(
        self, reason: str, method: str, principal: Principal | None = None, what: str = ""
    ) -> None:
        self._refused(reason)
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            logger.warning(
                "refused %s: %s%s%s (%d more refusals since the last report)",
                method,
                reason,
                what,
                f" of {principal.name}" if principal else "",
                self._unlogged,
            )
            self._last_log, self._unlogged = now, 0
        else:
            self._unlogged += 1

    def _refuse(
        self,
        handler: grpc.RpcMethodHandler[Any, Any],
        error: TaskloomError,
        reason: str,
        method: str,
        principal: Principal | None = None,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # Never the token: a mistyped one is still someone's secret.
        self._note(reason, method, principal, " token")

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await abort(context, error)

        return _handler_like(handler, refuse)


def certificate_principal(context: Any) -> Principal | None:
    """The principal the peer's client certificate names, if any."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    return principal_of_uris(names.get_values_for_type(x509.UniformResourceIdentifier))


Decide: TypeAlias = Callable[[Any], "Principal | TaskloomError"]


def _as(
    principal: Principal | Decide,
    handler: grpc.RpcMethodHandler[Any, Any],
    credential: bytes = b"",
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, run with ``principal`` as the current caller (or the
    one ``principal(context)`` decides on when the call runs, or its refusal)."""
    inner = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if inner is None:  # pragma: no cover - grpc always sets one
        return handler
    behavior: Callable[..., Any]
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
            # Each call runs in a task (a context) of its own, so the value
            # needs no reset; and a stream the client cancels is closed from
            # another context, where a reset would fail.
            current_principal.set(await _who(principal, context))
            current_credential.set(credential)
            async for item in inner(request, context):
                yield item

        behavior = generator
    else:

        async def coroutine(request: Any, context: Any) -> Any:
            reset = current_principal.set(await _who(principal, context))
            current_credential.set(credential)
            try:
                return await cast(Awaitable[Any], inner(request, context))
            finally:
                current_principal.reset(reset)

        behavior = coroutine
    return _handler_like(handler, behavior)


async def _who(principal: Principal | Decide, context: Any) -> Principal:
    if isinstance(principal, Principal):
        return principal
    decided = principal(context)
    if isinstance(decided, TaskloomError):
        await abort(context, decided)
    assert isinstance(decided, Principal)
    return decided


def _handler_like(
    handler: grpc.RpcMethodHandler[Any, Any], behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and serialization as ``handler`` that runs ``behavior``."""
    make: Any
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    made: grpc.RpcMethodHandler[Any, Any] = make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return made
