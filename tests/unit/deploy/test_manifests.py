"""deploy/: every manifest against the Kubernetes schemas (KEDA's ScaledObject against KEDA's
own CRD schema), and the pieces agree with each other.

Schema validity is not enough for a deployment to work: selectors must select, Services must
point at named ports, the webhook must call the injector's Service, every command line must
parse with the real CLI, the autoscaler must scale the gateway on a metric it really exports,
and the NetworkPolicy must let agents reach exactly the gateway and the control plane.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import typer
import yaml
from kube import validate

from meshgate.audit.open import store_target
from meshgate.cli import app
from meshgate.cli.gateway import _pacer
from meshgate.pacer.fair_queue import Limiter
from meshgate.pacer.metrics import PacerMetrics
from meshgate.sidecar.injector import (
    AGENT_LABEL,
    SIDECAR_NAME,
    XDS_CA_KEY,
    InjectSettings,
    inject_object,
    token_secret_name,
)

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
KEDA_SCHEMA = (
    Path(__file__).resolve().parents[2] / "fixtures/keda-scaledobject-v1alpha1.schema.yaml"
)
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


ALL = [doc for path in MANIFESTS for doc in load(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in ALL if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def mounted_from(pod: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str, str]:
    """(source kind, object name, key) of the Secret or ConfigMap that a file path in the
    container comes from, following its volumeMount and the volume (projected or not)."""
    mount = max(
        (m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")),
        key=lambda m: len(m["mountPath"]),
    )
    assert mount.get("readOnly") is True, f"{path}: mount {mount['name']} is writable"
    rest = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    if "projected" in volume:
        sources = volume["projected"]["sources"]
    else:
        sources = [{k: v} for k, v in volume.items() if k in ("secret", "configMap")]
    found = []
    for source in sources:
        ((kind, ref),) = source.items()
        name = ref["secretName"] if "secretName" in ref else ref["name"]
        items = ref.get("items")
        if items is None:  # every key becomes a file of that name
            found.append((kind, name, rest))
        found += [(kind, name, i["key"]) for i in items or [] if i["path"] == rest]
    assert len(found) == 1, f"{path}: provided by {found or 'nothing'}"
    return found[0]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "Exists" and expr["key"] not in labels:
            return False
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with `kubectl apply` (field validation
    Strict): an unknown field is an error, except where the schema preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


KEDA = jsonschema.Draft7Validator(strict(yaml.safe_load(KEDA_SCHEMA.read_text())))


def validate_keda(obj: dict[str, Any]) -> None:
    """KEDA's openAPIV3Schema (kubernetes-validate has none for custom resources), its one CEL
    rule, and the metadata as Kubernetes ObjectMeta (the CRD schema says only `object`)."""
    assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject"
    errors = sorted(KEDA.iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path)
        raise AssertionError(f"ScaledObject at {where}: {errors[0].message}")
    spec = obj["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})


def validate_any(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].startswith("keda.sh/"):
        validate_keda(obj)
    else:
        validate(obj)


def expand(c: dict[str, Any], arg: str) -> str:
    """`$(VAR)` in a command line as the kubelet expands it, from the container's env (a
    fieldRef or a Secret stands for a sample value); an undefined variable is an error."""
    samples = {"status.podIP": "10.244.1.7", "metadata.name": "coder-5f7d8c6b5d-x2k4p"}

    def value(m: re.Match[str]) -> str:
        (entry,) = [e for e in c.get("env", []) if e["name"] == m.group(1)]
        if "value" in entry:
            return str(entry["value"])
        field = entry["valueFrom"].get("fieldRef", {}).get("fieldPath")
        return samples[field] if field else "from-a-secret"

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, arg)


def test_the_manifests_are_found() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in MANIFESTS}
    assert {"control-plane.yaml", "gateway.yaml", "injector.yaml"} <= names
    assert {"agents/network-policy.yaml", "agents/example-agent.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    docs = load(path)
    assert docs
    for doc in docs:
        validate_any(doc)


@pytest.mark.parametrize("directory", [DEPLOY, DEPLOY / "agents"], ids=["deploy", "agents"])
def test_kustomizations_list_every_manifest_beside_them(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    beside = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(kustomization["resources"]) == beside


def test_kinds_and_api_versions_are_the_current_ones() -> None:
    versions = {(d["kind"], d["apiVersion"]) for d in ALL}
    assert versions >= {
        ("Deployment", "apps/v1"),
        ("Service", "v1"),
        ("PodDisruptionBudget", "policy/v1"),
        ("ScaledObject", "keda.sh/v1alpha1"),
        ("MutatingWebhookConfiguration", "admissionregistration.k8s.io/v1"),
        ("NetworkPolicy", "networking.k8s.io/v1"),
        ("ServiceAccount", "v1"),
        ("Namespace", "v1"),
    }


def test_selectors_select_and_services_target_named_ports() -> None:
    deployments = [d for d in ALL if d["kind"] == "Deployment"]
    for dep in deployments:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selects(dep["spec"]["selector"], labels), dep["metadata"]["name"]
        sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
        find("ServiceAccount", sa)
    for svc in (d for d in ALL if d["kind"] == "Service"):
        targets = [
            d
            for d in deployments
            if d["metadata"]["namespace"] == svc["metadata"]["namespace"]
            and selects(
                {"matchLabels": svc["spec"]["selector"]},
                d["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert len(targets) == 1, svc["metadata"]["name"]
        port_names = {p["name"] for p in container(targets[0]).get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names
    for pdb in (d for d in ALL if d["kind"] == "PodDisruptionBudget"):
        dep = find("Deployment", pdb["metadata"]["name"])
        assert selects(pdb["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
        assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]


def test_replica_counts_and_autoscaling() -> None:
    assert find("Deployment", "meshgate-control-plane")["spec"]["replicas"] == 2
    gateway = find("Deployment", "meshgate-gateway")
    assert gateway["spec"]["replicas"] >= 3
    scaled = find("ScaledObject", "meshgate-gateway")
    spec = scaled["spec"]
    assert scaled["metadata"]["namespace"] == gateway["metadata"]["namespace"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "meshgate-gateway",
    }
    assert spec["minReplicaCount"] == gateway["spec"]["replicas"] < spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] == 12
    # KEDA owns the gateway's HPA: a second one would fight it
    assert not [d for d in ALL if d["kind"] == "HorizontalPodAutoscaler"]
    hpa = spec["advanced"]["horizontalPodAutoscalerConfig"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    # a lost signal holds the replicas (never fewer than now), within the bounds
    fallback = spec["fallback"]
    assert fallback["behavior"] == "currentReplicasIfHigher" and fallback["failureThreshold"] >= 1
    assert spec["minReplicaCount"] < fallback["replicas"] <= spec["maxReplicaCount"]


def exported_metrics() -> dict[str, str]:
    """Name -> type of every metric family a gateway's pacer exports (its real registry)."""
    registry = PacerMetrics(Limiter()).registry
    return {m.name: m.type for m in registry.collect()}


