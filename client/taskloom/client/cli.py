"""The ``taskloom`` command.

Client commands live here; ``supervisor`` and ``worker`` come from their own
packages through the ``taskloom.commands`` entry points, loaded only when
used, so the client never imports them.

Exit codes: one table for every command (``taskloom.core.exits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import select
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from opentelemetry.trace import SpanKind, Status, StatusCode
from rich.console import Console
from rich.markup import escape

from taskloom.client.client import SUBMIT_ARGUMENTS, TaskloomClient, waiting_logger
from taskloom.client.display import (
    event_json,
    event_line,
    follow,
    task_json,
    task_summary_json,
    task_text,
)
from taskloom.client.settings import ClientSettings
from taskloom.core import exits
from taskloom.core.errors import (
    ConfigError,
    InvalidArgument,
    TaskloomError,
)
from taskloom.core.flags import settings_options
from taskloom.core.llm.base import TINY_NOTICE
from taskloom.core.model import (
    Aggregate,
    ContextMode,
    Fallback,
    OnFailure,
    Plan,
    PlannedSubtask,
    Task,
    TaskOptions,
    TaskStatus,
)
from taskloom.core.plan import parse_plan
from taskloom.core.settings import LLMSettings, parse_duration
from taskloom.core.tracing import setup_tracing, tracer

if TYPE_CHECKING:
    from taskloom.client.local import LocalCluster

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

out = Console(highlight=False, markup=False)
"""Markup is off: goals, titles and messages are text, whatever brackets they
hold; a line that styles itself passes ``markup=True`` and escapes the text."""


@dataclass(frozen=True)
class Following:
    task_id: str
    supervisor: str | None
    submitted: bool
    """This command submitted the task, so Ctrl-C offers to cancel it."""


_following: list[Following] = []
"""The task a command is following, for what to do on Ctrl-C."""
err = Console(stderr=True, highlight=False, markup=False)


def _fail(error: TaskloomError) -> None:
    # Escaped: an error's text may hold brackets ('taskloom[server]', a plan's ids).
    err.print(f"[bold red]error:[/] {escape(str(error))}", markup=True, highlight=False,
              soft_wrap=True)  # fmt: skip
    sys.exit(exits.exit_code(error))


def run_async(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async command; print taskloom errors as one line with a distinct exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return asyncio.run(fn(*args, **kwargs))
        except TaskloomError as e:
            _fail(e)
        except KeyboardInterrupt:
            if _following:
                _interrupted(_following[-1])
            else:
                err.print("interrupted")
            sys.exit(exits.INTERRUPTED)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def _interrupted(following: Following) -> None:
    """Ctrl-C while following: ask whether to cancel a task we submitted, else say how to go on."""
    task_id = following.task_id
    if following.submitted and sys.stdin.isatty():
        try:
            answer = click.confirm(f"\ncancel task {task_id}?", default=False, err=True)
        except (KeyboardInterrupt, click.Abort):
            answer = False
        if answer:
            try:
                task = asyncio.run(_cancel(following.supervisor, task_id))
            except TaskloomError as e:
                _fail(e)
            err.print(f"task {task_id} {task.status}")
            return
    err.print(
        f"stopped following; task {task_id} goes on. See it with "
        f"`taskloom watch {task_id}`, stop it with `taskloom cancel {task_id}`"
    )


async def _cancel(supervisor: str | None, task_id: str) -> Task:
    async with _client(supervisor) as client:
        return await client.cancel(task_id, "cancelled with Ctrl-C")


_CONNECTION = "taskloom.connection"


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Keep a connection flag for ``_client`` (so commands need not pass each on)."""
    if value is not None and param.name:
        ctx.meta.setdefault(_CONNECTION, {})[param.name] = value


def supervisor_option(fn: F) -> F:
    """``--supervisor`` and the flags that secure the connection to it."""
    fn = settings_options(ClientSettings, ("token", "token_file", "tls_ca", "tls_cert", "tls_key"),
                          callback=_remember)(fn)  # fmt: skip
    return settings_options(ClientSettings, ("supervisor",))(fn)


