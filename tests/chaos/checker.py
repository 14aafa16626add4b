"""The invariants, checked on a run's history.

The history is JSON lines from three sources: ``commit`` (the task's event
log as Redis committed it, in commit order: every dispatch, lease end and
result), ``worker`` (what each attempt did: ``run``, ``result``) and
``fault`` (what the harness did). After each run:

I1  no acknowledged task or subtask is lost: the task ended SUCCEEDED, or
    FAILED for a reason that is not an infrastructure fault.
I2  at most one valid lease per subtask attempt: attempts are dispatched in
    order, once each, and a new one only after the previous one ended; a
    stale attempt's result never changed state (the committed output is the
    committed attempt's own).
I3  no subtask starts before all its dependencies have committed.
I4  each subtask's completion is committed exactly once.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

INFRASTRUCTURE = (
    "lease expired",
    "stopped answering",
    "shut down",
    "handed back",
    "unavailable",
    "lost its worker",
    "internal error",
)
ATTEMPT_ENDS = {
    "subtask.succeeded",
    "subtask.retrying",
    "subtask.failed",
    "subtask.cancelled",
}


@dataclass
class Verdict:
    violations: dict[str, list[str]] = field(
        default_factory=lambda: {"I1": [], "I2": [], "I3": [], "I4": []}
    )
    stats: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def add(self, invariant: str, message: str) -> None:
        if len(self.violations[invariant]) < 20:
            self.violations[invariant].append(message)
        self.stats[f"{invariant}_violations"] += 1

    def summary(self) -> str:
        parts = [
            f"{name}: {'ok' if not found else f'{len(found)} violation(s)'}"
            for name, found in self.violations.items()
        ]
        return ", ".join(parts)


def check(
    history: list[dict[str, Any]],
    *,
    plan: dict[str, list[str]],
    outputs: dict[str, str],
    task_status: str,
    task_error: str,
) -> Verdict:
    """``plan`` maps each subtask to its dependencies; ``outputs`` is what Redis
    stored for each subtask at the end."""
    verdict = Verdict()
    commits = [h for h in history if h["source"] == "commit"]
    runs = [h for h in history if h["source"] == "worker"]

    # I1: the task ended, and for a reason of its own.
    infrastructure = any(w in task_error.lower() for w in INFRASTRUCTURE)
    if task_status != "SUCCEEDED" and (task_status != "FAILED" or infrastructure):
        verdict.add("I1", f"task ended {task_status}: {task_error or '(no reason)'}")
    if sum(1 for c in commits if c["type"] in ("task.succeeded", "task.failed")) != 1:
        verdict.add("I1", "the task has no single terminal event")

    # Walk the commit log in commit order.
    held: dict[str, int] = {}
    dispatched: dict[str, list[int]] = defaultdict(list)
    succeeded: dict[str, list[int]] = defaultdict(list)
    done: set[str] = set()
    for c in commits:
        sub, attempt, kind = c.get("subtask", ""), int(c.get("attempt", 0)), c["type"]
        if kind == "subtask.assigned":
            if sub in held:
                verdict.add("I2", f"{sub} attempt {attempt} dispatched while {held[sub]} held it")
            expected = (dispatched[sub][-1] + 1) if dispatched[sub] else 1
            if attempt != expected:
                verdict.add("I2", f"{sub} dispatched attempt {attempt}, expected {expected}")
            dispatched[sub].append(attempt)
            held[sub] = attempt
            missing = [d for d in plan.get(sub, []) if d not in done]
            if missing:
                verdict.add("I3", f"{sub} dispatched before {', '.join(missing)} committed")
        elif kind in ATTEMPT_ENDS and attempt:
            # A task's end cancels subtasks whether or not an attempt holds them.
            if held.get(sub) != attempt and kind != "subtask.cancelled":
                verdict.add("I2", f"{sub} attempt {attempt} ended ({kind}) without holding it")
            held.pop(sub, None)
            if kind == "subtask.succeeded":
                succeeded[sub].append(attempt)
                done.add(sub)
        elif kind == "subtask.running" and held.get(sub) != attempt:
            verdict.add("I2", f"{sub} attempt {attempt} started without holding the lease")

    # I4: each completion committed exactly once.
    for sub in plan:
        count = len(succeeded[sub])
        if count > 1 or (count != 1 and task_status == "SUCCEEDED"):
            verdict.add("I4", f"{sub} committed {count} times")

    # I2, second half: stale results never changed state.
    results = {(r["sub"], r["attempt"]): r["output"] for r in runs if r["kind"] == "result"}
    for sub, attempts in succeeded.items():
        if sub not in plan or not attempts:
            continue
        committed = attempts[-1]
        produced = results.get((sub, committed))
        if produced is not None and outputs.get(sub) != produced:
            verdict.add("I2", f"{sub}: stored {outputs.get(sub)!r}, attempt {committed} made "
                        f"{produced!r}")  # fmt: skip
        stale = [a for (s, a) in results if s == sub and a != committed]
        verdict.stats["stale_results"] += len(stale)
    # I3, seen from the workers: no attempt ran without being dispatched.
    for r in runs:
        if r["kind"] == "run" and r["attempt"] not in dispatched.get(r["sub"], []):
            verdict.add("I3", f"{r['sub']} attempt {r['attempt']} ran but was never dispatched")

    verdict.stats["subtasks"] = len(plan)
    verdict.stats["attempts_run"] = sum(1 for r in runs if r["kind"] == "run")
    for r in runs:
        if r["kind"] == "run":
            verdict.stats[f"runs_on_{r['worker']}"] += 1
    verdict.stats["retries"] = sum(1 for c in commits if c["type"] == "subtask.retrying")
    return verdict
