"""Injection and HTTPS interception: apps trust the agent-trust CA through a bundle the sidecar
writes into a volume they mount read-only; nothing of it without the ConfigMap."""

from __future__ import annotations

from typing import Any

import pytest
from kube import apply_patch, validate

from meshgate.errors import ConfigError
from meshgate.sidecar.injector import (
    AGENT_TRUST_FILE,
    TRUST_DIR,
    InjectError,
    InjectSettings,
    inject,
    patch_for,
)
from meshgate.sidecar.trust_bundle import BUNDLE_VARIABLES, EXTRA_CA_VARIABLES


def pod(**container: Any) -> dict[str, Any]:
    app = {"name": "app", "image": "node:22", **container}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "labels": {"meshgate.dev/agent": "coder"}},
        "spec": {"initContainers": [{"name": "setup", "image": "busybox"}], "containers": [app]},
    }


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_apps_trust_the_bundle_the_sidecar_writes() -> None:
    original = pod(
        env=[{"name": "SSL_CERT_FILE", "value": "/etc/mine.pem"}],
        volumeMounts=[{"name": "data", "mountPath": "/data"}],
    )
    original["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    out = inject(original, InjectSettings())
    validate(out)
    sidecar, setup = out["spec"]["initContainers"]
    (app,) = out["spec"]["containers"]
    cmd = sidecar["command"]
    assert cmd[cmd.index("--agent-trust-ca") + 1] == AGENT_TRUST_FILE
    assert cmd[cmd.index("--trust-dir") + 1] == TRUST_DIR
    assert {"name": "meshgate-trust", "mountPath": TRUST_DIR} in sidecar["volumeMounts"]
    for container in (setup, app):
        env = env_of(container)
        for name in BUNDLE_VARIABLES:
            assert env[name] == f"{TRUST_DIR}/ca-bundle.pem"  # the app's own value replaced
        for name in EXTRA_CA_VARIABLES:
            assert env[name] == f"{TRUST_DIR}/agent-trust-ca.pem"
        trust = [m for m in container["volumeMounts"] if m["name"] == "meshgate-trust"]
        assert trust == [{"name": "meshgate-trust", "mountPath": TRUST_DIR, "readOnly": True}]
    assert {"name": "data", "mountPath": "/data"} in app["volumeMounts"]
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["meshgate-trust"]["emptyDir"]["medium"] == "Memory"
    sources = volumes["meshgate-token"]["projected"]["sources"]
    (trust_ca,) = [
        s for s in sources if s.get("configMap", {}).get("name") == "meshgate-agent-trust"
    ]
    assert trust_ca["configMap"]["items"] == [{"key": "ca.crt", "path": "agent-trust-ca.crt"}]
    assert apply_patch(original, patch_for(original, InjectSettings())) == out


def test_without_the_configmap_trust_is_left_alone() -> None:
    settings = InjectSettings(agent_trust_configmap=None)
    original = pod(env=[{"name": "SSL_CERT_FILE", "value": "/etc/mine.pem"}])
    out = inject(original, settings)
    validate(out)
    assert "--agent-trust-ca" not in out["spec"]["initContainers"][0]["command"]
    assert env_of(out["spec"]["containers"][0])["SSL_CERT_FILE"] == "/etc/mine.pem"
    assert "meshgate-trust" not in {v["name"] for v in out["spec"]["volumes"]}
    assert "volumeMounts" not in out["spec"]["containers"][0]
    assert apply_patch(original, patch_for(original, settings)) == out


def test_a_pod_may_not_bring_its_own_trust_volume() -> None:
    with pytest.raises(InjectError, match="meshgate-trust"):
        inject(pod(volumeMounts=[{"name": "meshgate-trust", "mountPath": "/x"}]), InjectSettings())


def test_configmap_name_is_checked() -> None:
    with pytest.raises(ConfigError, match="--agent-trust-configmap"):
        InjectSettings(agent_trust_configmap="Not A Name")
