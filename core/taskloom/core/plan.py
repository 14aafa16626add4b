"""Reading and checking plans.

A plan is JSON of the form::

    {"subtasks": [{"id": "s1", "title": "...", "instruction": "...",
                   "capability": "llm", "depends_on": []}],
     "synthesize": true}

Unknown fields are ignored. ``parse_plan`` turns such a document into a
``Plan``; ``validate_plan`` lists every way the plan breaks the rules, in words
that can be fed back to the model that wrote it ("s4 depends on missing s9");
``content_problems`` lists how a model's valid plan still says nothing
(placeholder instructions, a step written twice).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from taskloom.core.errors import PlanError
from taskloom.core.model import AGGREGATE_PARAM, SYNTHESIZE_ID, Aggregate, Plan, PlannedSubtask

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Subtask ids end up inside Redis keys, so they are short and plain."""

_ID_RE = re.compile(ID_PATTERN)
CAPABILITY_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"
"""Capability names reach the planner's prompt, metric labels and messages:
short and plain, like ids."""
CAPABILITY_RE = re.compile(CAPABILITY_PATTERN)
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$"
"""Label keys and values a subtask may require: plain names, so that a route
(``llm[gpu=true]``) parses back ("model=llama3.1:70b" is one)."""
LABEL_RE = re.compile(LABEL_PATTERN)
MAX_REQUIRES = 8
MAX_REPORTED_VIOLATIONS = 20


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """Size limits for one plan; LLM plans get much tighter ones than explicit plans."""

    max_subtasks: int
    max_title_chars: int = 200
    max_instruction_chars: int = 20_000
    max_params: int = 32
    max_param_chars: int = 4_000
    id_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
    """The ids the model is asked for (a subset of what ``ID_PATTERN`` allows)."""


def parse_plan(document: Any) -> Plan:
    """Build a ``Plan`` from decoded JSON (or a JSON string); raise ``PlanError`` if malformed."""
    if isinstance(document, str | bytes):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as e:
            # A reply cut off by its token limit ends inside the JSON: at the
            # end of the text, or inside a string that never closes.
            cut = e.pos >= len(e.doc.rstrip()) - 1 or e.msg.startswith("Unterminated string")
            problem = (
                "the plan's JSON ends too early (the reply was cut off); return a shorter plan"
                if cut
                else f"the plan is not valid JSON: {e}"
            )
            raise PlanError(problem, [problem]) from None
    if not isinstance(document, dict):
        raise PlanError("a plan must be a JSON object with a 'subtasks' list")
    raw = document.get("subtasks")
    if not isinstance(raw, list):
        raise PlanError("a plan must have a 'subtasks' list", ["'subtasks' must be a list"])
    problems: list[str] = []
    subtasks = [_parse_subtask(i, item, problems) for i, item in enumerate(raw)]
    synthesize = document.get("synthesize")
    if synthesize is not None and not isinstance(synthesize, bool):
        problems.append("'synthesize' must be true or false")
    if problems:
        raise PlanError(_summary(problems), problems)
    return Plan(subtasks=tuple(s for s in subtasks if s is not None), synthesize=synthesize)


