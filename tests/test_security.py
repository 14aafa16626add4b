"""Security over real TLS: tokens and roles, ownership, mutual TLS, limits and
rich errors. Certificates are minted per module with ``taskloom certs init``'s
code; the supervisor, the SDK and a worker process talk through them."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from taskloom.client import TaskloomClient
from taskloom.client.certs import Minted, init
from taskloom.client.settings import ClientSettings
from taskloom.core.auth import TokenTable, hash_token, token_metadata
from taskloom.core.errors import (
    InvalidArgument,
    PermissionDenied,
    PlanError,
    ResourceExhausted,
    SupervisorUnavailable,
    TaskNotFound,
    Unauthenticated,
    Unavailable,
)
from taskloom.core.localredis import LocalRedis, free_port
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from taskloom.v1 import tasks_pb2 as pb
from taskloom.v1 import tasks_pb2_grpc, workers_pb2_grpc
from taskloom.v1 import workers_pb2 as wpb
from taskloom.worker import Worker, WorkerSettings
from tests.conftest import REPO, Processes
from tests.fake_ollama import FakeOllama
from tests.helpers import eventually, plan, wait_status

TOKENS = {
    "alice": ("tl_alice-9f2c1e7b", "client"),
    "bob": ("tl_bob-41d0a6c3", "client"),
    "w1": ("tl_worker-7c55e012", "worker"),
    "w2": ("tl_worker-2b81f0d4", "worker"),
    "root": ("tl_root-e83b4f90", "admin"),
}
GATED = plan(("a", "gate", "wait"))


def tokens_entries() -> str:
    return "; ".join(f"{hash_token(t)} {name} {role}" for name, (t, role) in TOKENS.items())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Minted:
    return init(tmp_path_factory.mktemp("pki"))


def secured(settings: SupervisorSettings, pki: Minted, **changes: Any) -> SupervisorSettings:
    cert, key = pki.files["server"]
    return settings.model_copy(
        update={"tls_cert": cert, "tls_key": key, "tokens": tokens_entries(), **changes}
    )


@pytest.fixture
async def secure(supervisor_settings: SupervisorSettings, pki: Minted) -> AsyncIterator[Supervisor]:
    server = Supervisor(secured(supervisor_settings, pki, rate_limits="openai:*=60"))
    await server.start()
    yield server
    await server.stop(grace=0.5)


def connect(
    supervisor: Supervisor, pki: Minted, who: str | None, *, cert: str | None = None, **extra: Any
) -> TaskloomClient:
    files = {}
    if cert is not None:
        files = {"tls_cert": str(pki.files[cert][0]), "tls_key": str(pki.files[cert][1])}
    settings = ClientSettings.load(
        supervisor=supervisor.address,
        token=TOKENS[who][0] if who else "",
        tls_ca=str(pki.ca),
        **files,
        **extra,
    )
    return TaskloomClient(settings=settings)


def channel(supervisor: Supervisor, pki: Minted, cert: str | None = None) -> grpc.aio.Channel:
    key = chain = None
    if cert is not None:
        chain, key = (p.read_bytes() for p in pki.files[cert])
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), key, chain)
    return grpc.aio.secure_channel(supervisor.address, credentials)


# -- authentication and roles ---------------------------------------------------------


async def test_calls_without_a_valid_token_are_unauthenticated(
    secure: Supervisor, pki: Minted
) -> None:
    async with connect(secure, pki, None) as anonymous:
        with pytest.raises(Unauthenticated, match="needs a token"):
            await anonymous.submit("anything", plan=GATED)
        with pytest.raises(Unauthenticated):
            await anonymous.list()
    async with TaskloomClient(
        settings=ClientSettings.load(
            supervisor=secure.address, token="tl_not-a-real-token", tls_ca=str(pki.ca)
        )
    ) as forger:
        with pytest.raises(Unauthenticated, match="not valid"):
            await forger.get("0123456789ab01234567")
    # Health stays open for probes, which send no metadata.
    async with channel(secure, pki) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert secure.metrics.refused.labels("missing")._value.get() >= 2
    assert secure.metrics.refused.labels("invalid")._value.get() >= 1


async def test_each_role_reaches_only_its_own_service(secure: Supervisor, pki: Minted) -> None:
    async with connect(secure, pki, "w1") as worker_token:
        with pytest.raises(PermissionDenied, match="w1 has the worker role"):
            await worker_token.submit("forge a task", plan=GATED)
    async with channel(secure, pki) as ch:
        call = workers_pb2_grpc.WorkerServiceStub(ch).Connect(
            metadata=token_metadata(TOKENS["alice"][0])
        )
        # The refusal may end the stream before the hello is written (a busy
        # machine), so it may surface at the write or at the read.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.write(
                wpb.ConnectRequest(
                    hello=wpb.Hello(worker_id="spy", capabilities=["llm"], max_concurrency=1)
                )
            )
            await call.read()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The worker token may connect; the admin's may too.
        for who in ("w1", "root"):
            call = workers_pb2_grpc.WorkerServiceStub(ch).Connect(
                metadata=token_metadata(TOKENS[who][0])
            )
            await call.write(
                wpb.ConnectRequest(
                    hello=wpb.Hello(worker_id=f"id-{who}", capabilities=["x"], max_concurrency=1)
                )
            )
            first: Any = await call.read()
            assert first.HasField("welcome")
            call.cancel()
        # TakeRate is the workers' too; what they ask is checked.
        take = workers_pb2_grpc.WorkerServiceStub(ch).TakeRate
        request = wpb.TakeRateRequest(model="openai:gpt-4o", requests=1, tokens=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await take(request, metadata=token_metadata(TOKENS["alice"][0]))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        worker = token_metadata(TOKENS["w1"][0])
        assert (await take(request, metadata=worker)).wait.ToNanoseconds() == 0
        for bad, why in (
            (wpb.TakeRateRequest(model="acme:x", requests=1), "'acme:x' has no rate limit here"),
            (wpb.TakeRateRequest(model="openai:*", requests=5), "take 0 or 1 requests"),
            (
                wpb.TakeRateRequest(model="openai:*", pause=Duration(seconds=3600)),
                "a pause is 0 to 120 seconds",
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await take(bad, metadata=worker)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert why in (refused.value.details() or "")


async def test_another_principals_task_costs_one_small_read_not_the_task(
    secure: Supervisor, pki: Minted, redis_server: LocalRedis
) -> None:
    many = plan(*((f"s{i}", "gate", "x") for i in range(500)))
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    async with connect(secure, pki, "alice") as alice, connect(secure, pki, "bob") as bob:
        task_id = await alice.submit("large", plan=many)

        async def reads() -> tuple[int, int]:
            stats = await raw.info("commandstats")
            return tuple(  # type: ignore[return-value]
                int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("hgetall", "lrange")
            )

        before = await reads()
        with pytest.raises(TaskNotFound):
            await bob.get(task_id)
        assert await reads() == before  # the owner was checked first: no subtask was read
        assert len((await alice.get(task_id)).subtasks) == 500
        assert (await reads())[0] > before[0]
    await raw.aclose()


async def test_a_watch_the_client_cancels_ends_quietly(
    secure: Supervisor, pki: Minted, caplog: pytest.LogCaptureFixture
) -> None:
    async with connect(secure, pki, "alice") as alice:
        task_id = await alice.submit("watched", plan=GATED)
        seen = asyncio.Event()

        async def follow() -> None:
            async for _ in alice.watch(task_id):
                seen.set()

        following = asyncio.create_task(follow())
        await seen.wait()
        following.cancel()
        with pytest.raises(asyncio.CancelledError):
            await following
        # The server side of the stream ends too, and is collected.
        await alice.get(task_id)
        await asyncio.sleep(0.2)
        gc.collect()
        await asyncio.sleep(0.2)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


async def test_priority_is_brought_within_the_range_of_the_callers_role(
    secure: Supervisor, pki: Minted
) -> None:
    async with connect(secure, pki, "alice") as alice, connect(secure, pki, "root") as root:
        mine = await alice.get(await alice.submit("greedy", plan=GATED, priority=2**31 - 1))
        low = await alice.get(await alice.submit("modest", plan=GATED, priority=-(2**31)))
        ops = await root.get(await root.submit("urgent", plan=GATED, priority=2**31 - 1))
    assert (mine.options.priority, low.options.priority) == (100, -100)
    assert ops.options.priority == 10_000


async def test_tokens_expire_and_are_reloaded_and_a_revoked_workers_stream_is_closed(
    supervisor_settings: SupervisorSettings, pki: Minted, tmp_path: Path
) -> None:
    table = tmp_path / "tokens"

    def write(*names: str, expired: str = "") -> None:
        lines = [f"{hash_token(TOKENS[n][0])} {n} {TOKENS[n][1]}" for n in names]
        if expired:
            lines.append(
                f"{hash_token(TOKENS[expired][0])} {expired} client expires=2020-01-01T00:00Z"
            )
        table.write_text("\n".join(lines) + "\n")

    write("alice", "w1", "w2", expired="bob")
    cert, key = pki.files["server"]
    server = Supervisor(
        supervisor_settings.model_copy(
            update={"tls_cert": cert, "tls_key": key, "tokens_file": table}
        )
    )
    await server.start()
    try:
        async with connect(server, pki, "bob") as bob:
            with pytest.raises(Unauthenticated, match="expired at 2020-01-01 00:00:00Z"):
                await bob.list()
        async with connect(server, pki, "root") as root:
            with pytest.raises(Unauthenticated, match="not valid"):
                await root.list()
        async with channel(server, pki) as ch:
            stub = workers_pb2_grpc.WorkerServiceStub(ch)
            revoked: Any = stub.Connect(metadata=token_metadata(TOKENS["w1"][0]))
            kept: Any = stub.Connect(metadata=token_metadata(TOKENS["w2"][0]))
            for name, call in (("w1", revoked), ("w2", kept)):
                hello = wpb.Hello(worker_id=name, capabilities=["gate"], max_concurrency=1)
                await call.write(wpb.ConnectRequest(hello=hello))
                assert (await call.read()).HasField("welcome")
            # The operator adds root and revokes w1; the file is seen to change.
            write("alice", "w2", "root")
            async with connect(server, pki, "root") as root:

                async def admitted() -> bool:
                    try:
                        await root.list()
                    except Unauthenticated:
                        return False
                    return True

                assert await eventually(admitted, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as closed:
                while True:
                    await revoked.read()
            assert closed.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in (closed.value.details() or "")
            await kept.write(wpb.ConnectRequest(heartbeat=wpb.Heartbeat()))
            assert (await kept.read()).HasField("ack")  # a valid token's stream goes on
            kept.cancel()
            # A table that no longer parses leaves the tokens as they were.
            table.write_text("this is not a tokens table\n")
            server.reload_tokens()
            async with connect(server, pki, "alice") as alice:
                await alice.list()
    finally:
        await server.stop(grace=0.5)


async def test_a_token_file_keeps_the_token_off_the_command_line(
    secure: Supervisor, pki: Minted, tmp_path: Path
) -> None:
    env = {"TASKLOOM_SUPERVISOR": secure.address, "TASKLOOM_TLS_CA": str(pki.ca)}
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS["alice"][0] + "\n")
    listed = await asyncio.to_thread(run_cli, "tasks", "--token-file", str(token_file), env=env)
    assert listed.returncode == 0, listed.stderr
    missing = await asyncio.to_thread(
        run_cli, "tasks", "--token-file", str(tmp_path / "nothing"), env=env
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr, missing.stderr


async def test_a_token_limited_to_some_capabilities_uses_only_those(
    supervisor_settings: SupervisorSettings, pki: Minted, fake_ollama: FakeOllama
) -> None:
    carol, w3 = "tl_carol-5e0a77c2", "tl_worker-99a1c0de"
    limited = (
        f"{hash_token(carol)} carol client capabilities=echo,llm; "
        f"{hash_token(w3)} w3 worker capabilities=echo"
    )
    cert, key = pki.files["server"]
    server = Supervisor(
        supervisor_settings.model_copy(
            update={"tls_cert": cert, "tls_key": key, "tokens": f"{tokens_entries()}; {limited}"}
        )
    )
    await server.start()
    fake_ollama.responder = lambda call: json.dumps(
        {"subtasks": [{"id": "a", "title": "A", "instruction": "x", "capability": "echo",
                       "depends_on": []}]}
    )  # fmt: skip
    settings = ClientSettings.load(supervisor=server.address, token=carol, tls_ca=str(pki.ca))
    try:
        async with TaskloomClient(settings=settings) as client:
            with pytest.raises(PermissionDenied, match="carol may not use gate: its token allows"):
                await client.submit("gated", plan=plan(("a", "gate", "x")))
            await client.submit("echoed", plan=plan(("a", "echo", "x")))
            # The planner is offered only what carol may use.
            planned = await client.submit("plan it for me")
            await eventually(lambda: any(c.system or c.prompt for c in fake_ollama.calls))
            assert (await client.get(planned)).status != TaskStatus.FAILED
            offered = json.dumps([c.format for c in fake_ollama.calls]) + "".join(
                c.system + c.prompt for c in fake_ollama.calls
            )
            assert "echo" in offered and "gate" not in offered
        async with channel(server, pki) as ch:
            stub = workers_pb2_grpc.WorkerServiceStub(ch)
            for offered_caps, welcome in ((["echo", "gate"], False), (["echo"], True)):
                call: Any = stub.Connect(metadata=token_metadata(w3))
                await call.write(
                    wpb.ConnectRequest(
                        hello=wpb.Hello(
                            worker_id="w3", capabilities=offered_caps, max_concurrency=1
                        )
                    )
                )
                if welcome:
                    assert (await call.read()).HasField("welcome")
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call.read()
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert "may not offer gate" in (refused.value.details() or "")
                call.cancel()
    finally:
        await server.stop(grace=0.5)


def raw_grpc_call(
    address: str, path: str, headers: list[tuple[bytes, bytes]]
) -> dict[bytes, bytes]:
    """One call over plain HTTP/2 with whatever headers (no gRPC client sends
    a value that is not UTF-8); the response's grpc-status and grpc-message."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    host, port = address.rsplit(":", 1)
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config)
    found: dict[bytes, bytes] = {}
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        conn.initiate_connection()
        conn.send_headers(
            1,
            [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
             (b":authority", address.encode()), (b"content-type", b"application/grpc"),
             (b"te", b"trailers"), *headers],
        )  # fmt: skip
        conn.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65535)
            assert data, "the server closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    found |= {k: v for k, v in event.headers if k.startswith(b"grpc-")}
                if isinstance(event, h2.events.StreamEnded):
                    return found
            sock.sendall(conn.data_to_send())


