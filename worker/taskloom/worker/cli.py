"""``taskloom worker``: run a worker until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import sys

import click

from taskloom.core import heap
from taskloom.core.errors import ConfigError
from taskloom.core.logs import setup_logging
from taskloom.core.tracing import setup_tracing
from taskloom.worker.settings import WorkerSettings
from taskloom.worker.worker import Worker, load_handlers


@click.command("worker")
@click.option("--supervisor", help="Supervisor HOST:PORT [TASKLOOM_SUPERVISOR]")
@click.option("--capabilities", help="Comma-separated, e.g. llm,echo [TASKLOOM_CAPABILITIES]")
@click.option("--concurrency", type=int, help="Subtasks run at once [TASKLOOM_CONCURRENCY, 4]")
@click.option("--name", help="Name shown in tasks and logs [TASKLOOM_NAME]")
@click.option("--app", help="MODULE:ATTR with custom handlers [TASKLOOM_APP]")
@click.option("--ollama-host", help="Ollama for the llm handler [OLLAMA_HOST]")
@click.option("--llm", help="provider:model, e.g. ollama:llama3.2, embedded:smollm2 [TASKLOOM_LLM]")
@click.option("--model", help="Ollama model when --llm is not given [TASKLOOM_MODEL]")
@click.option(
    "--drain-timeout", help="Grace for running subtasks on SIGTERM [TASKLOOM_DRAIN_TIMEOUT]"
)
@click.option("--metrics-port", help="Serve Prometheus /metrics here [TASKLOOM_METRICS_PORT]")
@click.option("--log-format", help="text or json [TASKLOOM_LOG_FORMAT]")
@click.option("--log-level", help="debug, info, warning, error [TASKLOOM_LOG_LEVEL]")
@click.option("--token", help="Bearer token with the worker role [TASKLOOM_TOKEN]")
@click.option("--tls-ca", help="CA bundle to trust; implies TLS [TASKLOOM_TLS_CA]")
@click.option("--tls-cert", help="This worker's certificate for mutual TLS [TASKLOOM_TLS_CERT]")
@click.option("--tls-key", help="The key of --tls-cert [TASKLOOM_TLS_KEY]")
def command(**flags: str | int | None) -> None:
    """Run a worker: take subtasks from a supervisor and run their handlers."""
    try:
        settings = WorkerSettings.load(**flags)
        settings.client_tls()  # unreadable certificates fail here, not on connect
        setup_logging(settings.log_level, settings.log_format)
        setup_tracing("taskloom-worker")
        registry = load_handlers(settings.app) if settings.app else None
        worker = Worker(settings, registry=registry)
        worker.check()
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    heap.settle()
    asyncio.run(worker.serve(install_signal_handlers=True))
