"""The supervisor process: store, planner, leadership and gRPC server, with a lifecycle.

    async with Supervisor(SupervisorSettings.load()) as supervisor:
        await supervisor.wait_closed()

Several supervisors may run against one Redis; one leads (``leadership``).
``start()`` connects to Redis (failing fast with a clear error), starts the
gRPC server on standby (health NOT_SERVING, RPCs refused with UNAVAILABLE
naming the leader, whom callers follow)
and competes for the leader lease. Each term of leadership gets a fresh
scheduler and orchestrator, which recover the unfinished tasks from Redis;
when the term ends its workers are told to go elsewhere. ``stop(grace)``
hands the lease over at once, then lets RPCs finish for ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskloom.core.channel import CertificateFiles, is_loopback, server_options
from taskloom.core.errors import (
    ConfigError,
    NotLeader,
    StoreUnavailable,
    TaskloomError,
    Unauthenticated,
)
from taskloom.core.llm import LLM, create_llm
from taskloom.core.logs import hide_grpc_metadata
from taskloom.core.metrics import InstrumentedLLM, serve_metrics
from taskloom.core.prices import load_prices
from taskloom.core.ratelimits import RateLimitedLLM, RateLimiter
from taskloom.core.roles import load_roles
from taskloom.supervisor.console import Console
from taskloom.supervisor.interceptors import server_interceptors
from taskloom.supervisor.leadership import Leadership
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.orchestrator import Orchestrator
from taskloom.supervisor.planner import Planner
from taskloom.supervisor.quotas import Quotas
from taskloom.supervisor.scheduler import DrainNotice, Scheduler
from taskloom.supervisor.server import TaskServicer, WorkerServicer
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.supervisor.store import Store
from taskloom.v1 import tasks_pb2, tasks_pb2_grpc, workers_pb2, workers_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    workers_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
)
LIVENESS = "liveness"
"""The health service that is SERVING whenever the process runs, leader or not."""
READY = "ready"
"""SERVING while this supervisor answers calls, leader or standby (a standby
names the leader, and callers follow): Kubernetes' readiness, so that every
supervisor is an endpoint and a drain may take any one of them."""
BACKGROUND_STOP_WAIT = 5.0


TOKENS_CHECK = 2.0
"""How often the tokens file is checked for changes (and tokens for expiry)."""


def certificate_pin(path: Path) -> bytes:
    """SHA-256 of the first certificate in a PEM file (its DER form)."""
    pem = path.read_text()
    return hashlib.sha256(
        ssl.PEM_cert_to_DER_cert(pem[: pem.index("-----END CERTIFICATE-----") + 25])
    ).digest()


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime_ns if path is not None else 0.0
    except OSError:
        return 0.0


class Supervisor:
    """One supervisor process: a leader, or a standby ready to take over."""

    def __init__(
        self,
        settings: SupervisorSettings,
        *,
        llm: LLM | None = None,
        metrics: SupervisorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or SupervisorMetrics()
        """This process's metrics; they outlive terms of leadership."""
        self.metrics.watch(
            lambda: self.scheduler_if_leading,
            lambda: self.orchestrator is not None,
            lambda: self.orchestrator.approvals() if self.orchestrator is not None else {},
            configured=settings.capabilities,
        )
        self.metrics.approval_alert_after.set(settings.approval_alert_after)
        self.metrics_port = 0
        """Where /metrics is served once started (0: not served)."""
        self.store = Store(
            settings.redis_url,
            prefix=settings.redis_prefix,
            retention=settings.retention,
            unsuccessful_retention=settings.unsuccessful_retention,
            compact_after=settings.compact_after,
            max_connections=settings.redis_max_connections,
            retry_backoff=settings.retry_backoff,
            min_replicas=settings.replicas,
            replica_timeout=settings.redis_replica_timeout,
        )
        self.store.metrics = self.metrics
        self.prices = load_prices(settings.prices_file)
        """What LLM calls cost (``TASKLOOM_PRICES_FILE``): the planner's, and
        workers', who get it in their Welcome."""
        self.rate_limits = settings.rate_limit_table()
        """Providers' limits (``TASKLOOM_RATE_LIMITS``): the planner keeps to
        them here, workers through ``TakeRate``."""
        self.llm = RateLimitedLLM(
            InstrumentedLLM(
                llm or create_llm(settings), self.metrics.llm, "plan", prices=self.prices
            ),
            RateLimiter(self.rate_limits, self.store.take_rate, self.metrics.llm),
        )
        self.planner = Planner(
            self.llm,
            limits=settings.llm_plan_limits(),
            repairs=settings.plan_repairs,
            reply_tokens=settings.plan_reply_tokens,
            roles=load_roles(settings.roles_file),
        )
        self.orchestrator: Orchestrator | None = None
        """This term's orchestrator while leading; None on standby."""
        self.terms = 0
        """How often this supervisor has become the leader."""
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._console_tls: tuple[CertificateFiles, ssl.SSLContext] | None = None
        self.console: Console | None = None
        """The web console, once started (``console_port``)."""
        self.health_port = 0
        """Where the plaintext health-only server listens once started (0: none)."""
        self._background: list[asyncio.Task[None]] = []
        self.port = 0
        self.tokens = settings.token_table()
        hide_grpc_metadata()  # a bad token in a header must not reach the log
        """Who may call (empty: authentication is off)."""
        self.listen = self._guarded_listen()
        self.metrics_host = self._guarded_metrics_host()
        """Where /metrics and the health port listen: on loopback too when
        the gRPC port was kept there for lack of authentication."""
        self.quotas = Quotas(settings, self.metrics)
        self.leadership = Leadership(self.store, "", settings.leader_ttl, self)

    @property
    def authenticated(self) -> bool:
        """Whether callers must prove who they are: tokens, or mutual TLS
        (whose certificates name a role; one that names none gets nothing)."""
        return bool(self.tokens) or self.settings.tls_client_ca is not None

    def _guarded_metrics_host(self) -> str:
        host = self.settings.metrics_host
        if self.authenticated or self.settings.insecure or is_loopback(f"{host}:0"):
            return host
        logger.warning(
            "metrics and health listen on 127.0.0.1, not %s, as gRPC does without "
            "authentication: set tokens or mutual TLS, or pass --insecure",
            host,
        )
        return "127.0.0.1"

    def _guarded_listen(self) -> str:
        """Where to listen: without tokens or mutual TLS only on loopback,
        unless the operator said --insecure."""
        listen = self.settings.listen
        protected = self.authenticated
        if protected or self.settings.insecure or is_loopback(listen):
            if not protected and not is_loopback(listen):
                logger.warning(
                    "INSECURE: serving %s without tokens (--insecure): anyone who can "
                    "connect may submit, read every task and register as a worker", listen
                )  # fmt: skip
            return listen
        loopback = f"127.0.0.1:{listen.rpartition(':')[2]}"
        logger.warning(
            "NO TOKENS ARE CONFIGURED, so the supervisor listens on %s only, not %s: "
            "set TASKLOOM_TOKENS_FILE (see `taskloom tokens add`) or pass --insecure",
            loopback,
            listen,
        )
        return loopback

    def _bind(self, server: grpc.aio.Server) -> int:
        """Add the listening port, with TLS when a certificate is configured."""
        settings = self.settings
        if (settings.tls_cert is None) != (settings.tls_key is None):
            raise ConfigError("TASKLOOM_TLS_CERT and TASKLOOM_TLS_KEY: give both or neither")
        if settings.metrics_tls and settings.tls_cert is None:
            raise ConfigError("TASKLOOM_METRICS_TLS needs TASKLOOM_TLS_CERT and _KEY")
        if settings.tls_client_ca is not None and settings.tls_cert is None:
            raise ConfigError("TASKLOOM_TLS_CLIENT_CA needs TLS: set TASKLOOM_TLS_CERT and _KEY")
        try:
            if settings.tls_cert is None:
                return server.add_insecure_port(self.listen)
            settings.read_file("tls_cert")  # unreadable files: a ConfigError naming them
            settings.read_file("tls_key")
            settings.read_file("tls_client_ca")
            assert settings.tls_key is not None  # both are set, checked above
            try:
                files = CertificateFiles(
                    settings.tls_cert, settings.tls_key, settings.tls_client_ca
                )
            except (ssl.SSLError, ValueError) as e:
                raise ConfigError(
                    f"TASKLOOM_TLS_CERT and TASKLOOM_TLS_KEY: not a certificate and its key ({e})"
                ) from None
            # Read again for new connections when the files change (a renewal).
            return server.add_secure_port(self.listen, files.credentials())
        except RuntimeError as e:  # grpc's way of saying the bind failed
            raise ConfigError(
                f"cannot listen on {self.listen}: {e} (is another process using that port?)"
            ) from None

    @property
    def address(self) -> str:
        """Where clients and workers reach this supervisor."""
        host = self.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def _advertise(self) -> str:
        """Where others reach this supervisor directly (``TASKLOOM_ADVERTISE``,
        else the listen address with this host's address for a wildcard);
        worked out once, at start, into the lease holder's name."""
        if self.settings.advertise:
            return self.settings.advertise
        host = self.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", "::"):
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def scheduler(self) -> Scheduler:
        """This term's scheduler (only while leading)."""
        return self.current().scheduler

    @property
    def scheduler_if_leading(self) -> Scheduler | None:
        orchestrator = self.orchestrator
        return orchestrator.scheduler if orchestrator is not None else None

    def _redirect(self) -> str:
        """Where a standby sends callers: the address the lease's holder
        serves at, or '' if the lease names none, or this supervisor's own
        (it still holds it, or a dead one served here before a restart)."""
        _, at, address = self.leadership.leader.rpartition("@")
        return address if at and address != self.leadership.holder.rpartition("@")[2] else ""

    def _leader_host(self) -> str:
        """The leader's host while this supervisor is a standby that knows
        where the leader serves (else ''): where the console relays to."""
        if self.orchestrator is not None:
            return ""
        return self._redirect().rpartition(":")[0].strip("[]")

    def current(self) -> Orchestrator:
        """The orchestrator of the current term, or NotLeader on standby."""
        orchestrator = self.orchestrator
        if orchestrator is None:
            leader = self.leadership.leader
            follow = self._redirect()
            raise NotLeader(
                f"supervisor {self.settings.supervisor_id} is on standby and "
                f"{leader or 'no supervisor'} holds the leader lease; "
                + (
                    "calls follow it there"
                    if follow
                    else "use the leader's address (or give several with commas)"
                ),
                leader=follow,
            )
        return orchestrator

    async def start(self) -> None:
        await self.store.connect()
        server = grpc.aio.server(
            options=server_options(self.settings.server_limits()),
            interceptors=server_interceptors(
                lambda: self.tokens,
                lambda reason: self.metrics.refused.labels(reason).inc(),
                mutual_tls=self.settings.tls_client_ca is not None,
                registry=self.metrics.registry,
            ),
        )
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(
            TaskServicer(self.current, self.quotas), server
        )
        workers_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(self.current, self.settings, self.prices, self.rate_limits), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self.port = self._bind(server)
        except RuntimeError:
            self.port = 0
        except ConfigError:
            await self.store.close()
            raise
        if not self.port:
            await self.store.close()
            raise ConfigError(
                f"TASKLOOM_LISTEN / --listen: cannot listen on {self.listen} "
                "(is another process using the port?)"
            )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(READY, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._server = server
        if self.settings.console_port is not None:
            await self._serve_console(self.settings.console_port)
        if self.settings.health_port is not None:
            await self._serve_health(self.settings.health_port)
        if self.settings.metrics_port is not None:
            tls = self.settings.metrics_tls and self.settings.tls_cert is not None
            self.metrics_port = serve_metrics(
                self.settings.metrics_port,
                self.metrics.registry,
                self.metrics_host,
                certfile=str(self.settings.tls_cert) if tls else None,
                keyfile=str(self.settings.tls_key) if tls else None,
            )
            logger.info("metrics on %s://%s:%d/metrics", "https" if tls else "http",
                        self.metrics_host, self.metrics_port)  # fmt: skip
        logger.info(
            "supervisor %s listening on %s (%s, %s; redis %s, llm %s)",
            self.settings.supervisor_id,
            f"{self.listen.rpartition(':')[0]}:{self.port}",  # as bound, 0.0.0.0 included
            ("mutual TLS" if self.settings.tls_client_ca else "TLS")
            if self.settings.tls_cert
            else "plaintext",
            f"{len(self.tokens)} tokens"
            if self.tokens
            else "client certificates name the callers"
            if self.settings.tls_client_ca
            else "no authentication: everyone is admin",
            self.store.safe_url,
            self.llm.describe(),
        )
        # One attempt now, so a lone supervisor leads as soon as start() returns.
        self.leadership.holder = f"{self.settings.supervisor_id}@{self._advertise()}"
        await self.leadership.campaign()
        if self.orchestrator is None:
            logger.info(
                "on standby: %s holds the leader lease",
                self.leadership.seen or "another supervisor",
            )
        self.leadership.start()
        self._background = [
            asyncio.create_task(self._check_llm(), name="taskloom-llm-check"),
            asyncio.create_task(self._watch_files(), name="taskloom-files"),
        ]

    def reload_tokens(self) -> None:
        """Read the tokens again (SIGHUP, or the file changed): new tokens work
        at once; worker streams opened with a token that is gone or expired
        are closed. A file that no longer parses leaves the table as it was."""
        try:
            table = self.settings.token_table()
        except TaskloomError as e:
            logger.error("tokens not reloaded, the old ones stay in force: %s", e)
            return
        if not table and self.tokens:
            logger.error("tokens not reloaded: the new table is empty (that would open the door)")
            return
        self.tokens = table
        logger.info("tokens reloaded: %d entries", len(table))
        self._close_revoked()

    def _close_revoked(self) -> None:
        if self.orchestrator is None or not self.tokens:
            return
        now = time.time()
        for session in self.orchestrator.scheduler.sessions():
            if session.credential and not self.tokens.valid(session.credential, now):
                logger.warning("closing %s: its token was revoked or has expired", session)
                session.close(Unauthenticated("this worker's token was revoked or has expired"))
        for client in list(self.orchestrator.watching.sessions):
            if client.credential and not self.tokens.valid(client.credential, now):
                logger.warning("closing %s: its token was revoked or has expired", client)
                client.close(Unauthenticated("this client's token was revoked or has expired"))

    async def _watch_files(self) -> None:
        """Reload the tokens file when it changes; close streams whose token
        expired; give the console a renewed certificate (gRPC takes it itself,
        at its next handshake)."""
        path = self.settings.tokens_file
        seen = _mtime(path)
        while True:
            await asyncio.sleep(TOKENS_CHECK)
            now = _mtime(path)
            if now != seen:
                seen = now
                self.reload_tokens()
            else:
                self._close_revoked()
            if self._console_tls is not None and self._console_tls[0].changed():
                files, context = self._console_tls
                context.load_cert_chain(str(files.cert), str(files.key))
                if self.console is not None:
                    self.console.pin = certificate_pin(files.cert)

    async def _serve_console(self, port: int) -> None:
        """The web console, where gRPC listens (so on loopback unless the
        supervisor is opened up), over HTTPS when gRPC has TLS."""
        settings = self.settings
        console = Console(
            self.current,
            lambda: self.tokens,
            self.quotas,
            secure=settings.tls_cert is not None,
            capabilities=lambda: self.current().planning.capabilities(),
            plan_limits=settings.explicit_plan_limits(),
            leader=self._leader_host,
            pin=certificate_pin(settings.tls_cert) if settings.tls_cert is not None else None,
        )
        context = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
            # Renewed certificates are loaded into the same context (_watch_files).
            self._console_tls = (CertificateFiles(settings.tls_cert, settings.tls_key), context)
        host = self.listen.rpartition(":")[0].strip("[]")
        try:
            await console.start(host, port, context)
        except OSError as e:
            await self.stop(0)
            raise ConfigError(
                f"TASKLOOM_CONSOLE_PORT / --console-port: cannot listen on {host}:{port}: "
                f"{e.strerror or e}"
            ) from None
        self.console = console
        scheme = "https" if context is not None else "http"
        logger.info("console on %s://%s:%d/", scheme, self.address.rpartition(":")[0], console.port)

    async def _serve_health(self, port: int) -> None:
        """The health service alone, in plaintext: probes cannot do TLS, and
        this port offers nothing else."""
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, health_server)
        address = f"{self.metrics_host}:{port}"
        try:
            self.health_port = health_server.add_insecure_port(address)
        except RuntimeError:
            self.health_port = 0
        if not self.health_port:
            await self.stop(0)
            raise ConfigError(f"TASKLOOM_HEALTH_PORT / --health-port: cannot listen on {address}")
        await health_server.start()
        self._health_server = health_server

    # -- terms of leadership ------------------------------------------------------------

    async def begin(self, token: str) -> bool:
        """Lead: a fresh scheduler and orchestrator recover the unfinished tasks."""
        scheduler = Scheduler(
            self.store,
            lease_ttl=self.settings.lease_ttl,
            metrics=self.metrics,
        )
        orchestrator = Orchestrator(
            self.settings, self.store, self.planner, scheduler, metrics=self.metrics
        )
        orchestrator.planning.rights = lambda owner: self.tokens.rights(owner)
        self.planner.inventory = scheduler.inventory  # what this term's workers offer
        try:
            await orchestrator.start()
        except (StoreUnavailable, NotLeader) as e:
            logger.warning("could not take over: %s", e)
            await orchestrator.stop()
            return False
        self.orchestrator = orchestrator
        self.terms += 1
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        await self._check_durability()
        return True

    def end(self, reason: str) -> Awaitable[None]:
        """Refuse requests from now on; wind the term down."""
        orchestrator, self.orchestrator = self.orchestrator, None
        self.metrics.redis_durable.set(-1)
        return self._wind_down(orchestrator, reason)

    async def _wind_down(self, orchestrator: Orchestrator | None, reason: str) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if orchestrator is None:
            return
        await orchestrator.stop()
        for session in orchestrator.scheduler.sessions():
            session.send(DrainNotice(reason))
            session.close()

    async def _check_durability(self) -> None:
        """Say so when Redis's persistence can lose what taskloom acknowledges."""
        try:
            found = await self.store.persistence()
        except StoreUnavailable:
            return
        if self.orchestrator is None:
            return  # stepped down meanwhile: the gauge stays "not known"
        if found is None:
            logger.warning(
                "cannot read Redis's persistence settings (CONFIG GET is refused): unless "
                "it runs with appendonly yes and appendfsync always, a crash of Redis can "
                "lose work taskloom has acknowledged"
            )
            return
        durable = found == ("yes", "always")
        self.metrics.redis_durable.set(1 if durable else 0)
        if not durable:
            logger.warning(
                "Redis at %s runs with appendonly %s and appendfsync %s: a crash of Redis "
                "can lose work taskloom has acknowledged (with everysec, up to 2 s of it, "
                "even when only the Redis process dies). Run it with appendonly yes and "
                "appendfsync always (README, Durability)",
                self.store.safe_url,
                *found,
            )

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def _check_llm(self) -> None:
        try:
            await self.llm.check()
        except TaskloomError as e:
            logger.warning("%s; tasks without an explicit plan will fail until it is fixed", e)

    # -- lifecycle -------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving: hand the lease to a standby at once, send workers away,
        let RPCs finish within ``grace``."""
        grace = self.settings.shutdown_grace if grace is None else grace
        for task in self._background:
            task.cancel()
        if self._background:
            # Bounded: a shutdown must finish even if a task ignores its cancel.
            await asyncio.wait(self._background, timeout=BACKGROUND_STOP_WAIT)
        self._background = []
        await self.leadership.stop(BACKGROUND_STOP_WAIT)
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None
        if self.console is not None:
            await self.console.stop()
            self.console = None
        await self.store.close()
        await self.llm.close()
        logger.info("supervisor stopped")

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
