"""``taskloom supervisor``: run a supervisor until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from taskloom.core import exits, heap
from taskloom.core.errors import ConfigError, TaskloomError
from taskloom.core.flags import settings_options
from taskloom.core.logs import setup_logging
from taskloom.core.parent import watch_parent
from taskloom.core.tracing import setup_tracing
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings

logger = logging.getLogger(__name__)


@click.command("supervisor")
@settings_options(SupervisorSettings)
def command(**flags: str | None) -> None:
    """Run a supervisor: plan goals, schedule subtasks on workers, keep state in Redis."""
    try:
        settings = SupervisorSettings.load(**flags)
        setup_logging(settings.log_level, settings.log_format)
        setup_tracing("taskloom-supervisor")
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(exits.USAGE)
    watch_parent()
    try:
        asyncio.run(_serve(settings))
    except TaskloomError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(exits.exit_code(e))


async def _serve(settings: SupervisorSettings) -> None:
    supervisor = Supervisor(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP reads the tokens file again (it is also watched for changes).
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload_tokens)
    await supervisor.start()
    heap.settle()
    try:
        await stop.wait()
        logger.info("stopping (grace %.0fs)", settings.shutdown_grace)
    finally:
        await supervisor.stop()
