"""Plan parsing and validation (pure)."""

from __future__ import annotations

import pytest

from taskloom.core.errors import PlanError
from taskloom.core.model import SYNTHESIZE_ID, Plan, PlannedSubtask
from taskloom.core.plan import (
    PlanLimits,
    content_problems,
    finalize,
    find_cycle,
    normalize_plan,
    parse_plan,
    plan_to_document,
    sinks,
    validate_plan,
)

LIMITS = PlanLimits(max_subtasks=10, max_title_chars=20, max_instruction_chars=50)
CAPS = {"llm", "echo"}


def sub(sid: str, *deps: str, capability: str = "llm", instruction: str = "do") -> PlannedSubtask:
    return PlannedSubtask(sid, sid.upper(), instruction, capability, deps)


def check(*subtasks: PlannedSubtask) -> list[str]:
    return validate_plan(Plan(subtasks), capabilities=CAPS, limits=LIMITS)


def test_a_valid_plan_has_no_violations() -> None:
    assert check(sub("a"), sub("b", "a"), sub("c", "a"), sub("d", "b", "c")) == []


@pytest.mark.parametrize(
    ("subtasks", "violation"),
    [
        ((), "the plan has no subtasks; it needs at least one"),
        ((sub("a"), sub("a")), "duplicate id a"),
        ((sub("a", "s9"),), "a depends on missing s9"),
        ((sub("a", "a"),), "a depends on itself"),
        ((sub("a"), sub("b", "a", "a")), "b lists a dependency twice"),
        (
            (sub("a", capability="shell"),),
            "a uses unknown capability 'shell'; available: echo, llm",
        ),
        ((sub("a", instruction="  "),), "a has an empty instruction"),
        (
            (sub("a", instruction="x" * 51),),
            "a has an instruction of 51 characters; the limit is 50",
        ),
        (
            (sub("bad id"),),
            "subtask id 'bad id' is not valid: use 1-64 letters, digits, '_', '.' or '-'",
        ),
        ((sub(SYNTHESIZE_ID),), "id synthesize is reserved for the step taskloom adds; rename it"),
        (
            tuple(sub(f"s{i}") for i in range(11)),
            "the plan has 11 subtasks; at most 10 are allowed",
        ),
        ((sub("a", "c"), sub("b", "a"), sub("c", "b")), "cycle a → c → b → a"),
    ],
)
def test_each_violation_is_named_so_a_model_can_fix_it(
    subtasks: tuple[PlannedSubtask, ...], violation: str
) -> None:
    assert violation in check(*subtasks)


def test_cycle_search_survives_very_long_chains() -> None:
    chain = [sub("s0")] + [sub(f"s{i}", f"s{i - 1}") for i in range(1, 20_000)]
    assert find_cycle(chain) is None
    chain[0] = sub("s0", "s19999")
    cycle = find_cycle(chain)
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 20_001


def test_parsing_ignores_unknown_fields_and_reads_synthesize() -> None:
    parsed = parse_plan(
        '{"subtasks": [{"id": "a", "instruction": "x", "capability": "llm", "color": "red",'
        ' "params": {"n": 3, "on": true}}], "synthesize": false, "why": "extra"}'
    )
    assert parsed == Plan(
        (PlannedSubtask("a", "", "x", "llm", (), {"n": "3", "on": "true"}),), synthesize=False
    )
    assert parse_plan(plan_to_document(parsed)) == parsed


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"subtasks": [{"id": "a", "instruction": "cut off in the mid', "ends too early"),
        ('{"subtasks": [{"id": "a", "instr', "the plan's JSON ends too early"),
        ([], "must be a JSON object"),
        ({"steps": []}, "'subtasks' must be a list"),
        ({"subtasks": [3]}, "subtasks[0] must be an object"),
        ({"subtasks": [{"id": 1, "instruction": "x", "capability": "llm"}]},
         "subtasks[0].id must be a string"),
        ({"subtasks": [{"id": "a", "instruction": "x", "capability": "llm", "depends_on": "b"}]},
         "subtasks[0].depends_on must be a list of subtask ids"),
        ({"subtasks": [], "synthesize": "yes"}, "'synthesize' must be true or false"),
    ],
)  # fmt: skip
def test_malformed_documents_raise_plan_errors_that_say_where(
    document: object, problem: str
) -> None:
    with pytest.raises(PlanError) as caught:
        parse_plan(document)
    assert any(problem in v for v in caught.value.violations) or problem in str(caught.value)
    assert "the plan is the" not in str(caught.value) and "Unterminated" not in str(caught.value)