def _parse_subtask(index: int, item: Any, problems: list[str]) -> PlannedSubtask | None:
    where = f"subtasks[{index}]"
    if not isinstance(item, dict):
        problems.append(f"{where} must be an object")
        return None
    fields: dict[str, str] = {}
    for name in ("id", "title", "instruction", "capability"):
        value = item.get(name, "" if name == "title" else None)
        if not isinstance(value, str):
            problems.append(f"{where}.{name} must be a string")
            value = ""
        fields[name] = value
    deps = item.get("depends_on", [])
    if deps is None:
        deps = []
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        problems.append(f"{where}.depends_on must be a list of subtask ids")
        deps = []
    params = item.get("params", {}) or {}
    if not isinstance(params, dict) or not all(
        isinstance(v, str | int | float | bool) for v in params.values()
    ):
        problems.append(f"{where}.params must be an object of strings, numbers or booleans")
        params = {}
    max_attempts = item.get("max_attempts", 0) or 0
    if (
        not isinstance(max_attempts, int)
        or isinstance(max_attempts, bool)
        or not (0 <= max_attempts <= 100)
    ):
        problems.append(f"{where}.max_attempts must be a whole number from 1 to 100")
        max_attempts = 0
    timeout = item.get("timeout", 0) or 0
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
        problems.append(f"{where}.timeout must be a number of seconds")
        timeout = 0
    role = item.get("role") or ""
    if not isinstance(role, str):
        problems.append(f"{where}.role must be a string")
        role = ""
    if role.strip():
        params = {**params, "role": role.strip()}
    requires = item.get("requires", {}) or {}
    if not isinstance(requires, dict) or not all(
        isinstance(v, str | int | float | bool) for v in requires.values()
    ):
        problems.append(f"{where}.requires must be an object of label names and values")
        requires = {}
    requires_approval = item.get("requires_approval", False)
    if not isinstance(requires_approval, bool):
        problems.append(f"{where}.requires_approval must be true or false")
        requires_approval = False
    return PlannedSubtask(
        id=fields["id"],
        title=fields["title"],
        instruction=fields["instruction"],
        capability=fields["capability"],
        depends_on=tuple(deps),
        params={str(k): _param_str(v) for k, v in params.items()},
        max_attempts=max_attempts,
        timeout=float(timeout),
        requires_approval=requires_approval,
        requires={str(k): _param_str(v) for k, v in requires.items()},
    )