class _WaitingNotice(logging.Handler):
    """Shows the client's "waiting for a supervisor" notice on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError, SystemExit):
            err.print(f"[dim]{escape(record.getMessage())} …[/]", markup=True, soft_wrap=True)


def _client(supervisor: str | None) -> TaskloomClient:
    if not waiting_logger.handlers:
        waiting_logger.addHandler(_WaitingNotice())
        waiting_logger.setLevel(logging.INFO)
        waiting_logger.propagate = False
    context = click.get_current_context(silent=True)
    flags = dict(context.meta.get(_CONNECTION, {})) if context is not None else {}
    return TaskloomClient(settings=ClientSettings.load(supervisor=supervisor, **flags))


class TaskloomGroup(click.Group):
    """Built-in commands plus those other packages register as entry points."""

    def _plugins(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group="taskloom.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in self._plugins():
            try:
                loaded = self._plugins()[cmd_name].load()
            except ImportError as e:
                return _lacking(cmd_name, e)
            command = loaded if isinstance(loaded, click.Command) else None
        return command


def _lacking(name: str, error: ImportError) -> click.Command:
    """A command whose parts this install lacks: it says what to install."""

    @click.command(name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        _fail(
            ConfigError(
                f"taskloom {name} needs the server parts, which this install lacks "
                f"({error.name} is missing); install them with pip install 'taskloom[server]'"
            )
        )

    return command


@click.group(cls=TaskloomGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="taskloom")
def cli() -> None:
    """taskloom: LLM-planned tasks on a cluster of workers."""


SERVING_COMMANDS = frozenset({"supervisor", "worker", "up"})
"""Commands that run for long and set up tracing as the processes they are."""


def main() -> None:
    """The CLI; with tracing configured (``OTEL_*``), each client command is a
    span (``taskloom submit``, ...) whose context its calls carry, so a task
    submitted from the CLI is one trace with the command that made it."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    if not command or command in SERVING_COMMANDS:
        cli()
        return
    try:
        traced = setup_tracing("taskloom-cli")
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(exits.USAGE)
    if not traced:
        cli()
        return
    with tracer().start_as_current_span(
        f"taskloom {command}",
        kind=SpanKind.CLIENT,
        attributes={"taskloom.command": command},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            cli(standalone_mode=False)
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.ClickException as e:
            e.show()
            code = e.exit_code
        except click.Abort:
            click.echo("Aborted!", err=True)
            code = 1
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        else:
            code = 0
        span.set_attribute("process.exit.code", code)
        if code:
            span.set_status(Status(StatusCode.ERROR, f"exit code {code}"))
    sys.exit(code)


def _print_json(document: dict[str, Any]) -> None:
    # Not rich: it may wrap long strings to the console width.
    print(json.dumps(document, indent=2, ensure_ascii=False), flush=True)


def _exit_for(task: Task) -> None:
    sys.exit(0 if task.status == TaskStatus.SUCCEEDED else exits.TASK_FAILED)


def _read_plan(path: str) -> Plan:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InvalidArgument(f"cannot read the plan file {path}: {e.strerror}") from None
    return parse_plan(text)


async def _follow(client: TaskloomClient, task_id: str) -> Task:
    """Follow a task live on the console; returns it once it has ended."""
    task = await client.get(task_id)
    await follow(
        out,
        task,
        client.watch(task_id),
        functools.partial(client.get, task_id),
    )
    task = await client.get(task_id)
    out.print(task_text(task))
    return task


@cli.command()
@click.argument("goal")
@supervisor_option
@click.option(
    "--plan", "plan_file", metavar="FILE", help="Run this JSON plan instead of asking the LLM"
)
@click.option("--wait", is_flag=True, help="Follow progress live until the task ends")
@click.option("--json", "as_json", is_flag=True, help="Print the task as JSON")
@click.option("--no-synthesize", is_flag=True, help="Skip the final synthesis step")
@click.option(
    "--aggregate",
    type=click.Choice([a.value for a in Aggregate]),
    default=Aggregate.SUMMARIZE.value,
    show_default=True,
    help="How the final step makes one answer: the model merges the results; they are "
    "put one after another (no model); the answer most of them gave wins (no model); or a "
    "critic may send one back for another attempt with its critique, then the model merges",
)
@click.option("--priority", type=int, default=0, help="Higher runs first")
@click.option("--max-parallel", type=int, default=0, help="At most this many subtasks at once")
@click.option(
    "--on-failure",
    type=click.Choice([p.value for p in OnFailure]),
    default=OnFailure.FAIL.value,
    help="When a subtask fails for good: fail the task, skip its dependents, or replan it",
)
@click.option("--max-attempts", type=int, default=0, help="Attempts per subtask [supervisor's]")
@click.option("--timeout", "subtask_timeout", metavar="DURATION", help="Longest one attempt runs")
@click.option("--stall-timeout", metavar="DURATION", help="Longest an attempt may show no progress")
@click.option(
    "--fallback",
    type=click.Choice([f.value for f in Fallback]),
    default=Fallback.NONE.value,
    help="If the model gives no valid plan: fail, or run the goal as one subtask",
)
@click.option(
    "--context-tokens", type=click.IntRange(0), default=0, help="Context budget of an llm call"
)
@click.option(
    "--context",
    "context_mode",
    type=click.Choice([c.value for c in ContextMode]),
    default=ContextMode.TRUNCATE.value,
    help="Inputs over the budget: cut them, or summarise them first",
)
@click.option("--max-tokens", type=click.IntRange(0), default=0, help="Token budget of the task")
@click.option(
    "--max-cost",
    type=click.FloatRange(0, max_open=True, max=1e12),
    default=0.0,
    help="Money budget of the task, in the supervisor's price table's currency (US dollars "
    "by default); a reply is stopped where it runs out",
)
@click.option("--max-duration", metavar="DURATION", help="Time budget of the task")
@click.option("--no-cache", is_flag=True, help="Run every subtask, even if an identical one ran")
@click.option(
    "--idempotency-key", default="", help="Submitting again with it returns the same task"
)
@click.option(
    "--approve-plan",
    is_flag=True,
    help="Stop after planning until the plan is approved (taskloom approve)",
)
@run_async
async def submit(
    goal: str,
    supervisor: str | None,
    plan_file: str | None,
    wait: bool,
    as_json: bool,
    no_synthesize: bool,
    aggregate: str,
    priority: int,
    max_parallel: int,
    on_failure: str,
    max_attempts: int,
    subtask_timeout: str | None,
    stall_timeout: str | None,
    fallback: str,
    context_tokens: int,
    context_mode: str,
    max_tokens: int,
    max_cost: float,
    max_duration: str | None,
    no_cache: bool,
    idempotency_key: str,
    approve_plan: bool,
) -> None:
    """Submit GOAL; print its task id, or with --wait follow it to the end.

    With --wait the exit status is 0 only if the task SUCCEEDED; Ctrl-C asks
    whether to cancel the task.
    """
    plan = _read_plan(plan_file) if plan_file else None
    options = TaskOptions.of(
        synthesize=False if no_synthesize else None,
        aggregate=aggregate,
        priority=priority,
        max_parallel=max_parallel,
        on_failure=on_failure,
        max_attempts=max_attempts,
        subtask_timeout=_seconds("--timeout", subtask_timeout),
        stall_timeout=_seconds("--stall-timeout", stall_timeout),
        fallback=fallback,
        context_tokens=context_tokens,
        context=context_mode,
        max_tokens=max_tokens,
        max_cost=max_cost,
        max_duration=_seconds("--max-duration", max_duration),
        cache=False if no_cache else None,
        approve_plan=approve_plan,
    )
    async with _client(supervisor) as client:
        task_id = await client.submit(
            goal, plan=plan, options=options, idempotency_key=idempotency_key
        )
        if not wait:
            if as_json:
                _print_json(task_json(await client.get(task_id)))
            else:
                out.print(task_id)
            return
        _following.append(Following(task_id, supervisor, submitted=True))
        if as_json:
            task = await client.wait(task_id)
            _print_json(task_json(task))
        else:
            err.print(f"task {task_id} submitted; following it (Ctrl-C to stop or cancel)")
            task = await _follow(client, task_id)
    _exit_for(task)


SUBMIT_FIELDS = SUBMIT_ARGUMENTS - {"options"}
"""What a JSON line of ``submit-many`` may set: ``submit``'s arguments."""


def _read_tasks(path: str) -> list[str | dict[str, Any]]:
    """The tasks of a ``submit-many`` file: a goal, or a JSON object, per line."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    tasks: list[str | dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            tasks.append(line)
            continue
        try:
            document = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{path}:{number}: not JSON ({e.msg})") from None
        unknown = sorted(set(document) - SUBMIT_FIELDS)
        if unknown or not isinstance(document.get("goal"), str):
            raise InvalidArgument(
                f"{path}:{number}: "
                + (f"unknown fields {', '.join(unknown)}" if unknown else 'needs a "goal"')
                + f"; a line is a goal, or an object of {', '.join(sorted(SUBMIT_FIELDS))}"
            )
        if "plan" in document:
            try:
                document["plan"] = parse_plan(document["plan"])
            except InvalidArgument as e:
                raise InvalidArgument(f"{path}:{number}: {e}") from None
        tasks.append(document)
    if not tasks:
        raise InvalidArgument(f"{path} has no tasks: write one goal, or one JSON object, a line")
    return tasks


@cli.command("submit-many")
@click.argument("file")
@supervisor_option
@click.option("--plan", "plan_file", metavar="FILE", help="The plan of tasks that name none")
@click.option("--wait", is_flag=True, help="Wait until every task has ended")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task and line")
@click.option("--priority", type=int, default=0, help="Of tasks that set none; higher runs first")
@click.option("--no-cache", is_flag=True, help="Run every subtask, even if an identical one ran")
@run_async
async def submit_many(
    file: str,
    supervisor: str | None,
    plan_file: str | None,
    wait: bool,
    as_json: bool,
    priority: int,
    no_cache: bool,
) -> None:
    """Submit the tasks in FILE (- for stdin), many to a call.

    Each line is a goal, or a JSON object of the SDK's submit() arguments
    ("goal", "plan", "priority", "idempotency_key", ...). Prints a line per
    task, in order: its id, or why it was refused. With --wait, then a line
    per task as it ends. The exit status is 0 only if every task was stored
    (and, with --wait, SUCCEEDED).
    """
    tasks = _read_tasks(file)
    defaults: dict[str, Any] = {"priority": priority, "cache": False if no_cache else None}
    if plan_file:
        defaults["plan"] = _read_plan(plan_file)
    async with _client(supervisor) as client:
        results = await client.submit_many(tasks, **defaults)
        for number, result in enumerate(results, 1):
            if as_json:
                document = {"task": number, "task_id": result.task_id, "created": result.created}
                if result.error is not None:
                    document["error"] = str(result.error)
                print(json.dumps(document, ensure_ascii=False), flush=True)
            elif result.error is not None:
                err.print(
                    f"[bold red]task {number} refused:[/] {escape(str(result.error))}",
                    markup=True,
                    soft_wrap=True,
                )
            else:
                out.print(result.task_id)
        refused = [r.error for r in results if r.error is not None]
        failed = 0
        if wait:
            async for event in client.wait_many(r.task_id for r in results if r.task_id):
                failed += event.status != TaskStatus.SUCCEEDED
                if as_json:
                    print(json.dumps(event_json(event), ensure_ascii=False), flush=True)
                else:
                    why = f"  — {event.message}" if event.message else ""
                    out.print(f"{event.task_id}  {event.status}{why}", soft_wrap=True)
    if refused:
        sys.exit(exits.exit_code(refused[0]))
    sys.exit(exits.TASK_FAILED if failed else 0)


@cli.command()
@click.argument("task_id")
@supervisor_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event and line")
@click.option("--after", default="", metavar="EVENT_ID", help="Only events after this one")
@run_async
async def watch(task_id: str, supervisor: str | None, as_json: bool, after: str) -> None:
    """Print TASK_ID's events, then follow it live until it ends.

    The exit status is 0 only if the task SUCCEEDED.
    """
    async with _client(supervisor) as client:
        async for event in client.watch(task_id, after_event_id=after):
            if as_json:
                print(json.dumps(event_json(event), ensure_ascii=False), flush=True)
            else:
                out.print(event_line(event), soft_wrap=True)
        task = await client.get(task_id, subtasks=False)
    _exit_for(task)


@cli.command()
@click.argument("task_id")
@supervisor_option
@click.option("--json", "as_json", is_flag=True, help="Print the task as JSON")
@run_async
async def get(task_id: str, supervisor: str | None, as_json: bool) -> None:
    """Show one task with its subtasks and result."""
    async with _client(supervisor) as client:
        task = await client.get(task_id)
    if as_json:
        _print_json(task_json(task))
    else:
        out.print(task_text(task))


@cli.command()
@supervisor_option
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in TaskStatus], case_sensitive=False),
    help="Only tasks in this state (repeatable)",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task and line")
@run_async
async def tasks(
    supervisor: str | None, statuses: tuple[str, ...], limit: int, as_json: bool
) -> None:
    """List tasks, newest first."""
    async with _client(supervisor) as client:
        found = await client.list(statuses=[TaskStatus(s.upper()) for s in statuses], limit=limit)
    if as_json:
        for task in found:
            print(json.dumps(task_summary_json(task), ensure_ascii=False))
        return
    if not found:
        err.print("no tasks" + (f" in {', '.join(statuses)}" if statuses else ""))
        return
    out.print(f"{'ID':<20}  {'CREATED':<19}  {'STATUS':<10} {'DONE':>7}  GOAL", style="bold")
    for task in found:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(task.created_at))
        progress = f"{task.subtasks_succeeded}/{task.subtasks_total}"
        goal = task.goal.replace("\n", " ")
        out.print(f"{task.id:<20}  {created}  {task.status:<10} {progress:>7}  {goal[:60]}")


@cli.command()
@click.argument("task_id")
@supervisor_option
@click.option("--reason", default="", help="Recorded in the task's events")
@click.option("--subtask", "subtask_id", default="", help="Cancel only this subtask")
@run_async
async def cancel(task_id: str, supervisor: str | None, reason: str, subtask_id: str) -> None:
    """Cancel an unfinished task and its running subtasks, or one subtask
    (whose dependents are then skipped)."""
    async with _client(supervisor) as client:
        task = await client.cancel(task_id, reason, subtask_id=subtask_id)
    _steered(task, subtask_id, as_json=False)


def _steered(task: Task, subtask_id: str, *, as_json: bool) -> None:
    """What a steering command prints: the task (and the subtask) as it is now."""
    if as_json:
        _print_json(task_json(task))
        return
    paused = " (paused)" if task.paused else ""
    sub = next((s for s in task.subtasks if s.id == subtask_id), None)
    if sub is not None:
        out.print(f"{task.id} {subtask_id} {sub.status}; the task is {task.status}{paused}")
    else:
        out.print(f"{task.id} {task.status}{paused}")


def _steering(fn: F) -> F:
    """The options every steering command takes."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print the task as JSON")(fn)
    fn = click.option("--reason", default="", help="Why: kept in the task's events")(fn)
    return supervisor_option(fn)


