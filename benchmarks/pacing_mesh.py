"""The real processes `benchmarks/pacing.py` measures: redis-server, an upstream Envoy, the
control plane (`meshgate serve --insecure`) and two `meshgate gateway` replicas (each Envoy plus
the pacer), configured over xDS from one policy; the LLM stand-in runs in this process.

Each is a process of its own (the CLI's own code path), so that the pacer's CPU time and memory
are read from its process alone, and the control plane's audit ingest (every request is an
audit record) never shares the load generator's event loop. Both replicas listen on the Mesh's
one port, as replicas behind one Service would; a new connection lands on either.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dataplane import (  # noqa: E402
    ROUTER,
    WrkResult,
    _bootstrap,
    _listener,
    parse_wrk,
    start_static,
)

from meshgate.demo.llm_provider import LlmProvider  # noqa: E402
from meshgate.sidecar.envoy_admin import EnvoyAdmin  # noqa: E402
from meshgate.sidecar.envoy_process import EnvoyProcess  # noqa: E402

AGENT_HEADER = "x-meshgate-agent"
FAST_HOST = "tool.internal"  # Envoy direct_response upstream
SLOW_HOST = "slow.internal"  # the same, after a fixed 20 ms delay (Envoy's fault filter)
LLM_HOST = "llm.internal"  # meshgate.demo.llm_provider, streaming
SLOW_MS = 20
HIGH = 1_000_000_000  # a limit that never refuses (the policy's maximum)

# sizes that the parts rely on (pacing.py asserts the outcomes)
REQUEST_BUDGET = 50
TOKEN_BUDGET = 10_000
MAX_TOKENS = 100
REPLY_TOKENS = 60
ACCURACY_LIMIT = 600  # per minute, global
FAIR_CAP = 1  # fa's and fb's in-flight cap on `slow`, per replica

POLICY = """\
apiVersion: meshgate.dev/v1
kind: Mesh
metadata: {{name: default}}
spec:
  trustDomain: agents.bench
  egressGateway: {{listenPort: {port}}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: tool}}
spec: {{host: tool.internal, port: 80, tls: none, address: "127.0.0.1:{fast}"}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: slow}}
spec:
  host: slow.internal
  port: 80
  tls: none
  address: "127.0.0.1:{slow}"
  concurrency: {{max: 16, maxWait: 60s}}
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: llm}}
spec:
  host: llm.internal
  port: 80
  tls: none
  address: "127.0.0.1:{llm}"
  llm: {{api: openai, prices: {{"gpt-4o-mini": {{input: "0.15", output: "0.60"}}}}}}
---
apiVersion: meshgate.dev/v1
kind: AgentGroup
metadata: {{name: reqs}}
spec:
  agents: [r1, r2, r3, r4]
  budgets: [{{name: calls, window: day, requests: {request_budget}}}]
  egress:
    - destination: tool
---
apiVersion: meshgate.dev/v1
kind: AgentGroup
metadata: {{name: toks}}
spec:
  agents: [t1, t2, t3, t4]
  budgets: [{{name: tokens, window: day, tokens: {token_budget}}}]
  egress:
    - destination: llm
      maxTokens: {max_tokens}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: acc}}
spec:
  agent: acc
  egress:
    - destination: tool
      rateLimit: {{requests: {accuracy}, per: 1m, scope: global}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: cost-global}}
spec:
  agent: cost-global
  egress:
    - destination: tool
      rateLimit: {{requests: {high}, per: 1s, scope: global}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: cost-local}}
spec:
  agent: cost-local
  egress:
    - destination: tool
      rateLimit: {{requests: {high}, per: 1s, scope: replica}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: cost-none}}
spec:
  agent: cost-none
  egress:
    - destination: tool
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: fa}}
spec:
  agent: fa
  egress:
    - destination: slow
      concurrency: {{max: {fair_cap}, maxWait: 60s}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: fb}}
spec:
  agent: fb
  egress:
    - destination: slow
      concurrency: {{max: {fair_cap}, maxWait: 60s}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: down-budget}}
spec:
  agent: down-budget
  budgets: [{{name: calls, window: day, requests: {high}}}]
  egress:
    - destination: tool
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: down-open}}
spec:
  agent: down-open
  egress:
    - destination: tool
      rateLimit: {{requests: {high}, per: 1s, scope: global, onStoreFailure: open}}
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: down-closed}}
spec:
  agent: down-closed
  egress:
    - destination: tool
      rateLimit: {{requests: {high}, per: 1s, scope: global, onStoreFailure: closed}}
