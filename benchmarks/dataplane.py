"""Data-plane overhead: meshgate's sidecar + policy gateway vs hand-written static Envoys.

What: requests go agent -> sidecar Envoy -> egress gateway Envoy -> upstream, with both Envoys
configured over xDS by an in-process meshgate control plane serving a realistic policy (50
destinations, 100 agents x 5 rules, per-rule rate limits, credential injection). The same
upstream is also reached through (A) two bare Envoys with equivalent hand-written static configs
(same two hops: stamp the agent header; route by host, strip the agent header, inject the
credential) and (B) one bare static Envoy hop. All are measured in the same run with wrk.

Why: the policy (one route per agent/rule/path matched on a header, a method regex and the path,
local rate-limit and credential-injector filters, local_reply_config) must not cost much on the
hot path. Targets: meshgate >= 90% of the throughput of A, and added p99 latency under 1 ms per
hop at low load (one connection, which on this machine runs at or above 1,000 requests/s).

The upstream is a third Envoy answering with a static direct_response, so it is not the
bottleneck. Every Envoy runs with --concurrency 1 and, like every Envoy meshgate starts, has its
admin on a 0600 unix socket in its own working directory (stats are read through EnvoyAdmin).
The control plane (CONTROL_PLANE: plaintext xDS, no join tokens, no sidecar -> gateway mTLS, as
`serve --insecure`) does nothing on the hot path. wrk must be on PATH (`apt-get install wrk`).

    .venv/bin/python benchmarks/dataplane.py
    .venv/bin/python benchmarks/dataplane.py --duration 10 --connections 64 --json
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from meshgate.controlplane.server import ControlPlane, ServeOptions  # noqa: E402
from meshgate.controlplane.sources import DirectorySource  # noqa: E402
from meshgate.sidecar.bootstrap import (  # noqa: E402
    ADMIN_SOCKET_MODE,
    BootstrapSpec,
    ProxyBinding,
    write_bootstrap,
)
from meshgate.sidecar.envoy_admin import AdminSocket, EnvoyAdmin  # noqa: E402
from meshgate.sidecar.envoy_process import EnvoyProcess  # noqa: E402
from meshgate.xds.access_log import SPOOL_FORMAT  # noqa: E402

DESTINATIONS = 50
AGENTS = 100
RULES_PER_AGENT = 5
CREDENTIALED = 10  # destinations with an injected credential (each adds a gateway filter)
AGENT = "agent-000"  # the measured agent
TARGET = "tool-000"  # its destination, served by the upstream Envoy
HOST = f"{TARGET}.internal"
PATH = "/v1/x"
FORBIDDEN_PATH = "/v1/admin"
BODY = "ok\n"
CREDENTIAL_HEADER = "authorization"
CREDENTIAL_VALUE = "Bearer bench-secret-000"
AGENT_HEADER = "x-meshgate-agent"
RULE_LIMIT = 100_000_000  # the measured rule's bucket per minute: enforced, never trips
RATE_LIMIT_STATS = f"meshgate_rl.{TARGET}.http_local_rate_limit."
TARGET_THROUGHPUT_RATIO = 0.90
TARGET_ADDED_P99_MS = 1.0

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
HCM_TYPE = HCM + "HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
STDOUT_LOG = {
    "name": "envoy.access_loggers.stdout",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
    },
}

# As before issue 17's secure CLI defaults, and as `meshgate serve --insecure`: plaintext xDS
# without join tokens (control traffic only, nothing on the hot path) and plaintext sidecar ->
# gateway (the default's mTLS would add a TLS handshake and encryption that the bare baselines
# do not do). Ports 0: the OS picks; the audit store is SQLite in the state dir (no node ships
# to it: the spools stay on disk, as A's does).
CONTROL_PLANE = ServeOptions(
    xds_host="127.0.0.1",
    xds_port=0,
    admin_host="127.0.0.1",
    admin_port=0,
    gateway_bind="127.0.0.1",
    require_tokens=False,
    mtls=False,
    xds_tls=False,
)

AUDIT_LOG = {
    "name": "envoy.access_loggers.file",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": "bare-audit-spool.jsonl",  # relative: in Envoy's working directory, work/<name>
        "log_format": {"json_format": SPOOL_FORMAT},
    },
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Hand-written static Envoy configs: the upstream, baseline A (two hops) and baseline B (one hop)


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _static_cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }


def _listener(name: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": _address(port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {"@type": HCM_TYPE, **hcm},
                    }
                ]
            }
        ],
    }


def _bootstrap(
    admin: str, listener: dict[str, Any], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    """`admin`: a unix socket path, 0600, like every Envoy meshgate starts (no TCP admin)."""
    return {
        "admin": {"address": {"pipe": {"path": admin, "mode": ADMIN_SOCKET_MODE}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def upstream_config(admin: str, port: int) -> dict[str, Any]:
    """The upstream: a 200 with a tiny body straight from Envoy, no access log."""
    hcm = {
        "stat_prefix": "upstream",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": BODY}},
                        }
                    ],
                }
            ]
        },
        "http_filters": [ROUTER],
    }
    return _bootstrap(admin, _listener("upstream", port, hcm), [])


def static_sidecar_config(admin: str, port: int, gateway_port: int) -> dict[str, Any]:
    """Baseline A, hop 1: what meshgate's sidecar does, written by hand."""
    hcm = {
        "stat_prefix": "agent",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "to-gateway",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "gateway"}}],
                    "request_headers_to_add": [
                        {
                            "header": {"key": AGENT_HEADER, "value": AGENT},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    ],
                }
            ]
        },
        "http_filters": [ROUTER],
        "access_log": [STDOUT_LOG],
    }
    return _bootstrap(
        admin, _listener("agent-proxy", port, hcm), [_static_cluster("gateway", gateway_port)]
    )


