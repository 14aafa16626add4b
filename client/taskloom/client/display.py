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

from taskloom.core.llm.base import TINY_NOTICE
from taskloom.core.model import Event, EventType, Task, Usage, route_key

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


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "calls": usage.calls,
        "seconds": round(usage.seconds, 3),
        "models": [m for m in usage.model.split(",") if m],
        "cost": round(usage.cost, 8),
        "costs": {m: round(c, 8) for m, c in usage.costs.items()},
    }


def money(amount: float) -> str:
    """An amount in the price table's currency, to 4 significant digits."""
    return f"{amount:.4g}" if amount < 1000 else f"{amount:,.2f}"


def usage_line(usage: Usage) -> str:
    """``1,234 tokens in, 56 out; 3 calls, 4.2 s (ollama:llama3.2); cost 0.0123
    (openai:gpt-4o 0.0123)``."""
    line = (
        f"{usage.input_tokens:,} tokens in, {usage.output_tokens:,} out; "
        f"{usage.calls} LLM call{'s' if usage.calls != 1 else ''}, {usage.seconds:.1f} s"
    )
    if usage.model:
        line += f" ({usage.model})"
    if usage.costs:
        by_model = ", ".join(f"{m} {money(c)}" for m, c in sorted(usage.costs.items()))
        line += f"; cost {money(usage.cost)} ({by_model})"
    return line


def model_notice(usage: Usage) -> str:
    """A warning to show with output from a tiny model, else ''."""
    return TINY_NOTICE if "embedded:smollm2" in usage.model.split(",") else ""


def task_summary_json(task: Task) -> dict[str, Any]:
    """A task as ``tasks --json`` lists it: no subtasks (a listing does not
    read them; ``get --json`` shows them), their counts instead."""
    return {
        "id": task.id,
        "status": str(task.status),
        "goal": task.goal,
        "created_at": task.created_at,
        "subtasks_total": task.subtasks_total,
        "subtasks_succeeded": task.subtasks_succeeded,
        "result": task.result,
        "error": task.error,
        "failure_reason": str(task.failure_reason) or None,
        "usage": usage_json(task.usage),
    }


