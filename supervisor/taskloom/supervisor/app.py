"""The supervisor process: store, planner, scheduler and gRPC server, with a lifecycle.

    async with Supervisor(SupervisorSettings.load()) as supervisor:
        await supervisor.wait_closed()

``start()`` connects to Redis (failing fast with a clear error), recovers
unfinished tasks, and starts serving; ``stop(grace)`` reports NOT_SERVING,
tells workers to reconnect elsewhere, lets RPCs finish for ``grace`` seconds
and closes everything.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskloom.core.channel import server_options
from taskloom.core.errors import ConfigError, TaskloomError
from taskloom.core.llm import LLM, create_llm
from taskloom.supervisor.interceptors import server_interceptors
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


class Supervisor:
    """One supervisor process."""

    def __init__(self, settings: SupervisorSettings, *, llm: LLM | None = None) -> None:
        self.settings = settings
        self.store = Store(
            settings.redis_url, prefix=settings.redis_prefix, retention=settings.retention
        )
        self.llm = llm or create_llm(settings)
        self.scheduler = Scheduler(
            self.store, lease_ttl=settings.lease_ttl, retry_backoff=settings.retry_backoff
        )
        self.planner = Planner(
            self.llm, limits=settings.llm_plan_limits(), repairs=settings.plan_repairs
        )
        self.orchestrator = Orchestrator(settings, self.store, self.planner, self.scheduler)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._llm_check: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """Where clients and workers reach this supervisor."""
        host = self.settings.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self.store.connect()
        await self.orchestrator.start()
        server = grpc.aio.server(
            options=server_options(self.settings.max_message_bytes),
            interceptors=server_interceptors(self.settings),
        )
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(self.orchestrator), server)
        workers_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(self.orchestrator, self.settings), server
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
            await self.orchestrator.stop()
            raise ConfigError(
                f"TASKLOOM_LISTEN / --listen: cannot listen on {self.settings.listen} "
                "(is another process using the port?)"
            )
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._llm_check = asyncio.create_task(self._check_llm())
        logger.info(
            "supervisor %s serving on %s (redis %s, llm %s)",
            self.settings.supervisor_id,
            self.address,
            self.store.safe_url,
            self.llm.describe(),
        )

    async def _check_llm(self) -> None:
        try:
            await self.llm.check()
        except TaskloomError as e:
            logger.warning("%s; tasks without an explicit plan will fail until it is fixed", e)

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving: NOT_SERVING, stop deciding, Drain to workers, finish RPCs
        within ``grace``."""
        grace = self.settings.shutdown_grace if grace is None else grace
        if self._llm_check is not None:
            self._llm_check.cancel()
        await self.orchestrator.stop()
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            for session in self.scheduler.sessions():
                session.send(DrainNotice("the supervisor is shutting down"))
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
