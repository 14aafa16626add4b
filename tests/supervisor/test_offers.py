"""Offers: free worker slots reserved for the subtasks a write makes READY.

Pure bookkeeping of the scheduler, so no Redis: the store is never called."""

from __future__ import annotations

from typing import cast

from taskloom.core.model import Assignment, AttemptRef, PlannedSubtask, WorkerInfo
from taskloom.supervisor.outcomes import Handed, ReadyItem
from taskloom.supervisor.scheduler import Lease, Scheduler
from taskloom.supervisor.store import Store


def worker(name: str, slots: int, capabilities: str = "echo") -> WorkerInfo:
    return WorkerInfo(name, name, frozenset(capabilities.split(",")), slots)


def scheduler() -> Scheduler:
    return Scheduler(cast(Store, None), lease_ttl=10.0)


async def test_an_offer_spreads_over_the_least_loaded_workers_and_take_frees_the_rest() -> None:
    s = scheduler()
    one, _ = s.connect(worker("one", 2))
    two, _ = s.connect(worker("two", 8))

    offer = s.offer({"echo": 6, "llm": 3})
    assert {sess.info.name: n for sess, n in offer.workers["echo"]} == {"one": 2, "two": 3}
    assert "llm" not in offer.workers  # nobody offers it
    assert (one.free, two.free) == (0, 5)
    assert offer.slots() == {"echo": [("one", "one", "", 2), ("two", "two", "", 3)]}

    # The write assigned one subtask to "two": that one is leased, the rest freed.
    item = ReadyItem("t1", "s1", "echo")
    sent = Assignment("t1", "s1", 1, "echo", "", "x", "g")
    s.take(offer, [Handed(item, 1, sent)])
    assert (one.free, two.free) == (2, 7)
    assert s.holder(sent.ref) is two
    assert two.outbox.get_nowait().assignments == (sent,)  # type: ignore[union-attr]


async def test_nothing_is_offered_for_a_capability_with_subtasks_waiting() -> None:
    s = scheduler()
    s.connect(worker("one", 4, "echo,llm"))
    # Queued subtasks go first: a write must not overtake them.
    s.enqueue([ReadyItem("t1", "s1", "echo")])
    assert s.offer({"echo": 1}).workers == {}
    assert s.offer({"echo": 1, "llm": 1}).workers.keys() == {"llm"}


async def test_a_commit_is_offered_slots_only_for_what_its_tasks_have_waiting() -> None:
    s = scheduler()
    s.connect(worker("one", 100, "echo,llm,search"))
    s.set_graph(
        "graph",
        [
            PlannedSubtask("a", "", "x", "search"),
            PlannedSubtask("b", "", "x", "llm", ("a",)),
        ],
    )
    refs = [AttemptRef("graph", "a", 1), AttemptRef("flat", "x", 1)]
    # Only llm waits for anything; 2 results: 2 * 2 + 16 slots at most.
    assert {c: n for c, ((_, n),) in s.offer_for(refs).workers.items()} == {"llm": 20}
    # A task without dependencies unlocks nothing: no offer, no payload.
    assert s.offer_for([AttemptRef("flat", "y", 1)]).workers == {}
    s.forget_task("graph")
    assert s.offer_for(refs).workers == {}


async def test_a_commit_may_assign_as_many_of_a_limited_task_as_its_results_free() -> None:
    s = scheduler()
    s.connect(worker("one", 10, "echo"))
    s.set_task_limit("t", 2)
    s.set_graph("t", [PlannedSubtask("c", "", "x", "echo", ("a", "b"))])
    running = [Assignment("t", sub, 1, "echo", "", "x", "g") for sub in ("a", "b")]
    s.take(
        s.offer({"echo": 2}),
        [Handed(ReadyItem("t", a.subtask_id, "echo"), 0, a) for a in running],
    )
    # Both slots of the task are taken; committing one result frees one.
    assert s.offer_for([running[0].ref]).limits == {"t": 1}


async def test_an_idle_session_is_never_reaped_and_its_silence_counts_from_its_first_work() -> None:
    now = [0.0]
    s = Scheduler(cast(Store, None), lease_ttl=10.0, clock=lambda: now[0])
    expired: list[AttemptRef] = []

    async def on_expired(leases: list[Lease]) -> None:
        expired.extend(lease.ref for lease in leases)

    s.on_expired = on_expired
    idle, _ = s.connect(worker("idle", 4))
    now[0] = 1_000.0  # a hundred TTLs without a word: it holds nothing, so it stays
    await s.reap()
    assert s.sessions() == [idle] and not idle.closed

    # Given work, it has one TTL from then to be heard from.
    item = ReadyItem("t1", "s1", "echo")
    sent = Assignment("t1", "s1", 1, "echo", "", "x", "g")
    s.take(s.offer({"echo": 1}), [Handed(item, 0, sent)])
    now[0] += 9.0
    await s.reap()
    assert not idle.closed and s.holds(sent.ref)
    now[0] += 2.0
    await s.reap()
    # Closed, and the lease it held expired with its silence, in the same round.
    assert idle.closed and s.sessions() == []
    assert expired == [sent.ref]


async def test_a_session_whose_reports_are_being_written_is_not_silent() -> None:
    """While its reports wait for Redis, nothing more is read from a worker,
    so its silence is ours: it is not closed, and the end of the write counts
    as hearing from it."""
    now = [0.0]
    s = Scheduler(cast(Store, None), lease_ttl=10.0, clock=lambda: now[0])
    busy, _ = s.connect(worker("busy", 4))
    item = ReadyItem("t1", "s1", "echo")
    sent = Assignment("t1", "s1", 1, "echo", "", "x", "g")
    s.take(s.offer({"echo": 1}), [Handed(item, 0, sent)])
    busy.writing += 1
    now[0] += 60.0
    await s.reap()
    assert not busy.closed and s.holds(sent.ref)
    busy.writing -= 1
    s.heard_from(busy)
    now[0] += 9.0
    await s.reap()
    assert not busy.closed
    now[0] += 2.0
    await s.reap()
    assert busy.closed and s.sessions() == []