def static_gateway_config(
    admin: str, port: int, upstream_port: int, agent_hop: bool
) -> dict[str, Any]:
    """Baseline A hop 2 (agent_hop) or baseline B: route by host, no per-agent policy."""
    vhost: dict[str, Any] = {
        "name": TARGET,
        "domains": [HOST, f"{HOST}:80"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
    }
    if agent_hop:
        vhost["request_headers_to_remove"] = [AGENT_HEADER]
        vhost["request_headers_to_add"] = [
            {
                "header": {"key": CREDENTIAL_HEADER, "value": CREDENTIAL_VALUE},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ]
    hcm = {
        "stat_prefix": "egress",
        "route_config": {
            "virtual_hosts": [
                vhost,
                {
                    "name": "unknown",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 403}}],
                },
            ]
        },
        "http_filters": [ROUTER],
        # A's gateway does the same per-request work as meshgate's: one JSON audit line (the
        # same fields) to a file; B keeps a plain stdout log
        "access_log": [AUDIT_LOG if agent_hop else STDOUT_LOG],
    }
    return _bootstrap(
        admin, _listener("egress-http", port, hcm), [_static_cluster("upstream", upstream_port)]
    )


# ---------------------------------------------------------------------------------------------
# meshgate policy: realistic size, the measured agent allowed on the target destination


def write_policy(directory: Path, gateway_port: int, upstream_port: int) -> None:
    """50 destinations (10 with credentials), 100 agents x 5 rules with methods, paths, limits."""
    directory.mkdir(parents=True)
    secrets = directory / "secrets"
    secrets.mkdir()
    docs = [
        "apiVersion: meshgate.dev/v1\nkind: Mesh\nmetadata: {name: default}\nspec:\n"
        f"  trustDomain: agents.bench\n  egressGateway: {{listenPort: {gateway_port}}}\n"
        "  secrets: {provider: file, path: ./secrets}\n"
    ]
    for i in range(DESTINATIONS):
        name = f"tool-{i:03d}"
        # only the target is reachable; the others point at a closed port (never requested)
        port = upstream_port if i == 0 else 9
        doc = (
            f"apiVersion: meshgate.dev/v1\nkind: Destination\nmetadata: {{name: {name}}}\n"
            f"spec:\n  host: {name}.internal\n  port: 80\n  tls: none\n"
            f"  address: 127.0.0.1:{port}\n"
        )
        if i < CREDENTIALED:
            doc += (
                f"  credentials: {{header: Authorization, secret: key-{i:03d}, "
                'format: "Bearer {secret}"}\n'
            )
            (secrets / f"key-{i:03d}").write_text(f"bench-secret-{i:03d}")
        docs.append(doc)
    for a in range(AGENTS):
        rules = []
        for r in range(RULES_PER_AGENT):
            dest = (a * 7 + r * 11) % DESTINATIONS
            if a == 0 and r == 0:
                dest = 0
            elif dest == 0:
                dest = 1
            if a == 0 and r == 0:
                # enforced (the rule's own bucket, checked by expect_rule_bucket), never trips
                limit = f"{{requests: {RULE_LIMIT}, per: 1m}}"
                paths = f'["{PATH}", "/v1/docs/*"]'
                methods = "[GET, HEAD]"
            else:
                limit = f"{{requests: {60 * (r + 1)}, per: 1m}}"
                paths = f'["/v{r}/items", "/v{r}/search", "/v{r}/docs/*"]'
                methods = "[GET]" if r % 2 else "[GET, POST]"
            rules.append(
                f"    - destination: tool-{dest:03d}\n      methods: {methods}\n"
                f"      paths: {paths}\n      rateLimit: {limit}\n"
            )
        docs.append(
            f"apiVersion: meshgate.dev/v1\nkind: AgentPolicy\nmetadata: {{name: agent-{a:03d}}}\n"
            f"spec:\n  agent: agent-{a:03d}\n  egress:\n" + "".join(rules)
        )
    (directory / "policy.yaml").write_text("---\n".join(docs))