@cli.command()
@click.argument("task_id")
@click.option("--subtask", "subtask_id", default="", help="Approve only this waiting subtask")
@click.option(
    "--plan", "plan_file", metavar="FILE", help="Replace the waiting plan with this one first"
)
@_steering
@run_async
async def approve(
    task_id: str,
    subtask_id: str,
    plan_file: str | None,
    supervisor: str | None,
    reason: str,
    as_json: bool,
) -> None:
    """Start a task whose plan waits for approval (submitted with
    --approve-plan), or let a subtask that waits for approval run.

    With --plan, the plan is replaced by the one in FILE first (checked like
    any explicit plan; only before any of it has run).
    """
    plan = _read_plan(plan_file) if plan_file else None
    async with _client(supervisor) as client:
        task = await client.approve(task_id, subtask_id=subtask_id, plan=plan, reason=reason)
    _steered(task, subtask_id, as_json=as_json)


@cli.command()
@click.argument("task_id")
@click.option("--subtask", "subtask_id", default="", help="Reject only this waiting subtask")
@_steering
@run_async
async def reject(
    task_id: str, subtask_id: str, supervisor: str | None, reason: str, as_json: bool
) -> None:
    """End a task whose plan waits for approval (CANCELLED), or skip a subtask
    that waits for approval, and its dependents (the task goes on)."""
    async with _client(supervisor) as client:
        task = await client.reject(task_id, subtask_id=subtask_id, reason=reason)
    _steered(task, subtask_id, as_json=as_json)


