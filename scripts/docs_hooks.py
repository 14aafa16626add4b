"""MkDocs hook: the CLI and configuration references, made from the code.

The pages ``reference/cli.md`` and ``reference/configuration.md`` are written
at build time from the click commands and the settings types, so they cannot
drift from what the programs accept. ``python scripts/docs_hooks.py`` prints
them.
"""

from __future__ import annotations

import inspect
from typing import Any

import click

from taskloom.client.cli import cli
from taskloom.client.settings import ClientSettings
from taskloom.core.flags import default_of
from taskloom.core.settings import TaskloomSettings
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.worker.settings import WorkerSettings

SETTINGS: tuple[tuple[str, type[TaskloomSettings]], ...] = (
    ("taskloom supervisor", SupervisorSettings),
    ("taskloom worker", WorkerSettings),
    ("clients: the SDK and the CLI's client commands", ClientSettings),
)

OTHER_VARIABLES = (
    ("OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_*", "supervisor, worker",
     "OpenTelemetry's own variables: where traces go (see Traces and logs)"),
    ("TASKLOOM_TRACE_CONSOLE", "supervisor, worker", "`1`: print spans to stdout"),
    ("TASKLOOM_TRACE_CONTENT", "supervisor, worker", "`1`: record prompts and outputs in spans"),
    ("TASKLOOM_REQUIRE_ALL", "tests", "`1` (CI): a test that would be skipped fails instead"),
    ("TASKLOOM_FUZZ_EXAMPLES", "tests", "examples per property of the fuzz tests (`make fuzz N=`)"),
    ("TASKLOOM_CHAOS_N, TASKLOOM_CHAOS_SEED", "tests", "random fault schedules the suite runs"),
)  # fmt: skip


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _commands(group: click.Group, ctx: click.Context) -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        path = f"{ctx.command_path} {name}"
        if isinstance(command, click.Group):
            sub = click.Context(command, info_name=name, parent=ctx)
            found += _commands(command, sub)
        else:
            found.append((path, command))
    return found


def cli_reference() -> str:
    """Every ``taskloom`` command with its arguments and options."""
    root = click.Context(cli, info_name="taskloom")
    lines = [
        "# CLI reference",
        "",
        "Made from the commands themselves when the docs are built. Every client "
        "command also reads its connection from the environment "
        "(see [Configuration](configuration.md)). Exit codes, for every command: "
        "0 success, 1 the task failed or was cancelled, 2 bad usage or input, "
        "3 a service is unreachable, 4 no such task, 5 another error, 6 not "
        "authenticated or not allowed, 7 a limit was reached, 130 interrupted.",
        "",
    ]
    for path, command in _commands(cli, root):
        ctx = click.Context(command, info_name=path.split()[-1], parent=root)
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines += [f"## `{path}`", "", f"```\n{path} {usage}\n```", ""]
        lines += [inspect.cleandoc(command.help or ""), ""]
        options = [p for p in command.get_params(ctx) if isinstance(p, click.Option)]
        if options:
            lines += ["| option | what it does |", "|---|---|"]
            for option in options:
                record = option.get_help_record(ctx)
                if record is None:
                    continue
                flags, help_text = record
                lines.append(f"| `{_cell(flags)}` | {_cell(help_text)} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def configuration_reference() -> str:
    """Every setting of every process: its variable, flag, default and meaning."""
    lines = [
        "# Configuration reference",
        "",
        "Made from the settings types when the docs are built. Every process reads "
        "`TASKLOOM_*` variables; flags win over them; a bad value stops the process "
        "at start-up with a message naming the variable. Durations take `250ms`, "
        "`15s`, `5m`, `2h`, `7d` or plain seconds.",
        "",
    ]
    for title, settings in SETTINGS:
        lines += [f"## {title}", "", "| variable | flag | default | meaning |", "|---|---|---|---|"]
        for name, info in settings.model_fields.items():
            variable = settings.env_name(name)
            flag = settings.flag_names.get(name, "")
            default = default_of(info)
            lines.append(
                f"| `{variable}` | {f'`{flag}`' if flag else ''} | "
                f"{f'`{_cell(default)}`' if default else ''} | "
                f"{_cell((info.description or '').replace('``', '`'))} |"
            )
        lines.append("")
    lines += ["## Also read", "", "| variable | read by | meaning |", "|---|---|---|"]
    lines += [f"| `{v}` | {who} | {what} |" for v, who, what in OTHER_VARIABLES]
    return "\n".join(lines) + "\n"


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    files.append(
        File.generated(config, "reference/configuration.md", content=configuration_reference())
    )
    return files


if __name__ == "__main__":
    print(cli_reference())
    print(configuration_reference())
