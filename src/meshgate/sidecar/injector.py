"""Kubernetes sidecar injection, pure: a Pod (as a dict) in, the injected Pod or a JSONPatch out.

The admission webhook (`sidecar/webhook.py`) and `meshgate inject pod` share this code, so what
the cluster does and what an operator previews offline are the same function. Injection adds:

- the sidecar as a *native* sidecar (first init container, `restartPolicy: Always`): the kubelet
  starts it before every other container and waits for its startup probe (the sidecar's
  loopback `GET /healthz/ready`, which can change nothing: Envoy's admin is a unix socket in
  the sidecar's state volume, which no other container mounts), so an agent never runs before
  its proxy has its configuration;
- the proxy environment in every other container, overriding the pod's own values (a bypass
  such as `NO_PROXY=*` is the risk being closed);
- the join token from a projected volume that sources the Secret `meshgate-join-<agent>`, and
  in the same volume the CA that verifies the control plane's TLS xDS port, from a ConfigMap
  in the pod's namespace (`meshgate-xds-ca`, key `ca.crt`; none for a plaintext lab cluster);
- an emptyDir for the bootstrap the sidecar writes at start, and the `meshgate.dev/injected`
  annotation. A pod that carries that annotation or the sidecar is left as is (idempotent);
- HTTPS interception trust (sidecar/trust_bundle.py): the agent-trust CA from the ConfigMap
  `meshgate-agent-trust` (key `ca.crt`, in the token volume: only the sidecar reads it), from
  which the sidecar writes the pod's bundle (system CAs + that CA) into an emptyDir every other
  container mounts read-only at /var/run/meshgate/trust, with SSL_CERT_FILE, REQUESTS_CA_BUNDLE,
  NODE_EXTRA_CA_CERTS and the rest pointing there. The sidecar writes it before Envoy starts,
  so it exists before the startup probe lets the app containers start.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from meshgate.errors import ConfigError
from meshgate.sidecar.bootstrap import HEALTH_PATH
from meshgate.sidecar.launcher import parse_address, proxy_environment
from meshgate.sidecar.trust_bundle import BUNDLE_FILE, CA_FILE, trust_environment

AGENT_LABEL = "meshgate.dev/agent"
INJECTED_ANNOTATION = "meshgate.dev/injected"
SIDECAR_NAME = "meshgate-proxy"
TOKEN_VOLUME = "meshgate-token"
STATE_VOLUME = "meshgate-state"
TRUST_VOLUME = "meshgate-trust"  # the agent's CA bundle: written by the sidecar, read by apps
INJECTED_VOLUMES = frozenset({TOKEN_VOLUME, STATE_VOLUME, TRUST_VOLUME})  # only injection mounts
TRUST_DIR = "/var/run/meshgate/trust"
TOKEN_DIR = "/var/run/meshgate/token"
TOKEN_FILE = f"{TOKEN_DIR}/token"
XDS_CA_KEY = "ca.crt"  # the ConfigMap key; also the file name in the token volume
XDS_CA_FILE = f"{TOKEN_DIR}/{XDS_CA_KEY}"
DEFAULT_XDS_CA_CONFIGMAP = "meshgate-xds-ca"
AGENT_TRUST_KEY = "ca.crt"  # the ConfigMap key
AGENT_TRUST_FILE = f"{TOKEN_DIR}/agent-trust-ca.crt"
DEFAULT_AGENT_TRUST_CONFIGMAP = "meshgate-agent-trust"
STATE_DIR = "/var/run/meshgate/state"
POD_NAME_ENV = "MESHGATE_POD_NAME"
SIDECAR_UID = 1337
DEFAULT_IMAGE = "ghcr.io/meshgate/meshgate:0.1.0"
DEFAULT_CONTROL_PLANE = "meshgate-control-plane.meshgate-system.svc:18000"

_AGENT_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Controllers whose pod template we inject offline (`meshgate inject pod`); the webhook sees Pods.
_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

JsonPatch = list[dict[str, Any]]


class InjectError(ConfigError):
    """A labelled pod that cannot be injected; the message says why (admission is refused)."""


@dataclass(frozen=True)
class InjectSettings:
    """What the injected sidecar looks like; must agree with the control plane's flags."""

    image: str = DEFAULT_IMAGE
    control_plane: str = DEFAULT_CONTROL_PLANE  # HOST:PORT of the xDS Service
    sidecar_port: int = 15080  # the sidecar's proxy in the pod's own network; apps' HTTP_PROXY
    health_port: int = 15021  # the sidecar's loopback GET /healthz/ready (its probes)
    image_pull_policy: str = "IfNotPresent"
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"
    # ConfigMap (in the pod's namespace) whose `ca.crt` verifies the control plane's TLS xDS
    # port; None: plaintext xDS (`--no-xds-tls`, a lab cluster only: the join token is sent
    # in the clear).
    xds_ca_configmap: str | None = DEFAULT_XDS_CA_CONFIGMAP
    # ConfigMap (in the pod's namespace) whose `ca.crt` is the control plane's agent-trust CA
    # (<state>/agent-trust/ca.pem): apps trust it for https:// to intercepted destinations.
    # None: apps' trust is left alone (https:// to tls: originate destinations then fails).
    agent_trust_configmap: str | None = DEFAULT_AGENT_TRUST_CONFIGMAP

    def __post_init__(self) -> None:
        parse_address(self.control_plane)  # ConfigError on a bad HOST:PORT
        for name in ("sidecar_port", "health_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ConfigError(f"--{name.replace('_', '-')} {port}: not a TCP port")
        if self.sidecar_port == self.health_port:
            raise ConfigError("--sidecar-port and --health-port must differ")
        if not self.image:
            raise ConfigError("--image must not be empty")
        ca = self.xds_ca_configmap
        if ca is not None and not _configmap_name(ca):
            raise ConfigError(
                f"--xds-ca-configmap {ca!r}: not a ConfigMap name (for plaintext xDS use "
                "--no-xds-tls)"
            )
        trust = self.agent_trust_configmap
        if trust is not None and not _configmap_name(trust):
            raise ConfigError(
                f"--agent-trust-configmap {trust!r}: not a ConfigMap name ('' for none)"
            )


def _configmap_name(name: str) -> bool:
    return len(name) <= 253 and _DNS_SUBDOMAIN_RE.fullmatch(name) is not None


def token_secret_name(agent: str) -> str:
    """The Secret (in the pod's namespace) holding the agent's join token under key `token`."""
    return f"meshgate-join-{agent}"


def agent_of(pod: dict[str, Any]) -> str | None:
    """The agent a pod runs as, from its `meshgate.dev/agent` label; None when unlabelled."""
    value = _dict(_dict(pod, "metadata"), "labels").get(AGENT_LABEL)
    return None if value is None else str(value)


def is_injected(pod: dict[str, Any]) -> bool:
    annotations = _dict(_dict(pod, "metadata"), "annotations")
    spec = _dict(pod, "spec")
    containers = [*_list(spec, "initContainers"), *_list(spec, "containers")]
    names = {c.get("name") for c in containers if isinstance(c, dict)}
    return annotations.get(INJECTED_ANNOTATION) == "true" or SIDECAR_NAME in names


def needs_injection(pod: dict[str, Any]) -> str | None:
    """The agent to inject for, or None: unlabelled or already injected pods are left alone."""
    agent = agent_of(pod)
    if agent is None or is_injected(pod):
        return None
    if not _AGENT_RE.fullmatch(agent):
        raise InjectError(
            f"label {AGENT_LABEL}={agent!r}: an agent name is lower-case letters, digits and '-'"
        )
    spec = pod.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
        raise InjectError("pod has no spec.containers")
    for key in ("initContainers", "containers"):
        if not all(isinstance(c, dict) for c in _list(spec, key)):
            raise InjectError(f"spec.{key}: every entry must be an object")
    if spec.get("hostNetwork"):
        raise InjectError("hostNetwork pods cannot be injected: their loopback is the node's")
    names = {str(v.get("name")) for v in _list(spec, "volumes") if isinstance(v, dict)}
    taken = names & INJECTED_VOLUMES
    if taken:
        raise InjectError(f"pod already has a volume named {sorted(taken)[0]}")
    # Only the sidecar mounts these volumes: the token, and the state dir holding Envoy's admin
    # socket. A container naming them in advance would mount them once injection adds them.
    # (The trust volume too: injection mounts it read-only where the variables point.)
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in _list(spec, key):
            if not isinstance(container, dict):
                continue
            for mount in [*_list(container, "volumeMounts"), *_list(container, "volumeDevices")]:
                if isinstance(mount, dict) and mount.get("name") in INJECTED_VOLUMES:
                    raise InjectError(
                        f"container {container.get('name')!r} mounts {mount['name']}, which "
                        "only injection may mount"
                    )
    return agent


def sidecar_container(agent: str, settings: InjectSettings) -> dict[str, Any]:
    """The native sidecar: `meshgate sidecar run` with no command runs Envoy until signalled."""
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "command": [
            "meshgate",
            "sidecar",
            "run",
            "--agent",
            agent,
            "--control-plane",
            settings.control_plane,
            "--health-port",
            str(settings.health_port),
            "--proxy-port",
            str(settings.sidecar_port),
            "--instance",
            f"$({POD_NAME_ENV})",
            "--state-dir",
            STATE_DIR,
            "--token-file",
            TOKEN_FILE,
            *(
                ["--xds-ca", XDS_CA_FILE]
                if settings.xds_ca_configmap is not None
                else ["--insecure"]
            ),
            *(
                ["--agent-trust-ca", AGENT_TRUST_FILE, "--trust-dir", TRUST_DIR]
                if settings.agent_trust_configmap is not None
                else []
            ),
        ],
        "env": [
            {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            # the root filesystem is read-only: should the admin socket's path in the state dir
            # be too long for a unix socket, its private fallback directory goes here
            {"name": "TMPDIR", "value": STATE_DIR},
        ],
        # The health listener is on loopback only, so probes exec into the container instead
        # of an httpGet from the kubelet.
        "startupProbe": _ready_probe(settings, period=1, failures=120),
        "readinessProbe": _ready_probe(settings, period=5, failures=3),
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
            *(
                [{"name": TRUST_VOLUME, "mountPath": TRUST_DIR}]
                if settings.agent_trust_configmap is not None
                else []
            ),
        ],
    }


