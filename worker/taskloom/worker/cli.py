"""``taskloom worker``: run a worker until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import sys

import click

from taskloom.core import exits, heap
from taskloom.core.errors import ConfigError, TaskloomError
from taskloom.core.flags import settings_options
from taskloom.core.logs import setup_logging
from taskloom.core.parent import watch_parent
from taskloom.core.tracing import setup_tracing
from taskloom.worker.settings import WorkerSettings
from taskloom.worker.worker import Worker, load_handlers


@click.command("worker")
@settings_options(WorkerSettings)
def command(**flags: str | int | None) -> None:
    """Run a worker: take subtasks from a supervisor and run their handlers."""
    try:
        settings = WorkerSettings.load(**flags)
        settings.client_tls()  # unreadable certificates fail here, not on connect
        settings.bearer_token()  # and so does an unreadable token file
        setup_logging(settings.log_level, settings.log_format)
        setup_tracing("taskloom-worker")
        registry = load_handlers(settings.app) if settings.app else None
        worker = Worker(settings, registry=registry)
        worker.check()
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(exits.USAGE)
    heap.settle()
    watch_parent()
    try:
        asyncio.run(worker.serve(install_signal_handlers=True))
    except TaskloomError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(exits.exit_code(e))
