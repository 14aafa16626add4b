"""A real Prometheus (Debian's) scrapes a live supervisor and worker, loads the
alert rules, and answers queries for the queue-depth and subtask metrics."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from taskloom.client import TaskloomClient
from taskloom.core.localredis import free_port
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import REPO, Processes
from tests.helpers import eventually, plan
from tests.test_k8s import K8S, of, rendered

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="needs Debian's prometheus (scripts/ensure-prometheus installs it)",
)


class Prometheus:
    def __init__(
        self, tmp_path: Path, targets: list[str], labels: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        shutil.copy(REPO / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [alerts.yml]\n"
            "scrape_configs:\n"
            "  - job_name: taskloom\n"
            f"    static_configs: [{{targets: {json.dumps(targets)}, "
            f"labels: {json.dumps(labels or {})}}}]\n"
        )
        self.log = (tmp_path / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> list[Any]:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    yield started
    for p in started:
        p.close()


async def test_prometheus_scrapes_the_cluster_and_answers_for_queues_and_subtasks(
    supervisor_settings: SupervisorSettings,
    processes: Processes,
    tmp_path: Path,
    prometheus_factory: list[Prometheus],
) -> None:
    settings = supervisor_settings.model_copy(update={"metrics_port": 0})
    worker_port = free_port()
    async with Supervisor(settings, metrics=SupervisorMetrics(CollectorRegistry())) as supervisor:
        processes.worker(
            supervisor.address, capabilities="echo", env={"TASKLOOM_METRICS_PORT": str(worker_port)}
        )
        targets = [f"127.0.0.1:{supervisor.metrics_port}", f"127.0.0.1:{worker_port}"]
        prometheus = Prometheus(tmp_path, targets)
        prometheus_factory.append(prometheus)
        async with TaskloomClient(supervisor.address) as client:
            done = await client.wait(await client.submit("g", plan=plan(("a", "echo", "1"))))
            assert done.status == TaskStatus.SUCCEEDED
            # No worker offers `gate`: this one waits in the READY queue.
            await client.submit("stuck", plan=plan(("x", "gate", "1")))

            async def query(expr: str) -> list[Any]:
                try:
                    return await asyncio.to_thread(prometheus.query, expr)
                except OSError:
                    return []  # not listening yet

            async def both_up() -> bool:
                return len(await query("up == 1")) == 2

            await eventually(both_up, timeout=60, interval=0.5)

            async def gate_queued() -> bool:
                result = await query('taskloom_ready_subtasks{capability="gate"}')
                return bool(result) and result[0]["value"][1] == "1"

            await eventually(gate_queued, timeout=60, interval=0.5)

            async def echo_done() -> bool:
                result = await query(
                    'taskloom_subtasks_finished_total{capability="echo",outcome="succeeded"}'
                )
                return bool(result) and float(result[0]["value"][1]) >= 1

            await eventually(echo_done, timeout=60, interval=0.5)
            worker_side = await query(
                'taskloom_worker_attempts_total{capability="echo",outcome="succeeded"}'
            )
            assert worker_side and float(worker_side[0]["value"][1]) >= 1
            # The gate subtask has waited since before the scrapes above.
            age = await query('taskloom_ready_oldest_age_seconds{capability="gate"}')
            assert age and float(age[0]["value"][1]) > 0
            # The tests' Redis fsyncs every write: the alert's metric says so.
            durable = await query("max(taskloom_redis_durable)")
            assert durable and durable[0]["value"][1] == "1"

            rules = await asyncio.to_thread(prometheus.get, "/api/v1/rules")
            loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
            assert {"TaskloomReadyWorkTooOld", "TaskloomRedisNotDurable"} <= loaded
            assert len(loaded) == 9


async def test_the_shipped_autoscaler_queries_see_work_with_no_worker_and_zero_at_rest(
    supervisor_settings: SupervisorSettings, tmp_path: Path, prometheus_factory: list[Prometheus]
) -> None:
    """KEDA's query (as the prod overlay renders it) and prometheus-adapter's
    rule, evaluated on a real Prometheus scraping a supervisor with no worker:
    the READY work of a pool scaled to zero counts, an idle capability reads 0
    (not nothing), and another namespace's supervisors do not count."""
    settings = supervisor_settings.model_copy(
        update={"metrics_port": 0, "capabilities": ("llm", "shell")}
    )
    (scaled,) = of(rendered("prod"), "ScaledObject")
    keda = scaled["spec"]["triggers"][0]["metadata"]["query"]
    namespace = scaled["metadata"]["namespace"]
    assert f'namespace="{namespace}"' in keda
    adapter_rules = yaml.safe_load((K8S / "components/hpa/prometheus-adapter.yaml").read_text())
    (rule,) = adapter_rules["rules"]["external"]
    adapter = rule["metricsQuery"].replace("<<.LabelMatchers>>", f'namespace="{namespace}"')
    elsewhere = keda.replace(f'namespace="{namespace}"', 'namespace="elsewhere"')

    async with Supervisor(settings, metrics=SupervisorMetrics(CollectorRegistry())) as supervisor:
        prometheus = Prometheus(
            tmp_path, [f"127.0.0.1:{supervisor.metrics_port}"], {"namespace": namespace}
        )
        prometheus_factory.append(prometheus)

        async def query(expr: str) -> dict[str, float]:
            """capability (or "" for a sum) → value; {} before the first scrape."""
            try:
                result = await asyncio.to_thread(prometheus.query, expr)
            except OSError:
                return {}
            return {r["metric"].get("capability", ""): float(r["value"][1]) for r in result}

        async with TaskloomClient(supervisor.address) as client:
            task_id = await client.submit("two", plan=plan(("a", "llm", "A"), ("b", "llm", "B")))

            async def scaled_up() -> bool:
                return await query(keda) == {"": 2.0}

            await eventually(scaled_up, timeout=60, interval=0.5)
            assert await query(adapter) == {"llm": 2.0, "shell": 0.0}
            assert await query(elsewhere) == {"": 0.0}

            await client.cancel(task_id)

            async def at_rest() -> bool:
                return await query(keda) == {"": 0.0}

            await eventually(at_rest, timeout=60, interval=0.5)
            assert await query(adapter) == {"llm": 0.0, "shell": 0.0}

        # Every dashboard query is valid PromQL on this Prometheus, with the
        # dashboard's variables as Grafana fills them in; the leader panel sees it.
        dashboard = json.loads((REPO / "deploy/grafana/taskloom.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$namespace", namespace).replace("$instance", ".*")
                reply = await asyncio.to_thread(prometheus.get, "/api/v1/query", query=expr)
                assert reply["status"] == "success", expr
        (leader,) = [p for p in dashboard["panels"] if p["title"].startswith("Leader")]
        expr = leader["targets"][0]["expr"].replace("$namespace", namespace)
        assert await query(expr.replace("$instance", ".*")) == {"": 1.0}