# ---------------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    path: str
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(path: str, connections: int, out: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"unexpected wrk output (no {pattern!r}):\n{out}")
        return m

    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        path=path,
        connections=connections,
        requests_per_s=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        requests=int(find(r"^\s+(\d+) requests in").group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


async def run_wrk(path: str, port: int, connections: int, duration: float) -> WrkResult:
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-H",
        f"Host: {HOST}",
        f"http://127.0.0.1:{port}{PATH}",
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()}{out.decode()}")
    return parse_wrk(path, connections, out.decode())


# ---------------------------------------------------------------------------------------------
# processes and checks


def _get(port: int, path: str) -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": HOST})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, resp.read().decode(errors="replace"), headers
    finally:
        conn.close()


async def expect(
    name: str, port: int, path: str, status: int, body: str | None = None
) -> dict[str, str]:
    """Poll briefly (xDS may still be settling), then insist on the status (and body); returns
    the response's headers."""
    got: tuple[int, str, dict[str, str]] = (0, "", {})
    for _ in range(100):
        try:
            got = await asyncio.to_thread(_get, port, path)
        except OSError as exc:
            got = (0, str(exc), {})
        if got[0] == status and (body is None or got[1] == body):
            return got[2]
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{name}: GET {path} expected {status}, got {got[0]} {got[1][:200]!r}")


async def expect_rule_bucket(port: int) -> None:
    """The measured rule's own bucket (not the host's default) answers meshgate's requests: its
    size is in `x-ratelimit-limit`."""
    headers = await expect("meshgate", port, PATH, 200, BODY)
    if headers.get("x-ratelimit-limit") != str(RULE_LIMIT):
        raise RuntimeError(f"meshgate: not the rule's bucket of {RULE_LIMIT}: {headers}")


async def start_static(
    workdir: Path, name: str, config: Callable[[str], dict[str, Any]]
) -> EnvoyProcess:
    """`config(admin socket path)`: the bootstrap. Envoy runs in `workdir/name` (its spool)."""
    cwd = workdir / name
    admin = AdminSocket.in_dir(cwd)
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config(str(admin.path)), indent=2))
    envoy = EnvoyProcess(path, admin, workdir / f"{name}.log", cwd=cwd)
    await envoy.start()
    await envoy.wait_ready(30)
    return envoy


async def start_xds(
    workdir: Path,
    name: str,
    node: str,
    cluster: str,
    xds_port: int,
    proxy: ProxyBinding | None = None,
) -> EnvoyProcess:
    """A gateway or sidecar as the launcher starts one, over plaintext xDS without a token."""
    cwd = workdir / name
    admin = AdminSocket.in_dir(cwd)
    boot = workdir / f"{name}.json"
    write_bootstrap(
        boot, BootstrapSpec(node, cluster, "127.0.0.1", xds_port, str(admin.path), proxy=proxy)
    )
    envoy = EnvoyProcess(boot, admin, workdir / f"{name}.log", cwd=cwd)
    await envoy.start()
    await envoy.wait_ready(30)
    return envoy


