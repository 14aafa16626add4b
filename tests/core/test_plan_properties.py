"""Property-based tests of the plan validator and normaliser (hypothesis).

Whatever the model writes, ``validate_plan`` must answer with a list of
violations (never raise), must accept exactly the plans that are graphs
taskloom can run, and ``normalize_plan`` must only ever fix things: never
turn a valid plan invalid, and give the same plan when run twice.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from taskloom.core.model import Plan, PlannedSubtask
from taskloom.core.plan import PlanLimits, find_cycle, normalize_plan, validate_plan

CAPS = frozenset({"llm", "echo"})
LIMITS = PlanLimits(max_subtasks=40, max_title_chars=40, max_instruction_chars=200)
IDS = st.sampled_from([f"s{i}" for i in range(12)] + ["", " s1", "s 2", "synthesize", "x" * 70])
TEXT = st.text(max_size=30)


@st.composite
def any_plan(draw: st.DrawFn) -> Plan:
    """Plans as a careless model writes them: repeated ids, dangling and
    self dependencies, cycles, unknown capabilities, odd spacing."""
    n = draw(st.integers(0, 12))
    subtasks = []
    for _ in range(n):
        subtasks.append(
            PlannedSubtask(
                id=draw(IDS),
                title=draw(TEXT),
                instruction=draw(st.one_of(TEXT, st.just("  do it  "))),
                capability=draw(st.sampled_from(["llm", "echo", "LLM", " llm", "shell"])),
                depends_on=tuple(draw(st.lists(IDS, max_size=4))),
            )
        )
    return Plan(tuple(subtasks))


@st.composite
def valid_plan(draw: st.DrawFn) -> Plan:
    """A DAG: each subtask depends only on earlier ones."""
    n = draw(st.integers(1, 15))
    subtasks = []
    for i in range(n):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        subtasks.append(
            PlannedSubtask(
                id=f"s{i}",
                title=f"step {i}",
                instruction=f"do thing {i}",
                capability=draw(st.sampled_from(sorted(CAPS))),
                depends_on=tuple(f"s{d}" for d in sorted(deps)),
            )
        )
    return Plan(tuple(subtasks))


def runnable(plan: Plan) -> bool:
    """An independent check: unique plain ids, known capabilities, dependencies
    that exist, and an order in which every subtask follows its dependencies."""
    ids = [s.id for s in plan.subtasks]
    if not ids or len(set(ids)) != len(ids) or len(ids) > LIMITS.max_subtasks:
        return False
    for s in plan.subtasks:
        if not s.id or s.id != s.id.strip() or " " in s.id or len(s.id) > 64:
            return False
        if s.id == "synthesize" or s.capability not in CAPS or not s.instruction.strip():
            return False
        if len(s.title) > LIMITS.max_title_chars or len(s.instruction) > 200:
            return False
        if len(set(s.depends_on)) != len(s.depends_on):
            return False
        if any(d == s.id or d not in ids for d in s.depends_on):
            return False
    done: set[str] = set()
    pending = list(plan.subtasks)
    while pending:
        ready = [s for s in pending if set(s.depends_on) <= done]
        if not ready:
            return False
        done |= {s.id for s in ready}
        pending = [s for s in pending if s.id not in done]
    return True


@settings(max_examples=400, deadline=None)
@given(any_plan())
def test_the_validator_accepts_exactly_the_runnable_plans(plan: Plan) -> None:
    violations = validate_plan(plan, capabilities=CAPS, limits=LIMITS)
    assert all(isinstance(v, str) and v for v in violations)
    assert (violations == []) == runnable(plan), violations


@settings(max_examples=200, deadline=None)
@given(valid_plan())
def test_every_dag_is_valid_and_a_back_edge_is_reported_as_a_cycle(plan: Plan) -> None:
    assert validate_plan(plan, capabilities=CAPS, limits=LIMITS) == []
    assert find_cycle(plan.subtasks) is None
    first, last = plan.subtasks[0], plan.subtasks[-1]
    if first.id == last.id:
        return
    looped = Plan((replace(first, depends_on=(last.id,)), *plan.subtasks[1:]))
    if first.id in _ancestors(looped, last.id):
        violations = validate_plan(looped, capabilities=CAPS, limits=LIMITS)
        assert any(v.startswith("cycle ") for v in violations), violations


@settings(max_examples=400, deadline=None)
@given(any_plan())
@example(  # a merge makes a self-dependency whose removal makes two subtasks identical
    Plan(
        (
            PlannedSubtask("s0", "", "do it", "llm"),
            PlannedSubtask("s0", "", "", "llm"),
            PlannedSubtask("s1", "", "do it", "llm"),
            PlannedSubtask("s0", "", "", "llm", ("s1",)),
        )
    )
)
def test_normalising_only_fixes_and_is_idempotent(plan: Plan) -> None:
    fixed, _ = normalize_plan(plan, capabilities=CAPS)
    again, notes = normalize_plan(fixed, capabilities=CAPS)
    assert again == fixed and notes == []
    if runnable(plan):
        assert runnable(fixed)
    last_resort, _ = normalize_plan(plan, capabilities=CAPS, last_resort=True)
    violations = validate_plan(last_resort, capabilities=CAPS, limits=LIMITS)
    assert not any(
        "depends on missing" in v or v.startswith(("cycle", "duplicate id")) for v in violations
    ), violations


@settings(max_examples=200, deadline=None)
@given(valid_plan(), st.data())
def test_exact_repeats_and_self_dependencies_are_fixed_without_the_model(
    plan: Plan, data: st.DataObject
) -> None:
    copy = data.draw(st.sampled_from(plan.subtasks))
    messy = Plan(
        (
            *plan.subtasks,
            copy,
            replace(copy, depends_on=(*copy.depends_on, copy.id)),
        )
    )
    fixed, notes = normalize_plan(messy, capabilities=CAPS)
    assert fixed == Plan(plan.subtasks)
    assert f"dropped a repeated copy of {copy.id}" in notes


def _ancestors(plan: Plan, sid: str) -> set[str]:
    deps = {s.id: s.depends_on for s in plan.subtasks}
    seen: set[str] = set()
    stack = [sid]
    while stack:
        for d in deps.get(stack.pop(), ()):
            if d not in seen:
                seen.add(d)
                stack.append(d)
    return seen