async def test_a_token_that_is_not_utf8_never_reaches_the_log_and_floods_nothing(
    supervisor_settings: SupervisorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    server = Supervisor(supervisor_settings.model_copy(update={"tokens": tokens_entries()}))
    await server.start()
    try:
        bad = [(b"authorization", b"Bearer tl_alice-9f2c1e7b\xff")]
        for _ in range(50):
            answer = await asyncio.to_thread(
                raw_grpc_call, server.address, "/taskloom.v1.TaskService/ListTasks", bad
            )
            assert answer[b"grpc-status"] == b"16"  # UNAUTHENTICATED
    finally:
        await server.stop(grace=0.5)
    assert "tl_alice" not in caplog.text and "9f2c1e7b" not in caplog.text
    about = [r for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(about) == 1 and about[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_task_is_visible_only_to_its_owner_and_admins(
    secure: Supervisor, pki: Minted
) -> None:
    async with (
        connect(secure, pki, "alice") as alice,
        connect(secure, pki, "bob") as bob,
        connect(secure, pki, "root") as root,
    ):
        task_id = await alice.submit("alice's work", plan=GATED, idempotency_key="k1")
        assert (await alice.get(task_id)).owner == "alice"
        with pytest.raises(TaskNotFound):
            await bob.get(task_id)
        with pytest.raises(TaskNotFound):
            await bob.cancel(task_id)
        with pytest.raises(TaskNotFound):
            async for _ in bob.watch(task_id):
                pass
        # Waiting for the end of a task this supervisor is running reads no
        # owner from Redis; it is refused all the same.
        with pytest.raises(TaskNotFound):
            await bob.wait(task_id)
        assert [t.id for t in await bob.list()] == []
        # The same idempotency key is bob's own: a new task, not alice's.
        bobs = await bob.submit("bob's work", plan=GATED, idempotency_key="k1")
        assert bobs != task_id
        assert [t.id for t in await alice.list()] == [task_id]
        assert {t.id for t in await root.list()} >= {task_id, bobs}
        assert (await root.cancel(task_id)).status == TaskStatus.CANCELLED
        assert (await alice.get(task_id)).status == TaskStatus.CANCELLED


async def test_mutual_tls_refuses_a_peer_without_a_certificate(
    supervisor_settings: SupervisorSettings, pki: Minted
) -> None:
    server = Supervisor(secured(supervisor_settings, pki, tls_client_ca=pki.ca))
    await server.start()
    try:
        async with connect(server, pki, "alice", unavailable_grace=0) as without:
            with pytest.raises(SupervisorUnavailable):
                await without.list()
        async with connect(server, pki, "alice", cert="client") as holder:
            task_id = await holder.submit("with a certificate", plan=GATED)
            assert (await holder.get(task_id)).status == TaskStatus.RUNNING
    finally:
        await server.stop(grace=0.5)


async def test_a_worker_process_runs_tasks_over_mutual_tls_with_its_token(
    supervisor_settings: SupervisorSettings, pki: Minted, processes: Processes
) -> None:
    server = Supervisor(secured(supervisor_settings, pki, tls_client_ca=pki.ca))
    await server.start()
    try:
        cert, key = pki.files["worker"]
        processes.worker(
            server.address,
            capabilities="echo",
            env={
                "TASKLOOM_TOKEN": TOKENS["w1"][0],
                "TASKLOOM_TLS_CA": str(pki.ca),
                "TASKLOOM_TLS_CERT": str(cert),
                "TASKLOOM_TLS_KEY": str(key),
            },
        )
        async with connect(server, pki, "alice", cert="client") as alice:
            task_id = await alice.submit("echo", plan=plan(("a", "echo", "hello over mTLS")))
            task = await wait_status(alice, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
            assert task.status == TaskStatus.SUCCEEDED
            assert "hello over mTLS" in task.result
    finally:
        await server.stop(grace=0.5)


async def test_cached_outputs_stay_with_their_owner_unless_the_handler_shares_them(
    secure: Supervisor, pki: Minted, processes: Processes, fake_ollama: FakeOllama
) -> None:
    answers = iter(["for alice", "for bob"])
    fake_ollama.responder = lambda call: next(answers)
    processes.worker(
        secure.address,
        capabilities="llm,count",
        env={"TASKLOOM_TOKEN": TOKENS["w1"][0], "TASKLOOM_TLS_CA": str(pki.ca)},
    )
    asked = plan(("s1", "llm", "what is 2+2?"))
    counted = plan(("s1", "count", "one two three"))
    async with connect(secure, pki, "alice") as alice, connect(secure, pki, "bob") as bob:
        first = await alice.wait(await alice.submit("g", plan=asked))
        again = await alice.wait(await alice.submit("g", plan=asked))
        # Bob asks the very same: his answer is his own, not Alice's.
        bobs = await bob.wait(await bob.submit("g", plan=asked))
        assert (first.result, again.result, bobs.result) == ("for alice", "for alice", "for bob")
        assert [t.subtasks[0].cache_hit for t in (first, again, bobs)] == [False, True, False]
        # A handler declared cacheable="shared" is reused across owners.
        mine = await alice.wait(await alice.submit("c", plan=counted))
        theirs = await bob.wait(await bob.submit("c", plan=counted))
        assert mine.result == theirs.result and mine.result.startswith("3 words")
        assert [t.subtasks[0].cache_hit for t in (mine, theirs)] == [False, True]


async def test_a_worker_with_a_client_token_is_refused_and_says_why(
    secure: Supervisor, pki: Minted, processes: Processes, tmp_path: Path
) -> None:
    processes.worker(
        secure.address,
        name="impostor",
        capabilities="echo",
        env={"TASKLOOM_TOKEN": TOKENS["alice"][0], "TASKLOOM_TLS_CA": str(pki.ca)},
    )
    log = tmp_path / "impostor.log"
    await eventually(lambda: log.exists() and "refused this worker" in log.read_text(), timeout=30)
    # The supervisor's reason reaches the worker's log, not only the worker's own hint.
    assert "alice has the client role, which may not call Connect" in log.read_text()
    assert not secure.scheduler.sessions()


# -- limits ---------------------------------------------------------------------------


async def test_an_oversized_message_is_refused_and_the_server_keeps_serving(
    secure: Supervisor, pki: Minted
) -> None:
    async with connect(secure, pki, "alice") as alice:
        with pytest.raises(ResourceExhausted, match="TASKLOOM_MAX_REQUEST_BYTES"):
            await alice.submit("x" * (5 * 1024 * 1024), plan=GATED)
        task_id = await alice.submit("a normal goal", plan=GATED)
        assert (await alice.get(task_id)).status == TaskStatus.RUNNING


async def test_over_limit_goals_and_plans_name_the_field(
    supervisor_settings: SupervisorSettings, pki: Minted
) -> None:
    server = Supervisor(secured(supervisor_settings, pki, max_goal_chars=100, max_plan_subtasks=3))
    await server.start()
    try:
        async with connect(server, pki, "alice") as alice:
            with pytest.raises(InvalidArgument) as goal:
                await alice.submit("g" * 101, plan=GATED)
            assert goal.value.field == "goal"
            assert "TASKLOOM_MAX_GOAL_CHARS" in str(goal.value)
            big = plan(*[(f"s{i}", "echo", "x") for i in range(4)])
            with pytest.raises(PlanError) as too_big:
                await alice.submit("a big plan", plan=big)
            assert too_big.value.field == "plan.subtasks"
            with pytest.raises(InvalidArgument) as option:
                await alice.submit("bad option", plan=GATED, max_attempts=1000)
            assert option.value.field == "options.max_attempts"
        # The details are the standard ones, for any gRPC client.
        async with channel(server, pki) as ch:
            stub = tasks_pb2_grpc.TaskServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await stub.SubmitTask(
                    pb.SubmitTaskRequest(goal=" "),
                    metadata=token_metadata(TOKENS["alice"][0]),
                )
            assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(raw.value)
            bad = error_details_pb2.BadRequest()
            assert any(d.Unpack(bad) for d in status.details)
            assert bad.field_violations[0].field == "goal"
    finally:
        await server.stop(grace=0.5)


async def test_per_principal_limits_stop_one_client_without_touching_others(
    supervisor_settings: SupervisorSettings, pki: Minted
) -> None:
    server = Supervisor(
        secured(
            supervisor_settings,
            pki,
            submit_rate=0.01,
            submit_burst=4,
            max_tasks_in_flight=2,
            max_watches=1,
        )
    )
    await server.start()
    try:
        async with (
            connect(server, pki, "alice") as alice,
            connect(server, pki, "bob") as bob,
            connect(server, pki, "root") as root,
        ):
            first = await alice.submit("one", plan=GATED)
            await alice.submit("two", plan=GATED)
            with pytest.raises(ResourceExhausted, match="unfinished tasks") as in_flight:
                await alice.submit("three", plan=GATED)
            assert in_flight.value.subject == "max_tasks_in_flight"
            await alice.cancel(first)
            await alice.submit("three, now that one ended", plan=GATED)
            with pytest.raises(ResourceExhausted) as rate:
                await alice.submit("four", plan=GATED)
            assert rate.value.subject == "submit_rate"
            # Bob has his own allowance; the admin has none to run out of.
            bobs = await bob.submit("bob", plan=GATED)
            for n in range(5):
                await root.submit(f"admin {n}", plan=GATED)

            held = bob.watch(bobs)
            watching = asyncio.ensure_future(anext(held))
            await eventually(lambda: watching.done())
            with pytest.raises(ResourceExhausted) as watches:
                async for _ in bob.watch(bobs):
                    pass
            assert watches.value.subject == "max_watches"
            await held.aclose()
            # The stream is released when the watch ends.
            await eventually(lambda: not server.quotas._watches)
            second = bob.watch(bobs)
            assert (await anext(second)).type == "task.submitted"
            await second.aclose()
    finally:
        await server.stop(grace=0.5)


async def test_the_submit_rate_counts_subtasks_not_calls(
    supervisor_settings: SupervisorSettings, pki: Minted
) -> None:
    server = Supervisor(secured(supervisor_settings, pki, submit_rate=0.01, submit_burst=4))
    await server.start()
    try:
        async with connect(server, pki, "alice") as alice, connect(server, pki, "bob") as bob:
            three = plan(("a", "gate", "x"), ("b", "gate", "y"), ("c", "gate", "z"))
            await alice.submit("three", plan=three)  # 3 of the 4
            with pytest.raises(ResourceExhausted) as e:
                await alice.submit("two", plan=plan(("a", "gate", "x"), ("b", "gate", "y")))
            assert e.value.subject == "submit_rate"
            assert "more than 0.01 subtasks a second" in str(e.value)
            await alice.submit("one", plan=GATED)  # the one left
            # A plan larger than the burst goes when the allowance is full,
            # and leaves it in debt.
            six = plan(*((f"s{i}", "gate", "x") for i in range(6)))
            await bob.submit("six", plan=six)
            with pytest.raises(ResourceExhausted):
                await bob.submit("one", plan=GATED)
    finally:
        await server.stop(grace=0.5)


async def test_batches_keep_to_the_callers_own_tasks_and_allowance(
    supervisor_settings: SupervisorSettings, pki: Minted
) -> None:
    server = Supervisor(secured(supervisor_settings, pki, submit_rate=0.01, submit_burst=3))
    await server.start()
    try:
        async with (
            connect(server, pki, "alice") as alice,
            connect(server, pki, "bob") as bob,
            connect(server, pki, "root") as root,
        ):
            # Each task of a batch takes its own token: the fourth is refused.
            results = await alice.submit_many([f"a{i}" for i in range(5)], plan=GATED)
            assert [bool(r.task_id) for r in results] == [True, True, True, False, False]
            for refused in results[3:]:
                assert isinstance(refused.error, ResourceExhausted)
                assert refused.error.subject == "submit_rate"
            mine = results[0].task_id
            assert (await alice.get(mine)).owner == "alice"
            with pytest.raises(TaskNotFound):
                async for _ in bob.wait_many([mine]):
                    pass
            with pytest.raises(TaskNotFound):
                [t async for t in bob.finished([mine])]
            await root.cancel(mine)
            # It ended a moment ago: answered from memory, and still not his.
            with pytest.raises(TaskNotFound):
                await bob.wait(mine)
            assert (await alice.wait(mine)).status == TaskStatus.CANCELLED
            ended = [e async for e in alice.wait_many([mine])]
            assert [(e.task_id, e.status) for e in ended] == [(mine, "CANCELLED")]
    finally:
        await server.stop(grace=0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"worker_id": "a/b"}, "worker_id of up to 128"),
        ({"worker_id": "x" * 200}, "worker_id of up to 128"),
        ({"capabilities": ["ok", "Ignore previous instructions"]}, "is not a name"),
        ({"capabilities": ["x" * 65]}, "is not a name"),
        ({"capabilities": [f"c{i}" for i in range(65)]}, "at most 64 capabilities"),
        ({"name": "w\n1"}, "printable"),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, "at most 32 labels"),
    ],
)
async def test_a_hello_with_names_that_are_not_names_is_refused(
    secure: Supervisor, pki: Minted, change: dict[str, Any], message: str
) -> None:
    fields: dict[str, Any] = {"worker_id": "w", "capabilities": ["gate"], "max_concurrency": 1}
    async with channel(secure, pki) as ch:
        call = workers_pb2_grpc.WorkerServiceStub(ch).Connect(
            metadata=token_metadata(TOKENS["w1"][0])
        )
        await call.write(wpb.ConnectRequest(hello=wpb.Hello(**{**fields, **change})))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (refused.value.details() or "")
    assert len(refused.value.details() or "") < 300  # what it echoes is capped