def test_the_scaler_queries_the_gateways_capacity_signal() -> None:
    spec = find("ScaledObject", "meshgate-gateway")["spec"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    # KEDA's prometheus scaler requires these (pkg/scalers/prometheus_scaler.go, v2.20.2)
    assert {"serverAddress", "query", "threshold"} <= set(meta)
    assert float(meta["threshold"]) > 0
    assert meta["serverAddress"].startswith(("http://", "https://"))
    # fallback works only on AverageValue triggers; the HPA then divides the sum by the
    # threshold, so the query must sum over the pods, not average them
    assert trigger["metricType"] == "AverageValue"
    # an absent series is an error that reaches the fallback, not a silent 0
    assert meta["ignoreNullValues"] == "false"
    query = meta["query"].strip()
    assert query.startswith("sum(")
    names = set(re.findall(r"\bmeshgate_[a-z_]+", query))
    exported = exported_metrics()
    assert names == {"meshgate_gateway_capacity_waiting"}
    (name,) = names
    assert exported[name] == "gauge"
    # the series the query selects are the gateway pods' ones
    selector = re.search(name + r"\{([^}]*)\}", query)
    assert selector is not None
    matchers = dict(re.findall(r'(\w+)(?:=~|=)"([^"]*)"', selector.group(1)))
    gateway = find("Deployment", "meshgate-gateway")
    assert matchers["namespace"] == gateway["metadata"]["namespace"]
    pod_name = "meshgate-gateway-7d9f8c6b5d-x2k4p"  # Deployment -> ReplicaSet -> pod names
    assert re.fullmatch(matchers["pod"], pod_name)
    assert not re.fullmatch(matchers["pod"], "meshgate-control-plane-7d9f8c6b5d-x2k4p")


def _set(path: str, value: Any) -> Any:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = [k.replace("~1", "/") for k in path.split("/")]
        for key in parents:
            obj = obj[int(key)] if isinstance(obj, list) else obj[key]
        obj[last] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (_set("spec/minReplicas", 3), "'minReplicas' was unexpected"),  # the HPA's name
        (_set("spec/triggers/0/metadata/threshold", 5), "threshold"),  # values are strings
        (_set("spec/triggers/0/metricType", None), "metricType"),
        (_set("spec/fallback/behavior", "holdReplicas"), "holdReplicas"),
        (_set("spec/advanced/horizontalPodAutoscalerConfig/behavior/scaleDown/x", 1), "'x'"),
        (_set("spec/minReplicaCount", 20), "20 <= 12"),  # the CRD's CEL rule
        (_set("metadata/labels/app.kubernetes.io~1name", 3), "labels"),  # as ObjectMeta
    ],
)
def test_the_scaler_schema_check_rejects_what_keda_would(mutate: Any, why: str) -> None:
    """The check has teeth: each mistake is one KEDA's API server would refuse."""
    obj = copy.deepcopy(find("ScaledObject", "meshgate-gateway"))
    validate_keda(obj)
    mutate(obj)
    with pytest.raises(AssertionError, match=why):
        validate_keda(obj)