def _ready_probe(settings: InjectSettings, period: int, failures: int) -> dict[str, Any]:
    """Exits 0 when the sidecar's health listener answers 200: Envoy has its configuration
    and serves (it opens listeners only then); it cannot reach Envoy's admin."""
    url = f"http://127.0.0.1:{settings.health_port}{HEALTH_PATH}"
    check = f"import urllib.request as u; u.urlopen('{url}', timeout=1)"
    return {
        "exec": {"command": ["python3", "-c", check]},
        "timeoutSeconds": 2,
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def pod_volumes(agent: str, settings: InjectSettings) -> list[dict[str, Any]]:
    sources: list[dict[str, Any]] = [
        {"secret": {"name": token_secret_name(agent), "items": [{"key": "token", "path": "token"}]}}
    ]
    if settings.xds_ca_configmap is not None:
        # Not optional: without the CA the pod stays in ContainerCreating (FailedMount names
        # the ConfigMap) instead of a sidecar that cannot verify, or reach, the control plane.
        item = {"key": XDS_CA_KEY, "path": XDS_CA_KEY}
        sources.append({"configMap": {"name": settings.xds_ca_configmap, "items": [item]}})
    if settings.agent_trust_configmap is not None:
        # Not optional either: a pod whose apps would not trust their sidecar's certificates
        # waits, with FailedMount naming the ConfigMap, instead of failing every https:// call.
        item = {"key": AGENT_TRUST_KEY, "path": AGENT_TRUST_FILE.rpartition("/")[2]}
        sources.append({"configMap": {"name": settings.agent_trust_configmap, "items": [item]}})
    volumes: list[dict[str, Any]] = [
        {
            "name": TOKEN_VOLUME,
            # Only the sidecar mounts this volume; other containers cannot see the token.
            "projected": {"defaultMode": 0o444, "sources": sources},
        },
        {"name": STATE_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "32Mi"}},
    ]
    if settings.agent_trust_configmap is not None:
        volumes.append({"name": TRUST_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}})
    return volumes


