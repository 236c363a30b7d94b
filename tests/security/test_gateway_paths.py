"""A hostile agent tries to leave a path prefix, or to blind the audit trail with a long path.

`researcher` may GET only `/v1/docs/*` and `/v1/search` on docs.internal. Dot segments, encoded
dots and slashes, `..;`, backslashes: the gateway matches rules on the canonical path and
forwards that same path, or refuses what it cannot make canonical. Paths over 8 KiB are refused;
shorter ones are recorded whole, tail included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from gateway_agent import AGENT_LIB

if TYPE_CHECKING:  # the fixture comes from tests/security/conftest.py; a plain import of
    from conftest import Mesh  # "conftest" can name another directory's conftest in a mixed run

pytestmark = pytest.mark.e2e

ESCAPES = [
    "/v1/docs/../../admin",
    "/v1/docs/./../../admin",
    "/v1/docs/%2e%2e/%2e%2e/admin",
    "/v1/docs/%2E%2E/%2E%2E/admin",
    "/v1/docs/.%2e/.%2e/admin",
    "/v1/docs/..%2F..%2Fadmin",
    "/v1/docs/..%2f..%2fadmin",
    "/v1/docs/..;/..;/admin",
    "/v1/docs/..%3b/..%3b/admin",
    "/v1/docs/..\\..\\admin",
    "/v1/docs/..%5c..%5cadmin",
    "/v1/docs/..%5C..%5Cadmin",
    "/v1/docs/a/../../../admin",
    "/v1/search/../admin",
]
CANONICAL = {  # admitted, and forwarded as the path the rule matched
    "/v1/docs//a": "/v1/docs/a",
    "/v1/docs/x/../y": "/v1/docs/y",
    "/v1/docs/./z": "/v1/docs/z",
}
TAIL = "/tail-of-a-long-path"
LONG_OK = "/v1/docs/" + "b" * 3000 + TAIL
TOO_LONG = "/v1/docs/" + "c" * 9000

SCRIPT = (
    AGENT_LIB
    + f"""
ESCAPES = {ESCAPES!r}
CANONICAL = {list(CANONICAL)!r}
out = {{}}
for path in ESCAPES + CANONICAL + [{LONG_OK!r}, {TOO_LONG!r}]:
    r = send("GET", "http://docs.internal" + path, headers={{"x-test-case": path[:60]}})
    out[path] = {{"status": r["status"], "body": r["body"]}}
print(json.dumps(out))
"""
)


def test_paths_are_canonical_or_refused(mesh: Mesh) -> None:
    docs = mesh.upstreams["docs"]
    docs.clear()
    seen: dict[str, Any] = mesh.agent_python("researcher", SCRIPT, timeout=120)

    # nothing but the two rules' paths reached the upstream, and only in canonical form
    for hit in docs.hits:
        path = hit["path"]
        assert path.startswith("/v1/docs/") or path == "/v1/search", hit
        assert not any(bad in path.lower() for bad in ("..", "%2e", "%2f", "%5c", "\\", ";")), hit
    forwarded = [h["path"] for h in docs.hits]
    assert forwarded[: len(CANONICAL)] == list(CANONICAL.values())
    assert forwarded[-1] == LONG_OK  # forwarded whole

    for path in ESCAPES:
        r = seen[path]
        assert r["status"] in (400, 403), (path, r)
        assert isinstance(r["body"], dict), (path, r)  # a JSON reason, not Envoy's bare 400
        assert r["body"]["error"] in ("egress_denied", "path_not_canonical"), (path, r)
        assert r["body"]["reason"]
    for path in CANONICAL:
        assert seen[path]["status"] == 200, (path, seen[path])
    assert seen[LONG_OK]["status"] == 200
    assert seen[TOO_LONG]["status"] == 414
    assert seen[TOO_LONG]["body"]["error"] == "path_too_long"

    records = mesh.audit(
        "--agent", "researcher", "--destination", "docs", "--since", "5m", "--limit", "1000",
        min_count=len(ESCAPES) + len(CANONICAL) + 2,
    )  # fmt: skip
    long_ok = [r for r in records if r["path"].endswith(TAIL)]
    assert long_ok and long_ok[0]["path"] == LONG_OK, "the path is recorded whole"
    too_long = [r for r in records if r["reason"] == "path_too_long"]
    assert too_long and too_long[0]["decision"] == "denied"
    assert too_long[0]["path"] == TOO_LONG
    not_canonical = [r for r in mesh.audit("--agent", "researcher", "--decision", "denied",
                                           "--since", "5m", "--limit", "1000")
                     if r["reason"] == "path_not_canonical"]  # fmt: skip
    assert not_canonical, "escapes Envoy cannot canonicalise are refused and audited"
    # every refused escape left a record saying where it was really going
    assert [r for r in records if r["path"] == "/admin" and r["decision"] == "denied"]