@cli.command()
@click.argument("task_id")
@click.option("--subtask", "subtask_id", required=True, help="The subtask to run again")
@click.option("--instruction", default=None, help="Its new instruction (default: the same)")
@_steering
@run_async
async def retry(
    task_id: str,
    subtask_id: str,
    instruction: str | None,
    supervisor: str | None,
    reason: str,
    as_json: bool,
) -> None:
    """Run a FAILED, SKIPPED or CANCELLED subtask again, and everything
    downstream of it; a task that had failed or was cancelled runs again."""
    async with _client(supervisor) as client:
        task = await client.retry(task_id, subtask_id, instruction=instruction, reason=reason)
    _steered(task, subtask_id, as_json=as_json)


@cli.command()
@click.argument("task_id")
@click.option("--subtask", "subtask_id", required=True, help="The subtask to skip")
@click.option("--output", default="", help="What its dependents get as its output")
@_steering
@run_async
async def skip(
    task_id: str,
    subtask_id: str,
    output: str,
    supervisor: str | None,
    reason: str,
    as_json: bool,
) -> None:
    """Mark a pending, waiting or failed subtask SKIPPED with an output, which
    its dependents run on."""
    async with _client(supervisor) as client:
        task = await client.skip(task_id, subtask_id, output=output, reason=reason)
    _steered(task, subtask_id, as_json=as_json)