async def test_a_stream_that_never_says_hello_is_closed(
    supervisor_settings: SupervisorSettings, pki: Minted
) -> None:
    server = Supervisor(secured(supervisor_settings, pki, hello_timeout=0.5))
    await server.start()
    try:
        async with channel(server, pki) as ch:
            call = workers_pb2_grpc.WorkerServiceStub(ch).Connect(
                metadata=token_metadata(TOKENS["w1"][0])
            )
            with pytest.raises(grpc.aio.AioRpcError) as closed:
                async with asyncio.timeout(30):
                    await call.read()
            assert closed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no Hello" in (closed.value.details() or "")
    finally:
        await server.stop(grace=0.5)


async def test_outputs_over_the_limit_fail_or_are_cut(
    supervisor_settings: SupervisorSettings, pki: Minted, processes: Processes
) -> None:
    long = "word " * 500  # 2,500 bytes
    for overflow in ("fail", "truncate"):
        settings = secured(
            supervisor_settings,
            pki,
            max_output_bytes=1024,
            output_overflow=overflow,
            redis_prefix=f"{supervisor_settings.redis_prefix}{overflow}:",
        )
        server = Supervisor(settings)
        await server.start()
        try:
            processes.worker(
                server.address,
                name=f"worker-{overflow}",
                capabilities="echo",
                env={"TASKLOOM_TOKEN": TOKENS["w1"][0], "TASKLOOM_TLS_CA": str(pki.ca)},
            )
            async with connect(server, pki, "alice") as alice:
                task_id = await alice.submit("long", plan=plan(("a", "echo", long)))
                task = await wait_status(alice, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
                sub = task.subtasks[0]
                if overflow == "fail":
                    assert task.status == TaskStatus.FAILED
                    assert "limit is 1,024" in sub.error
                    assert "TASKLOOM_OUTPUT_OVERFLOW=truncate" in sub.error
                else:
                    assert task.status == TaskStatus.SUCCEEDED
                    assert len(sub.output.encode()) <= 1024
                    assert "output cut" in sub.output
        finally:
            await server.stop(grace=0.5)
            processes.close()


async def test_a_hostile_worker_cannot_report_for_an_attempt_it_was_not_given(
    secure: Supervisor, pki: Minted
) -> None:
    async with connect(secure, pki, "alice") as alice, channel(secure, pki) as ch:
        metadata = token_metadata(TOKENS["w1"][0])
        honest = workers_pb2_grpc.WorkerServiceStub(ch).Connect(metadata=metadata)
        await honest.write(
            wpb.ConnectRequest(
                hello=wpb.Hello(worker_id="honest", capabilities=["gate"], max_concurrency=1)
            )
        )
        welcome: Any = await honest.read()
        assert welcome.HasField("welcome")
        task_id = await alice.submit("held", plan=GATED)
        assigned: Any = await honest.read()
        given = assigned.assign.assignments[0]
        ref = wpb.AttemptRef(
            task_id=given.task_id, subtask_id=given.subtask_id, attempt=given.attempt
        )
        hostile = workers_pb2_grpc.WorkerServiceStub(ch).Connect(metadata=metadata)
        await hostile.write(
            wpb.ConnectRequest(
                hello=wpb.Hello(worker_id="hostile", capabilities=["other"], max_concurrency=1)
            )
        )
        welcome = await hostile.read()
        assert welcome.HasField("welcome")
        await hostile.write(
            wpb.ConnectRequest(
                completed=wpb.Completed(results=[wpb.SubtaskResult(ref=ref, output="forged")])
            )
        )
        acked: Any = await hostile.read()
        assert acked.HasField("ack")  # stale reports are acknowledged, never errors
        task = await alice.get(task_id)
        assert task.status == TaskStatus.RUNNING
        assert task.subtasks[0].output == ""
        await honest.write(
            wpb.ConnectRequest(
                completed=wpb.Completed(results=[wpb.SubtaskResult(ref=ref, output="genuine")])
            )
        )
        task = await wait_status(alice, task_id, TaskStatus.SUCCEEDED)
        assert task.result == "genuine"
        honest.cancel()
        hostile.cancel()


async def test_a_worker_id_belongs_to_the_credentials_that_first_used_it(
    secure: Supervisor, pki: Minted
) -> None:
    # Another worker token tries to pass for a connected worker (same
    # worker_id, its attempt in flight), then, once that worker is gone, to
    # report for its attempt: neither works, and the honest worker's session
    # and lease are untouched.
    hello = wpb.Hello(worker_id="shared", capabilities=["gate"], max_concurrency=1)
    async with connect(secure, pki, "alice") as alice, channel(secure, pki) as ch:
        stub = workers_pb2_grpc.WorkerServiceStub(ch)
        honest: Any = stub.Connect(metadata=token_metadata(TOKENS["w1"][0]))
        await honest.write(wpb.ConnectRequest(hello=hello))
        assert (await honest.read()).HasField("welcome")
        task_id = await alice.submit("held", plan=GATED)
        given = (await honest.read()).assign.assignments[0]
        ref = wpb.AttemptRef(
            task_id=given.task_id, subtask_id=given.subtask_id, attempt=given.attempt
        )
        forged = wpb.ConnectRequest(
            completed=wpb.Completed(results=[wpb.SubtaskResult(ref=ref, output="forged")])
        )
        impostor: Any = stub.Connect(metadata=token_metadata(TOKENS["w2"][0]))
        stolen = wpb.Hello()
        stolen.CopyFrom(hello)
        stolen.in_flight.append(ref)
        await impostor.write(wpb.ConnectRequest(hello=stolen))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await impostor.read()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "worker_id" in (refused.value.details() or "")

        # The honest worker's stream is still its own: a heartbeat is answered.
        await honest.write(wpb.ConnectRequest(heartbeat=wpb.Heartbeat()))
        assert (await honest.read()).HasField("ack")

        # With the honest worker gone (a failover looks the same to the new
        # leader), the impostor is a worker of its own, holding nothing.
        honest.cancel()
        await eventually(
            lambda: (
                not secure.orchestrator
                or not secure.orchestrator.scheduler.held_elsewhere("shared", "w2/shared")
            )
        )
        impostor = stub.Connect(metadata=token_metadata(TOKENS["w2"][0]))
        await impostor.write(wpb.ConnectRequest(hello=stolen))
        assert (await impostor.read()).HasField("welcome")
        await impostor.write(forged)
        while not (await impostor.read()).HasField("ack"):
            pass  # it may first be told to drop the attempt it claimed
        task = await alice.get(task_id)
        assert task.status == TaskStatus.RUNNING and task.subtasks[0].output == ""
        impostor.cancel()


# -- the CLI ----------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskloom.client", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_cli_turns_refusals_into_one_line_and_a_distinct_exit_code(
    secure: Supervisor, pki: Minted
) -> None:
    env = {"TASKLOOM_SUPERVISOR": secure.address, "TASKLOOM_TLS_CA": str(pki.ca)}
    missing = await asyncio.to_thread(run_cli, "tasks", env=env)
    assert missing.returncode == 6
    assert missing.stderr.strip().count("\n") == 0
    assert "needs a token" in missing.stderr
    listed = await asyncio.to_thread(
        run_cli, "tasks", "--json", "--token", TOKENS["alice"][0], env=env
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout or "[]") == []
    denied = await asyncio.to_thread(
        run_cli, "tasks", env={**env, "TASKLOOM_TOKEN": TOKENS["w1"][0]}
    )
    assert denied.returncode == 6
    assert "worker role" in denied.stderr


