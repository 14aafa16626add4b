"""The Redis store on a real Redis: atomic transitions, stale reports, indexes, expiry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from taskloom.core.errors import InvalidArgument, StoreUnavailable, TaskNotFound
from taskloom.core.localredis import LocalRedis
from taskloom.core.model import (
    AttemptRef,
    ContextMode,
    EventType,
    Plan,
    PlannedSubtask,
    ProgressUpdate,
    SubtaskFailure,
    SubtaskResult,
    SubtaskStatus,
    TaskOptions,
    TaskStatus,
)
from taskloom.core.plan import finalize
from taskloom.supervisor.outcomes import ReadyItem
from taskloom.supervisor.store import Store

RETENTION = 3600.0


@pytest.fixture
async def store(redis_server: LocalRedis, prefix: str) -> AsyncIterator[Store]:
    s = Store(redis_server.url, prefix=prefix, retention=RETENTION)
    await s.connect()
    yield s
    await s.close()


@pytest.fixture
async def raw(redis_server: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield r
    await r.aclose()


def diamond() -> Plan:
    return Plan(
        subtasks=(
            PlannedSubtask("a", "A", "first", "echo"),
            PlannedSubtask("b", "B", "left", "echo", ("a",)),
            PlannedSubtask("c", "C", "right", "llm", ("a",)),
            PlannedSubtask("d", "D", "join", "echo", ("b", "c")),
        )
    )


async def start(
    store: Store, plan: Plan | None = None, **kw: object
) -> tuple[str, list[ReadyItem]]:
    graph, result_from = finalize(plan or diamond(), synthesize=False)
    task_id, created, outcome = await store.create_task(
        goal="g",
        options=TaskOptions(),
        plan=graph,
        result_from=result_from,
        **kw,  # type: ignore[arg-type]
    )
    assert created
    return task_id, outcome.ready


async def run(store: Store, item: ReadyItem, output: str = "out") -> AttemptRef:
    (assignment,), _ = await store.assign([(item, "wid", "w", "")])
    assert assignment is not None
    outcome = await store.complete([SubtaskResult(assignment.ref, output)])
    assert outcome.committed == [True]
    return assignment.ref


async def test_completion_unlocks_dependents_only_when_all_their_dependencies_succeeded(
    store: Store,
) -> None:
    task_id, ready = await start(store)
    assert [(r.subtask_id, r.capability) for r in ready] == [("a", "echo")]

    (a,), _ = await store.assign([(ready[0], "wid", "w1", "")])
    assert a is not None and a.attempt == 1 and a.goal == "g" and a.inputs == ()
    outcome = await store.complete([SubtaskResult(a.ref, "A-out")])
    assert sorted((r.subtask_id, r.capability) for r in outcome.ready) == [
        ("b", "echo"),
        ("c", "llm"),
    ]
    b_item, c_item = sorted(outcome.ready, key=lambda r: r.subtask_id)

    await run(store, b_item, "B-out")
    task = await store.get_task(task_id)
    assert {s.id: s.status for s in task.subtasks}["d"] == SubtaskStatus.PENDING

    (c,), _ = await store.assign([(c_item, "wid", "w2", "")])
    assert c is not None and [(i.subtask_id, i.output) for i in c.inputs] == [("a", "A-out")]
    outcome = await store.complete([SubtaskResult(c.ref, "C-out")])
    assert [r.subtask_id for r in outcome.ready] == ["d"]

    (d,), _ = await store.assign([(outcome.ready[0], "wid", "w1", "")])
    assert d is not None
    assert [(i.subtask_id, i.title, i.output) for i in d.inputs] == [
        ("b", "B", "B-out"),
        ("c", "C", "C-out"),
    ]
    outcome = await store.complete([SubtaskResult(d.ref, "D-out")])
    assert outcome.finished == [task_id]
    # The write that ended the task returns its terminal event, as logged.
    last = (await store.read_events(task_id, ""))[-1]
    assert outcome.ended == {task_id: last} and last.type == "task.succeeded"
    task = await store.get_task(task_id)
    assert (task.status, task.result, task.subtasks_succeeded) == (TaskStatus.SUCCEEDED, "D-out", 4)


async def test_one_commit_of_results_from_several_tasks_ends_each_that_finished_once(
    store: Store,
) -> None:
    pair = Plan(
        subtasks=(PlannedSubtask("x", "X", "1", "echo"), PlannedSubtask("y", "Y", "2", "echo"))
    )
    done_id, done_ready = await start(store, pair)
    open_id, open_ready = await start(store, pair)
    assignments, _ = await store.assign(
        [(item, "wid", "w", "") for item in [*done_ready, open_ready[0]]]
    )
    outcome = await store.complete(
        [SubtaskResult(a.ref, f"out-{a.subtask_id}") for a in assignments if a is not None]
    )
    assert outcome.committed == [True, True, True]
    assert outcome.finished == [done_id] and outcome.finished_status == ["SUCCEEDED"]
    done, still_open = await store.get_task(done_id), await store.get_task(open_id)
    assert (done.status, done.subtasks_succeeded) == (TaskStatus.SUCCEEDED, 2)
    assert (still_open.status, still_open.subtasks_succeeded) == (TaskStatus.RUNNING, 1)
    events = [e.type for e in await store.read_events(done_id, "")]
    assert events.count("subtask.succeeded") == 2 and events.count("task.succeeded") == 1
    assert events[-1] == "task.succeeded"
    # The same results again are stale: nothing is counted twice.
    again = await store.complete(
        [SubtaskResult(a.ref, "again") for a in assignments if a is not None]
    )
    assert again.committed == [False, False, False] and again.finished == []
    assert (await store.get_task(open_id)).subtasks_succeeded == 1


async def test_a_new_plan_goes_straight_to_the_workers_offered(
    store: Store, raw: aioredis.Redis, prefix: str
) -> None:
    steps = Plan(
        (
            PlannedSubtask("a", "A", "x", "echo"),
            PlannedSubtask("b", "B", "y", "echo"),
            PlannedSubtask("c", "C", "z", "llm"),
            PlannedSubtask("d", "D", "w", "echo", ("a",)),
        )
    )
    graph, result_from = finalize(steps, synthesize=False)
    offer = {"echo": [("id1", "one", "", 1), ("id2", "two", "", 5)]}
    task_id, _, outcome = await store.create_task(
        goal="g", options=TaskOptions(), plan=graph, result_from=result_from, offer=offer
    )

    # One subtask per worker in turn, as far as its slots go; no slot for llm.
    handed = {h.item.subtask_id: h for h in outcome.handed}
    assert {s: (h.worker, h.assignment.attempt) for s, h in handed.items()} == {
        "a": (0, 1),
        "b": (1, 1),
    }
    assert handed["b"].assignment.goal == "g" and handed["b"].assignment.instruction == "y"
    assert [(r.subtask_id, r.capability) for r in outcome.ready] == [("c", "llm")]
    task = await store.get_task(task_id)
    assert {s.id: (s.status, s.worker) for s in task.subtasks} == {
        "a": (SubtaskStatus.ASSIGNED, "one"),
        "b": (SubtaskStatus.ASSIGNED, "two"),
        "c": (SubtaskStatus.READY, ""),
        "d": (SubtaskStatus.PENDING, ""),
    }
    # Nothing lost on the way: a handed subtask completes like any other.
    done = await store.complete([SubtaskResult(handed["a"].assignment.ref, "A-out")])
    assert done.committed == [True] and [r.subtask_id for r in done.ready] == ["d"]


async def test_an_assignment_handed_out_by_the_create_step_is_the_one_redis_would_give(
    store: Store,
) -> None:
    # The create step hands out what it has just written without reading it
    # back; the assign step reads everything from Redis. Both must agree.
    steps = Plan(
        (
            PlannedSubtask(
                "a", "Title A", "do a", "echo", params={"k": "v"}, max_attempts=2, timeout=7.5
            ),
        )
    )
    graph, result_from = finalize(steps, synthesize=False)
    options = TaskOptions(stall_timeout=30.0, context_tokens=512, context=ContextMode.SUMMARIZE)
    trace = {"traceparent": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"}
    offer = {"echo": [("id1", "one", "", 1)]}
    handed_id, _, handed = await store.create_task(
        goal="the goal",
        options=options,
        plan=graph,
        result_from=result_from,
        offer=offer,
        trace=trace,
    )
    queued_id, _, queued = await store.create_task(
        goal="the goal", options=options, plan=graph, result_from=result_from, trace=trace
    )
    [assigned], _ = await store.assign([(queued.ready[0], "id1", "one", "")])
    [first] = handed.handed
    assert assigned is not None and first.assignment.task_id == handed_id
    assert replace(first.assignment, task_id=queued_id, deadline=None) == replace(
        assigned, deadline=None
    )
    assert assigned.params == {"k": "v"} and assigned.timeout == 7.5
    assert assigned.context == ContextMode.SUMMARIZE and assigned.trace_context == trace
    for task_id in (handed_id, queued_id):
        [event] = [
            e for e in await store.read_events(task_id, "0") if e.type == EventType.SUBTASK_ASSIGNED
        ]
        assert event.trace_id == "0123456789abcdef0123456789abcdef"


async def test_a_new_plan_hands_out_no_more_than_its_max_parallel(store: Store) -> None:
    steps = Plan(tuple(PlannedSubtask(f"s{i}", "", "x", "echo") for i in range(4)))
    graph, result_from = finalize(steps, synthesize=False)
    _, _, outcome = await store.create_task(
        goal="g",
        options=TaskOptions(max_parallel=2),
        plan=graph,
        result_from=result_from,
        offer={"echo": [("id1", "one", "", 10)]},
    )
    assert len(outcome.handed) == 2 and len(outcome.ready) == 2


async def test_a_commit_hands_the_dependents_it_unlocks_to_the_workers_offered(
    store: Store,
) -> None:
    task_id, (item,) = await start(store)
    (a,), _ = await store.assign([(item, "wid", "w1", "")])
    assert a is not None
    outcome = await store.complete(
        [SubtaskResult(a.ref, "A-out")], offer={"echo": [("wid", "w1", "", 1)]}
    )
    # b (echo) is assigned in the same step, with its input; c (llm) waits.
    ((b),) = outcome.handed
    assert (b.item.subtask_id, b.worker, b.assignment.attempt) == ("b", 0, 1)
    assert [(i.subtask_id, i.output) for i in b.assignment.inputs] == [("a", "A-out")]
    assert [r.subtask_id for r in outcome.ready] == ["c"]

    (c,), _ = await store.assign([(outcome.ready[0], "wid", "w1", "")])
    assert c is not None
    # A task at its limit gets nothing handed out: d stays READY.
    await store.complete([SubtaskResult(b.assignment.ref, "B-out")])
    last = await store.complete(
        [SubtaskResult(c.ref, "C-out")],
        offer={"echo": [("wid", "w1", "", 4)]},
        limits={task_id: 0},
    )
    assert last.handed == [] and [r.subtask_id for r in last.ready] == ["d"]


async def test_reports_from_an_older_attempt_are_discarded(store: Store) -> None:
    task_id, (item,) = await start(store, Plan((PlannedSubtask("a", "A", "x", "echo"),)))
    (first,), _ = await store.assign([(item, "wid", "slow", "")])
    assert first is not None
    outcome = await store.fail([SubtaskFailure(first.ref, "lost", retryable=True)])
    assert outcome.committed == [True] and outcome.ready[0].failed_attempt == 1
    (second,), _ = await store.assign([(outcome.ready[0], "wid2", "fast", "")])
    assert second is not None and second.attempt == 2

    # The slow worker comes back from a partition with attempt 1.
    assert await store.start([first.ref]) == [False]
    assert await store.progress([ProgressUpdate(first.ref, "50%")]) == [False]
    stale = await store.complete([SubtaskResult(first.ref, "old")])
    assert stale.committed == [False] and stale.finished == []
    assert (await store.fail([SubtaskFailure(first.ref, "x", False)])).committed == [False]

    assert await store.start([second.ref]) == [True]
    fresh = await store.complete([SubtaskResult(second.ref, "new")])
    assert fresh.committed == [True] and fresh.finished == [task_id]
    task = await store.get_task(task_id)
    assert (task.result, task.subtasks[0].attempt, task.subtasks[0].worker) == ("new", 2, "fast")


async def test_a_subtask_queued_twice_is_assigned_once(store: Store) -> None:
    _, (item,) = await start(store, Plan((PlannedSubtask("a", "A", "x", "echo"),)))
    (first, second), _ = await store.assign([(item, "w1", "w1", ""), (item, "w2", "w2", "")])
    assert first is not None and second is None


async def test_every_transition_is_logged_in_order_with_its_state(store: Store) -> None:
    task_id, (item,) = await start(store, Plan((PlannedSubtask("a", "A", "x", "echo"),)))
    (a,), _ = await store.assign([(item, "wid", "w1", "")])
    assert a is not None
    await store.start([a.ref])
    await store.progress([ProgressUpdate(a.ref, "halfway")])
    await store.complete([SubtaskResult(a.ref, "done")])
    events = await store.read_events(task_id, "")
    assert [(e.type, e.subtask_id, e.status) for e in events] == [
        ("task.submitted", "", "PLANNING"),
        ("plan.created", "", "RUNNING"),
        ("subtask.ready", "a", "READY"),
        ("subtask.assigned", "a", "ASSIGNED"),
        ("subtask.running", "a", "RUNNING"),
        ("subtask.progress", "a", "RUNNING"),
        ("subtask.succeeded", "a", "SUCCEEDED"),
        ("task.succeeded", "", "SUCCEEDED"),
    ]
    assert events[5].message == "halfway" and events[4].worker == "w1" and events[4].attempt == 1
    assert await store.read_events(task_id, events[3].id) == events[4:]
    stream = store.keys.events(task_id)
    assert await store.read_streams({stream: events[-1].id}, block_ms=10) == {}
    assert await store.read_streams({stream: events[3].id}, block_ms=10) == {stream: events[-1].id}


async def test_a_finished_task_expires_after_the_retention_period(
    store: Store, raw: aioredis.Redis, prefix: str
) -> None:
    task_id, ready = await start(store, Plan((PlannedSubtask("a", "A", "x", "echo"),)))
    await run(store, ready[0])
    keys = [k async for k in raw.scan_iter(f"{prefix}task:{task_id}*")]
    assert len(keys) == 4
    for key in keys:
        assert 0 < await raw.ttl(key) <= RETENTION
    assert not await raw.zscore(store.keys.active_index, task_id)
    assert await raw.zscore(store.keys.finished_index, task_id)
    assert await store.trim_indexes(now=10**10) == 1
    assert not await raw.zscore(store.keys.tasks_index, task_id)


async def test_every_key_lives_under_the_prefix(
    store: Store, raw: aioredis.Redis, prefix: str
) -> None:
    await start(store, idempotency_key="k")
    await store.create_task(goal="planning", options=TaskOptions(), plan=None)
    keys = [k async for k in raw.scan_iter(f"{prefix}*")]
    assert len(keys) >= 9
    assert {k.removeprefix(prefix).split(":")[0] for k in keys} <= {
        "task", "tasks", "active", "finished", "idem"
    }  # fmt: skip


async def test_the_same_idempotency_key_returns_the_same_task(store: Store) -> None:
    first, created, outcome = await store.create_task(
        goal="g", options=TaskOptions(), plan=None, idempotency_key="order-42"
    )
    again, created_again, _ = await store.create_task(
        goal="other", options=TaskOptions(), plan=None, idempotency_key="order-42"
    )
    other, _, _ = await store.create_task(
        goal="g", options=TaskOptions(), plan=None, idempotency_key="order-43"
    )
    assert (created, created_again, outcome.ready) == (True, False, [])
    assert again == first != other
    assert (await store.get_task(again)).goal == "g"


async def test_cancel_and_planning_failure_end_only_the_states_they_expect(store: Store) -> None:
    task_id, (item,) = await start(store)
    (a,), _ = await store.assign([(item, "wid", "w1", "")])
    assert a is not None
    found, ended = await store.finish(
        task_id,
        TaskStatus.CANCELLED,
        "stop",
        EventType.TASK_CANCELLED,
        expected=[TaskStatus.RUNNING],
    )
    assert (found, ended.finished, ended.held) == (TaskStatus.RUNNING, [task_id], [a.ref])
    assert ended.finished_status == [TaskStatus.CANCELLED]
    assert ended.ended[task_id].type == EventType.TASK_CANCELLED
    task = await store.get_task(task_id)
    assert {s.status for s in task.subtasks} == {SubtaskStatus.CANCELLED}
    assert (await store.complete([SubtaskResult(a.ref, "late")])).committed == [False]
    found, ended = await store.finish(
        task_id, TaskStatus.FAILED, "x", EventType.TASK_FAILED, expected=[TaskStatus.PLANNING]
    )
    assert (found, ended.finished) == (TaskStatus.CANCELLED, [])
    found, ended = await store.finish(
        "0000", TaskStatus.FAILED, "x", EventType.TASK_FAILED, expected=[TaskStatus.PLANNING]
    )
    assert (found, ended.finished) == (None, [])
    # A plan arriving for a task that ended while it was planned is dropped.
    planning, _, _ = await store.create_task(goal="g", options=TaskOptions(), plan=None)
    await store.finish(
        planning,
        TaskStatus.CANCELLED,
        "x",
        EventType.TASK_CANCELLED,
        expected=[TaskStatus.PLANNING],
    )
    assert await store.set_plan(planning, diamond(), result_from=["d"], priority=0) is None
    assert not await store.note(planning, TaskStatus.PLANNING, EventType.PLAN_REJECTED, "late")


async def test_listing_pages_newest_first_and_filters_by_state(store: Store) -> None:
    ids = []
    for _ in range(7):
        task_id, _, _ = await store.create_task(goal="g", options=TaskOptions(), plan=None)
        ids.append(task_id)
    await store.finish(
        ids[2], TaskStatus.CANCELLED, "x", EventType.TASK_CANCELLED, expected=[TaskStatus.PLANNING]
    )
    seen, token = [], ""
    while True:
        page, token = await store.list_tasks(page_size=3, page_token=token)
        seen += [t.id for t in page]
        if not token:
            break
    assert seen == ids[::-1]
    cancelled, token = await store.list_tasks(statuses=[TaskStatus.CANCELLED], page_size=5)
    assert [t.id for t in cancelled] == [ids[2]] and token == ""
    with pytest.raises(InvalidArgument, match="page_token"):
        await store.list_tasks(page_token="garbage!")


async def test_recovery_reads_unfinished_tasks_with_their_subtasks(store: Store) -> None:
    task_id, (item,) = await start(store)
    (a,), _ = await store.assign([(item, "wid-1", "w1", "")])
    assert a is not None
    planning, _, _ = await store.create_task(goal="later", options=TaskOptions(), plan=None)
    recovered = {t.task_id: t for t in await store.load_active()}
    assert set(recovered) == {task_id, planning}
    assert recovered[planning].status == TaskStatus.PLANNING
    subs = {s.subtask_id: s for s in recovered[task_id].subtasks}
    assert (subs["a"].status, subs["a"].attempt, subs["a"].worker_id, subs["a"].worker) == (
        SubtaskStatus.ASSIGNED,
        1,
        "wid-1",
        "w1",
    )
    assert subs["d"].status == SubtaskStatus.PENDING


async def test_unknown_task_ids_are_not_found_and_never_reach_a_key(store: Store) -> None:
    for task_id in ("ffffffff", "../etc", "a:b", "x" * 100, ""):
        with pytest.raises(TaskNotFound):
            await store.get_task(task_id)
        assert await store.task_status(task_id) is None


async def test_an_unreachable_redis_is_a_clear_store_unavailable(tmp_path: Path) -> None:
    redis = LocalRedis(tmp_path / "redis")
    redis.start()
    store = Store(redis.url, prefix="p:", socket_timeout=2.0)
    await store.connect()
    task_id, _, _ = await store.create_task(goal="g", options=TaskOptions(), plan=None)
    redis.kill()
    with pytest.raises(StoreUnavailable, match=rf"Redis at {redis.url} is unavailable"):
        await store.get_task(task_id)
    # The same server comes back (AOF on): the store works again, data intact.
    with LocalRedis(tmp_path / "redis", port=redis.port):
        assert (await store.get_task(task_id)).goal == "g"
        await store.close()


async def test_attempts_lost_with_their_worker_do_not_use_up_max_attempts(store: Store) -> None:
    only = Plan((PlannedSubtask("a", "A", "x", "echo", max_attempts=1),))
    task_id, _, _ = await store.create_task(
        goal="g", options=TaskOptions(), plan=only, result_from=["a"]
    )
    item = ReadyItem(task_id, "a", "echo")
    for attempt in (1, 2, 3):
        (assigned,), _ = await store.assign([(item, "w1", "w1", "")])
        assert assigned is not None and assigned.attempt == attempt
        lost = await store.fail([SubtaskFailure(assigned.ref, "worker w1 stopped answering",
                                                counts=False)])  # fmt: skip
        assert [r.subtask_id for r in lost.ready] == ["a"] and not lost.finished

    (assigned,), _ = await store.assign([(item, "w2", "w2", "")])
    assert assigned is not None
    outcome = await store.fail([SubtaskFailure(assigned.ref, "boom")])
    assert outcome.finished == [task_id]
    task = await store.get_task(task_id)
    assert task.error == "subtask a (A) failed after 1 attempt(s): boom"
    messages = [
        e.message for e in await store.read_events(task_id, "") if e.type == "subtask.retrying"
    ]
    assert messages[0] == (
        "attempt 1 lost: worker w1 stopped answering; running it again "
        "(this does not use up one of its 1 attempts)"
    )


async def test_a_loop_of_store_calls_stops_when_it_is_cancelled(store: Store) -> None:
    """redis-py finishes a command whose caller was cancelled and returns
    normally; without the store giving the cancellation back, a loop of store
    calls (a leadership or deadline loop) would never stop."""

    async def forever() -> None:
        while True:
            await store.load_active()

    for trial in range(20):
        loop = asyncio.create_task(forever())
        await asyncio.sleep(0.002 * (trial % 5 + 1))
        loop.cancel()
        done, _ = await asyncio.wait([loop], timeout=5)
        assert done, f"trial {trial}: the loop kept running after cancel()"
        assert loop.cancelled()


async def test_every_hash_field_written_is_one_records_lists(
    store: Store, raw: aioredis.Redis, prefix: str
) -> None:
    from taskloom.core.model import Usage
    from taskloom.supervisor import records

    # A task through most transitions: run, progress, fail and retry, cache,
    # usage, a cancelled subtask, a replan mark, the end; and a cancelled one.
    task_id, ready = await start(store, cache_ttl=60.0, owner="alice", max_in_flight=5)
    (a,), _ = await store.assign([(ready[0], "wid", "w", "fp")])
    assert a is not None
    await store.start([a.ref], "wid")
    await store.progress([ProgressUpdate(a.ref, "half way", "text")], "wid")
    await store.fail([SubtaskFailure(a.ref, "boom", usage=Usage(1, 2, "m", 0.1, 1))], "wid")
    (again,), _ = await store.assign([(ReadyItem(task_id, "a", "echo"), "wid", "w", "fp")])
    assert again is not None
    outcome = await store.complete([SubtaskResult(again.ref, "A", Usage(3, 4, "m", 0.2, 1))])
    for item in outcome.ready:
        await run(store, item)
    await store.cancel_subtask(task_id, "d", "enough")
    planning, _, _ = await store.create_task(goal="g", options=TaskOptions(), plan=None)
    await store.spend(planning, Usage(5, 6, "m", 0.3, 1))
    await store.finish(
        planning,
        TaskStatus.CANCELLED,
        "x",
        EventType.TASK_CANCELLED,
        expected=[TaskStatus.PLANNING],
    )
    seen_tasks = seen_subtasks = 0
    async for key in raw.scan_iter(match=f"{prefix}task:*"):
        kind = await raw.type(key)
        if key.endswith(":events"):
            entries: Any = await raw.xrange(key)
            for _, fields in entries:
                # What a person did names them too.
                assert tuple(fields)[: len(records.EVENT_FIELDS)] == records.EVENT_FIELDS, key
                assert set(fields) - set(records.EVENT_FIELDS) <= {"actor"}, key
        elif ":sub:" in key:
            seen_subtasks += 1
            assert set(await raw.hkeys(key)) <= records.SUBTASK_FIELDS, key
        elif kind == "hash":
            seen_tasks += 1
            assert set(await raw.hkeys(key)) <= records.TASK_FIELDS, key
    assert seen_tasks == 2 and seen_subtasks == 4