@cli.command()
@click.argument("task_id")
@_steering
@run_async
async def pause(task_id: str, supervisor: str | None, reason: str, as_json: bool) -> None:
    """Start nothing new of TASK_ID until it is resumed; what runs finishes."""
    async with _client(supervisor) as client:
        task = await client.pause(task_id, reason=reason)
    _steered(task, "", as_json=as_json)


@cli.command()
@click.argument("task_id")
@_steering
@run_async
async def resume(task_id: str, supervisor: str | None, reason: str, as_json: bool) -> None:
    """Let a paused task go on."""
    async with _client(supervisor) as client:
        task = await client.resume(task_id, reason=reason)
    _steered(task, "", as_json=as_json)


@cli.command()
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    envvar="TASKLOOM_METRICS_PORT",
    required=True,
    help="The port this host's supervisor or worker serves /metrics on [TASKLOOM_METRICS_PORT]",
)
def health(metrics_port: int) -> None:
    """Whether the supervisor or worker on this host answers (exit 0) or not
    (exit 1): its /metrics endpoint on loopback. The image's HEALTHCHECK."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            ok = response.status == 200
    except OSError as e:
        click.echo(f"unhealthy: nothing answers at {url} ({e})", err=True)
        sys.exit(1)
    if not ok:
        click.echo(f"unhealthy: {url} answered {response.status}", err=True)
        sys.exit(1)
    click.echo("healthy")


def _minting() -> Any:
    """``taskloom.client.certs``: cryptography loads only here (the server extra)."""
    try:
        from taskloom.client import certs as minting
    except ImportError as e:
        _fail(
            ConfigError(
                f"taskloom certs needs cryptography, which this install lacks ({e.name} is "
                "missing); install it with pip install 'taskloom[server]'"
            )
        )
    return minting


@cli.group()
def certs() -> None:
    """Certificates for trying TLS locally."""


@certs.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME",
    help="Another name or IP for the server certificate (repeatable)",
)
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--force", is_flag=True, help="Replace certificates already there")
def certs_init(directory: Path, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Mint a local CA and server, worker and client certificates into DIRECTORY."""
    minting = _minting()

    try:
        minted = minting.init(directory, hosts=hosts, days=days, force=force)
    except TaskloomError as e:
        _fail(e)
    d = minted.directory
    out.print(f"wrote a CA and server, worker and client certificates to {d}/\n")
    out.print("supervisor (TLS; add the last line for mutual TLS):")
    out.print(f"  export TASKLOOM_TLS_CERT={d}/server.pem TASKLOOM_TLS_KEY={d}/server-key.pem")
    out.print(f"  export TASKLOOM_TLS_CLIENT_CA={d}/ca.pem")
    out.print("workers and clients:")
    out.print(f"  export TASKLOOM_TLS_CA={d}/ca.pem")
    out.print(f"  export TASKLOOM_TLS_CERT={d}/worker.pem TASKLOOM_TLS_KEY={d}/worker-key.pem"
              "   # client.pem for clients; mutual TLS only")  # fmt: skip


