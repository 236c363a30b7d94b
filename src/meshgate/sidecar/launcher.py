"""Run an agent's sidecar Envoy, and optionally the agent itself behind it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from meshgate.audit.spool import SpoolShipper
from meshgate.delegation.names import is_agent_name
from meshgate.errors import ConfigError, EnvoyError
from meshgate.identity.agent_trust import ca_cert_path
from meshgate.identity.tokens import TokenAuthority, signing_key_path
from meshgate.identity.xds_tls import bundle_path
from meshgate.sidecar.agent_user import (
    AgentUser,
    agent_environment,
    check_state_dir_private,
    private_dir,
)
from meshgate.sidecar.bootstrap import BootstrapSpec, ProxyBinding, write_bootstrap
from meshgate.sidecar.envoy_admin import AdminSocket, EnvoyAdmin
from meshgate.sidecar.envoy_process import EnvoyProcess, find_envoy
from meshgate.sidecar.strict import NETNS_PROXY_PORT, Jail
from meshgate.sidecar.trust_bundle import TrustFiles, trust_environment, write_trust_files
from meshgate.xds.access_log import SPOOL_FILE
from meshgate.xds.sidecar import INTERCEPT_LISTENER, PROXY_LISTENER

LOCAL_TOKEN_TTL = 7 * 24 * 3600
log = logging.getLogger(__name__)


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
    proxy: ProxyBinding | None = None,
    workdir: Path | None = None,
    health_port: int | None = None,
    insecure: bool = False,
) -> EnvoyProcess:
    """Bootstrap (with the node's join token) written to the state dir; Envoy not yet started.

    `xds_ca`: the bundle that verifies the control plane; without it, the local control plane's
    published bundle is used if it serves TLS (the state dir is the local-only channel).
    Without a bundle or a token the node refuses to start unless `insecure` (plaintext,
    unauthenticated xDS, for a control plane started with `serve --insecure`).
    `workdir`: Envoy's working directory (default: `<state_dir>/<file_stem>`), private (0700),
    also where its admin socket is (sidecar/envoy_admin.py). `health_port`: a loopback
    `GET /healthz/ready` listener for outside probes."""
    find_envoy()
    host, port = parse_address(control_plane)
    private_dir(state_dir)
    workdir = workdir if workdir is not None else state_dir / file_stem
    admin = AdminSocket.in_dir(workdir)
    token = join_token(token_subject, state_dir, token_file)
    ca_file = xds_ca_file(state_dir, xds_ca)
    if not insecure:
        if ca_file is None:
            raise ConfigError(
                f"no CA to verify the control plane's TLS xDS port: pass --xds-ca (the local "
                f"control plane publishes one in {state_dir}), or --insecure for a control plane "
                "started with `serve --insecure`"
            )
        if token is None:
            raise ConfigError(
                "no join token: pass --token-file (`meshgate token create`), or run where the "
                f"control plane's state directory {state_dir} is readable"
            )
    spec = BootstrapSpec(
        node_id,
        "meshgate-gateway" if node_id.startswith("gateway/") else "meshgate-agent",
        host,
        port,
        str(admin.path),
        delta=delta,
        metadata=(("authorization", f"Bearer {token}"),) if token else (),
        xds_ca_file=ca_file,
        proxy=proxy,
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
    insecure: bool = False,
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
        insecure=insecure,
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
    proxy: ProxyBinding | None = None,
    insecure: bool = False,
    health_port: int | None = None,
) -> GatewayProcess:
    workdir = state_dir / stem
    private_dir(workdir)
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
        health_port=health_port,
        proxy=proxy,
        insecure=insecure,
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
    if not signing_key_path(state_dir).exists():
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


def agent_trust_pem(state_dir: Path, agent_trust_ca: Path | None) -> bytes | None:
    """The agent-trust CA (identity/agent_trust.py): --agent-trust-ca, else the one the local
    control plane keeps in its state directory (created with its first policy, mTLS only);
    None when there is none (no interception: the agent's trust is left alone)."""
    path = agent_trust_ca if agent_trust_ca is not None else ca_cert_path(state_dir)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if agent_trust_ca is not None:
            raise ConfigError(f"--agent-trust-ca {agent_trust_ca}: no such file") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the agent-trust CA: {exc.strerror}") from None


def agent_trust_environment(
    state_dir: Path, agent_trust_ca: Path | None, directory: Path
) -> dict[str, str]:
    """Write the agent's trust bundle into `directory` and return the variables naming it; {}
    without an agent-trust CA (then the agent's trust is left as it was)."""
    pem = agent_trust_pem(state_dir, agent_trust_ca)
    if pem is None:
        # a control plane without mTLS: no interception, so CONNECTs reach the gateway, whose
        # refusal says what to do
        log.debug("no agent-trust CA at %s: the agent's trust is left alone", state_dir)
        return {}
    files: TrustFiles = write_trust_files(directory, pem)
    return trust_environment(files.bundle, files.ca)


def readable_trust_dir() -> Path:
    """A fresh directory the agent user can read but not write (the launcher owns it)."""
    path = Path(tempfile.mkdtemp(prefix="meshgate-trust-"))
    path.chmod(0o755)
    return path


def intercepting(admin: EnvoyAdmin) -> bool:
    """Whether this sidecar opens CONNECTs itself (its control plane sent the intercept
    listener: mTLS and at least one intercepted destination)."""
    data = json.loads(admin.get("/listeners?format=json").text)
    return any(
        listener.get("name") == INTERCEPT_LISTENER for listener in data.get("listener_statuses", [])
    )


def proxy_port_of(admin: EnvoyAdmin) -> int:
    """The port the sidecar's proxy listener holds (a free one unless --proxy-port), read from
    Envoy's admin socket."""
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
    *,
    user: AgentUser | None = None,
    proxy_port: int = 0,
    insecure: bool = False,
    health_port: int | None = None,
    agent_trust_ca: Path | None = None,
    trust_dir: Path | None = None,
) -> int:
    """`user`: who CMD runs as (sidecar/agent_user.py); required with a command.
    `agent_trust_ca`: the CA the sidecar's intercepting certificates chain to (default: the
    local control plane's); CMD trusts it besides the system CAs (sidecar/trust_bundle.py).
    `trust_dir`: where to write that bundle (default: a temporary directory, removed at exit;
    without a command, only with this: the Kubernetes sidecar shares it with the pod)."""
    if not is_agent_name(agent):  # a policy agent, or a sub-agent `parent.child`
        raise ConfigError(f"--agent {agent!r}: use lower-case letters, digits and '-'")
    if strict and not command:
        raise ConfigError("--strict confines a command: sidecar run --strict --agent NAME -- CMD")
    if command:
        if user is None:
            raise ConfigError("sidecar run with a command needs the user CMD runs as")
        if not user.same_as_launcher:  # (one that does not exist yet is created 0700)
            check_state_dir_private(state_dir, user)
    # --strict: CMD's process and empty network namespace come first, so a missing privilege
    # fails before Envoy starts; Envoy then listens only inside that namespace. Otherwise CMD
    # starts once the sidecar is ready and its proxy port known.
    env = agent_environment(dict(os.environ), user) if user is not None else {}
    own_trust_dir = trust_dir is None and bool(command)
    trust_at = readable_trust_dir() if own_trust_dir else trust_dir
    shared_trust: dict[str, str] = {}
    if not command and trust_dir is not None and agent_trust_ca is not None:
        # Kubernetes: the pod's other containers start once this sidecar is ready, so their
        # bundle is written before Envoy can be (a CA given outright needs no control plane)
        shared_trust = await asyncio.to_thread(
            agent_trust_environment, state_dir, agent_trust_ca, trust_dir
        )
    jail = None
    if strict and user is not None:
        assert trust_at is not None
        # CMD's environment is fixed now, before Envoy starts: the CA must already exist
        env.update(
            await asyncio.to_thread(agent_trust_environment, state_dir, agent_trust_ca, trust_at)
        )
        jail_env = {**env, **proxy_environment(f"http://127.0.0.1:{NETNS_PROXY_PORT}")}
        jail = await Jail.create(command, jail_env, netns=True, uid=user.uid, gid=user.gid)
    binding = (
        ProxyBinding(agent, "127.0.0.1", NETNS_PROXY_PORT, jail.netns_path)
        if jail is not None
        else ProxyBinding(agent, "127.0.0.1", proxy_port)
    )
    try:
        # the sidecar spools what it refuses itself (gateway unreachable) in its own directory
        envoy = _prepare_spooled(
            f"agent/{agent}/{instance}",
            f"agent/{agent}",
            f"sidecar-{agent}-{instance}",
            control_plane,
            state_dir,
            token_file,
            proxy=binding,
            xds_ca=xds_ca,
            health_port=health_port,
            insecure=insecure,
        )
        await envoy.start()
    except BaseException:
        if jail is not None:
            await jail.abandon()
        if own_trust_dir and trust_at is not None:
            shutil.rmtree(trust_at, ignore_errors=True)
        raise
    try:
        try:
            await envoy.wait_ready(30)
        except EnvoyError as exc:
            raise EnvoyError(f"{exc}{_port_hint(binding)}") from None
        if not command or user is None:
            proxy = f"http://127.0.0.1:{await asyncio.to_thread(proxy_port_of, envoy.admin)}"
            trust = shared_trust or (
                await asyncio.to_thread(
                    agent_trust_environment, state_dir, agent_trust_ca, trust_dir
                )
                if trust_dir is not None
                else {}
            )
            hint = f" SSL_CERT_FILE={trust['SSL_CERT_FILE']}" if trust else ""
            if not trust and await asyncio.to_thread(intercepting, envoy.admin):
                ca = agent_trust_ca or ca_cert_path(state_dir)
                hint = (
                    f"; https:// to tls: originate destinations is opened here: trust {ca} "
                    "besides the system CAs (--trust-dir DIR writes such a bundle)"
                )
            print(f"sidecar for agent {agent} ready; HTTP_PROXY={proxy}{hint}", flush=True)
            await _first(stop.wait(), envoy.wait())
            return 0
        if jail is None:
            assert trust_at is not None
            # the control plane made its agent-trust CA with the configuration Envoy now has
            trust = await asyncio.to_thread(
                agent_trust_environment, state_dir, agent_trust_ca, trust_at
            )
            if not trust and await asyncio.to_thread(intercepting, envoy.admin):
                log.warning(
                    "this sidecar opens https:// to tls: originate destinations with the "
                    "mesh's agent-trust CA, but none was found in %s: pass --agent-trust-ca "
                    "(the control plane's <state>/agent-trust/ca.pem), or CMD's TLS will fail",
                    state_dir,
                )
            env.update(trust)
            proxy = f"http://127.0.0.1:{await asyncio.to_thread(proxy_port_of, envoy.admin)}"
            jail = await Jail.create(
                command, {**env, **proxy_environment(proxy)}, netns=False, uid=user.uid,
                gid=user.gid,
            )  # fmt: skip
        child = await jail.release()
        await _first(stop.wait(), child.wait())
        if child.returncode is None:  # we were signalled: pass it on, then wait
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
        return await child.wait()
    finally:
        await envoy.stop()
        if jail is not None:
            await jail.abandon()
        if own_trust_dir and trust_at is not None:
            shutil.rmtree(trust_at, ignore_errors=True)


def _port_hint(binding: ProxyBinding) -> str:
    if binding.port and binding.netns_path is None:
        return (
            f" (is 127.0.0.1:{binding.port} taken, by another sidecar? each sidecar needs a "
            "port of its own: omit --proxy-port for a free one)"
        )
    return ""


async def _first(*aws: object) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