def test_prometheus_can_scrape_the_gateways_metrics_and_only_prometheus() -> None:
    dep = find("Deployment", "meshgate-gateway")
    gw = container(dep)
    ports = {p["name"]: p for p in gw["ports"]}
    port = ports["metrics"]["containerPort"]
    address = expand(gw, flag(gw["command"], "--metrics-address"))
    assert address == f"10.244.1.7:{port}"  # the pod IP, from the downward API
    env = {e["name"]: e for e in gw["env"]}
    assert env["MESHGATE_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "--metrics-port" not in gw["command"]
    notes = dep["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(port) and notes["prometheus.io/path"] == "/metrics"
    # not behind the Service: every pod is scraped on its own
    svc = find("Service", "meshgate-gateway")
    assert all(p["targetPort"] != "metrics" for p in svc["spec"]["ports"])
    # who may connect to the metrics port: the monitoring namespace's Prometheus only
    rules = find("NetworkPolicy", "meshgate-gateway-ingress")["spec"]["ingress"]
    metrics_rules = [r for r in rules if {"protocol": "TCP", "port": port} in r["ports"]]
    (rule,) = metrics_rules
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    (peer,) = rule["from"]
    assert set(peer) == {"namespaceSelector", "podSelector"}  # both must match
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert selects(peer["namespaceSelector"], monitoring)
    assert selects(peer["podSelector"], {"app.kubernetes.io/name": "prometheus"})
    agents_ns = find("Namespace", "agents")["metadata"]["labels"]
    agents_ns = {**agents_ns, "kubernetes.io/metadata.name": "agents"}
    system_ns = {"kubernetes.io/metadata.name": "meshgate-system"}
    assert not selects(peer["namespaceSelector"], agents_ns)
    assert not selects(peer["namespaceSelector"], system_ns)
    # and the agents' own egress policy never allows it either
    for egress in find("NetworkPolicy", "meshgate-agents")["spec"]["egress"]:
        assert all(p["port"] != port for p in egress["ports"])
    # the Prometheus the scaler queries is the one the policy admits
    meta = find("ScaledObject", "meshgate-gateway")["spec"]["triggers"][0]["metadata"]
    assert ".monitoring.svc" in meta["serverAddress"]


def test_the_limit_store_comes_from_an_optional_secret(tmp_path: Path) -> None:
    dep = find("Deployment", "meshgate-gateway")
    pod = dep["spec"]["template"]["spec"]
    gw = container(dep)
    env = {e["name"]: e for e in gw["env"]}
    ref = env["MESHGATE_LIMIT_STORE"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "meshgate-limit-store", "key": "url", "optional": True}
    assert "--limit-store" not in gw["command"]  # the variable is the option's envvar
    ctx = _parse_with_cli(["meshgate", "gateway"])
    (opt,) = [p for p in ctx.command.params if p.name == "limit_store"]
    assert opt.envvar == "MESHGATE_LIMIT_STORE"
    path = flag(gw["command"], "--limit-store-password-file")
    assert mounted_from(pod, gw, path) == ("secret", "meshgate-limit-store", "password")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "limit-store"]
    assert volume["secret"]["optional"] is True
    assert volume["secret"]["defaultMode"] & 0o007 == 0
    # without the Secret the flag names a file that does not exist; the gateway then uses
    # the control plane's store and never reads it
    fake = SimpleNamespace(
        admin=SimpleNamespace(socket=tmp_path / "admin.sock"),
        shipper=SimpleNamespace(ca_file=None, refresh_metadata=None),
        envoy=SimpleNamespace(xds_metadata=()),
    )
    pacer = _pacer(fake, "127.0.0.1:18000", None, tmp_path / "absent")
    assert pacer._store_factory.__name__ == "remote"


def _parse_with_cli(command: list[str]) -> Any:
    """Parse a manifest's command line with the real `meshgate` CLI (unknown flags fail)."""
    assert command[0] == "meshgate"
    cmd: Any = typer.main.get_command(app)
    args = command[1:]
    while hasattr(cmd, "commands"):  # a command group
        cmd = cmd.commands[args[0]]
        args = args[1:]
    return cmd.make_context(cmd.name or "", list(args))


def test_every_command_line_parses_with_the_real_cli() -> None:
    containers = [container(d) for d in ALL if d["kind"] == "Deployment"]
    containers = [c for c in containers if c["command"][0] == "meshgate"]
    assert len(containers) == 3
    injected = inject_object(find("Deployment", "coder"), InjectSettings())
    containers.append(injected["spec"]["template"]["spec"]["initContainers"][0])
    for c in containers:
        # as the kubelet runs it: $(VAR) expanded from the container's env
        ctx = _parse_with_cli([expand(c, arg) for arg in c["command"]])
        assert ctx.params  # parsed into the command's parameters


def test_addresses_and_ports_agree_across_components() -> None:
    cp = container(find("Deployment", "meshgate-control-plane"))["command"]
    gw = container(find("Deployment", "meshgate-gateway"))["command"]
    inj = container(find("Deployment", "meshgate-injector"))["command"]
    cp_svc = find("Service", "meshgate-control-plane")
    gw_svc = find("Service", "meshgate-gateway")
    xds_port = {p["name"]: p["port"] for p in cp_svc["spec"]["ports"]}["xds"]
    assert str(xds_port) == flag(cp, "--xds-port")
    cp_address = f"meshgate-control-plane.meshgate-system.svc:{xds_port}"
    assert flag(gw, "--control-plane") == flag(inj, "--control-plane") == cp_address
    egress_port = gw_svc["spec"]["ports"][0]["port"]
    assert flag(cp, "--gateway-address") == f"meshgate-gateway.meshgate-system.svc:{egress_port}"
    assert flag(cp, "--gateway-bind") == "0.0.0.0"  # gateway pods serve other pods
    assert flag(inj, "--image") == container(find("Deployment", "meshgate-injector"))["image"]
    # tokens, TLS xDS and mTLS are serve's defaults: the NetworkPolicy is not the only guard
    assert "--insecure" not in cp and "--insecure" not in gw


def test_xds_tls_files_are_mounted_from_the_tls_secret_and_the_ca_configmap() -> None:
    """The control plane serves xDS over TLS with the operator's Secret; the gateway and every
    injected sidecar verify it with the ConfigMap's ca.crt, mounted where their flag says."""
    cp_dep = find("Deployment", "meshgate-control-plane")
    cp = container(cp_dep)
    cmd = cp["command"]
    assert "--insecure" not in cmd
    pod = cp_dep["spec"]["template"]["spec"]
    tls_secret = "meshgate-xds-tls"
    assert mounted_from(pod, cp, flag(cmd, "--xds-cert")) == ("secret", tls_secret, "tls.crt")
    assert mounted_from(pod, cp, flag(cmd, "--xds-key")) == ("secret", tls_secret, "tls.key")
    ca_source = ("configMap", "meshgate-xds-ca", XDS_CA_KEY)
    gw_dep = find("Deployment", "meshgate-gateway")
    gw = container(gw_dep)
    gw_ca = flag(gw["command"], "--xds-ca")
    assert mounted_from(gw_dep["spec"]["template"]["spec"], gw, gw_ca) == ca_source
    inj = container(find("Deployment", "meshgate-injector"))["command"]
    assert flag(inj, "--xds-ca-configmap") == "meshgate-xds-ca"
    settings = InjectSettings(xds_ca_configmap=flag(inj, "--xds-ca-configmap"))
    injected = inject_object(find("Deployment", "coder"), settings)["spec"]["template"]["spec"]
    sidecar = injected["initContainers"][0]
    assert mounted_from(injected, sidecar, flag(sidecar["command"], "--xds-ca")) == ca_source
    # the token still comes from the agent's Secret, in the same projected volume
    token = flag(sidecar["command"], "--token-file")
    assert mounted_from(injected, sidecar, token) == ("secret", "meshgate-join-coder", "token")
    # nodes dial the name the certificate must carry (docs/kubernetes.md)
    host = flag(gw["command"], "--control-plane").rpartition(":")[0]
    assert host == "meshgate-control-plane.meshgate-system.svc"
    assert host in (DEPLOY / "control-plane.yaml").read_text()  # the comment naming the SAN


def test_the_admin_token_comes_from_its_secret_shared_by_the_replicas() -> None:
    """Each replica would otherwise create its own in its emptyDir state: they must agree."""
    dep = find("Deployment", "meshgate-control-plane")
    pod = dep["spec"]["template"]["spec"]
    cp = container(dep)
    path = flag(cp["command"], "--admin-token-file")
    assert mounted_from(pod, cp, path) == ("secret", "meshgate-admin-token", "token")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "admin-token"]
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # serve refuses a world-readable token


