"""The mesh under attack works for honest use first: an allowed call passes, others are refused."""

from __future__ import annotations

import pytest
from hostile_mesh import Mesh

pytestmark = pytest.mark.e2e

HONEST = """\
import json, os, urllib.request, urllib.error
out = {}
for url in ("http://docs.internal/v1/search", "http://billing.internal/invoices"):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out[url] = r.status
    except urllib.error.HTTPError as e:
        out[url] = e.code
out["uid"] = os.getuid()
print(json.dumps(out))
"""


def test_allowed_and_refused(mesh: Mesh) -> None:
    seen = mesh.agent_python("researcher", HONEST)
    assert seen["http://docs.internal/v1/search"] == 200
    assert seen["http://billing.internal/invoices"] == 403
    records = mesh.audit("--agent", "researcher", "--destination", "billing")
    assert records and records[0]["decision"] == "denied"
