"""Real processes for end-to-end tests: the control plane, Envoy gateways, loopback upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from builders import free_port

from meshgate.audit.record import AuditRecord
from meshgate.audit.spool import SpoolShipper
from meshgate.audit.store import AuditQuery
from meshgate.controlplane.server import ControlPlane, ServeOptions
from meshgate.controlplane.sources import DirectorySource, PolicySource
from meshgate.controlplane.vault_ca import VaultCASettings
from meshgate.pacer.service import Pacer
from meshgate.pacing.memory_store import MemoryStore
from meshgate.sidecar.bootstrap import BootstrapSpec, ProxyBinding, pacer_socket, write_bootstrap
from meshgate.sidecar.envoy_admin import AdminSocket
from meshgate.sidecar.envoy_process import EnvoyProcess
from meshgate.xds.access_log import SPOOL_FILE

MESH = """\
apiVersion: meshgate.dev/v1
kind: Mesh
metadata: {{name: default}}
spec:
  trustDomain: agents.test
  egressGateway: {{listenPort: {port}}}
"""

DESTINATION = """\
---
apiVersion: meshgate.dev/v1
kind: Destination
metadata: {{name: {name}}}
spec:
  host: {host}
  port: 80
  tls: none
  address: 127.0.0.1:{upstream}
"""

AGENT = """\
---
apiVersion: meshgate.dev/v1
kind: AgentPolicy
metadata: {{name: {agent}}}
spec:
  agent: {agent}
  egress:
{rules}
"""


def write_policy(
    directory: Path,
    listen_port: int,
    destinations: dict[str, int],
    extra: str = "",
    agents: dict[str, list[str]] | None = None,
) -> None:
    """destinations: name -> upstream port (host is NAME.internal)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mesh.yaml").write_text(MESH.format(port=listen_port))
    text = "".join(
        DESTINATION.format(name=n, host=f"{n}.internal", upstream=p)
        for n, p in destinations.items()
    )
    (directory / "destinations.yaml").write_text(text + extra)
    agents = agents if agents is not None else {"researcher": sorted(destinations)}
    text = "".join(
        AGENT.format(agent=a, rules="\n".join(f"    - destination: {d}" for d in ds))
        for a, ds in agents.items()
    )
    (directory / "agents.yaml").write_text(text)


@dataclass
class Upstream:
    port: int
    hits: list[dict[str, Any]]


