"""Runs a cluster of real processes, injects faults on a schedule, and records
the history the checker reads.

One run: its own Redis (AOF, ``appendfsync always``, so whatever a client
was told is on disk), one or two supervisors and three workers as
processes, a scripted Ollama, and a goal the scripted model plans into a
layered graph of 200+ subtasks. While the task runs, faults fire at their
times: SIGKILL or SIGTERM a worker (a replacement starts), SIGKILL the
leading supervisor (a standby takes over, or it restarts), SIGKILL Redis
(it restarts from its AOF), SIGKILL the Redis primary of a replicated Redis
(Sentinel promotes a replica; the run then uses a primary, two replicas and
three sentinels), cut a worker's network namespace off and heal it, or slow a
worker's link by 2 s. Meanwhile a user submits, approves and cancels small
tasks (``users``). Then the task's commit log, the workers' records and the
faults are written to ``history.jsonl`` and checked, and so is every task the
user was told was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from taskloom.client import TaskloomClient
from taskloom.client.local import wait_serving
from taskloom.core.errors import ConfigError, Unavailable
from taskloom.core.localredis import LocalRedis, free_port
from taskloom.core.model import Task
from taskloom.supervisor.records import decode_archive
from tests.chaos.checker import Verdict, check
from tests.chaos.users import Users
from tests.fake_ollama import ChatCall, FakeOllama
from tests.sentinel import ReplicatedRedis

REPO = Path(__file__).resolve().parents[2]
PREFIX = "chaos:"
FAULTS = (
    "kill_worker",
    "term_worker",
    "kill_leader_standby",
    "kill_leader_restart",
    "freeze_leader",
    "kill_redis",
    "freeze_redis",
    "partition",
    "latency",
    "kill_primary",
)
SINGLE_REDIS = ("kill_redis", "freeze_redis")
"""Faults of the single Redis, not drawn with ``kill_primary`` (a replicated one)."""


def layered_plan(seed: int, layers: int = 8, width: int = 25) -> dict[str, Any]:
    """``layers x width`` chaos subtasks, each depending on 1-3 of the layer before."""
    rng = random.Random(seed)
    subtasks = []
    for layer in range(layers):
        for i in range(width):
            deps = (
                sorted({f"l{layer - 1}n{rng.randrange(width)}" for _ in range(rng.randint(1, 3))})
                if layer
                else []
            )
            subtasks.append(
                {
                    "id": f"l{layer}n{i}",
                    "title": f"step {layer}.{i}",
                    "instruction": "work",
                    "capability": "chaos",
                    "depends_on": deps,
                }
            )
    return {"subtasks": subtasks}


# -- network faults ----------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why a worker cannot be put in a network namespace here, or None."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces cannot be created here: {probe.stderr.strip()}"
    return None


class NetNamespace:
    """A network namespace joined to the host by a veth pair; ``cut()`` takes the
    host end down (packets are dropped, no reset is sent: a partition)."""

    def __init__(self, index: int) -> None:
        tag = f"{os.getpid() % 10000}{index}"
        self.name = f"tlchaos{tag}"
        self.host_if = f"tlh{tag}"
        self.ns_if = f"tln{tag}"
        subnet = 100 + (os.getpid() + index) % 150
        self.host_ip = f"10.231.{subnet}.1"
        self.ns_ip = f"10.231.{subnet}.2"

    def _ip(self, *args: str, inside: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.name] if inside else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)

    def create(self) -> None:
        self.destroy()
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if, inside=True)
        self._ip("link", "set", self.ns_if, "up", inside=True)
        self._ip("link", "set", "lo", "up", inside=True)

    def cut(self) -> None:
        self._ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        self._ip("link", "set", self.host_if, "up")

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class DelayProxy:
    """A TCP proxy that holds every chunk ``delay`` seconds in each direction."""

    def __init__(self, target: str, delay: float) -> None:
        self.target_host, _, port = target.rpartition(":")
        self.target_port = int(port)
        self.delay = delay
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DelayProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result()
        return self

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        # asyncio logs a connection callback that ends cancelled; at stop() it
        # is, and that is no news.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(
                self._pipe(reader, up_writer),
                self._pipe(up_reader, writer),
                return_exceptions=True,
            )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not chunk:
                    writer.close()
                    return
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((time.monotonic() + self.delay, chunk))
                if not chunk:
                    break
            await sender
        finally:
            sender.cancel()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in self._writers:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


# -- the cluster ---------------------------------------------------------------------


@dataclass
class Member:
    name: str
    process: subprocess.Popen[bytes]
    address: str = ""


@dataclass
class Cluster:
    root: Path
    ollama: FakeOllama
    lease_ttl: float = 2.0
    leader_ttl: float = 1.5
    listen_host: str = "127.0.0.1"
    replicated: bool = False
    """A primary, two replicas and three sentinels instead of one Redis."""
    redis: LocalRedis = field(init=False)
    sentinel: ReplicatedRedis | None = field(init=False, default=None)
    supervisors: dict[str, Member] = field(default_factory=dict)
    workers: dict[str, Member] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)
    special: set[str] = field(default_factory=set)
    """Workers a scenario needs (behind a namespace or a proxy): never the victims."""
    _stopped: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _count: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "records").mkdir(exist_ok=True)
        self.redis = LocalRedis(self.root / "redis", appendfsync="always")
        if self.replicated:
            self.sentinel = ReplicatedRedis(self.root / "replicated")

    @property
    def redis_url(self) -> str:
        return self.sentinel.url if self.sentinel is not None else self.redis.url

    def redis_client(self) -> Any:
        """A client of the (current) primary, for the harness's own reads."""
        if self.sentinel is None:
            return redis.Redis.from_url(self.redis.url, decode_responses=True, socket_timeout=2)
        port = self.sentinel.ports[self.sentinel.primary()]
        return redis.Redis(port=port, decode_responses=True, socket_timeout=2)

    # processes

    def _spawn(self, name: str, args: list[str], prefix: list[str] | None = None) -> Member:
        log = (self.root / f"{name}.log").open("ab")
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OLLAMA_HOST": self.ollama.url,
            "TASKLOOM_MODEL": "llama3.2",
            "TASKLOOM_REDIS_URL": self.redis_url,
            "TASKLOOM_REDIS_PREFIX": PREFIX,
            "TASKLOOM_HEARTBEAT_INTERVAL": "0.3",
            # Finished tasks are compacted during the faults, not after the run.
            "TASKLOOM_COMPACT_AFTER": "1",
            "TASKLOOM_LEASE_TTL": str(self.lease_ttl),
            "TASKLOOM_LEADER_TTL": str(self.leader_ttl),
            "TASKLOOM_RETRY_BACKOFF": "0.05",
            "TASKLOOM_CAPABILITIES": "chaos,llm",
            "TASKLOOM_MAX_LLM_PLAN_SUBTASKS": "500",
            "TASKLOOM_SHUTDOWN_GRACE": "1",
            "TASKLOOM_DRAIN_TIMEOUT": "1",
            "TASKLOOM_CHAOS_DIR": str(self.root / "records"),
            "TASKLOOM_NAME": name,
            "TASKLOOM_SUPERVISOR_ID": name,
            "TASKLOOM_LOG_LEVEL": "INFO",
        }
        process = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "taskloom.client", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return Member(name, process)

    def start_redis(self) -> None:
        if self.sentinel is not None:
            self.sentinel.start()
        else:
            self.redis.start()

    async def start_supervisor(self, name: str, *, port: int = 0, standby: bool = False) -> None:
        fixed = port
        for _ in range(3):
            port = fixed or free_port()
            args = ["supervisor", "--listen", f"{self.listen_host}:{port}"]
            if self.listen_host != "127.0.0.1":
                args.append("--insecure")  # reached from the test's network namespace
            member = self._spawn(name, args)
            member.address = f"127.0.0.1:{port}"
            self.supervisors[name] = member
            try:
                await asyncio.to_thread(
                    wait_serving, member.address, 30.0, member.process, standby=standby
                )
                return
            except ConfigError:
                log = (self.root / f"{name}.log").read_text(errors="replace")
                # A free port another process took in the meantime: pick another.
                if fixed or "cannot listen on" not in log:
                    raise

    def addresses(self, host: str = "127.0.0.1") -> str:
        return ",".join(f"{host}:{m.address.rpartition(':')[2]}" for m in self.supervisors.values())

    def start_worker(
        self,
        *,
        addresses: str | None = None,
        netns: NetNamespace | None = None,
        capabilities: str = "chaos,llm",
        special: bool = False,
    ) -> str:
        self._count += 1
        name = f"w{self._count}"
        if special:
            self.special.add(name)
        args = ["worker", "--supervisor", addresses or self.addresses()]
        args += ["--capabilities", capabilities, "--concurrency", "8", "--name", name]
        args += ["--app", "tests.chaos.handlers:registry"]
        self.workers[name] = self._spawn(name, args, netns.command() if netns else None)
        return name

    async def wait_connected(self, timeout: float = 30.0) -> None:
        """Until every worker has logged that a supervisor welcomed it."""
        deadline = time.monotonic() + timeout
        for name in self.workers:
            log = self.root / f"{name}.log"
            while "connected to supervisor" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker {name} did not connect: {log.read_text()}")
                await asyncio.sleep(0.05)

    def fault(self, kind: str, **detail: Any) -> None:
        self.faults.append({"source": "fault", "kind": kind, "time": time.time(), **detail})

    def signal(self, member: Member, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(member.process.pid, sig)
        self._stopped.append(member.process)

    def leader(self) -> Member | None:
        # Not for ever: Redis may be frozen (then no leader is known).
        try:
            client = self.redis_client()
        except (redis.RedisError, StopIteration):
            return None
        try:
            token = client.get(PREFIX + "leader") or ""
        except redis.RedisError:
            return None
        finally:
            client.close()
        holder = token.partition("/")[2].partition("@")[0]
        return self.supervisors.get(holder)

    def close(self) -> None:
        for member in [*self.workers.values(), *self.supervisors.values()]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(member.process.pid, signal.SIGKILL)
            member.process.wait()
        for process in self._stopped:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                # A SIGTERMed process must exit by itself; say so, then clean up.
                print(f"process {process.pid} ignored SIGTERM for 15 s", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.redis.stop()
        if self.sentinel is not None:
            self.sentinel.stop()

    # the task

    async def submit(self, goal: str) -> str:
        return await self._retry(lambda c: c.submit(goal, idempotency_key="chaos-goal"))

    async def get(self, task_id: str) -> Task:
        task: Task = await self._retry(lambda c: c.get(task_id))
        return task

    async def _retry(self, call: Callable[[TaskloomClient], Any], timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with TaskloomClient(self.addresses()) as client:
                    return await call(client)
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def history(
        self, task_id: str
    ) -> tuple[list[dict[str, Any]], dict[str, list[str]], dict[str, str]]:
        """The run's history (also written to history.jsonl), the graph and the stored outputs."""
        client: Any = self.redis_client()
        try:
            subs = client.lrange(f"{PREFIX}task:{task_id}:subs", 0, -1)
            if client.hget(f"{PREFIX}task:{task_id}", "archived"):
                # Compacted (TASKLOOM_COMPACT_AFTER below): read as it was.
                archive = decode_archive(client.get(f"{PREFIX}task:{task_id}:archive"))
                events = archive.events
                rows = [[row.get("deps"), row.get("output")] for row in archive.subtasks]
            else:
                events = client.xrange(f"{PREFIX}task:{task_id}:events")
                pipe = client.pipeline(transaction=False)
                for sub in subs:
                    pipe.hmget(f"{PREFIX}task:{task_id}:sub:{sub}", ["deps", "output"])
                rows = pipe.execute()
        finally:
            client.close()
        plan = {sub: json.loads(deps or "[]") for sub, (deps, _) in zip(subs, rows, strict=True)}
        outputs = {sub: out or "" for sub, (_, out) in zip(subs, rows, strict=True)}
        history: list[dict[str, Any]] = [
            {"source": "commit", "id": eid, "time": int(eid.split("-")[0]) / 1000, **fields}
            for eid, fields in events
        ]
        for path in sorted((self.root / "records").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by SIGKILL
                    record = json.loads(line)
                    if record.get("task") == task_id:  # not the users' small tasks
                        history.append(record)
        history += self.faults
        history.sort(key=lambda h: h["time"])
        with (self.root / "history.jsonl").open("w") as out:
            for h in history:
                out.write(json.dumps(h) + "\n")
        return history, plan, outputs


# -- scenarios ----------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    verdict: Verdict
    task: Task
    seconds: float
    faults: list[str]
    root: Path

    def line(self) -> str:
        stats = ", ".join(f"{k}={v}" for k, v in sorted(self.verdict.stats.items()))
        return (
            f"{self.name}: {self.task.status} in {self.seconds:.1f}s; faults "
            f"{' '.join(self.faults) or 'none'}; {self.verdict.summary()} ({stats})"
        )


async def run(
    name: str,
    root: Path,
    faults: list[tuple[float, str]],
    *,
    seed: int = 0,
    timeout: float = 120.0,
) -> Result:
    """Run one goal through a fresh cluster while ``faults`` fire at their times."""
    kinds = {kind for _, kind in faults}
    ollama = FakeOllama().start()
    graph = layered_plan(seed)

    def respond(call: ChatCall) -> str:
        return json.dumps(graph) if call.planning else "SYNTHESIS"

    ollama.responder = respond
    netns = NetNamespace(0) if "partition" in kinds else None
    cluster = Cluster(
        root,
        ollama,
        # A lease must outlast the round trip: 2 s each way needs more than 4 s.
        lease_ttl=6.0 if "latency" in kinds else 2.0,
        listen_host="0.0.0.0" if netns else "127.0.0.1",
        replicated="kill_primary" in kinds,
    )
    proxy: DelayProxy | None = None
    rng = random.Random(seed)
    try:
        cluster.start_redis()
        await cluster.start_supervisor("s1")
        if "kill_leader_standby" in kinds or "freeze_leader" in kinds:
            await cluster.start_supervisor("s2", standby=True)
        for _ in range(3):
            cluster.start_worker()
        if netns is not None:
            netns.create()
            cluster.start_worker(
                addresses=cluster.addresses(netns.host_ip),
                netns=netns,
                capabilities="chaos",
                special=True,
            )
        if "latency" in kinds:
            proxy = DelayProxy(cluster.supervisors["s1"].address, 2.0).start()
            cluster.start_worker(addresses=proxy.address, capabilities="chaos", special=True)
        await cluster.wait_connected()
        started = time.monotonic()
        started_at = time.time()
        task_id = await cluster.submit("a goal the scripted model turns into 200 steps")
        users = Users(cluster.addresses, random.Random(seed))
        stop_users = asyncio.Event()
        using = asyncio.create_task(users.run(stop_users))
        pending = sorted(faults)
        try:
            task = await cluster.get(task_id)
            while not task.status.terminal:
                elapsed = time.monotonic() - started
                while pending and pending[0][0] <= elapsed:
                    await _inject(cluster, pending.pop(0)[1], rng, netns)
                if elapsed > timeout:
                    break
                await asyncio.sleep(0.1)
                task = await cluster.get(task_id)
        finally:
            stop_users.set()
            await using
        history, plan, outputs = cluster.history(task_id)
        verdict = check(
            history, plan=plan, outputs=outputs, task_status=task.status, task_error=task.error
        )
        if not task.status.terminal:
            verdict.add("I1", f"the task did not finish within {timeout:.0f}s ({task.status})")
        await users.settle()
        await users.check(verdict)
        return Result(
            name,
            verdict,
            task,
            time.monotonic() - started,
            [f"{f['kind']}@{f['time'] - started_at:.1f}s" for f in cluster.faults],
            root,
        )
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.close()
        if netns is not None:
            netns.destroy()
        ollama.stop()


async def _inject(
    cluster: Cluster, kind: str, rng: random.Random, netns: NetNamespace | None
) -> None:
    if kind in ("kill_worker", "term_worker"):
        plain = [
            m
            for m in cluster.workers.values()
            if m.process.poll() is None and m.name not in cluster.special
        ]
        if not plain:
            return
        victim = rng.choice(plain)
        sig = signal.SIGKILL if kind == "kill_worker" else signal.SIGTERM
        cluster.fault(kind, target=victim.name)
        cluster.signal(victim, sig)
        del cluster.workers[victim.name]
        cluster.start_worker()
    elif kind in ("kill_leader_standby", "kill_leader_restart"):
        leader = cluster.leader()
        if leader is None:
            return
        cluster.fault(kind, target=leader.name)
        cluster.signal(leader, signal.SIGKILL)
        leader.process.wait()
        if kind == "kill_leader_restart":
            port = int(leader.address.rpartition(":")[2])
            await asyncio.sleep(0.3)
            await cluster.start_supervisor(leader.name, port=port, standby=True)
    elif kind == "kill_redis":
        cluster.fault(kind)
        cluster.redis.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.redis.start)
        cluster.fault("redis_restarted")
    elif kind == "freeze_leader":
        # A pause (a long GC, a starved VM) past its lease: the standby takes
        # over, and the old leader, thawed, must find out before it writes.
        leader = cluster.leader()
        if leader is None:
            return
        seconds = round(rng.uniform(0.5, 6.0), 1)
        cluster.fault(kind, target=leader.name, detail=f"{seconds:g}s")
        await _stopped_for(seconds, functools.partial(_signal_group, leader.process.pid))
        cluster.fault("leader_thawed", target=leader.name)
    elif kind in ("freeze_redis", "freeze_redis_11s"):
        # Stopped, not killed: its connections stay open and nothing answers
        # (a stalled disk under appendfsync always, a long fork). Up to 12 s:
        # past the leases, and past the supervisors' 10 s Redis timeout.
        process = cluster.redis.process
        if process is None or process.poll() is not None:
            return
        seconds = 11.0 if kind == "freeze_redis_11s" else round(rng.uniform(0.5, 12.0), 1)
        cluster.fault("freeze_redis", detail=f"{seconds:g}s")
        await _stopped_for(seconds, process.send_signal)
        cluster.fault("redis_thawed")
    elif kind == "partition" and netns is not None:
        cluster.fault("partition")
        netns.cut()
        await asyncio.sleep(cluster.lease_ttl * 2)
        netns.heal()
        cluster.fault("partition_healed")
    elif kind == "latency":
        cluster.fault("latency", detail="one worker's link is 2 s slower each way")
    elif kind == "kill_primary" and cluster.sentinel is not None:
        replicated = cluster.sentinel
        old = await asyncio.to_thread(replicated.kill_primary)
        cluster.fault(kind, target=old)
        new = await asyncio.to_thread(replicated.wait_promoted, old)
        cluster.fault("replica_promoted", target=new)
        # Back as a replica of the new primary, as an operator would bring it.
        await asyncio.to_thread(replicated.restart_as_replica, old)


async def _stopped_for(seconds: float, send: Callable[[int], None]) -> None:
    """Freeze a process (SIGSTOP) for ``seconds``, then let it go on, whatever happens meanwhile."""
    send(signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        send(signal.SIGCONT)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


SCENARIOS: dict[str, list[tuple[float, str]]] = {
    "worker_sigkill": [(1.0, "kill_worker"), (2.0, "kill_worker"), (3.0, "kill_worker"),
                       (4.0, "kill_worker")],
    "worker_sigterm": [(1.0, "term_worker"), (2.5, "term_worker")],
    "supervisor_sigkill_standby": [(1.5, "kill_leader_standby")],
    "supervisor_sigkill_restart": [(1.5, "kill_leader_restart")],
    "redis_sigkill_aof": [(1.5, "kill_redis")],
    "redis_sigstop": [(1.5, "freeze_redis_11s")],
    "redis_primary_sigkill_sentinel": [(1.5, "kill_primary")],
    "supervisor_sigstop_standby": [(1.5, "freeze_leader")],
    "worker_partitioned": [(1.0, "partition")],
    "worker_link_latency": [(0.0, "latency")],
}  # fmt: skip
"""Each scenario's fault schedule (seconds after the start). ``latency`` is
there from the start: one worker talks through a 2 s delay throughout."""


def random_schedule(
    rng: random.Random, *, netns: bool, sentinel: bool = False
) -> list[tuple[float, str]]:
    """1-3 faults at random times in the first 4 s; the partition and the
    replicated Redis only where they can be run."""
    kinds = [k for k in FAULTS if (netns or k != "partition") and (sentinel or k != "kill_primary")]
    chosen = rng.sample(kinds, rng.randint(1, 3))
    # One supervisor topology per run, and one Redis topology.
    if "kill_leader_standby" in chosen and "kill_leader_restart" in chosen:
        chosen = [k for k in chosen if k != "kill_leader_restart"]
    if "kill_primary" in chosen:
        chosen = [k for k in chosen if k not in SINGLE_REDIS]
    return sorted(
        (0.0 if kind == "latency" else round(rng.uniform(0.5, 4.0), 2), kind) for kind in chosen
    )
