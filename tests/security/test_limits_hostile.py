"""A hostile agent tries to get past a global rate limit (`scope: global`: the gateway's Lua
limits filter asks the pacer, which spends tokens leased from the limit store).

`sec-global` may GET quota.internal /a and /b, 3 requests a minute for all gateway replicas,
failing closed. It fires 10 requests at once (leases must not admit more than the bucket
holds), then, the bucket empty, every variant it can think of: other spellings of the path and
the host, a query, headers the filter or the pacer might trust (the pacer's own verdict header,
x-ratelimit-*, another agent's identity), a huge header, HTTP/1.1 pipelining. Exactly 3
requests reach the upstream; every other one is refused with a reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from gateway_agent import AGENT_LIB

if TYPE_CHECKING:  # the fixture comes from tests/security/conftest.py
    from hostile_mesh import Mesh

pytestmark = pytest.mark.e2e

SCRIPT = (
    AGENT_LIB
    + r"""
import socket, threading

URL = "http://quota.internal"
MARK = {"x-test-case": "sec-global"}
out = {"burst": [], "after": {}}


def one(path, **headers):
    r = send("GET", URL + path, headers={**MARK, **headers})
    out["burst"].append([r["status"], r["headers"].get("x-ratelimit-remaining")])


threads = [threading.Thread(target=one, args=("/a" if i % 2 else "/b",)) for i in range(10)]
for t in threads:
    t.start()
for t in threads:
    t.join()

VARIANTS = {
    "double slash": ("//a", {}),
    "dot segment": ("/./a", {}),
    "query": ("/a?limit=none", {}),
    "verdict header": ("/a", {"x-meshgate-limit": "ok"}),
    "ratelimit headers": ("/a", {"x-ratelimit-remaining": "1000", "x-ratelimit-limit": "1000"}),
    "another agent": ("/a", {"x-meshgate-agent": "gw-rl"}),
    "upper-case host": ("/a", {"Host": "QUOTA.INTERNAL"}),
    "host with port": ("/a", {"Host": "quota.internal:80"}),
    "huge header": ("/a", {"x-pad": "p" * 70000}),
}
for name, (path, headers) in VARIANTS.items():
    try:
        r = send("GET", URL + path, headers={**MARK, **headers})
        body = r["body"]
        out["after"][name] = [r["status"], body.get("error") if isinstance(body, dict) else body]
    except Exception as e:  # a connection the sidecar or gateway closed: refused too
        out["after"][name] = [0, type(e).__name__]

# five requests pipelined on one connection
s = socket.create_connection((_PROXY.hostname, _PROXY.port), timeout=15)
s.sendall(b"".join(
    b"GET http://quota.internal/b HTTP/1.1\r\nHost: quota.internal\r\n"
    b"x-test-case: sec-global\r\n\r\n" for _ in range(5)))
data = b""
try:
    while data.count(b"HTTP/1.1 ") < 5:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except OSError:
    pass
s.close()
out["pipelined"] = [int(line.split(b" ")[1]) for line in data.split(b"\r\n")
                    if line.startswith(b"HTTP/1.1 ")]
print(json.dumps(out))
"""
)


def test_a_global_limit_admits_its_bucket_and_no_variant(mesh: Mesh) -> None:
    quota = mesh.upstreams["quota"]
    seen: dict[str, Any] = mesh.agent_python("sec-global", SCRIPT, timeout=120)
    burst = sorted(status for status, _ in seen["burst"])
    assert burst == [200] * 3 + [429] * 7, seen["burst"]
    for name, (status, error) in seen["after"].items():
        if name == "huge header":  # refused by Envoy's header limit before any route
            assert status in (0, 400, 431), (name, status, error)
            continue
        assert status == 429 and error == "rate_limited", (name, status, error)
    # answered in order until Envoy closes the connection after a local reply: none admitted
    assert seen["pipelined"] and set(seen["pipelined"]) == {429}, seen["pipelined"]
    reached = [h for h in quota.hits if h["headers"].get("x-test-case") == "sec-global"]
    assert len(reached) == 3, reached
    # refusals are audited as rate_limited, each with its agent
    # (the gateway refuses all 5 pipelined requests, whatever the agent read of the answers)
    refused = 7 + len(seen["after"]) - 1 + 5  # the huge header never reaches a route
    limited = mesh.audit(
        "--agent", "sec-global", "--decision", "rate_limited", "--limit", "100", min_count=refused
    )
    assert len(limited) == refused, (len(limited), refused)
    allowed = mesh.audit("--agent", "sec-global", "--decision", "allowed", min_count=3)
    assert len(allowed) == 3, allowed
