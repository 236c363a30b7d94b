"""`meshgate demo`: what `meshgate up` starts, plus local stand-ins for an LLM provider and an
MCP server, on a demo policy, so a first minute shows allowed, denied, refused and limited
calls from unmodified SDKs. Nothing is weakened for it: join tokens, xDS over TLS, mTLS, the
agent dropped to another user; the stand-ins listen on loopback only, behind TLS the gateway
verifies."""

from __future__ import annotations

import asyncio
import os
import shlex
import stat
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from meshgate.cli.common import fail, run_until_signal, setup_logging, wait_either
from meshgate.cli.options import (
    DEFAULT_STATE,
    PORT_RANGE,
    AdminPortOpt,
    StateOpt,
    VerboseOpt,
    XdsPortOpt,
)

DEFAULT_XDS_PORT = 18000
AGENTS = (("researcher", "agent_openai.py"), ("coder", "agent_mcp.py"))


def demo(
    state_dir: StateOpt = DEFAULT_STATE,
    xds_port: XdsPortOpt = DEFAULT_XDS_PORT,
    admin_port: AdminPortOpt = 18001,
    gateway_port: Annotated[
        int,
        typer.Option(help="Port of the egress gateway's listener (the demo Mesh's).", **PORT_RANGE),
    ] = 15001,
    verbose: VerboseOpt = False,
) -> None:
    """`meshgate up` on a demo policy, with a local OpenAI-compatible provider and MCP server;
    prints the commands that run the demo agents. Ctrl-C stops everything."""
    from meshgate.controlplane.server import ServeOptions

    try:
        from meshgate.demo.standins import start_standins
    except ImportError as exc:
        from rich.markup import escape

        missing = (exc.name or "a module").partition(".")[0]
        raise fail(
            f"meshgate demo needs the demo extras ({missing} is missing): "
            + escape("pip install -e '.[demo]'")
        ) from None
    from meshgate.cli.gateway import start_gateway
    from meshgate.cli.serve import _start_control_plane
    from meshgate.demo.policy import (
        KEY_SECRET,
        LLM_HOST,
        MCP_HOST,
        new_provider_key,
        policy_dir,
        write_policy,
    )
    from meshgate.sidecar.agent_user import private_dir

    setup_logging(verbose)
    # what `meshgate up` runs with (ServeOptions' own defaults are the insecure ones)
    opts = ServeOptions(
        "127.0.0.1",
        xds_port,
        "127.0.0.1",
        admin_port,
        "127.0.0.1",
        require_tokens=True,
        mtls=True,
        xds_tls=True,
    )

    async def main(stop: asyncio.Event) -> None:
        private_dir(state_dir)
        key = new_provider_key()
        policies = policy_dir(state_dir)
        standins = await start_standins(policies / "ca", state_dir / "demo" / "upstream", key, _log)
        cp = envoy = None
        try:
            write_policy(state_dir, gateway_port, standins.llm_port, standins.mcp_port, key)
            cp = await _start_control_plane(str(policies), state_dir, opts)
            xds = cp.xds_address.rpartition(":")[2]  # the bound port (0 allowed)
            envoy = await start_gateway(
                f"127.0.0.1:{xds}", "local", state_dir, False, 1, wait_ready=True
            )
            print(
                f"meshgate demo is up: policy {cp.policy.to_json()['version']} from {policies}\n"
                f"  egress gateway  127.0.0.1:{gateway_port} (mTLS only)\n"
                f"  xDS             {cp.xds_address} (TLS)\n"
                f"  admin/status    http://{cp.admin_address}/status\n"
                f"  stand-ins       https://{LLM_HOST} -> 127.0.0.1:{standins.llm_port} "
                "(OpenAI-compatible, streams)\n"
                f"                  https://{MCP_HOST}/mcp -> 127.0.0.1:{standins.mcp_port}"
                " (MCP server, official SDK)\n"
                "  provider key    the gateway's secret "
                f"{policies / 'secrets' / KEY_SECRET}; never the agents'",
                flush=True,
            )
            print(_next_steps(state_dir, int(xds)), flush=True)
            await wait_either(stop, envoy.wait())
        finally:
            if envoy is not None:
                await envoy.stop()
            if cp is not None:
                await cp.stop()
            await standins.stop()
            print("meshgate demo stopped.", flush=True)

    run_until_signal(main)


def _log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')} stand-in] {message}", flush=True)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when inside it: the lines stay copyable."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _demo_scripts() -> Path | None:
    import meshgate

    for base in (Path.cwd(), Path(meshgate.__file__).resolve().parents[2]):
        if (base / "demo" / AGENTS[0][1]).is_file():
            return base / "demo"
    return None


def _others_can_reach(path: Path) -> bool:
    """Can a user with no relation to these files (the agent's, `nobody`) open `path`?"""
    for parent in path.absolute().parents:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _next_steps(state_dir: Path, xds_port: int) -> str:
    meshgate = Path(sys.executable).parent / "meshgate"
    exe = _shown(meshgate) if meshgate.exists() else "meshgate"
    python = Path(sys.executable)
    flags = []
    if xds_port != DEFAULT_XDS_PORT:
        flags += ["--control-plane", f"127.0.0.1:{xds_port}"]
    if state_dir != DEFAULT_STATE:
        flags += ["--state-dir", str(state_dir)]
    sudo = "sudo " if os.geteuid() != 0 else ""
    scripts = _demo_scripts()
    lines = ["Now, in another terminal here, run the demo agents (each behind its sidecar, as"]
    lines.append("`nobody`, trusting the sidecar's CA for https://; neither holds a key):")
    if scripts is None:
        lines.append("  (demo/agent_openai.py and demo/agent_mcp.py: in the meshgate repository)")
    for agent, script in AGENTS:
        path = scripts / script if scripts else Path("demo") / script
        argv = [exe, "sidecar", "run", "--agent", agent, *flags, "--", _shown(python), _shown(path)]
        lines.append(f"  {sudo}{shlex.join(argv)}")
    state_flags = ["--state-dir", str(state_dir)] if state_dir != DEFAULT_STATE else []
    lines.append(f"  {shlex.join([exe, 'audit', 'query', *state_flags])}")
    if scripts is not None and not all(
        _others_can_reach(p) for p in (python.resolve(), python, scripts / AGENTS[0][1])
    ):
        lines.append(
            "  note: `nobody` cannot read this Python or the demo scripts (a private home "
            "directory?): make the venv and checkout readable by others, or add --user NAME "
            "for an unprivileged user that can."
        )
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)