@certs.command("issue")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option(
    "--role", type=click.Choice(["client", "worker", "admin"]), default="client", show_default=True
)
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
def certs_issue(directory: Path, name: str, role: str, days: int) -> None:
    """Sign a client certificate for NAME in ROLE with the CA in DIRECTORY
    (from `certs init`): with mutual TLS it stands for NAME, as a token would."""
    minting = _minting()

    try:
        cert, key = minting.issue(directory, name, role=role, days=days)
    except TaskloomError as e:
        _fail(e)
    out.print(f"wrote {cert} and {key}: {name}, role {role}")


@cli.group()
def tokens() -> None:
    """Bearer tokens for the supervisor's tokens file."""


@tokens.command("add")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("name")
@click.option(
    "--role", type=click.Choice(["client", "worker", "admin"]), default="client", show_default=True
)
def tokens_add(file: Path, name: str, role: str) -> None:
    """Mint a token for NAME, append its hash to FILE (TASKLOOM_TOKENS_FILE) and
    print the token: it is shown this once and stored nowhere."""
    from taskloom.core.auth import TokenTable, hash_token, new_token

    token = new_token()
    entry = f"{hash_token(token)} {name} {role}\n"
    try:
        TokenTable.parse(entry, source="the new entry")
        existing = TokenTable.load(file) if file.exists() else TokenTable()
    except TaskloomError as e:
        _fail(e)
    del existing  # parsed only to refuse appending to a broken file
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(entry)
    err.print(f"added {name} ({role}) to {file}; its token (shown once):")
    click.echo(token)


