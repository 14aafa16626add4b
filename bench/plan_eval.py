"""How well a backend plans: ``python -m bench.plan_eval [--llm embedded:smollm2]``.

Runs each goal of ``bench/plan_goals.txt`` (32, public) through the
supervisor's planner (schema, normalisation, validation, content checks,
repairs) against the configured backend (``TASKLOOM_LLM`` and friends, or
``--llm``) and scores each plan by rules (``Score``): a valid graph, distinct
non-placeholder instructions, only the capabilities offered, a sane size and
depth. Prints per goal and overall: the score and each rule's rate, repairs,
subtasks, tokens and latency. ``--json FILE`` keeps the rows with the plans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from taskloom.core.errors import TaskloomError
from taskloom.core.llm import create_llm
from taskloom.core.model import Plan, Usage
from taskloom.core.plan import content_problems, plan_to_document
from taskloom.supervisor.planner import PlanHooks, Planner, offered_capabilities
from taskloom.supervisor.settings import SupervisorSettings

GOALS_FILE = Path(__file__).with_name("plan_goals.txt")
MAX_SANE_SUBTASKS = 10
MAX_SANE_DEPTH = 5


def load_goals(path: Path = GOALS_FILE) -> list[str]:
    """The evaluation's goals: one per line; ``#`` comments and blank lines skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def depth(plan: Plan) -> int:
    """Steps on the longest dependency chain of a valid (acyclic) plan."""
    needs = {s.id: s.depends_on for s in plan.subtasks}
    memo: dict[str, int] = {}

    def level(i: str) -> int:
        if i not in memo:
            memo[i] = 1 + max((level(d) for d in needs[i] if d in needs), default=0)
        return memo[i]

    return max(map(level, needs), default=0)


@dataclass
class Score:
    """The rules a plan is scored by (each 1 or 0; all 0 without a plan)."""

    valid: int = 0
    """The planner produced a valid graph (after its repairs)."""
    distinct: int = 0
    """No placeholder instruction or title, no step written twice or only repeating the goal."""
    allowed: int = 0
    """Only the capabilities offered, and never the test-only ``echo``."""
    sane: int = 0
    """2 to 10 subtasks, at most 5 deep: the goal broken up, not shredded."""

    @property
    def total(self) -> float:
        return (self.valid + self.distinct + self.allowed + self.sane) / 4


def score(plan: Plan | None, goal: str, offered: set[str]) -> Score:
    if plan is None:
        return Score()
    caps = {s.capability for s in plan.subtasks}
    return Score(
        valid=1,
        distinct=int(not content_problems(plan, goal=goal)),
        allowed=int(caps <= offered and "echo" not in caps),
        sane=int(2 <= len(plan.subtasks) <= MAX_SANE_SUBTASKS and depth(plan) <= MAX_SANE_DEPTH),
    )


@dataclass
class Row:
    goal: str
    score: Score
    repairs: int
    fixes: int
    subtasks: int
    depth: int
    input_tokens: int
    output_tokens: int
    seconds: float
    error: str = ""
    plan: list[dict[str, object]] = field(default_factory=list)


async def evaluate(goal: str, planner: Planner, offered: set[str]) -> Row:
    rejected: list[str] = []
    fixed: list[str] = []
    usage = Usage()

    async def on_rejected(message: str) -> None:
        rejected.append(message)

    async def on_fixed(message: str) -> None:
        fixed.append(message)

    async def on_spent(spent: Usage) -> None:
        nonlocal usage
        usage += spent

    hooks = PlanHooks(rejected=on_rejected, normalized=on_fixed, spent=on_spent)
    started = time.monotonic()
    plan: Plan | None = None
    error = ""
    try:
        plan = await planner.plan(goal, capabilities=offered, hooks=hooks)
    except TaskloomError as e:
        error = str(e)
    return Row(
        goal=goal,
        score=score(plan, goal, offered),
        repairs=len(rejected),
        fixes=len(fixed),
        subtasks=len(plan.subtasks) if plan else 0,
        depth=depth(plan) if plan else 0,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        seconds=time.monotonic() - started,
        error=error[:200],
        plan=plan_to_document(plan)["subtasks"] if plan else [],
    )


def percent(rows: list[Row], rule: str) -> str:
    return f"{100 * statistics.mean(getattr(r.score, rule) for r in rows):.0f} %"


async def main(args: argparse.Namespace) -> int:
    settings = SupervisorSettings.load(llm=args.llm)
    llm = create_llm(settings)
    try:
        await llm.check()
    except TaskloomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    planner = Planner(
        llm,
        limits=settings.llm_plan_limits(),
        repairs=settings.plan_repairs,
        reply_tokens=settings.plan_reply_tokens,
    )
    goals = load_goals()[: args.goals or None]
    # What the supervisor offers the planner when workers run these.
    offered = set(offered_capabilities(args.capabilities.split(",")))
    rows = []
    print(f"backend {llm.describe()}, {len(goals)} goals, {settings.plan_repairs} repairs "
          f"allowed, offered: {', '.join(sorted(offered))}")  # fmt: skip
    for goal in goals:
        row = await evaluate(goal, planner, offered)
        rows.append(row)
        verdict = (
            f"score {row.score.total:.2f}, {row.subtasks} subtasks, depth {row.depth}"
            if row.score.valid
            else f"FAILED: {row.error}"
        )
        print(
            f"  {row.seconds:6.1f}s  {row.repairs} repairs  {row.fixes} fixes  "
            f"{row.input_tokens + row.output_tokens:6d} tokens  {goal[:50]!r}: {verdict}"
        )
    await llm.close()
    valid = [r for r in rows if r.score.valid]
    print()
    print("| backend | goals | score | valid | distinct | allowed | sane | repairs/plan "
          "| mean subtasks | tokens/plan (in+out) | latency/plan median (max) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {llm.describe()} | {len(rows)} "
        f"| {statistics.mean(r.score.total for r in rows):.2f} "
        f"| {percent(rows, 'valid')} | {percent(rows, 'distinct')} "
        f"| {percent(rows, 'allowed')} | {percent(rows, 'sane')} "
        f"| {statistics.mean(r.repairs for r in rows):.2f} "
        f"| {statistics.mean(r.subtasks for r in valid) if valid else 0:.1f} "
        f"| {statistics.mean(r.input_tokens for r in rows):.0f}"
        f"+{statistics.mean(r.output_tokens for r in rows):.0f} "
        f"| {statistics.median(r.seconds for r in rows):.1f} s "
        f"({max(r.seconds for r in rows):.1f} s) |"
    )
    if args.json:
        await asyncio.to_thread(
            Path(args.json).write_text, json.dumps([asdict(r) for r in rows], indent=2)
        )
    return 0


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", help="provider:model [TASKLOOM_LLM]")
    parser.add_argument("--goals", type=int, default=0, help="How many of the goals (0: all)")
    parser.add_argument(
        "--capabilities",
        default="llm,echo",
        help="What the workers run (the planner is offered these, less the test-only echo)",
    )
    parser.add_argument("--json", help="Write the rows (with each plan) here")
    sys.exit(asyncio.run(main(parser.parse_args())))


if __name__ == "__main__":
    cli()
