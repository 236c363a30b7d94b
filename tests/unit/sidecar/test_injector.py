"""The pure injector: what a labelled pod gains, what is left alone, and patch == offline result."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from kube import apply_patch, validate

from meshgate.errors import ConfigError
from meshgate.sidecar.injector import (
    INJECTED_ANNOTATION,
    SIDECAR_NAME,
    XDS_CA_FILE,
    InjectError,
    InjectSettings,
    inject,
    inject_manifests,
    inject_object,
    patch_for,
    token_secret,
)

SETTINGS = InjectSettings(image="registry.example/meshgate:1.2.3", control_plane="cp.svc:18000")
PROXY_NAMES = {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"}


def pod(agent: str | None = "coder", **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p", "namespace": "agents"}
    if agent is not None:
        metadata["labels"] = {"meshgate.dev/agent": agent, "app": "x"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "app", "image": "python:3.12"}], **spec},
    }


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from>") for e in container.get("env", [])}


def test_labelled_pod_gets_native_sidecar_first_and_validates() -> None:
    original = pod(initContainers=[{"name": "migrate", "image": "busybox"}])
    out = inject(original, SETTINGS)
    validate(out)
    sidecar = out["spec"]["initContainers"][0]
    assert sidecar["name"] == SIDECAR_NAME and sidecar["restartPolicy"] == "Always"
    assert out["spec"]["initContainers"][1]["name"] == "migrate"  # runs after the proxy is up
    assert sidecar["image"] == "registry.example/meshgate:1.2.3"
    cmd = sidecar["command"]
    assert cmd[:3] == ["meshgate", "sidecar", "run"] and "--" not in cmd  # no CMD: Envoy only
    assert cmd[cmd.index("--agent") + 1] == "coder"
    assert cmd[cmd.index("--control-plane") + 1] == "cp.svc:18000"
    assert cmd[cmd.index("--token-file") + 1] == "/var/run/meshgate/token/token"
    assert cmd[cmd.index("--instance") + 1] == "$(MESHGATE_POD_NAME)"
    assert sidecar["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # probes: the loopback health listener; Envoy's admin is a unix socket in the state
    # volume, which only the sidecar mounts
    assert cmd[cmd.index("--health-port") + 1] == "15021" and "--admin-port" not in cmd
    assert "127.0.0.1:15021/healthz/ready" in sidecar["startupProbe"]["exec"]["command"][-1]
    mounted = {m["name"] for c in out["spec"]["containers"] for m in c.get("volumeMounts", [])}
    assert not mounted & {"meshgate-token", "meshgate-state"}
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert set(sidecar["resources"]) == {"requests", "limits"}
    assert out["metadata"]["annotations"] == {INJECTED_ANNOTATION: "true"}
    assert original["spec"]["initContainers"] == [{"name": "migrate", "image": "busybox"}]


def test_token_comes_from_the_agents_secret_via_a_projected_volume() -> None:
    out = inject(pod(), SETTINGS)
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    source = volumes["meshgate-token"]["projected"]["sources"][0]["secret"]
    assert source == {"name": "meshgate-join-coder", "items": [{"key": "token", "path": "token"}]}
    sidecar = out["spec"]["initContainers"][0]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["meshgate-token"]["readOnly"] is True
    # only the sidecar mounts the token: the agent's containers cannot read it
    for container in out["spec"]["containers"]:
        assert all(m["name"] != "meshgate-token" for m in container.get("volumeMounts", []))


def test_sidecar_verifies_the_xds_port_with_the_ca_from_a_configmap_in_the_same_volume() -> None:
    out = inject(pod(), SETTINGS)
    validate(out)
    sidecar = out["spec"]["initContainers"][0]
    cmd = sidecar["command"]
    assert cmd[cmd.index("--xds-ca") + 1] == XDS_CA_FILE == "/var/run/meshgate/token/ca.crt"
    (volume,) = [v for v in out["spec"]["volumes"] if v["name"] == "meshgate-token"]
    sources = volume["projected"]["sources"]
    assert sources[1] == {
        "configMap": {"name": "meshgate-xds-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    }
    assert "optional" not in sources[1]["configMap"]  # no CA: the pod does not start
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "meshgate-token")
    assert f"{mount['mountPath']}/ca.crt" == XDS_CA_FILE


def test_plaintext_xds_has_no_ca_and_another_configmap_name_is_used() -> None:
    plain = inject(pod(), InjectSettings(xds_ca_configmap=None))
    validate(plain)
    assert "--xds-ca" not in plain["spec"]["initContainers"][0]["command"]
    (volume,) = [v for v in plain["spec"]["volumes"] if v["name"] == "meshgate-token"]
    sources = volume["projected"]["sources"]
    assert [next(iter(s)) for s in sources] == ["secret", "configMap"]
    assert sources[1]["configMap"]["name"] == "meshgate-agent-trust"  # not the xDS CA
    other = inject(pod(), InjectSettings(xds_ca_configmap="corp-ca.v2"))
    sources = other["spec"]["volumes"][0]["projected"]["sources"]
    assert sources[1]["configMap"]["name"] == "corp-ca.v2"


def test_every_other_container_gets_the_proxy_env_and_meshgate_values_win() -> None:
    app_env = [
        {"name": "NO_PROXY", "value": "*"},  # a bypass attempt
        {"name": "HTTPS_PROXY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "KEEP", "value": "me"},
    ]
    original = pod(
        initContainers=[{"name": "init", "image": "busybox"}],
        containers=[
            {"name": "app", "image": "python:3.12", "env": app_env},
            {"name": "tool", "image": "node:22"},
        ],
    )
    out = inject(original, SETTINGS)
    validate(out)
    others = out["spec"]["initContainers"][1:] + out["spec"]["containers"]
    assert [c["name"] for c in others] == ["init", "app", "tool"]
    for container in others:
        env = env_of(container)
        assert set(env) >= PROXY_NAMES
        assert env["HTTP_PROXY"] == env["https_proxy"] == "http://127.0.0.1:15080"
        assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
        assert len(container["env"]) == len(env)  # no duplicates
    assert env_of(out["spec"]["containers"][0])["KEEP"] == "me"
    assert PROXY_NAMES.isdisjoint(env_of(out["spec"]["initContainers"][0]))  # not the sidecar


def test_sidecar_port_setting_reaches_the_proxy_env() -> None:
    out = inject(pod(), InjectSettings(sidecar_port=16000, health_port=16001))
    assert env_of(out["spec"]["containers"][0])["HTTP_PROXY"] == "http://127.0.0.1:16000"
    probe = out["spec"]["initContainers"][0]["readinessProbe"]["exec"]["command"][2]
    assert "16001/healthz/ready" in probe


def test_unlabelled_pod_is_left_alone() -> None:
    original = pod(agent=None)
    assert inject(original, SETTINGS) is original
    assert patch_for(original, SETTINGS) == []


def test_injection_is_idempotent() -> None:
    once = inject(pod(), SETTINGS)
    assert inject(once, SETTINGS) == once
    assert patch_for(once, SETTINGS) == []
    # the sidecar's presence alone (annotation stripped by someone) also means "done"
    stripped = copy.deepcopy(once)
    del stripped["metadata"]["annotations"]
    assert patch_for(stripped, SETTINGS) == []


PATCH_CASES = {
    "bare": pod(),
    "no-metadata-annotations-but-init-and-volumes": pod(
        initContainers=[{"name": "a", "image": "x"}, {"name": "b", "image": "y", "env": []}],
        volumes=[{"name": "data", "emptyDir": {}}],
    ),
    "annotations-and-env": {
        **pod(containers=[{"name": "c", "image": "i", "env": [{"name": "X", "value": "1"}]}]),
        "metadata": {
            "generateName": "coder-",
            "labels": {"meshgate.dev/agent": "coder"},
            "annotations": {"team/owner": "ml"},
        },
    },
}


@pytest.mark.parametrize("name", sorted(PATCH_CASES))
def test_json_patch_applied_to_the_original_equals_offline_injection(name: str) -> None:
    original = PATCH_CASES[name]
    ops = patch_for(original, SETTINGS)
    assert ops and all(op["op"] == "add" for op in ops)
    patched = apply_patch(original, ops)
    assert patched == inject(original, SETTINGS)
    validate(patched)
    assert apply_patch(patched, patch_for(patched, SETTINGS)) == patched


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (pod(agent="Coder_1"), "lower-case"),
        (pod(hostNetwork=True), "hostNetwork"),
        (pod(volumes=[{"name": "meshgate-token", "emptyDir": {}}]), "meshgate-token"),
        # an app container naming the sidecar's volumes would mount them once injected: the
        # state volume holds Envoy's admin socket, the token volume the join token
        (
            pod(containers=[{"name": "app", "volumeMounts": [{"name": "meshgate-state"}]}]),
            "'app' mounts meshgate-state",
        ),
        (
            pod(initContainers=[{"name": "i", "volumeMounts": [{"name": "meshgate-token"}]}]),
            "'i' mounts meshgate-token",
        ),
        ({"kind": "Pod", "metadata": {"labels": {"meshgate.dev/agent": "a"}}}, "containers"),
        (pod(containers=["not-an-object"]), "every entry"),
    ],
)
def test_pods_that_cannot_be_injected_are_refused_with_a_reason(
    bad: dict[str, Any], message: str
) -> None:
    with pytest.raises(InjectError, match=message):
        patch_for(bad, SETTINGS)
    with pytest.raises(InjectError, match=message):
        inject(bad, SETTINGS)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        InjectSettings(control_plane="no-port")
    with pytest.raises(ConfigError, match="must differ"):
        InjectSettings(sidecar_port=15090, health_port=15090)
    with pytest.raises(ConfigError, match="not a TCP port"):
        InjectSettings(sidecar_port=70000)
    for bad in ("", "Bad_Name", "x" * 254):
        with pytest.raises(ConfigError, match=r"^--xds-ca-configmap .*--no-xds-tls\)$"):
            InjectSettings(xds_ca_configmap=bad)


def deployment(kind: str, labelled: bool) -> dict[str, Any]:
    template: dict[str, Any] = {
        "metadata": {
            "labels": {"app": "a", **({"meshgate.dev/agent": "coder"} if labelled else {})}
        },
        "spec": {"containers": [{"name": "app", "image": "python:3.12"}]},
    }
    if kind == "Deployment":
        spec = {"selector": {"matchLabels": {"app": "a"}}, "template": template}
        return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "d"}, "spec": spec}
    template["spec"]["restartPolicy"] = "Never"
    if kind == "Job":
        return {
            "apiVersion": "batch/v1",
            "kind": kind,
            "metadata": {"name": "j"},
            "spec": {"template": template},
        }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "c"},
        "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}},
    }


@pytest.mark.parametrize("kind", ["Deployment", "Job", "CronJob"])
def test_controller_pod_templates_are_injected_when_labelled(kind: str) -> None:
    out = inject_object(deployment(kind, True), SETTINGS)
    validate(out)
    tpl = (
        out["spec"]["jobTemplate"]["spec"]["template"]
        if kind == "CronJob"
        else out["spec"]["template"]
    )
    assert tpl["spec"]["initContainers"][0]["name"] == SIDECAR_NAME
    untouched = deployment(kind, False)
    assert inject_object(untouched, SETTINGS) is untouched


def test_multi_document_manifest() -> None:
    docs = [
        pod(),
        deployment("Deployment", True),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "b"}},
        pod(agent=None),
    ]
    text = yaml.safe_dump_all(docs) + "---\n"  # a trailing empty document is ignored
    out = list(yaml.safe_load_all(inject_manifests(text, "m.yaml", SETTINGS)))
    assert len(out) == 4
    for doc in out:
        validate(doc)
    assert out[0]["spec"]["initContainers"][0]["name"] == SIDECAR_NAME
    assert out[1]["spec"]["template"]["spec"]["initContainers"][0]["name"] == SIDECAR_NAME
    assert out[2] == docs[2] and out[3] == docs[3]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [\n", r"^m.yaml:2:1: not valid YAML"),
        ("- 1\n", r"^m.yaml: document 1 is not a Kubernetes object"),
        ("", r"^m.yaml: no Kubernetes objects"),
        (yaml.safe_dump(pod(agent="BAD")), r"^m.yaml: document 1 \(Pod p\): label"),
    ],
)
def test_manifest_errors_are_one_line_naming_the_file(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        inject_manifests(text, "m.yaml", SETTINGS)
    assert "\n" not in str(info.value)


def test_token_secret_is_a_valid_secret_named_for_the_projected_volume() -> None:
    secret = token_secret("agent/coder", "tok", "id1", 1_800_000_000, "agents")
    validate(secret)
    assert secret["metadata"]["name"] == "meshgate-join-coder"
    assert secret["metadata"]["namespace"] == "agents"
    assert secret["stringData"] == {"token": "tok"}
    gw = token_secret("gateway/egress", "tok", "id2", 1_800_000_000, None)
    validate(gw)
    assert gw["metadata"]["name"] == "meshgate-join-gateway-egress"
    assert "namespace" not in gw["metadata"]


MESHGATE = [sys.executable, "-m", "meshgate.cli"]


def test_cli_inject_pod_and_token_secret(tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod()))
    res = subprocess.run(
        [*MESHGATE, "inject", "pod", str(manifest), "--image", "img:1", "--sidecar-port", "15081"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    out = yaml.safe_load(res.stdout)
    validate(out)
    assert out["spec"]["initContainers"][0]["image"] == "img:1"
    assert env_of(out["spec"]["containers"][0])["HTTP_PROXY"] == "http://127.0.0.1:15081"
    assert XDS_CA_FILE in out["spec"]["initContainers"][0]["command"]  # TLS by default

    for flags, configmap in (
        (["--xds-ca-configmap", "corp-ca"], "corp-ca"),
        (["--no-xds-tls"], None),
    ):
        res = subprocess.run(
            [*MESHGATE, "inject", "pod", str(manifest), *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        out = yaml.safe_load(res.stdout)
        validate(out)
        sources = out["spec"]["volumes"][0]["projected"]["sources"]
        names = [s["configMap"]["name"] for s in sources if "configMap" in s]
        assert names == [*([configmap] if configmap else []), "meshgate-agent-trust"]
        assert ("--xds-ca" in out["spec"]["initContainers"][0]["command"]) == bool(configmap)

    bad = subprocess.run(
        [*MESHGATE, "inject", "pod", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().endswith("missing.yaml: cannot read: No such file or directory")

    res = subprocess.run(
        [
            *MESHGATE,
            "token",
            "create",
            "--agent",
            "coder",
            "--format",
            "k8s-secret",
            "--namespace",
            "agents",
            "--ttl",
            "30d",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    secret = yaml.safe_load(res.stdout)
    validate(secret)
    claims = jwt.decode(secret["stringData"]["token"], options={"verify_signature": False})
    assert claims["sub"] == "agent/coder"
    assert secret["metadata"]["annotations"]["meshgate.dev/token-id"] == claims["jti"]