def test_the_audit_store_comes_from_the_optional_secret_under_its_real_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cp = container(find("Deployment", "meshgate-control-plane"))
    env = {e["name"]: e for e in cp["env"]}
    assert "MESHGATE_AUDIT_DSN" not in env
    ref = env["MESHGATE_AUDIT_STORE"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "meshgate-postgres" and ref["optional"] is True
    # no --audit-store flag: `meshgate serve` reads the variable itself, so it wins when set
    assert "--audit-store" not in " ".join(cp["command"] + cp.get("args", []))
    monkeypatch.delenv("MESHGATE_AUDIT_STORE", raising=False)
    assert store_target(None, Path("/state")) == "/state/audit.db"
    monkeypatch.setenv("MESHGATE_AUDIT_STORE", "postgresql://db/audit")
    assert store_target(None, Path("/state")) == "postgresql://db/audit"


def test_webhook_configuration_calls_the_injector_for_labelled_pods_only() -> None:
    config = find("MutatingWebhookConfiguration", "meshgate-injector")
    (hook,) = config["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Fail"
    service = hook["clientConfig"]["service"]
    svc = find("Service", service["name"])
    assert service["namespace"] == svc["metadata"]["namespace"] == "meshgate-system"
    assert service["port"] == svc["spec"]["ports"][0]["port"] and service["path"] == "/mutate"
    inj = container(find("Deployment", "meshgate-injector"))
    assert svc["spec"]["ports"][0]["targetPort"] == inj["ports"][0]["name"]
    assert inj["ports"][0]["containerPort"] == int(flag(inj["command"], "--port"))
    base64.b64decode(hook["clientConfig"]["caBundle"], validate=True)
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert hook["namespaceSelector"] == {"matchLabels": {"meshgate.dev/injection": "enabled"}}
    assert hook["objectSelector"] == {
        "matchExpressions": [{"key": AGENT_LABEL, "operator": "Exists"}]
    }
    system = find("Namespace", "meshgate-system")["metadata"].get("labels", {})
    assert not selects(hook["namespaceSelector"], system)  # meshgate never injects itself
    agents = find("Namespace", "agents")["metadata"]["labels"]
    assert selects(hook["namespaceSelector"], agents)


def test_agent_network_policy_allows_only_gateway_control_plane_and_dns() -> None:
    policy = find("NetworkPolicy", "meshgate-agents")
    spec = policy["spec"]
    assert spec["podSelector"] == {} and set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert spec["ingress"] == []
    allowed: dict[str, set[tuple[str, int]]] = {}
    for rule in spec["egress"]:
        (peer,) = rule["to"]
        namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        labels = peer["podSelector"]["matchLabels"]
        target = f"{namespace}/{next(iter(labels.values()))}"
        allowed[target] = {(p["protocol"], p["port"]) for p in rule["ports"]}
        assert "ipBlock" not in peer
    gw_port = find("Service", "meshgate-gateway")["spec"]["ports"][0]["port"]
    assert allowed == {
        "meshgate-system/meshgate-gateway": {("TCP", gw_port)},
        "meshgate-system/meshgate-control-plane": {("TCP", 18000)},
        "kube-system/kube-dns": {("UDP", 53), ("TCP", 53)},
    }
    for name in ("meshgate-gateway", "meshgate-control-plane"):
        labels = find("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == name


def test_meshgate_system_ingress_admits_agents_and_gateways() -> None:
    agent_pod = find("Deployment", "coder")["spec"]["template"]["metadata"]["labels"]
    agent_ns = find("Namespace", "agents")["metadata"]["labels"]
    gw = find("NetworkPolicy", "meshgate-gateway-ingress")["spec"]["ingress"][0]["from"][0]
    assert selects(gw["namespaceSelector"], agent_ns) and selects(gw["podSelector"], agent_pod)
    cp_rules = find("NetworkPolicy", "meshgate-control-plane-ingress")["spec"]["ingress"]
    xds = next(r for r in cp_rules if r["ports"] == [{"protocol": "TCP", "port": 18000}])
    assert any(
        "podSelector" in p
        and selects(p["podSelector"], {"app.kubernetes.io/name": "meshgate-gateway"})
        for p in xds["from"]
    )


def test_containers_are_locked_down() -> None:
    for dep in (d for d in ALL if d["kind"] == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert {"requests", "limits"} <= set(c["resources"])


def test_the_sample_agent_runs_on_the_agent_pool_and_injects_cleanly() -> None:
    example = find("Deployment", "coder")
    pod = example["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"meshgate.dev/pool": "agents"}
    assert {
        "key": "meshgate.dev/agents",
        "operator": "Equal",
        "value": "true",
        "effect": "NoSchedule",
    } in pod["tolerations"]
    inj = container(find("Deployment", "meshgate-injector"))["command"]
    settings = InjectSettings(
        image=flag(inj, "--image"),
        control_plane=flag(inj, "--control-plane"),
        sidecar_port=int(flag(inj, "--sidecar-port")),
        health_port=int(flag(inj, "--health-port")),
        xds_ca_configmap=flag(inj, "--xds-ca-configmap"),
    )
    injected = inject_object(example, settings)
    validate(injected)
    spec = injected["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["name"] == SIDECAR_NAME
    assert spec["nodeSelector"] == pod["nodeSelector"]  # placement is untouched
    secret = spec["volumes"][0]["projected"]["sources"][0]["secret"]["name"]
    assert secret == token_secret_name("coder")
    assert "meshgate-join-coder" in (DEPLOY / "agents" / "example-agent.yaml").read_text()


def test_exec_probes_are_valid_python() -> None:
    for dep in (d for d in ALL if d["kind"] == "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = c.get(probe, {}).get("exec", {}).get("command")
                if command:
                    assert command[:2] == ["python3", "-c"]
                    compile(command[2], probe, "exec")


def test_placeholder_ca_bundle_is_base64() -> None:
    hook = find("MutatingWebhookConfiguration", "meshgate-injector")["webhooks"][0]
    try:
        base64.b64decode(hook["clientConfig"]["caBundle"], validate=True)
    except binascii.Error as exc:  # pragma: no cover - the assertion message is the point
        raise AssertionError(f"caBundle is not base64: {exc}") from None


def test_serve_gateway_address_reaches_the_sidecars_gateway_cluster(tmp_path: Path) -> None:
    """The control plane's `--gateway-address` is what makes in-cluster sidecars dial the
    gateway Service instead of loopback."""
    from envoy.config.cluster.v3 import cluster_pb2

    from meshgate.controlplane.server import ControlPlane, ServeOptions
    from meshgate.controlplane.sources import DirectorySource
    from meshgate.sidecar.launcher import parse_address
    from meshgate.xds.sidecar import GATEWAY_CLUSTER, sidecar_resources

    cp_cmd = container(find("Deployment", "meshgate-control-plane"))["command"]
    address = parse_address(flag(cp_cmd, "--gateway-address"))
    opts = ServeOptions(gateway_address=address)
    cp = ControlPlane(DirectorySource(tmp_path), tmp_path / "state", opts)
    clusters = [
        r
        for r in sidecar_resources("coder", 15001, cp.translate)
        if isinstance(r, cluster_pb2.Cluster) and r.name == GATEWAY_CLUSTER
    ]
    (cluster,) = clusters
    sock = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sock.address, sock.port_value) == ("meshgate-gateway.meshgate-system.svc", 15001)


def test_the_delegation_port_is_exposed_to_gateways_only() -> None:
    """Gateways forward `meshgate.internal` to the control plane's Service, so any replica may
    answer; agents never reach the port themselves (only through a gateway, which adds the key
    and the verified identity)."""
    dep = find("Deployment", "meshgate-control-plane")
    cp = container(dep)
    ports = {p["name"]: p["containerPort"] for p in cp["ports"]}
    assert str(ports["delegation"]) == flag(cp["command"], "--delegation-port")
    svc = find("Service", "meshgate-control-plane")
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["name"] == "delegation"]
    assert svc_port["targetPort"] == "delegation"
    address = f"meshgate-control-plane.meshgate-system.svc:{svc_port['port']}"
    assert flag(cp["command"], "--delegation-address") == address
    assert flag(cp["command"], "--host") == "0.0.0.0"  # the endpoint listens on the pod IP
    rules = find("NetworkPolicy", "meshgate-control-plane-ingress")["spec"]["ingress"]
    (rule,) = [r for r in rules if {"protocol": "TCP", "port": ports["delegation"]} in r["ports"]]
    assert rule["ports"] == [{"protocol": "TCP", "port": ports["delegation"]}]
    gateway_pod = find("Deployment", "meshgate-gateway")["spec"]["template"]["metadata"]["labels"]
    agent_pod = find("Deployment", "coder")["spec"]["template"]["metadata"]["labels"]
    assert all("namespaceSelector" not in p for p in rule["from"])  # meshgate-system only
    assert any(selects(p["podSelector"], gateway_pod) for p in rule["from"])
    assert not any(selects(p["podSelector"], agent_pod) for p in rule["from"])
    injector_pod = find("Deployment", "meshgate-injector")["spec"]["template"]["metadata"]
    assert not any(selects(p["podSelector"], injector_pod["labels"]) for p in rule["from"])


def test_replicas_share_sub_agents_through_the_audit_stores_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cp = container(find("Deployment", "meshgate-control-plane"))
    env = {e["name"]: e for e in cp["env"]}
    assert (
        env["MESHGATE_DELEGATION_STORE"]["valueFrom"]["secretKeyRef"]
        == env["MESHGATE_AUDIT_STORE"]["valueFrom"]["secretKeyRef"]
    )
    # `serve` reads the variable itself when --delegation-store is absent
    assert "--delegation-store" not in cp["command"]
    monkeypatch.setenv("MESHGATE_DELEGATION_STORE", "postgresql://db/meshgate")
    ctx = _parse_with_cli([expand(cp, arg) for arg in cp["command"]])
    assert ctx.params["delegation_store"] == "postgresql://db/meshgate"
    monkeypatch.delenv("MESHGATE_DELEGATION_STORE")
    ctx = _parse_with_cli([expand(cp, arg) for arg in cp["command"]])
    assert ctx.params["delegation_store"] is None  # the state dir's file store


async def test_gateways_are_sent_to_the_delegation_service_address(tmp_path: Path) -> None:
    """`--delegation-address` is what gateways route `meshgate.internal` to: the Service, so a
    request may reach either replica."""
    from meshgate.controlplane.server import ControlPlane, ServeOptions
    from meshgate.controlplane.sources import DirectorySource
    from meshgate.delegation.expand import SERVICE_HOST, expand
    from meshgate.policy.model import Mesh, PolicyModel
    from meshgate.sidecar.launcher import parse_address

    cmd = container(find("Deployment", "meshgate-control-plane"))["command"]
    opts = ServeOptions(
        mtls=True,
        delegation_port=0,  # the manifest's port may be taken here; the address is the point
        delegation_address=parse_address(flag(cmd, "--delegation-address")),
    )
    cp = ControlPlane(DirectorySource(tmp_path), tmp_path / "state", opts)
    assert cp.delegation is not None
    await cp.delegation.start()
    try:
        service = cp.delegation.service()
    finally:
        await cp.delegation.stop()
    assert service is not None
    model = expand(PolicyModel(Mesh(), (), (), "v1"), (), service).model
    (dest,) = [d for d in model.destinations if d.host == SERVICE_HOST]
    assert dest.address == ("meshgate-control-plane.meshgate-system.svc", 18002)
