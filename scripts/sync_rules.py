"""Write deploy/k8s/components/monitoring/prometheusrule.yaml from
deploy/prometheus/alerts.yml, so the two never differ (tests/test_k8s.py checks)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HEADER = """\
# The alert rules of deploy/prometheus/alerts.yml (tests/test_k8s.py keeps them
# identical; promtool tests them there). Made by scripts/sync_rules.py.
"""


def main() -> None:
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "taskloom",
            "labels": {"app.kubernetes.io/name": "taskloom", "release": "prometheus"},
        },
        "spec": {"groups": alerts["groups"]},
    }
    out = ROOT / "deploy/k8s/components/monitoring/prometheusrule.yaml"
    out.write_text(HEADER + yaml.safe_dump(rule, sort_keys=False, width=100))


if __name__ == "__main__":
    main()