def _seconds(flag: str, value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise InvalidArgument(f"{flag}: {e}") from None
    return float(seconds)


DEMO_PLAN = Plan(
    subtasks=(
        PlannedSubtask("research", "Gather facts", "Collect the key facts about the goal.", "echo"),
        PlannedSubtask(
            "outline", "Draft an outline", "Sketch the structure.", "echo", ("research",)
        ),
        PlannedSubtask("examples", "Find examples", "Pick three examples.", "echo", ("research",)),
        PlannedSubtask(
            "write", "Write it up", "Combine outline and examples.", "echo", ("outline", "examples")
        ),
    ),
    synthesize=False,
)


@cli.command()
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True)
@click.option("--listen", metavar="HOST:PORT", help="Supervisor address [127.0.0.1:50051 if free]")
@click.option(
    "--redis-url",
    envvar="TASKLOOM_REDIS_URL",
    help="Use this Redis instead of starting one [TASKLOOM_REDIS_URL]",
)
@click.option(
    "--capabilities",
    help="Of each worker [llm,echo, and with --app every handler it registers]",
)
@click.option(
    "--app",
    metavar="MODULE:ATTR",
    help="Custom handlers for the workers (a HandlerRegistry or Worker), found from here",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1000),
    help="Slots of each worker [by what it runs: 1 for llm on the embedded model, which "
    "answers one call at a time; 8 for llm on a model server; 64 for other handlers]",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".taskloom"),
    show_default=True,
    help="Redis data and process logs",
)
@click.option(
    "--redis-fsync",
    type=click.Choice(["always", "everysec"]),
    default="always",
    show_default=True,
    help="AOF fsync of the Redis it starts: always loses nothing acknowledged, everysec "
    "can lose up to 2 s of it if Redis dies (see README)",
)
@click.option(
    "--llm",
    envvar="TASKLOOM_LLM",
    help="provider:model for planning and llm subtasks [TASKLOOM_LLM, ollama:llama3.2]; "
    "with --demo, the embedded model stands in when Ollama does not answer",
)
@click.option(
    "--console-port",
    type=click.IntRange(0, 65535),
    help="The web console's port [8080 if free, else any]",
)
@click.option("--demo", metavar="GOAL", help="Run GOAL on the cluster, show it live, then stop")
@click.option(
    "--demo-plan",
    "demo_plan",
    metavar="FILE",
    help="With --demo: run this JSON plan instead of asking the LLM for one",
)
@click.option(
    "--demo-aggregate",
    type=click.Choice([a.value for a in Aggregate]),
    default=Aggregate.SUMMARIZE.value,
    show_default=True,
    help="With --demo: how the task's final step makes one answer (see submit --aggregate)",
)
def up(
    workers: int,
    listen: str | None,
    redis_url: str | None,
    capabilities: str | None,
    app: str | None,
    concurrency: int | None,
    data_dir: Path,
    redis_fsync: str,
    llm: str | None,
    console_port: int | None,
    demo: str | None,
    demo_plan: str | None,
    demo_aggregate: str,
) -> None:
    """Run Redis, a supervisor and workers here; Ctrl-C stops them all."""
    try:  # the server extra (a client-only install goes without)
        from taskloom.client.local import DEFAULT_PORT, LocalCluster
        from taskloom.core.llm import create_llm  # noqa: F401
        from taskloom.supervisor.app import Supervisor  # noqa: F401
    except ImportError as e:
        _fail(
            ConfigError(
                f"taskloom up runs a supervisor and workers, which this install lacks ({e.name} "
                "is missing); install them with pip install 'taskloom[server,local]'"
            )
        )
    # Every way out stops the cluster: Ctrl-C, SIGTERM, closing the terminal
    # (SIGHUP), the stream we write to going away; and if this process is
    # killed outright, its children see their parent gone and stop themselves.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    if demo_plan is not None and demo is None:
        _fail(ConfigError("--demo-plan goes with --demo GOAL"))
    try:
        plan = _read_plan(demo_plan) if demo_plan else None
        offered = capabilities or _capabilities_with(app)
    except TaskloomError as e:
        _fail(e)
    offline = False
    if demo is not None or llm is None:
        # As the demo does: Ollama if it answers, else (unless a model was
        # named) the embedded one, saying so now rather than at the first goal.
        try:
            llm, offline = asyncio.run(_demo_llm(llm, demo=demo is not None))
        except TaskloomError as e:
            _fail(e)
    if concurrency is None:
        from taskloom.worker.settings import default_concurrency

        # What the workers would choose themselves (shown below).
        concurrency = default_concurrency(
            tuple(c.strip() for c in offered.split(",")), (llm or "ollama:").partition(":")[0]
        )
    cluster = LocalCluster(
        data_dir=data_dir,
        workers=workers,
        listen=listen,
        redis_url=redis_url,
        capabilities=offered,
        concurrency=concurrency,
        redis_fsync=redis_fsync,
        llm=llm,
        console_port=console_port,
        app=app,
    )
    failure: TaskloomError | None = None
    code = 0
    try:
        _say(f"starting a local cluster (logs in {cluster.log_dir}) …")
        cluster.start()
        _say(
            f"supervisor on [bold]{cluster.address}[/], {workers} workers "
            f"({offered}, {concurrency} slots each), Redis at {cluster.safe_redis_url}\n"
            f"console: [bold]{cluster.console_url}[/]"
        )
        if listen is None and cluster.address != f"127.0.0.1:{DEFAULT_PORT}":
            _say(
                f"[bold yellow]127.0.0.1:{DEFAULT_PORT} is taken[/]: commands need "
                f"--supervisor {cluster.address} (or TASKLOOM_SUPERVISOR={cluster.address})"
            )
        if demo is not None:
            code = asyncio.run(
                _demo(cluster, demo, offline=offline, plan=plan, aggregate=demo_aggregate)
            )
        else:
            _say(
                f"try: taskloom submit 'your goal' --wait --supervisor {cluster.address}\n"
                "Ctrl-C stops the cluster."
            )
            code = _run_until_told(cluster)
    except TaskloomError as e:
        failure = e
    except KeyboardInterrupt:
        code = exits.INTERRUPTED
    except (OSError, SystemExit):  # what we write to went away (a closed pipe)
        _silence()
        code = exits.INTERRUPTED
    finally:
        _stop(cluster)
    if failure is not None:
        _fail(failure)
    sys.exit(code)


def _say(text: str) -> None:
    """Print to stderr; a stream that went away is not an error worth dying of
    before the cluster is stopped (it is noticed by ``_run_until_told``)."""
    try:
        err.print(text, markup=True, soft_wrap=True)
    except (OSError, SystemExit):  # rich turns a broken pipe into SystemExit(1)
        _silence()