def proxy_env(settings: InjectSettings) -> dict[str, str]:
    """The proxy variables, and with the agent-trust CA the trust variables (overriding the
    app's: a bundle without the CA would fail every https:// to an intercepted host)."""
    env = proxy_environment(f"http://127.0.0.1:{settings.sidecar_port}")
    if settings.agent_trust_configmap is not None:
        env |= trust_environment(f"{TRUST_DIR}/{BUNDLE_FILE}", f"{TRUST_DIR}/{CA_FILE}")
    return env


def with_trust_mount(mounts: Any, settings: InjectSettings) -> list[Any] | None:
    """The container's volume mounts plus the trust volume, read-only; None: unchanged."""
    if settings.agent_trust_configmap is None:
        return None
    entries = mounts if isinstance(mounts, list) else []
    return [*entries, {"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": True}]


def with_proxy_env(env: Any, settings: InjectSettings) -> list[Any]:
    """The container's env with meshgate's proxy variables replacing any the app set."""
    ours = proxy_env(settings)
    entries = env if isinstance(env, list) else []
    kept = [e for e in entries if not (isinstance(e, dict) and e.get("name") in ours)]
    return kept + [{"name": k, "value": v} for k, v in ours.items()]


def inject(pod: dict[str, Any], settings: InjectSettings) -> dict[str, Any]:
    """The injected pod (a copy); the pod itself when there is nothing to do."""
    agent = needs_injection(pod)
    if agent is None:
        return pod
    out = copy.deepcopy(pod)
    spec = out["spec"]
    for key in ("initContainers", "containers"):
        for container in _list(spec, key):
            container["env"] = with_proxy_env(container.get("env"), settings)
            mounts = with_trust_mount(container.get("volumeMounts"), settings)
            if mounts is not None:
                container["volumeMounts"] = mounts
    spec["initContainers"] = [sidecar_container(agent, settings), *_list(spec, "initContainers")]
    spec["volumes"] = [*_list(spec, "volumes"), *pod_volumes(agent, settings)]
    metadata = out.setdefault("metadata", {})
    metadata["annotations"] = {**_dict(metadata, "annotations"), INJECTED_ANNOTATION: "true"}
    return out


