"""The Kubernetes manifests, checked offline: each overlay rendered with
``kubectl kustomize``, validated strictly against a pinned Kubernetes version
(core kinds) and the JSON schemas in ``deploy/k8s/schemas`` (KEDA and
Prometheus Operator kinds), then held to what a reviewer would ask of them."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"
OVERLAYS = ("dev", "prod")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
    ("cert-manager.io/v1", "Certificate"): "certificate-cert-manager.io-v1.json",
}
BACKGROUND_STOP = 5
"""Seconds a stopping supervisor may wait for its background work (app.py)."""

Doc = dict[str, Any]


def kustomize(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    assert kubectl, (
        "kubectl is needed to render deploy/k8s (kubectl kustomize, offline); "
        "install it (scripts/ensure-kubectl tries apt)"
    )
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@cache
def rendered(overlay: str) -> tuple[Doc, ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def composed(tmp_path: Path, resource: str, component: str) -> list[Doc]:
    """``resource`` (a path under deploy/k8s) with ``component`` added, rendered."""
    here = tmp_path / f"with-{component.replace('/', '-')}"
    here.mkdir()
    root = Path("../" * len(here.relative_to("/").parts)) / K8S.relative_to("/")
    (here / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(root / resource)],
                "components": [str(root / "components" / component)],
            }
        )
    )
    return kustomize(here)


def with_hpa(tmp_path: Path) -> list[Doc]:
    """The base with the HPA component instead of KEDA's."""
    return composed(tmp_path, "base", "hpa")


def of(docs: tuple[Doc, ...] | list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[Doc, ...] | list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in of(docs, kind) if d["metadata"]["name"] == name]
    return found


def workloads(docs: tuple[Doc, ...] | list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def containers(workload: Doc) -> Iterator[Doc]:
    spec = workload["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def config(docs: tuple[Doc, ...], name: str) -> dict[str, str]:
    """A generated ConfigMap's data (its name carries a content hash)."""
    (found,) = [
        d for d in of(docs, "ConfigMap") if d["metadata"]["name"].rpartition("-")[0] == name
    ]
    data: dict[str, str] = found["data"]
    return data


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if duration.endswith(unit):
            return float(duration.removesuffix(unit)) * units[unit]
    return float(duration)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- validity -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_validates_strictly(overlay: str) -> None:
    docs = rendered(overlay)
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SCHEMAS:
            schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[key]).read_text())
            jsonschema.validate(doc, schema)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_hpa_alternative_and_the_secret_examples_validate(tmp_path: Path) -> None:
    docs = with_hpa(tmp_path)
    (hpa,) = of(docs, "HorizontalPodAutoscaler")
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "taskloom-worker"
    concurrency = config(tuple(docs), "taskloom-worker")["TASKLOOM_CONCURRENCY"]
    assert hpa["spec"]["metrics"][0]["external"]["target"]["averageValue"] == concurrency
    # An apply must not reset what the autoscaler chose.
    assert "replicas" not in named(docs, "Deployment", "taskloom-worker")["spec"]
    examples = list(yaml.safe_load_all((K8S / "overlays/prod/secrets.example.yaml").read_text()))
    assert {d["metadata"]["name"] for d in examples} == {
        "taskloom-tls",
        "taskloom-tokens",
        "taskloom-worker-token",
        "taskloom-redis",
    }
    for secret in examples:
        kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)