def _silence() -> None:
    """Point stdout and stderr at /dev/null (their reader is gone), so that
    nothing fails on the way out."""
    err.quiet = out.quiet = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)


def _stop(cluster: LocalCluster) -> None:
    """Stop the cluster; a second Ctrl-C (or SIGTERM) kills it at once."""
    _say("stopping … (Ctrl-C again to kill it now)")
    try:
        cluster.stop()
    except KeyboardInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        cluster.kill()


def _run_until_told(cluster: LocalCluster) -> int:
    """Wait for Ctrl-C (a KeyboardInterrupt), the supervisor or Redis exiting,
    or our output going away (a pipe whose reader closed; a terminal that went
    away sends SIGHUP)."""
    streams = select.poll()
    for fd in (1, 2):
        streams.register(fd, 0)  # only errors and hang-ups are reported
    while True:
        try:
            events = streams.poll(1000)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: how one stops it
            return 0
        for fd, flags in events:
            if flags & select.POLLNVAL:  # closed before we started: nothing to watch
                streams.unregister(fd)
        if any(flags & (select.POLLERR | select.POLLHUP) for _, flags in events):
            _silence()
            return exits.INTERRUPTED
        if problem := cluster.exited():
            _say(f"[bold red]{escape(problem)}[/]; see {escape(str(cluster.log_dir))}")
            return exits.UNAVAILABLE


async def _usable(settings: LLMSettings) -> str:
    """'' if the model answers, else why not."""
    from taskloom.core.llm import create_llm

    try:
        model = create_llm(settings)
    except TaskloomError as e:
        return str(e)
    try:
        await model.check()
        return ""
    except TaskloomError as e:
        return str(e)
    finally:
        await model.close()


async def _demo_llm(requested: str | None, *, demo: bool = True) -> tuple[str | None, bool]:
    """The model the demo runs with, and whether it must do without one.

    Ollama when it answers; else the embedded SmolLM2 if installed; else no
    model (an explicit plan of echo subtasks). A model named with --llm or
    TASKLOOM_LLM other than Ollama must work.
    """
    settings = LLMSettings.load(llm=requested)
    provider, model = settings.llm_spec
    problem = await _usable(settings)
    if not problem:
        err.print(f"LLM: {provider}:{model}")
        return requested, False
    if provider != "ollama":
        raise ConfigError(f"{provider}:{model} cannot be used: {problem}")
    get_ollama = (
        "For answers from a real model: install Ollama from https://ollama.com/download, run "
        f"`ollama serve` and `ollama pull {model}` (or set OLLAMA_HOST / TASKLOOM_LLM)."
    )
    embedded = LLMSettings.load(llm="embedded:smollm2")
    embedded_problem = await _usable(embedded)
    if not embedded_problem:
        err.print(
            f"\n[bold yellow]No usable Ollama:[/] {escape(problem)}\n"
            f"Using the embedded model instead: {TINY_NOTICE}. {escape(get_ollama)}\n",
            markup=True,
            soft_wrap=True,
        )
        return "embedded:smollm2", False
    meanwhile = (
        "Meanwhile, here is the same machinery on an explicit plan of `echo` "
        "subtasks (no model involved):"
        if demo
        else "Meanwhile, only tasks with an explicit plan (--plan FILE) can run."
    )
    err.print(
        f"\n[bold yellow]No usable Ollama:[/] {escape(problem)}\n"
        f"No embedded model either: {escape(embedded_problem)}\n{escape(get_ollama)}\n"
        f"{meanwhile}\n",
        markup=True,
        soft_wrap=True,
    )
    return requested, True


def _capabilities_with(app: str | None) -> str:
    """``llm,echo`` and every handler ``app`` registers."""
    if app is None:
        return "llm,echo"
    from taskloom.worker.worker import load_handlers

    return ",".join(dict.fromkeys(["llm", "echo", *load_handlers(app)]))


async def _demo(
    cluster: LocalCluster,
    goal: str,
    *,
    offline: bool,
    plan: Plan | None = None,
    aggregate: str = Aggregate.SUMMARIZE.value,
) -> int:
    if offline and plan is not None and any(s.capability == "llm" for s in plan.subtasks):
        raise ConfigError("the demo plan has llm steps, and no model answers (see above)")
    async with TaskloomClient(cluster.address) as client:
        task_id = await client.submit(
            goal,
            plan=plan or (DEMO_PLAN if offline else None),
            fallback=Fallback.SINGLE,
            aggregate=aggregate,
        )
        err.print(f"task {task_id}: watch it at [bold]{cluster.console_url}tasks/{task_id}[/]",
                  markup=True, soft_wrap=True)  # fmt: skip
        task = await _follow(client, task_id)
    return 0 if task.status == TaskStatus.SUCCEEDED else exits.TASK_FAILED
