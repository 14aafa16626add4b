"""The Grafana dashboard and the alert rules query only metrics the processes
export, and promtool accepts the rules and their unit tests."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from taskloom.supervisor.metrics import SupervisorMetrics
from taskloom.worker.metrics import WorkerMetrics
from tests.conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "taskloom.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\btaskloom_[a-z_]+\b")


def exported_names() -> set[str]:
    """Every series name a supervisor or worker can export."""
    names: set[str] = set()
    supervisor = SupervisorMetrics(CollectorRegistry())
    supervisor.watch(lambda: None, lambda: False)
    worker = WorkerMetrics(CollectorRegistry())
    worker.watch(lambda: 0, 1, lambda: False)
    for registry in (supervisor.registry, worker.registry):
        for family in registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum")}
            else:
                names.add(family.name)
    return names


def test_every_dashboard_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert len(dashboard["panels"]) >= 12 and used
    assert used <= exported_names(), used - exported_names()
    # The questions an operator must be able to answer each have a panel.
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for topic in ("READY", "Oldest", "Dispatch latency", "Subtask duration", "Workers",
                  "Retries", "LLM tokens", "LLM latency", "Leader", "Redis"):  # fmt: skip
        assert topic in titles


def test_the_dashboard_filters_every_query_by_namespace_and_instance() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "instance"} <= variables
    scoped = '{namespace=~"$namespace", instance=~"$instance"'
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            selectors = re.findall(r"\btaskloom_[a-z_]+(\{[^}]*)?", target["expr"])
            assert selectors and all(s.startswith(scoped) for s in selectors), target["expr"]
    # A panel that plots errors/s beside a latency gives them their own axis.
    (redis,) = [p for p in dashboard["panels"] if p["title"].startswith("Redis operation")]
    (override,) = redis["fieldConfig"]["overrides"]
    assert {"id": "unit", "value": "ops"} in override["properties"]
    assert redis["fieldConfig"]["defaults"]["unit"] == "s"


def test_every_alert_names_an_exported_metric() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert names == {
        "TaskloomNoLeader",
        "TaskloomNoWorkersForReadyWork",
        "TaskloomReadyWorkTooOld",
        "TaskloomHighSubtaskErrorRatio",
        "TaskloomPlannerFailing",
        "TaskloomLLMErrors",
        "TaskloomRedisErrors",
        "TaskloomRedisNotDurable",
        "TaskloomApprovalWaiting",
    }
    used = {m for r in rules for m in METRIC.findall(r["expr"])}
    assert used <= exported_names(), used - exported_names()


def test_every_alert_is_per_namespace_and_links_a_runbook_that_exists() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    runbooks = (REPO / "docs/operations/runbooks.md").read_text()
    headings = {line[3:].strip() for line in runbooks.splitlines() if line.startswith("## ")}
    for rule in rules:
        name = rule["alert"]
        assert "by (namespace" in rule["expr"], name
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("/docs/operations/runbooks.md"), url
        assert anchor == name.lower() and name in headings, name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian prometheus)")
@pytest.mark.parametrize(
    "args",
    [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]],
    ids=["check", "test"],
)
async def test_promtool_accepts_the_rules_and_their_tests(args: list[str]) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        ["promtool", *args],
        cwd=Path(ALERTS).parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_exported_metric_is_documented() -> None:
    """docs/operations/metrics.md lists each metric (without the taskloom_
    prefix, as families: a counter without _total, a histogram without _bucket)."""
    page = (REPO / "docs/operations/metrics.md").read_text()
    families = set()
    for name in exported_names():
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            name = name.removesuffix(suffix)
        families.add(name.removeprefix("taskloom_"))
    missing = sorted(f for f in families if f"`{f}" not in page)
    assert not missing, f"undocumented metrics: {missing}"