def test_certs_init_and_tokens_add_make_a_working_setup(tmp_path: Path) -> None:
    made = run_cli("certs", "init", str(tmp_path / "pki"), "--host", "sup.example", env={})
    assert made.returncode == 0, made.stderr
    for name in ("ca.pem", "server.pem", "server-key.pem", "worker.pem", "client-key.pem"):
        assert (tmp_path / "pki" / name).exists()
    assert (tmp_path / "pki" / "server-key.pem").stat().st_mode & 0o077 == 0
    again = run_cli("certs", "init", str(tmp_path / "pki"), env={})
    assert again.returncode != 0 and "--force" in again.stderr
    tokens = tmp_path / "tokens"
    added = run_cli("tokens", "add", str(tokens), "carol", "--role", "worker", env={})
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token not in tokens.read_text()
    principal = TokenTable.load(tokens).lookup(token)
    assert principal is not None and (principal.name, principal.role) == ("carol", "worker")
    assert TokenTable.load(tokens).lookup(token + "x") is None


# -- tokens stay secret ---------------------------------------------------------------


async def test_tokens_never_appear_in_logs_spans_events_errors_or_redis(
    secure: Supervisor,
    pki: Minted,
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    redis_server: LocalRedis,
) -> None:
    caplog.set_level(logging.DEBUG)
    near_miss = TOKENS["alice"][0] + "x"
    errors: list[str] = []
    worker = Worker(
        WorkerSettings.load(
            supervisor=secure.address,
            capabilities="echo",
            name="leakcheck",
            token=TOKENS["w1"][0],
            tls_ca=str(pki.ca),
        )
    )
    impostor = Worker(
        WorkerSettings.load(
            supervisor=secure.address,
            capabilities="echo",
            name="impostor",
            token=TOKENS["bob"][0],
            tls_ca=str(pki.ca),
        )
    )
    serving = [asyncio.create_task(worker.serve()), asyncio.create_task(impostor.serve())]
    try:
        async with connect(secure, pki, "alice") as alice:
            task_id = await alice.submit("check for leaks", plan=plan(("a", "echo", "hi")))
            task = await wait_status(alice, task_id, TaskStatus.SUCCEEDED)
            events = [e async for e in alice.watch(task_id)]
            with pytest.raises(TaskNotFound) as hidden:
                async with connect(secure, pki, "bob") as bob:
                    await bob.get(task_id)
            errors.append(str(hidden.value))
            # Its end, just now, is answered from the supervisor's memory:
            # to its owner, not to bob.
            assert (await alice.wait(task_id)).status == TaskStatus.SUCCEEDED
            with pytest.raises(TaskNotFound):
                async with connect(secure, pki, "bob") as bob:
                    await bob.wait(task_id)
        for token in (near_miss, TOKENS["w1"][0], ""):
            settings = ClientSettings.load(
                supervisor=secure.address, token=token, tls_ca=str(pki.ca)
            )
            async with TaskloomClient(settings=settings) as client:
                with pytest.raises((Unauthenticated, PermissionDenied)) as refused:
                    await client.submit("nope", plan=GATED)
                errors.append(str(refused.value))
                errors.append(repr(settings))
        await eventually(lambda: "refused this worker" in caplog.text)
    finally:
        for w in (worker, impostor):
            await w.stop()
        await asyncio.gather(*serving, return_exceptions=True)
    assert task.status == TaskStatus.SUCCEEDED

    texts = [caplog.text, *errors]
    texts += [f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records]
    texts += [repr(e) for e in events]
    for span in spans.get_finished_spans():
        texts.append(span.to_json())
    texts += await redis_dump(redis_server, secure.settings.redis_prefix)
    # The run logged and traced what the check needs: refusals included.
    assert spans.get_finished_spans() and "refused /taskloom.v1" in caplog.text
    secrets = [near_miss, *(token for token, _ in TOKENS.values())]
    for secret in secrets:
        leaks = [text for text in texts if secret in text]
        assert not leaks, f"{secret} leaked: {leaks[0][:300]}"