def _param_str(value: str | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def plan_to_document(plan: Plan) -> dict[str, Any]:
    """The JSON form of a plan (the inverse of ``parse_plan``)."""
    document: dict[str, Any] = {
        "subtasks": [
            {
                "id": s.id,
                "title": s.title,
                "instruction": s.instruction,
                "capability": s.capability,
                "depends_on": list(s.depends_on),
                **({"params": dict(s.params)} if s.params else {}),
                **({"max_attempts": s.max_attempts} if s.max_attempts else {}),
                **({"timeout": s.timeout} if s.timeout else {}),
                **({"requires_approval": True} if s.requires_approval else {}),
                **({"requires": dict(s.requires)} if s.requires else {}),
            }
            for s in plan.subtasks
        ]
    }
    if plan.synthesize is not None:
        document["synthesize"] = plan.synthesize
    return document


def validate_plan(
    plan: Plan,
    *,
    capabilities: Collection[str],
    limits: PlanLimits,
    reserved_ids: Collection[str] = (SYNTHESIZE_ID,),
) -> list[str]:
    """Every way ``plan`` breaks the rules, most fundamental first; empty if valid."""
    violations: list[str] = []
    subtasks = plan.subtasks
    if not subtasks:
        return ["the plan has no subtasks; it needs at least one"]
    if len(subtasks) > limits.max_subtasks:
        violations.append(
            f"the plan has {len(subtasks)} subtasks; at most {limits.max_subtasks} are allowed"
        )
    all_ids = {s.id for s in subtasks}
    seen: set[str] = set()
    for s in subtasks:
        name = s.id or "(empty id)"
        if not _ID_RE.match(s.id):
            violations.append(
                f"subtask id {s.id!r} is not valid: use 1-64 letters, digits, '_', '.' or '-'"
            )
        elif s.id in seen:
            violations.append(f"duplicate id {s.id}")
        elif s.id in reserved_ids:
            violations.append(f"id {s.id} is reserved for the step taskloom adds; rename it")
        seen.add(s.id)
        if len(s.title) > limits.max_title_chars:
            violations.append(f"{name} has a title over {limits.max_title_chars} characters")
        if not s.instruction.strip():
            violations.append(f"{name} has an empty instruction")
        elif len(s.instruction) > limits.max_instruction_chars:
            violations.append(
                f"{name} has an instruction of {len(s.instruction)} characters; "
                f"the limit is {limits.max_instruction_chars}"
            )
        if s.capability not in capabilities:
            available = ", ".join(sorted(capabilities)) or "none"
            violations.append(
                f"{name} uses unknown capability {s.capability!r}; available: {available}"
            )
        violations.extend(requires_problems(name, s.requires))
        if len(s.params) > limits.max_params or any(
            len(v) > limits.max_param_chars for v in s.params.values()
        ):
            violations.append(f"{name} has too many or too long params")
        for dep in s.depends_on:
            if dep == s.id:
                violations.append(f"{name} depends on itself")
            elif dep not in all_ids:
                violations.append(f"{name} depends on missing {dep}")
        if len(set(s.depends_on)) != len(s.depends_on):
            violations.append(f"{name} lists a dependency twice")
    cycle = find_cycle(subtasks)
    if cycle:
        violations.append("cycle " + " → ".join(cycle))
    return violations[:MAX_REPORTED_VIOLATIONS]


def requires_problems(name: str, requires: Mapping[str, str]) -> list[str]:
    """What is wrong with the labels a subtask requires."""
    if len(requires) > MAX_REQUIRES:
        return [f"{name} requires {len(requires)} labels; at most {MAX_REQUIRES}"]
    bad = [f"{k}={v}" for k, v in requires.items() if not (LABEL_RE.match(k) and LABEL_RE.match(v))]
    if bad:
        return [
            f"{name} requires label {bad[0][:80]!r}: keys and values are 1-64 letters, digits "
            "and _.:/- starting with a letter or digit"
        ]
    return []


PROSE_CAPABILITIES = frozenset({"llm"})
"""Capabilities whose instruction is prose for a model: a few words are not one."""
MIN_INSTRUCTION_WORDS = 2
STOPWORDS = frozenset((
    "a", "an", "the", "of", "to", "and", "or", "for", "in", "on", "at", "by", "with", "from",
    "this", "that", "these", "those", "it", "its", "is", "are", "be", "your", "their", "our",
    "each", "every", "all", "some", "any", "as", "into", "about",
))  # fmt: skip
"""Words that do not make two instructions different ("pick the beans", "pick beans")."""
_PLACEHOLDER_RE = re.compile(
    r"^(?:(?:step|subtask|task|sub-task|part|s|t)\s*[-_#.]?\s*\d*|todo|tbd|tba|n/?a|none|"
    r"\.\.\.|…|instruction|title|do it|do this|see above|same as above|as above)$"
)


def _plain(text: str) -> str:
    """``text`` for comparing: lower case, words only, single spaces."""
    return " ".join(re.findall(r"[^\W_]+", text.casefold()))


def content_problems(plan: Plan, *, goal: str) -> list[str]:
    """How a model's plan says nothing, though valid: placeholder instructions
    and titles, steps written twice, steps that only repeat the goal. Worded to
    be fed back to the model; empty if none.

    Only steps for a model (``PROSE_CAPABILITIES``) are checked, whose
    instruction is prose that the model reads: a custom handler's may be data
    (a file name, a number). For plans written by a model only: an explicit
    plan may say what it likes.
    """
    problems: list[str] = []
    ids = {_plain(s.id) for s in plan.subtasks}
    # An id like "s1" is no title or instruction; one like "pros" may be a title.
    bare_ids = {i for i in ids if _PLACEHOLDER_RE.match(i) or not re.search(r"[a-z]{3}", i)}
    whole_goal = _plain(goal)
    seen: list[tuple[str, str]] = []
    several = len(plan.subtasks) > 1
    for s in plan.subtasks:
        if s.capability not in PROSE_CAPABILITIES:
            continue
        instruction, title = _plain(s.instruction), _plain(s.title)
        if (
            not title
            or title in bare_ids
            or _PLACEHOLDER_RE.match(title)
            or _PLACEHOLDER_RE.match(s.title.strip().casefold())
        ):
            problems.append(
                f"{s.id}'s title {s.title!r} says nothing: name what the step does in a few words"
            )
        if (
            instruction in ids
            or _PLACEHOLDER_RE.match(instruction)
            or _PLACEHOLDER_RE.match(s.instruction.strip().casefold())
            or len(instruction.split()) < MIN_INSTRUCTION_WORDS
        ):
            problems.append(
                f"{s.id}'s instruction {s.instruction[:60]!r} is a placeholder: write out what "
                "the worker must do in this step, in a full sentence"
            )
            continue
        if several and _alike(instruction, whole_goal):
            problems.append(
                f"{s.id}'s instruction only repeats the goal: say which part of the goal "
                "this step does"
            )
            continue
        copy = next((other for other, text in seen if _alike(instruction, text)), None)
        if copy is not None:
            problems.append(
                f"{s.id}'s instruction repeats {copy}'s: give each step its own part of the "
                "work, or leave the copy out"
            )
        seen.append((s.id, instruction))
    return problems[:MAX_REPORTED_VIOLATIONS]


def _alike(a: str, b: str) -> bool:
    """Whether two plain texts say the same: the same words once the small ones
    are left out, or, in a longer text, one word more or less (not a number:
    "day 1" and "day 2" are two steps, and so are "advantages" and
    "disadvantages")."""
    if a == b:
        return True
    words_a, words_b = set(a.split()) - STOPWORDS, set(b.split()) - STOPWORDS
    if words_a == words_b:
        return True
    differ = words_a ^ words_b
    return (
        len(words_a | words_b) >= 8
        and len(differ) == 1
        and not any(c.isdigit() for c in next(iter(differ)))
    )


def normalize_plan(
    plan: Plan,
    *,
    capabilities: Collection[str],
    last_resort: bool = False,
    external: Collection[str] = (),
) -> tuple[Plan, list[str]]:
    """Fix what can be fixed without asking the model again, and say what was fixed.

    Spaces around ids, titles, instructions and capabilities are trimmed; a
    capability in the wrong case is matched to the listed one; a subtask's
    dependency on itself and repeated dependencies are dropped; a subtask
    that repeats another exactly (same id or not) is dropped, and what
    depended on the copy depends on the original. With ``last_resort`` (once
    the model has had its chances to fix them): two different subtasks with
    one id get ids of their own (``s2``, ``s2-2``; a dependency on the id means
    the first); a model step that says what an earlier one says (in other
    case, spacing or nearly the same words) is merged into it; dependencies
    on ids that are neither in the plan nor
    ``external`` are dropped (the subtask they name does not exist, so there is
    nothing to wait for); and a cycle is broken where a subtask depends on one
    listed after it. Anything else is left for ``validate_plan`` to report.

    One fix can make another possible (a merge turns a dependency into a
    self-dependency, whose removal makes two subtasks identical), so the
    passes repeat until nothing changes.
    """
    notes: list[str] = []
    if last_resort:
        plan = _merge_copies(_distinct_ids(plan, notes), notes)
    for _ in range(len(plan.subtasks) + 1):
        fixed, more = _normalize_once(
            plan, capabilities=capabilities, drop_missing=last_resort, external=external
        )
        notes += more
        if fixed == plan:
            break
        plan = fixed
    if last_resort:
        plan = _acyclic(plan, notes)
    return plan, notes


def _distinct_ids(plan: Plan, notes: list[str]) -> Plan:
    """Later subtasks sharing an id renamed ``id-2``, ``id-3``… (not already taken)."""
    taken = {s.id.strip() for s in plan.subtasks}
    seen: set[str] = set()
    out: list[PlannedSubtask] = []
    for s in plan.subtasks:
        sid = s.id.strip()
        if sid in seen:
            n = 2
            while f"{sid}-{n}" in taken:
                n += 1
            new = f"{sid}-{n}"
            taken.add(new)
            notes.append(f"renamed the second subtask with id {sid} to {new}")
            s = replace(s, id=new)
        seen.add(sid)
        out.append(s)
    return Plan(tuple(out), synthesize=plan.synthesize)


def _merge_copies(plan: Plan, notes: list[str]) -> Plan:
    """Model steps alike (``_alike``) to an earlier one of the same capability
    dropped; what depended on a copy depends on the original."""
    alias: dict[str, str] = {}
    kept: list[tuple[PlannedSubtask, str]] = []
    for s in plan.subtasks:
        text = _plain(s.instruction)
        if s.capability in PROSE_CAPABILITIES:
            original = next((k for k, t in kept if k.route == s.route and _alike(text, t)), None)
            if original is not None:
                alias[s.id] = original.id
                notes.append(f"merged {s.id} into {original.id}: the two said the same")
                continue
        kept.append((s, text))
    if not alias:
        return plan
    return Plan(
        tuple(replace(s, depends_on=tuple(alias.get(d, d) for d in s.depends_on)) for s, _ in kept),
        synthesize=plan.synthesize,
    )


def _acyclic(plan: Plan, notes: list[str]) -> Plan:
    """Each cycle broken at a dependency on a subtask listed later (every cycle
    has one: they cannot all point backwards)."""
    order = {s.id: n for n, s in enumerate(plan.subtasks)}
    subtasks = list(plan.subtasks)
    while (cycle := find_cycle(subtasks)) is not None:
        for a, b in itertools.pairwise(cycle):
            if order[b] > order[a]:
                i = order[a]
                subtasks[i] = replace(
                    subtasks[i], depends_on=tuple(d for d in subtasks[i].depends_on if d != b)
                )
                notes.append(f"dropped {a}'s dependency on {b}, which closed a cycle")
                break
    return Plan(tuple(subtasks), synthesize=plan.synthesize)


def _normalize_once(
    plan: Plan,
    *,
    capabilities: Collection[str],
    drop_missing: bool,
    external: Collection[str],
) -> tuple[Plan, list[str]]:
    notes: list[str] = []
    by_lower = {c.lower(): c for c in capabilities}
    trimmed = 0
    cleaned: list[PlannedSubtask] = []
    for s in plan.subtasks:
        fields = [s.id, s.title, s.instruction, s.capability]
        stripped: list[str] = []
        for d in (d.strip() for d in s.depends_on):
            if d == s.id.strip():
                notes.append(f"dropped {d}'s dependency on itself")
            elif d in stripped:
                notes.append(f"dropped {s.id.strip()}'s second dependency on {d}")
            else:
                stripped.append(d)
        new = replace(
            s,
            id=s.id.strip(),
            title=s.title.strip(),
            instruction=s.instruction.strip(),
            capability=s.capability.strip(),
            depends_on=tuple(stripped),
        )
        trimmed += sum(
            1
            for a, b in zip(
                fields,
                [new.id, new.title, new.instruction, new.capability],
                strict=True,
            )
            if a != b
        ) + sum(1 for d in s.depends_on if d != d.strip())
        if new.capability not in capabilities and new.capability.lower() in by_lower:
            listed = by_lower[new.capability.lower()]
            notes.append(f"{new.id}: capability {new.capability!r} read as {listed!r}")
            new = replace(new, capability=listed)
        cleaned.append(new)
    if trimmed:
        notes.insert(0, f"trimmed spaces around {trimmed} field(s)")
    # Exact repeats: keep the first; what depended on a copy depends on it.
    alias: dict[str, str] = {}
    kept: list[PlannedSubtask] = []
    seen: dict[tuple[object, ...], str] = {}
    ids = [s.id for s in cleaned]
    for s in cleaned:
        body = (s.title, s.instruction, s.route, s.depends_on, tuple(sorted(s.params.items())))
        original = seen.get(body)
        if original is not None and (original == s.id or ids.count(s.id) == 1):
            if original == s.id:
                notes.append(f"dropped a repeated copy of {s.id}")
            else:
                alias[s.id] = original
                notes.append(f"merged {s.id} into {original}: the two were identical")
            continue
        seen.setdefault(body, s.id)
        kept.append(s)
    subtasks: list[PlannedSubtask] = []
    known = {s.id for s in kept} | set(external)
    for s in kept:
        deps: list[str] = []
        for d in (alias.get(d, d) for d in s.depends_on):
            if d == s.id:
                notes.append(f"dropped {s.id}'s dependency on itself")
            elif d in deps:
                notes.append(f"dropped {s.id}'s second dependency on {d}")
            elif drop_missing and d not in known:
                notes.append(f"dropped {s.id}'s dependency on missing {d}")
            else:
                deps.append(d)
        subtasks.append(replace(s, depends_on=tuple(deps)))
    return Plan(tuple(subtasks), synthesize=plan.synthesize), notes


def check_plan(plan: Plan, *, capabilities: Collection[str], limits: PlanLimits) -> None:
    """Raise ``PlanError`` naming every violation, or return if the plan is valid."""
    violations = validate_plan(plan, capabilities=capabilities, limits=limits)
    if violations:
        raise PlanError(_summary(violations), violations)


def _summary(violations: list[str]) -> str:
    head = "; ".join(violations[:5])
    more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
    return f"invalid plan: {head}{more}"


def find_cycle(subtasks: Iterable[PlannedSubtask]) -> list[str] | None:
    """A dependency cycle as a closed path ``[a, b, a]``, or None.

    Iterative depth-first search, so plans of many thousands of subtasks do not
    hit the recursion limit. Dependencies on unknown ids are ignored here.
    """
    graph = {s.id: [d for d in s.depends_on if d != s.id] for s in subtasks}
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    for root in graph:
        if color[root] != white:
            continue
        path = [root]
        stack = [iter(graph[root])]
        color[root] = grey
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                color[path.pop()] = black
                continue
            if nxt not in graph:
                continue
            if color[nxt] == grey:
                return [*path[path.index(nxt) :], nxt]
            if color[nxt] == white:
                color[nxt] = grey
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return None


def sinks(plan: Plan) -> list[str]:
    """Ids no other subtask depends on, in plan order."""
    depended = {d for s in plan.subtasks for d in s.depends_on}
    return [s.id for s in plan.subtasks if s.id not in depended]


SYNTHESIS_TITLE = "Synthesize the final answer"
SYNTHESIS_INSTRUCTION = (
    "Write the final answer to the goal, using the results of the earlier steps given to you. "
    "Merge them into one coherent, complete answer in the form the goal asks for. "
    "Do not describe the steps or mention that there were several."
)


VOTE_TITLE = "Vote on the answer"
CRITIC_TITLE = "Review, then synthesize"
VOTE_INSTRUCTION = "Take the answer most of the earlier steps gave."


def finalize(
    plan: Plan, *, synthesize: bool, aggregate: Aggregate = Aggregate.SUMMARIZE
) -> tuple[Plan, list[str]]:
    """The plan as it runs, and the ids the task's result is taken from.

    With synthesis, a ``synthesize`` subtask (capability ``llm``) depending on
    every sink is appended and the result is its output: the model's merge
    (``summarize``), the same after a critic pass that may send one sink back
    for another attempt (``critic``) or, with no model call, the majority
    answer (``vote``); the ``llm`` handler reads the ``aggregate`` param. Without synthesis, or with
    ``concat``, the result is made of the sinks' outputs under their titles.
    """
    ends = sinks(plan)
    if not synthesize or aggregate == Aggregate.CONCAT:
        return plan, ends
    vote = aggregate == Aggregate.VOTE
    titles = {Aggregate.VOTE: VOTE_TITLE, Aggregate.CRITIC: CRITIC_TITLE}
    step = PlannedSubtask(
        id=SYNTHESIZE_ID,
        title=titles.get(aggregate, SYNTHESIS_TITLE),
        instruction=VOTE_INSTRUCTION if vote else SYNTHESIS_INSTRUCTION,
        capability="llm",
        depends_on=tuple(ends),
        params={} if aggregate == Aggregate.SUMMARIZE else {AGGREGATE_PARAM: aggregate.value},
    )
    return Plan(subtasks=(*plan.subtasks, step), synthesize=True), [SYNTHESIZE_ID]
