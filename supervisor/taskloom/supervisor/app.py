"""The supervisor process: store, planner, leadership and gRPC server, with a lifecycle.

    async with Supervisor(SupervisorSettings.load()) as supervisor:
        await supervisor.wait_closed()

Several supervisors may run against one Redis; one leads. ``start()``
connects to Redis (failing fast with a clear error), starts the gRPC server
on standby (health NOT_SERVING, RPCs refused with UNAVAILABLE) and competes
for the leader lease. The leader renews it every third of ``leader_ttl``;
each term of leadership gets a fresh scheduler and orchestrator, which
recover the unfinished tasks from Redis. Every write carries the lease's
token, so a leader that lost its lease (paused, cut off) cannot write; it
steps down as soon as it notices, tells its workers to go elsewhere, and
competes again. ``stop(grace)`` hands the lease over at once, then lets RPCs
finish for ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskloom.core.channel import server_options
from taskloom.core.errors import ConfigError, NotLeader, StoreUnavailable, TaskloomError
from taskloom.core.llm import LLM, create_llm
from taskloom.core.metrics import InstrumentedLLM, serve_metrics
from taskloom.supervisor.interceptors import server_interceptors
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.orchestrator import Orchestrator
from taskloom.supervisor.planner import Planner
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
NO_LEASE = "-"
"""The store's fence while not leading: matches no lease, so every write is refused."""


