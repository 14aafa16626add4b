"""The console's HTTP side: pages, the JSON API, server-sent events, sign-in,
and bad requests from a browser, against a real supervisor."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from taskloom.client import TaskloomClient
from taskloom.client.settings import ClientSettings
from taskloom.core.auth import hash_token
from taskloom.core.localredis import free_port
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.helpers import eventually, plan, wait_status

HEADER = {"X-Taskloom-Console": "1"}
TOKENS = {"alice": "tl_alice_token", "bob": "tl_bob_token", "w": "tl_worker_token"}


@pytest.fixture
async def console(supervisor_settings: SupervisorSettings) -> AsyncIterator[Supervisor]:
    server = Supervisor(supervisor_settings.model_copy(update={"console_port": 0}))
    await server.start()
    yield server
    await server.stop(grace=0.5)


def url(server: Supervisor, path: str) -> str:
    assert server.console is not None
    return f"http://127.0.0.1:{server.console.port}{path}"


async def read_events(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """Every event of a server-sent event stream, up to its ``end``."""
    events: list[dict[str, Any]] = []
    kind = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            if kind == "end":
                return events
            events.append(json.loads(line[6:]))
            kind = ""
    return events


async def test_pages_and_files_come_with_a_strict_policy_and_their_types(
    console: Supervisor,
) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/tasks/0123456789abcdef"):
            async with http.get(url(console, path)) as page:
                assert page.status == 200 and page.content_type == "text/html"
                assert "script-src 'self'" in page.headers["Content-Security-Policy"]
                assert "'unsafe-inline'" not in page.headers["Content-Security-Policy"]
                assert page.headers["X-Content-Type-Options"] == "nosniff"
                assert '<script type="module" src="/static/console.js">' in await page.text()
        files = {"console.js": "text/javascript", "dag.js": "text/javascript",
                 "console.css": "text/css", "favicon.svg": "image/svg+xml"}  # fmt: skip
        for name, kind in files.items():
            async with http.get(url(console, f"/static/{name}")) as file:
                assert file.status == 200 and file.content_type == kind, name
        for bad in ("/static/index.html", "/static/..%2Fconsole.py", "/static/nope.js"):
            async with http.get(url(console, bad)) as missing:
                assert missing.status == 404, bad


async def test_without_tokens_the_console_is_the_local_admins_and_shows_a_task_live(
    console: Supervisor, processes: Processes, test_dir: Path
) -> None:
    processes.worker(console.address)
    async with TaskloomClient(console.address) as client, aiohttp.ClientSession() as http:
        task_id = await client.submit(
            "watch me", plan=plan(("a", "gate", "A"), ("b", "echo", "B", "a"))
        )
        async with http.get(url(console, "/api/session")) as me:
            assert await me.json() == {"name": "local", "role": "admin", "tokens": False}
        async with http.get(url(console, "/api/tasks?status=RUNNING")) as listed:
            tasks = (await listed.json())["tasks"]
            assert [t["id"] for t in tasks] == [task_id] and tasks[0]["total"] == 2
        async with http.get(url(console, f"/api/tasks/{task_id}")) as got:
            task = await got.json()
            assert [(s["id"], s["depends_on"]) for s in task["subtasks"]] == [
                ("a", []),
                ("b", ["a"]),
            ]
            assert "output" not in task["subtasks"][0]  # the graph stays small
        async with http.get(url(console, f"/api/tasks/{task_id}/events")) as stream:
            assert stream.content_type == "text/event-stream"
            (test_dir / "open-a").touch()
            events = await asyncio.wait_for(read_events(stream), 30)
        assert events[-1]["type"] == "task.succeeded"
        assert ("subtask.succeeded", "b") in [(e["type"], e["subtask_id"]) for e in events]
        # A broken stream resumes after the last event it delivered.
        cut = events[2]["id"]
        async with http.get(
            url(console, f"/api/tasks/{task_id}/events"), headers={"Last-Event-ID": cut}
        ) as again:
            assert [e["id"] for e in await read_events(again)] == [e["id"] for e in events[3:]]
        async with http.get(url(console, f"/api/tasks/{task_id}/subtasks/b")) as sub:
            b = await sub.json()
            assert b["output"] == "B" and b["inputs"] == [
                {"id": "a", "title": "A", "status": "SUCCEEDED", "output": "A", "cut": False}
            ]


async def test_actions_from_the_console_and_the_plan_editor(
    console: Supervisor, processes: Processes
) -> None:
    processes.worker(console.address)
    async with TaskloomClient(console.address) as client, aiohttp.ClientSession() as http:
        task_id = await client.submit("g", plan=plan(("a", "echo", "A")), approve_plan=True)
        await wait_status(client, task_id, TaskStatus.AWAITING_APPROVAL)
        async with http.get(url(console, f"/api/tasks/{task_id}/plan")) as got:
            document = await got.json()
        assert document["subtasks"][0]["instruction"] == "A"
        document["subtasks"][0]["depends_on"] = ["ghost"]
        async with http.post(
            url(console, "/api/plans/validate"), json={"plan": document}, headers=HEADER
        ) as checked:
            assert await checked.json() == {
                "ok": False,
                "violations": ["a depends on missing ghost"],
            }
        document["subtasks"][0]["depends_on"] = []
        document["subtasks"][0]["instruction"] = "edited"
        async with http.post(
            url(console, f"/api/tasks/{task_id}/approve"),
            json={"plan": document, "reason": "from the console"},
            headers=HEADER,
        ) as approved:
            assert approved.status == 200 and (await approved.json())["status"] == "RUNNING"
        done = await client.wait(task_id)
        assert done.result == "edited"


async def test_bad_requests_from_a_browser_get_clear_errors_and_change_nothing(
    console: Supervisor,
) -> None:
    async with TaskloomClient(console.address) as client, aiohttp.ClientSession() as http:
        task_id = await client.submit("g", plan=plan(("a", "echo", "A")), approve_plan=True)
        await wait_status(client, task_id, TaskStatus.AWAITING_APPROVAL)
        before = await console.store.read_events(task_id, "0")
        cases: list[tuple[str, str, dict[str, Any], Any, int, str]] = [
            ("POST", f"/api/tasks/{task_id}/approve", {}, {}, 403, "PermissionDenied"),
            ("POST", f"/api/tasks/{task_id}/explode", HEADER, {}, 404, "NotFound"),
            ("POST", "/api/tasks/ffffffffffffffffffff/approve", HEADER, {}, 404, "TaskNotFound"),
            ("GET", "/api/tasks/" + "x" * 5000, {}, None, 404, "TaskNotFound"),
            ("POST", f"/api/tasks/{task_id}/retry", HEADER, {"subtask": "a", "instruction": 7},
             400, "InvalidArgument"),
            ("POST", f"/api/tasks/{task_id}/retry", HEADER, {"subtask": "a"}, 409, "TaskFinished"),
            ("POST", f"/api/tasks/{task_id}/approve", HEADER, {"subtask": "zz"}, 400,
             "InvalidArgument"),
            ("POST", f"/api/tasks/{task_id}/approve", HEADER, {"plan": {"subtasks": 3}}, 400,
             "PlanError"),
            ("GET", "/api/tasks?status=NOPE", {}, None, 400, "InvalidArgument"),
            ("GET", f"/api/tasks/{task_id}/events?after=99999999999999999999-1", {}, None, 400,
             "InvalidArgument"),
        ]  # fmt: skip
        for method, path, headers, body, status, kind in cases:
            async with http.request(
                method, url(console, path), headers=headers, json=body
            ) as response:
                answer = await response.json()
                assert (response.status, answer["error"]["type"]) == (status, kind), path
                assert len(answer["error"]["message"]) < 400
        async with http.post(
            url(console, f"/api/tasks/{task_id}/approve"),
            data=b"{not json",
            headers={**HEADER, "Content-Type": "application/json"},
        ) as broken:
            assert broken.status == 400
        assert await console.store.read_events(task_id, "0") == before


@pytest.fixture
async def locked(
    supervisor_settings: SupervisorSettings, tmp_path: Path
) -> AsyncIterator[Supervisor]:
    table = tmp_path / "tokens"
    table.write_text(
        f"{hash_token(TOKENS['alice'])} alice client\n"
        f"{hash_token(TOKENS['bob'])} bob client\n"
        f"{hash_token(TOKENS['w'])} w1 worker\n"
    )
    settings = supervisor_settings.model_copy(update={"console_port": 0, "tokens_file": table})
    server = Supervisor(settings)
    await server.start()
    yield server
    await server.stop(grace=0.5)


async def test_with_tokens_a_person_signs_in_and_acts_as_that_token_does(
    locked: Supervisor,
) -> None:
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(url(locked, "/api/tasks")) as refused:
            assert refused.status == 401
            assert (await refused.json())["error"]["type"] == "Unauthenticated"
        for token, status in (("tl_not_a_token", 401), (TOKENS["w"], 403), ("", 400)):
            async with anonymous.post(
                url(locked, "/api/session"), json={"token": token}, headers=HEADER
            ) as failed:
                assert failed.status == status, token

    async def signed_in(name: str) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        async with session.post(
            url(locked, "/api/session"), json={"token": TOKENS[name]}, headers=HEADER
        ) as ok:
            assert ok.status == 200
            cookie = ok.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert TOKENS[name] not in str(ok.url)
        return session

    alice, bob = await signed_in("alice"), await signed_in("bob")
    try:
        settings = ClientSettings.load(supervisor=locked.address, token=TOKENS["alice"])
        async with TaskloomClient(settings=settings) as as_alice:
            task_id = await as_alice.submit(
                "alice's", plan=plan(("a", "echo", "A")), approve_plan=True
            )
        async with bob.get(url(locked, "/api/tasks")) as listed:
            assert (await listed.json())["tasks"] == []
        for method, path in (
            ("GET", f"/api/tasks/{task_id}"),
            ("GET", f"/api/tasks/{task_id}/events"),
            ("POST", f"/api/tasks/{task_id}/approve"),
            ("POST", f"/api/tasks/{task_id}/cancel"),
        ):
            async with bob.request(method, url(locked, path), headers=HEADER, json={}) as seen:
                assert seen.status == 404, path  # to bob, alice's task does not exist
        async with alice.get(url(locked, "/api/tasks")) as listed:
            assert [t["id"] for t in (await listed.json())["tasks"]] == [task_id]
        async with alice.post(
            url(locked, f"/api/tasks/{task_id}/reject"), json={"reason": "no"}, headers=HEADER
        ) as rejected:
            assert (await rejected.json())["status"] == "CANCELLED"
        events = await locked.store.read_events(task_id, "0")
        assert events[-1].actor == "alice"
        async with alice.delete(url(locked, "/api/session"), headers=HEADER):
            pass
        async with alice.get(url(locked, "/api/session")) as gone:
            assert gone.status == 401
    finally:
        await alice.close()
        await bob.close()


async def test_a_standbys_console_relays_the_api_to_the_leaders(
    supervisor_settings: SupervisorSettings, tmp_path: Path
) -> None:
    """Behind a Service that spreads connections over every supervisor, the
    console works wherever it lands: a standby passes the API on to the
    leader's console (same port, the leader's host), event stream included,
    and the leader acts as the signed-in person."""
    table = tmp_path / "tokens"
    table.write_text(f"{hash_token(TOKENS['alice'])} alice client\n")
    port = free_port()
    base = supervisor_settings.model_copy(update={"console_port": port, "tokens_file": table})
    leader = Supervisor(base)
    await leader.start()
    standby = Supervisor(
        base.model_copy(update={"listen": "127.0.0.2:0", "supervisor_id": "standby"})
    )
    await standby.start()
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        assert leader.orchestrator is not None and standby.orchestrator is None
        there = f"http://127.0.0.2:{port}"
        async with http.post(
            f"{there}/api/session", json={"token": TOKENS["alice"]}, headers=HEADER
        ) as ok:
            assert ok.status == 200, await ok.text()
            assert "HttpOnly" in ok.headers["Set-Cookie"]
        settings = ClientSettings.load(supervisor=leader.address, token=TOKENS["alice"])
        async with TaskloomClient(settings=settings) as as_alice:
            task_id = await as_alice.submit(
                "approve me", plan=plan(("a", "echo", "A")), approve_plan=True
            )
            await wait_status(as_alice, task_id, TaskStatus.AWAITING_APPROVAL)
        async with http.get(f"{there}/api/tasks") as listed:
            assert listed.status == 200
            assert "script-src 'self'" in listed.headers["Content-Security-Policy"]
            assert [t["id"] for t in (await listed.json())["tasks"]] == [task_id]
        async with http.post(
            f"{there}/api/tasks/{task_id}/reject", json={"reason": "no"}, headers=HEADER
        ) as rejected:
            assert (await rejected.json())["status"] == "CANCELLED"
        async with http.get(f"{there}/api/tasks/{task_id}/events") as stream:
            assert stream.content_type == "text/event-stream"
            events = await asyncio.wait_for(read_events(stream), 30)
        assert events[-1]["type"] == "task.cancelled" and events[-1]["actor"] == "alice"
        # A change still needs the console's header, on the standby too.
        async with http.post(f"{there}/api/tasks/{task_id}/cancel", json={}) as refused:
            assert refused.status == 403
        # The standby's own pages are served locally.
        async with http.get(f"{there}/") as page:
            assert page.status == 200 and page.content_type == "text/html"
        # Once it leads itself, it serves the API itself, to the same cookie.
        await leader.stop(grace=0.5)
        await eventually(lambda: standby.orchestrator is not None, timeout=30)
        async with http.get(f"{there}/api/tasks") as after:
            assert [t["id"] for t in (await after.json())["tasks"]] == [task_id]
    finally:
        await http.close()
        await standby.stop(grace=0.5)
        await leader.stop(grace=0.5)
