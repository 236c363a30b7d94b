"""Kubernetes test helpers: schema validation of objects and a tiny RFC 6902 JSONPatch applier."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate

# Native sidecars (init containers with restartPolicy: Always) are GA from 1.33; 1.37 is the
# newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.33", "1.37")


def validate(obj: dict[str, Any]) -> None:
    """Strict schema validation (unknown fields are errors) for every supported version."""
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = obj.get("metadata", {}).get("name")
            path = "/".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{obj['kind']} {name} (k8s {version}) at {path}: {exc.message}"
            ) from None


def apply_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 `add`, `remove`, `replace`, `test`: enough to apply what the webhook returns."""
    doc = copy.deepcopy(doc)
    for op in ops:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        if not tokens:
            raise AssertionError("whole-document ops are not used by the webhook")
        parent = doc
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent[last]
            assert current == op["value"], op
        elif isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                assert 0 <= index <= len(parent), op
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[index]
            elif kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            else:
                raise AssertionError(f"unsupported op {kind}")
        else:
            if kind in ("remove", "replace"):
                assert last in parent, f"{op['path']} does not exist"
            if kind == "remove":
                del parent[last]
            elif kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            else:
                raise AssertionError(f"unsupported op {kind}")
    return doc
