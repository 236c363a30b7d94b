"""Run an agent's sidecar Envoy, and optionally the agent itself behind it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from pathlib import Path

from meshgate.audit.spool import SpoolShipper
from meshgate.errors import ConfigError, EnvoyError
from meshgate.identity.tokens import TokenAuthority
from meshgate.identity.xds_tls import bundle_path
from meshgate.sidecar.bootstrap import BootstrapSpec, write_bootstrap
from meshgate.sidecar.envoy_admin import AdminSocket, EnvoyAdmin
from meshgate.sidecar.envoy_process import EnvoyProcess, find_envoy
from meshgate.sidecar.strict import NETNS_PROXY_PORT, Jail
from meshgate.xds.access_log import SPOOL_FILE
from meshgate.xds.sidecar import PROXY_LISTENER

LOCAL_TOKEN_TTL = 7 * 24 * 3600


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--control-plane must be HOST:PORT, got {address!r}")
    return host, int(port)


def prepare_envoy(
    node_id: str,
    token_subject: str,
    control_plane: str,
    state_dir: Path,
    token_file: Path | None,
    *,
    file_stem: str,
    delta: bool = False,
    concurrency: int = 1,
    xds_ca: Path | None = None,
    netns_path: str | None = None,
    workdir: Path | None = None,
    health_port: int | None = None,
) -> EnvoyProcess:
    """Bootstrap (with the node's join token) written to the state dir; Envoy not yet started.

    `xds_ca`: the bundle that verifies the control plane; without it, the local control plane's
    published bundle is used if it serves TLS (the state dir is the local-only channel).
    `workdir`: Envoy's working directory (default: `<state_dir>/<file_stem>`), private (0700),
    also where its admin socket is (sidecar/envoy_admin.py). `health_port`: a loopback
    `GET /healthz/ready` listener for outside probes."""
    find_envoy()
    host, port = parse_address(control_plane)
    state_dir.mkdir(parents=True, exist_ok=True)
    workdir = workdir if workdir is not None else state_dir / file_stem
    admin = AdminSocket.in_dir(workdir)
    token = join_token(token_subject, state_dir, token_file)
    spec = BootstrapSpec(
        node_id,
        "meshgate-gateway" if node_id.startswith("gateway/") else "meshgate-agent",
        host,
        port,
        str(admin.path),
        delta=delta,
        metadata=(("authorization", f"Bearer {token}"),) if token else (),
        xds_ca_file=xds_ca_file(state_dir, xds_ca),
        netns_path=netns_path,
        health_port=health_port,
    )
    boot = state_dir / f"{file_stem}.json"
    write_bootstrap(boot, spec)
    envoy = EnvoyProcess(boot, admin, state_dir / f"{file_stem}.log", concurrency, cwd=workdir)
    envoy.xds_metadata = spec.metadata
    return envoy


class GatewayProcess:
    """An Envoy (gateway or sidecar) and the shipper of its audit spool: they start and stop
    together."""

    def __init__(self, envoy: EnvoyProcess, shipper: SpoolShipper) -> None:
        self.envoy = envoy
        self.shipper = shipper
        self._shipping: asyncio.Task[None] | None = None

    @property
    def admin(self) -> EnvoyAdmin:
        return self.envoy.admin

    async def start(self) -> None:
        await self.envoy.start()
        self._shipping = asyncio.create_task(self.shipper.run(), name="audit-spool")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await self.envoy.wait_ready(timeout)

    async def wait(self) -> int:
        return await self.envoy.wait()

    async def stop(self) -> None:
        """Envoy first (it flushes the spool), then one last shipment; the rest ships on the
        next start, from the checkpoint."""
        await self.envoy.stop()
        if self._shipping is not None:
            self._shipping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shipping
            await self.shipper.drain()
            await self.shipper.close()


def prepare_gateway(
    name: str,
    control_plane: str,
    state_dir: Path,
    token_file: Path | None,
    *,
    delta: bool = False,
    concurrency: int = 1,
    xds_ca: Path | None = None,
    health_port: int | None = None,
) -> GatewayProcess:
    """Envoy runs in `<state_dir>/gateway-<name>/`, where it writes its audit spool."""
    return _prepare_spooled(
        f"gateway/{name}",
        f"gateway/{name}",
        f"gateway-{name}",
        control_plane,
        state_dir,
        token_file,
        delta=delta,
        concurrency=concurrency,
        xds_ca=xds_ca,
        health_port=health_port,
    )


def _prepare_spooled(
    node_id: str,
    token_subject: str,
    stem: str,
    control_plane: str,
    state_dir: Path,
    token_file: Path | None,
    *,
    delta: bool = False,
    concurrency: int = 1,
    xds_ca: Path | None = None,
    netns_path: str | None = None,
    health_port: int | None = None,
) -> GatewayProcess:
    workdir = state_dir / stem
    envoy = prepare_envoy(
        node_id,
        token_subject,
        control_plane,
        state_dir,
        token_file,
        file_stem=stem,
        delta=delta,
        concurrency=concurrency,
        workdir=workdir,
        xds_ca=xds_ca,
        netns_path=netns_path,
        health_port=health_port,
    )

    def fresh_token() -> tuple[tuple[str, str], ...]:
        token = join_token(token_subject, state_dir, token_file)
        return (("authorization", f"Bearer {token}"),) if token else ()

    shipper = SpoolShipper(
        workdir / SPOOL_FILE,
        control_plane,
        node_id,
        envoy.xds_metadata,
        envoy_admin=envoy.admin,
        refresh_metadata=fresh_token,
        ca_file=xds_ca_file(state_dir, xds_ca),  # the same TLS as the node's xDS stream
    )
    return GatewayProcess(envoy, shipper)


def join_token(subject: str, state_dir: Path, token_file: Path | None) -> str | None:
    """The node's join token: from --token-file, else minted locally by whoever can read the
    control plane's state directory (the local-only channel), else none."""
    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{token_file}: cannot read token: {exc.strerror}") from None
    if not (state_dir / "tokens" / "signing-key.pem").exists():
        return None
    token, _ = TokenAuthority(state_dir).create(subject, LOCAL_TOKEN_TTL)
    return token


def xds_ca_file(state_dir: Path, xds_ca: Path | None) -> str | None:
    if xds_ca is not None:
        if not xds_ca.is_file():
            raise ConfigError(f"--xds-ca {xds_ca}: no such file")
        return str(xds_ca.resolve())
    local = bundle_path(state_dir)
    return str(local.resolve()) if local.is_file() else None


def proxy_environment(proxy_url: str) -> dict[str, str]:
    """What an ordinary HTTP client needs to send everything through the sidecar."""
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = env[name.lower()] = proxy_url
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    return env


def proxy_port(admin: EnvoyAdmin) -> int:
    """The sidecar's proxy port, as the control plane configured it (read from Envoy's admin)."""
    data = json.loads(admin.get("/listeners?format=json").text)
    for listener in data.get("listener_statuses", []):
        if listener.get("name") == PROXY_LISTENER:
            return int(listener["local_address"]["socket_address"]["port_value"])
    raise EnvoyError(f"sidecar has no {PROXY_LISTENER} listener")


async def run_sidecar(
    agent: str,
    instance: str,
    control_plane: str,
    state_dir: Path,
    command: list[str],
    stop: asyncio.Event,
    token_file: Path | None = None,
    xds_ca: Path | None = None,
    strict: bool = False,
    health_port: int | None = None,
) -> int:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", agent):
        raise ConfigError(f"--agent {agent!r}: use lower-case letters, digits and '-'")
    # --strict (sidecar/strict.py): CMD's process and empty network namespace come first, so a
    # missing privilege fails before Envoy starts; Envoy then also listens inside it.
    if strict and not command:
        raise ConfigError("--strict confines a command: sidecar run --strict --agent NAME -- CMD")
    strict_env = {**os.environ, **proxy_environment(f"http://127.0.0.1:{NETNS_PROXY_PORT}")}
    jail = await Jail.create(command, strict_env) if strict else None
    try:
        # the sidecar spools what it refuses itself (gateway unreachable) in its own directory
        envoy = _prepare_spooled(
            f"agent/{agent}/{instance}",
            f"agent/{agent}",
            f"sidecar-{agent}-{instance}",
            control_plane,
            state_dir,
            token_file,
            netns_path=jail.netns_path if jail is not None else None,
            xds_ca=xds_ca,
            health_port=health_port,
        )
        await envoy.start()
    except BaseException:
        if jail is not None:
            await jail.abandon()
        raise
    try:
        await envoy.wait_ready(30)
        proxy = f"http://127.0.0.1:{await asyncio.to_thread(proxy_port, envoy.admin)}"
        if not command:
            print(f"sidecar for agent {agent} ready; HTTP_PROXY={proxy}", flush=True)
            await _first(stop.wait(), envoy.wait())
            return 0
        env = {**os.environ, **proxy_environment(proxy)}
        if jail is not None:  # strict: CMD execs in its namespace, HTTP_PROXY is strict_env's
            child = await jail.release()
        else:
            try:
                child = await asyncio.create_subprocess_exec(*command, env=env)
            except OSError as exc:
                raise ConfigError(f"cannot run {command[0]!r}: {exc.strerror}") from None
        await _first(stop.wait(), child.wait())
        if child.returncode is None:  # we were signalled: pass it on, then wait
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
        return await child.wait()
    finally:
        await envoy.stop()
        if jail is not None:
            await jail.abandon()


async def _first(*aws: object) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