async def redis_dump(redis_server: LocalRedis, prefix: str) -> list[str]:
    """Every value under the test's prefix, as text."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    out: list[str] = []
    try:
        async for key in client.scan_iter(match=f"{prefix}*"):
            kind = await client.type(key)
            if kind == "hash":
                out.append(json.dumps(await client.hgetall(key)))
            elif kind == "string":
                out.append(str(await client.get(key)))
            elif kind == "stream":
                out.append(json.dumps(await client.xrange(key)))
            elif kind == "zset":
                out.append(json.dumps(await client.zrange(key, 0, -1)))
            elif kind in ("list", "set"):
                read = client.lrange(key, 0, -1) if kind == "list" else client.smembers(key)
                out.append(json.dumps(sorted(await read)))
            out.append(key)
    finally:
        await client.aclose()
    return out


# -- listening and connections ----------------------------------------------------------


async def test_without_tokens_the_supervisor_keeps_to_loopback_unless_told(
    supervisor_settings: SupervisorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    open_wide = supervisor_settings.model_copy(update={"listen": "0.0.0.0:0"})
    guarded = Supervisor(open_wide)
    assert guarded.listen == "127.0.0.1:0"
    assert "NO TOKENS ARE CONFIGURED" in caplog.text
    await guarded.store.close()
    told = Supervisor(open_wide.model_copy(update={"insecure": True}))
    assert told.listen == "0.0.0.0:0"
    assert "INSECURE" in caplog.text
    await told.store.close()
    with_tokens = Supervisor(open_wide.model_copy(update={"tokens": tokens_entries()}))
    assert with_tokens.listen == "0.0.0.0:0"
    await with_tokens.store.close()


async def test_metrics_and_health_follow_the_grpc_port_to_loopback(
    supervisor_settings: SupervisorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    wide = supervisor_settings.model_copy(
        update={"listen": "0.0.0.0:0", "metrics_port": 0, "health_port": 0}
    )
    guarded = Supervisor(wide)
    await guarded.start()
    try:
        assert guarded.metrics_host == "127.0.0.1"
        assert "metrics and health listen on 127.0.0.1, not 0.0.0.0" in caplog.text
        assert f"listening on 127.0.0.1:{guarded.port}" in caplog.text
    finally:
        await guarded.stop(grace=0.5)
    told = Supervisor(wide.model_copy(update={"insecure": True}))
    await told.start()
    try:
        assert told.metrics_host == "0.0.0.0"
        # The start-up line names the address really bound.
        assert f"listening on 0.0.0.0:{told.port}" in caplog.text
    finally:
        await told.stop(grace=0.5)


def roleless_client_certificate(pki: Minted) -> tuple[Path, Path]:
    """A client certificate from the same CA that names no role."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key: Any = serialization.load_pem_private_key(
        (pki.directory / "ca-key.pem").read_bytes(), None
    )
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nobody")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = pki.directory / "nobody.pem", pki.directory / "nobody-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_with_mutual_tls_a_certificate_names_its_holder_and_one_without_a_role_gets_none(
    supervisor_settings: SupervisorSettings, pki: Minted
) -> None:
    from taskloom.client.certs import issue

    server_cert, server_key = pki.files["server"]
    settings = supervisor_settings.model_copy(
        update={"tls_cert": server_cert, "tls_key": server_key, "tls_client_ca": pki.ca}
    )
    server = Supervisor(settings)
    assert server.authenticated  # no tokens, yet every caller is named
    await server.start()
    held = {
        "alice": issue(pki.directory, "alice", role="client"),
        "bob": issue(pki.directory, "bob", role="client"),
        "worker": pki.files["worker"],
        "roleless": roleless_client_certificate(pki),
        "ca": (pki.ca, pki.directory / "ca-key.pem"),  # the CA's own key pair
        "server": pki.files["server"],
    }

    def as_(who: str) -> TaskloomClient:
        cert, key = held[who]
        return TaskloomClient(
            settings=ClientSettings.load(
                supervisor=server.address,
                tls_ca=str(pki.ca),
                tls_cert=str(cert),
                tls_key=str(key),
                unavailable_grace="0.5",
            )
        )

    try:
        async with as_("alice") as alice, as_("bob") as bob:
            task_id = await alice.submit("mine", plan=GATED)
            assert (await alice.get(task_id)).owner == "alice"
            with pytest.raises(TaskNotFound):
                await bob.get(task_id)
        for who in ("worker", "roleless"):
            async with as_(who) as other:
                with pytest.raises(PermissionDenied) as refused:
                    await other.list()
            expected = "role, which may not call" if who == "worker" else "names no taskloom role"
            assert expected in str(refused.value), (who, refused.value)
        for who in ("ca", "server"):
            # Certificates that are not for clients do not get through TLS.
            async with as_(who) as other:
                with pytest.raises((PermissionDenied, SupervisorUnavailable)):
                    await other.list()
        # A client's certificate does not open the worker stream.
        cert, key = (p.read_bytes() for p in held["alice"])
        credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), key, cert)
        async with grpc.aio.secure_channel(server.address, credentials) as ch:
            call: Any = workers_pb2_grpc.WorkerServiceStub(ch).Connect()
            await call.write(
                wpb.ConnectRequest(
                    hello=wpb.Hello(worker_id="w", capabilities=["gate"], max_concurrency=1)
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call.read()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(grace=0.5)


async def test_metrics_can_be_served_over_tls(
    supervisor_settings: SupervisorSettings, pki: Minted
) -> None:
    server = Supervisor(secured(supervisor_settings, pki, metrics_port=0, metrics_tls=True))
    await server.start()
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        url = f"https://localhost:{server.metrics_port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, context=context, timeout=10) as reply:
                return str(reply.read().decode())

        assert "taskloom_tasks_submitted_total" in await asyncio.to_thread(scrape)
        plain = f"http://localhost:{server.metrics_port}/metrics"
        with pytest.raises(OSError):
            await asyncio.to_thread(lambda: urllib.request.urlopen(plain, timeout=10).read())
    finally:
        await server.stop(grace=0.5)


async def test_workers_and_watchers_ride_through_connection_age_limits(
    supervisor_settings: SupervisorSettings, pki: Minted, processes: Processes
) -> None:
    """Connections are closed after max_connection_age (plus grace); workers
    reconnect and keep their attempts, watchers resume from their cursor."""
    server = Supervisor(
        secured(supervisor_settings, pki, max_connection_age=1.0, max_connection_age_grace=0.5)
    )
    await server.start()
    try:
        processes.worker(
            server.address,
            name="aging",
            capabilities="gate,echo",
            env={"TASKLOOM_TOKEN": TOKENS["w1"][0], "TASKLOOM_TLS_CA": str(pki.ca)},
        )
        async with connect(server, pki, "alice") as alice:
            task_id = await alice.submit(
                "outlive the connection", plan=plan(("a", "gate", "slow"), ("b", "echo", "x", "a"))
            )
            events = []

            async def follow() -> None:
                async for event in alice.watch(task_id):
                    events.append(event)

            following = asyncio.create_task(follow())
            marks = Path(processes.test_dir)
            await eventually(lambda: (marks / "started-a-1").exists())
            # Past several connection lifetimes, the attempt is still held.
            log = processes.tmp_path / "aging.log"
            await eventually(
                lambda: log.read_text().count("connected to supervisor") >= 3, timeout=30
            )
            (marks / "open-a").write_text("")
            task = await wait_status(alice, task_id, TaskStatus.SUCCEEDED, TaskStatus.FAILED)
            await asyncio.wait_for(following, 30)
        assert task.status == TaskStatus.SUCCEEDED
        assert [s.attempt for s in task.subtasks if s.id == "a"] == [1]
        ids = [e.id for e in events]
        assert len(ids) == len(set(ids)) and events[-1].type == "task.succeeded"
    finally:
        await server.stop(grace=0.5)


async def test_probes_get_plaintext_health_on_their_own_port_while_grpc_is_tls(
    supervisor_settings: SupervisorSettings, pki: Minted
) -> None:
    leader = Supervisor(secured(supervisor_settings, pki, health_port=0))
    await leader.start()
    standby = Supervisor(secured(supervisor_settings, pki, health_port=0))
    await standby.start()
    try:
        for server, ready in ((leader, True), (standby, False)):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                readiness = await stub.Check(health_pb2.HealthCheckRequest(service=""))
                liveness = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"))
                answers = await stub.Check(health_pb2.HealthCheckRequest(service="ready"))
                serving = health_pb2.HealthCheckResponse.SERVING
                assert (readiness.status == serving) is ready
                assert liveness.status == serving
                # Kubernetes' readiness: a standby answers (it redirects) too.
                assert answers.status == serving
                # Nothing but health on this port.
                with pytest.raises(grpc.aio.AioRpcError) as other:
                    await tasks_pb2_grpc.TaskServiceStub(ch).ListTasks(pb.ListTasksRequest())
                assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Given the standby alone, a client follows it to the leader over TLS:
        # the leader's certificate must carry the name the client asked for
        # ("localhost"), not the leader's bare address.
        settings = ClientSettings.load(
            supervisor=f"localhost:{standby.port}", token=TOKENS["alice"][0], tls_ca=str(pki.ca)
        )
        async with TaskloomClient(settings=settings) as alice:
            task_id = await alice.submit("via the standby", plan=plan(("a", "echo", "x")))
            assert (await alice.get(task_id)).goal == "via the standby"
    finally:
        await standby.stop(grace=0.5)
        await leader.stop(grace=0.5)


async def test_only_the_owner_or_an_admin_may_steer_a_task_and_never_a_worker(
    secure: Supervisor, pki: Minted
) -> None:
    async with (
        connect(secure, pki, "alice") as alice,
        connect(secure, pki, "bob") as bob,
        connect(secure, pki, "w1") as worker,
        connect(secure, pki, "root") as root,
    ):
        task_id = await alice.submit("mine", plan=plan(("a", "echo", "x")), approve_plan=True)
        await wait_status(alice, task_id, TaskStatus.AWAITING_APPROVAL)
        steering: list[Callable[[TaskloomClient], Awaitable[object]]] = [
            lambda c: c.approve(task_id),
            lambda c: c.reject(task_id, reason="no"),
            lambda c: c.retry(task_id, "a"),
            lambda c: c.skip(task_id, "a", output="x"),
            lambda c: c.pause(task_id),
            lambda c: c.resume(task_id),
        ]
        for step in steering:
            # To bob, alice's task does not exist; a worker may not steer at all.
            with pytest.raises(TaskNotFound):
                await step(bob)
            with pytest.raises(PermissionDenied, match="worker role"):
                await step(worker)
        assert (await alice.get(task_id)).status == TaskStatus.AWAITING_APPROVAL
        paused = await root.pause(task_id, reason="admin hold")
        assert paused.paused
        events = await secure.store.read_events(task_id, "0")
        assert [e.actor for e in events if e.type == "task.paused"] == ["root"]
        assert (await alice.approve(task_id)).status == TaskStatus.RUNNING


async def test_a_standby_relays_the_console_over_https_only_to_its_own_certificate(
    supervisor_settings: SupervisorSettings, pki: Minted, tmp_path: Path
) -> None:
    """The console relay carries a signed-in person's cookie: a standby sends
    it only to a leader that serves with the very certificate it serves with."""
    port = free_port()
    trust = ssl.create_default_context(cafile=str(pki.ca))

    async def sign_in_and_list(http: aiohttp.ClientSession) -> tuple[int, int]:
        there = f"https://127.0.0.2:{port}"
        async with http.post(
            f"{there}/api/session",
            json={"token": TOKENS["alice"][0]},
            headers={"X-Taskloom-Console": "1"},
            ssl=trust,
            server_hostname="localhost",
        ) as signed:
            pass
        async with http.get(f"{there}/api/tasks", ssl=trust, server_hostname="localhost") as r:
            return signed.status, r.status

    other = init(tmp_path / "other-pki")
    for leader_pki, statuses in ((pki, (200, 200)), (other, (503, 503))):
        leader = Supervisor(secured(supervisor_settings, leader_pki, console_port=port))
        await leader.start()
        standby = Supervisor(
            secured(supervisor_settings, pki, console_port=port, listen="127.0.0.2:0")
        )
        await standby.start()
        try:
            assert standby.orchestrator is None
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                assert await sign_in_and_list(http) == statuses, leader_pki.ca
        finally:
            await standby.stop(grace=0.5)
            await leader.stop(grace=0.5)


async def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(
    supervisor_settings: SupervisorSettings, pki: Minted, tmp_path: Path
) -> None:
    """Certificates come from files a Secret (or cert-manager) replaces: new
    gRPC connections and the console get the renewed one, and a half-written
    pair is ignored until it is whole."""
    renewed = init(tmp_path / "renewed")
    live = tmp_path / "live"
    live.mkdir()

    def install(cert: Path, key: Path) -> None:
        # As a Secret volume does it: each file replaced whole.
        for name, source in (("tls.crt", cert), ("tls.key", key)):
            fresh = live / f".{name}.new"
            fresh.write_bytes(source.read_bytes())
            os.replace(fresh, live / name)

    install(*pki.files["server"])
    port = free_port()
    settings = secured(supervisor_settings, pki, console_port=port).model_copy(
        update={"tls_cert": live / "tls.crt", "tls_key": live / "tls.key"}
    )
    server = Supervisor(settings)
    await server.start()

    async def grpc_trusts(ca: Path) -> bool:
        client = ClientSettings.load(
            supervisor=server.address, token=TOKENS["alice"][0], tls_ca=str(ca),
            unavailable_grace=0,
        )  # fmt: skip
        try:
            async with TaskloomClient(settings=client) as alice:
                await alice.list()
        except Unavailable:
            return False
        return True

    async def console_trusts(ca: Path) -> bool:
        trust = ssl.create_default_context(cafile=str(ca))
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"https://127.0.0.1:{port}/", ssl=trust) as page,
            ):
                return page.status == 200
        except aiohttp.ClientConnectorCertificateError:
            return False

    try:
        assert await grpc_trusts(pki.ca) and not await grpc_trusts(renewed.ca)
        assert await console_trusts(pki.ca)
        install(*renewed.files["server"])
        await eventually(lambda: grpc_trusts(renewed.ca), timeout=30)
        assert not await grpc_trusts(pki.ca)
        await eventually(lambda: console_trusts(renewed.ca), timeout=30)
        # A key that is not the certificate's (a renewal caught half-way) is not taken.
        (live / "tls.key").write_bytes(pki.files["server"][1].read_bytes())
        assert await grpc_trusts(renewed.ca)
    finally:
        await server.stop(grace=0.5)
