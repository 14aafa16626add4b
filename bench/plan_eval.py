"""How well a backend plans: ``python -m bench.plan_eval [--llm embedded:smollm2]``.

Runs each goal through the supervisor's planner (schema, normalisation,
validation, repairs) against the configured backend (``TASKLOOM_LLM`` and
friends, or ``--llm``) and prints, per goal and overall: whether a valid plan
came out, repairs used, fixes made without the model, subtasks, tokens and
latency. ``--json FILE`` keeps the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from taskloom.core.errors import TaskloomError
from taskloom.core.llm import create_llm
from taskloom.core.model import Usage
from taskloom.supervisor.planner import PlanHooks, Planner
from taskloom.supervisor.settings import SupervisorSettings

GOALS = [
    "Write a short guide to brewing good coffee at home: beans, grinding, water, methods.",
    "Compare three popular Python web frameworks and recommend one for a small team.",
    "Plan a three-day trip to Lisbon on a modest budget.",
    "Explain how vaccines train the immune system, for a twelve-year-old.",
    "Draft a one-page business plan for a neighbourhood bicycle repair shop.",
    "Summarise the causes and effects of the 2008 financial crisis.",
    "Write a weekly meal plan for a vegetarian family of four.",
    "Design a beginner's eight-week running programme to reach 5 km.",
    "List the pros and cons of remote work for a software company.",
    "Create a study plan for learning basic Spanish in three months.",
]


@dataclass
class Row:
    goal: str
    valid: bool
    repairs: int
    fixes: int
    subtasks: int
    input_tokens: int
    output_tokens: int
    seconds: float
    error: str = ""


async def evaluate(goal: str, planner: Planner, capabilities: set[str]) -> Row:
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
    try:
        plan = await planner.plan(goal, capabilities=capabilities, hooks=hooks)
        valid, size, error = True, len(plan.subtasks), ""
    except TaskloomError as e:
        valid, size, error = False, 0, str(e)
    return Row(
        goal=goal,
        valid=valid,
        repairs=len(rejected),
        fixes=len(fixed),
        subtasks=size,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        seconds=time.monotonic() - started,
        error=error[:200],
    )


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
    goals = GOALS[: args.goals]
    rows = []
    print(f"backend {llm.describe()}, {len(goals)} goals, {settings.plan_repairs} repairs allowed")
    for goal in goals:
        row = await evaluate(goal, planner, set(args.capabilities.split(",")))
        rows.append(row)
        verdict = f"valid, {row.subtasks} subtasks" if row.valid else f"FAILED: {row.error}"
        print(
            f"  {row.seconds:6.1f}s  {row.repairs} repairs  {row.fixes} fixes  "
            f"{row.input_tokens + row.output_tokens:6d} tokens  {goal[:50]!r}: {verdict}"
        )
    await llm.close()
    valid = [r for r in rows if r.valid]
    print()
    print("| backend | goals | valid plans | repairs/plan | fixes/plan | mean subtasks "
          "| tokens/plan (in+out) | latency/plan median (max) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {llm.describe()} | {len(rows)} | {len(valid)}/{len(rows)} "
        f"({100 * len(valid) / len(rows):.0f} %) "
        f"| {statistics.mean(r.repairs for r in rows):.2f} "
        f"| {statistics.mean(r.fixes for r in rows):.2f} "
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
    parser.add_argument("--goals", type=int, default=len(GOALS), help="How many of the goals")
    parser.add_argument("--capabilities", default="llm", help="What plans may use")
    parser.add_argument("--json", help="Write the rows here")
    sys.exit(asyncio.run(main(parser.parse_args())))


if __name__ == "__main__":
    cli()