@asynccontextmanager
async def upstream(
    name: str, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[Upstream]:
    """A loopback HTTP server (or on `host`) that echoes who it is and what it received."""
    hits: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.text()
        if request.path.startswith("/slow"):  # an in-flight request for reload tests
            await asyncio.sleep(float(request.query.get("s", "2")))
        hits.append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
        return web.json_response({"upstream": name, "path": request.path_qs})

    app = web.Application(client_max_size=16 << 20)  # above any gateway limit under test
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    try:
        yield Upstream(port, hits)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def control_plane(
    policy_dir: Path,
    state_dir: Path,
    source: PolicySource | None = None,
    require_tokens: bool = False,
    mtls: bool = False,
    cert_ttl_seconds: int = 3600,
    vault_ca: VaultCASettings | None = None,
    **options: Any,
) -> AsyncIterator[ControlPlane]:
    """A control plane on free loopback ports; `options`: any other ServeOptions field."""
    opts = ServeOptions(
        "127.0.0.1",
        0,  # the OS picks; the plane reports cp.xds_address / cp.admin_address
        "127.0.0.1",
        0,
        "127.0.0.1",
        debounce_quiet=0.05,
        secrets_interval=0.2,
        require_tokens=require_tokens,
        mtls=mtls,
        cert_ttl_seconds=cert_ttl_seconds,
        vault_ca=vault_ca,
        **options,
    )
    cp = ControlPlane(source or DirectorySource(policy_dir, interval=0.1), state_dir, opts)
    await cp.start()
    try:
        await until(lambda: cp.ready, timeout=10, what="control plane ready")
        yield cp
    finally:
        await cp.stop()


@asynccontextmanager
async def gateway(
    cp: ControlPlane,
    workdir: Path,
    name: str = "e2e",
    delta: bool = False,
    token: str | None = None,
    ready_timeout: float = 30,
    audit: bool = False,
) -> AsyncIterator[EnvoyProcess]:
    """A gateway Envoy; with tokens required, it gets a valid one unless `token` is given.

    Envoy runs in `workdir/gateway-<name>/`, where it writes its audit spool; with `audit`, a
    shipper sends the spool to the control plane (as `meshgate gateway` does). A pacer with an
    in-memory limit store listens where the bootstrap's pacer cluster points, as beside every
    `meshgate gateway` (MCP tool routes, budgets and caps call it)."""
    if token is None and cp.tokens is not None:
        token, _ = cp.tokens.create(f"gateway/{name}", 600)
    cwd = workdir / f"gateway-{name}"
    admin = AdminSocket.in_dir(cwd)  # pytest's tmp paths are long: often the /tmp fallback
    spec = BootstrapSpec(
        f"gateway/{name}",
        "meshgate-gateway",
        "127.0.0.1",
        int(cp.xds_address.rpartition(":")[2]),  # the port it bound (0 asks the OS)
        str(admin.path),
        delta=delta,
        metadata=(("authorization", f"Bearer {token}"),) if token else (),
    )
    boot = workdir / f"gateway-{name}.json"
    write_bootstrap(boot, spec)
    envoy = EnvoyProcess(boot, admin, workdir / f"gateway-{name}.log", cwd=cwd)
    pacer = Pacer(pacer_socket(admin.path), MemoryStore)
    pacer.start()
    await envoy.start()
    shipping: asyncio.Task[None] | None = None
    shipper = SpoolShipper(
        cwd / SPOOL_FILE, cp.xds_address, spec.node_id, spec.metadata, envoy_admin=envoy.admin
    )
    try:
        await envoy.wait_ready(ready_timeout)
        if audit:
            shipping = asyncio.create_task(shipper.run())
        yield envoy
    finally:
        await envoy.stop()
        await asyncio.to_thread(pacer.stop)
        if shipping is not None:
            shipping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shipping
            await shipper.drain()
            await shipper.close()


@asynccontextmanager
async def sidecar(
    cp: ControlPlane, workdir: Path, agent: str, audit: bool = False
) -> AsyncIterator[str]:
    """An agent's sidecar Envoy; yields its proxy URL (what the agent's HTTP_PROXY would be).

    It runs in `workdir/sidecar-<agent>/`; with `audit`, its spool (what it refuses itself)
    is shipped to the control plane."""
    cwd = workdir / f"sidecar-{agent}"
    admin = AdminSocket.in_dir(cwd)
    proxy_port = free_port()
    spec = BootstrapSpec(
        f"agent/{agent}/test",
        "meshgate-agent",
        "127.0.0.1",
        int(cp.xds_address.rpartition(":")[2]),  # the port it bound (0 asks the OS)
        str(admin.path),
        proxy=ProxyBinding(agent, "127.0.0.1", proxy_port),
    )
    boot = workdir / f"sidecar-{agent}.json"
    write_bootstrap(boot, spec)
    envoy = EnvoyProcess(boot, admin, workdir / f"sidecar-{agent}.log", cwd=cwd)
    await envoy.start()
    shipper = SpoolShipper(cwd / SPOOL_FILE, cp.xds_address, spec.node_id, spec.metadata)
    shipping = asyncio.create_task(shipper.run()) if audit else None
    try:
        await envoy.wait_ready(30)
        yield f"http://127.0.0.1:{proxy_port}"
    finally:
        await envoy.stop()
        if shipping is not None:
            shipping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shipping
            await shipper.drain()
        await shipper.close()


async def until(
    check: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def envoy_admin(envoy: EnvoyProcess, path: str) -> str:
    """GET `path` from Envoy's admin, over its unix socket (it has no TCP admin port)."""
    resp = await envoy.admin.arequest("GET", path)
    return resp.text


async def via_gateway(
    port: int,
    host: str,
    path: str = "/",
    method: str = "GET",
    agent: str | None = "researcher",
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> httpx.Response:
    """A request as the agent's sidecar forwards it: Host names the tool, the header the agent."""
    sent = {"Host": host, **({"x-meshgate-agent": agent} if agent else {}), **(headers or {})}
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.request(method, f"http://127.0.0.1:{port}{path}", headers=sent, **kw)


def audit_records(cp: ControlPlane, **filters: Any) -> list[AuditRecord]:
    """Every stored audit record (all pages) matching `filters` (AuditQuery fields)."""
    store = cp.audit_log
    assert store is not None, "the control plane has no queryable audit store"
    out: list[AuditRecord] = []
    cursor = None
    while True:
        page = store.query(AuditQuery(**filters, limit=1000, cursor=cursor))
        out.extend(page.records)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


async def audit_record(cp: ControlPlane, request_id: str, timeout: float = 10) -> AuditRecord:
    """The record of one request, once the gateway's spool has been shipped."""

    def find() -> AuditRecord | None:
        return next((r for r in audit_records(cp) if r.request_id == request_id), None)

    found: AuditRecord = await until(find, timeout, f"audit record {request_id}")
    return found