"""
MEMBERS = "".join(
    f"---\napiVersion: meshgate.dev/v1\nkind: AgentPolicy\nmetadata: {{name: {a}}}\n"
    f"spec: {{agent: {a}}}\n"
    for a in ("r1", "r2", "r3", "r4", "t1", "t2", "t3", "t4")
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------------------------
# redis-server


class Redis:
    """A redis-server with no persistence on a free port; killed and started again on it."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--maxmemory-policy", "noeviction"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---------------------------------------------------------------------------------------------
# the upstream: one Envoy, a fast listener and a slow one (fault filter: fixed delay)


def upstream_config(admin: str, fast: int, slow: int) -> dict[str, Any]:
    def hcm(prefix: str, delay_ms: int) -> dict[str, Any]:
        filters: list[dict[str, Any]] = []
        if delay_ms:
            filters.append(
                {
                    "name": "envoy.filters.http.fault",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3"
                        ".HTTPFault",
                        "delay": {
                            "fixed_delay": f"{delay_ms / 1000}s",
                            "percentage": {"numerator": 100, "denominator": "HUNDRED"},
                        },
                    },
                }
            )
        return {
            "stat_prefix": prefix,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "direct_response": {
                                    "status": 200,
                                    "body": {"inline_string": "ok\n"},
                                },
                            }
                        ],
                    }
                ]
            },
            "http_filters": [*filters, ROUTER],
        }

    config = _bootstrap(admin, _listener("fast", fast, hcm("fast", 0)), [])
    config["static_resources"]["listeners"].append(_listener("slow", slow, hcm("slow", SLOW_MS)))
    return config


# ---------------------------------------------------------------------------------------------
# a gateway replica: `meshgate gateway` in a process of its own