async def bench(duration: float, connections: int, rounds: int) -> dict[str, Any]:
    envoys: list[EnvoyProcess] = []
    cp: ControlPlane | None = None
    with tempfile.TemporaryDirectory(prefix="meshgate-dataplane-") as tmp:
        work = Path(tmp)
        try:
            up_port = free_port()
            envoys.append(
                await start_static(work, "upstream", lambda admin: upstream_config(admin, up_port))
            )
            # baseline B: one bare hop
            b_port = free_port()
            envoys.append(
                await start_static(
                    work,
                    "bare-one-hop",
                    lambda admin: static_gateway_config(admin, b_port, up_port, False),
                )
            )
            # baseline A: two bare hops
            a_gw_port, a_sc_port = free_port(), free_port()
            envoys.append(
                await start_static(
                    work,
                    "bare-gateway",
                    lambda admin: static_gateway_config(admin, a_gw_port, up_port, True),
                )
            )
            envoys.append(
                await start_static(
                    work,
                    "bare-sidecar",
                    lambda admin: static_sidecar_config(admin, a_sc_port, a_gw_port),
                )
            )
            # meshgate: control plane in-process, gateway and sidecar over xDS
            mg_gw_port, mg_sc_port = free_port(), free_port()
            write_policy(work / "policy", mg_gw_port, up_port)
            cp = ControlPlane(DirectorySource(work / "policy"), work / "state", CONTROL_PLANE)
            await cp.start()
            for _ in range(600):
                if cp.ready:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("control plane did not apply the benchmark policy in 30 s")
            xds_port = int(cp.xds_address.rpartition(":")[2])  # the port it bound
            mg_gateway = await start_xds(
                work, "meshgate-gateway", "gateway/bench", "meshgate-gateway", xds_port
            )
            envoys.append(mg_gateway)
            envoys.append(
                await start_xds(
                    work,
                    "meshgate-sidecar",
                    f"agent/{AGENT}/bench",
                    "meshgate-agent",
                    xds_port,
                    ProxyBinding(AGENT, "127.0.0.1", mg_sc_port),
                )
            )

            paths = {"meshgate": mg_sc_port, "bare-2hop (A)": a_sc_port, "bare-1hop (B)": b_port}
            # nothing is measured unless every path really reaches the upstream
            for name, port in paths.items():
                await expect(name, port, PATH, 200, BODY)
            await expect_rule_bucket(mg_sc_port)
            await expect("meshgate", mg_sc_port, FORBIDDEN_PATH, 403)

            for name, port in paths.items():  # warm up connections and caches
                await run_wrk(name, port, connections, 1)
            # rounds interleave the paths so drift on a shared machine hits all of them alike
            throughput: dict[str, list[WrkResult]] = {n: [] for n in paths}
            latency: dict[str, list[WrkResult]] = {n: [] for n in paths}
            for _ in range(rounds):
                for name, port in paths.items():
                    throughput[name].append(await run_wrk(name, port, connections, duration))
                for name, port in paths.items():
                    latency[name].append(await run_wrk(name, port, 1, duration))
            # the policy was still enforced after the load, and the bucket really ran
            await expect("meshgate", mg_sc_port, FORBIDDEN_PATH, 403)
            await expect_rule_bucket(mg_sc_port)
            limiter = await asyncio.to_thread(rate_limit_stats, mg_gateway.admin)
            res = summarize(
                [median(v) for v in throughput.values()],
                [median(v) for v in latency.values()],
                duration,
                connections,
                rounds,
            )
            # meshgate / A within each round (runs seconds apart): the spread says how much
            # of the median ratio is the machine's noise
            mg_runs, a_runs = throughput["meshgate"], throughput["bare-2hop (A)"]
            res["throughput_ratio_rounds"] = [
                m.requests_per_s / a.requests_per_s for m, a in zip(mg_runs, a_runs, strict=True)
            ]
            res["rate_limit_stats"] = limiter
            return res
        finally:
            for envoy in reversed(envoys):
                await envoy.stop()
            if cp is not None:
                await cp.stop()


def median(runs: list[WrkResult]) -> WrkResult:
    """Per-metric median over rounds; error counts are summed, never hidden."""

    def mid(values: list[float]) -> float:
        return statistics.median(values)

    return WrkResult(
        path=runs[0].path,
        connections=runs[0].connections,
        requests_per_s=mid([r.requests_per_s for r in runs]),
        p50_ms=mid([r.p50_ms for r in runs]),
        p99_ms=mid([r.p99_ms for r in runs]),
        requests=sum(r.requests for r in runs),
        non_2xx=sum(r.non_2xx for r in runs),
        socket_errors=sum(r.socket_errors for r in runs),
    )


def rate_limit_stats(admin: EnvoyAdmin) -> dict[str, int]:
    """The target's token-bucket counters on the meshgate gateway (one set per virtual host;
    only the measured agent's rule on it is ever requested)."""
    response = admin.get(f"/stats?filter=^{re.escape(RATE_LIMIT_STATS)}", timeout=5)
    response.raise_for_status()
    stats: dict[str, int] = {}
    for line in response.text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(RATE_LIMIT_STATS) and value.strip().isdigit():
            stats[name[len(RATE_LIMIT_STATS) :]] = int(value)
    return stats