def test_the_crd_schemas_refuse_what_the_crds_refuse() -> None:
    docs = rendered("prod")
    (scaled,) = of(docs, "ScaledObject")
    path = K8S / "schemas" / CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")]
    schema = json.loads(path.read_text())
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["minReplicas"] = 0  # the HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    del broken["spec"]["minReplicas"]
    del broken["spec"]["scaleTargetRef"]["name"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# -- what a reviewer checks -----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_and_a_restrictive_security_context(overlay: str) -> None:
    for workload in workloads(rendered(overlay)):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        # Service links would put TASKLOOM_SUPERVISOR_PORT=tcp://... and the
        # like into the environment, next to the real TASKLOOM_* settings.
        assert pod["enableServiceLinks"] is False, name
        for container in containers(workload):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), name
            assert "memory" in resources["limits"], name
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context.get("privileged", False) is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay: str) -> None:
    for workload in workloads(rendered(overlay)):
        for container in containers(workload):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (name and tag and tag != "latest"), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_supervisor_probes_are_grpc_on_the_health_port(overlay: str) -> None:
    docs = rendered(overlay)
    supervisor = named(docs, "Deployment", "taskloom-supervisor")
    (container,) = containers(supervisor)
    health_port = int(config(docs, "taskloom-supervisor")["TASKLOOM_HEALTH_PORT"])
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    # Readiness: "ready" is SERVING on every supervisor that answers (a
    # standby redirects: app.READY); liveness on any that runs (app.LIVENESS).
    assert readiness["grpc"] == {"port": health_port, "service": "ready"}
    assert liveness["grpc"] == {"port": health_port, "service": "liveness"}
    assert container["startupProbe"]["grpc"]["service"] == "liveness"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == health_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_cover_the_drain(overlay: str) -> None:
    docs = rendered(overlay)
    supervisor = named(docs, "Deployment", "taskloom-supervisor")["spec"]["template"]["spec"]
    pre_stop = supervisor["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = seconds(config(docs, "taskloom-supervisor")["TASKLOOM_SHUTDOWN_GRACE"])
    assert supervisor["terminationGracePeriodSeconds"] >= pre_stop + drain + BACKGROUND_STOP
    worker = named(docs, "Deployment", "taskloom-worker")["spec"]["template"]["spec"]
    worker_drain = seconds(config(docs, "taskloom-worker")["TASKLOOM_DRAIN_TIMEOUT"])
    assert worker["terminationGracePeriodSeconds"] >= worker_drain + 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_labels_selectors_and_ports_agree(overlay: str) -> None:
    docs = rendered(overlay)
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "taskloom", doc["metadata"]["name"]
    for workload in workloads(docs):
        template = workload["spec"]["template"]["metadata"]["labels"]
        assert matches(workload["spec"]["selector"]["matchLabels"], template)
        assert matches(workload["metadata"]["labels"], template)
    for service in of(docs, "Service"):
        selected = [
            w for w in workloads(docs)
            if matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]  # fmt: skip
        assert selected, f"{service['metadata']['name']} selects no pods"
        for workload in selected:
            names = {p["name"] for c in containers(workload) for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names, (service["metadata"]["name"], port)


def test_network_policies_let_only_the_right_pods_in() -> None:
    docs = rendered("dev")
    pods = {
        w["metadata"]["labels"]["app.kubernetes.io/component"]: w["spec"]["template"]["metadata"][
            "labels"
        ]
        for w in workloads(docs)
    }
    policies = {p["metadata"]["name"]: p["spec"] for p in of(docs, "NetworkPolicy")}
    deny = policies["taskloom-default-deny"]
    assert all(matches(deny["podSelector"]["matchLabels"], labels) for labels in pods.values())
    assert "ingress" not in deny

    def admitted(policy: str) -> set[str]:
        spec = policies[policy]
        sources = [
            peer["podSelector"]["matchLabels"]
            for rule in spec["ingress"]
            for peer in rule["from"]
            if "podSelector" in peer and "namespaceSelector" not in peer
        ]
        return {c for c, labels in pods.items() if any(matches(s, labels) for s in sources)}

    def guarded(policy: str) -> set[str]:
        selector = policies[policy]["podSelector"]["matchLabels"]
        return {c for c, labels in pods.items() if matches(selector, labels)}

    assert guarded("taskloom-redis") == {"redis"}
    assert admitted("taskloom-redis") == {"supervisor"}
    assert guarded("taskloom-supervisor") == {"supervisor"}
    assert admitted("taskloom-supervisor") == {"worker"}
    assert guarded("taskloom-worker") == {"worker"}
    assert admitted("taskloom-worker") == set()
    # Prometheus reaches the metrics ports, from its namespace only.
    for name in ("taskloom-supervisor", "taskloom-worker"):
        scrape = [
            r for r in policies[name]["ingress"]
            if any("namespaceSelector" in p and "monitoring" in str(p) for p in r["from"])
        ]  # fmt: skip
        assert scrape and scrape[0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    # The web console: labelled clients only (no worker), on its own port.
    console = [
        r for r in policies["taskloom-supervisor"]["ingress"]
        if r["ports"] == [{"port": "console", "protocol": "TCP"}]
    ]  # fmt: skip
    assert len(console) == 1
    peers = console[0]["from"]
    assert all("taskloom.dev/client" in str(p) for p in peers)
    assert not any(
        matches(p.get("podSelector", {}).get("matchLabels", {"-": "-"}), pods["worker"])
        for p in peers
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_console_is_served_on_the_supervisor_service(overlay: str) -> None:
    docs = rendered(overlay)
    service = named(docs, "Service", "taskloom-supervisor")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["console"]["targetPort"] == "console" and ports["console"]["port"] == 8080
    config = [
        c for c in of(docs, "ConfigMap") if c["metadata"]["name"].startswith("taskloom-supervisor")
    ]
    assert config and config[0]["data"]["TASKLOOM_CONSOLE_PORT"] == "8080"


def test_prod_runs_ha_supervisors_with_tls_tokens_and_external_redis() -> None:
    docs = rendered("prod")
    supervisor = named(docs, "Deployment", "taskloom-supervisor")
    assert supervisor["spec"]["replicas"] >= 2
    affinity = supervisor["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert affinity["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == (
        "kubernetes.io/hostname"
    )
    budget = named(docs, "PodDisruptionBudget", "taskloom-supervisor")
    labels = supervisor["spec"]["template"]["metadata"]["labels"]
    assert matches(budget["spec"]["selector"]["matchLabels"], labels)
    # Standbys are Ready too, so a drain may take any one supervisor at a time.
    assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]
    (container,) = containers(supervisor)
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert env["TASKLOOM_ADVERTISE"]["value"] == f"$(POD_IP):{port}"
    settings = config(docs, "taskloom-supervisor")
    assert settings["TASKLOOM_TLS_CERT"].startswith("/etc/taskloom/tls/")
    assert settings["TASKLOOM_TOKENS_FILE"].startswith("/etc/taskloom/tokens/")
    assert "TASKLOOM_INSECURE" not in settings
    (container,) = containers(supervisor)
    env = {e["name"]: e for e in container["env"]}
    assert env["TASKLOOM_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "taskloom-redis"
    worker = named(docs, "Deployment", "taskloom-worker")
    (worker_container,) = containers(worker)
    # Tokens and TLS material are Secrets mounted as files, never environment.
    worker_env = {e["name"]: e for e in worker_container["env"]}
    assert "TASKLOOM_TOKEN" not in worker_env
    token_file = config(docs, "taskloom-worker")["TASKLOOM_TOKEN_FILE"]
    mounts = {m["mountPath"]: m["name"] for m in worker_container["volumeMounts"]}
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    token_volume = volumes[mounts[str(Path(token_file).parent)]]
    assert token_volume["secret"]["secretName"] == "taskloom-worker-token"
    assert Path(token_file).name == "token"
    assert config(docs, "taskloom-worker")["TASKLOOM_TLS_CA"].startswith("/etc/taskloom/tls/")
    for workload in workloads(docs):
        for each in containers(workload):
            for variable in each.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["name"] == "taskloom-redis", variable
    # Secret values are never part of the rendered manifests, nor Redis in-cluster.
    assert of(docs, "Secret") == []
    assert of(docs, "StatefulSet") == []


def test_dev_has_one_of_each_and_redis_with_aof_on_a_volume() -> None:
    docs = rendered("dev")
    assert named(docs, "Deployment", "taskloom-supervisor")["spec"]["replicas"] == 1
    # No count: Kubernetes starts one worker, and an autoscaler added later owns it.
    assert "replicas" not in named(docs, "Deployment", "taskloom-worker")["spec"]
    assert config(docs, "taskloom-supervisor")["TASKLOOM_INSECURE"] == "true"
    assert of(docs, "PodDisruptionBudget") == []
    redis = named(docs, "StatefulSet", "taskloom-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # Under a permissive licence (Valkey, or Redis up to 7.2), full means
    # refusing writes rather than dropping keys, and a password from a Secret.
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    image, _, tag = container["image"].partition(":")
    assert image.startswith("valkey/") or (image == "redis" and tag < "7.3"), container["image"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    redis_env = {e["name"]: e for e in container["env"]}
    secret = redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    (supervisor,) = named(docs, "Deployment", "taskloom-supervisor")["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in supervisor["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    names = [e["name"] for e in supervisor["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("TASKLOOM_REDIS_URL")  # $(…) order
    url = env["TASKLOOM_REDIS_URL"]["value"]
    assert url.startswith("redis://:$(REDIS_PASSWORD)@taskloom-redis:")
    assert "TASKLOOM_REDIS_URL" not in config(docs, "taskloom-supervisor")


def test_workers_scale_on_their_capability_queue_down_to_zero() -> None:
    docs = rendered("prod")
    (scaled,) = of(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "taskloom-worker"
    assert spec["minReplicaCount"] == 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    # What the query returns is tested on a real Prometheus (test_prometheus.py).
    query = trigger["metadata"]["query"]
    assert f'namespace="{scaled["metadata"]["namespace"]}"' in query
    assert query.endswith("or vector(0)")
    concurrency = config(docs, "taskloom-worker")["TASKLOOM_CONCURRENCY"]
    assert trigger["metadata"]["threshold"] == concurrency
    assert "replicas" not in named(docs, "Deployment", "taskloom-worker")["spec"]
    # From zero: the supervisor accepts the pool's capabilities with no worker
    # connected, read from the one place the workers read them.
    (supervisor,) = named(docs, "Deployment", "taskloom-supervisor")["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in supervisor["env"]}
    source = env["TASKLOOM_CAPABILITIES"]["valueFrom"]["configMapKeyRef"]
    assert source["name"].rpartition("-")[0] == "taskloom-worker"
    assert source["key"] == "TASKLOOM_CAPABILITIES"
    assert "TASKLOOM_CAPABILITIES" not in config(docs, "taskloom-supervisor")


def test_monitoring_ships_the_same_rules_and_dashboard() -> None:
    docs = rendered("prod")
    (rule,) = of(docs, "PrometheusRule")
    alerts = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    assert rule["spec"] == alerts
    dashboard = named(docs, "ConfigMap", "taskloom-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((REPO / "deploy/grafana/taskloom.json").read_text())
    assert json.loads(dashboard["data"]["taskloom.json"]) == shipped
    (monitor,) = of(docs, "ServiceMonitor")
    metric_services = [
        s for s in of(docs, "Service")
        if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]  # fmt: skip
    assert {s["metadata"]["name"] for s in metric_services} == {
        "taskloom-supervisor-metrics",
        "taskloom-worker-metrics",
    }
    # Standbys are scraped too: they report taskloom_leader 0.
    assert named(docs, "Service", "taskloom-supervisor-metrics")["spec"]["publishNotReadyAddresses"]


def test_cert_manager_can_issue_the_certificate_supervisors_serve(tmp_path: Path) -> None:
    docs = composed(tmp_path, "overlays/prod", "cert-manager")
    (certificate,) = of(docs, "Certificate")
    schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[("cert-manager.io/v1", "Certificate")])
                        .read_text())  # fmt: skip
    jsonschema.validate(certificate, schema)
    spec = certificate["spec"]
    supervisor = named(docs, "Deployment", "taskloom-supervisor")
    volumes = {v["name"]: v for v in supervisor["spec"]["template"]["spec"]["volumes"]}
    assert spec["secretName"] == volumes["tls"]["secret"]["secretName"]
    # The name workers expect is on it, and the key is rotated with each renewal.
    assert config(tuple(docs), "taskloom-worker")["TASKLOOM_TLS_SERVER_NAME"] in spec["dnsNames"]
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    assert "server auth" in spec["usages"]
    broken = json.loads(json.dumps(certificate))
    broken["spec"]["issuer"] = broken["spec"].pop("issuerRef")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def upstream_errors(docs: list[Doc]) -> list[tuple[str, str | None]]:
    """(kind, error) of each document, validated against the upstream schema
    of its CRD (deploy/k8s/validate: kubernetes-models' validators, with Node)."""
    node = shutil.which("node")
    modules = K8S / "validate" / "node_modules"
    assert node and modules.exists(), (
        "node and the CRD validators are needed (scripts/ensure-crd-validators "
        "installs them; make test runs it)"
    )
    out = subprocess.run(
        [node, str(K8S / "validate" / "validate.mjs")],
        input=json.dumps(docs), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [(r["kind"], r["error"]) for r in json.loads(out.stdout)]


def test_the_crd_kinds_validate_against_their_upstream_schemas(tmp_path: Path) -> None:
    everything = composed(tmp_path, "overlays/prod", "cert-manager")
    crds = [d for d in everything if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS]
    assert {d["kind"] for d in crds} == {k for _, k in CRD_SCHEMAS}
    assert upstream_errors(crds) == [(d["kind"], None) for d in crds]
    # What the upstream schemas refuse is refused.
    scaled = json.loads(json.dumps(next(d for d in crds if d["kind"] == "ScaledObject")))
    scaled["spec"]["minReplicaCount"] = "zero"
    certificate = json.loads(json.dumps(next(d for d in crds if d["kind"] == "Certificate")))
    del certificate["spec"]["issuerRef"]
    assert all(error for _, error in upstream_errors([scaled, certificate]))
