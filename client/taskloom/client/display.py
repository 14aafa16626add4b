"""How the CLI shows tasks and events: JSON for scripts, text and a live table for people."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from taskloom.core.model import Event, Task

STYLES = {
    "PENDING": "dim",
    "READY": "cyan",
    "ASSIGNED": "blue",
    "RUNNING": "bold yellow",
    "PLANNING": "bold yellow",
    "SUCCEEDED": "green",
    "FAILED": "bold red",
    "CANCELLED": "magenta",
    "SKIPPED": "dim",
}


def iso_time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_json(task: Task) -> dict[str, Any]:
    """The task as ``submit --json`` and ``get --json`` print it."""
    return {
        "id": task.id,
        "status": str(task.status),
        "goal": task.goal,
        "result": task.result,
        "error": task.error,
        "subtasks": [
            {
                "id": s.id,
                "title": s.title,
                "capability": s.capability,
                "depends_on": list(s.depends_on),
                "status": str(s.status),
                "output": s.output,
                "error": s.error,
                "attempts": s.attempt,
                "worker": s.worker,
            }
            for s in task.subtasks
        ],
    }


def event_json(event: Event) -> dict[str, Any]:
    """One event as ``watch --json`` prints it (one per line)."""
    return {
        "event_id": event.id,
        "time": iso_time(event.time),
        "type": event.type,
        "task_id": event.task_id,
        "subtask_id": event.subtask_id,
        "status": event.status,
        "message": event.message,
    }


def event_line(event: Event) -> str:
    """One event as a line of text."""
    clock = datetime.fromtimestamp(event.time).strftime("%H:%M:%S.%f")[:-3]
    parts = [clock, f"{event.type:<18}", event.subtask_id or "-", event.status]
    if event.attempt:
        parts.append(f"attempt {event.attempt}")
    if event.worker and event.type != "subtask.assigned":
        parts.append(f"on {event.worker}")
    if event.message:
        parts.append(f"— {event.message}")
    return "  ".join(p for p in parts if p)


def task_text(task: Task) -> Group:
    """A person's view of a task: status, subtasks, result or error."""
    header = Text.assemble(
        ("task ", "bold"),
        (task.id, "bold"),
        "  ",
        (str(task.status), STYLES.get(task.status, "")),
    )
    parts: list[Any] = [header, Text(task.goal, style="italic")]
    if task.subtasks:
        table = Table(show_edge=False, pad_edge=False)
        for column in ("id", "title", "capability", "status", "attempts", "worker"):
            table.add_column(column)
        for s in task.subtasks:
            table.add_row(
                s.id,
                s.title,
                s.capability,
                Text(str(s.status), STYLES.get(s.status, "")),
                str(s.attempt),
                s.worker,
            )
        parts.append(table)
    if task.error:
        parts.append(Text(f"error: {task.error}", style="bold red"))
    if task.result:
        parts.append(Panel(Markdown(task.result), title="result", expand=False))
    return Group(*parts)


@dataclass
class _Row:
    id: str
    title: str = ""
    capability: str = ""
    status: str = "PENDING"
    attempt: int = 0
    worker: str = ""
    note: str = ""


class LiveView:
    """A table of subtasks kept up to date from the task's events."""

    def __init__(self, task: Task) -> None:
        self.task_id = task.id
        self.goal = task.goal
        self.status = str(task.status)
        self.note = ""
        self.rows: dict[str, _Row] = {}
        self.load(task)

    def load(self, task: Task) -> None:
        """Take titles and states from a full read of the task."""
        self.status = str(task.status)
        for s in task.subtasks:
            row = self.rows.setdefault(s.id, _Row(s.id))
            row.title, row.capability = s.title, s.capability
            row.status, row.attempt, row.worker = str(s.status), s.attempt, s.worker

    def apply(self, event: Event) -> None:
        if not event.subtask_id:
            self.status = event.status or self.status
            self.note = event.message
            return
        row = self.rows.setdefault(event.subtask_id, _Row(event.subtask_id))
        row.status = event.status or row.status
        row.attempt = event.attempt or row.attempt
        row.worker = event.worker or row.worker
        row.note = event.message if event.type != "subtask.assigned" else ""

    def render(self) -> Group:
        table = Table(show_edge=False, pad_edge=False, expand=False)
        for column in ("id", "title", "status", "try", "worker", ""):
            table.add_column(column, overflow="ellipsis", no_wrap=True, max_width=48)
        for row in self.rows.values():
            table.add_row(
                row.id,
                row.title,
                Text(row.status, STYLES.get(row.status, "")),
                str(row.attempt or ""),
                row.worker,
                row.note,
            )
        header = Text.assemble(
            ("task ", "bold"),
            (self.task_id, "bold"),
            "  ",
            (self.status, STYLES.get(self.status, "")),
            f"  {self.note}" if self.note else "",
        )
        return Group(header, Text(self.goal[:200], style="italic"), table)


async def follow(console: Console, task: Task, events: AsyncIterator[Event], refresh: Any) -> None:
    """Show ``events`` as they come: a live table on a terminal, lines otherwise.

    ``refresh`` re-reads the task (for subtask titles once the plan exists).
    """
    if not console.is_terminal:
        async for event in events:
            console.print(event_line(event), highlight=False, soft_wrap=True)
        return
    view = LiveView(task)
    with Live(view.render(), console=console, refresh_per_second=8, transient=True) as live:
        async for event in events:
            view.apply(event)
            if event.type == "plan.created":
                view.load(await refresh())
            live.update(view.render())