@dataclass
class Gateway:
    name: str
    proc: subprocess.Popen[bytes]
    admin: EnvoyAdmin
    metrics_port: int
    log: Path
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        """The gateway process's CPU (the pacer, and the audit shipper); Envoy is a child."""
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss_mb(self) -> float:
        return float(self.ps.memory_info().rss) / 1e6

    def envoy_cpu_s(self) -> float:
        total = 0.0
        for child in self.ps.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                total += t.user + t.system
        return total

    def decisions(self) -> dict[tuple[str, str], float]:
        """meshgate_pacer_decisions_total by (kind, decision)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        found: dict[tuple[str, str], float] = {}
        for m in re.finditer(
            r'^meshgate_pacer_decisions_total\{decision="([^"]*)",kind="([^"]*)"\} (\S+)$',
            text,
            re.MULTILINE,
        ):
            found[(m.group(2), m.group(1))] = float(m.group(3))
        return found

    def limit_store_calls(self) -> float:
        """meshgate_pacer_limit_store_calls_total: store calls made for global limits."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        m = re.search(r"^meshgate_pacer_limit_store_calls_total (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    def served(self) -> int:
        stats = self.admin.get("/stats?filter=downstream_rq_total", timeout=5).text
        return sum(
            int(line.rsplit(" ", 1)[1])
            for line in stats.splitlines()
            if "egress" in line and line.rsplit(" ", 1)[1].isdigit()
        )

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_control_plane(
    work: Path, policies: Path, xds_port: int, redis_url: str
) -> subprocess.Popen[bytes]:
    """`meshgate serve --insecure` (plaintext xDS, no join tokens, no mTLS: as dataplane.py's
    control plane; nothing here is on the hot path) with the same Redis as the gateways."""
    cmd = [sys.executable, "-m", "meshgate.cli", "serve", "--insecure"]
    cmd += ["--policies", str(policies), "--state-dir", str(work / "cp")]
    cmd += ["--xds-port", str(xds_port), "--admin-port", str(free_port())]
    cmd += ["--limit-store", redis_url]
    with (work / "cp.log").open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


async def start_gateway(name: str, state: Path, xds: str, redis_url: str) -> Gateway:
    metrics_port = free_port()
    log = state.parent / f"{name}.log"
    cmd = [sys.executable, "-m", "meshgate.cli", "gateway", "--control-plane", xds]
    cmd += ["--name", name, "--state-dir", str(state), "--insecure"]
    cmd += ["--limit-store", redis_url, "--metrics-port", str(metrics_port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    admin = EnvoyAdmin(state / f"gateway-{name}" / "admin.sock")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway {name} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError, OSError):
            if (await asyncio.to_thread(admin.get, "/ready")).status_code == 200:
                return Gateway(name, proc, admin, metrics_port, log)
        await asyncio.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"gateway {name} not ready in 60 s: {log.read_text()[-2000:]}")


# ---------------------------------------------------------------------------------------------
# the whole mesh


@dataclass
class Mesh:
    port: int  # the gateways' shared listener
    redis: Redis
    gateways: list[Gateway]
    provider: LlmProvider
    cp: subprocess.Popen[bytes]
    redis_cpu_spent: dict[str, float] = field(default_factory=dict)

    def redis_cpu_s(self) -> float:
        assert self.redis.proc is not None
        t = psutil.Process(self.redis.proc.pid).cpu_times()
        return float(t.user + t.system)

    def decisions(self) -> dict[tuple[str, str], float]:
        total: dict[tuple[str, str], float] = {}
        for gw in self.gateways:
            for k, v in gw.decisions().items():
                total[k] = total.get(k, 0.0) + v
        return total

    def pacer_cpu_s(self) -> float:
        return sum(gw.cpu_s() for gw in self.gateways)

    def limit_store_calls(self) -> float:
        return sum(gw.limit_store_calls() for gw in self.gateways)


@contextlib.asynccontextmanager
async def mesh(work: Path) -> AsyncIterator[Mesh]:
    redis = Redis()
    redis.start()
    envoys: list[EnvoyProcess] = []
    gateways: list[Gateway] = []
    provider = LlmProvider(reply_tokens=REPLY_TOKENS, token_delay=0.01)
    cp: subprocess.Popen[bytes] | None = None
    try:
        fast, slow = free_port(), free_port()
        envoys.append(
            await start_static(work, "upstream", lambda a: upstream_config(a, fast, slow))
        )
        llm = await provider.start()
        port = free_port()
        policies = work / "policy"
        policies.mkdir()
        (policies / "policy.yaml").write_text(
            POLICY.format(
                port=port,
                fast=fast,
                slow=slow,
                llm=llm,
                request_budget=REQUEST_BUDGET,
                token_budget=TOKEN_BUDGET,
                max_tokens=MAX_TOKENS,
                accuracy=ACCURACY_LIMIT,
                high=HIGH,
                fair_cap=FAIR_CAP,
            )
            + MEMBERS
        )
        xds_port = free_port()
        cp = start_control_plane(work, policies, xds_port, redis.url)
        deadline = time.monotonic() + 30
        while not listening(xds_port):
            if cp.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"control plane: {(work / 'cp.log').read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        xds = f"127.0.0.1:{xds_port}"
        state = work / "gw"
        for n in (1, 2):
            gateways.append(await start_gateway(f"gw{n}", state, xds, redis.url))
        deadline = time.monotonic() + 30
        while not listening(port):
            if time.monotonic() > deadline:
                raise RuntimeError("the gateways' listener did not come up in 30 s")
            await asyncio.sleep(0.1)
        yield Mesh(port, redis, gateways, provider, cp)
    finally:
        for gw in gateways:
            await asyncio.to_thread(gw.stop)
        for envoy in envoys:
            await envoy.stop()
        await provider.stop()
        if cp is not None:
            await asyncio.to_thread(stop_process, cp)
        redis.stop()


# ---------------------------------------------------------------------------------------------
# wrk


LOAD_TOOL = "wrk" if shutil.which("wrk") else "httpx"  # pacing.py --load overrides


async def load(
    port: int, host: str, agent: str, connections: int, duration: float, timeout_s: int = 10
) -> WrkResult:
    """`connections` keep-alive connections sending back to back for `duration` seconds,
    with wrk, or without it an httpx loop of the same shape (its own CPU shares the machine,
    and its latencies include Python's: absolute figures are worse, ratios comparable)."""
    if LOAD_TOOL == "wrk":
        return await wrk(port, host, agent, connections, duration, timeout_s)
    return await httpx_load(port, host, agent, connections, duration, timeout_s)


async def httpx_load(
    port: int, host: str, agent: str, connections: int, duration: float, timeout_s: int
) -> WrkResult:
    url = f"http://127.0.0.1:{port}/v1/x"
    headers = {"host": host, AGENT_HEADER: agent}
    latencies: list[float] = []
    statuses: list[int] = []
    errors = 0
    started = time.monotonic()
    end = started + max(1.0, round(duration))

    async def connection() -> None:
        nonlocal errors
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
            while time.monotonic() < end:
                t = time.monotonic()
                try:
                    statuses.append((await client.get(url, headers=headers)).status_code)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append((time.monotonic() - t) * 1000)

    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.monotonic() - started
    ordered = sorted(latencies) or [float("nan")]

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return WrkResult(
        path=agent,
        connections=connections,
        requests_per_s=len(statuses) / elapsed,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        requests=len(statuses),
        non_2xx=sum(1 for c in statuses if not 200 <= c < 400),
        socket_errors=errors,
    )


async def wrk(
    port: int, host: str, agent: str, connections: int, duration: float, timeout_s: int = 10
) -> WrkResult:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency"]
    cmd += ["--timeout", f"{timeout_s}s", "-H", f"Host: {host}", "-H", f"{AGENT_HEADER}: {agent}"]
    cmd.append(f"http://127.0.0.1:{port}/v1/x")
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()}{out.decode()}")
    return parse_wrk(agent, connections, out.decode())