def test_finalize_appends_synthesis_over_every_sink() -> None:
    plan = Plan((sub("a"), sub("b", "a"), sub("c", "a")))
    assert sinks(plan) == ["b", "c"]
    graph, result_from = finalize(plan, synthesize=True)
    assert graph.subtasks[-1].id == SYNTHESIZE_ID
    assert graph.subtasks[-1].depends_on == ("b", "c")
    assert graph.subtasks[-1].capability == "llm"
    assert result_from == [SYNTHESIZE_ID]
    assert finalize(plan, synthesize=False) == (plan, ["b", "c"])


def step(sid: str, title: str, instruction: str, capability: str = "llm") -> PlannedSubtask:
    return PlannedSubtask(sid, title, instruction, capability)


GOAL = "Write a short guide to brewing good coffee at home."


@pytest.mark.parametrize(
    ("subtasks", "problem"),
    [
        ((step("s1", "Beans", "s1"),), "s1's instruction 's1' is a placeholder"),
        ((step("s1", "Beans", "Step 2"),), "s1's instruction 'Step 2' is a placeholder"),
        ((step("s1", "Beans", "TODO"),), "s1's instruction 'TODO' is a placeholder"),
        ((step("s1", "Beans", "beans"),), "s1's instruction 'beans' is a placeholder"),
        ((step("s1", "S1", "Explain how to pick beans."),), "s1's title 'S1' says nothing"),
        ((step("s1", "", "Explain how to pick beans."),), "s1's title '' says nothing"),
        ((step("s1", "Step 1", "Explain how to pick beans."),), "s1's title 'Step 1' says"),
        (
            (step("a", "Beans", "Explain how to pick beans."),
             step("b", "Beans again", "explain how to pick  the beans!")),
            "b's instruction repeats a's",
        ),
        (
            (step("a", "Guide", GOAL), step("b", "Grind", "Explain the grind sizes.")),
            "a's instruction only repeats the goal",
        ),
    ],
)  # fmt: skip
def test_a_model_plan_that_says_nothing_is_named(
    subtasks: tuple[PlannedSubtask, ...], problem: str
) -> None:
    problems = content_problems(Plan(subtasks), goal=GOAL)
    assert any(p.startswith(problem) for p in problems), problems


def test_a_plan_with_content_passes_and_custom_handlers_are_not_judged() -> None:
    good = Plan((
        step("pros", "Pros", "List the advantages of each method."),
        step("cons", "Cons", "List the drawbacks of each method."),
        step("s3", "Summary", "Weigh them."),
        # Alike in form, different in content.
        step("d1", "Day one", "Describe day 1 of the trip to Lisbon and where to eat."),
        step("d2", "Day two", "Describe day 2 of the trip to Lisbon and where to eat."),
        step("adv", "Advantages", "List the advantages of remote work for a software company."),
        step("dis", "Drawbacks", "List the disadvantages of remote work for a software company."),
        # A custom handler's instruction may be data, even the same data twice.
        step("f1", "F1", "q3.csv", capability="load"),
        step("f2", "F2", "q3.csv", capability="load"),
    ))  # fmt: skip
    assert content_problems(good, goal=GOAL) == []
    # One step may carry the whole goal.
    assert content_problems(Plan((step("s1", "Guide", GOAL),)), goal=GOAL) == []


def test_as_a_last_resort_steps_saying_the_same_are_merged() -> None:
    messy = Plan((
        step("s1", "Beans", "Explain how to pick the beans."),
        PlannedSubtask("s2", "Beans", "explain how to pick beans!", "llm", ("s1",)),
        PlannedSubtask("s3", "Grind", "Explain the grind sizes.", "llm", ("s2",)),
    ))  # fmt: skip
    assert normalize_plan(messy, capabilities=CAPS)[0] == messy  # the model is asked first
    fixed, notes = normalize_plan(messy, capabilities=CAPS, last_resort=True)
    assert [(s.id, s.depends_on) for s in fixed.subtasks] == [("s1", ()), ("s3", ("s1",))]
    assert notes == ["merged s2 into s1: the two said the same"]
    assert content_problems(fixed, goal=GOAL) == []