def task_json(task: Task) -> dict[str, Any]:
    """The task as ``submit --json`` and ``get --json`` print it."""
    return {
        "id": task.id,
        "status": str(task.status),
        "goal": task.goal,
        "result": task.result,
        "error": task.error,
        "failure_reason": str(task.failure_reason) or None,
        "paused": task.paused,
        "usage": usage_json(task.usage),
        "subtasks": [
            {
                "id": s.id,
                "title": s.title,
                "instruction": s.instruction,
                "capability": s.capability,
                "role": s.params.get("role", ""),
                "depends_on": list(s.depends_on),
                "status": str(s.status),
                "output": s.output,
                "error": s.error,
                "attempts": s.attempt,
                "worker": s.worker,
                "cache_hit": s.cache_hit,
                "requires_approval": s.requires_approval,
                "requires": dict(s.requires),
                "usage": usage_json(s.usage),
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
        "trace_id": event.trace_id or None,
        "span_id": event.span_id or None,
        "actor": event.actor or None,
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
    if event.trace_id and event.type in ("task.submitted", "plan.requested"):
        parts.append(f"(trace {event.trace_id})")
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
        roles = any(s.params.get("role") for s in task.subtasks)
        costs = any(s.usage.costs for s in task.subtasks)
        columns = (
            "id", "title", "capability", "role", "status", "attempts", "worker", "tokens", "cost"
        )  # fmt: skip
        hidden = {"role"} if not roles else set()
        hidden |= {"cost"} if not costs else set()
        for column in columns:
            if column not in hidden:
                table.add_column(column)
        for s in task.subtasks:
            # Text, not str: a cell's brackets are data, never rich markup.
            table.add_row(
                Text(s.id),
                Text(s.title),
                Text(route_key(s.capability, s.requires)),
                *([Text(s.params.get("role", ""))] if roles else []),
                Text(str(s.status), STYLES.get(s.status, "")),
                "cached" if s.cache_hit else str(s.attempt),
                Text(s.worker),
                f"{s.usage.tokens:,}" if s.usage.tokens else "",
                *([money(s.usage.cost) if s.usage.costs else ""] if costs else []),
            )
        parts.append(table)
    if task.usage.calls:
        parts.append(Text(f"usage: {usage_line(task.usage)}", style="dim"))
    if task.error:
        reason = f" ({task.failure_reason})" if task.failure_reason else ""
        parts.append(Text(f"error: {task.error}{reason}", style="bold red"))
    if task.result:
        parts.append(Panel(Markdown(task.result), title="result", expand=False))
        notice = model_notice(task.usage)
        if notice:
            parts.append(Text(f"note: answered by {notice}", style="yellow"))
    return Group(*parts)


@dataclass
class _Row:
    id: str
    title: str = ""
    capability: str = ""
    role: str = ""
    status: str = "PENDING"
    attempt: int = 0
    worker: str = ""
    note: str = ""
    streamed: str = ""


class LiveView:
    """A table of subtasks kept up to date from the task's events."""

    def __init__(self, task: Task) -> None:
        self.task_id = task.id
        self.goal = task.goal
        self.status = str(task.status)
        self.note = ""
        self.streaming = ""
        """The subtask whose output arrived last: its tail is shown under the table."""
        self.rows: dict[str, _Row] = {}
        self.load(task)

    def load(self, task: Task) -> None:
        """Take titles and states from a full read of the task."""
        self.status = str(task.status)
        for s in task.subtasks:
            row = self.rows.setdefault(s.id, _Row(s.id))
            row.title, row.capability = s.title, s.capability
            row.role = s.params.get("role", "")
            row.status, row.attempt, row.worker = str(s.status), s.attempt, s.worker

    def apply(self, event: Event) -> None:
        if event.type == EventType.SUBTASK_OUTPUT:
            row = self.rows.setdefault(event.subtask_id, _Row(event.subtask_id))
            row.streamed = (row.streamed + event.message)[-4000:]
            row.note = " ".join(row.streamed.split())[-48:]
            self.streaming = event.subtask_id
            return
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
        roles = any(row.role for row in self.rows.values())
        columns = ("id", "title", "role", "status", "try", "worker", "")
        for column in columns if roles else [c for c in columns if c != "role"]:
            table.add_column(column, overflow="ellipsis", no_wrap=True, max_width=48)
        for row in self.rows.values():
            table.add_row(
                Text(row.id),
                Text(row.title),
                *([Text(row.role)] if roles else []),
                Text(row.status, STYLES.get(row.status, "")),
                str(row.attempt or ""),
                Text(row.worker),
                Text(row.note),
            )
        header = Text.assemble(
            ("task ", "bold"),
            (self.task_id, "bold"),
            "  ",
            (self.status, STYLES.get(self.status, "")),
            f"  {self.note}" if self.note else "",
        )
        parts: list[Any] = [header, Text(self.goal[:200], style="italic"), table]
        current = self.rows.get(self.streaming)
        if current is not None and current.status == "RUNNING" and current.streamed:
            tail = "\n".join(current.streamed.splitlines()[-6:])[-600:]
            parts.append(Panel(Text(tail), title=f"{current.id} writing …", expand=False))
        return Group(*parts)


async def follow(console: Console, task: Task, events: AsyncIterator[Event], refresh: Any) -> None:
    """Show ``events`` as they come: a live table on a terminal, lines otherwise.

    ``refresh`` re-reads the task (for subtask titles once the plan exists).
    """
    if not console.is_terminal:
        # Streamed output is written as it comes, under a header per subtask;
        # every other event is one line.
        streaming = ""
        async for event in events:
            if event.type == EventType.SUBTASK_OUTPUT:
                if streaming != event.subtask_id:
                    streaming = event.subtask_id
                    console.print(f"[{streaming} output]", highlight=False, markup=False)
                console.print(event.message, end="", highlight=False, markup=False)
                continue
            if streaming:
                console.print()
                streaming = ""
            console.print(event_line(event), highlight=False, soft_wrap=True)
        return
    view = LiveView(task)
    with Live(view.render(), console=console, refresh_per_second=8, transient=True) as live:
        async for event in events:
            view.apply(event)
            if event.type == "plan.created":
                view.load(await refresh())
            live.update(view.render())