BACKGROUND_STOP_WAIT = 5.0


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
        self.metrics.watch(lambda: self.scheduler_if_leading, lambda: self.orchestrator is not None)
        self.metrics_port = 0
        """Where /metrics is served once started (0: not served)."""
        self.store = Store(
            settings.redis_url, prefix=settings.redis_prefix, retention=settings.retention
        )
        self.store.metrics = self.metrics
        self.store.fence = NO_LEASE
        self.llm = InstrumentedLLM(llm or create_llm(settings), self.metrics.llm, "plan")
        self.planner = Planner(
            self.llm,
            limits=settings.llm_plan_limits(),
            repairs=settings.plan_repairs,
            reply_tokens=settings.plan_reply_tokens,
        )
        self.orchestrator: Orchestrator | None = None
        """This term's orchestrator while leading; None on standby."""
        self.leader_token = ""
        self.terms = 0
        """How often this supervisor has become the leader."""
        self._leader_seen = ""
        self._valid_until = 0.0
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._background: list[asyncio.Task[None]] = []
        self._ending: asyncio.Future[None] | None = None
        self._leading = asyncio.Event()
        self.port = 0

    @property
    def address(self) -> str:
        """Where clients and workers reach this supervisor."""
        host = self.settings.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", "::"):
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

    def current(self) -> Orchestrator:
        """The orchestrator of the current term, or NotLeader on standby."""
        orchestrator = self.orchestrator
        if orchestrator is None:
            leader = self._leader_seen.partition("/")[2] or "no supervisor"
            raise NotLeader(
                f"supervisor {self.settings.supervisor_id} is on standby and "
                f"{leader} holds the leader lease; use the leader's address "
                "(or give several with commas)"
            )
        return orchestrator

    async def start(self) -> None:
        await self.store.connect()
        server = grpc.aio.server(
            options=server_options(self.settings.max_message_bytes),
            interceptors=server_interceptors(self.settings),
        )
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(self.current), server)
        workers_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(self.current, self.settings), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self.port = server.add_insecure_port(self.settings.listen)
        except RuntimeError:
            self.port = 0
        if not self.port:
            await self.store.close()
            raise ConfigError(
                f"TASKLOOM_LISTEN / --listen: cannot listen on {self.settings.listen} "
                "(is another process using the port?)"
            )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if self.settings.metrics_port is not None:
            self.metrics_port = serve_metrics(
                self.settings.metrics_port, self.metrics.registry, self.settings.metrics_host
            )
            logger.info("metrics on http://%s:%d/metrics", self.settings.metrics_host,
                        self.metrics_port)  # fmt: skip
        logger.info(
            "supervisor %s listening on %s (redis %s, llm %s)",
            self.settings.supervisor_id,
            self.address,
            self.store.safe_url,
            self.llm.describe(),
        )
        # One attempt now, so a lone supervisor leads as soon as start() returns.
        await self._campaign()
        if self.orchestrator is None:
            logger.info(
                "on standby: %s holds the leader lease", self._leader_seen or "another supervisor"
            )
        self._background = [
            asyncio.create_task(self._lead_forever(), name="taskloom-leadership"),
            asyncio.create_task(self._check_llm(), name="taskloom-llm-check"),
        ]

    async def wait_leading(self) -> None:
        """Until this supervisor holds the leader lease."""
        await self._leading.wait()

    # -- leadership ----------------------------------------------------------------

    async def _lead_forever(self) -> None:
        interval = self.settings.leader_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._campaign()
            except Exception:
                logger.exception("leadership round failed; trying again")

    async def _campaign(self) -> None:
        """One round: renew the lease if we lead, else try to take it."""
        ttl = self.settings.leader_ttl
        sent = time.monotonic()
        try:
            if self.orchestrator is None:
                won, token = await self.store.acquire_lease(self._holder(), ttl)
                self._leader_seen = token
                if won:
                    self._valid_until = sent + ttl
                    await self._begin_term(token)
                return
            kept, token = await self.store.renew_lease(self.leader_token, ttl)
        except StoreUnavailable as e:
            # Nobody can take the lease while Redis is away, but once it is
            # back ours may have expired: give up before it can have.
            if self.orchestrator is not None and time.monotonic() > self._valid_until - ttl / 3:
                await self._end_term(f"cannot renew the leader lease: {e}")
            else:
                logger.warning("leadership: %s", e)
            return
        if kept:
            self._valid_until = sent + ttl
        else:
            self._leader_seen = token
            await self._end_term(f"the leader lease is now held by {token or 'nobody'}")

    def _holder(self) -> str:
        return f"{self.settings.supervisor_id}@{self.address}"

    async def _begin_term(self, token: str) -> None:
        self.store.fence = token
        self.leader_token = token
        scheduler = Scheduler(
            self.store,
            lease_ttl=self.settings.lease_ttl,
            retry_backoff=self.settings.retry_backoff,
            metrics=self.metrics,
        )
        orchestrator = Orchestrator(
            self.settings, self.store, self.planner, scheduler, metrics=self.metrics
        )
        try:
            await orchestrator.start()
        except (StoreUnavailable, NotLeader) as e:
            logger.warning("could not take over: %s", e)
            await orchestrator.stop()
            self.store.fence = NO_LEASE
            with contextlib.suppress(TaskloomError):
                await self.store.release_lease(token)
            return
        self.orchestrator = orchestrator
        self.terms += 1
        self._leading.set()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("leading (lease %s)", token)

    async def _end_term(self, reason: str) -> None:
        """Stop deciding, refuse writes, send the workers elsewhere.

        The winding down runs to its end even if the caller is cancelled (a
        stop() during a step-down), or the term's loops would run on.
        """
        orchestrator, self.orchestrator = self.orchestrator, None
        if orchestrator is not None:
            self._leading.clear()
            self._ending = asyncio.ensure_future(self._wind_down(orchestrator, reason))
        if self._ending is not None:
            await asyncio.shield(self._ending)

    async def _wind_down(self, orchestrator: Orchestrator, reason: str) -> None:
        logger.warning("stepping down: %s", reason)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await orchestrator.stop()
        self.store.fence = NO_LEASE
        for session in orchestrator.scheduler.sessions():
            session.send(DrainNotice(reason))
            session.close()

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
            _, stuck = await asyncio.wait(self._background, timeout=BACKGROUND_STOP_WAIT)
            for task in stuck:
                logger.warning("%s did not stop within %.0fs; going on", task.get_name(),
                               BACKGROUND_STOP_WAIT)  # fmt: skip
        self._background = []
        await self._end_term("the supervisor is shutting down")
        if self.leader_token:
            # Hand over at once: a standby need not wait for the lease to expire.
            with contextlib.suppress(TaskloomError):
                await self.store.release_lease(self.leader_token)
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
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
