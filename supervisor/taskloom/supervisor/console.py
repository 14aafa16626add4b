"""The web console: a live view of tasks, and the actions a person may take.

Served by the supervisor on an HTTP port of its own (``--console-port``),
from static files in ``console/`` (plain JavaScript modules, no build step)
and a small JSON API over the same commands and watches as the gRPC API:

    GET    /                            the task list
    GET    /tasks/{id}                  a task's page: its graph, live
    GET    /static/{file}               the page's files (a fixed list)
    GET    /api/session                 who is signed in (401 if nobody)
    POST   /api/session {token}         sign in: the token goes into an HttpOnly cookie
    DELETE /api/session                 sign out
    GET    /api/tasks?status=&page_token=
    GET    /api/tasks/{id}              the task and its graph (no outputs)
    GET    /api/tasks/{id}/subtasks/{s} one subtask in full, with its inputs
    GET    /api/tasks/{id}/plan         the plan as JSON, to edit before approving
    GET    /api/tasks/{id}/events       server-sent events: the log, then live
    POST   /api/tasks/{id}/{action}     approve, reject, retry, skip, pause, resume, cancel
    POST   /api/plans/validate {plan}   what the validator says of a plan

On a standby the API is relayed to the leader's console (same port, the
leader's host from the lease), so that a console behind a Service that
spreads connections over every supervisor works wherever it lands; over
HTTPS the leader must present the very certificate this supervisor serves
with (a SHA-256 pin). Pages and static files are served locally.

Who may do what is exactly as over gRPC: with tokens configured, a caller
signs in with one (never in a URL) and acts with its role and ownership (a
client sees only its own tasks; a worker token is refused); without tokens
every caller is the local admin, and the console listens only where the
supervisor does (on loopback, unless ``--insecure``). A request that changes
something must carry the ``X-Taskloom-Console`` header, which a page on
another site cannot send without a CORS preflight this server never grants;
the session cookie is also ``SameSite=Strict``. Every response carries a
strict Content-Security-Policy. The live channel is server-sent events from
the same event hub as ``WatchTask``; the browser resumes a broken one from
the last event id it saw (``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from taskloom.core.auth import LOCAL_ADMIN, Principal, Role, TokenTable
from taskloom.core.errors import (
    InvalidArgument,
    PermissionDenied,
    PlanError,
    TaskloomError,
    Unauthenticated,
    Unavailable,
)
from taskloom.core.model import (
    SYNTHESIZE_ID,
    Event,
    Plan,
    PlannedSubtask,
    Subtask,
    Task,
    TaskStatus,
)
from taskloom.core.plan import parse_plan, plan_to_document, validate_plan
from taskloom.core.status import error_detail, status_code
from taskloom.supervisor.orchestrator import Orchestrator
from taskloom.supervisor.quotas import Quotas
from taskloom.supervisor.watching import check_cursor

logger = logging.getLogger(__name__)

COOKIE = "taskloom_session"
CSRF_HEADER = "X-Taskloom-Console"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
STATIC = {
    "console.js": "text/javascript; charset=utf-8",
    "dag.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
"""The files the pages load, and what they are: nothing else is served."""
ACTIONS = ("approve", "reject", "retry", "skip", "pause", "resume", "cancel")
KEEPALIVE = 15.0
"""A comment is sent on a quiet event stream this often, so proxies keep it."""
INPUT_PREVIEW = 20_000
"""Characters of each dependency's output shown as a subtask's input."""
MAX_BODY = 4 * 1024 * 1024
_HTTP = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
}
Current = Callable[[], Orchestrator]
RELAYED = "X-Taskloom-Relayed"
"""Set on a request a standby relays: a supervisor never relays it again."""
REQUEST_HEADERS = ("Accept", "Content-Type", "Cookie", CSRF_HEADER, "Last-Event-ID")
"""What a relayed request carries to the leader (nothing else of the browser's)."""
RESPONSE_HEADERS = (
    "Content-Type",
    "Cache-Control",
    "Set-Cookie",
    "Content-Security-Policy",
    "X-Content-Type-Options",
    "Referrer-Policy",
    "X-Frame-Options",
)


class Console:
    """The console's HTTP server (aiohttp, on the supervisor's event loop)."""

    def __init__(
        self,
        current: Current,
        tokens: Callable[[], TokenTable],
        quotas: Quotas,
        *,
        secure: bool,
        capabilities: Callable[[], frozenset[str]],
        plan_limits: Any,
        leader: Callable[[], str] = str,
        pin: bytes | None = None,
    ) -> None:
        self._current = current
        self._leader = leader
        """The leader's host while this supervisor is a standby that knows it, else ''."""
        self.pin = pin
        """SHA-256 of this supervisor's certificate (DER): what a relay expects of the leader."""
        self._relays: aiohttp.ClientSession | None = None
        self._tokens = tokens
        self._quotas = quotas
        self._secure = secure
        """Whether the page is served over TLS (the cookie is then Secure)."""
        self._capabilities = capabilities
        self._plan_limits = plan_limits
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._files = resources.files("taskloom.supervisor").joinpath("console")

    # -- lifecycle -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._guard, self._relay],
            client_max_size=MAX_BODY,
            handler_args={"max_field_size": 8190},
        )
        app.router.add_get("/", self._page)
        app.router.add_get("/tasks/{task_id}", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/session", self._whoami)
        app.router.add_post("/api/session", self._sign_in)
        app.router.add_delete("/api/session", self._sign_out)
        app.router.add_get("/api/tasks", self._list)
        app.router.add_get("/api/tasks/{task_id}", self._task)
        app.router.add_get("/api/tasks/{task_id}/subtasks/{subtask_id}", self._subtask)
        app.router.add_get("/api/tasks/{task_id}/plan", self._plan)
        app.router.add_get("/api/tasks/{task_id}/events", self._events)
        app.router.add_post("/api/tasks/{task_id}/{action}", self._act)
        app.router.add_post("/api/plans/validate", self._validate)
        return app

    async def start(self, host: str, port: int, ssl_context: Any = None) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server  # the bound port, when 0 was asked for
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._relays is not None:
            await self._relays.close()
            self._relays = None

    # -- every request -----------------------------------------------------------------

    @web.middleware
    async def _guard(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Security headers on every answer; taskloom errors as JSON with the
        status their gRPC code stands for; a change only with the console's
        own header."""
        try:
            if request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
                raise PermissionDenied(
                    f"a change needs the {CSRF_HEADER} header, as the console sends"
                )
            response = await handler(request)
        except web.HTTPException as e:
            if request.path.startswith("/api/"):
                response = _json_error(e.status, "NotFound" if e.status == 404 else "HTTPError",
                                       e.reason or "not found")  # fmt: skip
            else:
                response = web.Response(status=e.status, text=f"{e.status} {e.reason}\n")
        except TaskloomError as e:
            code = status_code(e).name
            field, subject = error_detail(e)
            response = _json_error(_HTTP.get(code, 500), type(e).__name__, e.message,
                                   field=field, subject=subject)  # fmt: skip
        except (json.JSONDecodeError, UnicodeDecodeError):
            response = _json_error(400, "InvalidArgument", "the body is not JSON")
        if not response.prepared:
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers["X-Frame-Options"] = "DENY"
            if request.path.startswith("/api/"):
                response.headers["Cache-Control"] = "no-store"
        return response

    @web.middleware
    async def _relay(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """On a standby, the API is the leader's: pass the request on to its
        console and its answer back, streamed (the event stream included)."""
        leader = self._leader() if request.path.startswith("/api/") else ""
        if not leader or request.headers.get(RELAYED):
            return await handler(request)
        host = f"[{leader}]" if ":" in leader else leader
        url = f"{'https' if self._secure else 'http'}://{host}:{self.port}{request.rel_url}"
        headers = {k: v for k in REQUEST_HEADERS if (v := request.headers.get(k)) is not None}
        headers[RELAYED] = "1"
        if self._relays is None:
            self._relays = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5)
            )
        try:
            upstream = await self._relays.request(
                request.method,
                url,
                headers=headers,
                data=await request.read() or None,
                allow_redirects=False,
                ssl=aiohttp.Fingerprint(self.pin) if self.pin else False,
            )
        except aiohttp.ServerFingerprintMismatch:
            raise Unavailable(
                f"this supervisor is a standby, and the leader at {host}:{self.port} does not "
                "serve with the same certificate, so the console is not relayed to it; "
                "open the leader's console"
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise Unavailable(
                f"this supervisor is a standby, and the leader's console at {host}:{self.port} "
                f"does not answer ({e or type(e).__name__}); try again"
            ) from None
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name in RESPONSE_HEADERS:
                for value in upstream.headers.getall(name, ()):
                    response.headers.add(name, value)
            await response.prepare(request)
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
        return response

    def _principal(self, request: web.Request) -> Principal:
        """Who calls: the signed-in token's principal (a worker's is refused);
        the local admin when no tokens are configured."""
        tokens = self._tokens()
        if not len(tokens):
            return LOCAL_ADMIN
        token = request.cookies.get(COOKIE, "")
        header = request.headers.get("Authorization", "")
        if not token and header.lower().startswith("bearer "):
            token = header[7:].strip()
        if not token:
            raise Unauthenticated("sign in with a token")
        principal = tokens.lookup(token)
        if principal is None:
            raise Unauthenticated("the token is not valid (unknown, revoked or malformed)")
        if principal.role is Role.WORKER:
            raise PermissionDenied(
                f"{principal.name} has the worker role, which may not use the console"
            )
        return principal

    # -- pages ---------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.StreamResponse:
        body = self._files.joinpath("index.html").read_bytes()
        return web.Response(body=body, content_type="text/html", charset="utf-8")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        kind = STATIC.get(name)
        if kind is None:
            raise web.HTTPNotFound()
        body = self._files.joinpath(name).read_bytes()
        return web.Response(body=body, headers={"Content-Type": kind, "Cache-Control": "no-cache"})

    # -- the session ---------------------------------------------------------------------

    async def _whoami(self, request: web.Request) -> web.StreamResponse:
        principal = self._principal(request)
        return web.json_response(
            {
                "name": principal.name,
                "role": str(principal.role),
                "tokens": bool(len(self._tokens())),
            }
        )

    async def _sign_in(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        token = body.get("token")
        if not isinstance(token, str) or not token.strip():
            raise InvalidArgument('send the token as {"token": "..."}', field="token")
        principal = self._tokens().lookup(token.strip()) if len(self._tokens()) else LOCAL_ADMIN
        if principal is None:
            raise Unauthenticated("the token is not valid (unknown, revoked or malformed)")
        if principal.role is Role.WORKER:
            raise PermissionDenied(
                f"{principal.name} has the worker role, which may not use the console"
            )
        response = web.json_response({"name": principal.name, "role": str(principal.role)})
        if len(self._tokens()):
            response.set_cookie(
                COOKIE,
                token.strip(),
                httponly=True,
                samesite="Strict",
                secure=self._secure,
                path="/",
            )
        return response

    async def _sign_out(self, request: web.Request) -> web.StreamResponse:
        response = web.json_response({})
        response.del_cookie(COOKIE, path="/")
        return response

    # -- reading ---------------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.StreamResponse:
        principal = self._principal(request)
        statuses = []
        for name in filter(None, request.query.get("status", "").split(",")):
            try:
                statuses.append(TaskStatus(name.strip().upper()))
            except ValueError:
                raise InvalidArgument(
                    f"status {name[:40]!r} is not a task status", field="status"
                ) from None
        try:
            size = int(request.query.get("page_size", "50"))
        except ValueError:
            raise InvalidArgument("page_size must be a whole number", field="page_size") from None
        tasks, token = await self._current().commands.list_tasks(
            statuses=statuses,
            page_size=max(1, min(size, 200)),
            page_token=request.query.get("page_token", ""),
            principal=principal,
        )
        return web.json_response({"tasks": [_summary(t) for t in tasks], "next_page_token": token})

    async def _task(self, request: web.Request) -> web.StreamResponse:
        principal = self._principal(request)
        task = await self._current().commands.get(
            request.match_info["task_id"], principal=principal
        )
        return web.json_response({**_summary(task), "subtasks": [_node(s) for s in task.subtasks]})

    async def _subtask(self, request: web.Request) -> web.StreamResponse:
        principal = self._principal(request)
        task = await self._current().commands.get(
            request.match_info["task_id"], principal=principal
        )
        wanted = request.match_info["subtask_id"]
        by_id = {s.id: s for s in task.subtasks}
        sub = by_id.get(wanted)
        if sub is None:
            raise InvalidArgument(
                f"task {task.id} has no subtask {wanted[:64]!r}", field="subtask_id"
            )
        inputs = [
            {
                "id": dep,
                "title": by_id[dep].title if dep in by_id else "",
                "status": str(by_id[dep].status) if dep in by_id else "",
                "output": by_id[dep].output[:INPUT_PREVIEW] if dep in by_id else "",
                "cut": dep in by_id and len(by_id[dep].output) > INPUT_PREVIEW,
            }
            for dep in sub.depends_on
        ]
        return web.json_response({**_node(sub), **_detail(sub), "inputs": inputs})

    async def _plan(self, request: web.Request) -> web.StreamResponse:
        principal = self._principal(request)
        task = await self._current().commands.get(
            request.match_info["task_id"], principal=principal
        )
        plan = Plan(
            tuple(
                PlannedSubtask(
                    s.id, s.title, s.instruction, s.capability, s.depends_on, s.params,
                    requires_approval=s.requires_approval,
                )
                for s in task.subtasks
                if s.id != SYNTHESIZE_ID
            ),
            synthesize=task.options.synthesize,
        )  # fmt: skip
        return web.json_response(plan_to_document(plan))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """The task's log, then live, as server-sent events; ends with an
        ``end`` event after the task's last terminal one."""
        principal = self._principal(request)
        task_id = request.match_info["task_id"]
        after = request.headers.get("Last-Event-ID") or request.query.get("after", "")
        orchestrator = self._current()
        # Errors as JSON while they can be, before the stream starts.
        check_cursor(after)
        await orchestrator.commands.check_owner(task_id, principal)
        watch = orchestrator.watching.watch(task_id, after, principal=principal)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
                "Content-Security-Policy": CSP,
                "X-Content-Type-Options": "nosniff",
            }
        )
        with self._quotas.watching(principal):
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")
            try:
                async for chunk in _with_keepalive(watch, KEEPALIVE):
                    if chunk is None:
                        await response.write(b": keepalive\n\n")
                        continue
                    await response.write(b"".join(_sse(e) for e in chunk))
                await response.write(b"event: end\ndata: {}\n\n")
            except TaskloomError as e:
                # The supervisor steps down, say: the browser resumes elsewhere.
                data = json.dumps({"type": type(e).__name__, "message": e.message})
                await response.write(f"event: problem\ndata: {data}\n\n".encode())
            except ConnectionResetError:
                pass
        return response

    # -- acting ----------------------------------------------------------------------------

    async def _act(self, request: web.Request) -> web.StreamResponse:
        principal = self._principal(request)
        task_id, action = request.match_info["task_id"], request.match_info["action"]
        if action not in ACTIONS:
            raise web.HTTPNotFound()
        body = await _body(request)
        sub = _text(body, "subtask")
        reason = _text(body, "reason")
        commands = self._current().commands
        task: Task
        if action == "approve":
            plan = None
            if body.get("plan") is not None:
                plan = parse_plan(body["plan"])
            task = await commands.approve(
                task_id, subtask_id=sub, plan=plan, reason=reason, principal=principal
            )
        elif action == "reject":
            task = await commands.reject(
                task_id, subtask_id=sub, reason=reason, principal=principal
            )
        elif action == "retry":
            instruction = body.get("instruction")
            if instruction is not None and not isinstance(instruction, str):
                raise InvalidArgument("instruction must be a string", field="instruction")
            task = await commands.retry(
                task_id, sub, instruction=instruction or None, reason=reason, principal=principal
            )
        elif action == "skip":
            task = await commands.skip(
                task_id, sub, output=_text(body, "output"), reason=reason, principal=principal
            )
        elif action == "pause":
            task = await commands.pause(task_id, reason=reason, principal=principal)
        elif action == "resume":
            task = await commands.resume(task_id, reason=reason, principal=principal)
        else:
            task = await commands.cancel(task_id, reason, subtask_id=sub, principal=principal)
        return web.json_response(_summary(task))

    async def _validate(self, request: web.Request) -> web.StreamResponse:
        self._principal(request)
        body = await _body(request)
        if "plan" not in body:
            raise InvalidArgument('send the plan as {"plan": {...}}', field="plan")
        try:
            plan = parse_plan(body["plan"])
        except PlanError as e:
            return web.json_response({"ok": False, "violations": e.violations or [e.message]})
        violations = validate_plan(
            plan, capabilities=self._capabilities(), limits=self._plan_limits
        )
        return web.json_response({"ok": not violations, "violations": violations})


