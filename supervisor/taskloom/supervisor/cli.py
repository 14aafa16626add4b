"""``taskloom supervisor``: run a supervisor until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from taskloom.core import heap
from taskloom.core.errors import ConfigError, TaskloomError, Unavailable
from taskloom.core.logs import setup_logging
from taskloom.core.tracing import setup_tracing
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings

logger = logging.getLogger(__name__)


@click.command("supervisor")
@click.option("--listen", help="HOST:PORT to serve gRPC on [TASKLOOM_LISTEN, 127.0.0.1:50051]")
@click.option("--redis-url", help="Redis to keep state in [TASKLOOM_REDIS_URL]")
@click.option("--redis-prefix", help="Prefix of every Redis key [TASKLOOM_REDIS_PREFIX]")
@click.option("--ollama-host", help="Ollama for planning [OLLAMA_HOST]")
@click.option("--llm", help="provider:model, e.g. ollama:llama3.2, embedded:smollm2 [TASKLOOM_LLM]")
@click.option("--model", help="Ollama model when --llm is not given [TASKLOOM_MODEL]")
@click.option(
    "--heartbeat-interval",
    help="Heartbeat period of a worker that runs something [TASKLOOM_HEARTBEAT_INTERVAL]",
)
@click.option("--lease-ttl", help="Silence after which a worker's work moves [TASKLOOM_LEASE_TTL]")
@click.option(
    "--leader-ttl", help="The leader lease; a standby takes over after it [TASKLOOM_LEADER_TTL]"
)
@click.option("--metrics-port", help="Serve Prometheus /metrics here [TASKLOOM_METRICS_PORT]")
@click.option("--health-port", help="Plaintext gRPC health for probes [TASKLOOM_HEALTH_PORT]")
@click.option("--log-format", help="text or json [TASKLOOM_LOG_FORMAT]")
@click.option("--log-level", help="debug, info, warning, error [TASKLOOM_LOG_LEVEL]")
@click.option("--tls-cert", help="Serve gRPC over TLS with this certificate [TASKLOOM_TLS_CERT]")
@click.option("--tls-key", help="The key of --tls-cert [TASKLOOM_TLS_KEY]")
@click.option(
    "--tls-client-ca",
    help="Mutual TLS: peers need a certificate from this CA [TASKLOOM_TLS_CLIENT_CA]",
)
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="Serve beyond loopback without tokens (anyone who connects is admin) [TASKLOOM_INSECURE]",
)
def command(**flags: str | None) -> None:
    """Run a supervisor: plan goals, schedule subtasks on workers, keep state in Redis."""
    try:
        settings = SupervisorSettings.load(**flags)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    setup_logging(settings.log_level, settings.log_format)
    setup_tracing("taskloom-supervisor")
    try:
        asyncio.run(_serve(settings))
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Unavailable as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(3)
    except TaskloomError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


async def _serve(settings: SupervisorSettings) -> None:
    supervisor = Supervisor(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await supervisor.start()
    heap.settle()
    try:
        await stop.wait()
        logger.info("stopping (grace %.0fs)", settings.shutdown_grace)
    finally:
        await supervisor.stop()
