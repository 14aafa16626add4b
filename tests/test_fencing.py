"""A worker cut off from the supervisor stops its attempts once their leases
lapse (self-fencing), so two attempts of one subtask never run at once.
Real supervisor and worker processes; the leader is frozen with SIGSTOP."""

from __future__ import annotations

import signal
from pathlib import Path

from taskloom.client import TaskloomClient
from taskloom.core.localredis import free_port
from taskloom.core.model import TaskStatus
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.helpers import eventually, plan, wait_status


def ledger(test_dir: Path) -> list[tuple[str, int, float, str]]:
    """(what, attempt, when, worker) for every line the ledger handler wrote."""
    path = test_dir / "ledger"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        what, _, attempt, when, who = line.split()
        rows.append((what, int(attempt), float(when), who))
    return rows


async def test_a_worker_cut_off_stops_its_attempt_before_another_worker_starts_it(
    supervisor_settings: SupervisorSettings, processes: Processes, test_dir: Path
) -> None:
    settings = supervisor_settings.model_copy(update={"leader_ttl": 2.0})
    leader_address = f"127.0.0.1:{free_port()}"
    standby_address = f"127.0.0.1:{free_port()}"
    leader = await processes.supervisor(settings, listen=leader_address, name="leader")
    await processes.supervisor(settings, listen=standby_address, name="standby", standby=True)
    # w1 knows only the leader: frozen, it cannot go elsewhere. w2 knows only
    # the standby, which sends it to the leader while there is one; it starts
    # once w1 holds the attempt, and comes back to the standby when the
    # leader freezes (keepalive), to get the attempt once the standby leads.
    processes.worker(leader_address, name="w1", capabilities="ledger")

    async with TaskloomClient(f"{leader_address},{standby_address}") as client:
        task_id = await client.submit("once at a time", plan=plan(("job", "ledger", "12")))
        await eventually(lambda: ledger(test_dir), timeout=30)
        processes.worker(standby_address, name="w2", capabilities="ledger")
        await eventually(lambda: "connected to supervisor" in processes.log("w2"), timeout=30)
        leader.send_signal(signal.SIGSTOP)
        try:
            # The standby leads, restores the lease, lets it lapse and gives
            # the attempt to w2; w1, which hears nothing, has stopped first.
            task = await wait_status(client, task_id, TaskStatus.SUCCEEDED, timeout=90)
        finally:
            leader.send_signal(signal.SIGCONT)
    rows = ledger(test_dir)
    first = [r for r in rows if r[1] == 1]
    second = [r for r in rows if r[1] == 2]
    assert [r[0] for r in first] == ["start", "stop"] and first[0][3] == "w1", rows
    assert [r[0] for r in second] == ["start", "end"] and second[0][3] == "w2", rows
    assert first[1][2] < second[0][2], f"attempts overlapped: {rows}"
    assert "lease valid: True" in task.result
    assert "stopping" in processes.log("w1") and "runs elsewhere now" in processes.log("w1")