def summarize(
    throughput: list[WrkResult],
    latency: list[WrkResult],
    duration: float,
    connections: int,
    rounds: int,
) -> dict[str, Any]:
    mg_t, a_t, _ = throughput
    mg_l, a_l, _ = latency
    ratio = mg_t.requests_per_s / a_t.requests_per_s
    added = (mg_l.p99_ms - a_l.p99_ms) / 2
    errors = sum(r.non_2xx + r.socket_errors for r in throughput + latency)
    return {
        "cores": os.cpu_count(),
        "duration_s": duration,
        "rounds": rounds,
        "connections": connections,
        "policy": {
            "destinations": DESTINATIONS,
            "agents": AGENTS,
            "rules_per_agent": RULES_PER_AGENT,
            "credentialed_destinations": CREDENTIALED,
        },
        "throughput": [asdict(r) for r in throughput],
        "latency": [asdict(r) for r in latency],
        "throughput_ratio_vs_A": ratio,
        "throughput_target": TARGET_THROUGHPUT_RATIO,
        "throughput_pass": ratio >= TARGET_THROUGHPUT_RATIO,
        "added_p99_per_hop_ms": added,
        "added_p99_target_ms": TARGET_ADDED_P99_MS,
        "added_p99_pass": added < TARGET_ADDED_P99_MS,
        "errors": errors,
    }


def print_report(res: dict[str, Any]) -> None:
    p = res["policy"]
    print(
        f"meshgate data plane: {p['destinations']} destinations, {p['agents']} agents x "
        f"{p['rules_per_agent']} rules, {p['credentialed_destinations']} credential injectors; "
        f"wrk -t1, {res['duration_s']:g}s per run, median of {res['rounds']} interleaved rounds"
    )
    print(
        f"NOTE: this machine has {res['cores']} cores, shared by wrk and up to 3 Envoys "
        "(each --concurrency 1); absolute numbers are CPU-bound, compare the ratios."
    )
    header = f"{'path':<16}{'conns':>6}{'req/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'vs A':>8}"
    header += f"{'non-2xx':>9}{'sock err':>9}"
    for title, rows in (("throughput", res["throughput"]), ("latency", res["latency"])):
        print()
        print(f"{title} (c={rows[0]['connections']})")
        print(header)
        base = rows[1]["requests_per_s"]
        for r in rows:
            print(
                f"{r['path']:<16}{r['connections']:>6}{r['requests_per_s']:>11.0f}"
                f"{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['requests_per_s'] / base:>8.1%}"
                f"{r['non_2xx']:>9}{r['socket_errors']:>9}"
            )
    print()
    verdict = "PASS" if res["throughput_pass"] else "MISS"
    print(
        f"throughput meshgate / bare-2hop (A): {res['throughput_ratio_vs_A']:.1%} "
        f"(target >= {res['throughput_target']:.0%}): {verdict}"
    )
    rounds = res.get("throughput_ratio_rounds", [])
    print("  per round: " + ", ".join(f"{r:.1%}" for r in rounds))
    verdict = "PASS" if res["added_p99_pass"] else "MISS"
    print(
        f"added p99 per hop at c=1 ((meshgate - A) / 2 hops): "
        f"{res['added_p99_per_hop_ms']:.3f} ms (target < {res['added_p99_target_ms']:g} ms): "
        f"{verdict}"
    )
    rl = res.get("rate_limit_stats", {})
    print(
        f"meshgate rate limit on {TARGET}'s host: enabled={rl.get('enabled', 0)} "
        f"enforced={rl.get('enforced', 0)} ok={rl.get('ok', 0)} "
        f"rate_limited={rl.get('rate_limited', 0)} (enabled = requests checked against a bucket; "
        f"x-ratelimit-limit before and after the run: the rule's own {RULE_LIMIT:,}/min)"
    )
    if res["errors"]:
        print(f"WARNING: {res['errors']} non-2xx responses or socket errors: results are suspect")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument(
        "--connections", type=int, default=32, help="wrk connections for the throughput runs"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds; medians are reported"
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print(
            "error: wrk not found on PATH; install it (e.g. `apt-get install -y wrk`)",
            file=sys.stderr,
        )
        return 2
    if args.rounds < 1 or args.connections < 1 or args.duration < 1:
        parser.error("--rounds and --connections must be >= 1, --duration >= 1 s")
    res = asyncio.run(bench(args.duration, args.connections, args.rounds))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
