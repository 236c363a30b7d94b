"""PolicyModel <-> JSON-able dict, exact round trip, so the control plane can serve its running
model and `meshgate plan` can diff a local policy against it.

The model holds secret *names* and header formats only, never secret values.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from meshgate.errors import PolicyError
from meshgate.policy.model import PolicyModel

JSON_FORMAT = 1
_ADAPTER: TypeAdapter[PolicyModel] = TypeAdapter(PolicyModel)


def model_to_json(model: PolicyModel) -> dict[str, Any]:
    """A dict of JSON types (lists for tuples), tagged with a format number."""
    data: dict[str, Any] = _ADAPTER.dump_python(model, mode="json")
    return {"format": JSON_FORMAT, **data}


def model_from_json(data: Any) -> PolicyModel:
    """Inverse of `model_to_json`; raises PolicyError (never anything else) on malformed input."""
    if not isinstance(data, dict):
        raise PolicyError(["policy JSON: expected an object"])
    if data.get("format") != JSON_FORMAT:
        raise PolicyError([f"policy JSON: unsupported format {data.get('format')!r}"])
    body = {k: v for k, v in data.items() if k != "format"}
    try:
        return _ADAPTER.validate_python(body, strict=False)
    except ValidationError as e:
        problems = [
            f"policy JSON: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in e.errors(include_url=False)
        ]
        raise PolicyError(problems) from None