def patch_for(pod: dict[str, Any], settings: InjectSettings) -> JsonPatch:
    """RFC 6902 operations turning `pod` into `inject(pod)`; [] when nothing is to be done.

    Ops apply in order: env of the existing containers first (original indices), then the
    sidecar at initContainers/0, volumes, and the annotation.
    """
    agent = needs_injection(pod)
    if agent is None:
        return []
    spec = pod["spec"]
    ops: JsonPatch = []
    for key in ("initContainers", "containers"):
        for i, container in enumerate(_list(spec, key)):
            # "add" on an existing member replaces it (RFC 6902 4.1)
            env = with_proxy_env(container.get("env"), settings)
            ops.append({"op": "add", "path": f"/spec/{key}/{i}/env", "value": env})
            mounts = with_trust_mount(container.get("volumeMounts"), settings)
            if mounts is not None:
                path = f"/spec/{key}/{i}/volumeMounts"
                ops.append({"op": "add", "path": path, "value": mounts})
    sidecar = sidecar_container(agent, settings)
    if _list(spec, "initContainers"):
        ops.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    volumes = pod_volumes(agent, settings)
    if _list(spec, "volumes"):
        ops.extend({"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes)
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):
        ops.append({"op": "add", "path": "/metadata", "value": {}})
        metadata = {}
    if isinstance(metadata.get("annotations"), dict):
        path = "/metadata/annotations/" + _escape(INJECTED_ANNOTATION)
        ops.append({"op": "add", "path": path, "value": "true"})
    else:
        ops.append(
            {"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: "true"}}
        )
    return ops


def inject_object(obj: Any, settings: InjectSettings) -> Any:
    """One manifest document: a Pod, or a controller's pod template, injected; others as is."""
    if not isinstance(obj, dict):
        return obj
    kind = obj.get("kind")
    if kind == "Pod":
        return inject(obj, settings)
    path = _TEMPLATE_PATHS.get(str(kind))
    if path is None:
        return obj
    parent: Any = obj
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    template = parent.get(path[-1]) if isinstance(parent, dict) else None
    if not isinstance(template, dict):
        return obj
    injected = inject(template, settings)
    if injected is template:
        return obj
    out = copy.deepcopy(obj)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = injected
    return out


def _dict(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _list(spec: dict[str, Any], key: str) -> list[Any]:
    value = spec.get(key)
    return value if isinstance(value, list) else []


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def inject_manifests(text: str, source: str, settings: InjectSettings) -> str:
    """A (multi-document) YAML manifest with every labelled pod injected, as YAML text.

    Errors are ConfigError lines naming `source` (the file) and the document.
    """
    import yaml

    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}{where}: not valid YAML: {problem}") from None
    out = []
    for index, doc in enumerate(docs, 1):
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc:
            raise ConfigError(f"{source}: document {index} is not a Kubernetes object (no kind)")
        try:
            out.append(inject_object(doc, settings))
        except InjectError as exc:
            name = (doc.get("metadata") or {}).get("name", "?")
            raise ConfigError(f"{source}: document {index} ({doc['kind']} {name}): {exc}") from None
    if not out:
        raise ConfigError(f"{source}: no Kubernetes objects found")
    return str(yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False))


def token_secret(
    subject: str, token: str, token_id: str, expires_at: int, namespace: str | None
) -> dict[str, Any]:
    """The Secret the injected projected volume reads (`meshgate token create --format
    k8s-secret`): agents get `meshgate-join-<agent>`, gateways `meshgate-join-gateway-<name>`."""
    import datetime as dt

    kind, _, name = subject.partition("/")
    secret_name = token_secret_name(name) if kind == "agent" else f"meshgate-join-gateway-{name}"
    expiry = dt.datetime.fromtimestamp(expires_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    metadata: dict[str, Any] = {
        "name": secret_name,
        **({"namespace": namespace} if namespace else {}),
    }
    metadata |= {
        "labels": {"app.kubernetes.io/managed-by": "meshgate", f"meshgate.dev/{kind}": name},
        "annotations": {"meshgate.dev/token-id": token_id, "meshgate.dev/expires-at": expiry},
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "stringData": {"token": token},
    }