# -- helpers ---------------------------------------------------------------------------------


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} for an empty body)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return body


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string", field=name)
    return value


def _json_error(
    status: int, kind: str, message: str, *, field: str = "", subject: str = ""
) -> web.Response:
    error: dict[str, Any] = {"type": kind, "message": message}
    if field:
        error["field"] = field
    if subject:
        error["subject"] = subject
    return web.json_response({"error": error}, status=status)


def _summary(task: Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "status": str(task.status),
        "goal": task.goal,
        "owner": task.owner,
        "paused": task.paused,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "finished_at": task.finished_at,
        "succeeded": task.subtasks_succeeded,
        "total": task.subtasks_total,
        "error": task.error,
        "failure_reason": str(task.failure_reason),
        "result": task.result,
        "plan_version": task.plan_version,
        "approve_plan": task.options.approve_plan,
        "usage": _usage(task.usage),
    }


def _usage(usage: Any) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "calls": usage.calls,
        "seconds": round(usage.seconds, 3),
        "models": [m for m in usage.model.split(",") if m],
        "cost": round(usage.cost, 8),
        "costs": {m: round(c, 8) for m, c in usage.costs.items()},
    }


def _node(sub: Subtask) -> dict[str, Any]:
    """What the graph draws of a subtask (no outputs: a graph of a thousand stays small)."""
    return {
        "id": sub.id,
        "title": sub.title,
        "capability": sub.capability,
        "depends_on": list(sub.depends_on),
        "status": str(sub.status),
        "attempt": sub.attempt,
        "worker": sub.worker,
        "requires_approval": sub.requires_approval,
        "cache_hit": sub.cache_hit,
    }


def _detail(sub: Subtask) -> dict[str, Any]:
    return {
        "instruction": sub.instruction,
        "output": sub.output,
        "error": sub.error,
        "progress": sub.progress,
        "params": dict(sub.params),
        "requires": dict(sub.requires),
        "usage": _usage(sub.usage),
        "ready_at": sub.ready_at,
        "started_at": sub.started_at,
        "finished_at": sub.finished_at,
    }


def _sse(event: Event) -> bytes:
    data = {
        "id": event.id,
        "time": event.time,
        "type": event.type,
        "subtask_id": event.subtask_id,
        "status": event.status,
        "message": event.message,
        "attempt": event.attempt,
        "worker": event.worker,
        "actor": event.actor,
    }
    return f"id: {event.id}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _with_keepalive(
    source: AsyncIterator[list[Event]], every: float
) -> AsyncIterator[list[Event] | None]:
    """``source``'s items, and None whenever it has been quiet for ``every`` seconds."""
    queue: asyncio.Queue[list[Event] | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
            queue.put_nowait(None)
        except BaseException as e:  # handed over, below
            queue.put_nowait(e)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), every)
            except TimeoutError:
                yield None
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await source.aclose()  # type: ignore[attr-defined]
